"""W8A8 on the CPU (`--int8 w8a8`: cpu_ops.W8A8Weight, csrc/w8a8_gemv.h, Janus.pack_for_cpu_(int8="w8a8")): the
activations' quantizer (per row and group of 512), the GEMV bit-identical to its PyTorch reference at odd shapes and
for any number of rows, its error against the float product, and the engine and CLI end to end."""
import pytest
import torch

from janus_rt import Janus, cpu_ops
from janus_rt.config import tiny_config
from janus_rt.engine.cpu_decode import pack_in_place
from janus_rt.errors import UsageError
from janus_rt.models.packed_linear import W8A8Linear, int8_kind, int8_mode
from engine_runs import amx_routes, assert_mix_refused, step_logits, two_image_requests
from tolerances import max_err

needs_w8a8 = pytest.mark.skipif(not cpu_ops.w8a8_available(),
                                reason="no W8A8 GEMV: extension not built, or a CPU without AVX512_VNNI/AVX512_BF16")
G = cpu_ops.W8A8_GROUP
# the AMX-INT8 route (from 4 rows, K a multiple of 64) and the VPDPBUSD one: the same bits
ROUTES = amx_routes(cpu_ops.amx_w8a8_available(), "AMX-INT8 route", "vnni")


def bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same fp32 bits (torch.equal takes -0 for +0)."""
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


# ---- the activations' quantizer (plain PyTorch: runs everywhere) ----------------------------------------------------
def test_quantize_activations_groups_and_bound():
    g = torch.Generator().manual_seed(0)
    M, K = 5, 2 * G + 37  # two whole groups and a partial one
    x = (torch.randn(M, K, generator=g) * torch.rand(M, 1, generator=g) * 4).bfloat16()
    x[1, G:2 * G] = 0.0  # an all-zero group
    x[2, 5] = 300.0  # an outlier: only its own group's step grows
    q, s = cpu_ops.quantize_activations(x)
    assert q.dtype == torch.int8 and q.shape == (M, K) and s.dtype == torch.float32 and s.shape == (M, 3)
    xf = x.float()
    for gi in range(3):
        cols = slice(gi * G, min(K, (gi + 1) * G))
        step = s[:, gi:gi + 1]
        assert bool(((q[:, cols].double() * step.double() - xf[:, cols].double()).abs() <= step * (0.5 + 1e-6)).all())
        live = s[:, gi] > 0
        assert bool((q[:, cols].abs().amax(dim=1)[live] == 127).all())  # each group uses its range
    assert s[1, 1] == 0 and bool((q[1, G:2 * G] == 0).all())
    assert s[2, 0] > 10 * s[2, 1]  # the outlier's group only
    y = x.clone()
    y[0, G + 3] = 1e3  # a change in group 1 leaves group 0's codes and scale alone
    q2, s2 = cpu_ops.quantize_activations(y)
    assert torch.equal(q2[:, :G], q[:, :G]) and torch.equal(s2[:, 0], s[:, 0]) and s2[0, 1] != s[0, 1]
    bad = x.clone()
    bad[3, 2 * G + 1] = float("inf")
    qb, sb = cpu_ops.quantize_activations(bad)
    assert torch.isnan(sb[3, 2]) and bool((qb[3, 2 * G:] == 0).all()) and torch.equal(sb[3, :2], s[3, :2])


def test_int8_mode_values():
    assert [int8_mode(v) for v in (None, False, True, "weights", "w8a8")] == [None, None, "weights", "weights", "w8a8"]
    with pytest.raises(ValueError, match="int8 must be"):
        int8_mode("int4")


# ---- the GEMV --------------------------------------------------------------------------------------------------------
@needs_w8a8
@pytest.mark.parametrize("route", ROUTES, indirect=True)
@pytest.mark.parametrize("M,N,K", [(1, 64, 32), (2, 100, 65), (3, 5, 3), (7, 130, 600), (16, 64, 512), (17, 200, 1030),
                                   (32, 70, 2048), (33, 129, 513), (70, 64, 96), (4, 63, 1), (300, 65, 1025),
                                   (5, 70, 4100), (13, 64, 5632),  # 2+ K tiles, a last group of 1 step
                                   # AMX-INT8 shapes (K a multiple of 64): 1 A tile, partial strips, a last row
                                   # group of 1 and of 15 rows, a K tile and a group cut short, a prefill's rows
                                   (4, 64, 64), (33, 129, 2048), (47, 70, 576), (20, 65, 2112), (140, 100, 1088),
                                   # passes of 4 full row blocks, then 1 or 3
                                   (80, 64, 128), (112, 65, 576)])
def test_w8a8_is_its_reference_bit_for_bit(route, M, N, K):
    """y is w8a8_reference's y exactly (padded K, partial strips and groups, every row-block size), each row the
    same alone as in the batch, and within the two roundings' bound of x @ W^T; on either route."""
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    w = torch.randn(N, K, generator=g)
    x = (torch.randn(M, K, generator=g) * torch.rand(M, 1, generator=g) * 3).bfloat16()
    bias = torch.randn(N, generator=g) if M % 2 else None
    ww = cpu_ops.W8A8Weight(w)
    q, s = cpu_ops.quantize_int8(w)
    y = ww(x, bias)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    assert bitwise(y, cpu_ops.w8a8_reference(x, q, s, bias))
    for m in {0, M // 2, M - 1}:
        assert bitwise(ww(x[m:m + 1], bias)[0], y[m])
    # |y - x W^T| <= |x| |W - Q s| + |x - X8 sx| |Q s| (+ fp32 rounding)
    codes, sx = cpu_ops.quantize_activations(x)
    xd, wq = x.double(), q.double() * s.double()[:, None]
    xq = codes.double() * sx.double().repeat_interleave(G, dim=1)[:, :K]
    exact = xd @ w.double().T + (0 if bias is None else bias.double())
    bound = xd.abs() @ (w.double() - wq).abs().T + (xd - xq).abs() @ wq.abs().T
    assert bool(((y.double() - exact).abs() <= bound * 1.001 + 1e-5 * (xd.abs() @ wq.abs().T) + 1e-5).all())


@needs_w8a8
@pytest.mark.parametrize("route", ROUTES, indirect=True)
def test_w8a8_special_values_bit_for_bit(route):
    """Rows and groups of zeros, a weight row of zeros, huge and subnormal x, codes landing on exact .5 ties, and a
    product that underflows to -0: the reference's bits, sign of zero included (no bias: nothing added)."""
    g = torch.Generator().manual_seed(7)
    N, K = 65, 1024 if route else 1030  # (K a multiple of 64: AMX-INT8's)
    w = torch.randn(N, K, generator=g)
    w[3] = 0.0
    x = torch.randn(9, K, generator=g)
    x[0] = 0.0  # a row of zeros
    x[1, G:2 * G] = 0.0  # a group of zeros
    x[2] *= 1e30  # huge (bf16 holds it)
    x[3] *= 1e-39  # subnormal in fp32, and their bf16 roundings
    x[4, :G] = torch.arange(G) % 9 - 4.0  # max 4 -> step 4/127: k/2 * step lands on ties
    x[4, 0] = 127.0 / 2 * (4.0 / 127)
    x = x.bfloat16()
    q, s = cpu_ops.quantize_int8(w)
    ww = cpu_ops.W8A8Weight.from_quantized(q, s)
    assert bitwise(ww(x), cpu_ops.w8a8_reference(x, q, s))
    # one weight row whose product with a tiny negative x underflows (4 rows of 64: the AMX route's too)
    tiny = torch.full((1, 64), 2.0**-40)
    xt = torch.zeros(4, 64)
    xt[:, 0] = -(2.0**-120)
    qt, st = cpu_ops.quantize_int8(tiny)
    y = cpu_ops.W8A8Weight.from_quantized(qt, st)(xt.bfloat16())
    want = cpu_ops.w8a8_reference(xt.bfloat16(), qt, st)
    assert bitwise(y, want) and torch.signbit(want).all()


@needs_w8a8
@pytest.mark.parametrize("route", ROUTES, indirect=True)
def test_w8a8_non_finite_x_poisons_its_row_only(route):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(70, 640, generator=g)
    x = torch.randn(4, 640, generator=g).bfloat16()
    ww = cpu_ops.W8A8Weight(w)
    q, s = cpu_ops.quantize_int8(w)
    clean = ww(x)
    assert bitwise(clean, cpu_ops.w8a8_reference(x, q, s))
    for bad in (float("inf"), float("nan")):
        xb = x.clone()
        xb[2, 550] = bad  # in the second group
        y = ww(xb)
        assert bool(torch.isnan(y[2]).all())
        assert torch.equal(y[[0, 1, 3]], clean[[0, 1, 3]])


@needs_w8a8
def test_w8a8_weight_checks_and_sizes():
    w = torch.randn(10, 6)
    q, s = cpu_ops.quantize_int8(w)
    a, b = cpu_ops.W8A8Weight(w), cpu_ops.W8A8Weight.from_quantized(q, s)
    x = torch.randn(3, 6).bfloat16()
    assert torch.equal(a(x), b(x)) and a.activations == "int8" and cpu_ops.Int8Weight(w).activations == "bf16"
    assert a.data.numel() == cpu_ops.W8A8Weight.nbytes(10, 6) == 64 * 8 + 4 * 64  # a strip, K padded to 8, scales
    with pytest.raises(ValueError, match="bfloat16"):
        a(torch.randn(3, 6))
    with pytest.raises(ValueError, match="end in K"):
        a(torch.randn(3, 5).bfloat16())


# ---- the model, the engine and the CLI -------------------------------------------------------------------------------
@needs_w8a8
@pytest.mark.parametrize("wide", [False, True])
def test_engine_w8a8_csrc_step_is_the_layer_by_layer_path(monkeypatch, wide):
    """A W8A8 model through the engine: the csrc decode step (W8A8 GEMV inside decode_layer, x quantized once by the
    team, image steps several a call) gives the layer-by-layer path's tokens (its projections: the same GEMV through
    ops.linear) and logits up to bf16 rounding; against the weight-only int8 model, logits within the activations'
    rounding, not equal. wide: hidden 576 and intermediate 1100, so decode_layer's x has several groups of 512."""
    monkeypatch.setenv("JANUS_RT_CPU_MATMUL", "csrc")
    cfg = tiny_config(hidden_size=576, intermediate_size=1100) if wide else tiny_config()
    model = Janus.from_config(cfg, seed=4, dtype=torch.bfloat16).pack_for_cpu_(int8="w8a8")
    assert int8_kind(model) == "w8a8" and isinstance(model.llm.layers[1].attn.qkv_proj, W8A8Linear)
    eng, fused = two_image_requests(model)
    stack = eng.runner.cpu_decoder.stack
    assert eng.runner.uses_cpu_decoder() and stack.w8a8 and stack.int8 and stack.weights_code == 4
    assert eng.runner.cpu_decoder.image_step_runner is not None
    # the generation adaptors and the LM head held W8A8 too, run as they are held (no bf16 copy)
    assert all(isinstance(m, W8A8Linear) for m in (model.lm_head, model.gen_head.fc1, model.gen_head.fc2,
                                                   model.gen_aligner.fc1, model.gen_aligner.fc2))
    assert eng.runner.cpu_decoder.image_step_runner.adaptor_kind == 4
    assert eng.runner.cpu_decoder.gen_head_packed[2] is model.gen_head.fc2.weight
    _, layerwise = two_image_requests(model, fused=False)
    weights_only = Janus.from_config(cfg, seed=4, dtype=torch.bfloat16).pack_for_cpu_(int8=True)
    assert int8_kind(weights_only) == "weights"
    _, w8 = two_image_requests(weights_only)
    for x, y, z in zip(fused, layerwise, w8):
        assert x.tokens == y.tokens
        # rare rounding flips between the two summation orders (measured 0 and 5.6e-5)
        assert max_err(step_logits(x), step_logits(y)) <= 2**-10 * step_logits(y).abs().max()
        first = lambda r: step_logits(r)[:1]  # the first step's logits: the same prompt, no sampled token in between
        assert 0 < max_err(first(x), first(z)) <= 0.1 * first(z).abs().max()


@needs_w8a8
def test_decode_stack_refuses_a_mix_of_int8_kinds():
    assert_mix_refused(cpu_ops.W8A8Weight, cpu_ops.Int8Weight, "W8A8Weight")


@needs_w8a8
def test_pack_in_place_w8a8_and_what_it_refuses():
    model = Janus.from_preset("tiny", seed=0, dtype=torch.bfloat16)
    said = pack_in_place(model, int8="w8a8")
    assert int8_kind(model) == "w8a8" and "W8A8" in said and " -> " in said
    assert pack_in_place(model, int8="w8a8") is None  # already held so
    with pytest.raises(UsageError, match="--int8: .*another layout"):
        pack_in_place(model, int8=True)
    with pytest.raises(ValueError, match="already held W8A8"):
        model.pack_for_cpu_(int8=True)
    held = Janus.from_preset("tiny", seed=0, dtype=torch.bfloat16).pack_for_cpu_(int8=True)
    with pytest.raises(UsageError, match="--int8 w8a8: .*another layout"):
        pack_in_place(held, int8="w8a8")
    with pytest.raises(UsageError, match="--int8 w8a8: .*bf16"):
        pack_in_place(Janus.from_preset("tiny", seed=0), int8="w8a8")


@needs_w8a8
def test_cli_int8_w8a8(tmp_path, capsys, monkeypatch):
    """`--int8 w8a8` quantizes weights and activations and says so (PNG info too); `--int8` alone stays
    weight-only; a build without the W8A8 GEMV is refused up front."""
    from janus_rt import cli
    from janus_rt.processing import png_parameters

    cli.main(["generate", "--model", "tiny", "--int8", "w8a8", "-n", "1", "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert "W8A8" in err and "activations" in err
    assert "W8A8" in png_parameters(tmp_path / "a" / "img_00_00.png")["weights"]
    cli.main(["generate", "--model", "tiny", "--int8", "-n", "1", "--out", str(tmp_path / "b")])
    assert png_parameters(tmp_path / "b" / "img_00_00.png")["weights"] == "int8"
    monkeypatch.setattr(cpu_ops, "w8a8_available", lambda: False)
    with pytest.raises(SystemExit, match="no W8A8 GEMV"):
        cli.main(["generate", "--model", "tiny", "--int8", "w8a8", "--out", str(tmp_path / "c")])
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        cli.main(["generate", "--model", "tiny", "--int8", "int4", "--out", str(tmp_path / "d")])


def test_projection_flops_counts_what_runs_int8():
    from janus_rt.engine.roofline import decode_step_bytes_flops, projection_flops

    model = Janus.from_preset("tiny", seed=0)
    c = model.cfg.llm
    qkv, o = c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim, c.num_heads * c.head_dim * c.hidden_size
    per_layer = qkv + o + c.hidden_size * 2 * c.intermediate_size + c.intermediate_size * c.hidden_size
    assert projection_flops(model, 6) == 2 * 6 * c.num_layers * per_layer
    assert projection_flops(model, 6) < decode_step_bytes_flops(model, 6, 10)[1]
    if cpu_ops.w8a8_available():  # held W8A8, the gen head's and gen aligner's linears are int8 multiplies too
        adaptors = sum(m.in_features * m.out_features for a in (model.gen_head, model.gen_aligner)
                       for m in (a.fc1, a.fc2))
        w8 = Janus.from_preset("tiny", seed=0, dtype=torch.bfloat16).pack_for_cpu_(int8="w8a8")
        assert projection_flops(w8, 6) == 2 * 6 * (c.num_layers * per_layer + adaptors)
        assert decode_step_bytes_flops(w8, 6, 10)[1] == decode_step_bytes_flops(model, 6, 10)[1]


def test_cli_int8_modes_match_the_models():
    from janus_rt import cli
    from janus_rt.models.packed_linear import INT8_MODES

    assert cli.INT8_MODES == INT8_MODES


@needs_w8a8
def test_bench_and_bench_understand_int8_w8a8(tmp_path):
    """`janus-rt bench --int8 w8a8` and bench/bench_understand.py --int8 w8a8 run the W8A8 decode step and say so in
    their rows; their rooflines count the int8 projections at a byte each."""
    import json

    import bench_scripts
    from janus_rt.cli import main

    out = tmp_path / "rows.jsonl"
    main(["bench", "--model", "tiny", "--device", "cpu", "--tokens", "4", "--repeats", "1", "--no-transformers",
          "--int8", "w8a8", "--json", str(out)])
    row = json.loads(out.read_text().splitlines()[-1])
    assert "W8A8" in row["weights"] and row["cpu_decode"].startswith("decode_layer, W8A8 GEMV")
    assert row["int8_matmul_gops"] > 0  # its roofline holds the projections to the int8 matmul peak
    bu = bench_scripts.load("bench_understand")
    row = bu.main(bu.build_parser().parse_args(["--preset", "tiny", "--device", "cpu", "--new-tokens", "4",
                                                "--repeats", "1", "--int8", "w8a8", "--no-transformers"]))
    assert "W8A8" in row["weights"] and row["dtype"] == "bfloat16"
    ref = Janus.from_preset("tiny", seed=0, dtype=torch.bfloat16)
    w8 = Janus.from_preset("tiny", seed=0, dtype=torch.bfloat16).pack_for_cpu_(int8="w8a8")
    (b16, f16), (b8, f8) = bu.decode_bytes_flops(ref, 100), bu.decode_bytes_flops(w8, 100)
    assert f8 == f16 and b8 < b16


@needs_w8a8
def test_serve_int8_w8a8_holds_the_model_w8a8():
    """`janus-rt serve --int8 w8a8`: the server's model (and so its engine) runs the W8A8 projections."""
    from janus_rt.cli import make_server, parser

    args = parser().parse_args(["serve", "--model", "tiny", "--device", "cpu", "--kv-cache-gb", "0.01", "--port", "0",
                                "--int8", "w8a8"])
    srv, _ = make_server(args)
    try:
        assert int8_kind(srv.model) == "w8a8" and srv.bg.engine.runner.cpu_decoder.stack.w8a8
    finally:
        srv.server_close()
        srv.bg.close()
