"""The other CPU kernels (janus_rt.cpu_ops) at Janus-Pro-1B decode shapes vs their PyTorch references.

vq_nearest: one image's 576 latents against the 16384 x 8 codebook. paged_decode_attention: 16 heads of 128,
block 16, ~600 cached tokens (prompt + 576 image tokens), CFG batch of 2 and a batch of 16 (GB/s of K/V read;
torch's SDPA on contiguous K/V is the "no paging" floor), fp32 and bf16 caches and the int8 cache (rows + a scale a
head, `--kv-cache-dtype int8`; against the bf16 cache's time, bytes counted as held). kv_store: one decode step and
one prefill.
cfg_sample: image vocab 16384 with CFG, text vocab 102400 with top-p. mlp_gelu: the gen head (2048 -> 2048 -> 16384)
for 32 rows in bf16, and the small benchmark shape's (512 -> 512 -> 16384, 8 rows, fp32).

Run: python bench/bench_cpu_ops.py [--threads N]. Prints a markdown table; main() returns the rows. Times are best-of-N.
"""
import datetime
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gemv import cpu_name  # noqa: E402
from common import print_table  # noqa: E402

from janus_rt import cpu_ops  # noqa: E402


def best_time(fn, min_time: float = 0.3, max_reps: int = 100) -> float:
    fn()
    times, total = [], 0.0
    while (total < min_time or len(times) < 3) and len(times) < max_reps:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        total += times[-1]
    return min(times)


def _row(op, shape, ours, ref, ref_name, nbytes=None):
    r = {"op": op, "shape": shape, "ours_ms": ours * 1e3, "ref": ref_name, "ref_ms": ref * 1e3, "speedup": ref / ours}
    r["ours_GB/s"] = nbytes / ours / 1e9 if nbytes else ""
    return r


def bench_vq() -> list[dict]:
    from janus_rt.kernels.vq import vq_nearest_ref

    z = F.normalize(torch.randn(576, 8), dim=1)
    cb = F.normalize(torch.randn(16384, 8), dim=1)
    return [_row("vq_nearest", "576 x 16384 x 8", best_time(lambda: cpu_ops.vq_nearest(z, cb)),
                 best_time(lambda: vq_nearest_ref(z, cb)), "cdist.argmin")]


def bench_paged_attention() -> list[dict]:
    from janus_rt.engine.kv_quant import quantize_kv
    from janus_rt.kernels.paged_attention import paged_decode_attention_ref

    rows = []
    H, D, bs, ctx = 16, 128, 16, 600
    for B in (2, 16):
        for dtype in (torch.float32, torch.bfloat16):
            nblk = -(-ctx // bs)
            k_cache = torch.randn(B * nblk, bs, H, D).to(dtype)
            v_cache = torch.randn(B * nblk, bs, H, D).to(dtype)
            block_tables = torch.randperm(B * nblk).reshape(B, nblk).int()
            context_lens = torch.full((B,), ctx, dtype=torch.int32)
            q = torch.randn(B, H, D).to(dtype)
            ours = best_time(lambda: cpu_ops.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens))
            ref = best_time(lambda: paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens))
            kc = torch.randn(B, H, ctx, D).to(dtype)  # contiguous per sequence: torch's fast path, no gather
            vc = torch.randn(B, H, ctx, D).to(dtype)
            sdpa = best_time(lambda: F.scaled_dot_product_attention(q[:, :, None], kc, vc))
            nbytes = 2 * B * ctx * H * D * k_cache.element_size()
            name = f"B{B} H{H} D{D} ctx{ctx} {str(dtype)[6:]}"
            rows.append(_row("paged_decode_attention", name, ours, ref, "ref (gather+softmax)", nbytes))
            rows.append(_row("paged_decode_attention", name, ours, sdpa, "SDPA contiguous", nbytes))
            if dtype == torch.bfloat16:  # the same rows as an int8 cache, against this bf16 cache's time
                (kq, ks), (vq, vs) = quantize_kv(k_cache), quantize_kv(v_cache)
                int8 = best_time(lambda: cpu_ops.paged_decode_attention(q, kq, vq, block_tables, context_lens,
                                                                        None, ks, vs))
                rows.append(_row("paged_decode_attention", f"B{B} H{H} D{D} ctx{ctx} int8 KV, bf16 q", int8, ours,
                                 "the bf16 cache", 2 * B * ctx * H * (D + 4)))
    return rows


def bench_kv_store() -> list[dict]:
    from janus_rt.kernels.kv_store import kv_store_ref

    rows = []
    H, D, bs, nblk = 16, 128, 16, 512
    k_cache = torch.zeros(nblk, bs, H, D, dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    for N in (2, 600):
        k = torch.randn(N, H, D).bfloat16()
        v = torch.randn(N, H, D).bfloat16()
        slots = torch.randperm(nblk * bs)[:N]
        ours = best_time(lambda: cpu_ops.kv_store(k, v, k_cache, v_cache, slots))
        ref = best_time(lambda: kv_store_ref(k, v, k_cache, v_cache, slots))
        rows.append(_row("kv_store", f"N{N} H{H} D{D} bf16", ours, ref, "kv_store_ref", 2 * 2 * k.numel() * 2))
    return rows


def bench_cfg_sample() -> list[dict]:
    from janus_rt.kernels.sampling import cfg_sample_ref

    rows = []
    for B, V, uncond, top_p in ((1, 16384, True, 1.0), (16, 16384, True, 1.0), (1, 102400, False, 0.9)):
        cond = torch.randn(B, V)
        u = torch.randn(B, V) if uncond else None
        args = dict(cfg_weight=5.0, temperature=1.0, top_p=top_p, seeds=torch.arange(B))
        ours = best_time(lambda: cpu_ops.cfg_sample(cond, u, **args))
        ref = best_time(lambda: cfg_sample_ref(cond, u, **args))
        name = f"B{B} V{V}" + (" cfg" if uncond else "") + (f" top_p {top_p}" if top_p < 1 else "")
        rows.append(_row("cfg_sample", name, ours, ref, "cfg_sample_ref"))
    return rows


def bench_mlp_gelu() -> list[dict]:
    """The gen head at decode: 32 rows (n = 16 with CFG) through 2048 -> 2048 -> GELU -> 16384, bf16 (1B), against
    the op chain the cpu path ran before (two csrc GEMVs and torch's GELU)."""
    rows = []
    for M, C, dtype in ((32, 2048, torch.bfloat16), (8, 512, torch.float32)):
        x = torch.randn(M, C).to(dtype)
        w1, b1 = (torch.randn(C, C) / C**0.5).to(dtype), torch.randn(C).to(dtype)
        w2, b2 = (torch.randn(16384, C) / C**0.5).to(dtype), torch.randn(16384).to(dtype)
        ours = best_time(lambda: cpu_ops.mlp_gelu(x, w1, b1, w2, b2))
        chain = lambda: cpu_ops.linear(F.gelu(cpu_ops.linear(x, w1, b1.float()).to(dtype)), w2, b2.float())
        ref = best_time(chain)
        nbytes = (w1.numel() + w2.numel()) * w1.element_size()
        rows.append(_row("mlp_gelu", f"M{M} {C}->{C}->16384 {str(dtype)[6:]}", ours, ref, "linear, GELU, linear",
                         nbytes))
    return rows


def main() -> list[dict]:
    if not cpu_ops.available():
        print("[bench_cpu_ops] janus_rt._C not built: skipping", file=sys.stderr)
        return []
    print(f"# bench_cpu_ops: {cpu_name()}, ISA {cpu_ops.simd_isa()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {datetime.date.today()}")
    rows = bench_vq() + bench_paged_attention() + bench_kv_store() + bench_cfg_sample() + bench_mlp_gelu()
    print_table(rows)
    return rows


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--threads":
        torch.set_num_threads(int(sys.argv[2]))  # also the OpenMP team size of janus_rt._C (one libgomp)
    main()
