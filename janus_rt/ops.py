"""One place that picks an implementation per op: the PyTorch reference ("torch"), Triton ("triton"), or the
C++ CPU kernels ("cpu", csrc/). Model code calls `ops.<op>` and never names a backend.

The torch backend reproduces transformers' numerics (fp32 RMSNorm statistics, rotary tables cast to the
activation dtype), so it is the reference path the other backends are checked against.
"""
from __future__ import annotations

import contextlib
import math
import os

import torch
import torch.nn.functional as F

_BACKENDS = ("torch", "triton", "cpu")
_backend = "torch"


def get_backend() -> str:
    return _backend


def set_backend(name: str) -> None:
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {_BACKENDS}")
    _backend = name


@contextlib.contextmanager
def use_backend(name: str):
    prev = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(prev)


def _kernels():
    from janus_rt import kernels

    return kernels


# ---- attention ---------------------------------------------------------------------------------------------
def attention(q, k, v, causal: bool, sm_scale: float | None = None):
    """q: [B, Tq, H, D]; k, v: [B, Tk, H, D] -> [B, Tq, H, D]. Causal is aligned bottom-right (Tq <= Tk)."""
    if _backend == "triton":
        return _kernels().flash_attention(q, k, v, causal=causal, sm_scale=sm_scale)
    if _use_cpu_prefill_attention(q, k, v, causal):  # bf16 inference, AVX512_BF16 without AMX: 2.1-3.2x torch's
        from janus_rt import cpu_ops

        with _scope("janus_rt::cpu_prefill_attention"):
            return cpu_ops.prefill_attention(q, k, v, causal, sm_scale)  # (strided views taken as they are)
    return attention_torch(q, k, v, causal, sm_scale)


def _use_cpu_prefill_attention(q, k, v, causal: bool) -> bool:
    """csrc's bf16 prefill attention for q, k, v where it applies (no gradient wanted, shapes it takes). Not where
    the GEMV runs on AMX: it was measured on Zen 5 only (bench/RESULTS.md, 2026-12-06), and torch's bf16 kernels use
    AMX there."""
    if q.dtype != torch.bfloat16 or not _use_cpu_rows(q, k, v):
        return False
    from janus_rt import cpu_ops

    D, Tq, Tk = q.shape[-1], q.shape[1], k.shape[1]
    return (cpu_ops.prefill_attention_available() and not cpu_ops.amx_available() and q.dim() == 4
            and D % 16 == 0 and 16 <= D <= 256
            and q.shape[2] % k.shape[2] == 0 and (not causal or Tq <= Tk))


def attention_torch(q, k, v, causal: bool, sm_scale: float | None = None):
    tq, tk = q.shape[1], k.shape[1]
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    q_, k_, v_ = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
    mask = None
    if causal and tq != tk:
        i = torch.arange(tq, device=q.device)[:, None] + (tk - tq)
        mask = torch.arange(tk, device=q.device)[None, :] <= i  # [Tq, Tk]
    o = F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask, is_causal=causal and tq == tk, scale=scale)
    return o.transpose(1, 2)


# ---- normalisation ------------------------------------------------------------------------------------------
def rms_norm(x, weight, eps: float, residual=None):
    """LlamaRMSNorm; with `residual` returns (norm(x + residual), x + residual)."""
    if _backend == "triton":
        return _kernels().rms_norm(x, weight, eps, residual=residual)
    if _use_cpu_rows(x, weight, residual):  # one pass per row instead of torch's fp32 copies (prefill)
        from janus_rt import cpu_ops

        with _scope("janus_rt::cpu_rms_norm"):
            return cpu_ops.rms_norm(x, weight, eps, residual=residual)
    if residual is not None:
        h = x + residual
        return rms_norm_torch(h, weight, eps), h
    return rms_norm_torch(x, weight, eps)


def rms_norm_torch(x, weight, eps: float):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


# ---- rotary position embedding -------------------------------------------------------------------------------
def rope(q, k, positions, theta: float):
    """Llama rotate-half RoPE. q: [..., Hq, D]; k: [..., Hk, D]; positions: int [...] ([B, T] or [N])."""
    if _backend == "triton":
        return _kernels().rope(q, k, positions, theta)
    if _use_cpu_rows(q, k) and q.shape[:-2] == positions.shape:
        from janus_rt import cpu_ops

        cos, sin = (t.float().reshape(-1, q.shape[-1]) for t in rope_tables(positions, q.shape[-1], theta, q.dtype))
        with _scope("janus_rt::cpu_rope"):
            return cpu_ops.rope(q, cos, sin), cpu_ops.rope(k, cos, sin)
    return rope_torch(q, k, positions, theta)


# When a process's first MKL VML call (torch's cpu cos and sin of float tensors go there) is also its first OpenMP
# parallel region, the main thread's share came out of VML's low-accuracy (EP) cos in 1-12 % of fresh processes on
# our AMX Xeon; every later call was right (bench/RESULTS.md, forty-seventh session). The engine's rotary table,
# built once, was such a call. This one-element call, on one thread, is the process's first.
torch.ones(1).cos()


def rope_tables(positions, d: int, theta: float, dtype):
    """cos, sin: [..., D] in `dtype` for int positions [...] (transformers' Llama rotary tables)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=positions.device).float() / d))
    freqs = positions.float()[..., None] * inv_freq  # [..., D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [..., D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rope_torch(q, k, positions, theta: float):
    d = q.shape[-1]
    cos, sin = (t[..., None, :] for t in rope_tables(positions, d, theta, q.dtype))  # [..., 1, D]

    def rot(x):
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return torch.cat((-x2, x1), dim=-1)

    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


# ---- linear layers -------------------------------------------------------------------------------------------
CPU_GEMV_MAX_ROWS = 32  # decode-sized inputs: the csrc kernel streams the weight once for all rows
_row_pieces = False  # inside batch_invariant()


@contextlib.contextmanager
def batch_invariant():
    """Within: linears of CPU tensors run their rows in pieces of CPU_GEMV_MAX_ROWS, and where torch's matmul (or
    oneDNN's, for held weights) takes a piece, it is padded to that many rows, so a row's result does not depend on
    the rows beside it. torch's CPU matmul rounds a row differently at different row counts (fp32: M = 1, 2-3 and
    >= 8 apart; bf16: M = 1 and >= 2) and the same at one row count (bench/RESULTS.md, thirty-fifth session); the
    csrc GEMVs are row-invariant up to CPU_GEMV_MAX_ROWS. For decode steps, whose rows come from many requests."""
    global _row_pieces
    prev, _row_pieces = _row_pieces, True
    try:
        yield
    finally:
        _row_pieces = prev


def in_row_pieces(fn, x, pad: bool):
    """fn over x [..., K]'s rows in pieces of CPU_GEMV_MAX_ROWS, the last one padded with zero rows where pad (x of
    at most that many rows and no padding: fn(x))."""
    rows, out = x.reshape(-1, x.shape[-1]), []
    if rows.shape[0] == CPU_GEMV_MAX_ROWS or (rows.shape[0] < CPU_GEMV_MAX_ROWS and not pad):
        return fn(x)  # one piece as it is
    for piece in rows.split(CPU_GEMV_MAX_ROWS):
        n = piece.shape[0]
        if pad and n < CPU_GEMV_MAX_ROWS:
            piece = torch.cat([piece, piece.new_zeros(CPU_GEMV_MAX_ROWS - n, piece.shape[1])])
        out.append(fn(piece)[:n])
    return torch.cat(out).reshape(*x.shape[:-1], -1)


def linear(x, weight, bias=None):
    """y = x @ weight^T + bias. On the cpu backend, decode-sized x goes to the csrc GEMV (weight-bandwidth bound).
    weight may be a cpu_ops.PackedWeight (a model packed by Janus.pack_for_cpu_): the packed GEMV, whatever the
    backend and the rows (it is the only copy of that weight). Inside batch_invariant(): in row pieces (above)."""
    if _row_pieces and x.device.type == "cpu" and x.numel():
        first = x.reshape(-1, x.shape[-1])[:CPU_GEMV_MAX_ROWS]
        held = not isinstance(weight, torch.Tensor)
        csrc = not getattr(weight, "held_for_linear", False) if held else _use_cpu_gemv(first)
        return in_row_pieces(lambda piece: _linear(piece, weight, bias), x, pad=not csrc)
    return _linear(x, weight, bias)


def _linear(x, weight, bias):
    if not isinstance(weight, torch.Tensor):
        return _linear_packed(x, weight, bias)
    if _use_cpu_gemv(x):
        from janus_rt import cpu_ops

        if bias is not None and bias.dtype != torch.float32:
            bias = bias.float()  # the kernel accumulates and adds the bias in fp32
        with _scope("janus_rt::cpu_linear"):
            return cpu_ops.linear(x.contiguous(), weight, bias).to(x.dtype)
    return F.linear(x, weight, bias)


def _linear_packed(x, weight, bias):
    from janus_rt import cpu_ops

    if getattr(weight, "held_for_linear", False):  # another kernel's own layout (models.packed_linear.OneDNNWeight)
        return weight(x, bias)
    if not isinstance(weight, cpu_ops.PackedWeight):
        raise TypeError(f"linear: weight must be a tensor, a cpu_ops.PackedWeight or a held weight (OneDNNWeight), "
                        f"not {type(weight).__name__}")
    if x.device.type != "cpu":
        raise ValueError(f"linear: the weight is packed for the CPU (Janus.pack_for_cpu_) but x is on {x.device}; "
                         "load the model again to run it elsewhere")
    if bias is not None:
        bias = bias.float()  # the kernel adds the bias in fp32
    with _scope("janus_rt::cpu_linear_packed"):
        return weight(x.contiguous(), bias).to(x.dtype)


# ---- MLPs -----------------------------------------------------------------------------------------------------
def swiglu(gate, up):
    if _backend == "triton":
        return _kernels().swiglu(gate, up)
    return F.silu(gate) * up


# On a GPU the triton backend runs mlp_gelu as two cuBLAS GEMMs around a GELU: the fused Triton kernel (kernels/mlp.py)
# measured 2.7-5.2x slower at every benchmarked shape on an H200 (bench/RESULTS.md, 2026-12-04: gen head at 32 decode
# rows 0.194 vs 0.037 ms, aligner at 576 rows 0.238 vs 0.031 ms). True sends CUDA inputs to the kernel again.
TRITON_MLP_ON_CUDA = False


def mlp_gelu(x, w1, b1, w2, b2):
    """Linear -> GELU (erf) -> Linear: the aligner / gen_aligner / gen_head shape. w1, w2 may be held for the CPU
    (cpu_ops.PackedWeight and its int8 kinds: a model packed in place, packed_linear): then the csrc call at any row
    count, whatever the backend (they are the only copies of those weights)."""
    held = not isinstance(w1, torch.Tensor)
    if _row_pieces and x.device.type == "cpu" and x.numel() > CPU_GEMV_MAX_ROWS * x.shape[-1]:
        return in_row_pieces(lambda piece: mlp_gelu(piece, w1, b1, w2, b2), x, pad=False)  # (linear pads)
    if _backend == "triton" and not held and (TRITON_MLP_ON_CUDA or not x.is_cuda):
        return _kernels().mlp_gelu(x, w1, b1, w2, b2)
    if ((held and x.device.type == "cpu") or _use_cpu_gemv(x)) and w1.dtype == w2.dtype == x.dtype and all(
            b is None or b.dtype == x.dtype for b in (b1, b2)):
        from janus_rt import cpu_ops

        with _scope("janus_rt::cpu_mlp_gelu"):  # one csrc call: the same rounding points as the two below
            return cpu_ops.mlp_gelu(x.contiguous(), w1, b1, w2, b2).to(x.dtype)
    return linear(F.gelu(linear(x, w1, b1)), w2, b2)


# ---- paged KV cache ops (engine) --------------------------------------------------------------------------------
def _scope(name: str):
    """A named range in torch.profiler traces for calls it cannot see (the csrc kernels); free when not profiling."""
    if torch.autograd._profiler_enabled():
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()


def _use_cpu_gemv(x) -> bool:
    """The cpu backend's csrc GEMV for decode-sized x, unless torch's matmul is the faster one for x's dtype here
    (cpu_ops.torch_matmul_preferred: AMX hosts)."""
    if not (_backend == "cpu" and x.numel() <= CPU_GEMV_MAX_ROWS * x.shape[-1] and _use_cpu_kernels(x)):
        return False
    from janus_rt import cpu_ops

    return not cpu_ops.torch_matmul_preferred(x.dtype, x.shape[-1])


def _use_cpu_rows(*ts) -> bool:
    """The cpu backend's csrc row ops (rms_norm, rope) for inference on fp32 / bf16 CPU tensors of one dtype: no
    autograd through them, so torch's ops wherever a gradient is wanted (training)."""
    ts = [t for t in ts if t is not None]
    if not _use_cpu_kernels(ts[0]) or any(t.dtype != ts[0].dtype for t in ts):
        return False
    if ts[0].dtype not in (torch.float32, torch.bfloat16):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in ts))


def _use_cpu_kernels(t) -> bool:
    if _backend != "cpu" or t.is_cuda:
        return False
    from janus_rt import cpu_ops

    return cpu_ops.available()


def kv_store(k, v, k_cache, v_cache, slot_mapping):
    """k, v: [N, H, D] -> rows slot_mapping[i] of the paged caches [num_blocks, block_size, H, D]."""
    if _backend == "triton":
        return _kernels().kv_store(k, v, k_cache, v_cache, slot_mapping)
    if _use_cpu_kernels(k):
        from janus_rt import cpu_ops

        with _scope("janus_rt::cpu_kv_store"):
            return cpu_ops.kv_store(k.contiguous(), v.contiguous(), k_cache, v_cache, slot_mapping)
    from janus_rt.kernels.kv_store import kv_store_ref

    return kv_store_ref(k, v, k_cache, v_cache, slot_mapping)


def quantize_kv(x):
    """x [..., D] -> (int8 [..., D], fp32 scale [...]): rows as the int8 KV cache holds them. The cpu backend runs
    csrc/kv_int8.h (fp32 / bf16 CPU tensors), the others engine/kv_quant.py's reference: the same bytes."""
    if _use_cpu_kernels(x) and x.dtype in (torch.float32, torch.bfloat16):
        from janus_rt import cpu_ops

        with _scope("janus_rt::cpu_kv_quantize"):
            return cpu_ops.quantize_kv(x.contiguous())
    from janus_rt.engine.kv_quant import quantize_kv as quantize_kv_ref

    return quantize_kv_ref(x)


def attention_varlen(q, k, v, cu_seqlens, max_seqlen: int, causal: bool):
    """Packed sequences, no attention across them. q, k, v: [total, H, D]; cu_seqlens: int32 [n + 1]."""
    if _backend == "triton":
        return _kernels().flash_attention_varlen(q, k, v, cu_seqlens, max_seqlen, causal=causal)
    bounds = cu_seqlens.tolist()  # (attention: csrc's bf16 prefill attention where it applies, else torch's)
    if len(bounds) == 2:
        return attention(q[None], k[None], v[None], causal)[0]
    out = [attention(q[None, s:e], k[None, s:e], v[None, s:e], causal)[0] for s, e in zip(bounds, bounds[1:])]
    return torch.cat(out)


def rope_kv_store(q, k, v, positions, theta: float, k_cache, v_cache, slot_mapping):
    """A decode step's RoPE and KV store: q, k rotated, rotated k and v written to the paged caches at slot_mapping
    (kv_store's rules); returns rotated q. q: [N, Hq, D]; k, v: [N, Hk, D]; positions: int [N]. The triton backend
    runs both in one launch (kernels/rope_kv_store.py), the others rope then kv_store."""
    if _backend == "triton":
        return _kernels().rope_kv_store(q, k, v, positions, theta, k_cache, v_cache, slot_mapping)
    q, k = rope(q, k, positions, theta)
    kv_store(k, v, k_cache, v_cache, slot_mapping)
    return q


# The triton backend's paged decode attention kernel (kernels/paged_attention.py's `variant`): "block" until a GPU has
# timed "slots" against it (bench/RESULTS.md); JANUS_RT_PAGED_ATTENTION=slots picks the other, for that A/B.
TRITON_PAGED_ATTENTION = os.environ.get("JANUS_RT_PAGED_ATTENTION", "").strip().lower() or "block"  # (the CLI
# checks the value first: errors.env_switch)


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, k_scale=None, v_scale=None):
    """q: [B, H, D] against the paged caches; block_tables int32 [B, max_blocks]; context_lens int32 [B].
    An int8 cache comes with its scales k_scale, v_scale [num_blocks, block_size, H] (engine/kv_quant.py): csrc on
    the CPU, else the PyTorch reference; not on the triton backend."""
    if k_scale is not None:
        if _backend == "triton":
            raise ValueError("the int8 KV cache has no Triton kernel: it runs on the CPU (csrc) or the torch backend")
        if _use_cpu_kernels(q):
            from janus_rt import cpu_ops

            with _scope("janus_rt::cpu_paged_decode_attention"):
                return cpu_ops.paged_decode_attention(q.contiguous(), k_cache, v_cache, block_tables, context_lens,
                                                      1.0 / math.sqrt(q.shape[-1]), k_scale, v_scale)
        from janus_rt.engine.kv_quant import paged_decode_attention_int8_ref

        return paged_decode_attention_int8_ref(q, k_cache, v_cache, k_scale, v_scale, block_tables, context_lens)
    if _backend == "triton":
        return _kernels().paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens,
                                                 variant=TRITON_PAGED_ATTENTION)
    if _use_cpu_kernels(q):
        from janus_rt import cpu_ops

        with _scope("janus_rt::cpu_paged_decode_attention"):
            return cpu_ops.paged_decode_attention(q.contiguous(), k_cache, v_cache, block_tables, context_lens,
                                                  1.0 / math.sqrt(q.shape[-1]))
    from janus_rt.kernels.paged_attention import paged_decode_attention_ref

    return paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens)


def cfg_sample(cond, uncond, cfg_weight, temperature, top_k, top_p, seeds, greedy):
    """Guidance mix + temperature + top-k/top-p + seeded Gumbel-max (or argmax) -> int64 [B].
    All backends draw the same random numbers (see kernels/sampling.py)."""
    if cond.is_cuda:
        to = lambda x: x.to(cond.device, non_blocking=True) if isinstance(x, torch.Tensor) else x
        return _kernels().cfg_sample(cond, uncond, *map(to, (cfg_weight, temperature, top_k, top_p, seeds, greedy)))
    if _backend == "cpu" and _use_cpu_kernels(cond):
        from janus_rt import cpu_ops

        with _scope("janus_rt::cpu_cfg_sample"):
            return cpu_ops.cfg_sample(cond, uncond, cfg_weight, temperature, top_k, top_p, seeds, greedy)
    from janus_rt.kernels.sampling import cfg_sample_ref

    return cfg_sample_ref(cond, uncond, cfg_weight, temperature, top_k, top_p, seeds, greedy)
