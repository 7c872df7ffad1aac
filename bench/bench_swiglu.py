"""SwiGLU (janus_rt.kernels.swiglu) vs the eager reference F.silu(gate) * up, bf16.

Shapes: Janus-Pro's MLP widths (5632 for 1B, 11008 for 7B) at a CFG decode batch (32 rows), one generation
prefill (1152 rows) and a training batch (8192 rows, with backward). gate/up are the halves of one fused
gate_up output [rows, 2F] as a runtime would produce them. Memory-bound: GB/s of the bytes the op must move
(forward reads gate, up and writes out; backward reads dout, gate, up and writes dgate, dup) and the fraction
of the measured copy bandwidth.

Run: python bench/bench_swiglu.py. Prints a markdown table; main() returns the rows.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_name, peak_bandwidth_gbs, print_table, require_cuda  # noqa: E402

from janus_rt import kernels as K  # noqa: E402
from janus_rt.kernels.swiglu import swiglu_ref  # noqa: E402

# (rows, F, time backward)
CASES = [(32, 5632, False), (1152, 5632, False), (8192, 5632, True),
         (32, 11008, False), (1152, 11008, False), (8192, 11008, True)]


def _time(fn, gate_up, f, backward):
    from triton.testing import do_bench

    gate_up = gate_up.detach().requires_grad_(backward)
    split = lambda: (gate_up[:, :f], gate_up[:, f:])
    fwd = do_bench(lambda: fn(*split()))
    if not backward:
        return fwd, float("nan")
    dout = torch.randn(gate_up.shape[0], f, device="cuda", dtype=gate_up.dtype)
    total = do_bench(lambda: torch.autograd.grad(fn(*split()), gate_up, dout))
    return fwd, total - fwd


def main() -> list[dict]:
    if not require_cuda("bench_swiglu"):
        return []
    peak = peak_bandwidth_gbs()
    rows = []
    for n, f, backward in CASES:
        gate_up = torch.randn(n, 2 * f, device="cuda", dtype=torch.bfloat16)
        fwd_bytes, bwd_bytes = 3 * n * f * 2, 5 * n * f * 2
        err = (K.swiglu(gate_up[:, :f], gate_up[:, f:]).float()
               - swiglu_ref(gate_up[:, :f], gate_up[:, f:]).float()).abs().max().item()
        for impl, fn in (("triton", K.swiglu), ("ref", swiglu_ref)):
            fwd_ms, bwd_ms = _time(fn, gate_up, f, backward)
            rows.append({
                "case": f"rows {n} F {f}", "impl": impl,
                "fwd ms": fwd_ms, "fwd GB/s": fwd_bytes / fwd_ms / 1e6,
                "fwd % peak": 100 * fwd_bytes / fwd_ms / 1e6 / peak,
                "bwd ms": bwd_ms, "bwd GB/s": bwd_bytes / bwd_ms / 1e6,
                "max |triton - ref|": err,
            })
    print(f"# swiglu (bf16) on {device_name()} (copy bandwidth {peak:.0f} GB/s)")
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
