"""mlp_gelu vs mlp_gelu_ref: output and grads of x, w1, b1, w2, b2 at odd and Janus-like shapes.

Under the interpreter the GEMMs run in fp32 (bf16 dot operands are upcast there); on a GPU fp32 inputs use
IEEE fp32 dots unless torch.backends.cuda.matmul.allow_tf32 is set, so the fp32 bound is 1e-4 either way.
"""
import pytest
import torch

from janus_rt.kernels.mlp import mlp_gelu, mlp_gelu_ref
from tolerances import assert_matches, max_err


pytestmark = pytest.mark.usefixtures("poison")


def make(M, Cin, Chid, Cout, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, Cin, generator=g)
    w1 = torch.randn(Chid, Cin, generator=g) / Cin**0.5
    b1 = 0.5 * torch.randn(Chid, generator=g)
    w2 = torch.randn(Cout, Chid, generator=g) / Chid**0.5
    b2 = 0.5 * torch.randn(Cout, generator=g)
    return [t.to(device, dtype) for t in (x, w1, b1, w2, b2)]


def run(fn, inputs, dy):
    inputs = [t.clone().requires_grad_() for t in inputs]
    y = fn(*inputs)
    return y, torch.autograd.grad((y.float() * dy).sum(), inputs)


# (M, Cin, Chid, Cout): odd rows/widths; Cin 8 is gen_aligner's (K below the 16-wide dot: masked K block)
SHAPES = [(1, 48, 136, 200), (7, 8, 200, 48), (41, 136, 48, 200), (341, 48, 136, 48)]


@pytest.mark.parametrize("M,Cin,Chid,Cout", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mlp_gelu_matches_ref(device, M, Cin, Chid, Cout, dtype):
    inputs = make(M, Cin, Chid, Cout, dtype, device)
    dy = torch.randn(M, Cout, generator=torch.Generator().manual_seed(1)).to(device)
    y, grads = run(mlp_gelu, inputs, dy)
    y_lp, grads_lp = run(mlp_gelu_ref, inputs, dy)
    y32, grads32 = run(mlp_gelu_ref, [t.float() for t in inputs], dy)
    assert y.shape == (M, Cout) and y.dtype == dtype
    assert_matches(y, y_lp, y32, "y")
    with torch.no_grad():  # the inference path skips autograd but runs the same kernels
        assert torch.equal(mlp_gelu(*inputs), y)
    for name, a, lp, ref, t in zip(("dx", "dw1", "db1", "dw2", "db2"), grads, grads_lp, grads32, inputs):
        assert a.shape == t.shape and a.dtype == dtype, name
        assert_matches(a, lp, ref, name)


def test_mlp_gelu_aligner_shape_3d(device):
    # the understanding aligner's first layer width (Cin 1024) on [B, T, C] input, bf16, forward only
    x, w1, b1, w2, b2 = make(2 * 3, 1024, 64, 48, torch.bfloat16, device)
    x = x.view(2, 3, 1024)
    y = mlp_gelu(x, w1, b1, w2, b2)
    y_lp = mlp_gelu_ref(x, w1, b1, w2, b2)
    y32 = mlp_gelu_ref(*(t.float() for t in (x, w1, b1, w2, b2)))
    assert y.shape == (2, 3, 48)
    assert_matches(y, y_lp, y32, "y")


def test_mlp_gelu_without_bias_and_frozen_input(device):
    # no biases; x without grad (stage 1 trains only the adaptor weights)
    x, w1, _, w2, _ = make(7, 48, 136, 48, torch.float32, device)
    w1.requires_grad_()
    w2.requires_grad_()
    y = mlp_gelu(x, w1, None, w2, None)
    y_ref = mlp_gelu_ref(x, w1, None, w2, None)
    assert max_err(y, y_ref) <= 1e-4 * y_ref.abs().max().item()
    g = torch.autograd.grad(y.sum(), (w1, w2))
    g_ref = torch.autograd.grad(y_ref.sum(), (w1, w2))
    for a, b in zip(g, g_ref):
        assert max_err(a, b) <= 1e-4 * b.abs().max().item()


def test_mlp_gelu_misuse_raises(device):
    x, w1, b1, w2, b2 = make(4, 48, 64, 32, torch.float32, device)
    with pytest.raises(ValueError, match="in_features"):
        mlp_gelu(x[:, :47], w1, b1, w2, b2)
    with pytest.raises(ValueError, match="w2"):
        mlp_gelu(x, w1, b1, w2[:, :63], b2)
    with pytest.raises(ValueError, match="b1"):
        mlp_gelu(x, w1, b1[:63], w2, b2)
    with pytest.raises(ValueError, match="dtype"):
        mlp_gelu(x, w1.half(), b1, w2, b2)


def test_ops_mlp_gelu_dispatch(device, monkeypatch):
    """ops.mlp_gelu on the triton backend: the fused kernel off CUDA (the interpreter), two cuBLAS GEMMs around a GELU
    on a GPU (measured faster there, ops.TRITON_MLP_ON_CUDA) unless that flag sends CUDA inputs to the kernel."""
    from janus_rt import ops
    from janus_rt.kernels import mlp as mlp_module

    calls = []
    kernel = mlp_module.mlp_gelu
    monkeypatch.setattr(ops._kernels(), "mlp_gelu", lambda *a: calls.append(1) or kernel(*a))
    inputs = make(5, 48, 136, 40, torch.float32, device)
    chain = torch.nn.functional.linear(
        torch.nn.functional.gelu(torch.nn.functional.linear(inputs[0], inputs[1], inputs[2])), inputs[3], inputs[4])
    with ops.use_backend("triton"):
        y = ops.mlp_gelu(*inputs)
        assert len(calls) == (0 if inputs[0].is_cuda else 1)
        if inputs[0].is_cuda:
            assert torch.equal(y, chain)
        monkeypatch.setattr(ops, "TRITON_MLP_ON_CUDA", True)
        y2 = ops.mlp_gelu(*inputs)
    assert len(calls) == (1 if inputs[0].is_cuda else 2)
    ref = mlp_gelu_ref(*inputs)
    assert_matches(y2, ref, ref, "mlp_gelu")
