"""flash_attention / flash_attention_varlen against the plain PyTorch references (forward and backward)."""
import pytest
import torch

from janus_rt import kernels as K
from janus_rt.kernels.attention import flash_attention_ref, flash_attention_varlen_ref
from tolerances import assert_same_roundings


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every float buffer the launchers allocate starts as NaN, so an element the kernels skip fails."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: nan_fill(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: nan_fill(empty_like(*a, **kw)))


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def abs_err(a, b):
    return (a.float() - b.float()).abs().max().item()


def qkv(b, tq, tk, h, d, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, t, h, d, generator=g) for t in (tq, tk, tk))
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


@pytest.mark.parametrize("b,tq,tk,h,d,causal", [
    (2, 129, 129, 3, 64, True),
    (2, 129, 129, 3, 64, False),
    (1, 7, 7, 5, 48, True),
    (3, 1, 1, 1, 128, True),
    (1, 7, 129, 1, 128, True),    # chunked prefill: bottom-right causal alignment
    (2, 33, 70, 2, 48, False),
    (1, 20, 20, 2, 80, True),     # a multiple of 16 that is not a power of two
    (1, 40, 40, 1, 512, False),   # the VQ's single-head 512-wide attention
])
def test_forward_fp32(b, tq, tk, h, d, causal, device):
    q, k, v = qkv(b, tq, tk, h, d, device)
    out = K.flash_attention(q, k, v, causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, flash_attention_ref(q, k, v, causal)) <= 1e-4


@pytest.mark.parametrize("causal", [True, False])
def test_keys_scoring_minus_inf_weigh_nothing(causal, device):
    # Keys that score -inf (-inf keys against a positive q; only non-finite inputs do this) weigh 0 as in torch's
    # softmax, also when a row's first key blocks score nothing else (exp2(-inf - -inf) had made such rows NaN); a
    # causal row that sees only such keys is NaN in both.
    q, k, v = qkv(1, 100, 100, 2, 64, device)
    q = q.abs() + 0.1
    k[:, :70] = float("-inf")  # more than the first key block at any BLOCK_N the kernel picks
    out, ref = K.flash_attention(q, k, v, causal), flash_attention_ref(q, k, v, causal)
    seen = slice(70, None) if causal else slice(None)
    assert ref[:, seen].isfinite().all() and out[:, seen].isfinite().all()
    assert rel_err(out[:, seen], ref[:, seen]) <= 1e-4
    if causal:
        assert ref[:, :70].isnan().all() and out[:, :70].isnan().all()


def test_forward_strided_views_and_scale(device):
    # q, k, v as views into one fused [B, T, 3, H, D] projection output
    g = torch.Generator().manual_seed(1)
    qkv_ = torch.randn(2, 37, 3, 3, 64, generator=g).to(device)
    q, k, v = qkv_.unbind(2)
    out = K.flash_attention(q, k, v, True, sm_scale=0.3)
    assert rel_err(out, flash_attention_ref(q, k, v, True, sm_scale=0.3)) <= 1e-4
    # gradients through the views, with the stride-0 upstream gradient that .sum() produces
    fused = qkv_.clone().requires_grad_()
    K.flash_attention(*fused.unbind(2), True, sm_scale=0.3).sum().backward()
    want = qkv_.clone().requires_grad_()
    flash_attention_ref(*want.unbind(2), True, sm_scale=0.3).sum().backward()
    assert rel_err(fused.grad, want.grad) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,tq,tk,h,d,causal", [(2, 129, 129, 3, 64, True), (1, 7, 70, 2, 128, True),
                                                (1, 33, 33, 1, 48, False)])
def test_forward_low_precision(b, tq, tk, h, d, causal, dtype, device):
    q, k, v = qkv(b, tq, tk, h, d, device, dtype)
    exact = flash_attention_ref(q.float(), k.float(), v.float(), causal)
    torch_err = abs_err(flash_attention_ref(q, k, v, causal, upcast=False), exact)
    out = K.flash_attention(q, k, v, causal)
    assert out.dtype == dtype
    assert abs_err(out, exact) <= 2 * torch_err
    if dtype == torch.bfloat16:  # the exact result rounded but for rare flips (fp16's p v in fp16 is not that)
        assert_same_roundings(out, exact.to(dtype), "out")


def _grads(fn, q, k, v, do):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    fn(q, k, v).backward(do)
    return q.grad, k.grad, v.grad


@pytest.mark.parametrize("b,tq,tk,h,d,causal", [
    (2, 129, 129, 3, 64, True),
    (1, 7, 20, 2, 48, True),      # Tq < Tk
    (1, 33, 33, 1, 128, False),
    (1, 9, 9, 1, 256, True),
])
def test_backward_fp32(b, tq, tk, h, d, causal, device):
    q, k, v = qkv(b, tq, tk, h, d, device)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(device)
    got = _grads(lambda *x: K.flash_attention(*x, causal), q, k, v, do)
    want = _grads(lambda *x: flash_attention_ref(*x, causal), q, k, v, do)
    for name, g, w in zip("qkv", got, want):
        assert rel_err(g, w) <= 1e-4, f"d{name}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backward_low_precision(dtype, device):
    q, k, v = qkv(1, 65, 65, 2, 64, device, dtype)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    exact = _grads(lambda *x: flash_attention_ref(*x, True), q.float(), k.float(), v.float(), do.float())
    lowp = _grads(lambda *x: flash_attention_ref(*x, True, upcast=False), q, k, v, do)
    got = _grads(lambda *x: K.flash_attention(*x, True), q, k, v, do)
    for name, g, t, e in zip("qkv", got, lowp, exact):
        assert g.dtype == dtype
        assert abs_err(g, e) <= 2 * abs_err(t, e), f"d{name}"


# documents of 5, 0, 65, 1 and 59 tokens packed into 130 rows
CU = [0, 5, 5, 70, 71, 130]


def packed(h, d, device, dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(CU[-1], h, d, generator=g).to(device, dtype) for _ in range(3))
    return q, k, v, torch.tensor(CU, dtype=torch.int32, device=device), max(b - a for a, b in zip(CU, CU[1:]))


@pytest.mark.parametrize("causal", [True, False])
def test_varlen_forward(causal, device):
    q, k, v, cu, max_len = packed(3, 64, device)
    out = K.flash_attention_varlen(q, k, v, cu, max_len, causal)
    assert rel_err(out, flash_attention_varlen_ref(q, k, v, cu, max_len, causal)) <= 1e-4
    # one attention over all 130 rows (crossing documents) must differ from the reference, or this test is blind
    crossed = flash_attention_ref(q[None], k[None], v[None], causal)[0]
    assert rel_err(crossed, flash_attention_varlen_ref(q, k, v, cu, max_len, causal)) > 1e-2


def test_varlen_never_crosses_documents(device):
    q, k, v, cu, max_len = packed(2, 48, device)
    out = K.flash_attention_varlen(q, k, v, cu, max_len, False)
    k2, v2 = k.clone(), v.clone()
    k2[5:70] += 3.0  # change only document 2's keys and values
    v2[5:70] *= -2.0
    out2 = K.flash_attention_varlen(q, k2, v2, cu, max_len, False)
    others = torch.cat([torch.arange(0, 5), torch.arange(70, 130)]).to(device)
    assert torch.equal(out[others], out2[others])
    assert not torch.allclose(out[5:70], out2[5:70])


def test_varlen_backward(device):
    q, k, v, cu, max_len = packed(2, 64, device)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(4)).to(device)
    got = _grads(lambda *x: K.flash_attention_varlen(*x, cu, max_len, True), q, k, v, do)
    want = _grads(lambda *x: flash_attention_varlen_ref(*x, cu, max_len, True), q, k, v, do)
    for name, g, w in zip("qkv", got, want):
        assert rel_err(g, w) <= 1e-4, f"d{name}"


def test_varlen_bf16(device):
    q, k, v, cu, max_len = packed(2, 64, device, torch.bfloat16)
    exact = flash_attention_varlen_ref(q.float(), k.float(), v.float(), cu, max_len, True)
    torch_err = abs_err(flash_attention_varlen_ref(q, k, v, cu, max_len, True, upcast=False), exact)
    assert abs_err(K.flash_attention_varlen(q, k, v, cu, max_len, True), exact) <= 2 * torch_err


def test_misuse_raises(device):
    q, k, v = qkv(1, 8, 8, 2, 64, device)
    cu = torch.tensor([0, 8], dtype=torch.int32, device=device)
    bad = [
        lambda: K.flash_attention(q[0], k[0], v[0], True),                      # 3-D input to the dense call
        lambda: K.flash_attention(q[..., :40], k[..., :40], v[..., :40], True),  # D not a multiple of 16
        lambda: K.flash_attention(q.half(), k, v, True),                         # dtype mismatch
        lambda: K.flash_attention(q.int(), k.int(), v.int(), True),              # unsupported dtype
        lambda: K.flash_attention(q, k[:, :4], v[:, :4], True),                  # causal with Tq > Tk
        lambda: K.flash_attention(q, k, v[:, :4], False),                        # k/v lengths differ
        lambda: K.flash_attention(q, k[:, :, :1], v[:, :, :1], False),           # head count differs
        lambda: K.flash_attention(q, k, v, 1),                                   # causal not a bool
        lambda: K.flash_attention_varlen(q[0], k[0], v[0], cu.long(), 8, True),  # cu_seqlens int64
        lambda: K.flash_attention_varlen(q[0], k[0, :4], v[0, :4], cu, 8, True),
    ]
    for i, call in enumerate(bad):
        with pytest.raises(ValueError):
            call()
            pytest.fail(f"case {i} did not raise")


def test_grid_keeps_heads_and_sequences_within_cuda_limits(device, monkeypatch):
    """CUDA caps grid dims y and z at 65535: a launch with B * H (or documents * H) > 65535 programs in one of them
    fails on a GPU ('invalid argument'; the interpreter has no such limit). 4097 sequences x 16 heads = 65552."""
    from janus_rt.kernels import attention as A

    grids = []

    class Record:  # stands in for a kernel: records its grid, runs nothing
        def __getitem__(self, grid):
            grids.append(tuple(grid))
            return lambda *a, **kw: None

    for name in ("_flash_attention_fwd_kernel", "_flash_attention_bwd_preprocess_kernel",
                 "_flash_attention_bwd_dkdv_kernel", "_flash_attention_bwd_dq_kernel"):
        monkeypatch.setattr(A, name, Record())
    q = torch.zeros(4097, 1, 16, 16, device=device)
    o, lse = A._attention_fwd(q, q, q, None, 0, True, 0.25)
    A._attention_bwd(o, q, q, q, o, lse, None, 0, True, 0.25)
    packed = q[:, 0]  # 4097 one-token documents
    cu = torch.arange(4098, dtype=torch.int32, device=device)
    o, lse = A._attention_fwd(packed, packed, packed, cu, 1, True, 0.25)
    A._attention_bwd(o, packed, packed, packed, o, lse, cu, 1, True, 0.25)
    assert len(grids) == 8
    for grid in grids:
        assert all(n <= 65535 for n in grid[1:]), grid
