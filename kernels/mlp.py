"""The Janus adaptor MLP: Linear -> GELU (exact erf) -> Linear (aligner, gen_aligner, gen_head).

Forward: two Triton GEMMs in nn.Linear weight layout. The first fuses bias + erf-GELU into its epilogue, so
the hidden activation is written once, already activated; the second fuses the bias. Backward (adaptors are
trained in stage 1) recomputes the pre-activation with torch matmuls instead of storing it.
"""
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .utils import cast_rtne
from .utils import check, check_tensor, interpreting, next_pow2

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _linear_fwd_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr,
    M, N, K, m_bucket,  # m_bucket: autotune key only (next_pow2(M), so prefill lengths share a tuning)
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, GELU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, EMULATE_RTNE: tl.constexpr,
):
    # out[M, N] = act(x[M, K] @ w[N, K]^T + b[N]); fp32 accumulation, one [BLOCK_M, BLOCK_N] tile per program
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # grouped ordering: GROUP_M row-tiles sweep the same W columns while they are hot in L2
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % group_m
    pid_n = (pid % group_size) // group_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # edge tiles wrap onto valid rows/cols for the loads (the store below is masked), so only K needs masks
    offs_m = rm % M
    offs_n = rn % N
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk  # [BLOCK_N, BLOCK_K]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k[None, :] < K - k0  # K may be < BLOCK_K (gen_aligner: K = 8)
        a = tl.load(x_ptrs, mask=k_mask, other=0.0)
        b = tl.load(w_ptrs, mask=k_mask, other=0.0)
        if UPCAST:  # the interpreter's bf16 dot is wrong; fp32 there is exact enough
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n).to(tl.float32)[None, :]
    if GELU:
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    out = cast_rtne(acc, out_ptr.dtype.element_ty, EMULATE_RTNE)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on, out, mask=mask)


def _gpu_configs():
    cfg = lambda bm, bn, bk, stages, warps: triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=stages, num_warps=warps)
    return [
        cfg(128, 256, 64, 3, 8), cfg(256, 128, 64, 3, 8), cfg(128, 128, 64, 4, 8), cfg(128, 128, 64, 4, 4),
        cfg(64, 128, 64, 4, 4), cfg(128, 64, 64, 4, 4), cfg(64, 64, 64, 4, 4),
        # decode-sized M (2..32 rows): narrow M tiles, deep K to stream the weight
        cfg(16, 64, 128, 4, 4), cfg(16, 128, 128, 4, 4), cfg(32, 64, 128, 4, 4), cfg(32, 128, 64, 4, 4),
        cfg(32, 32, 128, 4, 4),  # more programs when N is only 2048
    ]


_INTERPRET_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 4}
_linear_fwd_tuned = triton.autotune(_gpu_configs(), key=["m_bucket", "N", "K", "HAS_BIAS", "GELU"])(
    _linear_fwd_kernel)


def _linear(x2: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, gelu: bool) -> torch.Tensor:
    """[M, K] @ [N, K]^T + [N] (then erf-GELU when gelu) -> [M, N] in x2's dtype."""
    M, K = x2.shape
    N = w.shape[0]
    out = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    if M == 0:
        return out
    b = b.contiguous() if b is not None else None
    args = (x2, w, b if b is not None else w, out, M, N, K, next_pow2(M),
            x2.stride(0), x2.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1))
    dot_precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    if interpreting():
        grid = (triton.cdiv(M, _INTERPRET_CONFIG["BLOCK_M"]) * triton.cdiv(N, _INTERPRET_CONFIG["BLOCK_N"]),)
        _linear_fwd_kernel[grid](*args, HAS_BIAS=b is not None, GELU=gelu, UPCAST=True, DOT_PRECISION="ieee",
                                 EMULATE_RTNE=True, **_INTERPRET_CONFIG)
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        _linear_fwd_tuned[grid](*args, HAS_BIAS=b is not None, GELU=gelu, UPCAST=False,
                                DOT_PRECISION=dot_precision, EMULATE_RTNE=False)
    return out


def _gelu_and_grad(pre: torch.Tensor):
    """fp32 (gelu(pre), gelu'(pre)) for the exact erf GELU."""
    pf = pre.float()
    cdf = 0.5 * (1.0 + torch.erf(pf * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * pf * pf) * (1.0 / math.sqrt(2.0 * math.pi))
    return pf * cdf, cdf + pf * pdf


class _MLPGeluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, w1, b1, w2, b2):
        h = _linear(x2, w1, b1, gelu=True)  # [M, Chid], activated
        y = _linear(h, w2, b2, gelu=False)  # [M, Cout]
        ctx.save_for_backward(x2, w1, b1, w2)
        ctx.has_b2 = b2 is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, w1, b1, w2 = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad
        dy = dy.reshape(-1, dy.shape[-1])
        pre = F.linear(x2, w1, b1)  # recompute instead of storing the pre-activation
        h, dgelu = _gelu_and_grad(pre)
        dx = dw1 = db1 = dw2 = db2 = None
        if need_w2:
            dw2 = dy.t() @ h.to(dy.dtype)
        if need_b2 and ctx.has_b2:
            db2 = dy.float().sum(0).to(dy.dtype)
        if need_x or need_w1 or need_b1:
            dpre = ((dy @ w2).float() * dgelu).to(dy.dtype)  # [M, Chid]
            if need_x:
                dx = dpre @ w1
            if need_w1:
                dw1 = dpre.t() @ x2
            if need_b1 and b1 is not None:
                db1 = dpre.float().sum(0).to(dy.dtype)
        return dx, dw1, db1, dw2, db2


def mlp_gelu(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
             b2: torch.Tensor | None) -> torch.Tensor:
    """y = gelu(x @ w1^T + b1) @ w2^T + b2 with exact (erf) GELU.

    x: [..., Cin]; w1: [Chid, Cin]; b1: [Chid] or None; w2: [Cout, Chid]; b2: [Cout] or None
    (nn.Linear layout), all one dtype (fp32/fp16/bf16) on one device. Returns [..., Cout] in that dtype.
    fp32 GEMMs use TF32 on GPU exactly when torch.backends.cuda.matmul.allow_tf32 is set.
    Differentiable in every input.
    """
    check_tensor(x, "x", dtypes=_FLOAT_DTYPES)
    check(x.dim() >= 1, "x must have at least one dim")
    dt, dev = (x.dtype,), x.device
    check_tensor(w1, "w1", ndim=2, dtypes=dt, device=dev)
    check_tensor(w2, "w2", ndim=2, dtypes=dt, device=dev)
    Chid, Cin = w1.shape
    Cout = w2.shape[0]
    check(x.shape[-1] == Cin, f"x's last dim {x.shape[-1]} != w1's in_features {Cin}")
    check(min(Cin, Chid, Cout) > 0, f"empty feature dims: Cin {Cin}, Chid {Chid}, Cout {Cout}")
    check(w2.shape[1] == Chid, f"w2 in_features {w2.shape[1]} != w1 out_features {Chid}")
    if b1 is not None:
        check_tensor(b1, "b1", ndim=1, dtypes=dt, device=dev)
        check(b1.shape[0] == Chid, f"b1 has {b1.shape[0]} elements; expected {Chid}")
    if b2 is not None:
        check_tensor(b2, "b2", ndim=1, dtypes=dt, device=dev)
        check(b2.shape[0] == Cout, f"b2 has {b2.shape[0]} elements; expected {Cout}")
    x2 = x.reshape(-1, Cin)
    check(max(x2.numel(), x2.shape[0] * max(Chid, Cout), w1.numel(), w2.numel()) < 2**31,
          "tensors with 2^31 or more elements are not supported (int32 offsets)")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w1, b1, w2, b2)):
        y = _MLPGeluFunction.apply(x2, w1, b1, w2, b2)
    else:
        y = _linear(_linear(x2, w1, b1, gelu=True), w2, b2, gelu=False)
    return y.view(*x.shape[:-1], Cout)


def mlp_gelu_ref(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                 b2: torch.Tensor | None) -> torch.Tensor:
    """Plain PyTorch reference: F.linear -> exact GELU -> F.linear in the input dtype."""
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
