"""cfg_sample vs its sort-based reference: greedy, seeded Gumbel samples, top-k / top-p, distribution, seeds."""
import functools
import math

import pytest
import torch

from janus_rt.kernels.sampling import _hash_u32_ref, cfg_sample, cfg_sample_ref, gumbel_ref

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny torch ops: threads only spin (tests/conftest.py)


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


@pytest.mark.parametrize("impl,B", [("reference", 20000), ("kernel", 96), ("multi-pass kernel", 32)])
def test_truncated_distribution(impl, B, device, poison):
    """Top-k + top-p draws follow the renormalised softmax: the reference (many draws), then the kernel's two paths
    on as many draws as the Triton interpreter allows (their kept sets are checked exactly below)."""
    V = 8
    l = torch.tensor([2.0, 1.5, 1.0, 0.9, 0.5, 0.0, -1.0, -2.0])
    p = torch.softmax(l.double(), 0)
    # top_k = 6 drops the last two; top_p = 0.8 then keeps the smallest prefix of the renormalised mass >= 0.8
    p6 = p[:6] / p[:6].sum()
    n = int((p6.cumsum(0) < 0.8).sum()) + 1
    kept = p6[:n] / p6[:n].sum()
    rows, seeds = l.expand(B, V).contiguous().to(device), torch.arange(B, device=device)
    if impl == "reference":
        tok = cfg_sample_ref(rows, None, 1.0, 1.0, 6, 0.8, seeds, False)
    else:
        tok = cfg_sample(rows, None, 1.0, 1.0, 6, 0.8, seeds, False, block_v=4 if impl == "multi-pass kernel" else None)
    counts = torch.bincount(tok.cpu(), minlength=V).double()
    assert counts[n:].sum() == 0
    assert _chi2(counts[:n], kept) < 16.3  # df <= 3 at 99.9%


def _kept_set(l: list[float], k: int, p: float) -> set[int]:
    """The tokens top-k then top-p keep (module docstring, steps 4-5) from a plain float64 sort: independent of the
    kernels and of cfg_sample_ref."""
    V = len(l)
    order = sorted(range(V), key=lambda j: -l[j])
    keep = [j for j in order if not 0 < k < V or l[j] >= l[order[k - 1]]]
    if p < 1.0:
        e = [math.exp(l[j] - l[keep[0]]) for j in keep]
        cum, cut = 0.0, None
        for j, ej in zip(keep, e):
            cum += ej
            if cut is None and cum >= p * sum(e):
                cut = l[j]
        keep = [j for j in keep if l[j] >= cut]
    return set(keep)


def _winner(score: torch.Tensor, group: set[int]) -> torch.Tensor:
    """score [S, V] -> [S] argmax over the columns in `group`, or -1 where the runner-up is within 1e-3 (a tie that
    an ulp of log could flip between implementations)."""
    s = torch.full_like(score, float("-inf"))
    s[:, sorted(group)] = score[:, sorted(group)]
    top = s.topk(min(2, score.shape[1]), dim=1)
    clear = (top.values[:, 0] - top.values[:, -1] > 1e-3) | (len(group) == 1)
    return torch.where(clear, top.indices[:, 0], -1)


_SEED0 = 10**6  # probe seeds are taken from _SEED0 + [0, 2048)


@functools.lru_cache
def _noise(V: int) -> torch.Tensor:
    """Gumbel noise of the probe seeds, [2048, V] float64."""
    return gumbel_ref(torch.arange(2048) + _SEED0, V).double()  # [S, V]


def _probe_seeds(l: torch.Tensor, kept: set[int]) -> list[int]:
    """Seeds whose Gumbel-max draws reveal the kept set: for every finite excluded token j one where j would win
    over kept + {j}, then for every kept token not yet drawn one where it wins over the kept set. A kernel keeping
    any other set then draws a token outside `kept` or never draws one inside it."""
    score = l.double() + _noise(l.numel())  # [S, V]
    in_kept = _winner(score, kept)
    seeds = []
    for j in range(l.numel()):
        if j not in kept and l[j] > float("-inf"):
            seeds.append(int(((_winner(score, kept | {j}) == j) & (in_kept >= 0)).nonzero()[0]))
    for i in sorted(kept - set(in_kept[seeds].tolist())):
        seeds.append(int((in_kept == i).nonzero()[0]))
    return [s + _SEED0 for s in seeds]


_LOGP = torch.tensor([0.30, 0.22, 0.17, 0.13, 0.11, 0.04, 0.02, 0.01]).log()
_TRUNC = [  # top_k, top_p, cfg_weight, temperature, mask the 0.01 token; cumulative mass .30 .52 .69 .82 .93 .97
    (3, 1.0, 1.5, 1.3, False),  # the k-th and (k+1)-th largest differ
    (2, 1.0, 2.0, 1.0, False),  # the 2nd and 3rd largest tie: both kept
    (0, 0.9, 2.5, 0.7, True),  # masked (-inf) token: renormalised mass .30 .53 .70 .83 .94, keeps 5 (0.81: 4)
    (6, 0.87, 1.0, 1.0, False),  # renormalised over 6: .31 .54 .71 .85 .96, keeps 5 (0.783 would keep 4)
]


@pytest.mark.parametrize("block_v", [None, 4])
def test_draws_are_exactly_the_kept_set(block_v, device, poison):
    """The set of tokens drawn per configuration is exactly the top-k / top-p kept set computed here, on CFG-mixed,
    tempered logits; block_v=4 splits the V = 8 rows in two blocks of the multi-pass kernel."""
    gen = torch.Generator().manual_seed(3)
    rows, cases = [], []
    for k, p, w, t, masked in _TRUNC:
        target = _LOGP[torch.randperm(8, generator=gen)]
        uncond = torch.randn(8, generator=gen)
        cond = uncond + (target * t - uncond) / w  # l = target up to rounding
        if k == 2:  # an exact tie: c = u gives x = u
            tie = (target == _LOGP[1]) | (target == _LOGP[2])
            cond[tie] = uncond[tie] = _LOGP[1] * t
        if masked:
            cond[target == _LOGP[7]] = float("-inf")
        l = (uncond + w * (cond - uncond)) / t  # fp32, as the kernel computes it
        kept = _kept_set(l.tolist(), k, p)
        if p < 1.0:  # the cut is not within rounding of p
            assert _kept_set(l.tolist(), k, p - 0.005) == kept == _kept_set(l.tolist(), k, p + 0.005)
        seeds = _probe_seeds(l, kept)
        cases.append((kept, len(seeds)))
        rows += [(cond, uncond, w, t, k, p, s) for s in seeds]
    assert [len(c[0]) for c in cases] == [3, 3, 5, 5]
    cond, uncond = (torch.stack([r[i] for r in rows]).to(device) for i in (0, 1))
    w, t, p = (torch.tensor([r[i] for r in rows], device=device) for i in (2, 3, 5))
    k, seeds = (torch.tensor([r[i] for r in rows], device=device) for i in (4, 6))
    tok = cfg_sample(cond, uncond, w, t, k, p, seeds, False, block_v=block_v).cpu().tolist()
    for (kept, n), case in zip(cases, _TRUNC):
        assert set(tok[:n]) == kept, (case, tok[:n], kept)
        tok = tok[n:]


@pytest.mark.parametrize("block_v", [None, 16])
def test_top_k_one_is_argmax(block_v, device, poison):
    """top_k = 1 samples the argmax of the CFG-mixed logits, on seeds where the runner-up would otherwise win."""
    B, V = 8, 32
    gen = torch.Generator().manual_seed(4)
    cond, uncond = torch.randn(B, V, generator=gen), torch.randn(B, V, generator=gen)
    w, t = torch.linspace(0.5, 2.0, B), torch.linspace(0.7, 1.5, B)
    x = uncond + w[:, None] * (cond - uncond)
    score = (x / t[:, None]).double()[:, None, :] + _noise(V)  # [B, S, V]
    top2 = [set(row.topk(2).indices.tolist()) for row in x / t[:, None]]
    # per row the first seed where the runner-up would win a Gumbel-max over the top two (a kept k + 1)
    seeds = [int((_winner(s, top) == min(top, key=lambda j: x[b, j])).nonzero()[0]) + _SEED0
             for b, (s, top) in enumerate(zip(score, top2))]
    got = cfg_sample(cond.to(device), uncond.to(device), w.to(device), t.to(device), 1, 1.0,
                     torch.tensor(seeds, device=device), False, block_v=block_v)
    assert torch.equal(got.cpu(), x.argmax(dim=1))


def test_greedy_ties_across_blocks(device, poison):
    """Greedy ties resolve to the lowest index, as torch.argmax, within and across the multi-pass kernel's blocks."""
    V = 40
    cond, uncond = _rows(5, V, 21)
    ties = [(5, 20), (17, 33), (2, 18, 35), (30, 31, 39), (8, 9)]
    for r, idx in enumerate(ties):
        cond[r, list(idx)] = uncond[r, list(idx)] = 1e4
    w = torch.tensor([3.0, 0.0, 1.0, 5.0, 2.0])
    want = [idx[0] for idx in ties]
    assert (uncond + w[:, None] * (cond - uncond)).argmax(dim=1).tolist() == want
    cond, uncond, w = cond.to(device), uncond.to(device), w.to(device)
    for block_v in (None, 16, 8):
        assert cfg_sample(cond, uncond, w, greedy=True, block_v=block_v).tolist() == want, block_v
        assert cfg_sample(cond, None, greedy=True, block_v=block_v).tolist() == want, block_v


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
