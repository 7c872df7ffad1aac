"""CFG sampling (janus_rt.kernels.sampling): logits -> tokens in one launch, one program per row.

Image generation step: B = 16 rows of V = 16384 bf16 logits for cond and uncond (cfg 5); also the text vocab
(V = 102400, no guidance, the multi-pass kernel). Settings: greedy, plain sampling (the official loop), top-k 50,
top-p 0.9, top-k 50 + top-p 0.9. Against the sort-based reference and the usual eager PyTorch path
(mix, / T, topk mask, sort + cumsum top-p mask, softmax, torch.multinomial). GB/s counts the logits read once.

Run: python bench/bench_sampling.py. Prints a markdown table; main() returns the rows.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bandwidth_cols, device_name, peak_bandwidth_gbs, print_table, require_cuda  # noqa: E402

from janus_rt import kernels as K  # noqa: E402
from janus_rt.kernels.sampling import cfg_sample_ref  # noqa: E402

DEVICE = "cuda"
CASES = [(16, 16384, True), (16, 102400, False)]  # (B, V, with uncond)
SETTINGS = {  # name: (top_k, top_p, greedy)
    "greedy": (0, 1.0, True),
    "plain": (0, 1.0, False),
    "top-k 50": (50, 1.0, False),
    "top-p 0.9": (0, 0.9, False),
    "top-k 50 + top-p 0.9": (50, 0.9, False),
}


def torch_eager_sample(cond, uncond, cfg_weight, temperature, top_k, top_p, greedy):
    """What a generation loop typically runs: several full-row passes and a sort for top-p."""
    logits = cond.float() if uncond is None else uncond.float() + cfg_weight * (cond.float() - uncond.float())
    if greedy:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k > 0:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p  # mass before this token already reaches p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1).squeeze(1)


def main() -> list[dict]:
    if not require_cuda("bench_sampling"):
        return []
    from triton.testing import do_bench

    peak = peak_bandwidth_gbs()
    rows = []
    for B, V, guided in CASES:
        cond = torch.randn(B, V, device=DEVICE, dtype=torch.bfloat16) * 4
        uncond = torch.randn(B, V, device=DEVICE, dtype=torch.bfloat16) * 4 if guided else None
        seeds = torch.arange(B, device=DEVICE)
        nbytes = (2 if guided else 1) * B * V * cond.element_size()
        for name, (k, p, greedy) in SETTINGS.items():
            impls = [("triton", lambda: K.cfg_sample(cond, uncond, 5.0, 1.0, k, p, seeds, greedy)),
                     ("ref (sort-based)", lambda: cfg_sample_ref(cond, uncond, 5.0, 1.0, k, p, seeds, greedy)),
                     ("torch eager", lambda: torch_eager_sample(cond, uncond, 5.0, 1.0, k, p, greedy))]
            triton_ms = None
            for impl, fn in impls:
                ms = do_bench(fn, warmup=25, rep=100)
                triton_ms = triton_ms or ms
                rows.append({"case": f"B{B} V{V}" + (" cfg" if guided else ""), "setting": name, "impl": impl,
                             "us": 1e3 * ms, "time / triton": ms / triton_ms, **bandwidth_cols(nbytes, ms, peak)})
    print(f"# cfg_sample on {device_name()} (measured copy bandwidth {peak:.0f} GB/s), bf16 logits")
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
