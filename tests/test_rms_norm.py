"""rms_norm vs rms_norm_ref: outputs, the residual sum, and grads of x, residual, weight at odd shapes."""
import pytest
import torch

from janus_rt.kernels.rms_norm import rms_norm, rms_norm_ref
from tolerances import assert_matches, assert_same_roundings, max_err


pytestmark = pytest.mark.usefixtures("poison")


def make(rows, C, dtype, residual, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, C, generator=g).to(dtype)
    w = (1 + 0.5 * torch.randn(C, generator=g)).to(dtype)
    r = torch.randn(rows, C, generator=g).to(dtype) if residual else None
    return x, w, r


def run(fn, x, w, r, eps, dy, dh):
    """Forward + backward; returns outputs and grads of (x, w[, r])."""
    inputs = [t.clone().requires_grad_() for t in (x, w) + ((r,) if r is not None else ())]
    out = fn(inputs[0], inputs[1], eps, inputs[2] if r is not None else None)
    outs = out if r is not None else (out,)
    loss = (outs[0].float() * dy).sum() + ((outs[1].float() * dh).sum() if r is not None else 0)
    return outs, torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("rows,C", [(1, 48), (7, 136), (41, 200), (341, 48)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_matches_ref(device, rows, C, dtype, residual):
    x, w, r = (t.to(device) if t is not None else None for t in make(rows, C, dtype, residual))
    g = torch.Generator().manual_seed(1)
    dy, dh = torch.randn(rows, C, generator=g).to(device), torch.randn(rows, C, generator=g).to(device)
    outs, grads = run(rms_norm, x, w, r, 1e-6, dy, dh)
    outs_lp, grads_lp = run(rms_norm_ref, x, w, r, 1e-6, dy, dh)
    up = lambda t: t.float() if t is not None else None
    outs32, grads32 = run(rms_norm_ref, up(x), up(w), up(r), 1e-6, dy, dh)
    assert outs[0].shape == x.shape and outs[0].dtype == dtype
    assert_matches(outs[0], outs_lp[0], outs32[0], "y")
    if dtype != torch.float32:  # LlamaRMSNorm's rounding points (one dropped is more accurate: caught only here)
        assert_same_roundings(outs[0], outs_lp[0], "y")
    if residual:  # the carried residual stream is x + residual in the input dtype, exactly as torch
        assert torch.equal(outs[1], outs_lp[1])
    for name, a, lp, ref in zip(("dx", "dweight", "dresidual"), grads, grads_lp, grads32):
        assert a.dtype == dtype
        assert_matches(a, lp, ref, name)


def test_rms_norm_janus_width_and_3d(device):
    # LLM hidden 2048 (1B), [B, T, C] input, eps 1e-6
    x, w, r = (t.to(device) for t in make(3 * 2, 2048, torch.bfloat16, True))
    x, r = x.view(3, 2, 2048), r.view(3, 2, 2048)
    y, h = rms_norm(x, w, 1e-6, residual=r)
    y_lp, h_lp = rms_norm_ref(x, w, 1e-6, residual=r)
    y32 = rms_norm_ref(x.float(), w.float(), 1e-6, residual=r.float())[0]
    assert y.shape == (3, 2, 2048) and torch.equal(h, h_lp)
    assert_matches(y, y_lp, y32, "y")


def test_rms_norm_strided_rows(device):
    # a row-strided view (every other row of a bigger buffer) is read in place
    base = torch.randn(14, 136, device=device)
    x, w = base[::2], torch.randn(136, device=device)
    y = rms_norm(x, w, 1e-5)
    ref = rms_norm_ref(x, w, 1e-5)
    assert max_err(y, ref) / ref.abs().max().item() <= 1e-4


def test_rms_norm_mixed_weight_dtype(device):
    # fp32 weight on bf16 activations: output promotes to fp32, like LlamaRMSNorm
    x, _, _ = make(7, 48, torch.bfloat16, False)
    x, w = x.to(device), torch.randn(48, device=device)
    y = rms_norm(x, w, 1e-6)
    ref = rms_norm_ref(x, w, 1e-6)
    assert y.dtype == torch.float32 and max_err(y, ref) / ref.abs().max().item() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_eps(device, dtype):
    """eps inside the root, where it matters: rows of small values (mean square 1e-4) at eps 1e-2 scale by ~1/10 of
    what eps 0 would give, and an all-zero row stays zero (NaN without eps); the backward's too."""
    x, w, _ = make(6, 136, dtype, False, seed=3)
    x = (x.float() * 1e-2).to(dtype)
    x[2] = 0
    x, w = x.to(device), w.to(device)
    g = torch.Generator().manual_seed(4)
    dy = torch.randn(6, 136, generator=g).to(device)
    (y,), grads = run(rms_norm, x, w, None, 1e-2, dy, None)
    (y_lp,), grads_lp = run(rms_norm_ref, x, w, None, 1e-2, dy, None)
    (y32,), grads32 = run(rms_norm_ref, x.float(), w.float(), None, 1e-2, dy, None)
    assert torch.equal(y[2], torch.zeros_like(y[2]))
    assert_matches(y, y_lp, y32, "y")
    for name, a, lp, ref in zip(("dx", "dweight"), grads, grads_lp, grads32):
        assert_matches(a, lp, ref, name)


def test_rms_norm_misuse_raises(device):
    x = torch.randn(4, 48, device=device)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(47, device=device), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, torch.ones(48, device=device), 1e-6, residual=torch.randn(4, 48, device=device).half())
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, torch.ones(48, device=device), 1e-6, residual=torch.randn(5, 48, device=device))
    with pytest.raises(ValueError, match="dtype"):
        rms_norm(x.to(torch.int32), torch.ones(48, device=device), 1e-6)
