"""Decode attention: one query token per sequence against a paged KV cache, with a split-K path.

The cache is [num_blocks, block_size, H, D]; sequence b's token t lives in page block_tables[b, t // block_size]
at offset t % block_size. Each program streams BLOCK_N tokens of one (sequence, head) per step: every token row
of a head is D contiguous elements, so a step is BLOCK_N coalesced row loads of K and of V. Split-K cuts the
context into num_splits ranges whose partial softmax statistics a second kernel merges, so a small batch still
fills the GPU. Two forward kernels: "block" reduces each step's tokens into one running softmax (a max, a sum and
p @ v across the program's warps every step), "slots" keeps a running softmax per token slot of a step and merges
them once at the end (no cross-warp reduction, no barrier inside its loop; more accumulator registers).
"""
import math

import torch
import triton
import triton.language as tl

from .utils import check, check_tensor, interpreting, next_pow2, round_bf16

_LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MIN_SPLIT_TOKENS = 128  # a split shorter than this costs more in the merge than it gains in parallelism


@triton.jit
def _program_setup(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, stride_qb, stride_qh,
                   stride_kh, stride_vh, stride_bt, num_heads, num_splits, min_split, qk_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    # grid: (B * H, num_splits). Sequence b's own context ctx is cut into n = min(num_splits, ceil(ctx / min_split))
    # ranges of split_len = ceil(ceil(ctx / n) / BLOCK_N) * BLOCK_N tokens (at least 1 range); program (bh, s) covers
    # [s * split_len, (s + 1) * split_len) ∩ [0, ctx) of sequence b, head h (empty for s >= n). From the row's own
    # length, not the table's width, so a table sized for the longest possible sequence (the CUDA graphs') spreads a
    # short row over its splits as an exact-width table does, with the same results.
    # -> b, h, lo, hi, offs_d, d_mask, its scaled query [BLOCK_D] (log2 domain), and the pointers to head h of the
    # caches and to b's block table
    pid_bh = tl.program_id(0)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    ctx = tl.load(context_lens_ptr + b)
    n_split = tl.maximum(tl.minimum((ctx + min_split - 1) // min_split, num_splits), 1)
    split_len = ((ctx + n_split - 1) // n_split + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    lo = tl.program_id(1) * split_len
    hi = tl.minimum(ctx, lo + split_len)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + h * stride_qh + offs_d, mask=d_mask, other=0.0)
    q = q.to(tl.float32) * qk_scale
    return (b, h, lo, hi, offs_d, d_mask, q, k_cache_ptr + h * stride_kh, v_cache_ptr + h * stride_vh,
            block_tables_ptr + b.to(tl.int64) * stride_bt)


@triton.jit
def _load_step(k_head, v_head, table, start, hi, offs_d, d_mask, stride_kb, stride_ks, stride_vb, stride_vs,
               BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr):
    # one step's tokens [start, start + BLOCK_N) ∩ [.., hi): n_mask [BLOCK_N], k and v [BLOCK_N, BLOCK_D] (0 past hi)
    offs_n = start + tl.arange(0, BLOCK_N)
    n_mask = offs_n < hi
    page = tl.load(table + offs_n // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
    row = offs_n % PAGE_SIZE
    mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(k_head + (page * stride_kb + row * stride_ks)[:, None] + offs_d[None, :], mask=mask, other=0.0)
    v = tl.load(v_head + (page * stride_vb + row * stride_vs)[:, None] + offs_d[None, :], mask=mask, other=0.0)
    return n_mask, k, v


@triton.jit
def _store_result(acc, m, l, b, h, offs_d, d_mask, o_ptr, part_o_ptr, part_lse_ptr, stride_ob, stride_oh, num_splits,
                  HEAD_DIM: tl.constexpr, SPLIT: tl.constexpr, ROUND_BF16: tl.constexpr):
    # the program's softmax state (acc [BLOCK_D] = sum of p v, l = sum of p, m = max score) -> o = acc / l, or with
    # SPLIT its partial (o, lse). An empty range (context 0, or a split past the end) has l = 0: output 0, lse -inf.
    l_safe = tl.where(l > 0, l, 1.0)
    o = acc / l_safe
    if SPLIT:
        part = tl.program_id(0).to(tl.int64) * num_splits + tl.program_id(1)
        tl.store(part_o_ptr + part * HEAD_DIM + offs_d, o, mask=d_mask)
        tl.store(part_lse_ptr + part, tl.where(l > 0, m + tl.log2(l_safe), float("-inf")))
    else:
        o_offs = b.to(tl.int64) * stride_ob + h * stride_oh + offs_d
        if ROUND_BF16:
            o = round_bf16(o)
        tl.store(o_ptr + o_offs, o.to(o_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def _paged_decode_attention_fwd_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, o_ptr, part_o_ptr, part_lse_ptr,
        stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
        stride_ob, stride_oh, num_heads, num_splits, min_split, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
        SPLIT: tl.constexpr, ROUND_BF16: tl.constexpr):
    # One online softmax per program, each step's BLOCK_N tokens reduced into it.
    b, h, lo, hi, offs_d, d_mask, q, k_head, v_head, table = _program_setup(
        q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, stride_qb, stride_qh, stride_kh,
        stride_vh, stride_bt, num_heads, num_splits, min_split, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N)
    m_i = float("-inf")
    l_i = 0.0
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n_mask, k, v = _load_step(k_head, v_head, table, start, hi, offs_d, d_mask, stride_kb, stride_ks, stride_vb,
                                  stride_vs, BLOCK_N, PAGE_SIZE)
        s = tl.sum(k.to(tl.float32) * q[None, :], 1)  # [BLOCK_N]
        s = tl.where(n_mask, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # every score so far -inf: alpha = p = 0, not NaN
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
        l_i = l_i * alpha + tl.sum(p, 0)
        m_i = m_new
    _store_result(acc, m_i, l_i, b, h, offs_d, d_mask, o_ptr, part_o_ptr, part_lse_ptr, stride_ob, stride_oh,
                  num_splits, HEAD_DIM, SPLIT, ROUND_BF16)


@triton.jit
def _paged_decode_attention_fwd_slots_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, o_ptr, part_o_ptr, part_lse_ptr,
        stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
        stride_ob, stride_oh, num_heads, num_splits, min_split, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
        SPLIT: tl.constexpr, ROUND_BF16: tl.constexpr):
    # As _paged_decode_attention_fwd_kernel (same grid, inputs and outputs), but each of the BLOCK_N token slots of a
    # step keeps its own online softmax (m, l: [BLOCK_N]; acc: [BLOCK_N, BLOCK_D]) over the tokens it sees (slot j:
    # tokens lo + j, lo + j + BLOCK_N, ...), merged once after the loop. A step then has no reduction over tokens
    # (the other kernel's max, sum and p @ v across warps, each a shared-memory round trip and a barrier per step):
    # only each token's q . k over D. Costs an accumulator of BLOCK_N x BLOCK_D fp32 in registers.
    b, h, lo, hi, offs_d, d_mask, q, k_head, v_head, table = _program_setup(
        q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, stride_qb, stride_qh, stride_kh,
        stride_vh, stride_bt, num_heads, num_splits, min_split, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N)
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n_mask, k, v = _load_step(k_head, v_head, table, start, hi, offs_d, d_mask, stride_kb, stride_ks, stride_vb,
                                  stride_vs, BLOCK_N, PAGE_SIZE)
        s = tl.sum(k.to(tl.float32) * q[None, :], 1)  # [BLOCK_N]
        s = tl.where(n_mask, s, float("-inf"))
        m_new = tl.maximum(m, s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a slot with no token yet: alpha = p = 0, not NaN
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe)
        acc = acc * alpha[:, None] + p[:, None] * v.to(tl.float32)
        l = l * alpha + p
        m = m_new
    # merge the slots (those that saw no token, m = -inf, weigh 0), then store as the other kernel does
    m_all = tl.max(m, 0)
    w = tl.exp2(m - tl.where(m_all == float("-inf"), 0.0, m_all))
    _store_result(tl.sum(acc * w[:, None], 0), m_all, tl.sum(l * w, 0), b, h, offs_d, d_mask, o_ptr, part_o_ptr,
                  part_lse_ptr, stride_ob, stride_oh, num_splits, HEAD_DIM, SPLIT, ROUND_BF16)


@triton.jit
def _paged_decode_attention_reduce_kernel(
        part_o_ptr, part_lse_ptr, o_ptr, stride_ob, stride_oh, num_heads, num_splits,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, ROUND_BF16: tl.constexpr):
    # grid: (B * H,); merges the num_splits partial (o, lse) pairs of one (sequence, head)
    pid_bh = tl.program_id(0)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    part = pid_bh.to(tl.int64) * num_splits + offs_s
    lse = tl.load(part_lse_ptr + part, mask=s_mask, other=float("-inf"))  # [BLOCK_S]
    m = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))  # all splits empty: every weight 0
    parts = tl.load(part_o_ptr + part[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=s_mask[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)  # [BLOCK_S, BLOCK_D]
    w_sum = tl.sum(w, 0)
    o = tl.sum(w[:, None] * parts, 0) / tl.where(w_sum > 0, w_sum, 1.0)
    if ROUND_BF16:
        o = round_bf16(o)
    tl.store(o_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d, o.to(o_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


_VARIANTS = {"block": _paged_decode_attention_fwd_kernel, "slots": _paged_decode_attention_fwd_slots_kernel}


def _auto_num_splits(batch: int, heads: int, max_context: int, sm_count: int) -> int:
    """Enough (sequence, head, split) programs for about two waves of the GPU, splits >= _MIN_SPLIT_TOKENS."""
    want = triton.cdiv(2 * sm_count, max(1, batch * heads))
    return max(1, min(want, triton.cdiv(max_context, _MIN_SPLIT_TOKENS)))


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, sm_scale=None, *,
                           num_splits: int | None = None, variant: str = "block", block_n: int | None = None):
    """Single-token attention over a paged KV cache.

    q: [B, H, D]; k_cache, v_cache: [num_blocks, block_size, H, D] (q's dtype; fp16/bf16/fp32; D a multiple of
    16 up to 256); block_tables: int32 [B, max_blocks]; context_lens: int32 [B], each <= max_blocks * block_size
    (not checked: it would need a device sync). A context of 0 gives a zero output row.
    num_splits: split-K ranges per sequence, each sequence's own context cut into that many (BLOCK_N-aligned; those
    past its end empty); None picks from batch, heads and max_blocks * block_size, and then cuts a sequence into no
    more ranges than make _MIN_SPLIT_TOKENS tokens each (so a table wider than the contexts, as the engine's CUDA
    graphs hold, splits each row as an exact-width table would).
    variant: "block" (one online softmax per program, its BLOCK_N tokens reduced every step) or "slots" (one per
    token slot of a step, merged once at the end: no cross-warp reduction inside the loop; the same results up to
    summation order, not yet timed on a GPU). block_n: tokens per step of a program, a power of two >= 16; None:
    "block" 64 (32 past head_dim 128), "slots" 32 (16 past 128), where both compile to 96 registers a thread for
    sm_90 at head_dim 128 (ptxas; "slots" at 64 takes 168).
    Returns o: [B, H, D] in q's dtype.
    """
    check_tensor(q, "q", ndim=3, dtypes=_DTYPES)
    check_tensor(k_cache, "k_cache", ndim=4, dtypes=(q.dtype,), device=q.device)
    check_tensor(v_cache, "v_cache", ndim=4, dtypes=(q.dtype,), device=q.device)
    check_tensor(block_tables, "block_tables", ndim=2, dtypes=(torch.int32,), device=q.device)
    check_tensor(context_lens, "context_lens", ndim=1, dtypes=(torch.int32,), device=q.device)
    batch, heads, head_dim = q.shape
    num_blocks, block_size = k_cache.shape[:2]
    check(k_cache.shape == v_cache.shape, f"k_cache {tuple(k_cache.shape)} != v_cache {tuple(v_cache.shape)}")
    check(k_cache.shape[2:] == (heads, head_dim),
          f"cache heads/head_dim {tuple(k_cache.shape[2:])} != q's {(heads, head_dim)}")
    check(head_dim % 16 == 0 and 16 <= head_dim <= 256,
          f"head_dim must be a multiple of 16 in [16, 256], got {head_dim}")
    check(block_size >= 1, "block_size must be >= 1")
    check(block_tables.shape[0] == batch and context_lens.shape[0] == batch,
          f"block_tables {tuple(block_tables.shape)} / context_lens {tuple(context_lens.shape)} != batch {batch}")
    check(num_splits is None or (isinstance(num_splits, int) and num_splits >= 1),
          f"num_splits must be None or an int >= 1, got {num_splits}")
    check(variant in _VARIANTS, f"variant must be one of {sorted(_VARIANTS)}, got {variant!r}")
    check(block_n is None or (isinstance(block_n, int) and block_n >= 16 and block_n & (block_n - 1) == 0),
          f"block_n must be None or a power of two >= 16, got {block_n}")
    q, k_cache, v_cache = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k_cache, v_cache))
    block_tables, context_lens = block_tables.contiguous(), context_lens.contiguous()

    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)
    max_context = block_tables.shape[1] * block_size
    min_split = 1  # a row's splits: as many as asked, however short
    if num_splits is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1
        num_splits = _auto_num_splits(batch, heads, max_context, sms)
        min_split = _MIN_SPLIT_TOKENS  # and per row no more than its own context fills
    if block_n is None:
        block_n = (64 if variant == "block" else 32) // (1 if head_dim <= 128 else 2)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if batch * heads == 0:
        return o
    block_d = next_pow2(head_dim)
    split = num_splits > 1
    emulate_rtne = interpreting() and q.dtype == torch.bfloat16  # the interpreter's bf16 cast truncates
    part_o = torch.empty((batch, heads, num_splits, head_dim) if split else (1,), dtype=torch.float32,
                         device=q.device)
    part_lse = torch.empty((batch, heads, num_splits) if split else (1,), dtype=torch.float32, device=q.device)
    _VARIANTS[variant][(batch * heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, o, part_o, part_lse,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0), o.stride(0), o.stride(1),
        heads, num_splits, min_split, scale * _LOG2E,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=block_n, PAGE_SIZE=block_size, SPLIT=split,
        ROUND_BF16=emulate_rtne, num_warps=4, num_stages=2)
    if split:
        _paged_decode_attention_reduce_kernel[(batch * heads,)](
            part_o, part_lse, o, o.stride(0), o.stride(1), heads, num_splits,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=max(2, next_pow2(num_splits)),
            ROUND_BF16=emulate_rtne, num_warps=4)
    return o


def paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, sm_scale=None,
                               upcast: bool = True):
    """Plain PyTorch: gather each sequence's pages, softmax in fp32. upcast=False keeps the products in q's
    dtype (the 'PyTorch's own low-precision error' baseline). Shapes as paged_decode_attention."""
    batch, heads, head_dim = q.shape
    block_size = k_cache.shape[1]
    scale = head_dim ** -0.5 if sm_scale is None else sm_scale
    dt = torch.float32 if upcast else q.dtype
    o = torch.zeros_like(q)
    for b in range(batch):
        n = int(context_lens[b])
        if n == 0:
            continue
        pages = block_tables[b, :triton.cdiv(n, block_size)].long()
        k = k_cache[pages].reshape(-1, heads, head_dim)[:n].to(dt)  # [n, H, D]
        v = v_cache[pages].reshape(-1, heads, head_dim)[:n].to(dt)
        s = torch.einsum("hd,nhd->hn", q[b].to(dt), k).float() * scale
        p = torch.softmax(s, dim=-1).to(dt)
        o[b] = torch.einsum("hn,nhd->hd", p, v).to(q.dtype)
    return o
