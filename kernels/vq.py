"""VQ-16 codebook kernels: row gather (decode) and fused nearest-code search (encode).

Janus-Pro's image tokenizer has a codebook of K = 16384 codes of D = 8 dims, L2-normalised before use.
- `vq_lookup`: decode side, token ids -> (normalised) code vectors.
- `vq_nearest`: encode side, argmin_j ||z_i - c_j||^2. The official quantiser normalises z and the codebook
  first; this kernel searches over the inputs as given, so the caller normalises.
"""
import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .utils import check, check_tensor, interpreting, next_pow2

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_INDEX = (torch.int32, torch.int64)


@triton.jit
def _vq_lookup_fwd_kernel(idx_ptr, codebook_ptr, out_ptr, M, K, D, stride_ck, stride_om,
                          L2_NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    cols = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    rmask = rows < M
    idx = tl.load(idx_ptr + rows, mask=rmask, other=0).to(tl.int64)
    # Out-of-range ids read nothing (zero rows) instead of faulting; checking them would need a device sync.
    valid = rmask & (idx >= 0) & (idx < K)
    mask = valid[:, None] & (cols[None, :] < D)
    x = tl.load(codebook_ptr + idx[:, None] * stride_ck + cols[None, :], mask=mask, other=0.0)  # [BLOCK_M, BLOCK_D]
    if L2_NORMALIZE:
        xf = x.to(tl.float32)
        norm = tl.sqrt_rn(tl.sum(xf * xf, axis=1))  # [BLOCK_M]
        x = xf / tl.maximum(norm, 1e-12)[:, None]
    out_mask = rmask[:, None] & (cols[None, :] < D)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :],
             x.to(out_ptr.dtype.element_ty), mask=out_mask)


def vq_lookup(indices: torch.Tensor, codebook: torch.Tensor, l2_normalize: bool = True) -> torch.Tensor:
    """Gather codebook rows: indices [*S] (int32/int64, values in [0, K)), codebook [K, D] -> [*S, D].

    With l2_normalize each gathered row is divided by max(||row||_2, 1e-12) (F.normalize), computed in fp32
    and rounded once to the codebook dtype. Ids outside [0, K) give zero rows (not checked: a device sync).
    """
    check_tensor(indices, "indices", dtypes=_INDEX)
    check_tensor(codebook, "codebook", ndim=2, dtypes=_FLOATS, device=indices.device)
    check(codebook.stride(1) == 1, "codebook rows must be contiguous (stride(1) == 1)")
    K, D = codebook.shape
    flat = indices.reshape(-1).contiguous()  # [M]
    M = flat.numel()
    out = torch.empty(M, D, device=codebook.device, dtype=codebook.dtype)  # [M, D]
    if M > 0:
        BLOCK_M = 64
        _vq_lookup_fwd_kernel[(triton.cdiv(M, BLOCK_M),)](
            flat, codebook, out, M, K, D, codebook.stride(0), out.stride(0),
            L2_NORMALIZE=l2_normalize, BLOCK_M=BLOCK_M, BLOCK_D=next_pow2(D), num_warps=4)
    return out.view(*indices.shape, D)


def vq_lookup_ref(indices: torch.Tensor, codebook: torch.Tensor, l2_normalize: bool = True) -> torch.Tensor:
    """Reference: F.normalize(codebook)[indices] (normalised in fp32, cast back) or codebook[indices]."""
    if l2_normalize:
        return F.normalize(codebook.float(), dim=-1).to(codebook.dtype)[indices]
    return codebook[indices]


@triton.jit
def _vq_nearest_fwd_kernel(z_ptr, codebook_ptr, out_ptr, N, K, D, stride_zn, stride_ck,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                           DOT_PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    dims = tl.arange(0, BLOCK_D)  # [BLOCK_D], >= 16 for tl.dot: the pad columns load as zeros
    rmask = rows < N
    dmask = dims < D
    z = tl.load(z_ptr + rows[:, None].to(tl.int64) * stride_zn + dims[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_D]
    # Per-lane running best over the codebook tiles: only compare/select in the loop, one reduction at the end.
    # argmin ||z - c||^2 = argmin (||c||^2 - 2 z.c): ||z||^2 is the same for every code of a row.
    best = tl.full([BLOCK_N, BLOCK_K], float("inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_N, BLOCK_K], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        kmask = codes < K
        c = tl.load(codebook_ptr + codes[None, :].to(tl.int64) * stride_ck + dims[:, None],
                    mask=dmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)  # [BLOCK_D, BLOCK_K]
        c_sq = tl.sum(c * c, axis=0)  # [BLOCK_K]
        zc = tl.dot(z, c, input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_K]
        dist = tl.where(kmask[None, :], c_sq[None, :] - 2.0 * zc, float("inf"))
        # Strict < keeps the earlier tile, i.e. the smaller code index, on exact ties.
        better = dist < best
        best = tl.where(better, dist, best)
        best_idx = tl.where(better, codes[None, :], best_idx)
    row_min = tl.min(best, axis=1)  # [BLOCK_N]
    # Lanes holding the row minimum may come from different tiles: take the smallest code index among them.
    idx = tl.min(tl.where(best == row_min[:, None], best_idx, 2147483647), axis=1)  # [BLOCK_N]
    tl.store(out_ptr + rows, idx.to(tl.int64), mask=rmask)


_NEAREST_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w)
    # the running best value and index each take BLOCK_N * BLOCK_K / (32 * num_warps) registers per thread;
    # at 64 (e.g. 64 x 128 on 4 warps) the kernel hits sm_90's 255-register cap, so these stay at <= 32
    for bn, bk, w in [(32, 64, 4), (32, 128, 4), (64, 64, 4), (64, 128, 8), (128, 64, 8)]
]


@functools.lru_cache(maxsize=None)
def _nearest_tuned():
    return triton.autotune(_NEAREST_CONFIGS, key=["K", "BLOCK_D"])(_vq_nearest_fwd_kernel)


def vq_nearest(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Nearest code per row: z [N, D], codebook [K, D] -> int64 [N], argmin_j ||z_i - c_j||^2.

    Distances are evaluated in fp32 as ||c||^2 - 2 z.c (the dot in IEEE fp32, no TF32), tiling over the
    codebook with a running best per row; the [N, K] distance matrix never exists. Exact ties of the computed
    distances go to the smallest j (duplicate codes may still differ in the last bit: the dot's summation
    order can depend on a code's place in its tile). Near-ties within fp32 rounding may resolve differently
    from torch.cdist. Rows whose distances are all NaN return 0.
    """
    check_tensor(z, "z", ndim=2, dtypes=_FLOATS)
    check_tensor(codebook, "codebook", ndim=2, dtypes=_FLOATS, device=z.device)
    check(z.shape[1] == codebook.shape[1], f"z dim {z.shape[1]} != codebook dim {codebook.shape[1]}")
    check(z.stride(1) == 1 and codebook.stride(1) == 1, "z and codebook rows must be contiguous (stride(1) == 1)")
    check(codebook.shape[0] > 0, "codebook is empty")
    N, D = z.shape
    K = codebook.shape[0]
    check(K < 2**31, "codebook too large for int32 indices")
    out = torch.empty(N, dtype=torch.int64, device=z.device)  # [N]
    if N == 0:
        return out
    BLOCK_D = max(16, next_pow2(D))
    args = (z, codebook, out, N, K, D, z.stride(0), codebook.stride(0))
    if interpreting():
        BLOCK_N, BLOCK_K = 64, 128
        _vq_nearest_fwd_kernel[(triton.cdiv(N, BLOCK_N),)](
            *args, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D, DOT_PRECISION="ieee")
    else:
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)
        _nearest_tuned()[grid](*args, BLOCK_D=BLOCK_D, DOT_PRECISION="ieee")
    return out


def vq_nearest_ref(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Reference: torch.cdist(z, codebook).argmin(1) in fp32 -> int64 [N]."""
    return torch.cdist(z.float(), codebook.float()).argmin(dim=1)
