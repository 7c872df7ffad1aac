"""The int8 KV cache (`--kv-cache-dtype int8`): engine/kv_quant.py's format and reference, the csrc attention over
int8 rows (csrc/paged_attention.h) and the decode step's quantized store (csrc/kv_int8.h through decode_layer), the
cache's bookkeeping (copy-on-write, preemption's swap), and the engine and CLI end to end."""
import json
import math

import pytest
import torch

from janus_rt import Janus, cpu_ops, cpu_step, ops
from janus_rt.cli import main
from janus_rt.engine import Engine, SamplingParams
from janus_rt.engine.engine import kv_cache_dtype_of
from janus_rt.engine.kv_cache import KVCache
from janus_rt.engine.kv_quant import dequantize_kv, paged_decode_attention_int8_ref, quantize_kv
from janus_rt.engine.roofline import decode_step_bytes_flops
from janus_rt.errors import UsageError
from engine_runs import step_logits, two_image_requests
from tolerances import assert_same_roundings, max_err

needs_csrc = pytest.mark.skipif(not cpu_ops.available(), reason="janus_rt._C not built")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


# ---- the format --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_kv_format_and_bound(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(5, 7, 3, 40, generator=g) * torch.rand(5, 7, 3, 1, generator=g) * 10).to(dtype)
    x[1, 2, 0] = 0  # an all-zero head
    q, s = quantize_kv(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == x.shape[:-1]
    xf = x.float()
    assert torch.equal(s, xf.abs().amax(-1) * torch.tensor(1 / 127, dtype=torch.float32))
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    assert torch.equal(q[1, 2, 0], torch.zeros(40, dtype=torch.int8)) and float(s[1, 2, 0]) == 0
    assert torch.equal(q.abs().amax(-1)[s > 0], torch.full_like(q.abs().amax(-1)[s > 0], 127))  # the max maps to 127
    err = (dequantize_kv(q, s) - xf).abs()
    assert bool((err <= s[..., None] * (0.5 + 1e-5)).all())  # half a step, up to fp32 rounding
    # values on the grid come back exactly
    grid = torch.randint(-127, 128, (4, 2, 16), generator=g).float() * 0.25
    grid[..., 0] = 127 * 0.25
    q2, s2 = quantize_kv(grid)
    assert torch.equal(dequantize_kv(q2, s2), grid)


def test_block_bytes_and_roofline_count_int8_rows_and_scales():
    assert KVCache.block_bytes(2, 16, 4, 128, torch.int8) == 2 * 2 * 16 * 4 * (128 + 4)
    assert KVCache.block_bytes(2, 16, 4, 128, torch.bfloat16) == 2 * 2 * 16 * 4 * 256
    cache = KVCache(2, 3, 16, 4, 8, torch.int8)
    assert cache.quantized and cache.nbytes == 3 * cache.bytes_per_block
    assert cache.k_scale(1).shape == (3, 16, 4) and cache.v_scale(0).dtype == torch.float32
    with pytest.raises(ValueError, match="no scales"):
        KVCache(1, 2, 16, 4, 8, torch.float32).k_scale(0)
    model = Janus.from_preset("tiny", seed=1, dtype=torch.bfloat16)
    c = model.cfg.llm
    b16, _ = decode_step_bytes_flops(model, 8, 100)
    b8, _ = decode_step_bytes_flops(model, 8, 100, kv_dtype=torch.int8)
    kv16 = 8 * 100 * c.num_layers * 2 * c.num_kv_heads * c.head_dim * 2
    assert b16 - b8 == kv16 - kv16 // (2 * c.head_dim) * (c.head_dim + 4)


def test_kv_cache_dtype_choice():
    assert kv_cache_dtype_of(None, torch.bfloat16, "cpu") == torch.bfloat16
    assert kv_cache_dtype_of("auto", torch.float32, "cpu") == torch.float32
    assert kv_cache_dtype_of("int8", torch.bfloat16, "cpu") == torch.int8
    with pytest.raises(UsageError, match="CPU only"):
        kv_cache_dtype_of("int8", torch.bfloat16, "cuda:0")
    with pytest.raises(UsageError, match="'auto' or 'int8'"):
        kv_cache_dtype_of("fp8", torch.bfloat16, "cpu")


# ---- the cache's bookkeeping ----------------------------------------------------------------------------------------
def test_store_copy_blocks_and_swap_round_trip():
    g = torch.Generator().manual_seed(1)
    cache = KVCache(2, 4, 4, 3, 8, torch.int8)
    slots = torch.tensor([0, 5, -1, 6, 13])  # -1: a padding row, writes nothing
    k, v = torch.randn(5, 3, 8, generator=g), torch.randn(5, 3, 8, generator=g)
    for layer in range(2):
        cache.store(layer, slots, k * (layer + 1), v)
    keep = slots >= 0
    qk, sk = quantize_kv(2 * k[keep])
    rows = cache.k_cache(1).reshape(-1, 3, 8)
    assert torch.equal(rows[slots[keep]], qk) and torch.equal(cache.k_scale(1).reshape(-1, 3)[slots[keep]], sk)
    assert int((cache.data != 0).sum()) > 0 and float(cache.scales.reshape(2, 2, -1, 3)[:, :, 2].abs().sum()) == 0
    # copy-on-write copies the scales with the rows
    cache.copy_blocks([(1, 2)])
    assert torch.equal(cache.data[:, :, 2], cache.data[:, :, 1])
    assert torch.equal(cache.scales[:, :, 2], cache.scales[:, :, 1])
    # preemption's swap: out and back in elsewhere, bit for bit
    out = cache.read_slots([5, 6, 13])
    assert out.dtype == torch.int8 and out.shape == (2, 2, 3, 3, 8 + 4)
    cache.write_slots([8, 9, 10], out)
    by_slot = lambda t: t.reshape(2, 2, 16, *t.shape[4:])
    assert torch.equal(by_slot(cache.data)[:, :, [8, 9, 10]], by_slot(cache.data)[:, :, [5, 6, 13]])
    assert torch.equal(by_slot(cache.scales)[:, :, [8, 9, 10]], by_slot(cache.scales)[:, :, [5, 6, 13]])
    with pytest.raises(ValueError, match="write_slots"):
        cache.write_slots([8, 9, 10], out[..., :8])


# ---- attention over int8 rows ---------------------------------------------------------------------------------------
def _int8_paged(B, H, D, block_size, lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(1, max(math.ceil(n / block_size) for n in lens))
    num_blocks = B * max_blocks + 3
    k = torch.randn(num_blocks, block_size, H, D, generator=g) * torch.rand(num_blocks, block_size, H, 1, generator=g)
    v = torch.randn(num_blocks, block_size, H, D, generator=g) * 3
    (kq, ks), (vq, vs) = quantize_kv(k), quantize_kv(v)
    bt = torch.randperm(num_blocks, generator=g)[: B * max_blocks].reshape(B, max_blocks).int()
    return kq, vq, ks, vs, bt, torch.tensor(lens, dtype=torch.int32)


@needs_csrc
@pytest.mark.parametrize("D,block_size,lens", [(64, 16, [1, 17, 45]), (48, 32, [33, 5, 64, 0]), (128, 16, [150]),
                                               (8, 32, [31, 32, 2]), (20, 16, [9, 40, 300])])
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
def test_paged_decode_attention_int8(poison, D, block_size, lens, q_dtype):
    """The csrc kernel on int8 rows (scales folded into the scores and the softmax weights) against the reference on
    the dequantized rows; odd head dims, empty rows, contexts of several parts (300 tokens)."""
    kq, vq, ks, vs, bt, cl = _int8_paged(len(lens), 4, D, block_size, lens)
    q = torch.randn(len(lens), 4, D, generator=torch.Generator().manual_seed(9)).to(q_dtype)
    o = cpu_ops.paged_decode_attention(q, kq, vq, bt, cl, 0.6, ks, vs)
    ref = paged_decode_attention_int8_ref(q.float(), kq, vq, ks, vs, bt, cl, sm_scale=0.6)
    assert o.dtype == q_dtype
    assert rel_err(o, ref) <= (1e-5 if q_dtype == torch.float32 else 2**-8)
    assert bool((o[cl == 0] == 0).all())


@needs_csrc
@pytest.mark.parametrize("H,Hkv,lens", [(8, 2, [20, 7]), (6, 3, [40]), (16, 16, [700]), (8, 2, [300, 7])])
def test_paged_decode_attention_int8_gqa(poison, H, Hkv, lens):
    """Query head h reads cache head h // (H / Hkv), its scales too (the reference sees heads and scales repeated)."""
    kq, vq, ks, vs, bt, cl = _int8_paged(len(lens), Hkv, 64, 16, lens, seed=2)
    q = torch.randn(len(lens), H, 64)
    o = cpu_ops.paged_decode_attention(q, kq, vq, bt, cl, None, ks, vs)
    r = H // Hkv
    ref = paged_decode_attention_int8_ref(q, kq.repeat_interleave(r, 2), vq.repeat_interleave(r, 2),
                                          ks.repeat_interleave(r, 2), vs.repeat_interleave(r, 2), bt, cl)
    assert rel_err(o, ref) <= 1e-5


@needs_csrc
def test_paged_decode_attention_int8_batch_invariant(poison):
    """Each row bit-identical alone and in a batch (other task plans: head chunks, separate part tasks)."""
    lens = [45, 1, 16, 23, 0, 100, 8, 37, 300, 129, 128, 257, 2, 64, 200, 17]
    kq, vq, ks, vs, bt, cl = _int8_paged(len(lens), 8, 64, 16, lens, seed=4)
    q = torch.randn(len(lens), 8, 64).bfloat16()
    batch = cpu_ops.paged_decode_attention(q, kq, vq, bt, cl, None, ks, vs)
    for b in range(len(lens)):
        alone = cpu_ops.paged_decode_attention(q[b:b + 1], kq, vq, bt[b:b + 1], cl[b:b + 1], None, ks, vs)
        assert torch.equal(alone[0], batch[b]), f"row {b}"


@needs_csrc
def test_paged_decode_attention_int8_misuse():
    kq, vq, ks, vs, bt, cl = _int8_paged(2, 4, 16, 16, [3, 20])
    q = torch.randn(2, 4, 16)
    with pytest.raises(ValueError, match="exactly when the caches are int8"):
        cpu_ops.paged_decode_attention(q, kq, vq, bt, cl)
    with pytest.raises(ValueError, match="exactly when the caches are int8"):
        cpu_ops.paged_decode_attention(q, kq.float(), vq.float(), bt, cl, None, ks, vs)
    with pytest.raises(ValueError, match="k_scale"):
        cpu_ops.paged_decode_attention(q, kq, vq, bt, cl, None, ks[:, :, :2].contiguous(), vs)
    with pytest.raises(ValueError, match="v_scale"):
        cpu_ops.paged_decode_attention(q, kq, vq, bt, cl, None, ks, vs.double())


# ---- the decode step's store ----------------------------------------------------------------------------------------
@needs_csrc
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_layer_int8_cache(dtype, packed, monkeypatch):
    """csrc decode_layer on an int8 cache writes exactly the rows kv_quant.quantize_kv makes of the rows it writes to a
    cache in the model's dtype (the same bytes and scales; the torch path's store likewise of its own rows), and its
    output matches the layer-by-layer path on the same int8 cache (torch ops, the reference attention)."""
    from test_cpu_decode import _fused, _layer_case, _reference

    monkeypatch.setenv("JANUS_RT_CPU_MATMUL", "csrc")
    if packed and not cpu_ops.packed_available(dtype):
        pytest.skip("no packed bf16 GEMV: CPU without AVX512_BF16")
    cfg, layer, cache, tables, slots, pos, h = _layer_case(dtype, 72, 3, 100, [1, 17, 40, 5, 33])
    d = cfg.head_dim
    float_cache = KVCache(1, cache.num_blocks, cache.block_size, 3, d, dtype)
    float_cache.data.copy_(cache.data)
    _reference(layer, float_cache, tables, slots, pos, h, "torch")  # writes the step's rows in the model dtype
    int8 = [KVCache(1, cache.num_blocks, cache.block_size, 3, d, torch.int8) for _ in range(2)]
    for c in int8:
        q, s = quantize_kv(cache.data)
        c.data.copy_(q)
        c.scales.copy_(s)
    ref = _reference(layer, int8[0], tables, slots, pos, h, "torch")
    cos, sin = (t.float().contiguous() for t in ops.rope_tables(pos, d, cfg.rope_theta, h.dtype))
    out = h.clone()
    with torch.inference_mode():
        cpu_step.DecodeStack([(layer.input_norm.weight, layer.attn.qkv_proj.weight, layer.attn.o_proj.weight,
                               layer.post_attn_norm.weight, layer.mlp.gate_up_proj.weight, layer.mlp.down_proj.weight)],
                             [(int8[1].k_cache(0), int8[1].v_cache(0), int8[1].k_scale(0), int8[1].v_scale(0))],
                             layer.input_norm.eps, packed=packed)(out, slots, tables, (pos + 1).to(torch.int32), cos,
                                                                  sin)
    want_q, want_s = quantize_kv(float_cache.data)  # the torch path: its float rows, quantized
    assert torch.equal(int8[0].data, want_q) and torch.equal(int8[0].scales, want_s)
    csrc_float = _float_cache(cache)
    ref_float = _fused(cfg, layer, csrc_float, tables, slots, pos, h, packed=packed)
    want_q, want_s = quantize_kv(csrc_float.data)  # csrc: its float rows (another GEMV summation order), quantized
    assert torch.equal(int8[1].data, want_q) and torch.equal(int8[1].scales, want_s)
    new = torch.zeros(cache.num_blocks * cache.block_size, dtype=torch.bool)
    new[slots] = True
    before = quantize_kv(cache.data)[0][0, 0].reshape(-1, 3, d)
    assert not torch.equal(int8[1].k_cache(0).reshape(-1, 3, d)[new], before[new])  # the step's rows were written
    if dtype == torch.float32:
        assert max_err(out, ref) <= 1e-5 * ref.abs().max()
    else:  # the torch path's rounding points
        assert_same_roundings(out, ref, "decode_layer, int8 cache")
    # and the int8 cache moves the output away from the float cache's by about the quantization's error only (half
    # a step is 1/254 of a head's largest value; measured 5.0e-3 to 5.8e-3 of the largest output)
    assert 0 < max_err(out, ref_float) <= 0.01 * ref_float.abs().max()


def _float_cache(cache):
    c = KVCache(1, cache.num_blocks, cache.block_size, cache.num_heads, cache.head_dim, cache.dtype)
    c.data.copy_(cache.data)
    return c


# ---- the engine and the CLI -----------------------------------------------------------------------------------------
@needs_csrc
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_int8_cache_fused_matches_layer_by_layer(dtype, monkeypatch):
    """The engine on an int8 cache: the csrc decode step (image steps, several a call) and the layer-by-layer path
    (torch ops and the reference's store) give the same tokens and logits up to summation order; against the same
    engine on a cache in the model's dtype, logits within the quantization's error."""
    monkeypatch.setenv("JANUS_RT_CPU_MATMUL", "csrc")
    model = Janus.from_preset("tiny", seed=4, dtype=dtype)
    eng, fused = two_image_requests(model, "int8")
    assert eng.cache.quantized and eng.runner.uses_cpu_decoder() and eng.runner.cpu_decoder.stack.kv_int8
    _, layerwise = two_image_requests(model, "int8", fused=False)
    _, plain = two_image_requests(model, None)
    for x, y, z in zip(fused, layerwise, plain):
        assert x.tokens == y.tokens
        tol = 1e-4 if dtype == torch.float32 else 2**-10  # bf16: rare rounding flips (measured 4.4e-5)
        assert max_err(step_logits(x), step_logits(y)) <= tol * step_logits(y).abs().max()
        err = max_err(step_logits(x), step_logits(z)) / step_logits(z).abs().max()
        assert 0 < err <= 0.05  # int8 rows are not the float rows, but close


@needs_csrc
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_image_steps_int8_cache_csrc_loop_matches_python_loop(dtype, monkeypatch):
    """csrc image_steps (the layer table's scale pointers) against ImageStep's per-op Python loop: the same tokens."""
    monkeypatch.setenv("JANUS_RT_CPU_MATMUL", "csrc")
    model = Janus.from_preset("tiny", seed=5, dtype=dtype)
    runs = []
    for in_python in (False, True):
        monkeypatch.setattr(cpu_step.ImageStep, "loop_in_python", in_python)
        runs.append([r.tokens for r in two_image_requests(model, "int8", steps=4)[1]])
    assert runs[0] == runs[1]


def test_preemption_restores_an_int8_cache_exactly():
    """A preempted request's int8 rows and scales wait in host memory and come back bit for bit: each request's
    tokens are those of a run alone on an int8 cache."""
    from test_engine import prompt

    model = Janus.from_preset("tiny", seed=3)
    a, b = prompt(model, 20, seed=4), prompt(model, 30, seed=5)
    alone = lambda ids, seed: model.generate_image_tokens(
        ids, n=2, seed=seed, engine=Engine.for_requests(model, [(len(ids), 2)], kv_cache_dtype="int8"))
    ref_a, ref_b = alone(a, 1), alone(b, 2)
    eng = Engine(model, block_size=16, max_num_blocks=30, kv_cache_gb=1, kv_cache_dtype="int8")
    ra = eng.add_image_request(a, 2, SamplingParams(seed=1))
    rb = eng.add_image_request(b, 2, SamplingParams(seed=2))
    eng.run()
    assert eng.scheduler.num_preemptions > 0
    assert torch.equal(torch.tensor(ra.tokens), ref_a) and torch.equal(torch.tensor(rb.tokens), ref_b)
    assert eng.bm.num_free_blocks == eng.bm.num_blocks


def test_cli_generate_and_bench_with_int8_cache(tmp_path, monkeypatch):
    """`generate --kv-cache-dtype int8` says so in the PNGs; `bench` names the cache and counts its bytes; on a GPU
    device the flag is refused before anything loads."""
    from PIL import Image

    main(["generate", "--model", "tiny", "--prompt", "x", "-n", "1", "--kv-cache-dtype", "int8",
          "--out", str(tmp_path / "g")])
    info = json.loads(Image.open(tmp_path / "g" / "img_00_00.png").info["parameters"])
    assert info["kv_cache"] == "int8"
    out = tmp_path / "rows.jsonl"
    for kv in ("auto", "int8"):
        main(["bench", "--model", "tiny", "--device", "cpu", "--tokens", "6", "--repeats", "1", "--no-transformers",
              "--warmup-tokens", "0", "--kv-cache-dtype", kv, "--json", str(out)])
    plain, int8 = (json.loads(line) for line in out.read_text().splitlines())
    assert "kv_cache" not in plain and int8["kv_cache"].startswith("int8")
    assert int8["step_mib"] < plain["step_mib"]
    if cpu_ops.available():
        assert int8["cpu_decode"].startswith("decode_layer") and "int8 KV cache" in int8["cpu_decode"]
    from janus_rt import cli

    monkeypatch.setattr(cli.torch.cuda, "is_available", lambda: True)  # the flag's own check, not "no CUDA device"
    with pytest.raises(SystemExit, match="--kv-cache-dtype int8 is the CPU's"):
        main(["generate", "--model", "tiny", "--device", "cuda", "--kv-cache-dtype", "int8", "--out",
              str(tmp_path / "c")])
    assert not (tmp_path / "c").exists()


def test_evaluate_runs_on_an_int8_cache(monkeypatch):
    """`python -m janus_rt.train.evaluate --kv-cache-dtype int8` generates through engines with an int8 cache."""
    from janus_rt.train import evaluate

    made = []
    real = Engine.for_requests.__func__
    monkeypatch.setattr(Engine, "for_requests",
                        classmethod(lambda cls, *a, **k: made.append(real(cls, *a, **k)) or made[-1]))
    from janus_rt.cli import DEFAULT_MODEL

    rows = evaluate.main(["--model", str(DEFAULT_MODEL), "--n", "2", "--n-per-caption", "1",
                          "--kv-cache-dtype", "int8"])
    assert rows[0]["kv_cache"] == "int8" and 0.0 <= rows[0]["color_match"] <= 1.0
    assert len(made) == 2 and all(e.cache.quantized for e in made)


@needs_csrc
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [1, 7, 16, 20, 128, 130])
def test_csrc_quantizer_is_the_reference_bit_for_bit(dtype, D):
    """csrc/kv_int8.h (cpu_ops.quantize_kv: the code decode_layer runs on a step's rows, and the prefill's store)
    against kv_quant.quantize_kv on many rows: values at every scale, exact ties (x / s = k + 0.5), all-zero heads,
    subnormal and huge maxima, and heads with a NaN or an infinity (scale NaN, q = 0 on both sides)."""
    g = torch.Generator().manual_seed(D)
    n = 4000
    x = torch.randn(n, D, generator=g) * torch.exp(torch.randn(n, 1, generator=g) * 4)
    ties = torch.randint(-126, 126, (200, D), generator=g).float() + 0.5  # with the max at 127: x / s = k + 0.5
    ties[:, 0] = 127
    x = torch.cat([x, ties * 0.37, torch.zeros(3, D), torch.full((2, D), 1e-40), torch.full((2, D), -3e38)])
    special = torch.randn(4, D, generator=g)
    special[0, D // 2], special[1, 0], special[2, -1], special[3, D // 3] = float("nan"), float("inf"), -float("inf"), 0
    x = torch.cat([x, special]).to(dtype)
    got_q, got_s = cpu_ops.quantize_kv(x)
    want_q, want_s = quantize_kv(x)
    assert torch.equal(got_q, want_q)
    assert torch.equal(got_s, want_s) or torch.allclose(got_s, want_s, rtol=0, atol=0, equal_nan=True)
    assert bool(got_s[-4:-1].isnan().all()) and not bool(got_s[-1].isnan()) and int(got_q[-4:-1].abs().sum()) == 0
    if D > 1:  # ties exist only where x / s can land on k + 0.5
        assert bool(((x[n:n + 200].float() / want_s[n:n + 200, None]).frac().abs() == 0.5).any())
    rows = x.reshape(-1, 2, D) if x.shape[0] % 2 == 0 else x[:-1].reshape(-1, 2, D)  # [..., D] of any rank
    assert torch.equal(cpu_ops.quantize_kv(rows)[0], quantize_kv(rows)[0])


def test_reference_attention_handles_gqa_itself():
    """kv_quant's reference reads cache head h // (H / Hkv) on its own: equal to the float reference on the
    dequantized caches with the heads repeated."""
    from janus_rt.kernels.paged_attention import paged_decode_attention_ref

    kq, vq, ks, vs, bt, cl = _int8_paged(2, 2, 32, 16, [20, 7], seed=3)
    q = torch.randn(2, 8, 32)
    got = paged_decode_attention_int8_ref(q, kq, vq, ks, vs, bt, cl)
    rep = lambda c, s: dequantize_kv(c, s).repeat_interleave(4, 2)
    assert rel_err(got, paged_decode_attention_ref(q, rep(kq, ks), rep(vq, vs), bt, cl)) <= 1e-6
    with pytest.raises(ValueError, match="multiple"):
        paged_decode_attention_int8_ref(torch.randn(2, 3, 32), kq, vq, ks, vs, bt, cl)


def test_bench_understand_int8_cache(tmp_path):
    """bench/bench_understand.py --kv-cache-dtype int8: the engine's cache is int8, the row says so, and the decode
    roofline counts the K/V at a byte a value plus a scale a head."""
    import bench_scripts

    bu = bench_scripts.load("bench_understand")
    row = bu.main(bu.build_parser().parse_args(["--preset", "tiny", "--device", "cpu", "--new-tokens", "3",
                                                "--repeats", "1", "--kv-cache-dtype", "int8", "--no-transformers"]))
    assert row["kv_cache"].startswith("int8") and row["new_tokens"] >= 1
    model = Janus.from_preset("tiny", seed=0)
    c = model.cfg.llm
    (b32, f32), (b8, f8) = bu.decode_bytes_flops(model, 100), bu.decode_bytes_flops(model, 100, torch.int8)
    assert f8 == f32 and b32 - b8 == 100 * c.num_layers * 2 * c.num_kv_heads * (4 * c.head_dim - c.head_dim - 4)


@needs_csrc
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("ctx", [40, 7])  # 8-token vector scoring and exp; the scalar tail
def test_a_non_finite_cached_value_poisons_its_heads_output_not_others(bad, ctx):
    """A NaN or +inf in one cached K value: that row's query head reads NaN (float cache: its score; int8 cache: the
    head's scale is NaN), every other head and row stays finite, on both caches and the reference. (The vector exp
    had dropped a NaN score to weight ~1e-38, hiding it.)"""
    g = torch.Generator().manual_seed(11)
    B, H, D, bs = 3, 4, 32, 16
    nblk = -(-ctx // bs)
    k = torch.randn(B * nblk, bs, H, D, generator=g)
    v = torch.randn(B * nblk, bs, H, D, generator=g)
    bt = torch.arange(B * nblk, dtype=torch.int32).reshape(B, nblk)
    cl = torch.full((B,), ctx, dtype=torch.int32)
    q = torch.rand(B, H, D, generator=g) + 0.1  # positive: a +inf key scores +inf
    k[bt[1, 0], 3, 2, 5] = bad  # row 1, token 3, head 2
    (kq, ks), (vq, vs) = quantize_kv(k), quantize_kv(v)
    outs = [cpu_ops.paged_decode_attention(q, k, v, bt, cl), cpu_ops.paged_decode_attention(q, kq, vq, bt, cl, None,
                                                                                             ks, vs),
            paged_decode_attention_int8_ref(q, kq, vq, ks, vs, bt, cl)]
    for o in outs:
        nan = o.isnan().any(-1)  # [B, H]
        want = torch.zeros(B, H, dtype=torch.bool)
        want[1, 2] = True
        assert torch.equal(nan, want) and bool(torch.isfinite(o[~want]).all())


def test_serve_and_understand_take_the_int8_cache(tmp_path, capsys, monkeypatch):
    """`janus-rt serve --kv-cache-dtype int8`: the server's engine holds an int8 cache; `understand` answers on one."""
    from PIL import Image

    from janus_rt.cli import make_server, parser

    args = parser().parse_args(["serve", "--model", "tiny", "--device", "cpu", "--kv-cache-gb", "0.01", "--port", "0",
                                "--kv-cache-dtype", "int8"])
    srv, _ = make_server(args)
    try:
        assert srv.bg.engine.cache.quantized
    finally:
        srv.server_close()
        srv.bg.close()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.png")
    made = []
    real = Engine.for_requests.__func__
    monkeypatch.setattr(Engine, "for_requests",
                        classmethod(lambda cls, *a, **k: made.append(real(cls, *a, **k)) or made[-1]))
    main(["understand", "--model", "tiny", "--image", str(tmp_path / "red.png"), "--question", "colour?",
          "--max-new-tokens", "3", "--kv-cache-dtype", "int8"])
    assert "tokens in" in capsys.readouterr().err
    assert len(made) == 1 and made[0].cache.quantized
