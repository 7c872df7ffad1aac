"""Shared helpers for the Triton launchers: interpreter detection and argument checks."""
import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1).

    Under the interpreter tl.dot on bf16 operands is wrong (triton issue 11584) and autotune needs a driver,
    so launchers upcast dot operands and use a fixed config there.
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check(cond: bool, msg: str) -> None:
    """Raise a ValueError with `msg` when a launcher precondition fails (never an assert: -O strips those)."""
    if not cond:
        raise ValueError(msg)


def check_tensor(t: torch.Tensor, name: str, ndim: int | None = None, dtypes=None, device=None) -> None:
    check(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        check(t.dim() == ndim, f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None:
        check(t.dtype in dtypes, f"{name} has dtype {t.dtype}; expected one of {list(dtypes)}")
    if device is not None:
        check(t.device == device, f"{name} is on {t.device}; expected {device}")


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@triton.jit
def round_bf16(x):
    """fp32 -> fp32 holding the nearest-even bf16 value. Interpreter only: its fp32 -> bf16 cast truncates where
    a GPU rounds, so kernels round the bits first and the truncating cast that follows is exact."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))


@triton.jit
def cast_rtne(x, dtype: tl.constexpr, EMULATE_RTNE: tl.constexpr):
    """x.to(dtype), rounding fp32 -> bf16 to nearest-even also under the interpreter (EMULATE_RTNE)."""
    if EMULATE_RTNE and dtype == tl.bfloat16:
        return round_bf16(x.to(tl.float32)).to(dtype)
    else:
        return x.to(dtype)
