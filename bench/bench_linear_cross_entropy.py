"""Fused linear cross-entropy (janus_rt.kernels.linear_cross_entropy): peak memory and time of forward + backward.

Cases (bf16): the 1B text head (N = 4096 tokens, H = 2048, V = 102400), the 1B image head (N = 8 x 576 tokens,
H = 2048, V = 16384, with bias) and the 7B text head (H = 4096). Compared with F.cross_entropy(F.linear(...))
(the reference). "peak MB" is torch.cuda.max_memory_allocated above the inputs during loss + all grads (the grads
themselves included); "transient MB" subtracts the grads every method must return. Target: the fused peak
<= 1/4 of the reference's. TFLOP/s counts the 3 GEMMs (6 N H V).

Run: python bench/bench_linear_cross_entropy.py. Prints a markdown table; main() returns the rows.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_name, peak_tflops, print_table, require_cuda  # noqa: E402

from janus_rt import kernels as K  # noqa: E402
from janus_rt.kernels.linear_cross_entropy import linear_cross_entropy_ref  # noqa: E402

DEVICE = "cuda"
CASES = [("1B text", 4096, 2048, 102400, False), ("1B image", 8 * 576, 2048, 16384, True),
         ("7B text", 4096, 4096, 102400, False)]  # (name, N, H, V, bias)


def _peak_bytes(fn) -> int:
    """Peak allocated bytes above what is allocated before fn() runs (fn's results are freed after)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    del out
    return torch.cuda.max_memory_allocated() - base


def main() -> list[dict]:
    if not require_cuda("bench_linear_cross_entropy"):
        return []
    from triton.testing import do_bench

    peak = peak_tflops(torch.bfloat16)
    rows = []
    for name, N, H, V, with_bias in CASES:
        hidden = torch.randn(N, H, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
        weight = (torch.randn(V, H, device=DEVICE) / H**0.5).to(torch.bfloat16).requires_grad_()
        bias = torch.zeros(V, device=DEVICE, dtype=torch.bfloat16, requires_grad=True) if with_bias else None
        targets = torch.randint(0, V, (N,), device=DEVICE)
        targets[::7] = -100
        leaves = [hidden, weight] + ([bias] if with_bias else [])
        grad_bytes = sum(t.numel() * t.element_size() for t in leaves)

        def run(impl):
            return lambda: torch.autograd.grad(impl(hidden, weight, targets, bias), leaves)

        ref_loss = linear_cross_entropy_ref(hidden, weight, targets, bias).float().item()
        ref_peak = None
        for impl_name, impl in [("F.linear + F.cross_entropy (ref)", linear_cross_entropy_ref),
                                ("fused (triton + chunked GEMMs)", K.linear_cross_entropy)]:
            loss = impl(hidden, weight, targets, bias).float().item()
            peak_b = _peak_bytes(run(impl))
            ref_peak = ref_peak or peak_b
            ms = do_bench(run(impl), warmup=5, rep=50)
            rows.append({"case": f"{name} N{N} H{H} V{V}", "impl": impl_name, "ms": ms,
                         "TFLOP/s": 6 * N * H * V / ms / 1e9, "% peak": 100 * 6 * N * H * V / ms / 1e9 / peak,
                         "peak MB": peak_b / 2**20, "transient MB": (peak_b - grad_bytes) / 2**20,
                         "peak / ref": peak_b / ref_peak, "loss - ref": loss - ref_loss})
        del hidden, weight, bias, leaves
    print(f"# linear_cross_entropy fwd + bwd on {device_name()} (measured bf16 matmul {peak:.0f} TFLOP/s), bf16")
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
