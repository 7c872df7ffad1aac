"""Fused scaled-dot-product attention with an online softmax (flash-attention style), forward and backward.

Dense batches: q [B, Tq, H, D], k/v [B, Tk, H, D]. Packed documents (varlen): q/k/v [total, H, D] with
cu_seqlens int32 [n + 1]; no query attends across a document boundary. Causal masks align bottom-right: query i
attends keys j <= i + Tk - Tq (chunked prefill). head_dim D: a multiple of 16 up to 512 (padded to a power of
two inside the kernel). Scores, softmax statistics and accumulators are fp32 whatever the input dtype.
"""
import math

import torch
import triton
import triton.language as tl

from .utils import check, check_tensor, interpreting, next_pow2, round_bf16

_LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _seq_range(cu_seqlens_ptr, b, seqlen_q, seqlen_k, VARLEN: tl.constexpr):
    # -> (first packed row, Tq, Tk) of sequence b; a dense batch starts every sequence at row 0.
    row0 = 0
    len_q = seqlen_q
    len_k = seqlen_k
    if VARLEN:
        start = tl.load(cu_seqlens_ptr + b)
        len_q = tl.load(cu_seqlens_ptr + b + 1) - start
        len_k = len_q
        row0 = start.to(tl.int64)
    return row0, len_q, len_k


@triton.jit
def _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, len_k, shift, lo, hi,
               qk_scale, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
               CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # acc: [BLOCK_M, BLOCK_D]; m_i, l_i: [BLOCK_M] (log2 domain); key blocks [lo, hi)
    d_mask = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = d_mask[None, :]
        if MASKED:
            kv_mask = kv_mask & (offs_n < len_k)[:, None]
        k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        if MASKED:
            valid = (offs_n < len_k)[None, :]
            if CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None] + shift)
            qk = tl.where(valid, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row's scores so far all -inf: alpha = p = 0
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _flash_attention_fwd_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, cu_seqlens_ptr,
        stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
        stride_ob, stride_ot, stride_oh, stride_lb, stride_lh,
        seqlen_q, seqlen_k, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, VARLEN: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    start_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    row0, len_q, len_k = _seq_range(cu_seqlens_ptr, b, seqlen_q, seqlen_k, VARLEN)
    if start_m * BLOCK_M >= len_q:
        return
    shift = len_k - len_q  # bottom-right causal alignment
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < len_q
    d_mask = offs_d < HEAD_DIM
    q_base = q_ptr + b * stride_qb + h * stride_qh + row0 * stride_qt
    k_base = k_ptr + b * stride_kb + h * stride_kh + row0 * stride_kt
    v_base = v_ptr + b * stride_vb + h * stride_vh + row0 * stride_vt
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=m_mask[:, None] & d_mask[None, :],
                other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # Key blocks [0, n_full) need no mask for any row of this query block; [n_full, hi) are masked.
    if CAUSAL:
        hi = tl.minimum(len_k, start_m * BLOCK_M + BLOCK_M + shift)
        n_full = tl.minimum(len_k, start_m * BLOCK_M + shift + 1) // BLOCK_N * BLOCK_N
    else:
        hi = len_k
        n_full = len_k // BLOCK_N * BLOCK_N
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, len_k,
                               shift, 0, n_full, qk_scale, HEAD_DIM, BLOCK_N, False, CAUSAL, UPCAST, PRECISION)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, len_k,
                               shift, n_full, hi, qk_scale, HEAD_DIM, BLOCK_N, True, CAUSAL, UPCAST, PRECISION)

    o = acc / l_i[:, None]
    if UPCAST:
        o = round_bf16(o)
    o_base = o_ptr + b * stride_ob + h * stride_oh + row0 * stride_ot
    tl.store(o_base + offs_m[:, None] * stride_ot + offs_d[None, :], o.to(o_ptr.dtype.element_ty),
             mask=m_mask[:, None] & d_mask[None, :])
    tl.store(lse_ptr + b * stride_lb + h * stride_lh + row0 + offs_m, m_i + tl.log2(l_i), mask=m_mask)


@triton.jit
def _flash_attention_bwd_preprocess_kernel(
        o_ptr, do_ptr, delta_ptr, cu_seqlens_ptr, stride_qb, stride_qt, stride_qh, stride_lb, stride_lh,
        seqlen_q, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
        VARLEN: tl.constexpr):
    # delta[row] = sum_d o * do  (o and do share q's contiguous layout)
    start_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    row0, len_q, _ = _seq_range(cu_seqlens_ptr, b, seqlen_q, seqlen_q, VARLEN)
    if start_m * BLOCK_M >= len_q:
        return
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < len_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    offs = b * stride_qb + h * stride_qh + (row0 + offs_m)[:, None] * stride_qt + offs_d[None, :]
    o = tl.load(o_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(delta_ptr + b * stride_lb + h * stride_lh + row0 + offs_m, tl.sum(o * do, 1), mask=offs_m < len_q)


@triton.jit
def _flash_attention_bwd_dkdv_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, cu_seqlens_ptr,
        stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_lb, stride_lh,
        seqlen_q, seqlen_k, sm_scale, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, VARLEN: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # one key block per program; loops over the query blocks that see it. q/do/dq share one layout, k/v/dk/dv another.
    start_n = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    row0, len_q, len_k = _seq_range(cu_seqlens_ptr, b, seqlen_q, seqlen_k, VARLEN)
    if start_n * BLOCK_N >= len_k:
        return
    shift = len_k - len_q
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    kv_mask = (offs_n < len_k)[:, None] & d_mask[None, :]
    kv_base = b * stride_kb + h * stride_kh + row0 * stride_kt
    kv_offs = kv_base + offs_n[:, None] * stride_kt + offs_d[None, :]
    k = tl.load(k_ptr + kv_offs, mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + kv_offs, mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    q_base = b * stride_qb + h * stride_qh + row0 * stride_qt
    l_base = b * stride_lb + h * stride_lh + row0
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo = 0
    if CAUSAL:  # queries i < start_n * BLOCK_N - shift see none of these keys
        lo = tl.maximum(start_n * BLOCK_N - shift, 0) // BLOCK_M * BLOCK_M
    for start_m in range(lo, len_q, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_mask = offs_m < len_q
        q_offs = q_base + offs_m[:, None] * stride_qt + offs_d[None, :]
        q = tl.load(q_ptr + q_offs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        do = tl.load(do_ptr + q_offs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(lse_ptr + l_base + offs_m, mask=m_mask, other=0.0)
        delta = tl.load(delta_ptr + l_base + offs_m, mask=m_mask, other=0.0)
        qk_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
        valid = m_mask[None, :]
        if CAUSAL:
            valid = valid & (offs_n[:, None] <= offs_m[None, :] + shift)
        p_t = tl.exp2(tl.where(valid, qk_t, float("-inf")) - lse[None, :])
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # [BLOCK_N, BLOCK_M]
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
    dk = dk * sm_scale
    if UPCAST:
        dk = round_bf16(dk)
        dv = round_bf16(dv)
    tl.store(dk_ptr + kv_offs, dk.to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + kv_offs, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _flash_attention_bwd_dq_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, cu_seqlens_ptr,
        stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_lb, stride_lh,
        seqlen_q, seqlen_k, sm_scale, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, VARLEN: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # one query block per program; loops over the key blocks it sees
    start_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    row0, len_q, len_k = _seq_range(cu_seqlens_ptr, b, seqlen_q, seqlen_k, VARLEN)
    if start_m * BLOCK_M >= len_q:
        return
    shift = len_k - len_q
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q_mask = (offs_m < len_q)[:, None] & d_mask[None, :]
    q_offs = b * stride_qb + h * stride_qh + (row0 + offs_m)[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(q_ptr + q_offs, mask=q_mask, other=0.0)
    do = tl.load(do_ptr + q_offs, mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    l_offs = b * stride_lb + h * stride_lh + row0 + offs_m
    lse = tl.load(lse_ptr + l_offs, mask=offs_m < len_q, other=0.0)
    delta = tl.load(delta_ptr + l_offs, mask=offs_m < len_q, other=0.0)
    kv_base = b * stride_kb + h * stride_kh + row0 * stride_kt
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    hi = len_k
    if CAUSAL:
        hi = tl.minimum(len_k, start_m * BLOCK_M + BLOCK_M + shift)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_offs = kv_base + offs_n[:, None] * stride_kt + offs_d[None, :]
        kv_mask = (offs_n < len_k)[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + kv_offs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + kv_offs, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        valid = (offs_n < len_k)[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None] + shift)
        p = tl.exp2(tl.where(valid, qk, float("-inf")) - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    dq = dq * sm_scale
    if UPCAST:
        dq = round_bf16(dq)
    tl.store(dq_ptr + q_offs, dq.to(dq_ptr.dtype.element_ty), mask=q_mask)


# (BLOCK_M, BLOCK_N, num_warps, num_stages) by padded head_dim in 16-bit units (fp32 counts double):
# bounded by H100 shared memory (k/v tiles x stages) and registers (fp32 accumulators).
_FWD_CONFIGS = {64: (128, 64, 4, 3), 128: (128, 64, 8, 3), 256: (64, 32, 8, 2), 512: (32, 32, 8, 1),
                1024: (16, 16, 4, 1)}
_BWD_CONFIGS = {64: (32, 64, 4, 3), 128: (32, 64, 8, 2), 256: (16, 32, 8, 1), 512: (16, 16, 8, 1),
                1024: (16, 16, 8, 1)}


def _config(table: dict, block_d: int, dtype: torch.dtype) -> tuple:
    size = max(64, block_d * (2 if dtype == torch.float32 else 1))
    return table[size]


def _kernel_flags(dtype: torch.dtype) -> dict:
    # The interpreter multiplies bf16 bit patterns in tl.dot (triton #11584) and truncates fp32 -> bf16:
    # UPCAST dots in fp32 and rounds outputs explicitly there.
    upcast = interpreting() and dtype == torch.bfloat16
    return dict(UPCAST=upcast, PRECISION="ieee" if upcast or dtype == torch.float32 else "tf32")


class _Layout:
    """Sizes and strides shared by the dense ([B, T, H, D]) and packed ([total, H, D]) layouts."""

    def __init__(self, q, k, cu_seqlens, max_seqlen):
        self.varlen = cu_seqlens is not None
        if self.varlen:
            self.batch, self.seqlen_q, self.seqlen_k = cu_seqlens.numel() - 1, max_seqlen, max_seqlen
            self.lse_shape = (q.shape[1], q.shape[0])  # [H, total]
            self.lse_strides = (0, q.shape[0])
        else:
            self.batch, self.seqlen_q, self.seqlen_k = q.shape[0], q.shape[1], k.shape[1]
            self.lse_shape = (q.shape[0], q.shape[2], q.shape[1])  # [B, H, Tq]
            self.lse_strides = (q.shape[2] * q.shape[1], q.shape[1])
        self.heads, self.head_dim = q.shape[-2], q.shape[-1]
        self.block_d = max(16, next_pow2(self.head_dim))
        self.cu_seqlens = cu_seqlens if self.varlen else q  # a dense batch never reads it: any pointer will do
        # grid (query blocks, heads, sequences): CUDA takes at most 65535 in grid dims y and z
        check(self.heads <= 65535 and self.batch <= 65535,
              f"at most 65535 heads and 65535 sequences (documents) a call, got {self.heads} and {self.batch}")

    def strides(self, x):  # (batch, token, head)
        return (0, x.stride(0), x.stride(1)) if self.varlen else (x.stride(0), x.stride(1), x.stride(2))


def _attention_fwd(q, k, v, cu_seqlens, max_seqlen, causal, sm_scale):
    """-> o (q's shape and dtype), lse (fp32, log2 units; [B, H, Tq] or [H, total])."""
    lay = _Layout(q, k, cu_seqlens, max_seqlen)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(lay.lse_shape, dtype=torch.float32, device=q.device)
    block_m, block_n, num_warps, num_stages = _config(_FWD_CONFIGS, lay.block_d, q.dtype)
    grid = (triton.cdiv(lay.seqlen_q, block_m), lay.heads, lay.batch)  # (CUDA caps grid y and z at 65535)
    if grid[0] * grid[1] * grid[2] == 0:
        return o, lse
    _flash_attention_fwd_kernel[grid](
        q, k, v, o, lse, lay.cu_seqlens, *lay.strides(q), *lay.strides(k), *lay.strides(v), *lay.strides(o),
        *lay.lse_strides, lay.seqlen_q, lay.seqlen_k, sm_scale * _LOG2E,
        HEAD_DIM=lay.head_dim, BLOCK_D=lay.block_d, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal,
        VARLEN=lay.varlen, **_kernel_flags(q.dtype), num_warps=num_warps, num_stages=num_stages)
    return o, lse


def _attention_bwd(do, q, k, v, o, lse, cu_seqlens, max_seqlen, causal, sm_scale):
    """q, k, v, o contiguous (q/o/do share strides, k/v too) -> dq, dk, dv."""
    lay = _Layout(q, k, cu_seqlens, max_seqlen)
    do = do.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty_like(lse)
    block_m, block_n, num_warps, num_stages = _config(_BWD_CONFIGS, lay.block_d, q.dtype)
    if lay.batch * lay.heads == 0 or q.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    bh = (lay.heads, lay.batch)
    common = dict(HEAD_DIM=lay.head_dim, BLOCK_D=lay.block_d, CAUSAL=causal, VARLEN=lay.varlen,
                  **_kernel_flags(q.dtype), num_warps=num_warps, num_stages=num_stages)
    _flash_attention_bwd_preprocess_kernel[(triton.cdiv(lay.seqlen_q, 32), *bh)](
        o, do, delta, lay.cu_seqlens, *lay.strides(q), *lay.lse_strides, lay.seqlen_q,
        HEAD_DIM=lay.head_dim, BLOCK_D=lay.block_d, BLOCK_M=32, VARLEN=lay.varlen)
    args = (*lay.strides(q), *lay.strides(k), *lay.lse_strides, lay.seqlen_q, lay.seqlen_k, sm_scale, sm_scale * _LOG2E)
    _flash_attention_bwd_dkdv_kernel[(triton.cdiv(lay.seqlen_k, block_n), *bh)](
        q, k, v, do, lse, delta, dk, dv, lay.cu_seqlens, *args, BLOCK_M=block_m, BLOCK_N=block_n, **common)
    # the dq pass walks query blocks of the dkdv pass's key-block size, and vice versa
    _flash_attention_bwd_dq_kernel[(triton.cdiv(lay.seqlen_q, block_n), *bh)](
        q, k, v, do, lse, delta, dq, lay.cu_seqlens, *args, BLOCK_M=block_n, BLOCK_N=block_m, **common)
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, causal, sm_scale):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o, lse = _attention_fwd(q, k, v, cu_seqlens, max_seqlen, causal, sm_scale)
        ctx.save_for_backward(q, k, v, o, lse, cu_seqlens)
        ctx.max_seqlen, ctx.causal, ctx.sm_scale = max_seqlen, causal, sm_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = _attention_bwd(do, q, k, v, o, lse, cu_seqlens, ctx.max_seqlen, ctx.causal, ctx.sm_scale)
        return dq, dk, dv, None, None, None, None


def _check_qkv(q, k, v, ndim: int, causal) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(t, name, ndim=ndim, dtypes=_DTYPES, device=q.device)
    check(q.dtype == k.dtype == v.dtype, f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    check(k.shape == v.shape, f"k {tuple(k.shape)} and v {tuple(v.shape)} shapes differ")
    check(q.shape[-2:] == k.shape[-2:], f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in heads/head_dim")
    d = q.shape[-1]
    check(d % 16 == 0 and 16 <= d <= 512, f"head_dim must be a multiple of 16 in [16, 512], got {d}")
    check(isinstance(causal, bool), f"causal must be a bool, got {type(causal).__name__}")


def _run(q, k, v, cu_seqlens, max_seqlen, causal, sm_scale):
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return FlashAttentionFunction.apply(q, k, v, cu_seqlens, max_seqlen, causal, sm_scale)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    return _attention_fwd(q, k, v, cu_seqlens, max_seqlen, causal, sm_scale)[0]


def flash_attention(q, k, v, causal: bool, sm_scale=None):
    """Attention over a dense batch.

    q: [B, Tq, H, D]; k, v: [B, Tk, H, D] (fp16/bf16/fp32, same dtype); D a multiple of 16, <= 512.
    causal: query i attends keys j <= i + Tk - Tq (requires Tq <= Tk). sm_scale defaults to D ** -0.5.
    Returns o: [B, Tq, H, D] in q's dtype. Differentiable in q, k, v.
    """
    _check_qkv(q, k, v, 4, causal)
    check(q.shape[0] == k.shape[0], f"batch of q {q.shape[0]} != batch of k {k.shape[0]}")
    check(q.shape[1] >= 1 and k.shape[1] >= 1, "sequence lengths must be >= 1")
    check(not causal or q.shape[1] <= k.shape[1], f"causal needs Tq <= Tk, got {q.shape[1]} > {k.shape[1]}")
    return _run(q, k, v, None, 0, causal, sm_scale)


def flash_attention_varlen(q, k, v, cu_seqlens, max_seqlen: int, causal: bool, sm_scale=None):
    """Attention over packed documents that never attend across document boundaries.

    q, k, v: [total, H, D]; cu_seqlens: int32 [n + 1], document i is rows cu_seqlens[i]:cu_seqlens[i + 1]
    (non-decreasing, cu_seqlens[0] == 0, cu_seqlens[-1] == total); max_seqlen: an int >= the longest document.
    The cu_seqlens / max_seqlen conditions are not checked (that would need a device sync).
    Returns o: [total, H, D]. Differentiable in q, k, v.
    """
    _check_qkv(q, k, v, 3, causal)
    check(q.shape[0] == k.shape[0], f"varlen q has {q.shape[0]} rows but k has {k.shape[0]}")
    check_tensor(cu_seqlens, "cu_seqlens", ndim=1, dtypes=(torch.int32,), device=q.device)
    check(cu_seqlens.numel() >= 2, "cu_seqlens needs at least 2 entries ([0, total])")
    check(isinstance(max_seqlen, int) and (max_seqlen >= 1 or q.shape[0] == 0),
          f"max_seqlen must be an int >= 1 (the longest document), got {max_seqlen}")
    return _run(q, k, v, cu_seqlens.contiguous(), max_seqlen, causal, sm_scale)


def flash_attention_ref(q, k, v, causal: bool, sm_scale=None, upcast: bool = True):
    """Plain PyTorch attention; softmax in fp32. upcast=False keeps the matmuls in the input dtype (the
    'PyTorch's own low-precision error' baseline). Shapes as flash_attention."""
    tq, tk, d = q.shape[1], k.shape[1], q.shape[-1]
    scale = d ** -0.5 if sm_scale is None else sm_scale
    dt = torch.float32 if upcast else q.dtype
    qh, kh, vh = (x.transpose(1, 2).to(dt) for x in (q, k, v))  # [B, H, T, D]
    s = (qh @ kh.transpose(-1, -2)).float() * scale  # [B, H, Tq, Tk]
    if causal:
        keep = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
        s = s.masked_fill(~keep, float("-inf"))
    o = torch.softmax(s, dim=-1).to(dt) @ vh
    return o.transpose(1, 2).to(q.dtype)


def flash_attention_varlen_ref(q, k, v, cu_seqlens, max_seqlen: int, causal: bool, sm_scale=None,
                               upcast: bool = True):
    """Per-document flash_attention_ref over packed [total, H, D] inputs."""
    bounds = cu_seqlens.tolist()
    outs = [flash_attention_ref(q[None, a:b], k[None, a:b], v[None, a:b], causal, sm_scale, upcast)[0]
            for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    return torch.cat(outs) if outs else q.new_empty(q.shape)
