"""swiglu vs swiglu_ref: output and both grads at odd shapes, fused gate_up views."""
import pytest
import torch

from janus_rt.kernels.swiglu import swiglu, swiglu_ref
from tolerances import assert_matches, assert_same_roundings, max_err


pytestmark = pytest.mark.usefixtures("poison")


def run(fn, gate, up, dout):
    gate, up = gate.clone().requires_grad_(), up.clone().requires_grad_()
    out = fn(gate, up)
    return out, torch.autograd.grad((out.float() * dout).sum(), (gate, up))


@pytest.mark.parametrize("shape", [(1, 48), (7, 136), (41, 200), (341, 48), (3, 5, 1100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_swiglu_matches_ref(device, shape, dtype):
    g = torch.Generator().manual_seed(0)
    gate = (3 * torch.randn(shape, generator=g)).to(device, dtype)  # wide range: both silu tails
    up = torch.randn(shape, generator=g).to(device, dtype)
    dout = torch.randn(shape, generator=g).to(device)
    out, grads = run(swiglu, gate, up, dout)
    out_lp, grads_lp = run(swiglu_ref, gate, up, dout)
    out32, grads32 = run(swiglu_ref, gate.float(), up.float(), dout)
    assert out.shape == gate.shape and out.dtype == dtype
    assert_matches(out, out_lp, out32, "out")
    if dtype != torch.float32:  # fp32 math, one rounding: the fp32 result rounded (a truncating cast is caught here)
        assert_same_roundings(out, out32.to(dtype), "out")
    with torch.no_grad():  # the inference path skips autograd but runs the same kernel
        assert torch.equal(swiglu(gate, up), out)
    for name, a, lp, ref in zip(("dgate", "dup"), grads, grads_lp, grads32):
        assert a.shape == gate.shape and a.dtype == dtype
        assert_matches(a, lp, ref, name)


def test_swiglu_fused_gate_up_views(device):
    # gate/up as the two halves of one gate_up projection [N, 2F]: row-strided, read in place
    N, F = 9, 200
    gu = torch.randn(N, 2 * F, device=device, requires_grad=True)
    gate, up = gu[:, :F], gu[:, F:]
    out = swiglu(gate, up)
    ref = swiglu_ref(gate, up)
    assert max_err(out, ref) <= 1e-4 * ref.abs().max().item()
    dout = torch.randn(N, F, device=device)
    (g,) = torch.autograd.grad((out * dout).sum(), gu)
    (g_ref,) = torch.autograd.grad((ref * dout).sum(), gu)
    assert max_err(g, g_ref) <= 1e-4 * g_ref.abs().max().item()


def test_swiglu_misuse_raises(device):
    gate = torch.randn(4, 48, device=device)
    with pytest.raises(ValueError, match="shape"):
        swiglu(gate, torch.randn(4, 47, device=device))
    with pytest.raises(ValueError, match="dtype"):
        swiglu(gate, gate.half())
    with pytest.raises(ValueError, match="dtype"):
        swiglu(gate.to(torch.int64), gate.to(torch.int64))
