"""VQ kernels (janus_rt.kernels.vq): fused nearest-code search and codebook gather.

vq_nearest at Janus-Pro's encode shape (16 images x 576 tokens = 9216 rows, K = 16384 codes, D = 8, fp32,
normalised) against torch.cdist + argmin (the reference) and the matmul form argmin(||c||^2 - 2 z c^T); target
>= 5x over cdist on an H100. FLOP/s counts the 2 N K D of the distance dots, the fraction is of the measured
fp32 matmul peak; "agree" is the fraction of rows choosing cdist's code (fp32 near-ties may flip).
vq_lookup at the decode shape (9216 ids) against the reference and F.embedding on a pre-normalised codebook;
bytes = ids + gathered rows + output.

Run: python bench/bench_vq.py. Prints a markdown table; main() returns the rows.
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_name, peak_bandwidth_gbs, peak_tflops, print_table, require_cuda  # noqa: E402

from janus_rt import kernels as K  # noqa: E402
from janus_rt.kernels.vq import vq_lookup_ref, vq_nearest_ref  # noqa: E402

N, CODES, DIM = 576 * 16, 16384, 8
DEVICE = "cuda"


def _matmul_argmin(z, codebook):
    return (codebook.pow(2).sum(1) - 2 * z @ codebook.t()).argmin(dim=1)


def main() -> list[dict]:
    if not require_cuda("bench_vq"):
        return []
    from triton.testing import do_bench

    peak_flops, peak_bw = peak_tflops(torch.float32), peak_bandwidth_gbs()
    codebook = F.normalize(torch.randn(CODES, DIM, device=DEVICE), dim=-1)
    z = F.normalize(torch.randn(N, DIM, device=DEVICE), dim=-1)
    want = vq_nearest_ref(z, codebook)
    flops = 2 * N * CODES * DIM
    rows = []
    base_ms = None
    for impl, fn in [("cdist + argmin (ref)", lambda: vq_nearest_ref(z, codebook)),
                     ("matmul + argmin", lambda: _matmul_argmin(z, codebook)),
                     ("triton", lambda: K.vq_nearest(z, codebook))]:
        agree = (fn() == want).float().mean().item()
        ms = do_bench(fn, warmup=25, rep=200)
        base_ms = base_ms or ms
        rows.append({"op": "vq_nearest", "case": f"N{N} K{CODES} D{DIM} fp32", "impl": impl, "ms": ms,
                     "x vs ref": base_ms / ms, "TFLOP/s": flops / ms / 1e9, "GB/s": "",
                     "% peak": 100 * flops / ms / 1e9 / peak_flops, "agree": agree})

    ids = torch.randint(0, CODES, (16, 576), device=DEVICE)
    normed = F.normalize(codebook, dim=-1)
    nbytes = ids.numel() * (ids.element_size() + 2 * DIM * codebook.element_size())
    base_ms = None
    for impl, fn in [("normalize + index (ref)", lambda: vq_lookup_ref(ids, codebook)),
                     ("F.embedding, pre-normalised", lambda: F.embedding(ids, normed)),
                     ("triton", lambda: K.vq_lookup(ids, codebook))]:
        ms = do_bench(fn, warmup=25, rep=200)
        base_ms = base_ms or ms
        rows.append({"op": "vq_lookup", "case": f"ids 16x576 D{DIM} fp32", "impl": impl, "ms": ms,
                     "x vs ref": base_ms / ms, "TFLOP/s": "", "GB/s": nbytes / ms / 1e6,
                     "% peak": 100 * nbytes / ms / 1e6 / peak_bw, "agree": ""})
    print(f"# vq on {device_name()} (measured fp32 matmul {peak_flops:.1f} TFLOP/s, copy {peak_bw:.0f} GB/s)")
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
