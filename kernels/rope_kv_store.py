"""RoPE and the KV-cache store of a decode step in one launch: rotate q, rotate k straight into the paged cache at
each row's slot, copy v beside it.

The decode step otherwise runs `rope` (q, k -> rotated copies) and then `kv_store` (k, v -> cache rows): two
launches per layer, and on a GPU each of them at decode sizes is mostly launch and ramp-up (bench/RESULTS.md: rope
0.089 ms and kv_store launch-bound at 32 rows). Here one program per BLOCK_N tokens computes the tokens' angles
once (rope.py's helpers), writes rotated q to q_out, rotated k and plain v to the cache rows of their slots.
Values are rope's and kv_store's exactly (the same rotation code; the cache rows are what kv_store would copy).
Slots < 0 (padding rows) or past the cache write nothing, as in kv_store.
"""
import torch
import triton
import triton.language as tl

from .kv_store import _check_args as _check_store_args
from .kv_store import _slot_page_row
from .kv_store import kv_store_ref
from .rope import _inv_freq, _num_warps, _rope_angles, _rotate_heads, _tokens_per_program, rope_ref
from .utils import check, check_tensor, interpreting, next_pow2


@triton.jit
def _rope_kv_store_kernel(
    q_ptr, k_ptr, v_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, pos_ptr, slot_ptr, inv_freq_ptr,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_qon, stride_qoh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch, N, Hq, Hk, num_slots,
    HALF: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr, EMULATE_RTNE: tl.constexpr,
):
    # one program per BLOCK_N tokens: q [N, Hq, D], k, v [N, Hk, D], pos, slots [N]; caches [blocks, PAGE_SIZE, Hk, D]
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    live = tokens < N
    cos, sin = _rope_angles(pos_ptr, inv_freq_ptr, tokens, N, HALF, BLOCK_HALF)
    _rotate_heads(q_ptr, q_out_ptr, tokens * stride_qn, tokens * stride_qon, live, live, stride_qh, stride_qoh, Hq,
                  cos, sin, 1.0, HALF, BLOCK_HQ, BLOCK_HALF, EMULATE_RTNE)
    store, page, row = _slot_page_row(tl.load(slot_ptr + tokens, mask=live, other=-1).to(tl.int64), num_slots,
                                      PAGE_SIZE)  # (tokens past N read slot -1: not stored)
    _rotate_heads(k_ptr, k_cache_ptr, tokens * stride_kn, page * stride_kcb + row * stride_kcs, live, store,
                  stride_kh, stride_kch, Hk, cos, sin, 1.0, HALF, BLOCK_HK, BLOCK_HALF, EMULATE_RTNE)
    # v: an exact copy, [BLOCK_N, BLOCK_HK, 2 * BLOCK_HALF]
    heads = tl.arange(0, BLOCK_HK)[None, :, None]
    cols = tl.arange(0, 2 * BLOCK_HALF)[None, None, :]
    inner = (heads < Hk) & (cols < 2 * HALF)
    v = tl.load(v_ptr + (tokens * stride_vn)[:, None, None] + heads * stride_vh + cols,
                mask=live[:, None, None] & inner, other=0.0)
    tl.store(v_cache_ptr + (page * stride_vcb + row * stride_vcs)[:, None, None] + heads * stride_vch + cols, v,
             mask=store[:, None, None] & inner)


def rope_kv_store(q, k, v, positions, theta, k_cache, v_cache, slot_mapping) -> torch.Tensor:
    """Rotate q and k (rope's numerics), write rotated k and v into the paged caches at slot_mapping (kv_store's
    rules: slots < 0 or past the cache skipped); returns rotated q.

    q: [N, Hq, D]; k, v: [N, Hk, D] (unit stride on D: views into a fused qkv buffer are fine); positions: int [N];
    k_cache, v_cache: [num_blocks, block_size, Hk, D], q's dtype; slot_mapping: int32/int64 [N]. No autograd.
    Returns q_out [N, Hq, D] (contiguous).
    """
    check_tensor(q, "q", ndim=3, dtypes=(torch.float32, torch.float16, torch.bfloat16))
    _check_store_args(k, v, k_cache, v_cache, slot_mapping)
    check(k.dtype == q.dtype, f"k has dtype {k.dtype}; q has {q.dtype}")
    check_tensor(positions, "positions", ndim=1, dtypes=(torch.int32, torch.int64), device=q.device)
    N, Hq, D = q.shape
    Hk = k.shape[1]
    check(k.shape[0] == N and k.shape[2] == D and positions.shape[0] == N,
          f"q {tuple(q.shape)}, k {tuple(k.shape)} and positions {tuple(positions.shape)} disagree")
    check(D % 2 == 0 and D > 0, f"head_dim must be even and positive, got {D}")
    check(theta > 0, f"theta must be positive, got {theta}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    q_out = torch.empty((N, Hq, D), dtype=q.dtype, device=q.device)
    if N == 0:
        return q_out
    half = D // 2
    block_hq, block_hk, block_half = next_pow2(Hq), next_pow2(Hk), next_pow2(half)
    per_token = (block_hq + 2 * block_hk) * block_half  # q, k and v's (two halves' worth) elements
    block_n = _tokens_per_program(per_token)
    num_blocks, block_size = k_cache.shape[:2]
    _rope_kv_store_kernel[(triton.cdiv(N, block_n),)](
        q, k, v, q_out, k_cache, v_cache, positions.contiguous(), slot_mapping.contiguous(),
        _inv_freq(D, float(theta), q.device),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), q_out.stride(0),
        q_out.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0),
        v_cache.stride(1), v_cache.stride(2), N, Hq, Hk, num_blocks * block_size,
        HALF=half, PAGE_SIZE=block_size, BLOCK_N=block_n, BLOCK_HQ=block_hq, BLOCK_HK=block_hk,
        BLOCK_HALF=block_half, EMULATE_RTNE=interpreting(), num_warps=_num_warps(block_n * per_token),
    )
    return q_out


def rope_kv_store_ref(q, k, v, positions, theta, k_cache, v_cache, slot_mapping) -> torch.Tensor:
    """Plain PyTorch: rope_ref, then kv_store_ref of the rotated k and v; returns rotated q."""
    q_out, k_out = rope_ref(q, k, positions, theta)
    kv_store_ref(k_out, v, k_cache, v_cache, slot_mapping)
    return q_out
