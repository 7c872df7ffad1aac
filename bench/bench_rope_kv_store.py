"""RoPE + KV store in one launch (janus_rt.kernels.rope_kv_store) against the two launches it replaces in a decode
step (rope, then kv_store of the rotated k and v), and the PyTorch reference.

Cases: one CFG decode step of Janus-Pro-1B (32 rows, 16 heads x 128) and of 7B (32 rows, 32 x 128), a single image's
2 rows, bf16, block 16, random distinct slots; q, k, v as views of one qkv buffer as the model hands them over.
At these sizes both are launch-bound: the time per call is what a decode step pays per layer (inside a CUDA graph
the launch overhead is smaller; bench/RESULTS.md). Bytes: q, k, v read, q, k, v written.

Run: python bench/bench_rope_kv_store.py. Prints a markdown table; main() returns the rows.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bandwidth_cols, device_name, peak_bandwidth_gbs, print_table, require_cuda  # noqa: E402

from janus_rt import kernels as K  # noqa: E402
from janus_rt.kernels.rope_kv_store import rope_kv_store_ref  # noqa: E402

CASES = [(32, 16, 128), (2, 16, 128), (32, 32, 128)]  # (rows, heads, head_dim)
BLOCK_SIZE, NUM_BLOCKS = 16, 4096


def main() -> list[dict]:
    if not require_cuda("bench_rope_kv_store"):
        return []
    from triton.testing import do_bench

    peak = peak_bandwidth_gbs()
    rows = []
    for n, heads, head_dim in CASES:
        qkv = torch.randn(n, 3 * heads * head_dim, device="cuda", dtype=torch.bfloat16)
        q, k, v = (qkv[:, i * heads * head_dim:(i + 1) * heads * head_dim].view(n, heads, head_dim) for i in range(3))
        pos = torch.randint(0, 600, (n,), device="cuda")
        k_cache = torch.zeros(NUM_BLOCKS, BLOCK_SIZE, heads, head_dim, device="cuda", dtype=torch.bfloat16)
        v_cache = torch.zeros_like(k_cache)
        slots = torch.randperm(NUM_BLOCKS * BLOCK_SIZE, device="cuda")[:n]
        nbytes = 2 * 3 * q.numel() * q.element_size()

        def split():
            q_rot, k_rot = K.rope(q, k, pos, 10000.0)
            K.kv_store(k_rot, v, k_cache, v_cache, slots)
            return q_rot

        impls = [("triton rope_kv_store (one launch)", lambda: K.rope_kv_store(q, k, v, pos, 10000.0, k_cache,
                                                                                v_cache, slots)),
                 ("triton rope + kv_store (two)", split),
                 ("ref", lambda: rope_kv_store_ref(q, k, v, pos, 10000.0, k_cache, v_cache, slots))]
        for impl, fn in impls:
            ms = do_bench(fn, warmup=25, rep=100)
            rows.append({"case": f"N{n} H{heads} D{head_dim}", "impl": impl, "ms": ms,
                         **bandwidth_cols(nbytes, ms, peak)})
    print(f"# rope_kv_store on {device_name()} (measured copy bandwidth {peak:.0f} GB/s), bf16, block {BLOCK_SIZE}")
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
