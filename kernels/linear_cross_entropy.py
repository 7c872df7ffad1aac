"""Fused linear + cross-entropy for training: loss and grads without materialising the [N, V] logits.

Rows are processed in chunks of C: logits_c = hidden_c @ weight.T (+ bias) as one torch GEMM, then a Triton
kernel computes each row's logsumexp (online, one read) and the loss, and overwrites logits_c in place with
(softmax - onehot(target)) * scale; two more GEMMs turn that into grad_hidden_c and the grad_weight update.
Peak extra memory is one [C, V] chunk (at most 8 chunks, so <= 1/8 of the logits) besides the grads
themselves, instead of several [N, V] tensors (logits, log-softmax, their grads).

For reduction "mean"/"sum" the grads are computed during the forward (3 GEMMs per chunk, no recompute) and
scaled by grad_output in backward. For "none" the per-row grad_output is only known in backward, so the
forward computes losses alone and the backward recomputes the chunks.
"""

import torch
import triton
import triton.language as tl

from .utils import check, check_tensor, next_pow2

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_MAX_BLOCK_V = 4096
_MAX_CHUNKS = 8


@triton.jit
def _lce_fwd_kernel(logits_ptr, targets_ptr, loss_ptr, scale_ptr, V, stride_l, ignore_index,
                    COMPUTE_GRAD: tl.constexpr, SCALE_PER_ROW: tl.constexpr, BLOCK_V: tl.constexpr):
    # logits: [C, V] (row stride stride_l), targets: [C] int64, loss: [C] fp32, scale: [C] or [1] fp32
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_l
    offs = tl.arange(0, BLOCK_V)
    target = tl.load(targets_ptr + row)
    # per-lane online logsumexp: running max m and sum s of exp(x - m); lanes still at -inf keep s = 0
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        x = tl.load(base + start + offs, mask=start + offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)  # keeps -inf - -inf (NaN) out of exp
        s = s * tl.exp(m - m_safe) + tl.exp(x - m_safe)
        m = m_new
    row_max = tl.max(m, axis=0)
    lse = row_max + tl.log(tl.sum(tl.where(m > float("-inf"), s * tl.exp(m - row_max), 0.0), axis=0))
    valid = target != ignore_index
    x_target = tl.load(base + target, mask=valid & (target >= 0) & (target < V), other=0.0).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - x_target, 0.0))
    if COMPUTE_GRAD:
        if SCALE_PER_ROW:
            scale = tl.load(scale_ptr + row).to(tl.float32)
        else:
            scale = tl.load(scale_ptr).to(tl.float32)
        scale = tl.where(valid, scale, 0.0)  # ignored rows get zero grads
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            mask = cols < V
            x = tl.load(base + cols, mask=mask, other=float("-inf")).to(tl.float32)
            grad = (tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)) * scale
            tl.store(base + cols, grad.to(logits_ptr.dtype.element_ty), mask=mask)


def _chunk_size(N: int) -> int:
    # At most _MAX_CHUNKS chunks: grad_weight is accumulated in the weight's dtype (one rounding per chunk, so
    # bf16 error grows with the chunk count), and a chunk stays <= 1/_MAX_CHUNKS of the full logits.
    return max(1, min(N, 64 * triton.cdiv(triton.cdiv(N, _MAX_CHUNKS), 64)))  # >= 1: N = 0 is a zero-step loop


def _lce_chunks(hidden, weight, bias, targets, ignore_index, scale, grads, chunk_size):
    """Loss per row [N] fp32 and, for each True in grads = (hidden, weight, bias), that grad scaled by `scale`.

    scale: fp32 [1] (every row) or [N] (per row). grad_weight comes back in weight's dtype, grad_bias in fp32.
    """
    N, H = hidden.shape
    V = weight.shape[0]
    need_gh, need_gw, need_gb = grads
    loss = torch.empty(N, dtype=torch.float32, device=hidden.device)  # [N]
    gh = torch.empty(N, H, dtype=hidden.dtype, device=hidden.device) if need_gh else None  # [N, H]
    gw = torch.zeros_like(weight, memory_format=torch.contiguous_format) if need_gw else None  # [V, H]
    gb = torch.zeros(V, dtype=torch.float32, device=hidden.device) if need_gb else None  # [V]
    BLOCK_V = min(_MAX_BLOCK_V, next_pow2(V))
    C = chunk_size or _chunk_size(N)
    for s in range(0, N, C):
        e = min(s + C, N)
        h = hidden[s:e]  # [c, H]
        logits = h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())  # [c, V]
        _lce_fwd_kernel[(e - s,)](
            logits, targets[s:e], loss[s:e], scale[s:e] if scale.numel() > 1 else scale, V, logits.stride(0),
            ignore_index, COMPUTE_GRAD=any(grads), SCALE_PER_ROW=scale.numel() > 1, BLOCK_V=BLOCK_V,
            num_warps=8 if BLOCK_V >= 2048 else 4)
        # logits now holds d(loss)/d(logits) for the chunk
        if need_gh:
            torch.mm(logits, weight, out=gh[s:e])
        if need_gw:  # the GEMM adds into gw in fp32 and rounds once per chunk
            gw.addmm_(logits.t(), h)
        if need_gb:
            gb += logits.sum(dim=0, dtype=torch.float32)
    return loss, gh, gw, gb


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, bias, ignore_index, reduction, chunk_size):
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[3])
        n_valid = (targets != ignore_index).sum().float()  # device scalar, no sync
        ctx.reduction = reduction
        if reduction == "none":
            # grad_output per row arrives only in backward: recompute the chunks there
            loss, *_ = _lce_chunks(hidden, weight, bias, targets, ignore_index, n_valid.new_ones(1), (False,) * 3,
                                   chunk_size)
            ctx.save_for_backward(hidden, weight, bias, targets)
            ctx.ignore_index, ctx.chunk_size = ignore_index, chunk_size
            return loss.to(hidden.dtype)
        scale = (1.0 / n_valid if reduction == "mean" else n_valid.new_ones(())).reshape(1)
        loss, gh, gw, gb = _lce_chunks(hidden, weight, bias, targets, ignore_index, scale, needs, chunk_size)
        # Held on ctx rather than saved: backward scales them in place and drops them, so autograd can hand the
        # buffers on as .grad without a copy (no second [V, H] tensor at the peak).
        ctx.grads = [gh, gw, None if gb is None else gb.to(bias.dtype)]
        total = loss.sum()
        return (total / n_valid if reduction == "mean" else total).to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.reduction == "none":
            hidden, weight, bias, targets = ctx.saved_tensors
            needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[3])
            _, gh, gw, gb = _lce_chunks(hidden, weight, bias, targets, ctx.ignore_index,
                                        grad_output.float().contiguous(), needs, ctx.chunk_size)
            gb = None if gb is None else gb.to(bias.dtype)
            return gh, gw, None, gb, None, None, None
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy: a second backward (retain_graph) needs reduction='none'")
        gh, gw, gb = (None if g is None else g.mul_(grad_output.to(g.dtype)) for g in ctx.grads)
        ctx.grads = None
        return gh, gw, None, gb, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                         chunk_size: int | None = None) -> torch.Tensor:
    """F.cross_entropy(F.linear(hidden, weight, bias), targets) without the [N, V] logits.

    hidden [N, H], weight [V, H] (nn.Linear layout), bias [V] or None, targets int64 [N] (ignore_index rows
    count neither in the loss nor in the mean); all float inputs share one dtype. Returns a scalar
    (reduction "mean"/"sum") or [N] ("none") in hidden's dtype. Grads flow to hidden, weight and bias.
    Targets outside [0, V) other than ignore_index are not checked (that needs a device sync): their loss is
    the row's logsumexp. chunk_size: rows per chunk (default: N/8 rounded up to a multiple of 64).
    grad_weight is accumulated over chunks in weight's dtype (bf16: one rounding per chunk).
    """
    check_tensor(hidden, "hidden", ndim=2, dtypes=_FLOATS)
    check_tensor(weight, "weight", ndim=2, dtypes=(hidden.dtype,), device=hidden.device)
    check_tensor(targets, "targets", ndim=1, dtypes=(torch.int64,), device=hidden.device)
    N, H = hidden.shape
    check(weight.shape[1] == H, f"weight {tuple(weight.shape)} does not match hidden {tuple(hidden.shape)}")
    check(targets.shape[0] == N, f"targets {tuple(targets.shape)} do not match hidden rows {N}")
    if bias is not None:
        check_tensor(bias, "bias", ndim=1, dtypes=(hidden.dtype,), device=hidden.device)
        check(bias.shape[0] == weight.shape[0], f"bias {tuple(bias.shape)} does not match weight {tuple(weight.shape)}")
    check(reduction in ("mean", "sum", "none"), f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    check(chunk_size is None or chunk_size > 0, f"chunk_size must be positive, got {chunk_size}")
    targets = targets.contiguous()
    inputs = (hidden, weight) if bias is None else (hidden, weight, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return LinearCrossEntropyFunction.apply(hidden, weight, targets, bias, ignore_index, reduction, chunk_size)
    # no autograd graph: losses only (autograd.Function would still see needs_input_grad under no_grad)
    loss, *_ = _lce_chunks(hidden, weight, bias, targets, ignore_index, hidden.new_ones(1, dtype=torch.float32),
                           (False,) * 3, chunk_size)
    if reduction == "none":
        return loss.to(hidden.dtype)
    total = loss.sum()
    return (total / (targets != ignore_index).sum() if reduction == "mean" else total).to(hidden.dtype)


def linear_cross_entropy_ref(hidden, weight, targets, bias=None, ignore_index=-100, reduction="mean"):
    """Reference: F.cross_entropy(F.linear(hidden, weight, bias), targets) with the full logits."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return torch.nn.functional.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)
