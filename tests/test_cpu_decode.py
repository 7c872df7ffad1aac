"""csrc decode_layer (engine/cpu_decode.py) against the layer-by-layer path: one decoder layer, and the engine."""
import pytest
import torch

from janus_rt import Janus, cpu_ops, cpu_step, ops
from janus_rt.config import LLMConfig
from janus_rt.engine import Engine, SamplingParams
from janus_rt.engine.kv_cache import KVCache
from janus_rt.engine.runner import DecodeKV
from janus_rt.models.llm import DecoderLayer
from concurrency import in_threads
from tolerances import assert_same_roundings, max_err

pytestmark = pytest.mark.skipif(not cpu_ops.available(), reason="janus_rt._C not built")


@pytest.fixture(autouse=True)
def csrc_projections(monkeypatch):
    """The csrc decoder and GEMVs under test, also where torch's matmul would be preferred (AMX hosts)."""
    monkeypatch.setenv("JANUS_RT_CPU_MATMUL", "csrc")


def _layer_case(dtype, hidden, heads, inter, context_lens, block_size=16, seed=0):
    """A random decoder layer, a paged cache with random past K/V, and one decode step's inputs."""
    g = torch.Generator().manual_seed(seed)
    cfg = LLMConfig(vocab_size=64, hidden_size=hidden, num_layers=1, num_heads=heads, num_kv_heads=heads,
                    intermediate_size=inter)
    layer = DecoderLayer(cfg, 0)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 1 else p.shape[1] ** -0.5) + (p.dim() == 1))
    layer = layer.to(dtype)
    r, d = len(context_lens), cfg.head_dim
    width = -(-max(context_lens) // block_size)
    cache = KVCache(1, r * width + 1, block_size, heads, d, dtype)
    cache.data.copy_(torch.randn(cache.data.shape, generator=g).to(dtype))
    perm = torch.randperm(r * width, generator=g) + 1  # block 0 unused, tables scattered
    tables = perm.view(r, width).to(torch.int32).contiguous()
    pos = torch.tensor(context_lens) - 1
    slots = (tables[torch.arange(r), pos // block_size].long() * block_size + pos % block_size).contiguous()
    h = torch.randn(r, hidden, generator=g).to(dtype)
    return cfg, layer, cache, tables, slots, pos, h


def _reference(layer, cache, tables, slots, pos, h, backend):
    kv = DecodeKV(cache, slots, tables, (pos + 1).to(torch.int32))
    with torch.inference_mode(), ops.use_backend(backend):
        out, resid = layer(h[:, None], None, pos[:, None], kv)
    return (out + resid)[:, 0]


def _fused(cfg, layer, cache, tables, slots, pos, h, packed=False):
    cos, sin = (t.float().contiguous() for t in ops.rope_tables(pos, cfg.head_dim, cfg.rope_theta, h.dtype))
    h = h.clone()
    with torch.inference_mode():
        cpu_step.decode_layer(h, layer.input_norm.weight, layer.attn.qkv_proj.weight, layer.attn.o_proj.weight,
                              layer.post_attn_norm.weight, layer.mlp.gate_up_proj.weight, layer.mlp.down_proj.weight,
                              cache.k_cache(0), cache.v_cache(0), slots, tables, (pos + 1).to(torch.int32), cos, sin,
                              layer.input_norm.eps, packed=packed)
    return h


SHAPES = [(72, 3, 100, [1, 17, 40, 5, 33]),  # head_dim 24, K and N not multiples of the vector width
          (128, 4, 176, [16, 16, 1]),
          (64, 2, 96, [300, 7]),
          (256, 4, 704, [40, 3, 90, 17, 64, 9])]  # the only one past decode_layer's kTeamWork: run by the team


@pytest.mark.parametrize("packed", [False, True])  # True: the four matrices through the packed GEMV
@pytest.mark.parametrize("hidden,heads,inter,lens", SHAPES)
def test_decode_layer_fp32(hidden, heads, inter, lens, packed):
    cfg, layer, cache, tables, slots, pos, h = _layer_case(torch.float32, hidden, heads, inter, lens)
    ref_cache = KVCache(1, cache.num_blocks, cache.block_size, heads, cfg.head_dim, torch.float32)
    ref_cache.data.copy_(cache.data)
    before = cache.data.clone()
    ref = _reference(layer, ref_cache, tables, slots, pos, h, "torch")
    out = _fused(cfg, layer, cache, tables, slots, pos, h, packed=packed)
    assert max_err(out, ref) <= 1e-5 * ref.abs().max()
    # the new K/V rows were written (K rotated), everything else untouched
    assert max_err(cache.data, ref_cache.data) <= 1e-5 * ref_cache.data.abs().max()
    assert not torch.equal(cache.data, before)


needs_packed = pytest.mark.skipif(not cpu_ops.packed_available(torch.bfloat16),
                                  reason="no packed bf16 GEMV: CPU without AVX512_BF16")


@pytest.mark.parametrize("packed", [False, pytest.param(True, marks=needs_packed)])
@pytest.mark.parametrize("hidden,heads,inter,lens", SHAPES[:2] + SHAPES[3:])
def test_decode_layer_bf16(hidden, heads, inter, lens, packed):
    """bf16: the same rounding points as the torch path, so the torch path's values but for rare rounding flips
    (another summation order), and an error against an fp32 run of the same layer within 2x the torch bf16 path's
    own. packed: the four matrices through the packed GEMV (another summation order, the same bounds)."""
    cfg, layer, cache, tables, slots, pos, h = _layer_case(torch.bfloat16, hidden, heads, inter, lens)
    caches = [KVCache(1, cache.num_blocks, cache.block_size, heads, cfg.head_dim, dt)
              for dt in (torch.bfloat16, torch.float32)]
    for c in caches:
        c.data.copy_(cache.data)
    ref_bf16 = _reference(layer, caches[0], tables, slots, pos, h, "torch")
    ref32 = _reference(layer.float(), caches[1], tables, slots, pos, h.float(), "torch")
    layer = layer.to(torch.bfloat16)
    out = _fused(cfg, layer, cache, tables, slots, pos, h, packed=packed)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert_same_roundings(out, ref_bf16, "decode_layer")  # (a rounding point dropped is more accurate: caught here)
    assert max_err(out, ref32) <= 2 * max_err(ref_bf16, ref32)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [(72, 3, 100, [1, 17, 40, 5, 33]), (256, 4, 704, [40, 3, 90, 17, 64, 9])])
def test_decode_layer_rows_alone_equal_rows_in_batch(dtype, packed, case):
    """A row's output (h and its new K/V) does not depend on the other rows of the call, bit for bit: every row,
    run alone, equals the batch's row; also the calls in turn reuse decode_layer's held buffers (grown for 5 rows,
    then 1 row at a time, then a layer of another width, then the first again) without one call's leftovers in
    another's result. The second case's batch is past kTeamWork (run by the team), its rows alone are not (run on
    the calling thread): the two give the same bits."""
    if packed and not cpu_ops.packed_available(dtype):
        pytest.skip("no packed bf16 GEMV: CPU without AVX512_BF16")
    hidden, heads, inter, lens = case
    first = _layer_case(dtype, hidden, heads, inter, lens)
    cfg, layer, cache, tables, slots, pos, h = first
    batch_cache = KVCache(1, cache.num_blocks, cache.block_size, heads, cfg.head_dim, dtype)
    batch_cache.data.copy_(cache.data)
    batch = _fused(cfg, layer, batch_cache, tables, slots, pos, h, packed=packed)
    for r in range(h.shape[0]):
        alone_cache = KVCache(1, cache.num_blocks, cache.block_size, heads, cfg.head_dim, dtype)
        alone_cache.data.copy_(cache.data)
        sl = slice(r, r + 1)
        alone = _fused(cfg, layer, alone_cache, tables[sl].contiguous(), slots[sl].contiguous(), pos[sl], h[sl],
                       packed=packed)
        assert torch.equal(alone, batch[sl])
        blk = tables[r, pos[r] // cache.block_size]
        assert torch.equal(alone_cache.data[:, :, blk], batch_cache.data[:, :, blk])
    other = _layer_case(dtype, 128, 4, 176, [16, 16, 1])  # another C and I: the buffers are made anew
    _fused(*other[:3], *other[3:], packed=packed)
    again_cache = KVCache(1, cache.num_blocks, cache.block_size, heads, cfg.head_dim, dtype)
    again_cache.data.copy_(cache.data)
    assert torch.equal(_fused(cfg, layer, again_cache, tables, slots, pos, h, packed=packed), batch)


def test_decode_layer_from_two_threads_at_once():
    """decode_layer's held buffers belong to the calling thread: two Python threads running layers of different
    widths at the same time get the results each gets alone."""
    cases = [_layer_case(torch.float32, 72, 3, 100, [1, 17, 40, 5, 33]), _layer_case(torch.float32, 128, 4, 176, [16, 9])]
    caches0 = [c[2].data.clone() for c in cases]
    alone = []
    for c, c0 in zip(cases, caches0):
        alone.append(_fused(*c))
        c[2].data.copy_(c0)

    def work(i):
        c, outs = cases[i], []
        for _ in range(20):
            c[2].data.copy_(caches0[i])
            outs.append(_fused(*c))
        return outs

    got = in_threads(lambda: work(0), lambda: work(1))
    for i in range(2):
        assert len(got[i]) == 20 and all(torch.equal(x, alone[i]) for x in got[i])


def test_decode_stack_packed_choice():
    """packed=None packs exactly where it can (fp32; bf16 on an AVX512_BF16 build); True where it cannot is an
    error."""
    for dtype in (torch.float32, torch.bfloat16):
        cfg, layer, cache, tables, slots, pos, h = _layer_case(dtype, 64, 2, 96, [20, 9])
        weights = [(layer.input_norm.weight, layer.attn.qkv_proj.weight, layer.attn.o_proj.weight,
                    layer.post_attn_norm.weight, layer.mlp.gate_up_proj.weight, layer.mlp.down_proj.weight)]
        caches = [(cache.k_cache(0), cache.v_cache(0))]
        with torch.inference_mode():
            can = cpu_ops.packed_available(dtype)
            assert cpu_step.DecodeStack(weights, caches, 1e-6).packed == can
            assert not cpu_step.DecodeStack(weights, caches, 1e-6, packed=False).packed
            if can:
                assert cpu_step.DecodeStack(weights, caches, 1e-6, packed=True).packed
            else:
                with pytest.raises(ValueError, match="packed"):
                    cpu_step.DecodeStack(weights, caches, 1e-6, packed=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_stack_final_norm(dtype):
    """A stack with the model's final norm writes RMSNorm(h) of the last layer's output into out, as
    ops.rms_norm_torch computes it from that h (bf16: the same rounding points, at most an ulp apart)."""
    cfg, layer, cache, tables, slots, pos, h = _layer_case(dtype, 72, 3, 100, [1, 17, 40, 5, 33])
    w = (torch.randn(72, generator=torch.Generator().manual_seed(1)) * 0.3 + 1).to(dtype)
    weights = (layer.input_norm.weight, layer.attn.qkv_proj.weight, layer.attn.o_proj.weight,
               layer.post_attn_norm.weight, layer.mlp.gate_up_proj.weight, layer.mlp.down_proj.weight)
    cos, sin = (t.float().contiguous() for t in ops.rope_tables(pos, cfg.head_dim, cfg.rope_theta, dtype))
    lens = (pos + 1).to(torch.int32)
    with torch.inference_mode():
        stack = cpu_step.DecodeStack([weights], [(cache.k_cache(0), cache.v_cache(0))], 1e-6, w, 1e-5)
        out = torch.full_like(h, float("nan"))
        stack(h, slots, tables, lens, cos, sin, out)  # h: the last layer's output, in place
        ref = ops.rms_norm_torch(h, w, 1e-5)
        with pytest.raises(ValueError, match="final_norm"):
            stack(h, slots, tables, lens, cos, sin)
    assert out.dtype == dtype
    if dtype == torch.float32:
        assert max_err(out, ref) <= 1e-6 * ref.abs().max()
    else:
        assert_same_roundings(out, ref, "final norm")


def test_decode_layer_skips_padding_slots():
    cfg, layer, cache, tables, slots, pos, h = _layer_case(torch.float32, 64, 2, 96, [20, 9])
    before = cache.data.clone()
    slots = torch.tensor([-1, -1])
    _fused(cfg, layer, cache, tables, slots, pos, h)
    assert torch.equal(cache.data, before)


def test_decode_phase_timing():
    """The phase timers count every layer call inside the block and only there, name the phases in run order, and
    leave the results bit-identical."""
    cfg, layer, cache, tables, slots, pos, h = _layer_case(torch.float32, 128, 4, 176, [300, 40, 7])
    cache0 = cache.data.clone()
    plain = _fused(cfg, layer, cache, tables, slots, pos, h)
    cache.data.copy_(cache0)
    with cpu_step.decode_phase_timing() as t:
        timed = [_fused(cfg, layer, cache, tables, slots, pos, h) for _ in range(3)]
    _fused(cfg, layer, cache, tables, slots, pos, h)  # after the block: not counted
    assert all(torch.equal(x, plain) for x in timed)
    assert t["calls"] == 3
    sec = t["seconds"]
    assert list(sec) == ["layer_setup", "input_norm", "qkv_proj", "rope_kv_store", "attention", "pack_o", "o_proj",
                         "residual_post_norm", "gate_up_proj", "silu_mul", "down_proj", "residual"]
    assert all(v >= 0 for v in sec.values()) and sec["attention"] > 0 and sec["gate_up_proj"] > 0
    with cpu_step.decode_phase_timing() as t2:
        pass
    assert t2["calls"] == 0 and sum(t2["seconds"].values()) == 0  # nothing carried over


def test_decode_layer_misuse():
    cfg, layer, cache, tables, slots, pos, h = _layer_case(torch.float32, 64, 2, 96, [20, 9])
    with pytest.raises(ValueError, match="dtype"):
        _fused(cfg, layer, cache, tables, slots, pos, h.to(torch.bfloat16))
    with pytest.raises(ValueError, match="block_tables"):
        _fused(cfg, layer, cache, torch.full_like(tables, cache.num_blocks), slots, pos, h)
    with pytest.raises(ValueError, match="context_lens"):
        _fused(cfg, layer, cache, tables, slots, pos + 1000, h)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_fused_decode_matches_layer_by_layer(dtype):
    """The engine with the csrc decode step gives the layer-by-layer cpu path's logits and (greedy) tokens."""
    model = Janus.from_preset("tiny", seed=4, dtype=dtype)
    t = model.cfg.tokens
    ids = [t.bos_id, 5, 9, 30, 7, t.boi_id]
    runs = []
    for fused in (True, False):
        eng = Engine.for_requests(model, [(len(ids), 2), (len(ids) + 3, 1)])
        assert eng.runner.fused_cpu_decode
        eng.runner.fused_cpu_decode = fused
        eng.record_logits = True
        a = eng.add_image_request(ids, n=2, params=SamplingParams(greedy=True), num_tokens=24)
        b = eng.add_image_request(ids[:-1] + [3, 4, 5, t.boi_id], n=1, params=SamplingParams(seed=2), num_tokens=20)
        eng.run()
        runs.append((a, b))
    for x, y in zip(*runs):
        assert x.tokens == y.tokens
        c1 = torch.stack([c for c, _ in x.logits])
        c2 = torch.stack([c for c, _ in y.logits])
        # fp32: summation order only. bf16: the csrc step rounds to bf16 where the torch ops do; another summation
        # order (the packed GEMV's against the unpacked one's) can flip a rounding now and then: 1/8 bf16 ulp of the
        # largest logit (measured: identical on AMX, 6.9e-7 of it with JANUS_RT_AMX=0 and on Zen 5; k not rounded
        # before RoPE in the csrc step alone: 8.4e-3)
        tol = 1e-4 if dtype == torch.float32 else 2**-10
        assert max_err(c1, c2) <= tol * c2.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_decoder_rope_cache_equals_rope_tables(dtype):
    """CpuDecoder reads RoPE tables from a table built once; they equal ops.rope_tables at the step's positions."""
    model = Janus.from_preset("tiny", seed=0, dtype=dtype)
    eng = Engine.for_requests(model, [(8, 1)])
    dec, c = eng.runner.cpu_decoder, model.cfg.llm
    pos = torch.tensor([0, 1, 17, 999, 4095, 123])
    cos, sin = ops.rope_tables(pos, c.head_dim, c.rope_theta, dtype)
    assert torch.equal(dec.cos[pos], cos.float()) and torch.equal(dec.sin[pos], sin.float())


_FIRST_TABLE = """
import torch
import janus_rt.ops as ops
positions = torch.arange(4096)
first = ops.rope_tables(positions, 16, 10000.0, torch.float32)  # cos: this process's first OpenMP parallel region
again = ops.rope_tables(positions, 16, 10000.0, torch.float32)
print(sum(int((a != b).sum()) for a, b in zip(first, again)))
"""


def test_rope_tables_first_call_of_a_process():
    """The tiny engine's rotary table (4096 positions x 16, built once), as a fresh process's first cos, equals the
    same call made again. Without ops' one-element cos at import, 9 of 80 such processes on the AMX Xeon gave a cos
    that differed (the main thread's share, from MKL VML's low-accuracy mode); this test failed 3 of 6 runs there."""
    import subprocess
    import sys

    for _ in range(10):
        out = subprocess.run([sys.executable, "-c", _FIRST_TABLE], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split() == ["0"]


def test_janus_rt_packed_env(monkeypatch):
    """JANUS_RT_PACKED picks the engine's decode GEMV: 0 = unpacked, 1 / auto = packed (fp32 tiny: always possible);
    anything else is refused by name."""
    model = Janus.from_preset("tiny", seed=0)
    for value, packed in (("0", False), ("1", True), ("auto", True)):
        monkeypatch.setenv("JANUS_RT_PACKED", value)
        assert Engine.for_requests(model, [(8, 1)]).runner.cpu_decoder.stack.packed is packed
    monkeypatch.setenv("JANUS_RT_PACKED", "yes")
    with pytest.raises(ValueError, match="JANUS_RT_PACKED"):
        Engine.for_requests(model, [(8, 1)])


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_packed)])
def test_cpu_decoder_packed_gen_head(dtype):
    """The decode step's gen head through packed weights gives the model's gen head (another summation order)."""
    model = Janus.from_preset("tiny", seed=3, dtype=dtype)
    dec = Engine.for_requests(model, [(8, 1)]).runner.cpu_decoder
    assert dec.stack.packed and dec.gen_head_packed is not None
    h = torch.randn(5, model.cfg.llm.hidden_size, generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.inference_mode(), ops.use_backend("cpu"):
        ref = model.gen_head(h).float()
    out = dec.gen_head(h)
    assert out.dtype == dtype
    if dtype == torch.float32:
        assert max_err(out.float(), ref) <= 1e-5 * ref.abs().max()
    else:  # the same rounding points (hidden values, output), another summation order
        assert_same_roundings(out, ref.to(dtype), "gen head")


@pytest.mark.parametrize("packed", ["0", "1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_image_step_matches_op_by_op(dtype, packed, monkeypatch):
    """The decode step of image rows as csrc calls only (cpu_step.ImageStep) gives the op-by-op step's logits bit for
    bit and its tokens: three requests of different n, prompt lengths and sampling settings share each step (image
    i's cond and uncond rows interleaved by request), packed and unpacked weights."""
    if dtype == torch.bfloat16 and packed == "1" and not cpu_ops.packed_available(torch.bfloat16):
        pytest.skip("packed bf16 GEMV needs an AVX512_BF16 build")
    monkeypatch.setenv("JANUS_RT_PACKED", packed)
    model = Janus.from_preset("tiny", seed=6, dtype=dtype)
    t = model.cfg.tokens
    prompts = [[t.bos_id, 5, 9, 30, 7, t.boi_id], [t.bos_id, 11, 12, t.boi_id],
               [t.bos_id] + list(range(40, 52)) + [t.boi_id]]
    params = [SamplingParams(greedy=True), SamplingParams(seed=2, temperature=0.8, top_k=50, top_p=0.9),
              SamplingParams(seed=5, cfg_weight=3.0)]
    runs = []
    for fast in (True, False):
        # one step per call here, so that each step's logits can be read (multi-step: test_image_steps_multi_step)
        eng = Engine.for_requests(model, [(len(p), n) for p, n in zip(prompts, (2, 1, 3))], max_steps_per_call=1)
        dec = eng.runner.cpu_decoder
        assert dec.image_step_runner is not None and dec.stack.packed is (packed == "1")
        logits, step = [], dec.image_step_runner
        if fast:
            def spy(*a, step=step, call=type(step).steps):
                out = call(step, *a)
                logits.append(next(iter(step._bufs.values()))["logits"].clone())
                return out
            step.steps = spy
        else:
            eng.record_logits = True  # the engine records each step's logits on the op-by-op path
        reqs = [eng.add_image_request(p, n=n, params=sp, num_tokens=12) for p, n, sp in zip(prompts, (2, 1, 3), params)]
        eng.run()
        runs.append((reqs, logits))
    (fast_reqs, fast_logits), (ref_reqs, _) = runs
    assert len(fast_logits) == 11  # every decode step after the prefill's first token took the fast path
    for x, y in zip(fast_reqs, ref_reqs):
        assert x.tokens == y.tokens
    # the fast path's logits rows, mapped back to each request's cond / uncond rows, equal the recorded ones
    off = 0
    for r in ref_reqs:
        for s in range(11):
            cond, uncond = r.logits[s + 1]
            step_logits = fast_logits[s]
            assert torch.equal(step_logits[off : off + r.n], cond)
            assert torch.equal(step_logits[off + r.n : off + 2 * r.n], uncond)
        off += 2 * r.n


def test_image_step_falls_back_and_checks():
    """CpuDecoder.image_step declines what it does not cover (a position past its rotary tables, more rows than the
    GEMV path takes); ImageStep refuses inconsistent inputs and out-of-range indices with a ValueError."""
    model = Janus.from_preset("tiny", seed=0)
    eng = Engine.for_requests(model, [(8, 1)])
    dec = eng.runner.cpu_decoder
    i64 = lambda *v: torch.tensor(v, dtype=torch.int64)
    params = dict(cfg_weight=torch.tensor([5.0]), temperature=torch.tensor([1.0]), top_k=i64(0),
                  top_p=torch.tensor([1.0]), greedy=torch.tensor([True]))
    table = [[0]]
    args = ([3], i64(0, 0), [4, 4], [4, 20], table * 2, i64(0), i64(1), params, [7])
    assert dec.image_step(*args) is not None
    big = dec.cos.shape[0]
    assert dec.image_step([3], i64(0, 0), [4, big], [4, 20], table * 2, i64(0), i64(1), params, [7]) is None
    rows = ops.CPU_GEMV_MAX_ROWS + 2
    assert dec.image_step([3], i64(*[0] * rows), [4] * rows, [4] * rows, table * rows, i64(0), i64(1), params,
                          [7]) is None
    step = dec.image_step_runner
    with pytest.raises(ValueError, match="row counts"):
        step([3], i64(0, 0), [4, 4], [4, 20], table * 2, i64(0), i64(1), params, [7, 8])
    with pytest.raises(ValueError, match="idx"):  # a token past gen_embed's rows
        step([model.cfg.vq.codebook_size], i64(0, 0), [4, 4], [4, 20], table * 2, i64(0), i64(1), params, [7])
    with pytest.raises(ValueError, match="cond_rows"):
        step([3], i64(0, 0), [4, 4], [4, 20], table * 2, i64(2), i64(1), params, [7])
    with pytest.raises(ValueError, match="top_p"):
        f64 = dict(params, top_p=torch.tensor([1.0], dtype=torch.float64))
        step([3], i64(0, 0), [4, 4], [4, 20], table * 2, i64(0), i64(1), f64, [7])
    with pytest.raises(ValueError, match="block_tables"):
        step([3], i64(0, 0), [4, 4], [4, 20], [[0], [10**6]], i64(0), i64(1), params, [7])


def test_image_step_adaptor_weights():
    """ImageStep takes an unpacked stack's adaptor weights as any tensors (a Parameter beside a Tensor: each is
    read by address); with a packed stack both of an adaptor's weights must be held alike (one csrc kind per call)."""
    model = Janus.from_preset("tiny", seed=0)
    eng = Engine.for_requests(model, [(8, 1)])
    dec, llm = eng.runner.cpu_decoder, model.llm
    ws = [tuple(w.detach() for w in (l.input_norm.weight, l.attn.qkv_proj.weight, l.attn.o_proj.weight,
                                     l.post_attn_norm.weight, l.mlp.gate_up_proj.weight, l.mlp.down_proj.weight))
          for l in llm.layers]
    caches = [(eng.cache.k_cache(i), eng.cache.v_cache(i)) for i in range(len(llm.layers))]
    stack = cpu_step.DecodeStack(ws, caches, llm.layers[0].input_norm.eps, llm.norm.weight.detach(), llm.norm.eps,
                                 packed=False)
    mixed = lambda m: (m.fc1.weight, m.fc1.bias.detach(), m.fc2.weight.detach(), m.fc2.bias.detach())
    step = cpu_step.ImageStep(stack, model.gen_embed.weight.detach(), mixed(model.gen_aligner), mixed(model.gen_head),
                              dec.cos, dec.sin)
    assert step.adaptor_kind == 0
    if dec.stack.packed and cpu_ops.int8_available():
        h = model.gen_head
        unlike = (cpu_ops.PackedWeight(h.fc1.weight.detach()), h.fc1.bias.detach(),
                  cpu_ops.Int8Weight(h.fc2.weight.detach()), h.fc2.bias.detach())
        with pytest.raises(ValueError, match="held alike"):
            cpu_step.ImageStep(dec.stack, model.gen_embed.weight.detach(), dec.gen_aligner_packed, unlike, dec.cos,
                               dec.sin)


def _count_steps_per_call(eng) -> list:
    """Record k of every ImageStep.steps call of the engine's CPU decoder."""
    calls, step = [], eng.runner.cpu_decoder.image_step_runner
    step.steps = lambda *a, f=step.steps: calls.append(len(a[3])) or f(*a)
    return calls


def _two_requests_then_a_third(eng, model, ns, lens, steps_before_third) -> list:
    """Adds two image requests (n = ns[i] images of lens[i] tokens: seeded, greedy), runs steps_before_third engine
    steps, adds a third (seeded, top-k), runs the engine to the end -> the three requests."""
    t = model.cfg.tokens
    prompts = [[t.bos_id, 5, 9, t.boi_id], [t.bos_id, 21, 22, 23, t.boi_id], [t.bos_id, 7, t.boi_id]]
    params = [SamplingParams(seed=1), SamplingParams(greedy=True), SamplingParams(seed=3, top_k=20)]
    reqs = [eng.add_image_request(prompts[i], n=ns[i], params=params[i], num_tokens=lens[i]) for i in range(2)]
    for _ in range(steps_before_third):
        eng.step()
    reqs.append(eng.add_image_request(prompts[2], n=ns[2], params=params[2], num_tokens=lens[2]))
    eng.run()
    return reqs


def test_image_step_continuous_batching():
    """Requests that finish at different steps and one admitted mid-run: the csrc image step (its buffers and row
    tensors rebuilt as the batch changes) gives every request the op-by-op step's tokens."""
    model = Janus.from_preset("tiny", seed=8)
    runs = []
    for fast in (True, False):
        # one step per engine step, so that the third request arrives mid-run (multi-step: the test below)
        eng = Engine.for_requests(model, [(5, 3), (5, 1), (5, 2)], max_steps_per_call=1)
        calls = []  # steps per csrc call
        if fast:
            calls = _count_steps_per_call(eng)
        else:
            eng.runner.cpu_decoder.image_steps_possible = lambda *a: False
        reqs = _two_requests_then_a_third(eng, model, ns=(3, 1, 2), lens=(9, 5, 7), steps_before_third=4)
        runs.append(([r.tokens for r in reqs], sum(calls), eng.stats.decode_steps))
    (fast_tokens, fast_steps, steps), (ref_tokens, _, ref_steps) = runs
    assert fast_tokens == ref_tokens
    assert fast_steps == steps == ref_steps >= 8  # every decode step took the csrc path


def test_image_steps_multi_step():
    """Multi-step decode (several CPU image steps per engine step, ImageStep.steps) gives every request the tokens of
    one step per call under continuous batching: requests of different lengths (no call runs past the first to
    finish: the calls end exactly where a request does) and one added while another runs."""
    model = Janus.from_preset("tiny", seed=9)
    runs = []
    for k in (1, 8):
        eng = Engine.for_requests(model, [(5, 2), (5, 1), (5, 1)], max_steps_per_call=k)
        calls = _count_steps_per_call(eng)
        reqs = _two_requests_then_a_third(eng, model, ns=(2, 1, 1), lens=(21, 13, 17), steps_before_third=3)
        eng.bm.check_invariants()
        assert eng.bm.num_free_blocks == eng.bm.num_blocks
        runs.append(([r.tokens for r in reqs], calls, eng.stats.decode_steps))
    (one, calls1, steps1), (multi, calls8, steps8) = runs
    assert [[len(x) for x in r] for r in multi] == [[21, 21], [13], [17]]
    assert multi == one
    assert calls1 == [1] * steps1 and sum(calls8) == steps8
    # prefill gives token 1 of the first two; 8 steps (to 9), 4 (the second ends at 13), then the third's prefill
    # (its token 1 while the first is at 13) and 8 steps to 21 / 9, then 8 more for the third
    assert calls8 == [8, 4, 8, 8]


def test_image_steps_stop_where_the_pool_runs_out():
    """A multi-step call takes only the steps whose KV slots the pool can append (no preemption for the extra
    steps), and the request's tokens are those of one step per call."""
    model = Janus.from_preset("tiny", seed=9)
    t = model.cfg.tokens
    runs = []
    for k in (1, 8):
        eng = Engine(model, block_size=4, max_num_blocks=64, max_steps_per_call=k)
        calls = _count_steps_per_call(eng)
        req = eng.add_image_request([t.bos_id, 5, 9, t.boi_id], n=1, params=SamplingParams(seed=4), num_tokens=30)
        eng.step()  # prefill: each row holds its prompt's one full block
        # leave 2 free blocks: the 2 rows' next tokens (positions 4-7) fit in one new block each, position 8 does not
        eng.bm.allocate(("hold",), (eng.bm.num_free_blocks - 2) * 4)
        eng.step()
        assert calls == [min(k, 4)] and req.step == 1 + min(k, 4)
        eng.bm.free(("hold",))
        eng.run()
        runs.append(req.tokens)
    assert runs[0] == runs[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_image_steps_csrc_loop_matches_python_loop(dtype, monkeypatch):
    """ImageStep.steps' one csrc call for k steps (csrc/image_steps.cpp, its plan built by cpu_ops) gives the tokens
    of its per-op Python loop (what it runs under torch.profiler), for requests of different n and settings."""
    assert cpu_ops._ext().image_steps_plan_len() == len(cpu_step.ImageStep.PLAN)
    model = Janus.from_preset("tiny", seed=11, dtype=dtype)
    t = model.cfg.tokens
    prompts = [[t.bos_id, 5, 9, 30, t.boi_id], [t.bos_id, 11, t.boi_id]]
    params = [SamplingParams(seed=2, temperature=0.9, top_k=40, top_p=0.95), SamplingParams(greedy=True, cfg_weight=3)]
    runs = []
    for in_python in (False, True):
        monkeypatch.setattr(cpu_step.ImageStep, "loop_in_python", in_python)
        eng = Engine.for_requests(model, [(len(p), n) for p, n in zip(prompts, (3, 2))])
        calls = _count_steps_per_call(eng)
        reqs = [eng.add_image_request(p, n=n, params=sp, num_tokens=19) for p, n, sp in zip(prompts, (3, 2), params)]
        eng.run()
        assert max(calls) == 8
        runs.append([r.tokens for r in reqs])
    assert runs[0] == runs[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unpacked_lm_head_logits_do_not_depend_on_the_rows_beside(monkeypatch, dtype):
    """The CPU decoder's LM head unpacked (JANUS_RT_PACKED=0, or a packed copy that does not fit): a text row's
    logits beside 39 others are bit for bit its logits alone (above 32 rows ops.linear took torch's matmul, whose
    fp32 last bits differ: a text request's logits depended on how many text requests shared its step)."""
    monkeypatch.setenv("JANUS_RT_PACKED", "0")
    model = Janus.from_preset("tiny", seed=0, dtype=dtype)
    dec = Engine(model, block_size=16, max_num_blocks=64).runner.cpu_decoder
    assert dec.lm_head_packed is None
    h = torch.randn(40, model.cfg.llm.hidden_size, generator=torch.Generator().manual_seed(1)).to(dtype)
    with ops.use_backend("cpu"):
        alone, beside = dec.lm_head(h[:1]), dec.lm_head(h)
    assert torch.equal(alone[0], beside[0]) and beside.shape == (40, model.cfg.llm.vocab_size)
