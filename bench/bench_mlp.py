"""Adaptor MLP (janus_rt.kernels.mlp_gelu: Triton GEMM with fused bias + erf-GELU, then GEMM + bias) vs torch
(F.linear -> F.gelu -> F.linear, cuBLAS), bf16.

Shapes: gen_head (2048 -> 2048 -> 16384, the image-token logits) and the understanding aligner
(1024 -> 2048 -> 2048) at 576 rows (one image) and 1152 rows (a CFG pair); also gen_head at a 32-row CFG decode
step and gen_aligner (8 -> 2048 -> 2048, K = 8 below the dot's 16). Backward (stage-1 adaptor training) for the
aligner. Reports ms, TFLOP/s, the fraction of the measured bf16 matmul peak and the weight-read GB/s (what bounds
the decode-sized case). FLOPs: 2·M·(Cin·Chid + Chid·Cout) forward, 2x that backward.

Run: python bench/bench_mlp.py. Prints a markdown table; main() returns the rows.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_name, peak_tflops, print_table, require_cuda  # noqa: E402

from janus_rt import kernels as K  # noqa: E402
from janus_rt.kernels.mlp import mlp_gelu_ref  # noqa: E402

# (name, Cin, Chid, Cout, rows, time backward)
CASES = [
    ("gen_head", 2048, 2048, 16384, 576, False), ("gen_head", 2048, 2048, 16384, 1152, False),
    ("gen_head decode", 2048, 2048, 16384, 32, False),
    ("aligner", 1024, 2048, 2048, 576, True), ("aligner", 1024, 2048, 2048, 1152, True),
    ("gen_aligner", 8, 2048, 2048, 576, False), ("gen_aligner", 8, 2048, 2048, 1152, False),
]


def _time(fn, inputs, backward):
    from triton.testing import do_bench

    inputs = [t.detach().requires_grad_(backward) for t in inputs]
    fwd = do_bench(lambda: fn(*inputs))
    if not backward:
        return fwd, float("nan")
    dy = torch.randn_like(fn(*inputs))
    total = do_bench(lambda: torch.autograd.grad(fn(*inputs), inputs, dy))
    return fwd, total - fwd


def main() -> list[dict]:
    if not require_cuda("bench_mlp"):
        return []
    peak = peak_tflops(torch.bfloat16)
    rows = []
    for name, cin, chid, cout, m, backward in CASES:
        mk = lambda *shape, scale=1.0: scale * torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
        inputs = [mk(m, cin), mk(chid, cin, scale=cin ** -0.5), mk(chid, scale=0.1),
                  mk(cout, chid, scale=chid ** -0.5), mk(cout, scale=0.1)]
        flops = 2 * m * (cin * chid + chid * cout)
        weight_bytes = 2 * (chid * cin + chid + cout * chid + cout)
        y_ref = mlp_gelu_ref(*inputs).float()
        rel_err = (K.mlp_gelu(*inputs).float() - y_ref).abs().max().item() / y_ref.abs().max().item()
        for impl, fn in (("triton", K.mlp_gelu), ("torch", mlp_gelu_ref)):
            fwd_ms, bwd_ms = _time(fn, inputs, backward)
            rows.append({
                "case": f"{name} {cin}->{chid}->{cout} rows {m}", "impl": impl,
                "fwd ms": fwd_ms, "fwd TFLOP/s": flops / fwd_ms / 1e9, "fwd % peak": 100 * flops / fwd_ms / 1e9 / peak,
                "weight GB/s": weight_bytes / fwd_ms / 1e6,
                "bwd ms": bwd_ms, "bwd TFLOP/s": 2 * flops / bwd_ms / 1e9,
                "rel err vs torch": rel_err,
            })
    print(f"# mlp_gelu (bf16) on {device_name()} (bf16 matmul peak {peak:.0f} TFLOP/s)")
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
