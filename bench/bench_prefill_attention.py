"""csrc's bf16 prefill attention (cpu_ops.prefill_attention, csrc/prefill_attention.cpp) vs torch's CPU SDPA
(ops.attention_torch) on this CPU, at the prefill's shapes: SigLIP-L's 576 patches (16 heads x 64) and the 1B LLM's
understanding prompt (639 tokens, 16 heads x 128, causal). GFLOP/s count 4 T_q T_k D per head, halved when causal.

Run: python bench/bench_prefill_attention.py [--reps N]. Prints a markdown table; main() returns the rows.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_table  # noqa: E402

from janus_rt import cpu_ops, ops  # noqa: E402

# (what, B, T, H, D, causal)
CASES = [("SigLIP-L @384", 1, 576, 16, 64, False), ("1B LLM prompt", 1, 639, 16, 128, True)]


def _best_ms(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main(reps: int = 10, cases=CASES) -> list[dict]:
    if not cpu_ops.prefill_attention_available():
        print("[bench_prefill_attention] this build has no bf16 prefill attention (AVX512_BF16): skipping",
              file=sys.stderr)
        return []
    rows = []
    for what, B, T, H, D, causal in cases:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, T, H, D, generator=g).bfloat16() for _ in range(3))
        flops = 4 * B * H * T * T * D / (2 if causal else 1)
        ours = _best_ms(lambda: cpu_ops.prefill_attention(q, k, v, causal), reps)
        torch_ms = _best_ms(lambda: ops.attention_torch(q, k, v, causal), reps)
        rows.append({"case": what, "shape": f"B{B} T{T} H{H} D{D}" + (" causal" if causal else ""),
                     "csrc_ms": ours, "torch_sdpa_ms": torch_ms, "csrc_gflops": flops / ours / 1e6,
                     "torch_gflops": flops / torch_ms / 1e6, "speedup": torch_ms / ours})
    print(f"# bench_prefill_attention: {torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d %H:%M')} UTC")
    print_table(rows)
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=10)
    main(ap.parse_args().reps)
