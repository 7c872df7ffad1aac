"""A model whose LLM projections are held only packed (Janus.pack_for_cpu_, janus_rt/models/packed_linear.py):
the originals are gone, every path gives the unpacked model's results, and what needs [N, K] weights says so."""
import gc
import weakref

import pytest
import torch

from janus_rt import Janus, cpu_ops
from janus_rt.engine import Engine
from janus_rt.engine.roofline import decode_step_bytes_flops
from janus_rt.engine.cpu_decode import pack_in_place
from janus_rt.models.packed_linear import PROJECTIONS, PackedLinear, can_pack, packed_nbytes
from tolerances import max_err

pytestmark = pytest.mark.skipif(not cpu_ops.available(), reason="janus_rt._C not built")
needs_packed = pytest.mark.skipif(not cpu_ops.packed_available(torch.bfloat16),
                                  reason="no packed bf16 GEMV: CPU without AVX512_BF16")
DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=needs_packed)]


def _pair(dtype, seed=0):
    """(the tiny preset as loaded, the same weights packed in place)."""
    return Janus.from_preset("tiny", seed=seed, dtype=dtype), Janus.from_preset("tiny", seed=seed, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_replaces_the_originals(dtype):
    """Each layer's four projections and the (untied) LM head become PackedLinear, the [N, K] tensors are freed
    (nothing else holds them), the parameter count is kept, and packing twice is a no-op."""
    model = Janus.from_preset("tiny", seed=0, dtype=dtype)
    n_params, n_tensors = model.num_parameters(), len(list(model.parameters()))
    originals = [weakref.ref(getattr(getattr(l, part), name).weight) for l in model.llm.layers for part, name in
                 PROJECTIONS] + [weakref.ref(model.lm_head.weight)]
    need = packed_nbytes(model)
    assert need > 0 and not model.is_packed
    assert model.pack_for_cpu_() is model and model.is_packed
    gc.collect()
    assert all(r() is None for r in originals)
    assert len(list(model.parameters())) == n_tensors - len(originals)  # no longer parameters ...
    assert model.num_parameters() == n_params  # ... but still counted
    assert packed_nbytes(model) == 0  # nothing left to copy
    qkv, head = model.llm.layers[0].attn.qkv_proj, model.lm_head
    assert isinstance(qkv, PackedLinear) and "packed" in repr(qkv) and isinstance(head, PackedLinear)
    assert model.device.type == "cpu" and model.dtype == dtype
    model.pack_for_cpu_()
    assert model.llm.layers[0].attn.qkv_proj is qkv and model.lm_head is head


@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_model_logits_match(dtype):
    """text_logits (prefill rows through the packed GEMM) and image_logits equal the unpacked model's up to
    summation order: fp32 within 1e-4 of the largest logit; bf16 (activations rounded to bf16 in every layer, where
    another summation order can flip a rounding) no further from the fp32 model than twice the unpacked bf16 model
    is (the suite's rule, tests/tolerances.py)."""
    ref, packed = _pair(dtype)
    packed.pack_for_cpu_()
    exact = Janus.from_preset("tiny", seed=0) if dtype != torch.float32 else None  # the same weights in fp32
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, ref.cfg.llm.vocab_size, (2, 11), generator=g)
    img = torch.randint(0, ref.cfg.vq.codebook_size, (2, 9), generator=g)
    with torch.inference_mode():
        for fn in ("text_logits", "image_logits"):
            args = (ids,) if fn == "text_logits" else (ids, img)
            a, b = getattr(ref, fn)(*args).float(), getattr(packed, fn)(*args).float()
            assert a.shape == b.shape
            if exact is None:
                assert max_err(a, b) <= 1e-4 * a.abs().max(), fn
            else:
                e = getattr(exact, fn)(*args)
                assert max_err(b, e) <= 2 * max_err(a, e), fn


def test_packed_model_generates_the_same_tokens():
    """fp32: greedy and seeded image tokens and a greedy text answer equal the unpacked model's, and the engine
    holds the model's own packed weights (no copy)."""
    ref, packed = _pair(torch.float32, seed=2)
    packed.pack_for_cpu_()
    prompt = [ref.cfg.tokens.bos_id, 10, 11, 12, 13, ref.cfg.tokens.boi_id]
    for greedy in (True, False):
        want = ref.generate_image_tokens(prompt, n=3, seed=5, greedy=greedy)
        assert torch.equal(packed.generate_image_tokens(prompt, n=3, seed=5, greedy=greedy), want)
    q = [ref.cfg.tokens.bos_id, 40, 41, 42, 43]
    assert packed.generate_text(q, max_new_tokens=6) == ref.generate_text(q, max_new_tokens=6)
    stack = Engine.for_requests(packed, [(8, 1)]).runner.cpu_decoder.stack
    assert stack.packed
    assert stack._held[0][1].data_ptr() == packed.llm.layers[0].attn.qkv_proj.weight.data.data_ptr()


def test_engine_reads_the_lm_head_packed(monkeypatch):
    """Where the CPU decoder packs a copy of the decoder weights it packs the (untied) LM head too, and the engine's
    text logits (the prefill's last position, every decode step) go through it: fp32 logits within summation order
    of F.linear, the same greedy answer as the model's own generate_text path without the engine's copy."""
    model = Janus.from_preset("tiny", seed=4)
    eng = Engine.for_requests(model, [(20, 0)])
    dec = eng.runner.cpu_decoder
    if not dec.stack.packed:
        pytest.skip("the engine made no packed copy here (memory)")
    assert isinstance(dec.lm_head_packed, cpu_ops.PackedWeight)
    h = torch.randn(3, model.cfg.llm.hidden_size, generator=torch.Generator().manual_seed(0))
    want = torch.nn.functional.linear(h, model.lm_head.weight)
    assert max_err(dec.lm_head(h), want) <= 1e-5 * want.abs().max()
    calls = []
    real = dec.lm_head
    monkeypatch.setattr(dec, "lm_head", lambda x: calls.append(x.shape[0]) or real(x))
    q = [model.cfg.tokens.bos_id, 40, 41, 42, 43]
    req = eng.add_text_request(q, max_new_tokens=5)
    eng.run()
    assert calls == [1] * 5  # the prefill's token and four decode steps
    monkeypatch.setenv("JANUS_RT_PACKED", "0")  # an engine without packed copies: the plain LM head
    assert model.generate_text(q, max_new_tokens=5) == req.tokens[0]


def test_packed_model_refuses_what_needs_the_originals(monkeypatch, tmp_path):
    """Saving, a transformers copy and the unpacked decode GEMV need [N, K] weights: each says so."""
    from janus_rt.loading import save_janus

    model = Janus.from_preset("tiny", seed=0).pack_for_cpu_()
    with pytest.raises(ValueError, match="packed for the CPU"):
        save_janus(model, tmp_path / "out")
    monkeypatch.setenv("JANUS_RT_PACKED", "0")
    with pytest.raises(ValueError, match="pack_for_cpu_"):
        Engine.for_requests(model, [(8, 1)])
    pytest.importorskip("transformers")
    from janus_rt.verify import to_transformers

    with pytest.raises(ValueError, match="packed for the CPU"):
        to_transformers(model)


def test_pack_without_the_bf16_gemv_is_a_clear_error(monkeypatch):
    """A build without the packed bf16 GEMV (no AVX512_BF16) refuses bf16 packing by name (made so here where the
    build has it)."""
    real = cpu_ops.packed_available
    monkeypatch.setattr(cpu_ops, "packed_available",
                        lambda dtype=torch.bfloat16: dtype == torch.float32 and real(dtype))
    model = Janus.from_preset("tiny", seed=0, dtype=torch.bfloat16)
    assert "AVX512_BF16" in can_pack(model)
    with pytest.raises(ValueError, match="AVX512_BF16"):
        model.pack_for_cpu_()


def test_pack_in_place_policy(monkeypatch):
    """The CLI's rule (engine.cpu_decode.pack_in_place): `always` packs; otherwise only where the engine's copy
    would not get half of the available memory; JANUS_RT_PACKED=0 never."""
    model = Janus.from_preset("tiny", seed=0)
    assert pack_in_place(model) is None and not model.is_packed  # a few MB: the copy fits
    monkeypatch.setattr(cpu_ops, "available_memory", lambda: 1 << 10)
    monkeypatch.setenv("JANUS_RT_PACKED", "0")
    assert pack_in_place(model) is None and not model.is_packed
    monkeypatch.delenv("JANUS_RT_PACKED")
    said = pack_in_place(model)
    assert model.is_packed and "would not fit" in said
    assert pack_in_place(model) is None  # already packed
    other = Janus.from_preset("tiny", seed=0)
    monkeypatch.undo()
    assert "saves" in pack_in_place(other, always=True) and other.is_packed


def test_roofline_counts_packed_weights():
    """The benchmark's roofline reads the packed projections as the weights they replaced."""
    ref, packed = _pair(torch.float32)
    packed.pack_for_cpu_()
    assert decode_step_bytes_flops(packed, 8, 300) == decode_step_bytes_flops(ref, 8, 300)


def test_linear_takes_held_weights_and_names_anything_else():
    """ops.linear multiplies by a tensor, a cpu_ops.PackedWeight, or an object that says it is a held weight
    (`held_for_linear`, as models.packed_linear.OneDNNWeight): called as w(x, bias). Anything else is a TypeError
    that names its type."""
    from janus_rt import ops

    class Held:
        held_for_linear = True

        def __call__(self, x, bias=None):
            return x * 2 + (0 if bias is None else bias)

    x = torch.randn(3, 4)
    assert torch.equal(ops.linear(x, Held(), torch.ones(4)), x * 2 + 1)
    with pytest.raises(TypeError, match="not object"):
        ops.linear(x, object())
