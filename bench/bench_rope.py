"""Rotary embedding (janus_rt.kernels.rope) on q and k together vs the eager reference (transformers' math), bf16.

Shapes: head_dim 128 with 16 heads (1B) and 32 heads (7B) for q and k, at a CFG decode batch (32 tokens), one
generation prefill (1152 tokens) and a training batch (8192 tokens, with backward). There is no fused torch op
for RoPE; the reference is what transformers runs. Memory-bound: GB/s of the bytes the op must move (read q, k
and positions, write q_out, k_out; backward the same for the grads) and the fraction of measured copy bandwidth.

Run: python bench/bench_rope.py. Prints a markdown table; main() returns the rows.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_name, peak_bandwidth_gbs, print_table, require_cuda  # noqa: E402

from janus_rt import kernels as K  # noqa: E402
from janus_rt.kernels.rope import rope_ref  # noqa: E402

D = 128
# (tokens, heads, time backward)
CASES = [(32, 16, False), (1152, 16, False), (8192, 16, True), (32, 32, False), (1152, 32, False), (8192, 32, True)]


def _time(fn, q, k, pos, backward):
    from triton.testing import do_bench

    q, k = q.detach().requires_grad_(backward), k.detach().requires_grad_(backward)
    fwd = do_bench(lambda: fn(q, k, pos))
    if not backward:
        return fwd, float("nan")
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    total = do_bench(lambda: torch.autograd.grad(fn(q, k, pos), (q, k), (dq, dk)))
    return fwd, total - fwd


def main() -> list[dict]:
    if not require_cuda("bench_rope"):
        return []
    peak = peak_bandwidth_gbs()
    rows = []
    for n, h, backward in CASES:
        q = torch.randn(n, h, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(n, h, D, device="cuda", dtype=torch.bfloat16)
        pos = torch.randint(0, 16384, (n,), device="cuda")
        nbytes = 2 * (2 * n * h * D) * 2 + 8 * n
        err = max((a.float() - b.float()).abs().max().item() for a, b in zip(K.rope(q, k, pos), rope_ref(q, k, pos)))
        for impl, fn in (("triton", K.rope), ("ref", rope_ref)):
            fwd_ms, bwd_ms = _time(fn, q, k, pos, backward)
            rows.append({
                "case": f"tokens {n} heads {h} D {D}", "impl": impl,
                "fwd ms": fwd_ms, "fwd GB/s": nbytes / fwd_ms / 1e6, "fwd % peak": 100 * nbytes / fwd_ms / 1e6 / peak,
                "bwd ms": bwd_ms, "bwd GB/s": nbytes / bwd_ms / 1e6,
                "max |triton - ref|": err,
            })
    print(f"# rope (bf16, q and k) on {device_name()} (copy bandwidth {peak:.0f} GB/s)")
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
