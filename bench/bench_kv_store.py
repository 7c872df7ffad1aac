"""KV store (janus_rt.kernels.kv_store): writing new K/V rows into the paged cache, GB/s vs the measured peak.

Cases: one CFG decode step (32 rows), a prompt prefill (600 rows) and a packed prefill (8192 rows), Janus-Pro-1B
heads (16 x 128) and 7B heads (32 x 128), bf16, block 16, random distinct slots. Bytes: k and v read + written.
Compared with the reference (advanced-index assignment) and torch's index_copy_ into the flattened cache.

Run: python bench/bench_kv_store.py. Prints a markdown table; main() returns the rows.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bandwidth_cols, device_name, peak_bandwidth_gbs, print_table, require_cuda  # noqa: E402

from janus_rt import kernels as K  # noqa: E402
from janus_rt.kernels.kv_store import kv_store_ref  # noqa: E402

CASES = [(32, 16, 128), (600, 16, 128), (8192, 16, 128), (32, 32, 128), (8192, 32, 128)]  # (rows, heads, head_dim)
BLOCK_SIZE, NUM_BLOCKS = 16, 4096


def main() -> list[dict]:
    if not require_cuda("bench_kv_store"):
        return []
    from triton.testing import do_bench

    peak = peak_bandwidth_gbs()
    rows = []
    for n, heads, head_dim in CASES:
        k, v = (torch.randn(n, heads, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        k_cache = torch.zeros(NUM_BLOCKS, BLOCK_SIZE, heads, head_dim, device="cuda", dtype=torch.bfloat16)
        v_cache = torch.zeros_like(k_cache)
        slots = torch.randperm(NUM_BLOCKS * BLOCK_SIZE, device="cuda")[:n].to(torch.int32)
        flat_k, flat_v = k_cache.view(-1, heads, head_dim), v_cache.view(-1, heads, head_dim)
        slots64 = slots.long()
        nbytes = 2 * 2 * k.numel() * k.element_size()
        impls = [("triton", lambda: K.kv_store(k, v, k_cache, v_cache, slots)),
                 ("ref", lambda: kv_store_ref(k, v, k_cache, v_cache, slots)),
                 ("torch index_copy_", lambda: (flat_k.index_copy_(0, slots64, k), flat_v.index_copy_(0, slots64, v)))]
        for impl, fn in impls:
            ms = do_bench(fn, warmup=25, rep=100)
            rows.append({"case": f"N{n} H{heads} D{head_dim}", "impl": impl, "ms": ms,
                         **bandwidth_cols(nbytes, ms, peak)})
    print(f"# kv_store on {device_name()} (measured copy bandwidth {peak:.0f} GB/s), bf16, block {BLOCK_SIZE}")
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
