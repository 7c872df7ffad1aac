"""SwiGLU activation of the Llama MLP: silu(gate) * up, computed in fp32 and rounded once.

gate and up may be row-strided views (e.g. the two halves of a fused gate_up projection [N, 2F]).
"""
import torch
import triton
import triton.language as tl

from .utils import cast_rtne
from .utils import check, check_tensor, interpreting, next_pow2

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BLOCK_F = 1024


@triton.jit
def _swiglu_fwd_kernel(
    gate_ptr, up_ptr, out_ptr, stride_g, stride_u, stride_o, F,
    n_rows, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr, EMULATE_RTNE: tl.constexpr,
):
    # grid (cdiv(rows, BLOCK_R), cdiv(F, BLOCK_F)); gate, up, out: [rows, F] with unit stride on F
    row = (tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R))[:, None]
    cols = (tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F))[None, :]
    mask = (row < n_rows) & (cols < F)
    g = tl.load(gate_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    out = g * tl.sigmoid(g) * u
    tl.store(out_ptr + row * stride_o + cols, cast_rtne(out, out_ptr.dtype.element_ty, EMULATE_RTNE), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    dout_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr,
    stride_do, stride_g, stride_u, stride_dg, stride_du, F,
    n_rows, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr, EMULATE_RTNE: tl.constexpr,
):
    # recomputes silu from gate: dgate = dout * up * silu'(gate), dup = dout * silu(gate)
    row = (tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R))[:, None]
    cols = (tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F))[None, :]
    mask = (row < n_rows) & (cols < F)
    do = tl.load(dout_ptr + row * stride_do + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    dgate = do * u * (sig + silu * (1.0 - sig))
    dtype = dgate_ptr.dtype.element_ty
    tl.store(dgate_ptr + row * stride_dg + cols, cast_rtne(dgate, dtype, EMULATE_RTNE), mask=mask)
    tl.store(dup_ptr + row * stride_du + cols, cast_rtne(do * silu, dtype, EMULATE_RTNE), mask=mask)


def _rows(t: torch.Tensor, F: int) -> torch.Tensor:
    """[..., F] -> [rows, F] view (a copy only when the last dim is strided or rows don't flatten)."""
    t2 = t.reshape(-1, F)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _launch(rows: int, F: int):
    """grid and meta-params: tiles of ~2K elements, [BLOCK_R, BLOCK_F], several rows when F is narrow."""
    block_f = min(_BLOCK_F, next_pow2(F))
    block_r = min(64, 1 << (max(1, 2048 // block_f).bit_length() - 1))  # largest power of 2 <= the ratio
    grid = (triton.cdiv(rows, block_r), triton.cdiv(F, block_f))
    meta = dict(BLOCK_R=block_r, BLOCK_F=block_f, EMULATE_RTNE=interpreting(), num_warps=4)
    return grid, meta


def _swiglu_fwd(g2: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    out = torch.empty(g2.shape, dtype=g2.dtype, device=g2.device)
    if out.numel() > 0:
        grid, meta = _launch(g2.shape[0], g2.shape[1])
        _swiglu_fwd_kernel[grid](g2, u2, out, g2.stride(0), u2.stride(0), out.stride(0), g2.shape[1], g2.shape[0],
                                 **meta)
    return out


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        F = gate.shape[-1]
        g2, u2 = _rows(gate, F), _rows(up, F)
        ctx.save_for_backward(g2, u2)
        ctx.shape = gate.shape
        return _swiglu_fwd(g2, u2).view(gate.shape)

    @staticmethod
    def backward(ctx, dout):
        g2, u2 = ctx.saved_tensors
        F = g2.shape[-1]
        do2 = _rows(dout, F)
        dgate = torch.empty(g2.shape, dtype=g2.dtype, device=g2.device)
        dup = torch.empty_like(dgate)
        if dgate.numel() > 0:
            grid, meta = _launch(g2.shape[0], F)
            _swiglu_bwd_kernel[grid](
                do2, g2, u2, dgate, dup,
                do2.stride(0), g2.stride(0), u2.stride(0), dgate.stride(0), dup.stride(0), F, g2.shape[0], **meta,
            )
        return dgate.view(ctx.shape), dup.view(ctx.shape)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up.

    gate, up: [..., F] same shape, dtype (fp32/fp16/bf16) and device; row-strided views are read in place
    (a copy is made only when F itself is strided).
    Returns [..., F] (contiguous) in that dtype. Differentiable in gate and up.
    """
    check_tensor(gate, "gate", dtypes=_FLOAT_DTYPES)
    check_tensor(up, "up", dtypes=(gate.dtype,), device=gate.device)
    check(gate.dim() >= 1 and gate.shape == up.shape,
          f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    check(gate.shape[-1] > 0, "last dim must be non-empty")
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _SwiGLUFunction.apply(gate, up)
    F = gate.shape[-1]
    return _swiglu_fwd(_rows(gate, F), _rows(up, F)).view(gate.shape)


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch reference: F.silu(gate) * up in the input dtype."""
    return torch.nn.functional.silu(gate) * up
