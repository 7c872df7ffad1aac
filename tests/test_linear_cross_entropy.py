"""linear_cross_entropy: loss and every grad vs F.cross_entropy(F.linear(...)), with ignored rows and chunks."""
import pytest
import torch

from janus_rt.kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_ref


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def _problem(N, H, V, with_bias, ignore_index, device, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) / H**0.5 * 3
    bias = torch.randn(V, generator=gen) if with_bias else None
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[1::3] = ignore_index
    tensors = (hidden, weight) + ((bias,) if with_bias else ())
    leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in tensors]
    return leaves, targets.to(device)


def _loss_and_grads(fn, leaves, targets, reduction, ignore_index, **kw):
    hidden, weight, *bias = leaves
    loss = fn(hidden, weight, targets, bias[0] if bias else None, ignore_index=ignore_index, reduction=reduction, **kw)
    gen = torch.Generator().manual_seed(1)
    grad_out = (torch.rand(loss.shape, generator=gen) + 0.5).to(loss)  # != 1: checks the grad_output scaling
    return loss, torch.autograd.grad(loss, leaves, grad_out)


@pytest.mark.parametrize("N,H,V,reduction,with_bias,chunk_size,ignore_index", [
    (1, 32, 100, "mean", True, None, -100),
    (7, 32, 1000, "sum", False, 3, -100),
    (7, 16, 16384, "mean", True, None, -100),
    (341, 16, 1000, "mean", True, 64, -100),
    (7, 32, 1000, "none", True, 2, 0),
    (41, 16, 100, "none", False, None, -100),
])
def test_matches_reference(N, H, V, reduction, with_bias, chunk_size, ignore_index, device, poison):
    leaves, targets = _problem(N, H, V, with_bias, ignore_index, device)
    loss, grads = _loss_and_grads(linear_cross_entropy, leaves, targets, reduction, ignore_index,
                                  chunk_size=chunk_size)
    ref_loss, ref_grads = _loss_and_grads(linear_cross_entropy_ref, leaves, targets, reduction, ignore_index)
    assert loss.shape == ref_loss.shape and loss.dtype == ref_loss.dtype
    assert _rel(loss, ref_loss) <= 1e-4
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert torch.isfinite(g).all(), name
        assert _rel(g, r) <= 1e-4, name


def test_bf16_within_twice_torch_error(device):
    """bf16 inputs: error against an fp32 reference at most 2x that of PyTorch's own bf16 computation."""
    leaves, targets = _problem(64, 32, 1000, True, -100, device)
    leaves16 = [t.detach().bfloat16().requires_grad_() for t in leaves]
    exact_loss, exact = _loss_and_grads(linear_cross_entropy_ref, leaves, targets, "mean", -100)
    loss, grads = _loss_and_grads(linear_cross_entropy, leaves16, targets, "mean", -100, chunk_size=16)
    torch_loss, torch_grads = _loss_and_grads(linear_cross_entropy_ref, leaves16, targets, "mean", -100)
    assert loss.dtype == torch.bfloat16
    # the loss is one bf16 rounding of an fp32 value: allow one bf16 ulp when PyTorch happens to land exactly
    assert _rel(loss, exact_loss) <= max(2 * _rel(torch_loss, exact_loss), 2.0**-8)
    for name, g, t, e in zip(("hidden", "weight", "bias"), grads, torch_grads, exact):
        assert _rel(g, e) <= 2 * _rel(t, e), name


def test_no_grad_and_all_ignored(device):
    leaves, targets = _problem(9, 16, 300, True, -100, device)
    with torch.no_grad():
        for reduction in ("mean", "sum", "none"):
            got = linear_cross_entropy(*leaves[:2], targets, leaves[2], reduction=reduction)
            assert _rel(got, linear_cross_entropy_ref(*leaves[:2], targets, leaves[2], reduction=reduction)) <= 1e-4
    ignored = torch.full_like(targets, -100)
    assert torch.isnan(linear_cross_entropy(*leaves[:2], ignored, leaves[2])).item()  # 0 / 0, as PyTorch
    assert torch.isnan(linear_cross_entropy_ref(*leaves[:2], ignored, leaves[2])).item()


def test_second_backward_raises(device):
    """mean/sum hand their precomputed grads over in place, so backward through the same graph twice is refused."""
    leaves, targets = _problem(7, 16, 100, False, -100, device)
    loss = linear_cross_entropy(*leaves, targets)
    torch.autograd.grad(loss, leaves, retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        torch.autograd.grad(loss, leaves)


def test_misuse_raises(device):
    hidden, weight = torch.randn(4, 8, device=device), torch.randn(10, 8, device=device)
    targets = torch.zeros(4, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="weight"):
        linear_cross_entropy(hidden, torch.randn(10, 7, device=device), targets)
    with pytest.raises(ValueError, match="weight"):
        linear_cross_entropy(hidden, weight.double(), targets)
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(hidden, weight, targets[:3])
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, targets, reduction="max")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_rows(reduction, device):
    """N = 0 (a micro-batch without targets of a kind): PyTorch's answer (mean nan, sum 0, none empty), zero grads."""
    hidden = torch.zeros(0, 16, device=device, requires_grad=True)
    weight = torch.randn(37, 16, device=device, requires_grad=True)
    bias = torch.randn(37, device=device, requires_grad=True)
    targets = torch.zeros(0, dtype=torch.int64, device=device)
    with torch.no_grad():
        got = linear_cross_entropy(hidden, weight, targets, bias, reduction=reduction)
    ref = linear_cross_entropy_ref(hidden, weight, targets, bias, reduction=reduction)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref.detach(), equal_nan=True)
    loss = linear_cross_entropy(hidden, weight, targets, bias, reduction=reduction)
    grads = torch.autograd.grad(loss.sum(), (hidden, weight, bias))
    assert grads[0].shape == (0, 16)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads[1:])
