"""janus_rt.cpu_ops (the C++/OpenMP kernels in csrc/) against the references in janus_rt.kernels.*.

Outputs are allocated inside cpu_ops with torch.empty/empty_like; the `poison` fixture (conftest.py) makes those
allocations NaN (floats) or -7 (ints), so an element the kernel forgets to write fails the comparison.
"""
import math
import mmap
import os

import pytest
import torch
import torch.nn.functional as F

import bench_scripts
from concurrency import in_threads
from paged_layout import paged_layout
from tolerances import assert_matches, assert_same_roundings, max_err
from janus_rt import _C, cpu_ops, ops
from janus_rt.kernels.kv_store import kv_store_ref
from janus_rt.kernels.paged_attention import paged_decode_attention_ref
from janus_rt.kernels.rms_norm import rms_norm_ref
from janus_rt.kernels.rope import rope_ref
from janus_rt.kernels.sampling import cfg_sample_ref
from janus_rt.kernels.swiglu import swiglu_ref
from janus_rt.kernels.vq import vq_nearest_ref

pytestmark = pytest.mark.skipif(not cpu_ops.available(), reason="janus_rt._C not built")

def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


# ---- which CPU the prefetch rules see --------------------------------------------------------------------------
def test_prefetch_rules_follow_the_cpu():
    """csrc/cpu_family.h reads AMD's CPUID family (base + extended) as /proc/cpuinfo gives it (0 on other vendors), and
    the kernels take Zen 5's prefetch rules from family 0x1A on, the default rules elsewhere, with the values the
    headers document (unless this build was tuned with -DJR_... flags); on Zen 4 only (family 0x19 with AVX-512): the
    attention's K-during-V prefetch and the bf16 packed GEMV's prefetch from 1 row; on Intel: the K-during-V
    prefetch for bf16 caches."""
    try:
        with open("/proc/cpuinfo") as f:
            first = f.read().split("\n\n")[0]
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    info = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first.splitlines() if ":" in line)}
    if "vendor_id" not in info or "cpu family" not in info:
        pytest.skip("/proc/cpuinfo without vendor_id / cpu family (not x86)")
    family = int(info["cpu family"]) if info["vendor_id"] == "AuthenticAMD" else 0
    rules = cpu_ops.prefetch_rules()
    assert rules["amd_family"] == family
    zen5 = family >= 0x1A
    assert rules["zen5"] == zen5
    assert rules["intel"] == (info["vendor_id"] == "GenuineIntel")
    assert cpu_ops.prefetch_rule() == ("zen5" if zen5 else "zen4" if rules["attention_k_during_v"] else
                                       "intel" if rules["attention_k_during_v_bf16"] else "default")
    if "-DJR_" in os.environ.get("JANUS_RT_CXXFLAGS", ""):
        return  # a tuning build: its own values
    zen4 = family == 0x19 and "avx512f" in info.get("flags", "").split()  # (Zen 3, also 0x19, has no AVX-512)
    bf16 = cpu_ops.packed_available(torch.bfloat16)
    assert rules["packed_bf16_min_rows"] == ((1 if zen5 or zen4 else 3) if bf16 else -1)
    assert rules["packed_fp32_min_rows"] == 3
    assert rules["w8a8_min_rows"] == (1 if zen5 else 3)
    assert rules["attention_locality"] == (3 if zen5 else 2)
    assert rules["attention_k_during_v"] == zen4
    assert rules["attention_k_during_v_bf16"] == (zen4 or rules["intel"])


# ---- vq_nearest ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("N,K,D", [(1, 100, 8), (7, 16384, 8), (577, 16384, 8), (7, 100, 48), (577, 100, 64)])
def test_vq_nearest(poison, N, K, D):
    g = torch.Generator().manual_seed(N * K + D)
    z = F.normalize(torch.randn(N, D, generator=g), dim=1)  # as encode_images feeds it
    cb = F.normalize(torch.randn(K, D, generator=g), dim=1)
    idx = cpu_ops.vq_nearest(z, cb)
    ref = vq_nearest_ref(z, cb)
    assert idx.dtype == torch.int64 and idx.shape == (N,)
    assert bool(((idx >= 0) & (idx < K)).all())
    # Indices may differ only where two codes are equally near within fp32 rounding of the distance.
    d = torch.cdist(z.double(), cb.double())  # [N, K]
    d_ours, d_ref = d.gather(1, idx[:, None]), d.gather(1, ref[:, None])
    assert bool((d_ours <= d_ref + 1e-6).all())
    assert (idx == ref).float().mean() > 0.98


def test_vq_nearest_ties_pick_smallest_index(poison):
    cb = torch.randn(300, 8)
    cb[250] = cb[3]  # exact duplicate later in the codebook, in another tile
    cb[40] = cb[20]
    z = torch.stack([cb[3], cb[20], cb[250]])
    assert cpu_ops.vq_nearest(z, cb).tolist() == [3, 20, 3]


# ---- paged_decode_attention ----------------------------------------------------------------------------------
def _paged_setup(B, H, D, block_size, context_lens, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(1, max(math.ceil(n / block_size) for n in context_lens))
    num_blocks = B * max_blocks + 3
    k_cache = torch.randn(num_blocks, block_size, H, D, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, H, D, generator=g).to(dtype)
    block_tables = torch.randperm(num_blocks, generator=g)[: B * max_blocks].reshape(B, max_blocks).int()
    q = torch.randn(B, H, D, generator=g)
    return q, k_cache, v_cache, block_tables, torch.tensor(context_lens, dtype=torch.int32)


@pytest.mark.parametrize("D,block_size,context_lens", [(64, 16, [1, 17, 45]), (48, 32, [33, 5, 64, 0]),
                                                         (128, 16, [150]), (8, 32, [31, 32, 2]), (20, 16, [9, 40])])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_paged_decode_attention_fp32_q(poison, D, block_size, context_lens, cache_dtype):
    q, kc, vc, bt, cl = _paged_setup(len(context_lens), 4, D, block_size, context_lens, cache_dtype)
    o = cpu_ops.paged_decode_attention(q, kc, vc, bt, cl, sm_scale=0.7)
    ref = paged_decode_attention_ref(q, kc.float(), vc.float(), bt, cl, sm_scale=0.7)  # bf16 caches read exactly
    assert o.dtype == torch.float32
    assert rel_err(o, ref) <= 1e-5
    assert bool((o[cl == 0] == 0).all())


@pytest.mark.parametrize("H,D,cache_dtype", [(8, 64, torch.float32), (8, 64, torch.bfloat16), (16, 128, torch.float32),
                                             (16, 32, torch.float32), (24, 64, torch.float32)])
def test_paged_decode_attention_row_paths(poison, H, D, cache_dtype):
    # Widths that take the whole-row V accumulation (accumulate_v_rows) and, for fp32 rows of 8 heads x 64 and
    # 16 x 32 (2 KiB), the token-major scoring; 24 x 64 fp32 is too wide for it. Four and more sequences keep every
    # task's heads whole; lengths with 8-token and block tails, one empty, two of several context parts.
    lens = [1, 7, 16, 17, 45, 0, 300, 129]
    q, kc, vc, bt, cl = _paged_setup(len(lens), H, D, 16, lens, cache_dtype, seed=3)
    o = cpu_ops.paged_decode_attention(q, kc, vc, bt, cl, sm_scale=0.3)
    ref = paged_decode_attention_ref(q, kc.float(), vc.float(), bt, cl, sm_scale=0.3)
    assert rel_err(o, ref) <= 1e-5
    assert bool((o[cl == 0] == 0).all())


@pytest.mark.parametrize("H,D,cache_dtype", [(8, 64, torch.float32), (8, 64, torch.bfloat16), (4, 48, torch.float32)])
def test_paged_decode_attention_keys_scoring_minus_inf_weigh_nothing(poison, H, D, cache_dtype):
    # Keys of -inf against a positive q (only non-finite inputs score -inf) weigh 0, as in torch's softmax, also when
    # they fill a row's first blocks or a whole context part (exp(-inf - -inf) had made the row NaN), on the
    # token-major scoring (fp32, 8 x 64) and the per-head one, a row alone (head chunks, a task per part) and batched.
    lens = [100, 40, 300, 37]
    q, kc, vc, bt, cl = _paged_setup(len(lens), H, D, 16, lens, cache_dtype, seed=5)
    q = q.abs() + 0.1
    for b, n in enumerate([36, 40, 200, 3]):  # row 1: -inf up to its last token but for none; row 2: whole parts
        for t in range(min(n, lens[b] - 1)):
            kc[bt[b, t // 16], t % 16] = float("-inf")
    ref = paged_decode_attention_ref(q, kc.float(), vc.float(), bt, cl)
    assert bool(ref.isfinite().all())
    assert rel_err(cpu_ops.paged_decode_attention(q, kc, vc, bt, cl), ref) <= 1e-5
    for b in range(len(lens)):
        alone = cpu_ops.paged_decode_attention(q[b:b + 1], kc, vc, bt[b:b + 1], cl[b:b + 1])
        assert rel_err(alone, ref[b:b + 1]) <= 1e-5


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_paged_decode_attention_batch_invariant(poison, cache_dtype):
    # A batch of 16 rows runs each row's 8 heads and all its context parts as one task (token-major scoring for
    # fp32, whole-row V, the parts merged in the task); one row alone is split into head chunks (per-head scoring
    # and V) and a task per part (merged after the barrier). Every row must come out bit-identical either way.
    lens = [45, 1, 16, 23, 0, 100, 8, 37, 300, 129, 128, 257, 2, 64, 200, 17]
    q, kc, vc, bt, cl = _paged_setup(len(lens), 8, 64, 16, lens, cache_dtype, seed=4)
    batch = cpu_ops.paged_decode_attention(q, kc, vc, bt, cl)
    for b in range(len(lens)):
        alone = cpu_ops.paged_decode_attention(q[b : b + 1], kc, vc, bt[b : b + 1], cl[b : b + 1])
        assert torch.equal(alone[0], batch[b]), f"row {b} (context {lens[b]}) differs alone and in the batch"


@pytest.mark.parametrize("H,Hkv,D,kv", [(8, 8, 64, torch.float32), (8, 8, 64, torch.bfloat16),
                                        (8, 2, 64, torch.float32), (4, 4, 48, torch.bfloat16), (8, 8, 64, torch.int8),
                                        (6, 3, 32, torch.int8)])
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
def test_paged_decode_attention_block_size_invariant(poison, H, Hkv, D, kv, q_dtype):
    # The same context in caches of any block size gives the same bits: the kernel reads 16-token chunks at fixed
    # positions (those that cross blocks block by block), not cache blocks. Token-major fp32 (8 x 64), GQA, per-head
    # and whole-row V, int8 rows with their scales; a batch (whole-row tasks) and rows alone (head chunks, part tasks).
    g = torch.Generator().manual_seed(11)
    lens = [1, 7, 16, 17, 45, 0, 300, 129]
    rows = [torch.randn(n, 2, Hkv, D, generator=g) * torch.rand(n, 2, Hkv, 1, generator=g) for n in lens]
    if kv == torch.int8:
        from janus_rt.engine.kv_quant import quantize_kv

        quant = [(quantize_kv(r[:, 0]), quantize_kv(r[:, 1])) for r in rows]
        rows = [torch.stack([kq, vq], 1) for (kq, _), (vq, _) in quant]
        scales = [torch.stack([ks, vs], 1) for (_, ks), (_, vs) in quant]
    else:
        rows = [r.to(kv) for r in rows]
    q = torch.randn(len(lens), H, D, generator=g).to(q_dtype)
    cl = torch.tensor(lens, dtype=torch.int32)
    outs = {}
    for bs in (16, 1, 2, 3, 5, 24, 32, 48):
        cache, bt = paged_layout(rows, bs, torch.Generator().manual_seed(bs))
        sc = paged_layout(scales, bs, torch.Generator().manual_seed(bs))[0] if kv == torch.int8 else None
        extra = (sc[:, :, 0].contiguous(), sc[:, :, 1].contiguous()) if sc is not None else ()
        kc, vc = cache[:, :, 0].contiguous(), cache[:, :, 1].contiguous()
        outs[bs] = [cpu_ops.paged_decode_attention(q, kc, vc, bt, cl, None, *extra)]
        for b in (6, 4, 0):  # a row alone: 300 tokens in part tasks, then 45 and 1
            outs[bs].append(cpu_ops.paged_decode_attention(q[b : b + 1], kc, vc, bt[b : b + 1], cl[b : b + 1], None,
                                                           *extra))
    for bs, o in outs.items():
        for i, (x, y) in enumerate(zip(o, outs[16])):
            assert torch.equal(x, y), f"block size {bs} differs from 16 (call {i})"
    assert torch.equal(outs[16][1][0], outs[16][0][6])  # and the row alone is the row in the batch


@pytest.mark.parametrize("H,Hkv,D", [(16, 16, 128), (8, 8, 64), (8, 8, 32), (2, 2, 256), (3, 3, 48), (8, 2, 64)])
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
def test_paged_decode_attention_bf16_cache_reads_exactly(poison, H, Hkv, D, q_dtype):
    # A bf16 cache gives the bits an fp32 cache holding the same values gives: its K and V are widened exactly and
    # then take the same FMAs in the same order. Pins the AVX-512 V pass that widens 32 bf16 at a time into even /
    # odd halves of its accumulators (paged_attention.h accumulate_v_pass): heads of 8, 4, 2 and 16 vectors; 3 x 48
    # and GQA take the other loops. Batches with whole-row tasks and a row alone (head chunks, a task per part).
    lens = [45, 1, 16, 300, 129, 0, 17, 64]
    _, kc, vc, bt, cl = _paged_setup(len(lens), Hkv, D, 16, lens, torch.bfloat16, seed=6)
    q = torch.randn(len(lens), H, D, generator=torch.Generator().manual_seed(7)).to(q_dtype)
    for rows in (slice(None), slice(3, 4)):
        a = cpu_ops.paged_decode_attention(q[rows], kc, vc, bt[rows], cl[rows])
        b = cpu_ops.paged_decode_attention(q[rows], kc.float(), vc.float(), bt[rows], cl[rows])
        assert torch.equal(a, b)


def test_paged_decode_attention_bf16(poison):
    q, kc, vc, bt, cl = _paged_setup(3, 4, 64, 16, [1, 17, 45], torch.bfloat16, seed=1)
    q = q.bfloat16()
    o = cpu_ops.paged_decode_attention(q, kc, vc, bt, cl)
    assert o.dtype == torch.bfloat16
    ref32 = paged_decode_attention_ref(q.float(), kc.float(), vc.float(), bt, cl)
    torch_err = rel_err(paged_decode_attention_ref(q, kc, vc, bt, cl, upcast=False), ref32)
    # fp32 math then one bf16 rounding: within half a bf16 ulp of the exact result, i.e. the reference rounded
    assert rel_err(o, ref32) <= min(2 * torch_err, 2**-8)
    assert_same_roundings(o, ref32.bfloat16(), "paged attention")


@pytest.mark.parametrize("H,Hkv,context_lens", [(8, 2, [20, 7]), (6, 3, [40]), (16, 16, [700]), (8, 2, [300, 7])])
def test_paged_decode_attention_gqa(poison, H, Hkv, context_lens):
    # Query head h reads cache head h // (H / Hkv); the reference sees the cache heads repeated. Batches of 1-2
    # split their heads into uneven chunks across threads; 16 x 700 x 64 is big enough to run threaded; 300 tokens
    # make context parts (merged per query head of each kv head).
    _, kc, vc, bt, cl = _paged_setup(len(context_lens), Hkv, 64, 16, context_lens, torch.float32, seed=2)
    q = torch.randn(len(context_lens), H, 64)
    o = cpu_ops.paged_decode_attention(q, kc, vc, bt, cl)
    rep = H // Hkv
    ref = paged_decode_attention_ref(q, kc.repeat_interleave(rep, 2), vc.repeat_interleave(rep, 2), bt, cl)
    assert rel_err(o, ref) <= 1e-5


# ---- kv_store ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
def test_kv_store_exact(dtype, slot_dtype):
    num_blocks, block_size, H, D, N = 5, 16, 3, 40, 9
    k = torch.randn(N, H, D).to(dtype)
    v = torch.randn(N, H, D).to(dtype)
    k_cache = torch.randn(num_blocks, block_size, H, D).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, H, D).to(dtype)
    slots = torch.tensor([0, 17, -1, 79, 5, 40, num_blocks * block_size, 33, 16], dtype=slot_dtype)
    kc_ref, vc_ref = k_cache.clone(), v_cache.clone()
    kv_store_ref(k, v, kc_ref, vc_ref, slots)
    cpu_ops.kv_store(k, v, k_cache, v_cache, slots)
    bits = {4: torch.int32, 2: torch.int16}[k.element_size()]
    assert torch.equal(k_cache.view(bits), kc_ref.view(bits))
    assert torch.equal(v_cache.view(bits), vc_ref.view(bits))


# ---- cfg_sample ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("V", [1000, 16384, 40000])
@pytest.mark.parametrize("with_uncond", [True, False])
def test_cfg_sample_matches_ref(poison, V, with_uncond):
    g = torch.Generator().manual_seed(V)
    B = 8
    cond = torch.randn(B, V, generator=g) * 3
    uncond = torch.randn(B, V, generator=g) * 3 if with_uncond else None
    params = dict(
        cfg_weight=torch.tensor([1.0, 5.0, 2.5, 0.0, 5.0, 3.0, 1.5, 4.0]),
        temperature=torch.tensor([1.0, 0.7, 1.3, 1.0, 1.0, 0.9, 2.0, 1.0]),
        top_k=torch.tensor([0, 0, 50, 1, 0, 400, 7, 0]),
        top_p=torch.tensor([1.0, 0.9, 1.0, 1.0, 0.5, 0.95, 0.3, 1.0]),
        seeds=torch.tensor([1, 2, 3, 4, 5, 2**40 + 6, -7, 8]),
        greedy=torch.tensor([False, False, False, False, False, False, False, True]),
    )
    ours = cpu_ops.cfg_sample(cond, uncond, **params)
    assert ours.dtype == torch.int64 and ours.shape == (B,)
    assert torch.equal(ours, cfg_sample_ref(cond, uncond, **params))


@pytest.mark.parametrize("scale", [0.0, 0.05, 20.0])
def test_cfg_sample_noise_bound_skip_keeps_the_winner(poison, scale):
    # cfg_sample.cpp computes a token's noise only where a bound on it could still beat the best score: flat rows
    # (every token ties until the noise decides), nearly flat and widely spread rows all match the reference.
    g = torch.Generator().manual_seed(int(scale * 100))
    cond = torch.randn(16, 16384, generator=g) * scale
    for seed0 in (0, 100):
        args = dict(temperature=1.0, top_k=0, top_p=1.0, seeds=torch.arange(seed0, seed0 + 16))
        assert torch.equal(cpu_ops.cfg_sample(cond, None, **args), cfg_sample_ref(cond, None, **args))


def test_cfg_sample_strided_rows_and_scalars(poison):
    logits = torch.randn(6, 16384) * 2  # official layout: even rows conditional, odd rows unconditional
    for seed in range(4):
        args = dict(cfg_weight=5.0, temperature=1.0, top_k=0, top_p=1.0, seeds=seed)
        ours = cpu_ops.cfg_sample(logits[0::2], logits[1::2], **args)
        assert torch.equal(ours, cfg_sample_ref(logits[0::2].contiguous(), logits[1::2].contiguous(), **args))


def test_cfg_sample_distribution():
    # Gumbel-max over the hashed noise samples softmax(l): 30000 seeds on a 5-token row.
    n = 30000
    l = torch.tensor([0.0, 1.0, -1.0, 2.0, 0.5])
    cond = l.expand(n, 5).contiguous()
    tokens = cpu_ops.cfg_sample(cond, None, seeds=torch.arange(n))
    freq = torch.bincount(tokens, minlength=5).double() / n
    p = torch.softmax(l.double(), 0)
    assert (freq - p).abs().max() < 4 * math.sqrt(0.25 / n)


def test_cfg_sample_greedy_ties_pick_smallest_index(poison):
    cond = torch.zeros(2, 100)
    cond[:, [7, 30, 99]] = 3.0
    assert cpu_ops.cfg_sample(cond, None, greedy=True).tolist() == [7, 7]


# ---- linear --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("M", [1, 3, 17])
@pytest.mark.parametrize("K", [40, 77, 2048])
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N", [1, 37, 700])  # 700: several chunks of segmented blocks per thread (gemv.h)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])  # bf16 x and W: the bf16 dot product where
def test_linear(poison, M, K, w_dtype, N, x_dtype):                 # the CPU has AVX512_BF16 (gemv.h)
    g = torch.Generator().manual_seed(M * K + N)
    x = torch.randn(M, K, generator=g).to(x_dtype)
    w = torch.randn(N, K, generator=g).to(w_dtype)
    b = torch.randn(N, generator=g)
    y = cpu_ops.linear(x, w, b)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    # bf16 operands: the same values upcast exactly, products exact in fp32; only the summation order differs
    assert rel_err(y, F.linear(x.float(), w.float(), b)) <= 1e-5
    assert rel_err(cpu_ops.linear(x, w), F.linear(x.float(), w.float())) <= 1e-5


@pytest.mark.parametrize("matmul", ["csrc", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ops_batch_invariant_rows_do_not_depend_on_the_batch(monkeypatch, matmul, dtype):
    """Inside ops.batch_invariant() (the layer-by-layer decode step), ops.linear and ops.mlp_gelu give each row what
    it gets alone, at row counts on both sides of the 32-row pieces: torch's matmul (pieces padded to 32 rows) and
    the csrc GEMV. (torch's fp32 matmul alone rounds rows differently at M = 1, 2-3 and >= 8.)"""
    monkeypatch.setenv("JANUS_RT_CPU_MATMUL", matmul)
    g = torch.Generator().manual_seed(3)
    K, N = 1376, 200
    w, w2 = torch.randn(N, K, generator=g).to(dtype), torch.randn(96, N, generator=g).to(dtype)
    b, b2 = torch.randn(N, generator=g).to(dtype), torch.randn(96, generator=g).to(dtype)
    x = torch.randn(70, K, generator=g).to(dtype)
    with ops.use_backend("cpu"), ops.batch_invariant():
        for f in (lambda r: ops.linear(r, w), lambda r: ops.mlp_gelu(r, w, b, w2, b2)):
            alone = torch.cat([f(x[i : i + 1]) for i in range(70)])
            for M in (2, 3, 9, 32, 33, 70):
                assert torch.equal(f(x[:M]), alone[:M]), f"M = {M}"
            assert torch.equal(f(x[None, :5]), alone[None, :5])  # leading dims kept


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K", [40, 77, 1376])  # 1376: several K tiles when M > 4; 77: a scalar tail
def test_linear_rows_do_not_depend_on_the_batch(w_dtype, K):
    """Batch invariance: each row of y is bit-identical whether it is computed alone or among up to 12 rows, so a
    request's logits do not depend on which other rows share its decode step."""
    g = torch.Generator().manual_seed(K)
    w = torch.randn(700, K, generator=g).to(w_dtype)
    x = torch.randn(12, K, generator=g).to(w_dtype)
    alone = torch.cat([cpu_ops.linear(x[i : i + 1], w) for i in range(12)])
    for M in range(2, 13):
        assert torch.equal(cpu_ops.linear(x[:M], w), alone[:M]), f"M = {M}"


def test_linear_bf16_x_and_leading_dims(poison):
    x = torch.randn(2, 3, 96).bfloat16()
    w = torch.randn(130, 96).bfloat16()
    y = cpu_ops.linear(x, w)
    assert y.shape == (2, 3, 130)
    assert rel_err(y, F.linear(x.float(), w.float())) <= 1e-5


# ---- linear_packed (PackedWeight) ----------------------------------------------------------------------------
needs_bf16 = pytest.mark.skipif(not cpu_ops.packed_available(torch.bfloat16),
                                reason="no packed bf16 GEMV: CPU without AVX512_BF16")
PACKED_DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=needs_bf16)]


@pytest.mark.parametrize("dtype", PACKED_DTYPES)
@pytest.mark.parametrize("M", [1, 6, 7, 17, 32])  # 6, 7: one row block; 17: blocks of 6, 6, 5; 32: 6, 6, 5, 5, 5, 5
@pytest.mark.parametrize("K", [2, 40, 514, 2048])  # 514: a last K tile of 2 (fp32) or 1 (bf16) steps on AVX-512
@pytest.mark.parametrize("N", [1, 37, 700])  # 37: one partial strip; 700: several strips, the last partial
def test_linear_packed(poison, M, K, N, dtype):
    g = torch.Generator().manual_seed(M * K + N)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = torch.randn(N, K, generator=g).to(dtype)
    b = torch.randn(N, generator=g)
    pw = cpu_ops.PackedWeight(w)
    assert pw.data.numel() * dtype.itemsize == cpu_ops.PackedWeight.nbytes(N, K, dtype)
    y = pw(x, b)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    # bf16 products are exact in fp32; only the summation order (and fp32 rounding) differs from fp64
    assert rel_err(y, F.linear(x.double(), w.double(), b.double())) <= 1e-5
    assert rel_err(pw(x), F.linear(x.double(), w.double())) <= 1e-5
    assert pw(x.view(1, M, K)).shape == (1, M, N)


def unpack_reference(data: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """W [N, K] back from a packed copy, by csrc/packed_layout.h's formula: strips of S columns stored step by step
    (a step one k, or one k pair for bf16), cut into K tiles of KT steps; a tile stored as H runs, run h holding
    columns h S / H .. (h + 1) S / H - 1 of each of the tile's steps."""
    S, KT, H = _C.packed_layout(cpu_ops._DTYPE_CODE[data.dtype])
    E = 1 if data.dtype == torch.float32 else 2
    KS, strips = K // E, (N + S - 1) // S
    flat, parts = data.view(strips, KS * S * E), []
    for k0 in range(0, KS, KT):
        kn = min(KT, KS - k0)
        tile = flat[:, k0 * S * E : (k0 + kn) * S * E].reshape(strips, H, kn, S // H, E)  # [strip, run, step, col, e]
        parts.append(tile.permute(0, 1, 3, 2, 4).reshape(strips * S, kn * E))  # rows: strip, run, column
    return torch.cat(parts, 1)[:N]


@pytest.mark.parametrize("dtype", PACKED_DTYPES)
@pytest.mark.parametrize("N, K", [(1, 2), (70, 552), (130, 2048)])  # 552: a bf16 last K tile of 20 steps
def test_pack_weight_layout(N, K, dtype):
    """The packed copy is W in the documented layout (the kernels read it so), zeros past N."""
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(N + K)).to(dtype)
    pw = cpu_ops.PackedWeight(w)
    S, KT, H = _C.packed_layout(cpu_ops._DTYPE_CODE[dtype])
    assert H == (4 if dtype == torch.bfloat16 else 1) and KT >= 1
    strips = (N + S - 1) // S
    full = unpack_reference(pw.data, strips * S, K)
    assert torch.equal(full[:N], w) and not full[N:].any()


@pytest.mark.parametrize("M", [1, 7])
def test_linear_packed_fp32_odd_k(poison, M):
    g = torch.Generator().manual_seed(M)
    x, w = torch.randn(M, 77, generator=g), torch.randn(100, 77, generator=g)
    assert rel_err(cpu_ops.PackedWeight(w)(x), F.linear(x.double(), w.double())) <= 1e-5


@pytest.mark.parametrize("dtype", PACKED_DTYPES)
@pytest.mark.parametrize("K", [40, 1376])  # 1376: several K tiles
def test_linear_packed_rows_do_not_depend_on_the_batch(K, dtype):
    g = torch.Generator().manual_seed(K)
    pw = cpu_ops.PackedWeight(torch.randn(700, K, generator=g).to(dtype))
    x = torch.randn(33, K, generator=g).to(dtype)
    alone = torch.cat([pw(x[i : i + 1]) for i in range(33)])
    for M in range(2, 34):  # one row block up to 8 rows, then ceil(M / 6) blocks of even sizes
        assert torch.equal(pw(x[:M]), alone[:M]), f"M = {M}"


def _tile_steps(value: str) -> tuple[list[int], str]:
    """[K tile steps of the bf16, int8 and fp32 layouts] in a process with JANUS_RT_BF16_KTILE_KIB=value, and its
    stderr."""
    import subprocess
    import sys

    code = "from janus_rt import cpu_ops; print(*(cpu_ops._C.packed_layout(c)[1] for c in (1, 2, 0)))"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "JANUS_RT_BF16_KTILE_KIB": value},
                         capture_output=True, text=True, check=True)
    return [int(v) for v in out.stdout.split()], out.stderr


@pytest.mark.skipif(not cpu_ops.packed_available(torch.bfloat16), reason="no packed bf16 GEMV in this build")
@pytest.mark.parametrize("kib", [4, 256])  # 16 steps (most tests' weights then span many K tiles), 1024 steps
def test_bf16_k_tile_variable(kib):
    """JANUS_RT_BF16_KTILE_KIB sets the bf16 layout's K tile for a process: the packed GEMV tests (layout, numbers,
    batch invariance, the AMX route where there is one), the int8 GEMVs (their own tiles, the widened strips on AMX
    included) and the decode layers pass under it; the tile is the layout's as packed_layout reports it, and the
    other layouts keep theirs."""
    import pathlib
    import subprocess
    import sys

    default = _tile_steps("")[0]
    steps, err = _tile_steps(str(kib))
    assert steps == [kib * 1024 // 256, *default[1:]] and not err
    tests = pathlib.Path(__file__).parent
    picked = "linear_packed or pack_weight_layout or int8_linear or decode_layer_bf16 or image_step_matches"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", "-k", picked,
                          *(str(tests / f) for f in ("test_cpu_ops.py", "test_int8.py", "test_cpu_decode.py"))],
                         env={**os.environ, "JANUS_RT_BF16_KTILE_KIB": str(kib)}, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout.splitlines()[-1]


def test_bf16_k_tile_variable_refuses_other_values():
    """A value the variable does not take is reported and the default tile kept (64 KiB: 256 steps); unset, empty
    and auto (any case, as the CLI takes it) are the default, silently."""
    default, err = _tile_steps("")
    assert default[:2] == [256, 256] and not err
    for value in ("3", "2048", "64k", " 64", "+64", "064", "auto", "AUTO"):
        steps, err = _tile_steps(value)
        assert steps == default, value
        assert ("ignored" in err) == (value not in ("auto", "AUTO")), (value, err)


needs_amx = pytest.mark.skipif(not cpu_ops.amx_available(), reason="no AMX-BF16 route (CPU, build or OS)")


@pytest.fixture
def amx_route():
    """Yields a function switching the AMX route on or off; restores the setting afterwards."""
    was = cpu_ops.set_amx(True)
    yield cpu_ops.set_amx
    cpu_ops.set_amx(was)


@needs_amx
@pytest.mark.parametrize("M", [1, 5, 16, 17, 31, 32, 33, 70])  # one block of <= 16 rows, 16 + r, groups of 32 + tail
@pytest.mark.parametrize("K", [32, 96, 1376, 2048])  # whole 16-pair steps; 1376: K tiles of 256 and 176 steps
@pytest.mark.parametrize("N", [1, 63, 130])  # partial strips
def test_linear_packed_amx(poison, amx_route, M, K, N):
    """csrc/amx_gemv.h against the fp64 reference, and against the AVX512-BF16 kernel on the same packed weight."""
    g = torch.Generator().manual_seed(M * K + N)
    x = torch.randn(M, K, generator=g).bfloat16()
    w = torch.randn(N, K, generator=g).bfloat16()
    b = torch.randn(N, generator=g)
    pw = cpu_ops.PackedWeight(w)
    ref = F.linear(x.double(), w.double(), b.double())
    amx_route(True)
    y_amx = pw(x, b)
    amx_route(False)
    assert not cpu_ops.amx_available()  # the switch is part of it (the auto matmul rule reads it)
    y_avx = pw(x, b)
    assert rel_err(y_amx, ref) <= 1e-5 and rel_err(y_avx, ref) <= 1e-5
    assert rel_err(y_amx, y_avx.double()) <= 1e-5


@needs_amx
def test_linear_packed_amx_rows_do_not_depend_on_the_batch(amx_route):
    g = torch.Generator().manual_seed(3)
    pw = cpu_ops.PackedWeight(torch.randn(200, 1376, generator=g).bfloat16())
    x = torch.randn(70, 1376, generator=g).bfloat16()
    alone = torch.cat([pw(x[i : i + 1]) for i in range(70)])
    for M in list(range(2, 36)) + [63, 64, 65, 70]:  # 1 or 2 blocks of 16, groups of 32 and a tail group
        assert torch.equal(pw(x[:M]), alone[:M]), f"M = {M}"


def test_linear_packed_misuse(monkeypatch):
    with pytest.raises(ValueError, match="dtype"):
        cpu_ops.PackedWeight(torch.randn(8, 8).half())
    pw = cpu_ops.PackedWeight(torch.randn(8, 8))
    with pytest.raises(ValueError, match="dtype"):
        pw(torch.randn(2, 8).bfloat16())
    with pytest.raises(ValueError, match="K = 8"):
        pw(torch.randn(2, 6))
    with pytest.raises(ValueError, match="bias"):
        pw(torch.randn(2, 8), torch.randn(7))
    if cpu_ops.packed_available(torch.bfloat16):
        with pytest.raises(ValueError, match="even K"):
            cpu_ops.PackedWeight(torch.randn(8, 7).bfloat16())
    real = cpu_ops.packed_available  # a build without the bf16 GEMV (this one's, where it has it, made so)
    monkeypatch.setattr(cpu_ops, "packed_available",
                        lambda dtype=torch.bfloat16: dtype == torch.float32 and real(dtype))
    with pytest.raises(ValueError, match="AVX512_BF16"):
        cpu_ops.PackedWeight(torch.randn(8, 8).bfloat16())


# ---- swiglu (decode_layer's activation, csrc/swiglu.h) ----------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 15, 17, 4 * 4096 + 3])  # vector tails; several parallel chunks
def test_swiglu_matches_ref(poison, dtype, n):
    g = torch.Generator().manual_seed(n)
    gate = (torch.randn(n, generator=g) * 6).to(dtype)
    up = torch.randn(n, generator=g).to(dtype)
    out, ref = cpu_ops.swiglu(gate, up), swiglu_ref(gate, up)
    assert out.dtype == dtype and out.shape == gate.shape
    if dtype == torch.float32:  # simd::exp against torch's vector exp: a few ulp (measured worst 2.8e-7)
        assert torch.all((out - ref).abs() <= 1e-6 * ref.abs() + 1e-35)
    else:  # the same fp32 values rounded at the same points: identical but for a rare rounding flip
        assert (out != ref).float().mean() <= 0.01
        assert torch.all((out.float() - ref.float()).abs() <= 2**-7 * ref.float().abs() + 1e-35)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_strided_halves(poison, dtype):
    """gate and up as the two halves of one [.., 2n] output (row strides 2n), several rows: as the contiguous op."""
    gu = (torch.randn(3, 5, 2 * 37, generator=torch.Generator().manual_seed(0)) * 4).to(dtype)
    gate, up = gu.chunk(2, dim=-1)
    out = cpu_ops.swiglu(gate, up)
    assert out.is_contiguous() and out.shape == gate.shape
    assert torch.equal(out, cpu_ops.swiglu(gate.contiguous(), up.contiguous()))


# ---- rms_norm and rope (csrc/rms_norm.h, csrc/rope.h: decode_layer's row code, as ops for prefill rows) ---------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("C", [7, 64, 2048])  # vector tails; Janus-Pro-1B's width
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_matches_ref(poison, dtype, C, residual):
    g = torch.Generator().manual_seed(C)
    wide = (torch.randn(4, 9, C + 5, generator=g) * 3).to(dtype)
    x = wide[..., 2:C + 2]  # a slice of a wider last dim: rows at a stride of C + 5
    w = (torch.randn(C, generator=g) + 1).to(dtype)
    r = torch.randn(4, 9, C, generator=g).to(dtype) if residual else None
    got, want = cpu_ops.rms_norm(x, w, 1e-6, residual=r), rms_norm_ref(x, w, 1e-6, residual=r)
    if residual:
        assert torch.equal(got[1], want[1])  # h = x + residual, rounded as torch rounds it
        got, want = got[0], want[0]
    assert got.shape == x.shape and got.dtype == dtype and got.is_contiguous()
    exact = rms_norm_ref(*(t.double() for t in (x, w)), 1e-6, residual=None if r is None else r.double())
    exact = exact[0] if residual else exact
    assert_matches(got, want, exact.float(), "rms_norm")
    if dtype == torch.float32:  # a few ulp (measured ~1e-7 relative; an unrefined rsqrt14 would be ~6e-5)
        assert max_err(got, exact) <= 1e-6 * exact.abs().max()
    else:  # the reference's rounding points (a dropped one is more accurate: assert_matches alone passes it)
        assert_same_roundings(got, want, "rms_norm")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H,Hk,D", [(16, 16, 128), (3, 1, 40), (2, 2, 6)])  # 1B; GQA and tails; scalar halves
def test_rope_matches_ref_bit_for_bit(poison, dtype, H, Hk, D):
    """q and k as views of one qkv projection output (rows at its stride), positions with gaps and two rows of
    tokens: the same bits as the torch path (rope_head performs its operations per lane in the same order)."""
    g = torch.Generator().manual_seed(D)
    B, T = 2, 11
    qkv = torch.randn(B, T, (H + 2 * Hk) * D, generator=g).to(dtype)
    q = qkv[..., :H * D].view(B, T, H, D)
    k = qkv[..., H * D:(H + Hk) * D].view(B, T, Hk, D)
    positions = torch.tensor([list(range(T)), [3 * i + 100 for i in range(T)]])
    want_q, want_k = rope_ref(q, k, positions)
    cos, sin = (t.float().reshape(-1, D) for t in ops.rope_tables(positions, D, 10000.0, dtype))
    got_q, got_k = cpu_ops.rope(q, cos, sin), cpu_ops.rope(k, cos, sin)
    assert got_q.is_contiguous() and got_q.shape == q.shape
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)


def test_cpu_backend_takes_the_row_ops_for_inference_only(monkeypatch):
    """ops.rms_norm and ops.rope on the cpu backend run the csrc ops where no gradient is wanted (the engine's
    prefill) and torch's ops where one is (training), with the torch backend's rope bits either way."""
    calls = []
    for name in ("rms_norm", "rope"):
        real = getattr(cpu_ops, name)
        monkeypatch.setattr(cpu_ops, name, lambda *a, _r=real, _n=name, **kw: (calls.append(_n), _r(*a, **kw))[1])
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 5, 64, generator=g, requires_grad=True), torch.ones(64, requires_grad=True)
    q, k = torch.randn(2, 5, 4, 16, generator=g), torch.randn(2, 5, 2, 16, generator=g)
    pos = torch.arange(5).expand(2, 5)
    with ops.use_backend("cpu"):
        ops.rms_norm(x, w, 1e-6).sum().backward()
        assert x.grad is not None and calls == []
        with torch.inference_mode():
            ops.rms_norm(x.detach(), w.detach(), 1e-6, residual=x.detach())
            got = ops.rope(q, k, pos, 10000.0)
    assert calls == ["rms_norm", "rope", "rope"]
    want = ops.rope(q, k, pos, 10000.0)  # torch backend
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_row_ops_misuse():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="weight"):
        cpu_ops.rms_norm(x, torch.randn(7), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        cpu_ops.rms_norm(x, torch.randn(8), 1e-6, residual=torch.randn(3, 7))
    with pytest.raises(ValueError, match="dtype"):
        cpu_ops.rms_norm(x.half(), torch.randn(8).half(), 1e-6)
    q = torch.randn(2, 4, 3, 6)
    cos = torch.randn(8, 6)
    with pytest.raises(ValueError, match="even"):
        cpu_ops.rope(torch.randn(2, 3, 5), torch.randn(2, 5), torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"\[8, 6\]"):
        cpu_ops.rope(q, cos[:7], cos[:7])
    with pytest.raises(ValueError, match="dtype"):
        cpu_ops.rope(q, cos.double(), cos)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_extremes(dtype):
    """Large |gate| (e^-gate past the fp32 range: silu -> -0 or gate), NaN and infinities give torch's values."""
    gate = torch.tensor([0.0, -0.0, 20.0, -20.0, 87.5, -87.5, 88.5, -88.5, 89.5, -89.5, 100.0, -100.0, 3e38, -3e38,
                         float("inf"), -float("inf"), float("nan")]).to(dtype)
    up = torch.full_like(gate, 1.5)
    out, ref = cpu_ops.swiglu(gate, up), swiglu_ref(gate, up)
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-6, atol=1e-35, equal_nan=True)  # inf == inf


# ---- mlp_gelu -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("M", [1, 3, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_mlp_gelu_matches_the_op_chain(poison, M, dtype, bias):
    """One call = linear -> round to dtype -> GELU(erf) -> round -> linear, the chain ops.mlp_gelu runs otherwise
    (fp32: within GELU's rounding, erf implementations differ by an ulp; bf16: after rounding the hidden layer)."""
    g = torch.Generator().manual_seed(M + 100 * bias)
    K, H, N = 40, 77, 700  # 700 outputs: several GEMV chunks
    x = torch.randn(2, M, K, generator=g).to(dtype)
    w1 = (torch.randn(H, K, generator=g) / K**0.5).to(dtype)
    w2 = (torch.randn(N, H, generator=g) / H**0.5).to(dtype)
    b1, b2 = (torch.randn(n, generator=g).to(dtype) if bias else None for n in (H, N))
    y = cpu_ops.mlp_gelu(x, w1, b1, w2, b2)
    assert y.dtype == torch.float32 and y.shape == (2, M, N)
    h = F.gelu(F.linear(x.float(), w1.float(), None if b1 is None else b1.float()).to(dtype))
    ref = F.linear(h.float(), w2.float(), None if b2 is None else b2.float())
    # fp32: erf implementations differ by an ulp; bf16: a hidden value may round to the neighbouring bf16 (one such
    # flip moves y by ~1e-4 of its max here; 3e-4 allows a few, while a rounding step left out of the chain is
    # >= 1.05e-3; measured worst 3.7e-7 fp32, 1.0e-6 bf16)
    tol = 2e-6 if dtype == torch.float32 else 3e-4
    assert rel_err(y, ref) <= tol


def test_mlp_gelu_hidden_gelu_values():
    """The hidden layer's GELU(erf) (simd::erf, Abramowitz & Stegun 7.1.26: |error| <= 1.5e-7) against the exact
    one in fp64, value by value: x [M, 2] @ [[1, 0]]^T puts each x[m, 0] through the GELU alone, w2 = [[1]] reads it
    out. Within 2 ulp of the result plus |v| / 2 times erf's error: the formula's 1.5e-7, and 3 fp32 ulp of 1 for
    evaluating it (simd::exp's ~2 ulp and the last subtraction's rounding, which 1 + erf keeps where erf is near
    -1); GELU(inf) = inf, NaN stays NaN, GELU(+-0) = 0."""
    v = torch.cat([torch.linspace(-10, 10, 20001), torch.tensor([float("inf"), float("nan"), 0.0, -0.0])])
    x = torch.stack([v, torch.zeros_like(v)], 1)
    y = cpu_ops.mlp_gelu(x, torch.tensor([[1.0, 0.0]]), None, torch.tensor([[1.0]]), None)[:, 0]
    fin = torch.isfinite(v)
    exact = v[fin].double() * 0.5 * (1 + torch.erf(v[fin].double() / 2**0.5))
    eps = torch.finfo(torch.float32).eps
    bound = 2 * eps * exact.abs() + (1.5e-7 + 3 * eps) * 0.5 * v[fin].double().abs()
    assert ((y[fin].double() - exact).abs() <= bound).all()
    assert y[-4] == float("inf") and y[-3].isnan() and y[-2] == 0 and y[-1] == 0


@pytest.mark.parametrize("dtype", PACKED_DTYPES)
@pytest.mark.parametrize("M", [1, 7])
def test_mlp_gelu_packed_weights(poison, M, dtype):
    """w1, w2 as PackedWeight: both GEMVs packed, the same chain (and the same bound) as the unpacked call."""
    g = torch.Generator().manual_seed(M)
    K, H, N = 40, 78, 700
    x = torch.randn(M, K, generator=g).to(dtype)
    w1 = (torch.randn(H, K, generator=g) / K**0.5).to(dtype)
    w2 = (torch.randn(N, H, generator=g) / H**0.5).to(dtype)
    b1, b2 = torch.randn(H, generator=g).to(dtype), torch.randn(N, generator=g).to(dtype)
    y = cpu_ops.mlp_gelu(x, cpu_ops.PackedWeight(w1), b1, cpu_ops.PackedWeight(w2), b2)
    h = F.gelu(F.linear(x.float(), w1.float(), b1.float()).to(dtype))
    ref = F.linear(h.float(), w2.float(), b2.float())
    assert rel_err(y, ref) <= (2e-6 if dtype == torch.float32 else 3e-4)
    with pytest.raises(ValueError, match="both"):
        cpu_ops.mlp_gelu(x, cpu_ops.PackedWeight(w1), b1, w2, b2)


INT8_KINDS = [
    pytest.param("Int8Weight", marks=pytest.mark.skipif(not cpu_ops.int8_available(), reason="no int8 GEMV")),
    pytest.param("W8A8Weight", marks=pytest.mark.skipif(not cpu_ops.w8a8_available(), reason="no W8A8 GEMV"))]


@pytest.mark.parametrize("kind", INT8_KINDS)
@pytest.mark.parametrize("M,K,H,N", [(1, 64, 96, 130), (3, 600, 1030, 70), (7, 8, 2048, 64), (33, 1100, 512, 200)])
def test_mlp_gelu_int8_weights_are_the_chain_of_their_linears(poison, kind, M, K, H, N):
    """w1, w2 both Int8Weight or both W8A8Weight (a model held int8: its gen head and gen aligner): one call = the
    chain ops.mlp_gelu runs without it, each layer that weight's own GEMV (cpu_ops: its linear) with the hidden
    layer rounded to bf16 before and after the GELU (W8A8: quantized from those bf16 values, per row and group of
    512, several groups here). The bound is the bf16 tests' (a GELU value rounding to the neighbouring bf16);
    measured: W8A8 bit-identical, int8 <= 1.9e-6 absolute. Against the bf16 weights' chain: within the
    quantization's error, not equal. Each row's result does not depend on the rows beside it."""
    g = torch.Generator().manual_seed(M * K)
    cls = getattr(cpu_ops, kind)
    x = torch.randn(M, K, generator=g).bfloat16()
    w1 = (torch.randn(H, K, generator=g) / K**0.5).bfloat16()
    w2 = (torch.randn(N, H, generator=g) / H**0.5).bfloat16()
    b1, b2 = torch.randn(H, generator=g).bfloat16(), torch.randn(N, generator=g).bfloat16()
    q1, q2 = cls(w1), cls(w2)
    y = cpu_ops.mlp_gelu(x, q1, b1, q2, b2)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    ref = q2(F.gelu(q1(x, b1.float()).bfloat16()), b2.float())
    assert rel_err(y, ref) <= 3e-4
    bf16 = F.linear(F.gelu(F.linear(x.float(), w1.float(), b1.float()).bfloat16()).float(), w2.float(), b2.float())
    assert 0 < rel_err(y, bf16) <= 0.05
    for m in range(M):  # each row alone (one thread) = the batch's rows (the team, past its threshold at M = 3, 33)
        assert torch.equal(cpu_ops.mlp_gelu(x[m:m + 1], q1, b1, q2, b2), y[m:m + 1])


@pytest.mark.parametrize("dtype", PACKED_DTYPES)
@pytest.mark.parametrize("packed", [False, True])
def test_mlp_gelu_team_equals_one_thread(dtype, packed):
    """Past its work threshold (M (K H + H N) >= 2^20) mlp_gelu runs on the team, below on the calling thread: the
    batch's rows (team) equal each row alone (one thread) bit for bit, packed weights or not."""
    g = torch.Generator().manual_seed(5)
    M, K, H, N = 9, 256, 256, 300  # 9 x 142336 multiply-adds: the team; one row: 142336, one thread
    x = torch.randn(M, K, generator=g).to(dtype)
    w1 = (torch.randn(H, K, generator=g) / K**0.5).to(dtype)
    w2 = (torch.randn(N, H, generator=g) / H**0.5).to(dtype)
    b1, b2 = torch.randn(H, generator=g).to(dtype), torch.randn(N, generator=g).to(dtype)
    if packed:
        w1, w2 = cpu_ops.PackedWeight(w1), cpu_ops.PackedWeight(w2)
    batch = cpu_ops.mlp_gelu(x, w1, b1, w2, b2)
    for m in range(M):
        assert torch.equal(cpu_ops.mlp_gelu(x[m:m + 1], w1, b1, w2, b2), batch[m:m + 1])


def test_mlp_gelu_from_two_threads_at_once():
    """mlp_gelu's held buffers belong to the calling thread: two Python threads with different shapes at the same
    time get the results each gets alone."""
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 40, 77, 700), (17, 64, 200, 300)]
    args = [(torch.randn(M, K, generator=g), torch.randn(H, K, generator=g) / K**0.5, torch.randn(H, generator=g),
             torch.randn(N, H, generator=g) / H**0.5, torch.randn(N, generator=g)) for M, K, H, N in shapes]
    alone = [cpu_ops.mlp_gelu(*a) for a in args]
    work = lambda i: [cpu_ops.mlp_gelu(*args[i]) for _ in range(30)]
    got = in_threads(lambda: work(0), lambda: work(1))
    for i in range(2):
        assert len(got[i]) == 30 and all(torch.equal(y, alone[i]) for y in got[i])


def test_mlp_gelu_misuse():
    x, w1, w2 = torch.randn(2, 8), torch.randn(16, 8), torch.randn(4, 16)
    with pytest.raises(ValueError, match="chain"):
        cpu_ops.mlp_gelu(x, w1, None, torch.randn(4, 15), None)
    with pytest.raises(ValueError, match="dtype"):
        cpu_ops.mlp_gelu(x, w1.bfloat16(), None, w2, None)
    with pytest.raises(ValueError, match="b1"):
        cpu_ops.mlp_gelu(x, w1, torch.randn(15), w2, None)


# ---- misuse --------------------------------------------------------------------------------------------------
def test_misuse_raises_value_error():
    w = torch.randn(16, 32)
    with pytest.raises(ValueError, match="K"):
        cpu_ops.linear(torch.randn(2, 31), w)
    with pytest.raises(ValueError, match="dtype"):
        cpu_ops.linear(torch.randn(2, 32).half(), w)
    with pytest.raises(ValueError, match="contiguous"):
        cpu_ops.linear(torch.randn(32, 2).t(), w)
    with pytest.raises(ValueError, match="D"):
        cpu_ops.vq_nearest(torch.randn(4, 8), torch.randn(10, 9))
    with pytest.raises(ValueError, match="dtype"):
        cpu_ops.vq_nearest(torch.randn(4, 8).double(), torch.randn(10, 8))
    q, kc, vc, bt, cl = _paged_setup(2, 2, 16, 16, [5, 20], torch.float32)
    bad = bt.clone()
    bad[1, 1] = kc.shape[0]  # a block id past the cache: caught in C++ before any read
    with pytest.raises(ValueError, match="block_tables"):
        cpu_ops.paged_decode_attention(q, kc, vc, bad, cl)
    with pytest.raises(ValueError, match="context_lens"):
        cpu_ops.paged_decode_attention(q, kc, vc, bt, torch.tensor([5, 10_000], dtype=torch.int32))
    with pytest.raises(ValueError, match="int32"):
        cpu_ops.paged_decode_attention(q, kc, vc, bt.long(), cl)
    with pytest.raises(ValueError, match="temperature"):
        cpu_ops.cfg_sample(torch.randn(2, 10), None, temperature=0.0)
    with pytest.raises(ValueError, match="shape"):
        cpu_ops.cfg_sample(torch.randn(2, 10), None, seeds=torch.arange(3))
    with pytest.raises(ValueError, match="dtype"):
        cpu_ops.kv_store(torch.randn(1, 2, 16), torch.randn(1, 2, 16), kc.bfloat16(), vc.bfloat16(),
                         torch.zeros(1, dtype=torch.int64))


def test_stream_sum():
    g = torch.Generator().manual_seed(0)
    for n in (0, 37, 1000003, (1 << 21) + 5):  # below and above the threading threshold, ragged tails
        x = torch.randn(n, generator=g)
        # fp32 partial sums: measured ~1e-9 of sum|x| at the two large sizes (AVX-512), 1.0e-8 / 1.6e-9 and 2.1e-8 at
        # n = 37 in the portable build's scalar streams; one element (|x| ~ 0.8) left out or counted twice is >= 4.8e-7
        # of it at the largest size
        assert abs(cpu_ops.stream_sum(x) - x.double().sum().item()) <= 1e-7 * max(1.0, x.abs().sum().item())


@pytest.mark.parametrize("src_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_rows(src_dtype, dtype):
    """gather_rows = src[idx].to(dtype) exactly (repeats, any order, idx None = every row); fp32 -> bf16 rounds to
    nearest even as .to does; indices outside [0, rows) are refused before anything is written."""
    g = torch.Generator().manual_seed(0)
    src = (torch.randn(37, 13, generator=g) * 100).to(src_dtype)
    idx = torch.tensor([5, 0, 36, 5, 12, 5], dtype=torch.int64)
    assert torch.equal(cpu_ops.gather_rows(src, idx, dtype), src[idx].to(dtype))
    assert torch.equal(cpu_ops.gather_rows(src, None, dtype), src.to(dtype))
    assert cpu_ops.gather_rows(src, torch.tensor([], dtype=torch.int64)).shape == (0, 13)
    for bad in (37, -1):
        with pytest.raises(ValueError, match="outside"):
            cpu_ops.gather_rows(src, torch.tensor([0, bad], dtype=torch.int64), dtype)
    with pytest.raises(ValueError, match="idx"):
        cpu_ops.gather_rows(src, torch.tensor([0, 1], dtype=torch.int32))


def test_bench_ab_smoke(monkeypatch):
    """bench/bench_ab.py (interleaved A/B of builds) runs its four ops on this build loaded twice: same outputs, a
    rate per memory-state bin and build; the engine also with the int8 KV cache, and it and the GEMV with W8A8
    weights where this CPU has them; the GEMV and the layers also packed by each build; the attention, the layers
    and the engine at two KV block sizes (the same outputs: the same K/V values at either)."""
    import argparse
    import pathlib

    ab = bench_scripts.load("bench_ab")
    build = pathlib.Path(cpu_ops._C.__file__).parents[1]  # the folder holding the janus_rt/_C*.so in use
    cases = [(op, "fp32", None, "auto") for op in ("packed_gemv", "attention", "layers", "engine")] + [
        ("attention", "int8", None, "auto"), ("engine", "fp32", None, "int8")] + (
        [("engine", "bf16", "w8a8", "auto"), ("packed_gemv", "bf16", "w8a8", "auto")] if cpu_ops.w8a8_available()
        else [])
    for op, dtype, int8, kv in cases:  # engine: whole 3-token generations, small shape; int8: the int8 KV cache
        args = argparse.Namespace(builds=f"{build},{build}", op=op, shape="small", dtype=dtype, M=2, rows=2,
                                  context=40, reps=4, min_mb=1.0, n=1, tokens=3, int8=int8, kv_cache_dtype=kv)
        out = ab.main(args)
        if int8:
            assert ("int8 w8a8" if op == "engine" else "w8a8 weights") in out["what"]
        assert ("int8 KV cache" in out["what"]) == (kv == "int8")
        if op == "engine":  # the engine that ran held that cache
            assert (out["kv_cache_dtype"] == "torch.int8") == (kv == "int8")
        assert list(out["max_abs_diff"].values()) == [0.0]
        for label in ("slowest quarter", "middle half", "fastest quarter"):
            rates = [v for k, v in out[label].items() if k != "stream"]
            assert len(rates) == 2 and all(r > 0 for r in rates)
    class Counting:  # a build that records the copies it packs and the weights its GEMVs read
        def __init__(self, mod):
            self.mod, self.packed, self.read = mod, set(), set()

        def __getattr__(self, name):
            attr = getattr(self.mod, name)
            if name.startswith("pack_") or name == "linear_packed":
                def call(*a):
                    if name == "linear_packed":
                        self.read.add(a[1])
                    else:  # pack_weight(w, wp, ...), pack_int8 / pack_w8a8(q, s, wp, ...)
                        self.packed.add(a[1 if name == "pack_weight" else 2])
                    return attr(*a)
                return call
            return attr

    real_load, builds = ab.load_builds, []

    def counting_load(folders):
        mods = {k: Counting(v) for k, v in real_load(folders).items()}
        builds[:] = mods.values()
        return mods

    with monkeypatch.context() as m:
        m.setattr(ab, "load_builds", counting_load)
        for op in ("packed_gemv", "layers"):  # each build packing its own copy (layout A/Bs)
            out = ab.main(argparse.Namespace(**{**vars(args), "op": op, "dtype": "fp32", "int8": None,
                                                "kv_cache_dtype": "auto", "pack_per_build": True}))
            assert out["what"].endswith("packed by each build") and list(out["max_abs_diff"].values()) == [0.0]
            a, b = builds
            assert a.packed and b.packed and not a.packed & b.packed  # two copies, one by each build
            if op == "packed_gemv":  # and each build's GEMV read its own
                assert a.read == a.packed and b.read == b.packed
        for b in builds:
            b.packed.clear()
        ab.main(argparse.Namespace(**{**vars(args), "op": "engine", "dtype": "fp32", "int8": None,
                                      "kv_cache_dtype": "auto", "pack_per_build": False}))
        a, b = builds  # the engine's own packed copies: by the build that runs it (freed after each run, so the
        assert a.packed and b.packed  # next engine's may reuse the addresses)
    for op in ("attention", "layers", "engine"):  # each build at two KV block sizes: the same outputs, four columns
        out = ab.main(argparse.Namespace(**{**vars(args), "op": op, "dtype": "fp32", "int8": None,
                                            "kv_cache_dtype": "auto", "block_sizes": "16,5"}))
        assert "KV block size 16 / 5" in out["what"]
        assert list(out["max_abs_diff"].values()) == [0.0] * 3
        assert len([k for k in out["middle half"] if k != "stream"]) == 4
    args.kv_cache_dtype = "auto"  # the misuse below, one at a time
    with pytest.raises(SystemExit, match="--block-sizes"):
        ab.main(argparse.Namespace(**{**vars(args), "op": "packed_gemv", "dtype": "fp32", "int8": None,
                                      "block_sizes": "32"}))
    with pytest.raises(SystemExit, match="--block-sizes"):
        ab.main(argparse.Namespace(**{**vars(args), "op": "attention", "dtype": "fp32", "int8": None,
                                      "block_sizes": "16,16"}))
    with pytest.raises(SystemExit, match="--pack-per-build"):
        ab.main(argparse.Namespace(**{**vars(args), "op": "engine", "dtype": "fp32", "int8": None,
                                      "pack_per_build": True}))
    with pytest.raises(SystemExit, match="int8"):
        ab.main(argparse.Namespace(**{**vars(args), "op": "layers", "dtype": "int8", "int8": None}))
    with pytest.raises(SystemExit, match="--kv-cache-dtype"):
        ab.main(argparse.Namespace(**{**vars(args), "op": "attention", "dtype": "fp32", "int8": None,
                                      "kv_cache_dtype": "int8"}))
    with pytest.raises(SystemExit, match="--int8"):
        ab.main(argparse.Namespace(**{**vars(args), "op": "layers", "dtype": "bf16", "int8": "w8a8"}))
    for mode, have in (("weights", "int8_available"), ("w8a8", "w8a8_available")):  # a CPU without that GEMV
        with monkeypatch.context() as m:
            m.setattr(cpu_ops, have, lambda: False)
            with pytest.raises(SystemExit, match=f"--int8 {mode}: this CPU"):
                ab.main(argparse.Namespace(**{**vars(args), "op": "engine", "dtype": "bf16", "int8": mode}))


def _mapping_flags(addr: int) -> list[str] | None:
    """VmFlags of the mapping of this process holding `addr` (/proc/self/smaps), or None if no mapping holds it."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(a, 16) for a in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    return None


huge_pages = pytest.mark.skipif(not os.path.exists("/proc/self/smaps") or not hasattr(mmap, "MADV_HUGEPAGE"),
                                reason="Linux madvise(MADV_HUGEPAGE) and /proc/self/smaps needed")


@huge_pages
def test_empty_huge(monkeypatch):
    """empty_huge: a usable tensor of the shape and dtype, 2 MiB-aligned, in a mapping advised for huge pages ('hg'),
    that goes away with the tensor; below 2 MiB or with JANUS_RT_HUGE_PAGES=0, plain torch.empty memory."""
    import gc

    t = cpu_ops.empty_huge((3, 1 << 19), torch.bfloat16)  # 3 MiB
    assert t.shape == (3, 1 << 19) and t.dtype == torch.bfloat16 and t.is_contiguous()
    assert t.data_ptr() % cpu_ops.HUGE_PAGE == 0
    assert "hg" in _mapping_flags(t.data_ptr())
    t.fill_(2.0)
    assert t.sum(dtype=torch.float64).item() == 2.0 * 3 * (1 << 19)
    u = cpu_ops.empty_huge(5 << 20, torch.float32)  # a count for a shape; a mapping of its own
    assert u.shape == (5 << 20,) and u.data_ptr() % cpu_ops.HUGE_PAGE == 0
    u.zero_()
    assert t.sum(dtype=torch.float64).item() == 2.0 * 3 * (1 << 19)
    addr = t.data_ptr()
    del t
    gc.collect()
    assert _mapping_flags(addr) is None  # unmapped with its tensor
    assert "hg" not in (_mapping_flags(cpu_ops.empty_huge(100, torch.float32).data_ptr()) or [])
    monkeypatch.setenv("JANUS_RT_HUGE_PAGES", "0")
    assert "hg" not in (_mapping_flags(cpu_ops.empty_huge((4 << 20,), torch.float32).data_ptr()) or [])


def test_empty_huge_falls_back(monkeypatch):
    """A kernel that refuses the advice (no THP: EINVAL) still gives a usable mapped buffer; one that refuses the
    mapping gives torch.empty's memory."""
    class NoAdvice(mmap.mmap):
        def madvise(self, *args):
            raise OSError(22, "Invalid argument")

    class NoMapping:
        def __init__(self, *args, **kwargs):
            raise OSError(12, "Cannot allocate memory")

    for fake in (NoAdvice, NoMapping):
        monkeypatch.setattr(cpu_ops.mmap, "mmap", fake)
        t = cpu_ops.empty_huge((3, 1 << 20), torch.float32)
        assert t.shape == (3, 1 << 20) and t.dtype == torch.float32 and t.is_contiguous()
        t.fill_(1.5)
        assert t.sum(dtype=torch.float64).item() == 1.5 * 3 * (1 << 20)


_FAULTS_CHILD = """
import ctypes, resource, sys
from janus_rt.cpu_ops import retain_freed_memory
libc = ctypes.CDLL(None)
libc.prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: 4 KiB pages, so that a block's faults count its pages
print(retain_freed_memory())
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes, libc.memset.argtypes = [ctypes.c_void_p], [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
def touch_and_free():
    p = libc.malloc(64 << 20)
    libc.memset(p, 1, 64 << 20)
    libc.free(p)
touch_and_free()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    touch_and_free()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


@pytest.mark.skipif(not hasattr(os, "confstr") or "glibc" not in (os.confstr("CS_GNU_LIBC_VERSION") or ""),
                    reason="glibc's mallopt")
def test_retain_freed_memory():
    """After retain_freed_memory() a freed 64 MiB block is reused by the next allocation (no page faults: a
    million-fault difference over a long prefill on a VM); glibc's default gives it back and it faults in again.
    In child processes: the setting is process-wide and would outlive the test."""
    import subprocess
    import sys

    def run(keep):
        env = dict(os.environ, JANUS_RT_KEEP_FREED=keep)
        out = subprocess.run([sys.executable, "-c", _FAULTS_CHILD], env=env, capture_output=True, text=True,
                             check=True).stdout.split()
        return out[0], int(out[1])

    (on, faults_kept), (off, faults_default) = run("1"), run("0")
    if on != "True":
        pytest.skip("this glibc refuses the setting (retain_freed_memory returned False)")
    assert off == "False"
    assert faults_kept < 100 and faults_default >= 4 * (64 << 20) // mmap.PAGESIZE // 2, (faults_kept, faults_default)


@huge_pages
def test_packed_weight_and_kv_pool_in_huge_pages():
    """What decode streams lives in advised mappings: a PackedWeight's data and the CPU KV pool (zero-filled)."""
    from janus_rt.engine.kv_cache import KVCache

    pw = cpu_ops.PackedWeight(torch.randn(1024, 1024))
    assert "hg" in _mapping_flags(pw.data.data_ptr())
    cache = KVCache(2, 64, 16, 4, 64, dtype=torch.float32)  # 4 MiB
    assert "hg" in _mapping_flags(cache.data.data_ptr()) and not cache.data.any()
