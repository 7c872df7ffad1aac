"""paged_decode_attention against the plain PyTorch reference, split-K forced on and off."""
import pytest
import torch

from janus_rt import kernels as K
from janus_rt.kernels import paged_attention
from janus_rt.kernels.paged_attention import _auto_num_splits, paged_decode_attention_ref
from paged_layout import paged_layout
from tolerances import assert_same_roundings


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every float buffer the launcher allocates (output, split partials) starts as NaN."""
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: (lambda t: t.fill_(float("nan")) if t.is_floating_point()
                                                          else t)(empty(*a, **kw)))


def abs_err(a, b):
    return (a.float() - b.float()).abs().max().item()


def paged_case(context_lens, heads, head_dim, block_size, device, dtype=torch.float32, seed=0):
    """A cache with pages scattered at random (and spare pages full of noise) for the given context lengths."""
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(1, -(-max(context_lens) // block_size)) + 1  # one spare column in the table
    num_blocks = len(context_lens) * max_blocks + 3
    k_cache = torch.randn(num_blocks, block_size, heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, block_size, heads, head_dim, generator=g)
    tables = torch.randperm(num_blocks, generator=g)[:len(context_lens) * max_blocks].view(len(context_lens), -1)
    q = torch.randn(len(context_lens), heads, head_dim, generator=g)
    to = lambda t: t.to(device, dtype)
    return (to(q), to(k_cache), to(v_cache), tables.to(device, torch.int32),
            torch.tensor(context_lens, dtype=torch.int32, device=device))


@pytest.mark.parametrize("variant", ["block", "slots"])
@pytest.mark.parametrize("num_splits", [1, 3, None])
@pytest.mark.parametrize("block_size,heads,head_dim", [(16, 3, 64), (32, 1, 128), (16, 5, 48)])
def test_fp32(block_size, heads, head_dim, num_splits, variant, device):
    # lengths: 1 token, not multiples of the block size, exact multiples, and one long enough for several splits
    args = paged_case([1, 37, 64, 161, 96], heads, head_dim, block_size, device)
    out = K.paged_decode_attention(*args, num_splits=num_splits, variant=variant)
    ref = paged_decode_attention_ref(*args)
    assert out.shape == args[0].shape
    assert abs_err(out, ref) / ref.abs().max().item() <= 1e-4


@pytest.mark.parametrize("variant", ["block", "slots"])
@pytest.mark.parametrize("block_n", [16, 64])
def test_block_n(variant, block_n, device):
    # tokens per program step other than each variant's default, split and not
    args = paged_case([1, 37, 161], 2, 64, 16, device)
    ref = paged_decode_attention_ref(*args)
    for num_splits in (1, 3):
        out = K.paged_decode_attention(*args, num_splits=num_splits, variant=variant, block_n=block_n)
        assert abs_err(out, ref) / ref.abs().max().item() <= 1e-4


@pytest.mark.parametrize("variant", ["block", "slots"])
@pytest.mark.parametrize("num_splits", [1, 9])
def test_many_empty_splits_and_zero_context(num_splits, variant, device):
    # 9 splits of 64 tokens over contexts of at most 100: most splits are empty; context 0 gives a zero row (split or
    # not: the slots variant merges slots that never saw a token)
    q, kc, vc, tables, lens = paged_case([0, 100, 5], 2, 64, 16, device)
    tables = torch.cat([tables, tables, tables], dim=1)  # more table columns than the contexts need
    out = K.paged_decode_attention(q, kc, vc, tables, lens, 0.2, num_splits=num_splits, variant=variant)
    ref = paged_decode_attention_ref(q, kc, vc, tables, lens, 0.2)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert abs_err(out, ref) / ref.abs().max().item() <= 1e-4


@pytest.mark.parametrize("variant", ["block", "slots"])
@pytest.mark.parametrize("num_splits", [1, 2])
def test_keys_scoring_minus_inf_weigh_nothing(num_splits, variant, device):
    # A row whose first tokens score -inf (keys of -inf against a positive q; only non-finite inputs do this): those
    # tokens weigh 0 as in torch's softmax, whichever step or split holds them; the "block" kernel's first step
    # scoring all -inf had made its row NaN (exp2(-inf - -inf)).
    q, kc, vc, tables, lens = paged_case([100, 40], 2, 64, 16, device)
    q = q.abs() + 0.1
    for b in range(2):
        for t in range(36):  # the first 36 tokens of each row: more than one 16- or 32-token step of them
            kc[tables[b, t // 16], t % 16] = float("-inf")
    ref = paged_decode_attention_ref(q, kc, vc, tables, lens)
    assert ref.isfinite().all()
    out = K.paged_decode_attention(q, kc, vc, tables, lens, num_splits=num_splits, variant=variant, block_n=16)
    assert abs_err(out, ref) / ref.abs().max().item() <= 1e-4


@pytest.mark.parametrize("variant", ["block", "slots"])
@pytest.mark.parametrize("num_splits", [3, None])
def test_wide_tables_split_rows_as_exact_ones(num_splits, variant, device, monkeypatch):
    # The engine's CUDA graphs hold tables sized for the longest sequence (max_model_len), far wider than the
    # contexts: each row must still be cut into splits by its own length, so the wide table gives exactly the exact
    # one's result (before, the splits followed the table's width and a short row's work all fell in its first).
    # None: the automatic count (made 8 here, as a GPU's many SMs would ask for a small batch), then at most one split
    # per 128 tokens of a row: 1 for the short rows, 2 for the 161-token one.
    monkeypatch.setattr(paged_attention, "_auto_num_splits", lambda *a: 8)
    q, kc, vc, tables, lens = paged_case([1, 37, 161, 96, 0], 2, 64, 16, device)
    wide = torch.cat([tables, torch.zeros(tables.shape[0], 256 - tables.shape[1], dtype=tables.dtype,
                                          device=device)], dim=1)
    exact = K.paged_decode_attention(q, kc, vc, tables, lens, num_splits=num_splits, variant=variant)
    assert torch.equal(K.paged_decode_attention(q, kc, vc, wide, lens, num_splits=num_splits, variant=variant), exact)
    ref = paged_decode_attention_ref(q, kc, vc, tables, lens)
    assert abs_err(exact, ref) / ref.abs().max().item() <= 1e-4


@pytest.mark.parametrize("variant", ["block", "slots"])
@pytest.mark.parametrize("want", [1, 2, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_size_does_not_change_the_result(want, dtype, variant, device, monkeypatch):
    # The same context in pages of 16, 5, 32 or 1 tokens gives the same bits: a program steps BLOCK_N tokens
    # whatever the page size, and a row's splits follow its own length (min(want, ceil(ctx / 128))), not the
    # table's width. want: the automatic count's share from the batch (1: no split path; 2, 8: 1-2 splits a row).
    monkeypatch.setattr(paged_attention, "_auto_num_splits",
                        lambda b, h, max_context, sms: min(want, -(-max_context // 128)))
    lens = [1, 40, 250, 129, 0]  # tables of 272, 255, 288, 251 slots: 3, 2, 3, 2 splits of 128 (want 8)
    g = torch.Generator().manual_seed(3)
    rows = [torch.randn(n, 2, 2, 32, generator=g).to(dtype) for n in lens]  # token, (k, v), head, dim
    q = torch.randn(len(lens), 2, 32, generator=g).to(device, dtype)
    cl = torch.tensor(lens, dtype=torch.int32, device=device)
    outs = {}
    for bs in (16, 5, 32, 1):
        cache, tables = paged_layout(rows, bs, g, spare_columns=1)
        kc, vc = (cache[:, :, i].contiguous().to(device) for i in (0, 1))
        outs[bs] = K.paged_decode_attention(q, kc, vc, tables.to(device), cl, variant=variant)
    for bs, o in outs.items():
        assert torch.equal(o, outs[16]), f"page size {bs}"


@pytest.mark.parametrize("variant", ["block", "slots"])
@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype, num_splits, variant, device):
    args = paged_case([3, 70, 129], 3, 128, 16, device, dtype)
    exact = paged_decode_attention_ref(*(a.float() if a.is_floating_point() else a for a in args))
    torch_err = abs_err(paged_decode_attention_ref(*args, upcast=False), exact)
    out = K.paged_decode_attention(*args, num_splits=num_splits, variant=variant)
    assert out.dtype == dtype
    assert abs_err(out, exact) <= 2 * torch_err
    assert_same_roundings(out, exact.to(dtype), "out")  # fp32 math, one rounding of the output


def test_auto_num_splits():
    assert _auto_num_splits(32, 16, 608, 132) == 1      # 512 programs already fill two waves
    assert _auto_num_splits(1, 16, 4096, 132) == 17
    assert _auto_num_splits(2, 16, 608, 132) == 5       # capped by 128-token splits
    assert _auto_num_splits(4, 16, 100, 132) == 1


def test_misuse_raises(device):
    q, kc, vc, tables, lens = paged_case([5, 9], 2, 64, 16, device)
    bad = [
        lambda: K.paged_decode_attention(q.half(), kc, vc, tables, lens),                        # dtype mismatch
        lambda: K.paged_decode_attention(q, kc, vc, tables.long(), lens),                        # int64 tables
        lambda: K.paged_decode_attention(q, kc, vc, tables, lens[:1]),                           # batch mismatch
        lambda: K.paged_decode_attention(q, kc[:, :, :1], vc[:, :, :1], tables, lens),           # heads differ
        lambda: K.paged_decode_attention(q[0], kc, vc, tables, lens),                            # q not 3-D
        lambda: K.paged_decode_attention(q, kc, vc, tables, lens, num_splits=0),
        lambda: K.paged_decode_attention(q, kc, vc, tables, lens, variant="rows"),               # no such variant
        lambda: K.paged_decode_attention(q, kc, vc, tables, lens, block_n=24),                   # not a power of 2
        lambda: K.paged_decode_attention(q, kc, vc, tables, lens, block_n=8),                    # below 16
        lambda: K.paged_decode_attention(q[..., :40], kc[..., :40], vc[..., :40], tables, lens),  # D = 40
    ]
    for i, call in enumerate(bad):
        with pytest.raises(ValueError):
            call()
            pytest.fail(f"case {i} did not raise")
