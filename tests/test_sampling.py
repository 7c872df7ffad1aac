"""cfg_sample vs its sort-based reference: greedy, seeded Gumbel samples, top-k / top-p, distribution, seeds."""
import pytest
import torch

from janus_rt.kernels.sampling import _hash_u32_ref, cfg_sample, cfg_sample_ref, gumbel_ref


def _h_py(x: int) -> int:
    """The spec's h() in plain Python ints, independent of the torch reference."""
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x735A2D97) & 0xFFFFFFFF
    return x ^ (x >> 15)


def test_hash_and_gumbel_reference():
    seeds = [0, 1, 12345, 2**32 - 1, -1, 2**40 + 7]
    js = torch.arange(300)
    for seed in seeds:
        hs = _h_py(seed & 0xFFFFFFFF)
        want = torch.tensor([_h_py(hs ^ j) for j in range(300)])
        got = _hash_u32_ref(_hash_u32_ref(torch.tensor(seed & 0xFFFFFFFF)) ^ js)
        assert torch.equal(got, want)
        u = (((want >> 8).float() + 0.5) * 2.0**-24).clamp(max=1 - 2.0**-24)
        assert torch.equal(gumbel_ref(seed, 300), -torch.log(-torch.log(u)))
    assert _h_py(0) == 0 and _h_py(1) != 1
    # bits >> 8 == 2^24 - 1 rounds to u = 1.0 in fp32 before the clamp: the noise must stay finite
    top = torch.tensor([2**24 - 1], dtype=torch.int64)
    assert ((top.float() + 0.5) * 2.0**-24).item() == 1.0
    g = gumbel_ref(torch.arange(64), 4096)  # [64, 4096]
    assert torch.isfinite(g).all() and g.dtype == torch.float32


def _rows(B, V, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    cond = (torch.randn(B, V, generator=gen) * 3).to(dtype)
    uncond = (torch.randn(B, V, generator=gen) * 3).to(dtype)
    return cond, uncond


@pytest.mark.parametrize("V", [100, 1000, 16384])
def test_greedy_exact(V, device, poison):
    cond, uncond = _rows(7, V, V)
    cond[2, 5] = cond[2, 17] = uncond[2, 5] = uncond[2, 17] = 1e4  # tie at the max -> smallest index
    cond, uncond = cond.to(device), uncond.to(device)
    w = torch.linspace(0.0, 6.0, 7, device=device)
    got = cfg_sample(cond, uncond, w, 1.0, 0, 1.0, 0, True)
    want = (uncond + w[:, None] * (cond - uncond)).argmax(dim=1)
    assert torch.equal(got.cpu(), want.cpu()) and got[2].item() == 5
    assert torch.equal(cfg_sample(cond, None, greedy=True).cpu(), cond.argmax(dim=1).cpu())


_PARAMS = dict(  # one row each: greedy, plain, top-k, top-k=1, top-p, top-k + top-p, top-p = 0
    cfg_weight=torch.tensor([5.0, 5.0, 3.0, 1.0, 5.0, 2.0, 4.0]),
    temperature=torch.tensor([1.0, 1.0, 0.7, 1.3, 1.0, 0.9, 1.0]),
    top_k=torch.tensor([0, 0, 5, 1, 0, 40, 0]),
    top_p=torch.tensor([1.0, 1.0, 1.0, 1.0, 0.9, 0.8, 0.0]),
    seeds=torch.tensor([1, 2, 3, 4, 5, 2**33 + 6, -7]),
    greedy=torch.tensor([True, False, False, False, False, False, False]),
)


@pytest.mark.parametrize("V,dtype", [(100, torch.float32), (1000, torch.bfloat16), (16384, torch.float32)])
def test_sample_matches_reference(V, dtype, device, poison):
    cond, uncond = _rows(7, V, V + 1, dtype)
    cond[1, : V // 2] = float("-inf")  # masked vocabulary is never drawn
    params = {k: v.to(device) for k, v in _PARAMS.items()}
    want = cfg_sample_ref(cond.to(device), uncond.to(device), **params)
    got = cfg_sample(cond.to(device), uncond.to(device), **params)
    assert torch.equal(got.cpu(), want.cpu()), (got, want)
    assert got[1].item() >= V // 2


def test_strided_rows_and_no_guidance(device, poison):
    logits = (torch.randn(8, 1000, generator=torch.Generator().manual_seed(0)) * 2).to(device)  # [2B, V]
    cond, uncond = logits[0::2], logits[1::2]  # official layout: interleaved cond/uncond rows
    seeds = torch.arange(4, device=device) * 7919
    assert torch.equal(cfg_sample(cond, uncond, 5.0, 1.0, 0, 1.0, seeds, False).cpu(),
                       cfg_sample_ref(cond, uncond, 5.0, 1.0, 0, 1.0, seeds, False).cpu())
    assert torch.equal(cfg_sample(cond, None, 5.0, 0.8, 10, 0.9, seeds, False).cpu(),
                       cfg_sample_ref(cond, None, 5.0, 0.8, 10, 0.9, seeds, False).cpu())


def test_scalar_arguments_mean_every_row(device, poison):
    """Scalars given to the kernel equal per-row tensors built here given to the reference (the two share the
    argument preparation, so the scalar path is checked against tensors it did not make), and greedy against
    argmax(u + w (c - u)) written out."""
    B, V = 5, 700
    cond, uncond = (t.to(device) for t in _rows(B, V, 11))
    rows = lambda v, dt: torch.full((B,), v, dtype=dt, device=device)
    got = cfg_sample(cond, uncond, 5.0, 0.8, 10, 0.9, 7, False)
    want = cfg_sample_ref(cond, uncond, rows(5.0, torch.float32), rows(0.8, torch.float32), rows(10, torch.int64),
                          rows(0.9, torch.float32), rows(7, torch.int64), rows(False, torch.bool))
    assert torch.equal(got.cpu(), want.cpu())
    mixed = uncond.float() + 5.0 * (cond.float() - uncond.float())
    assert torch.equal(cfg_sample(cond, uncond, 5.0, greedy=True).cpu(), mixed.argmax(dim=1).cpu())


def test_multi_block_kernel(device, poison):
    """The multi-pass kernel (V beyond the register budget, e.g. 102400) on a short row split in 3 blocks."""
    cond, uncond = _rows(4, 300, 3)
    cond, uncond = cond.to(device), uncond.to(device)
    cond[0, 250] = 1e4  # greedy max in the last block
    params = dict(cfg_weight=3.0, temperature=torch.tensor([1.0, 0.8, 1.0, 1.2]), top_k=torch.tensor([0, 7, 0, 50]),
                  top_p=torch.tensor([1.0, 1.0, 0.7, 0.9]), seeds=torch.tensor([9, 8, 7, 6]),
                  greedy=torch.tensor([True, False, False, False]))
    params = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in params.items()}
    got = cfg_sample(cond, uncond, **params, block_v=128)
    assert torch.equal(got.cpu(), cfg_sample_ref(cond, uncond, **params).cpu())
    assert got[0].item() == 250


def test_only_kept_tokens(device):
    V, B = 64, 16
    row = torch.randn(V, generator=torch.Generator().manual_seed(1)) * 2
    row[10:14] = row.max() + 1  # a 4-way tie at the top: top_k = 2 must keep all four
    cond = row.expand(B, V).contiguous().to(device)
    seeds = torch.arange(B, device=device)
    tok = cfg_sample(cond, None, 1.0, 1.0, 2, 1.0, seeds, False).cpu()
    assert set(tok.tolist()) <= {10, 11, 12, 13} and len(set(tok.tolist())) > 1
    # top-p = 0.7: smallest set of highest tokens holding 70% of the mass, ties with its last value kept
    p = torch.softmax(row.double(), 0)
    order = p.argsort(descending=True)
    cutoff = row[order[int((p[order].cumsum(0) < 0.7).sum())]]
    tok = cfg_sample(cond, None, 1.0, 1.0, 0, 0.7, seeds, False).cpu()
    assert (row[tok] >= cutoff).all() and (row < cutoff).sum() > V // 2


def test_seeds_reproducible_and_row_independent(device):
    cond, uncond = _rows(6, 200, 11)
    cond, uncond = cond.to(device), uncond.to(device)
    seeds = torch.tensor([5, 6, 7, 8, 9, 10], device=device)
    kw = dict(cfg_weight=4.0, temperature=1.0, top_k=torch.tensor([0, 20, 0, 20, 0, 20], device=device))
    a = cfg_sample(cond, uncond, **kw, seeds=seeds)
    assert torch.equal(a, cfg_sample(cond, uncond, **kw, seeds=seeds))
    perm = torch.tensor([3, 0, 5, 1, 4, 2], device=device)
    cond2, uncond2 = cond[perm].clone(), uncond[perm].clone()
    cond2[1::2] = torch.randn_like(cond2[1::2])  # change every other row: the others must not move
    kw2 = dict(kw, top_k=kw["top_k"][perm])
    b = cfg_sample(cond2, uncond2, **kw2, seeds=seeds[perm])
    assert torch.equal(b[0::2], a[perm][0::2])
    assert not torch.equal(cfg_sample(cond, uncond, **kw, seeds=seeds + 1), a)


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_distribution_matches_softmax(device):
    """Chi-square of 500 kernel draws (one seed per row) against softmax(l / t) on V = 5 (df 4, 99.9%: 18.5)."""
    B = 500
    cond = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0])
    uncond = torch.tensor([0.5, 0.5, 0.2, 0.0, 1.0])
    x = uncond + 2.0 * (cond - uncond)
    tok = cfg_sample(cond.expand(B, 5).contiguous().to(device), uncond.expand(B, 5).contiguous().to(device),
                     2.0, 0.7, 0, 1.0, torch.arange(B, device=device) * 3 + 1, False).cpu()
    counts = torch.bincount(tok, minlength=5).double()
    assert _chi2(counts, torch.softmax(x.double() / 0.7, 0)) < 18.5
    assert _chi2(counts, torch.softmax(x.double(), 0)) > 18.5  # the check can tell temperatures apart


def test_reference_truncated_distribution():
    """Top-k + top-p draws of the reference (equal to the kernel's above) follow the renormalised softmax."""
    B, V = 20000, 8
    l = torch.tensor([2.0, 1.5, 1.0, 0.9, 0.5, 0.0, -1.0, -2.0])
    p = torch.softmax(l.double(), 0)
    # top_k = 6 drops the last two; top_p = 0.8 then keeps the smallest prefix of the renormalised mass >= 0.8
    p6 = p[:6] / p[:6].sum()
    n = int((p6.cumsum(0) < 0.8).sum()) + 1
    kept = p6[:n] / p6[:n].sum()
    tok = cfg_sample_ref(l.expand(B, V), None, 1.0, 1.0, 6, 0.8, torch.arange(B), False)
    counts = torch.bincount(tok, minlength=V).double()
    assert counts[n:].sum() == 0
    assert _chi2(counts[:n], kept) < 16.3  # df <= 3 at 99.9%


def test_misuse_raises(device):
    cond = torch.randn(3, 50, device=device)
    with pytest.raises(ValueError, match="uncond shape"):
        cfg_sample(cond, torch.randn(3, 40, device=device))
    with pytest.raises(ValueError, match="top_k"):
        cfg_sample(cond, None, top_k=torch.tensor([1, 2], device=device))
    with pytest.raises(ValueError, match="temperature"):
        cfg_sample(cond, None, temperature=0.0)
    with pytest.raises(ValueError, match="cond"):
        cfg_sample(cond.long())
