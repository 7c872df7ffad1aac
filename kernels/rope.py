"""Rotary position embedding, Llama rotate-half convention, applied to q and k in one launch.

For each head vector x = (x1, x2) (halves of D) and frequency index i < D/2 with angle a_i = pos * inv_freq_i:
    out1 = x1 cos a - x2 sin a,   out2 = x2 cos a + x1 sin a
which is x * cos(cat(a, a)) + rotate_half(x) * sin(cat(a, a)). The backward is the same rotation by -a.
Angles and the rotation run in fp32; inv_freq comes from torch so it matches the reference bit for bit.
"""
import functools

import torch
import triton
import triton.language as tl

from .utils import cast_rtne
from .utils import check, check_tensor, interpreting, next_pow2

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _rotate_heads(
    x_ptr, out_ptr, x_rows, out_rows, load_mask, store_mask, stride_xh, stride_oh, H, cos, sin, sign,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, EMULATE_RTNE: tl.constexpr,
):
    # x, out: heads [H, D] with unit stride on D, token j's at x_ptr + x_rows[j] and out_ptr + out_rows[j]
    # ([BLOCK_N] int64 element offsets); tokens j with load_mask read, with store_mask written; cos, sin:
    # [BLOCK_N, BLOCK_HALF] fp32
    heads = tl.arange(0, BLOCK_H)[None, :, None]
    cols = tl.arange(0, BLOCK_HALF)[None, None, :]
    inner = (heads < H) & (cols < HALF)
    x_half = x_ptr + x_rows[:, None, None] + heads * stride_xh + cols  # [BLOCK_N, BLOCK_H, BLOCK_HALF]
    o_half = out_ptr + out_rows[:, None, None] + heads * stride_oh + cols
    x1 = tl.load(x_half, mask=load_mask[:, None, None] & inner, other=0.0).to(tl.float32)
    x2 = tl.load(x_half + HALF, mask=load_mask[:, None, None] & inner, other=0.0).to(tl.float32)
    c = cos[:, None, :]
    s = sin[:, None, :] * sign
    dtype = out_ptr.dtype.element_ty
    mask = store_mask[:, None, None] & inner
    tl.store(o_half, cast_rtne(x1 * c - x2 * s, dtype, EMULATE_RTNE), mask=mask)
    tl.store(o_half + HALF, cast_rtne(x2 * c + x1 * s, dtype, EMULATE_RTNE), mask=mask)


@triton.jit
def _rope_angles(pos_ptr, inv_freq_ptr, tokens, N, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    # cos, sin [BLOCK_N, BLOCK_HALF] fp32 of the tokens' positions (tokens >= N: position 0)
    freq = tl.arange(0, BLOCK_HALF)
    inv_freq = tl.load(inv_freq_ptr + freq, mask=freq < HALF, other=0.0)
    pos = tl.load(pos_ptr + tokens, mask=tokens < N, other=0).to(tl.float32)
    angle = pos[:, None] * inv_freq[None, :]  # [BLOCK_N, BLOCK_HALF]
    return tl.cos(angle), tl.sin(angle)


@triton.jit
def _rope_fwd_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, pos_ptr, inv_freq_ptr,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_qon, stride_qoh, stride_kon, stride_koh,
    N, Hq, Hk, sign,
    HALF: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr, EMULATE_RTNE: tl.constexpr,
):
    # one program per BLOCK_N tokens: q: [N, Hq, D], k: [N, Hk, D], pos: [N] int; sign +1 fwd, -1 bwd.
    # cos/sin are computed once per token and shared by all q and k heads.
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cos, sin = _rope_angles(pos_ptr, inv_freq_ptr, tokens, N, HALF, BLOCK_HALF)
    live = tokens < N
    _rotate_heads(q_ptr, q_out_ptr, tokens * stride_qn, tokens * stride_qon, live, live, stride_qh, stride_qoh, Hq,
                  cos, sin, sign, HALF, BLOCK_HQ, BLOCK_HALF, EMULATE_RTNE)
    _rotate_heads(k_ptr, k_out_ptr, tokens * stride_kn, tokens * stride_kon, live, live, stride_kh, stride_koh, Hk,
                  cos, sin, sign, HALF, BLOCK_HK, BLOCK_HALF, EMULATE_RTNE)


@functools.cache  # never evicted: a captured CUDA graph holds this tensor's address (one per D, theta, device)
def _inv_freq(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    # [D/2] fp32, exactly as the reference computes it
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)


def _heads(t: torch.Tensor) -> torch.Tensor:
    """[N, H, D] view with unit stride on D (a copy only when D is strided)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _num_warps(elements: int) -> int:
    """Warps for a program of `elements` q+k elements: ~512 per warp, 1-8, a power of 2 (GPU launches reject
    others; with GQA, block_hq + block_hk is not one: 4 + 2 heads gave 3 or 6 warps)."""
    return 1 << (max(1, min(8, elements // 512)).bit_length() - 1)


def _tokens_per_program(per_token: int) -> int:
    """Tokens a program handles, for `per_token` half-head elements of each (padded to powers of 2; the other
    halves mirror them): ~2K of those (~4K elements) a program, a power of 2 up to 64 (decode batches are a few
    tokens; narrow heads pack many tokens)."""
    return min(64, 1 << (max(1, 2048 // per_token).bit_length() - 1))  # the largest power of 2 <= the ratio


def _rope_launch(q, k, positions, theta, sign):
    N, Hq, D = q.shape
    Hk = k.shape[1]
    q_out = torch.empty((N, Hq, D), dtype=q.dtype, device=q.device)
    k_out = torch.empty((N, Hk, D), dtype=k.dtype, device=k.device)
    if N == 0:
        return q_out, k_out
    half = D // 2
    block_hq, block_hk, block_half = next_pow2(Hq), next_pow2(Hk), next_pow2(half)
    per_token = (block_hq + block_hk) * block_half  # q's and k's half heads
    block_n = _tokens_per_program(per_token)
    num_warps = _num_warps(block_n * per_token)
    _rope_fwd_kernel[(triton.cdiv(N, block_n),)](
        q, k, q_out, k_out, positions, _inv_freq(D, float(theta), q.device),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        N, Hq, Hk, sign,
        HALF=half, BLOCK_N=block_n, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_HALF=block_half,
        EMULATE_RTNE=interpreting(), num_warps=num_warps,
    )
    return q_out, k_out


class _RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, positions, theta):
        ctx.save_for_backward(positions)
        ctx.theta = theta
        return _rope_launch(q, k, positions, theta, 1.0)

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        (positions,) = ctx.saved_tensors
        # rotation by -angle is the transpose of rotation by +angle
        dq, dk = _rope_launch(_heads(dq_out), _heads(dk_out), positions, ctx.theta, -1.0)
        return dq, dk, None, None


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0):
    """Apply rotary embeddings to q and k; returns new tensors (q_out, k_out) shaped and typed like q and k.

    q: [N, Hq, D], k: [N, Hk, D], positions: int [N]; or q: [B, T, Hq, D], k: [B, T, Hk, D], positions: [B, T].
    D even; q and k need unit stride only on D (views into a fused qkv buffer are fine). Differentiable in q, k.
    """
    check_tensor(q, "q", dtypes=_FLOAT_DTYPES)
    check_tensor(k, "k", dtypes=(q.dtype,), device=q.device)
    check_tensor(positions, "positions", dtypes=(torch.int32, torch.int64), device=q.device)
    check(q.dim() in (3, 4) and k.dim() == q.dim(), f"q, k must both be [N, H, D] or [B, T, H, D]; got "
          f"{tuple(q.shape)} and {tuple(k.shape)}")
    lead = q.shape[:-2]
    check(k.shape[:-2] == lead and k.shape[-1] == q.shape[-1],
          f"k shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} outside the head dim")
    check(positions.shape == lead, f"positions shape {tuple(positions.shape)} must be {tuple(lead)}")
    D = q.shape[-1]
    check(D % 2 == 0 and D > 0, f"head_dim must be even and positive, got {D}")
    check(theta > 0, f"theta must be positive, got {theta}")
    q3 = _heads(q.reshape(-1, q.shape[-2], D))
    k3 = _heads(k.reshape(-1, k.shape[-2], D))
    pos = positions.reshape(-1).contiguous()
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        q_out, k_out = _RoPEFunction.apply(q3, k3, pos, float(theta))
    else:
        q_out, k_out = _rope_launch(q3, k3, pos, float(theta), 1.0)
    return q_out.view(q.shape), k_out.view(k.shape)


def rope_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0):
    """Plain PyTorch reference (transformers' Llama numerics: cos/sin cast to the input dtype); same contract."""
    D = q.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, D, 2, device=q.device, dtype=torch.float32) / D)
    angle = positions.to(torch.float32)[..., None] * inv_freq  # [..., D/2]
    emb = torch.cat((angle, angle), dim=-1)[..., None, :]  # [..., 1, D]
    cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)

    def rotate_half(x):
        x1, x2 = x[..., : D // 2], x[..., D // 2:]
        return torch.cat((-x2, x1), dim=-1)

    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
