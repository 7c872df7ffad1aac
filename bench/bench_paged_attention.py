"""Paged decode attention (janus_rt.kernels.paged_decode_attention): achieved HBM bandwidth vs the measured peak.

Janus-Pro image generation decodes 2 * parallel_size rows (CFG) at ~600 cached tokens (prompt + 576 image
tokens); the target case is batch 32 / context 600 / 16 heads / head_dim 128 / bf16 (>= 80% of peak). Bytes
counted: every cached K and V element once, plus q and o. Pages are scattered at random across the cache.
Also shown: torch SDPA over the same K/V stored contiguously (no paging), and the Python reference.

Run: python bench/bench_paged_attention.py. Prints a markdown table; main() returns the rows.
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bandwidth_cols, device_name, peak_bandwidth_gbs, print_table, require_cuda  # noqa: E402

from janus_rt import kernels as K  # noqa: E402
from janus_rt.kernels.paged_attention import paged_decode_attention_ref  # noqa: E402

# (batch, context, heads, head_dim, block_size)
CASES = [(32, 600, 16, 128, 16), (32, 600, 16, 128, 32), (2, 600, 16, 128, 16), (1, 4096, 16, 128, 16),
         (32, 2048, 16, 128, 16), (16, 600, 32, 128, 16)]


def _inputs(batch, context, heads, head_dim, block_size, dtype=torch.bfloat16):
    blocks_per_seq = -(-context // block_size)
    num_blocks = batch * blocks_per_seq + 8
    k_cache = torch.randn(num_blocks, block_size, heads, head_dim, device="cuda", dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(num_blocks, device="cuda")[:batch * blocks_per_seq].view(batch, -1).to(torch.int32)
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, heads, head_dim, device="cuda", dtype=dtype)
    return q, k_cache, v_cache, tables, lens


def main() -> list[dict]:
    if not require_cuda("bench_paged_attention"):
        return []
    from triton.testing import do_bench

    peak = peak_bandwidth_gbs()
    rows = []
    for batch, context, heads, head_dim, block_size in CASES:
        q, k_cache, v_cache, tables, lens = _inputs(batch, context, heads, head_dim, block_size)
        nbytes = 2 * batch * context * heads * head_dim * 2 + 2 * q.numel() * 2
        ref = paged_decode_attention_ref(q, k_cache, v_cache, tables, lens)
        err = (K.paged_decode_attention(q, k_cache, v_cache, tables, lens).float() - ref.float()).abs().max().item()
        impls = [(f"triton splits={s or 'auto'}",
                  lambda s=s: K.paged_decode_attention(q, k_cache, v_cache, tables, lens, num_splits=s))
                 for s in (None, 1, 2, 4, 8)]
        impls += [(f"triton slots splits={s or 'auto'}{f' block_n={bn}' if bn else ''}",
                   lambda s=s, bn=bn: K.paged_decode_attention(q, k_cache, v_cache, tables, lens, num_splits=s,
                                                               variant="slots", block_n=bn))
                  for s, bn in ((None, None), (1, None), (None, 64))]
        # the table as the engine's CUDA graphs hold it: columns for a 4096-token sequence, whatever the context
        wide = torch.zeros(batch, max(tables.shape[1], 4096 // block_size), dtype=tables.dtype, device="cuda")
        wide[:, :tables.shape[1]] = tables
        impls.append(("triton splits=auto, 4096-token table",
                      lambda: K.paged_decode_attention(q, k_cache, v_cache, wide, lens)))
        # the same K/V stored contiguously per sequence: [B, H, context, D]
        kd = torch.randn(batch, heads, context, head_dim, device="cuda", dtype=q.dtype)
        vd = torch.randn_like(kd)
        impls.append(("torch sdpa, dense K/V", lambda: F.scaled_dot_product_attention(q[:, :, None], kd, vd)))
        if batch * context <= 20000:
            impls.append(("ref", lambda: paged_decode_attention_ref(q, k_cache, v_cache, tables, lens)))
        for impl, fn in impls:
            ms = do_bench(fn, warmup=25, rep=200)
            rows.append({"case": f"B{batch} ctx{context} H{heads} D{head_dim} page{block_size}", "impl": impl,
                         "ms": ms, **bandwidth_cols(nbytes, ms, peak), "max |triton - ref|": err})
    print(f"# paged_decode_attention on {device_name()} (measured copy bandwidth {peak:.0f} GB/s), bf16")
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
