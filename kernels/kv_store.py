"""Write new K/V rows into the paged KV cache by slot index (an exact copy, no dtype conversion).

Slot s is page s // block_size, offset s % block_size. Slots < 0 (padding tokens) are skipped, and so are slots
past the end of the cache, so a bad slot can never write outside it.
"""
import torch
import triton
import triton.language as tl

from .utils import check, check_tensor, next_pow2

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _slot_page_row(slot, num_slots, PAGE_SIZE: tl.constexpr):
    # slot(s) (int64) -> (valid: 0 <= slot < num_slots, page, row); an invalid slot reads as slot 0 (mask the stores)
    valid = (slot >= 0) & (slot < num_slots)
    slot = tl.where(valid, slot, 0)
    return valid, slot // PAGE_SIZE, slot % PAGE_SIZE


@triton.jit
def _kv_store_kernel(
        k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
        stride_kn, stride_kh, stride_vn, stride_vh, stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs,
        stride_vch, num_heads, num_slots,
        HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr):
    # grid: (N, cdiv(H, BLOCK_H)); one token's [BLOCK_H, D] slice of k and v per program
    i = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    valid, page, row = _slot_page_row(tl.load(slot_mapping_ptr + i).to(tl.int64), num_slots, PAGE_SIZE)
    heads = tl.where(valid, num_heads, 0)  # (a scalar & block mask turns int32 under the interpreter)
    mask = (offs_h < heads)[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(k_ptr + i * stride_kn + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(v_ptr + i * stride_vn + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    tl.store(k_cache_ptr + page * stride_kcb + row * stride_kcs + offs_h[:, None] * stride_kch + offs_d[None, :],
             k, mask=mask)
    tl.store(v_cache_ptr + page * stride_vcb + row * stride_vcs + offs_h[:, None] * stride_vch + offs_d[None, :],
             v, mask=mask)


def _check_args(k, v, k_cache, v_cache, slot_mapping) -> None:
    check_tensor(k, "k", ndim=3, dtypes=_DTYPES)
    for name, t in (("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(t, name, ndim=3 if name == "v" else 4, dtypes=(k.dtype,), device=k.device)
    check_tensor(slot_mapping, "slot_mapping", ndim=1, dtypes=(torch.int32, torch.int64), device=k.device)
    check(k.shape == v.shape, f"k {tuple(k.shape)} != v {tuple(v.shape)}")
    check(k_cache.shape == v_cache.shape, f"k_cache {tuple(k_cache.shape)} != v_cache {tuple(v_cache.shape)}")
    check(k_cache.shape[2:] == k.shape[1:], f"cache [.., H, D] {tuple(k_cache.shape[2:])} != k's {tuple(k.shape[1:])}")
    check(slot_mapping.shape[0] == k.shape[0], f"slot_mapping has {slot_mapping.shape[0]} slots for {k.shape[0]} rows")
    check(k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "k_cache/v_cache need a contiguous last dim")


def kv_store(k, v, k_cache, v_cache, slot_mapping) -> None:
    """Copy row i of k, v into the cache at slot slot_mapping[i]; in place.

    k, v: [N, H, D]; k_cache, v_cache: [num_blocks, block_size, H, D], k's dtype; slot_mapping: int32/int64 [N].
    Slots < 0 or >= num_blocks * block_size are skipped. Duplicate slots: one of the rows wins.
    """
    _check_args(k, v, k_cache, v_cache, slot_mapping)
    n, heads, head_dim = k.shape
    if n == 0 or heads * head_dim == 0:
        return
    k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (k, v))
    block_d = next_pow2(head_dim)
    block_h = min(next_pow2(heads), max(1, 4096 // block_d))
    num_blocks, block_size = k_cache.shape[:2]
    _kv_store_kernel[(n, triton.cdiv(heads, block_h))](
        k, v, k_cache, v_cache, slot_mapping.contiguous(),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), heads, num_blocks * block_size,
        HEAD_DIM=head_dim, BLOCK_H=block_h, BLOCK_D=block_d, PAGE_SIZE=block_size, num_warps=4)


def kv_store_ref(k, v, k_cache, v_cache, slot_mapping) -> None:
    """Plain PyTorch kv_store (same skips); shapes as kv_store."""
    num_blocks, block_size = k_cache.shape[:2]
    slots = slot_mapping.long()
    keep = (slots >= 0) & (slots < num_blocks * block_size)
    slots, rows = slots[keep], keep.nonzero().squeeze(1)
    k_cache[slots // block_size, slots % block_size] = k[rows]
    v_cache[slots // block_size, slots % block_size] = v[rows]
