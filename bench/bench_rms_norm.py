"""RMSNorm (janus_rt.kernels.rms_norm) vs the eager reference and torch's F.rms_norm, bf16.

Shapes: Janus-Pro's LLM widths (2048 for 1B, 4096 for 7B) with the residual add fused, at a CFG decode batch
(32 rows = parallel_size 16), one generation prefill (1152 rows = 2 x 576) and a training batch (8192 rows);
plus the final norm without a residual. Memory-bound: reports GB/s of the bytes the op must move (read x
[and residual], write y [and x + residual]; backward reads dy, h [and the residual grad], writes dx) and the
fraction of the measured copy bandwidth.

Run: python bench/bench_rms_norm.py. Prints a markdown table; main() returns the rows.
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_name, peak_bandwidth_gbs, print_table, require_cuda  # noqa: E402

from janus_rt import kernels as K  # noqa: E402
from janus_rt.kernels.rms_norm import rms_norm_ref  # noqa: E402

EPS = 1e-6
# (rows, C, fused residual, time backward)
CASES = [
    (32, 2048, True, False), (1152, 2048, True, False), (8192, 2048, True, True),
    (32, 4096, True, False), (1152, 4096, True, False), (8192, 4096, True, True),
    (8192, 2048, False, True),
]


def _torch_fast(x, w, eps, residual=None):
    h = x + residual if residual is not None else x
    y = F.rms_norm(h, (h.shape[-1],), w, eps)
    return (y, h) if residual is not None else y


def _time(fn, inputs, backward):
    from triton.testing import do_bench

    inputs = [t.detach().requires_grad_(backward) for t in inputs]
    fwd = do_bench(lambda: fn(*inputs))
    if not backward:
        return fwd, float("nan")
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = [torch.randn_like(o) for o in outs]
    total = do_bench(lambda: torch.autograd.grad(fn(*inputs), inputs, grads))
    return fwd, total - fwd


def main() -> list[dict]:
    if not require_cuda("bench_rms_norm"):
        return []
    peak = peak_bandwidth_gbs()
    rows = []
    for n, c, residual, backward in CASES:
        x = torch.randn(n, c, device="cuda", dtype=torch.bfloat16)
        r = torch.randn_like(x) if residual else None
        w = 1 + 0.1 * torch.randn(c, device="cuda", dtype=torch.bfloat16)
        streams = 2 if residual else 1
        fwd_bytes = 2 * n * c * 2 * streams + 2 * c + 4 * n
        bwd_bytes = 2 * n * c * (3 + (1 if residual else 0)) + 4 * n
        y = K.rms_norm(x, w, EPS, r)
        y_ref = rms_norm_ref(x, w, EPS, r)
        y, y_ref = (y[0], y_ref[0]) if residual else (y, y_ref)
        err = (y.float() - y_ref.float()).abs().max().item()
        ins = [x, w] + ([r] if residual else [])
        wrap = lambda f: (lambda x, w, r=None: f(x, w, EPS, r))
        for impl, fn in (("triton", wrap(K.rms_norm)), ("torch F.rms_norm", wrap(_torch_fast)),
                         ("ref", wrap(rms_norm_ref))):
            fwd_ms, bwd_ms = _time(fn, ins, backward)
            rows.append({
                "case": f"rows {n} C {c}{' +residual' if residual else ''}", "impl": impl,
                "fwd ms": fwd_ms, "fwd GB/s": fwd_bytes / fwd_ms / 1e6,
                "fwd % peak": 100 * fwd_bytes / fwd_ms / 1e6 / peak,
                "bwd ms": bwd_ms, "bwd GB/s": bwd_bytes / bwd_ms / 1e6,
                "max |triton - ref|": err,
            })
    print(f"# rms_norm (bf16) on {device_name()} (copy bandwidth {peak:.0f} GB/s)")
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
