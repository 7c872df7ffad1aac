"""RMSNorm with an optional fused residual add (Llama's input/post_attention/final norms).

Numerics follow transformers' LlamaRMSNorm: the residual add happens in the input dtype, the statistics in
fp32, the normalised row is rounded to the input dtype before the weight multiply.
"""
import torch
import triton
import triton.language as tl

from .utils import cast_rtne, check, check_tensor, interpreting, next_pow2

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_C = 65536


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, res_ptr, w_ptr, y_ptr, h_ptr, rstd_ptr,
    stride_x, stride_res, stride_y, stride_h,
    n_rows, C, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, EMULATE_RTNE: tl.constexpr,
):
    # one program per BLOCK_R rows; x, res, h: [rows, C] in the input dtype; y: [rows, C]; rstd: [rows] fp32
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < C)
    h = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + rows[:, None] * stride_res + cols[None, :], mask=mask, other=0.0)
        # x + residual rounded to the input dtype, as torch's own add
        h = cast_rtne(h.to(tl.float32) + r.to(tl.float32), h.dtype, EMULATE_RTNE)
        tl.store(h_ptr + rows[:, None] * stride_h + cols[None, :], h, mask=mask)
    hf = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=1) / C + eps)  # [BLOCK_R]
    tl.store(rstd_ptr + rows, rstd, mask=rows < n_rows)
    n = cast_rtne(hf * rstd[:, None], h.dtype, EMULATE_RTNE).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
    y = cast_rtne(w[None, :] * n, y_ptr.dtype.element_ty, EMULATE_RTNE)
    tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], y, mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr, dh_out_ptr, h_ptr, w_ptr, rstd_ptr, dx_ptr, dw_part_ptr,
    stride_dy, stride_dh_out, stride_h, stride_dx,
    n_rows, C, tiles_per_program,
    HAS_DH_OUT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, EMULATE_RTNE: tl.constexpr,
):
    # each program walks tiles_per_program tiles of BLOCK_R rows; dw_part: [programs, C] fp32 sums of dy * n
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    w = tl.load(w_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    first_row = pid.to(tl.int64) * tiles_per_program * BLOCK_R
    for i in range(0, tiles_per_program):
        rows = first_row + i * BLOCK_R + tl.arange(0, BLOCK_R)
        mask = (rows[:, None] < n_rows) & (cols[None, :] < C)
        h = tl.load(h_ptr + rows[:, None] * stride_h + cols[None, :], mask=mask, other=0.0)
        hf = h.to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=rows < n_rows, other=0.0)[:, None]
        n = hf * rstd
        dw += tl.sum(dy * cast_rtne(n, h.dtype, EMULATE_RTNE).to(tl.float32), axis=0)
        dn = dy * w[None, :]
        # d/dh of h * rsqrt(mean(h^2) + eps) applied to dn
        dh = rstd * (dn - n * (tl.sum(dn * n, axis=1) / C)[:, None])
        if HAS_DH_OUT:
            dh += tl.load(dh_out_ptr + rows[:, None] * stride_dh_out + cols[None, :], mask=mask,
                          other=0.0).to(tl.float32)
        dx = cast_rtne(dh, dx_ptr.dtype.element_ty, EMULATE_RTNE)
        tl.store(dx_ptr + rows[:, None] * stride_dx + cols[None, :], dx, mask=mask)
    tl.store(dw_part_ptr + pid.to(tl.int64) * C + cols, dw, mask=cols < C)


def _rows(t: torch.Tensor, C: int) -> torch.Tensor:
    """[..., C] -> [rows, C] view (a copy only when the last dim is strided or rows don't flatten)."""
    t2 = t.reshape(-1, C)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _tile(C: int):
    """(BLOCK_R, BLOCK_C, num_warps): ~4K elements per tile, so narrow rows are batched per program."""
    block_c = next_pow2(C)
    block_r = max(1, min(64, 4096 // block_c))
    return block_r, block_c, max(1, min(16, block_r * block_c // 512))


def _rms_norm_fwd(x2, weight, res2, eps):
    rows, C = x2.shape
    out_dtype = torch.promote_types(x2.dtype, weight.dtype)
    y = torch.empty((rows, C), dtype=out_dtype, device=x2.device)
    h = torch.empty_like(x2) if res2 is not None else x2
    rstd = torch.empty(rows, dtype=torch.float32, device=x2.device)
    if rows > 0:
        block_r, block_c, num_warps = _tile(C)
        _rms_norm_fwd_kernel[(triton.cdiv(rows, block_r),)](
            x2, res2 if res2 is not None else x2, weight, y, h, rstd,
            x2.stride(0), res2.stride(0) if res2 is not None else 0, y.stride(0), h.stride(0),
            rows, C, eps,
            HAS_RESIDUAL=res2 is not None, BLOCK_R=block_r, BLOCK_C=block_c, EMULATE_RTNE=interpreting(),
            num_warps=num_warps,
        )
    return y, h, rstd


def _rms_norm_bwd(dy2, dh_out2, h2, weight, rstd):
    rows, C = h2.shape
    block_r, block_c, num_warps = _tile(C)
    tiles = triton.cdiv(rows, block_r)
    if interpreting() or h2.device.type != "cuda":
        programs = min(tiles, 4)
    else:
        programs = min(tiles, 4 * torch.cuda.get_device_properties(h2.device).multi_processor_count)
    programs = max(programs, 1)
    dx = torch.empty_like(h2)
    dw_part = torch.empty((programs, C), dtype=torch.float32, device=h2.device)
    if rows > 0:
        _rms_norm_bwd_kernel[(programs,)](
            dy2, dh_out2 if dh_out2 is not None else dy2, h2, weight, rstd, dx, dw_part,
            dy2.stride(0), dh_out2.stride(0) if dh_out2 is not None else 0, h2.stride(0), dx.stride(0),
            rows, C, triton.cdiv(tiles, programs),
            HAS_DH_OUT=dh_out2 is not None, BLOCK_R=block_r, BLOCK_C=block_c, EMULATE_RTNE=interpreting(),
            num_warps=num_warps,
        )
    else:
        dw_part.zero_()
    return dx, dw_part.sum(0).to(weight.dtype)


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, residual, eps):
        C = x.shape[-1]
        x2 = _rows(x, C)
        res2 = _rows(residual, C) if residual is not None else None
        y, h, rstd = _rms_norm_fwd(x2, weight, res2, eps)
        ctx.save_for_backward(h, weight, rstd)
        ctx.has_residual = residual is not None
        ctx.shape = x.shape
        ctx.set_materialize_grads(False)
        y = y.view(x.shape)
        if residual is None:
            return y
        return y, h.view(x.shape)

    @staticmethod
    def backward(ctx, dy, dh_out=None):
        h2, weight, rstd = ctx.saved_tensors
        C = h2.shape[-1]
        if dy is None:  # only the residual sum was used downstream
            dy = torch.zeros(ctx.shape, dtype=torch.promote_types(h2.dtype, weight.dtype), device=h2.device)
        dh_out2 = _rows(dh_out, C) if dh_out is not None else None
        dx, dw = _rms_norm_bwd(_rows(dy, C), dh_out2, h2, weight, rstd)
        dx = dx.view(ctx.shape)
        return dx, dw, (dx if ctx.has_residual else None), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None):
    """RMSNorm over the last dim, optionally of x + residual.

    x: [..., C] fp32/fp16/bf16; weight: [C]; residual: [..., C] like x, or None.
    Returns y: [..., C] in promote(x.dtype, weight.dtype), or (y, x + residual) when residual is given
    (the sum in x.dtype, to be carried as the next residual stream). Differentiable in x, weight, residual.
    """
    check_tensor(x, "x", dtypes=_FLOAT_DTYPES)
    check(x.dim() >= 1, "x must have at least one dim")
    C = x.shape[-1]
    check_tensor(weight, "weight", ndim=1, dtypes=_FLOAT_DTYPES, device=x.device)
    check(weight.shape[0] == C, f"weight has {weight.shape[0]} elements; x's last dim is {C}")
    check(0 < C <= _MAX_C, f"last dim {C} must be in 1..{_MAX_C}")
    check(eps >= 0, f"eps must be >= 0, got {eps}")
    if residual is not None:
        check_tensor(residual, "residual", dtypes=(x.dtype,), device=x.device)
        check(residual.shape == x.shape, f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    weight = weight.contiguous()
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, residual)):
        return _RMSNormFunction.apply(x, weight, residual, float(eps))
    y, h, _ = _rms_norm_fwd(_rows(x, C), weight, _rows(residual, C) if residual is not None else None, float(eps))
    return (y.view(x.shape), h.view(x.shape)) if residual is not None else y.view(x.shape)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None):
    """Plain PyTorch reference (LlamaRMSNorm numerics); same signature and returns as rms_norm."""
    h = x + residual if residual is not None else x
    hf = h.float()
    y = weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (y, h) if residual is not None else y
