"""Weight-only int8 on the CPU (cpu_ops.quantize_int8 / Int8Weight, csrc/int8_gemv.h, Janus.pack_for_cpu_(int8=True)):
the quantizer's error bound, the GEMV against the dequantized weights, and a whole model that is bit-identical to
the bf16 packed one where the int8 weights are exact (power-of-two row scales)."""
import pytest
import torch

from janus_rt import Janus, cpu_ops
from janus_rt.engine import Engine
from janus_rt.engine.cpu_decode import pack_in_place
from janus_rt.engine.roofline import decode_step_bytes_flops
from janus_rt.errors import UsageError
from janus_rt.models.packed_linear import GEN_ADAPTORS, PROJECTIONS, Int8Linear, int8_heads, is_int8
from engine_runs import amx_routes, assert_mix_refused

pytestmark = pytest.mark.skipif(not cpu_ops.int8_available(),
                                reason="no int8 GEMV: extension not built, or a CPU without AVX512_BF16")
ROUTES = amx_routes(cpu_ops.amx_available(), "AMX", "avx512")  # AMX-BF16 tiles, and the AVX512-BF16 kernel


def test_quantize_int8_bounds_and_edges():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 50, generator=g) * torch.rand(37, 1, generator=g) * 3
    w[5] = 0.0
    q, s = cpu_ops.quantize_int8(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and q.shape == w.shape and s.shape == (37,)
    assert int(q.abs().max()) == 127 and bool((q.abs().amax(dim=1)[s > 0] == 127).all())  # each row uses its range
    err = (q.float() * s[:, None] - w).abs()
    assert bool((err <= s[:, None] / 2 * (1 + 1e-6) + 1e-12).all())  # round to nearest: half a step at most
    assert s[5] == 0 and bool((q[5] == 0).all())
    for bad in (torch.tensor([[1.0, float("inf")]]), torch.tensor([[float("nan"), 0.0]])):
        with pytest.raises(ValueError, match="finite"):
            cpu_ops.quantize_int8(bad)
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        cpu_ops.quantize_int8(torch.zeros(4))


def _pow2_rows(w: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """w's rows on an int8 grid with power-of-two steps, each row reaching +-127 steps: quantize_int8 then gives
    exactly these values back (scale = the step), and they are exact in bf16."""
    step = torch.exp2(torch.floor(torch.log2(w.abs().amax(dim=1).clamp_min(1e-30) / 127)))
    q = torch.round(w / step[:, None]).clamp(-127, 127)
    q[torch.arange(w.shape[0]), torch.randint(0, w.shape[1], (w.shape[0],), generator=g)] = 127.0
    return (q * step[:, None]).to(w.dtype)


@pytest.mark.parametrize("route", ROUTES, indirect=True)
@pytest.mark.parametrize("M,N,K", [(1, 64, 32), (3, 100, 64), (16, 130, 96), (17, 64, 160), (32, 200, 256),
                                   (33, 70, 34), (70, 5, 2), (5, 129, 600), (65, 130, 160), (100, 64, 64)])
def test_int8_linear_matches_the_dequantized_weight(route, M, N, K):
    """y = x @ (q * s)^T + bias within fp32 summation order (products exact, one sum per element), and within the
    quantization's own bound of x @ W^T; each row bit-identical to the row alone (batch invariance)."""
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    w = torch.randn(N, K, generator=g)
    x = torch.randn(M, K, generator=g).bfloat16()
    bias = torch.randn(N, generator=g) if M % 2 else None
    iw = cpu_ops.Int8Weight(w)
    q, s = cpu_ops.quantize_int8(w)
    y = iw(x, bias)
    xd = x.double()
    want = xd @ (q.double() * s.double()[:, None]).T + (0 if bias is None else bias.double())
    scale = xd.abs() @ (q.double().abs() * s.double()[:, None]).T
    assert bool(((y.double() - want).abs() <= 1e-6 * scale + 1e-6).all())
    exact = xd @ w.double().T + (0 if bias is None else bias.double())
    assert bool(((y.double() - exact).abs() <= xd.abs() @ (s.double()[:, None] / 2).expand(N, K).T * 1.001
                 + 1e-6 * scale + 1e-6).all())
    for m in (0, M - 1):
        assert torch.equal(iw(x[m:m + 1], bias)[0], y[m])


@pytest.mark.parametrize("route", ROUTES, indirect=True)
def test_int8_equals_bf16_on_power_of_two_scales(route):
    """Where W is exactly q * 2^e per row, the int8 GEMV and the packed bf16 one give bit-identical y (the same
    products in the same order, scaled by a power of two)."""
    g = torch.Generator().manual_seed(3)
    for M, N, K in [(2, 96, 64), (32, 130, 128), (40, 64, 66), (70, 100, 96)]:  # (70 rows: a prefill's path)
        w = _pow2_rows(torch.randn(N, K, generator=g), g).bfloat16()
        x = torch.randn(M, K, generator=g).bfloat16()
        assert torch.equal(cpu_ops.Int8Weight(w)(x), cpu_ops.PackedWeight(w)(x))


def _pow2_pair(seed: int):
    """(the tiny preset in bf16 with every LLM projection, the LM head and the generation adaptors' weights on a
    power-of-two int8 grid, packed bf16; the same weights held int8)."""
    g = torch.Generator().manual_seed(seed)
    models = [Janus.from_preset("tiny", seed=seed, dtype=torch.bfloat16) for _ in range(2)]
    linears = lambda m: ([getattr(getattr(l, part), name) for l in m.llm.layers for part, name in PROJECTIONS]
                         + [getattr(parent, name) for _, parent, name in int8_heads(m, "weights")])
    with torch.no_grad():
        for mods in zip(*(linears(m) for m in models)):
            w = _pow2_rows(mods[0].weight.float(), g).bfloat16()
            for m in mods:
                m.weight.copy_(w)
    return models[0].pack_for_cpu_(), models[1].pack_for_cpu_(int8=True)


@pytest.mark.parametrize("route", ROUTES, indirect=True)
def test_int8_model_is_the_bf16_model_where_int8_is_exact(route):
    """On weights int8 represents exactly, the int8 model is the bf16 packed model: the same logits (prefill) and
    the same greedy and seeded image tokens and text answer through the engine (its csrc image step, multi-step)."""
    ref, q8 = _pow2_pair(seed=1)
    assert is_int8(q8) and not is_int8(ref) and isinstance(q8.llm.layers[0].mlp.down_proj, Int8Linear)
    g = torch.Generator().manual_seed(2)
    with torch.inference_mode():
        for length in (11, 45):  # 22 and 90 rows through the projections (90: more than one group of 32)
            ids = torch.randint(3, ref.cfg.llm.vocab_size, (2, length), generator=g)
            assert torch.equal(q8.text_logits(ids), ref.text_logits(ids))
    prompt = [ref.cfg.tokens.bos_id, 10, 11, 12, 13, ref.cfg.tokens.boi_id]
    for greedy in (True, False):
        want = ref.generate_image_tokens(prompt, n=2, seed=5, greedy=greedy, cfg_weight=3.0, progress=False)
        assert torch.equal(q8.generate_image_tokens(prompt, n=2, seed=5, greedy=greedy, cfg_weight=3.0,
                                                    progress=False), want)
    q = [ref.cfg.tokens.bos_id, 40, 41, 42, 43]
    assert q8.generate_text(q, max_new_tokens=6) == ref.generate_text(q, max_new_tokens=6)
    dec = Engine.for_requests(q8, [(8, 1)]).runner.cpu_decoder
    assert dec.stack.int8 and dec.stack.weights_code == 2 and dec.image_step_runner is not None
    assert dec.stack._held[0][1].data_ptr() == q8.llm.layers[0].attn.qkv_proj.weight.data.data_ptr()  # no copy


def test_decode_stack_takes_all_int8_or_none():
    assert_mix_refused(cpu_ops.Int8Weight, lambda w: cpu_ops.PackedWeight(w.detach()), "Int8Weight")


def test_pack_in_place_int8_and_what_it_refuses(monkeypatch):
    """--int8's set-up: quantizes always (and says how much it saved); refuses an fp32 model, JANUS_RT_PACKED=0 and
    projections already held another way, as UsageErrors; the roofline counts a byte per int8 weight."""
    ref = Janus.from_preset("tiny", seed=0, dtype=torch.bfloat16)
    model = Janus.from_preset("tiny", seed=0, dtype=torch.bfloat16)
    said = pack_in_place(model, int8=True)
    assert is_int8(model) and "int8" in said and " -> " in said
    assert pack_in_place(model, int8=True) is None  # already int8
    (b8, f8), (b16, f16) = decode_step_bytes_flops(model, 8, 300), decode_step_bytes_flops(ref, 8, 300)
    # the projections and the generation adaptors (the image step's; the LM head is not read there)
    ws = ([getattr(getattr(l, p), n).weight for l in ref.llm.layers for p, n in PROJECTIONS]
          + [getattr(getattr(ref, a), fc).weight for a in GEN_ADAPTORS for fc in ("fc1", "fc2")])
    proj, rows = sum(w.numel() for w in ws), sum(w.shape[0] for w in ws)
    assert f8 == f16 and b16 - b8 == proj - 4 * rows  # 2 bytes -> 1 a weight, plus 4 a row of scales
    with pytest.raises(UsageError, match="bf16"):
        pack_in_place(Janus.from_preset("tiny", seed=0), int8=True)
    with pytest.raises(UsageError, match="another layout"):
        pack_in_place(Janus.from_preset("tiny", seed=0, dtype=torch.bfloat16).pack_for_cpu_(), int8=True)
    monkeypatch.setenv("JANUS_RT_PACKED", "0")
    with pytest.raises(UsageError, match="JANUS_RT_PACKED=0"):
        pack_in_place(Janus.from_preset("tiny", seed=0, dtype=torch.bfloat16), int8=True)
    # where the int8 GEMV cannot use AMX it says that int8 saves memory there, not time (measured on Zen 5)
    monkeypatch.delenv("JANUS_RT_PACKED")
    for amx in (True, False):
        monkeypatch.setattr(cpu_ops, "amx_available", lambda: amx)
        said = pack_in_place(Janus.from_preset("tiny", seed=0, dtype=torch.bfloat16), int8=True)
        assert ("without AMX" in said and "not time" in said) == (not amx), said


def test_cli_int8(tmp_path, capsys, monkeypatch):
    """`janus-rt generate --int8` quantizes (bf16 implied; --dtype bfloat16 too) and says so, and its PNGs say int8;
    --int8 with fp32 or with JANUS_RT_PACKED=0 is refused up front."""
    from janus_rt import cli
    from janus_rt.processing import png_parameters

    cli.main(["generate", "--model", "tiny", "--int8", "-n", "1", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert "weight-only int8" in err and png_parameters(tmp_path / "o" / "img_00_00.png")["weights"] == "int8"
    cli.main(["generate", "--model", "tiny", "--dtype", "bfloat16", "--int8", "-n", "1", "--out", str(tmp_path / "b")])
    cli.main(["generate", "--model", "tiny", "--dtype", "bf16", "-n", "1", "--out", str(tmp_path / "c")])
    assert "weights" not in png_parameters(tmp_path / "c" / "img_00_00.png")
    with pytest.raises(SystemExit, match="--int8 takes bf16"):
        cli.main(["generate", "--model", "tiny", "--int8", "--dtype", "fp32", "--out", str(tmp_path / "p")])
    monkeypatch.setenv("JANUS_RT_PACKED", "0")
    with pytest.raises(SystemExit, match="JANUS_RT_PACKED=0"):
        cli.main(["generate", "--model", "tiny", "--int8", "--out", str(tmp_path / "q")])


def test_a_weight_that_is_not_finite_leaves_the_model_as_it_was():
    """pack_for_cpu_(int8=True) checks every projection (and head) before it replaces any: a non-finite weight is
    named in the error and the model keeps its bf16 projections (the CLI's pack_in_place says it as a UsageError)."""
    model = Janus.from_preset("tiny", seed=0, dtype=torch.bfloat16)
    with torch.no_grad():
        model.llm.layers[-1].mlp.down_proj.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.down_proj\.weight has inf or nan"):
        model.pack_for_cpu_(int8=True)
    assert not is_int8(model) and not model.is_packed
    with pytest.raises(UsageError, match="--int8: .*inf or nan"):
        pack_in_place(model, int8=True)
    model = Janus.from_preset("tiny", seed=0, dtype=torch.bfloat16)  # the same for a head held int8 with them
    with torch.no_grad():
        model.gen_head.fc2.weight[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"gen_head\.fc2\.weight has inf or nan"):
        model.pack_for_cpu_(int8=True)
    assert not is_int8(model) and not model.is_packed and isinstance(model.lm_head, torch.nn.Linear)


def test_int8_refuses_a_model_held_for_onednn():
    from janus_rt.models.packed_linear import onednn_available, onednn_pack_llm_

    model = Janus.from_preset("tiny", seed=0, dtype=torch.bfloat16)
    if not onednn_available(model):
        pytest.skip("torch without oneDNN's prepacked linear")
    onednn_pack_llm_(model)
    with pytest.raises(ValueError, match="oneDNN"):
        model.pack_for_cpu_(int8=True)


def test_serve_int8_holds_the_model_int8():
    """`janus-rt serve --int8`: the server's model (and so its engine) runs the int8 projections."""
    from janus_rt.cli import make_server, parser

    args = parser().parse_args(["serve", "--model", "tiny", "--device", "cpu", "--kv-cache-gb", "0.01", "--port", "0",
                                "--int8"])
    srv, _ = make_server(args)
    try:
        assert is_int8(srv.model) and srv.bg.engine.runner.cpu_decoder.stack.int8
    finally:
        srv.server_close()
        srv.bg.close()


def test_mlp_gelu_refuses_weights_held_unlike():
    """mlp_gelu (and so the image step's adaptors) runs one GEMV for both layers: w1 and w2 held differently (int8
    and packed bf16, or weight-only int8 and W8A8) and an fp32 x for int8 weights are errors, not bytes of one layout
    read as another's."""
    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(128, 64, generator=g).bfloat16(), torch.randn(32, 128, generator=g).bfloat16()
    x = torch.randn(2, 64).bfloat16()
    with pytest.raises(ValueError, match="held alike"):
        cpu_ops.mlp_gelu(x, cpu_ops.Int8Weight(w1), None, cpu_ops.PackedWeight(w2), None)
    if cpu_ops.w8a8_available():
        with pytest.raises(ValueError, match="held alike"):
            cpu_ops.mlp_gelu(x, cpu_ops.Int8Weight(w1), None, cpu_ops.W8A8Weight(w2), None)
    with pytest.raises(ValueError, match="x is torch.float32"):
        cpu_ops.mlp_gelu(x.float(), cpu_ops.Int8Weight(w1), None, cpu_ops.Int8Weight(w2), None)


def test_quantize_int8_tiny_rows_and_bad_scales():
    """Rows far below fp32's normal range keep the error bound; from_quantized refuses non-finite or negative
    scales; an empty weight is a ValueError."""
    w = torch.tensor([[1e-37, -5e-38, 3e-38, 0.0], [1e-40, 0.0, -1e-40, 2e-41]])
    q, s = cpu_ops.quantize_int8(w)
    assert int(q[0, 0]) == 127 and int(q[1].abs().max()) == 127
    assert bool(((q.double() * s.double()[:, None] - w.double()).abs() <= s.double()[:, None] / 2 * 1.01).all())
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="scales"):
            cpu_ops.Int8Weight.from_quantized(torch.ones(2, 4, dtype=torch.int8), torch.tensor([1.0, bad]))
    with pytest.raises(ValueError, match="non-empty"):
        cpu_ops.Int8Weight(torch.randn(4, 0))


def test_bench_understand_int8(tmp_path):
    """bench/bench_understand.py --int8 on the tiny preset (bf16 implied): the row says int8, its decode roofline
    counts the int8 projections and LM head at a byte each (+ 4 a row of scales), and its prefill FLOPs are the bf16
    model's (held weights counted too)."""
    import json

    import bench_scripts

    bu = bench_scripts.load("bench_understand")
    out = tmp_path / "rows.jsonl"
    row = bu.main(bu.build_parser().parse_args(["--preset", "tiny", "--device", "cpu", "--new-tokens", "4",
                                                "--repeats", "1", "--int8", "--no-transformers", "--json", str(out)]))
    assert json.loads(out.read_text().splitlines()[-1]) == row
    assert row["weights"] == "int8 (LLM projections and heads)" and row["dtype"] == "bfloat16"
    ref = Janus.from_preset("tiny", seed=0, dtype=torch.bfloat16)
    q8 = Janus.from_preset("tiny", seed=0, dtype=torch.bfloat16).pack_for_cpu_(int8=True)
    (b16, f16), (b8, f8) = bu.decode_bytes_flops(ref, 100), bu.decode_bytes_flops(q8, 100)
    ws = [getattr(getattr(l, p), n).weight for l in ref.llm.layers for p, n in PROJECTIONS] + [ref.lm_head.weight]
    assert f8 == f16 and b16 - b8 == sum(w.numel() for w in ws) - 4 * sum(w.shape[0] for w in ws)
    assert bu.prefill_flops(q8, 100) == bu.prefill_flops(ref, 100)
