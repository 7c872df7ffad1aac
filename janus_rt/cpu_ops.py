"""The one Python accessor of janus_rt._C, the C++/OpenMP CPU kernels (csrc/).

Each function checks every tensor (device, dtype, contiguity, shape) and raises ValueError on misuse, allocates
the output with torch.empty, and passes data pointers and sizes to C++, which guards the sizes and any
data-dependent indices (block tables, slots) again. All math is fp32; bf16 inputs are read as their uint16 bits.
"""
from __future__ import annotations

import contextlib
import math
import mmap
import os
from array import array as _array

import torch

try:
    from janus_rt import _C
except ImportError:  # extension not built: available() is False and every op raises
    _C = None

_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1}


def available() -> bool:
    """True when janus_rt._C is built and importable."""
    return _C is not None


def simd_isa() -> str:
    """Vector ISA the extension was compiled for: "avx512", "avx2" or "scalar"."""
    return _ext().simd_isa()


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo; empty where that is not readable)."""
    global _FLAGS
    if _FLAGS is None:
        try:
            with open("/proc/cpuinfo") as f:
                line = next((ln for ln in f if ln.startswith("flags")), "")
            _FLAGS = frozenset(line.split(":", 1)[1].split()) if ":" in line else frozenset()
        except OSError:
            _FLAGS = frozenset()
    return _FLAGS


_FLAGS = None


TORCH_MATMUL_MIN_WIDTH = 2048  # auto: torch's matmul from this many input features (Janus-Pro's 1B and 7B)


def torch_matmul_preferred(dtype: torch.dtype, width: int | None = None) -> bool:
    """Whether decode-sized projections of `dtype` with `width` input features (None: any) should go to torch's
    matmul rather than the csrc GEMVs. JANUS_RT_CPU_MATMUL: "torch" = always, "csrc" = never, unset or "auto" = bf16
    on a CPU with AMX-BF16 tiles at widths from TORCH_MATMUL_MIN_WIDTH, when this build's GEMV cannot use the tiles
    itself (no amx_available(): a portable build, or an OS that refuses them) and torch's oneDNN matmul can.
    Measured on such a host (Intel Xeon, 2 cores, 2026-12-04, ms per decode step): Janus-Pro-1B n = 16 with the
    AVX512-BF16 GEMV 498 vs torch 275, then with the AMX GEMV 245; hidden 512 x 8 layers n = 4 4.1 (AVX512-BF16) vs
    12.4 (torch) and the tiny preset 0.07 vs 1.70, where the layer-by-layer step's Python costs more than the matmuls
    save (bench/RESULTS.md)."""
    v = os.environ.get("JANUS_RT_CPU_MATMUL", "auto").strip().lower()
    if v not in ("torch", "csrc", "auto", ""):
        raise ValueError(f"JANUS_RT_CPU_MATMUL={v!r}: expected torch, csrc or auto")
    if v in ("torch", "csrc"):
        return v == "torch"
    return (dtype == torch.bfloat16 and (width is None or width >= TORCH_MATMUL_MIN_WIDTH)
            and "amx_bf16" in cpu_flags() and torch.backends.mkldnn.is_available() and not amx_available())


def stream_sum(x: torch.Tensor) -> float:
    """Sum of a contiguous fp32 CPU tensor, streamed at read bandwidth: bench_gemv's DRAM roofline probe."""
    _check_tensor(x, "x", (torch.float32,))
    return _ext().stream_sum(x.data_ptr(), x.numel())


def _ext():
    if _C is None:
        raise RuntimeError("janus_rt._C is not built: run `python setup.py build_ext --inplace` in the repo root")
    return _C


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _check_tensor(t, name: str, dtypes, ndim: int | None = None) -> None:
    # called on every kernel call: the messages are formatted only on failure (eagerly it was ~9 us a call)
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} is on {t.device}; the CPU kernels need CPU tensors")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {t.dtype}; expected one of {list(dtypes)}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous())")


_FP = (torch.float32, torch.bfloat16)
_INTS = (torch.int32, torch.int64)
_ANY_FLOAT = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def vq_nearest(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Nearest codebook row per row of z: argmin_j ||z_i - codebook_j||^2, ties -> smallest j.

    z: [N, D] fp32; codebook: [K, D] fp32 -> int64 [N]. (encode_images L2-normalises both first.)
    """
    _check_tensor(z, "z", (torch.float32,), 2)
    _check_tensor(codebook, "codebook", (torch.float32,), 2)
    _check(z.shape[1] == codebook.shape[1], f"z {tuple(z.shape)} and codebook {tuple(codebook.shape)} differ in D")
    _check(codebook.shape[0] >= 1 and z.shape[1] >= 1, "codebook must have at least one row and D >= 1")
    out = torch.empty(z.shape[0], dtype=torch.int64)
    _ext().vq_nearest(z.data_ptr(), codebook.data_ptr(), out.data_ptr(), z.shape[0], codebook.shape[0], z.shape[1])
    return out


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """One decode token per sequence against a paged KV cache.

    q: [B, H, D] fp32 or bf16; k_cache, v_cache: [num_blocks, block_size, Hkv, D] fp32 or bf16 (H % Hkv == 0);
    block_tables: int32 [B, max_blocks]; context_lens: int32 [B]; sm_scale defaults to D^-0.5.
    Returns o: [B, H, D] in q's dtype (fp32 accumulation); a sequence with context_len 0 gets zeros.
    """
    _check_tensor(q, "q", _FP, 3)
    _check_tensor(k_cache, "k_cache", _FP, 4)
    _check_tensor(v_cache, "v_cache", _FP, 4)
    _check_tensor(block_tables, "block_tables", (torch.int32,), 2)
    _check_tensor(context_lens, "context_lens", (torch.int32,), 1)
    B, H, D = q.shape
    num_blocks, block_size, hkv, dk = k_cache.shape
    _check(v_cache.shape == k_cache.shape, f"v_cache {tuple(v_cache.shape)} != k_cache {tuple(k_cache.shape)}")
    _check(v_cache.dtype == k_cache.dtype, f"v_cache dtype {v_cache.dtype} != k_cache dtype {k_cache.dtype}")
    _check(dk == D, f"cache head_dim {dk} != q head_dim {D}")
    _check(hkv >= 1 and H % hkv == 0, f"q heads {H} must be a multiple of cache heads {hkv}")
    _check(block_tables.shape[0] == B and context_lens.shape[0] == B,
           f"block_tables {tuple(block_tables.shape)} / context_lens {tuple(context_lens.shape)} need B = {B} rows")
    _check(block_tables.shape[1] >= 1, "block_tables needs at least one column")
    scale = 1.0 / math.sqrt(D) if sm_scale is None else float(sm_scale)
    o = torch.empty_like(q)
    _ext().paged_decode_attention(
        q.data_ptr(), _DTYPE_CODE[q.dtype], k_cache.data_ptr(), v_cache.data_ptr(), _DTYPE_CODE[k_cache.dtype],
        block_tables.data_ptr(), context_lens.data_ptr(), o.data_ptr(),
        B, H, hkv, D, num_blocks, block_size, block_tables.shape[1], scale,
    )
    return o


def kv_store(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """k_cache.view(-1, H, D)[slot_mapping[i]] = k[i] and the same for v, in place (a bit-exact copy).

    k, v: [N, H, D]; k_cache, v_cache: [num_blocks, block_size, H, D], all one dtype (fp32, bf16 or fp16);
    slot_mapping: int32 or int64 [N]. Slots < 0 or >= num_blocks * block_size are skipped (kernels/kv_store.py).
    """
    _check_tensor(k_cache, "k_cache", (torch.float32, torch.bfloat16, torch.float16), 4)
    dt = k_cache.dtype
    _check_tensor(v_cache, "v_cache", (dt,), 4)
    _check_tensor(k, "k", (dt,), 3)
    _check_tensor(v, "v", (dt,), 3)
    _check_tensor(slot_mapping, "slot_mapping", _INTS, 1)
    _check(v_cache.shape == k_cache.shape, f"v_cache {tuple(v_cache.shape)} != k_cache {tuple(k_cache.shape)}")
    _check(v.shape == k.shape, f"v {tuple(v.shape)} != k {tuple(k.shape)}")
    _check(k.shape[1:] == k_cache.shape[2:], f"k rows {tuple(k.shape[1:])} != cache rows {tuple(k_cache.shape[2:])}")
    _check(slot_mapping.shape[0] == k.shape[0], f"slot_mapping has {slot_mapping.shape[0]} entries, k {k.shape[0]}")
    slots = slot_mapping.to(torch.int64)
    _ext().kv_store(
        k.data_ptr(), v.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr(),
        k.shape[0], k.shape[1] * k.shape[2], k.element_size(), k_cache.shape[0] * k_cache.shape[1],
    )


def _per_row(x, B: int, dtype: torch.dtype, name: str, kinds: tuple) -> torch.Tensor:
    """A Python scalar, or a CPU tensor of 1 or B elements whose dtype is one of `kinds` -> contiguous `dtype` [B]."""
    if isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise ValueError(f"{name} is on {x.device}; the CPU kernels need CPU tensors")
        if x.dtype not in kinds:
            raise ValueError(f"{name} has dtype {x.dtype}; expected one of {list(kinds)}")
        if x.dim() > 1 or x.numel() not in (1, B):
            raise ValueError(f"{name} must be a scalar or have shape [{B}], got {tuple(x.shape)}")
        if x.dtype == dtype and x.dim() == 1 and x.shape[0] == B and x.is_contiguous():
            return x  # as the engine passes them: no copy (four torch ops per parameter were ~0.1 ms a step)
        return x.reshape(-1).to(dtype).expand(B).contiguous()
    _check(isinstance(x, (bool, int, float)), f"{name} must be a number or a tensor, got {type(x).__name__}")
    if dtype == torch.int64 and name == "seeds":
        x = int(x) & 0xFFFFFFFF  # only the low 32 bits seed the stream
    return torch.full((B,), x, dtype=dtype)



def cfg_sample(
    cond: torch.Tensor,
    uncond: torch.Tensor | None = None,
    cfg_weight=1.0,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    seeds=0,
    greedy=False,
) -> torch.Tensor:
    """Classifier-free guidance and sampling, one token per row; the semantics of kernels/sampling.py (its module
    docstring), with the same random numbers for the same seeds.

    cond, uncond: [B, V] fp32 with contiguous rows (row-strided views such as logits[0::2] are fine; uncond None =
    no guidance). Per-row parameters are a number or a [B] (or [1]) CPU tensor: cfg_weight, temperature, top_p
    float; top_k int (0 = off); seeds int (low 32 bits used); greedy bool. -> int64 [B].
    logits = uncond + w (cond - uncond); greedy rows take the argmax; others sample from softmax(logits / T)
    restricted by top-k then top-p, by Gumbel-max with noise hashed from (seed, token index).
    """
    _check(isinstance(cond, torch.Tensor), f"cond must be a torch.Tensor, got {type(cond).__name__}")
    _check(cond.device.type == "cpu" and cond.dtype == torch.float32 and cond.dim() == 2,
           f"cond must be a 2-D fp32 CPU tensor, got {cond.dtype} {tuple(cond.shape)} on {cond.device}")
    B, V = cond.shape
    _check(V >= 1, "cond needs V >= 1 columns")
    _check(cond.stride(1) == 1, "cond rows must be contiguous (stride(1) == 1)")
    if uncond is not None:
        _check(isinstance(uncond, torch.Tensor) and uncond.device.type == "cpu" and uncond.dtype == torch.float32,
               "uncond must be an fp32 CPU tensor or None")
        _check(uncond.shape == cond.shape, f"uncond {tuple(uncond.shape)} != cond {tuple(cond.shape)}")
        _check(uncond.stride(1) == 1, "uncond rows must be contiguous (stride(1) == 1)")
    w = _per_row(cfg_weight, B, torch.float32, "cfg_weight", _ANY_FLOAT)
    t = _per_row(temperature, B, torch.float32, "temperature", _ANY_FLOAT)
    k = _per_row(top_k, B, torch.int64, "top_k", _INTS)
    p = _per_row(top_p, B, torch.float32, "top_p", _ANY_FLOAT)
    s = _per_row(seeds, B, torch.int64, "seeds", _INTS)
    g = _per_row(greedy, B, torch.bool, "greedy", (torch.bool,) + _INTS)
    out = torch.empty(B, dtype=torch.int64)
    if B == 0:
        return out
    _ext().cfg_sample(
        cond.data_ptr(), 0 if uncond is None else uncond.data_ptr(), w.data_ptr(), t.data_ptr(), k.data_ptr(),
        p.data_ptr(), s.data_ptr(), g.data_ptr(), out.data_ptr(), B, V,
        cond.stride(0), 0 if uncond is None else uncond.stride(0),
    )
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight^T + bias for decode-sized x, streaming the weight once.

    x: [..., K] fp32 or bf16 (M = prod of the leading dims, meant for 1..32); weight: [N, K] fp32 or bf16;
    bias: fp32 [N] or None -> y: fp32 [..., N].
    """
    _check_tensor(x, "x", _FP)
    _check_tensor(weight, "weight", _FP, 2)
    _check(x.dim() >= 1, "x must have at least one dim")
    N, K = weight.shape
    _check(x.shape[-1] == K, f"x {tuple(x.shape)} and weight {tuple(weight.shape)} differ in K")
    _check(N >= 1 and K >= 1, f"weight {tuple(weight.shape)} must be non-empty")
    if bias is not None:
        _check_tensor(bias, "bias", (torch.float32,), 1)
        _check(bias.shape[0] == N, f"bias has {bias.shape[0]} entries; weight has N = {N} rows")
    M = x.numel() // K
    y = torch.empty(*x.shape[:-1], N, dtype=torch.float32)
    if M == 0:
        return y
    _ext().linear(
        x.data_ptr(), _DTYPE_CODE[x.dtype], weight.data_ptr(), _DTYPE_CODE[weight.dtype],
        0 if bias is None else bias.data_ptr(), y.data_ptr(), M, N, K,
    )
    return y



def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in their dtype (fp32 or bf16), rounded as F.silu(gate) * up is: decode_layer's vector code
    (csrc/swiglu.h) as an op. No autograd."""
    _check_tensor(gate, "gate", _FP)
    _check_tensor(up, "up", (gate.dtype,))
    _check(gate.shape == up.shape, f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ in shape")
    out = torch.empty_like(gate)
    _ext().swiglu(gate.data_ptr(), up.data_ptr(), out.data_ptr(), gate.numel(), _DTYPE_CODE[gate.dtype])
    return out


def gather_rows(src: torch.Tensor, idx: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """src[idx] converted to `dtype` (default src's; fp32 -> bf16 rounds as .to does): src [rows, cols] fp32 or
    bf16, idx int64 [n] with every entry in [0, rows) (None = all rows) -> [n, cols]. The row lookups of ImageStep."""
    _check_tensor(src, "src", _FP, 2)
    dtype = dtype or src.dtype
    _check(dtype in _FP, f"dtype must be fp32 or bf16, got {dtype}")
    if idx is not None:
        _check_tensor(idx, "idx", (torch.int64,), 1)
    n = src.shape[0] if idx is None else idx.shape[0]
    out = torch.empty(n, src.shape[1], dtype=dtype)
    if n and src.shape[1]:
        _ext().gather_rows(src.data_ptr(), _DTYPE_CODE[src.dtype], 0 if idx is None else idx.data_ptr(),
                           out.data_ptr(), _DTYPE_CODE[dtype], n, src.shape[1], src.shape[0])
    return out


def packed_available(dtype: torch.dtype = torch.bfloat16) -> bool:
    """True when the extension has the packed GEMV (csrc/packed_gemv.h) for weights of this dtype: fp32 on every
    build, bf16 on a build for a CPU with AVX512_BF16."""
    return available() and dtype in _DTYPE_CODE and bool(_C.packed_available(_DTYPE_CODE[dtype]))


def amx_available() -> bool:
    """True when bf16 packed GEMVs (PackedWeight, the csrc decoder's projections) run on AMX tiles
    (csrc/amx_gemv.h): an extension built for a CPU with AMX-BF16 (Sapphire Rapids and later Xeons), an OS that
    grants the tiles, and the route on (not JANUS_RT_AMX=0 / set_amx(False): then torch_matmul_preferred's auto
    rule sends wide bf16 projections to torch's matmul again). Input widths that are not a multiple of 32 take the
    AVX512-BF16 kernel even then."""
    return available() and bool(_C.amx_available())


def set_amx(on: bool) -> bool:
    """Turn the AMX route of the bf16 packed GEMVs on or off for this process (JANUS_RT_AMX=0 starts it off);
    returns the previous setting. For comparing the two routes: outputs differ in summation order only. Call it
    between kernel calls, never while another thread runs one (each OpenMP thread of a call reads the setting)."""
    return bool(_ext().set_amx(bool(on)))


def packable(dtype: torch.dtype, *in_features: int) -> bool:
    """True when weights of this dtype with these in-features (K) can be packed: packed_available(dtype), and for
    bf16 every K even (the strips hold k pairs). The one rule PackedWeight, DecodeStack and Janus.pack_for_cpu_ use."""
    return packed_available(dtype) and (dtype == torch.float32 or all(k % 2 == 0 for k in in_features))


class PackedWeight:
    """A weight [N, K] (fp32, or bf16 with K even) repacked once into csrc/packed_gemv.h's strip layout; calling it
    is the linear:

        pw = PackedWeight(weight); y = pw(x, bias=None)   # x [..., K] in weight's dtype -> y fp32 [..., N]

    The copy (`data`, N rounded up to a whole strip of rows) is what the kernel reads; the original is not kept.
    Needs packed_available(weight.dtype). Each row of y is bit-identical whatever the number of rows of x.
    """

    def __init__(self, weight: torch.Tensor):
        _check_tensor(weight, "weight", _FP, 2)
        _check(packed_available(weight.dtype),
               "the packed bf16 GEMV needs an extension built for a CPU with AVX512_BF16")
        self.N, self.K = weight.shape
        self.dtype = weight.dtype
        _check(self.N >= 1 and self.K >= 1 and packable(self.dtype, self.K),
               f"weight {tuple(weight.shape)} needs N, K >= 1 (and an even K for bf16)")
        code = _DTYPE_CODE[self.dtype]
        self.data = empty_huge(_C.packed_size(self.N, self.K, code), self.dtype)  # streamed every step
        _C.pack_weight(weight.data_ptr(), self.data.data_ptr(), self.N, self.K, code)

    @property
    def shape(self) -> tuple[int, int]:
        """The original weight's [N, K]."""
        return self.N, self.K

    def numel(self) -> int:
        """Elements of the original weight (N * K; the packed copy pads N to whole strips)."""
        return self.N * self.K

    @staticmethod
    def nbytes(N: int, K: int, dtype: torch.dtype) -> int:
        """Bytes of the packed copy of an [N, K] weight."""
        return _C.packed_size(N, K, _DTYPE_CODE[dtype]) * dtype.itemsize

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        _check_tensor(x, "x", (self.dtype,))
        _check(x.dim() >= 1 and x.shape[-1] == self.K, f"x {tuple(x.shape)} must end in K = {self.K}")
        if bias is not None:
            _check_tensor(bias, "bias", (torch.float32,), 1)
            _check(bias.shape[0] == self.N, f"bias has {bias.shape[0]} entries; the weight has N = {self.N} rows")
        M = x.numel() // self.K
        y = torch.empty(*x.shape[:-1], self.N, dtype=torch.float32)
        if M:
            _C.linear_packed(x.data_ptr(), self.data.data_ptr(), 0 if bias is None else bias.data_ptr(),
                             y.data_ptr(), M, self.N, self.K, _DTYPE_CODE[self.dtype])
        return y


def mlp_gelu(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
             b2: torch.Tensor | None) -> torch.Tensor:
    """y = GELU(x @ w1^T + b1) @ w2^T + b2 (GELU with erf) for decode-sized x, in one csrc call.

    x: [..., K]; w1: [H, K]; b1: [H] or None; w2: [N, H]; b2: [N] or None; all fp32 or all bf16 -> y: fp32 [..., N].
    w1 and w2 may both be PackedWeight (of x's dtype): then both GEMVs are the packed one.
    The hidden layer is rounded to x's dtype before and after the GELU, as ops.mlp_gelu's cpu path rounds it.
    """
    _check_tensor(x, "x", _FP)
    dt = x.dtype
    packed = isinstance(w1, PackedWeight)
    _check(packed == isinstance(w2, PackedWeight), "w1 and w2 must both be PackedWeight or both tensors")
    if packed:
        _check(w1.dtype == dt and w2.dtype == dt, f"packed weights are {w1.dtype} / {w2.dtype}; x is {dt}")
        (H, K), N = (w1.N, w1.K), w2.N
        w2_in = w2.K
    else:
        _check_tensor(w1, "w1", (dt,), 2)
        _check_tensor(w2, "w2", (dt,), 2)
        H, K = w1.shape
        N, w2_in = w2.shape
    w1p, w2p = (w1.data, w2.data) if packed else (w1, w2)
    if x.dim() < 1 or x.shape[-1] != K or w2_in != H:
        raise ValueError(f"x {tuple(x.shape)}, w1 [{H}, {K}] and w2 [{N}, {w2_in}] do not chain")
    for name, b, n in (("b1", b1, H), ("b2", b2, N)):
        if b is not None:
            _check_tensor(b, name, (dt,), 1)
            _check(b.shape[0] == n, f"{name} has {b.shape[0]} entries; expected {n}")
    M = x.numel() // K
    y = torch.empty(*x.shape[:-1], N, dtype=torch.float32)
    if M == 0:
        return y
    _ext().mlp_gelu(x.data_ptr(), w1p.data_ptr(), 0 if b1 is None else b1.data_ptr(), w2p.data_ptr(),
                    0 if b2 is None else b2.data_ptr(), y.data_ptr(), _DTYPE_CODE[dt], M, K, H, N, packed)
    return y


class DecodeStack:
    """The LLM's decoder layers for a decode step on the CPU (csrc/decode_layer.cpp): one csrc call per layer.

    Built once from each layer's weights (in_norm [C], qkv [3C, C], o_proj [C, C], post_norm [C], gate_up [2I, C],
    down [C, I]) and its paged caches k_cache, v_cache [num_blocks, block_size, H, D] with H * D = C, all one dtype
    (fp32 or bf16), MHA; they are checked here once and held (the stack reads them by address on every call).
    Calling it checks only the step's tensors, then runs every layer:
        stack(h, slot_mapping, block_tables, context_lens, cos, sin, out=None)
    h: [R, C] residual stream, updated in place (h <- h + attn(norm(h)); h <- h + mlp(norm(h)) per layer, the
    math of DecoderLayer.forward + ops.kv_store + ops.paged_decode_attention); slot_mapping: int64 [R] (where row
    r's new k, v go; < 0 = write nothing); block_tables: int32 [R, max_blocks]; context_lens: int32 [R] (including
    the new token); cos, sin: fp32 [R, D] rotary tables of each row's position.
    final_norm ([C], the model's last RMSNorm; eps final_eps, default eps): then out ([R, C], h's dtype) receives
    RMSNorm(h) after the last layer, computed inside its call (ops.rms_norm_torch's rounding points).
    packed: hold qkv, o_proj, gate_up and down as PackedWeight copies and run the packed GEMV (fp32; bf16 on an
    AVX512_BF16 build). None (default) = when possible and the copies take at most half of the memory available
    now (they are as large as those weights; the originals stay with the model); True = required (ValueError if
    impossible); False = never. `self.packed` says what was chosen. The four matrices may also come as PackedWeight
    (a model packed in place, Janus.pack_for_cpu_): held as they are, no copy, packed GEMV.
    """

    def __init__(self, layers, caches, eps: float, final_norm=None, final_eps: float | None = None,
                 packed: bool | None = None):
        _check(len(layers) == len(caches) and len(layers) >= 1, "need one (k_cache, v_cache) pair per layer")
        in_norm = layers[0][0]
        _check_tensor(in_norm, "in_norm", _FP, 1)
        self.dtype, self.C = in_norm.dtype, in_norm.shape[0]
        C, dt = self.C, self.dtype
        self.inter = layers[0][5].shape[-1]
        k0 = caches[0][0]
        _check_tensor(k0, "k_cache", (dt,), 4)
        self.num_blocks, self.block_size, self.H, self.D = k0.shape
        _check(self.H * self.D == C and self.D % 2 == 0,
               f"cache heads {self.H} x head_dim {self.D} must be C = {C} with an even head_dim")
        shapes = ((C,), (3 * C, C), (C, C), (C,), (2 * self.inter, C), (C, self.inter))
        names = ("in_norm", "qkv", "o_proj", "post_norm", "gate_up", "down")
        self._held, self._ptrs = [], []
        for i, (ws, (kc, vc)) in enumerate(zip(layers, caches)):
            _check(len(ws) == 6, f"layer {i}: expected 6 weights {names}")
            for name, t, shape in zip(names, ws, shapes):
                if isinstance(t, PackedWeight):  # already packed (Janus.pack_for_cpu_): held as it is
                    _check(len(shape) == 2 and t.dtype == dt, f"layer {i} {name}: a {t.dtype} PackedWeight where a "
                                                              f"{dt} {'matrix' if len(shape) == 2 else 'vector'} goes")
                else:
                    _check_tensor(t, f"layer {i} {name}", (dt,), len(shape))
                _check(tuple(t.shape) == shape, f"layer {i} {name} has shape {tuple(t.shape)}; expected {shape}")
            for name, t in (("k_cache", kc), ("v_cache", vc)):
                _check_tensor(t, f"layer {i} {name}", (dt,), 4)
                _check(t.shape == k0.shape, f"layer {i} {name} {tuple(t.shape)} != {tuple(k0.shape)}")
        prepacked = [isinstance(t, PackedWeight) for ws in layers for t in ws]
        if any(prepacked):
            _check(sum(prepacked) == 4 * len(layers), "pass every layer's four matrices packed, or none of them")
            _check(packed is not False, "packed=False, but the weights are PackedWeight (packed in place: "
                                        "Janus.pack_for_cpu_); they can only run the packed GEMV")
            self.packed = True
        else:
            self.packed = self._choose_packed(packed, layers, shapes)
        for ws, (kc, vc) in zip(layers, caches):
            if self.packed:  # the four matrices (qkv, o_proj, gate_up, down) as packed copies (made here, or given)
                ws = tuple(t.data if isinstance(t, PackedWeight) else PackedWeight(t).data if t.dim() == 2 else t
                           for t in ws)
            self._held.append((*ws, kc, vc))
            self._ptrs.append(tuple(t.data_ptr() for t in (*ws, kc, vc)))
        self._layer_table = _array("q", [x for p in self._ptrs for x in p])  # [L, 8] for csrc image_steps
        self.eps = float(eps)
        self.final_norm = final_norm
        self.final_eps = self.eps if final_eps is None else float(final_eps)
        if final_norm is not None:
            _check_tensor(final_norm, "final_norm", (dt,), 1)
            _check(final_norm.shape[0] == C, f"final_norm has {final_norm.shape[0]} entries; expected C = {C}")

    def _choose_packed(self, packed, layers, shapes) -> bool:
        possible = packable(self.dtype, self.C, self.inter)
        if packed is False or (packed is None and not possible):
            return False
        _check(possible, "packed=True with bf16 weights needs an AVX512_BF16 build and even hidden/intermediate sizes")
        if packed is None:
            per_layer = sum(PackedWeight.nbytes(*s, self.dtype) for s in shapes if len(s) == 2)
            return packed_copy_fits(len(layers) * per_layer)
        return True

    def __call__(self, h, slot_mapping, block_tables, context_lens, cos, sin, out=None) -> None:
        _check_tensor(h, "h", (self.dtype,), 2)
        R = h.shape[0]
        _check((out is None) == (self.final_norm is None), "out is given exactly when the stack has a final_norm")
        if out is not None:
            _check_tensor(out, "out", (self.dtype,), 2)
            _check(tuple(out.shape) == tuple(h.shape), f"out {tuple(out.shape)} must have h's shape {tuple(h.shape)}")
        _check(h.shape[1] == self.C, f"h has {h.shape[1]} columns; the stack's hidden size is {self.C}")
        _check_tensor(slot_mapping, "slot_mapping", (torch.int64,), 1)
        _check_tensor(block_tables, "block_tables", (torch.int32,), 2)
        _check_tensor(context_lens, "context_lens", (torch.int32,), 1)
        _check_tensor(cos, "cos", (torch.float32,), 2)
        _check_tensor(sin, "sin", (torch.float32,), 2)
        _check(slot_mapping.shape[0] == R and block_tables.shape[0] == R and context_lens.shape[0] == R,
               f"slot_mapping, block_tables and context_lens need R = {R} rows")
        _check(cos.shape == (R, self.D) and sin.shape == (R, self.D), f"cos and sin must be [{R}, {self.D}]")
        _check(block_tables.shape[1] >= 1, "block_tables needs at least one column")
        if R == 0:
            return
        self._run(h.data_ptr(), 0 if out is None else out.data_ptr(), slot_mapping.data_ptr(),
                  block_tables.data_ptr(), context_lens.data_ptr(), cos.data_ptr(), sin.data_ptr(), R,
                  block_tables.shape[1])

    def _run(self, h, out, slots, tables, lens, cos, sin, R: int, max_blocks: int) -> None:
        """The layers on checked addresses (__call__'s, or ImageStep's buffers); out = 0: no final norm."""
        ext, code = _ext(), _DTYPE_CODE[self.dtype]
        step = (slots, tables, lens, cos, sin, R, self.C, self.H, self.inter, self.num_blocks, self.block_size,
                max_blocks, self.eps, 1.0 / math.sqrt(self.D))
        last = len(self._ptrs) - 1
        for i, p in enumerate(self._ptrs):  # the C++ side re-checks the block tables against num_blocks every layer
            fin = (self.final_norm.data_ptr(), out) if i == last and out else (0, 0)
            ext.decode_layer(h, code, *p, *step, *fin, self.final_eps, self.packed)


class ImageStep:
    """The decode step of a batch of image rows on the CPU as csrc calls on held buffers, with no torch op per step:
    each image's last token -> gen_embed row -> gen aligner (Linear -> GELU -> Linear) -> repeated to its cond and
    uncond rows -> the decoder layers and final norm (DecodeStack) -> gen head -> CFG + sampling (cfg_sample).
    Why: after a step's weight stream every torch op and Python wrapper starts from cold caches; at the small
    benchmark shape (~7 ms steps on 2 cores) the ~25 of them around these kernels took ~1 ms (RESULTS.md).

    Built once: ImageStep(stack, gen_embed, aligner, gen_head, cos, sin): stack a DecodeStack with a final_norm;
    gen_embed [V_img, E] and the adaptors' (w1, b1, w2, b2) (PackedWeight when the stack is packed, else tensors;
    biases tensors) in the stack's dtype; cos, sin fp32 [P, D], row p = the rotary table of position p as
    DecodeStack takes them.
    Called per step, lists of Python ints and tensors held by the caller:
        tokens = step(image_tokens, embed_rows, positions, slots, block_tables, cond_rows, uncond_rows, params, seeds)
    image_tokens [n]: each image's last token; embed_rows int64 [R]: the image whose embedding row r takes;
    positions, slots [R]; block_tables: R lists of block ids; cond_rows, uncond_rows int64 [n]: image i's two rows;
    params: the [n] tensors cfg_weight, temperature, top_p (fp32), top_k (int64), greedy (bool) as cfg_sample takes
    them; seeds [n] ints -> list of n sampled tokens. Same numerics as the op-by-op path (the torch path's rounding
    points: embeddings and logits rounded to the model dtype).
    step.steps(...) runs k steps in one call (k lists of slots and seeds), feeding each step's tokens to the next:
    the engine's multi-step decode, where the ~0.3 ms of host Python per step (engine bookkeeping, this wrapper,
    both from cold caches after the step's weight stream) is paid once per k steps.
    """

    # csrc/image_steps.cpp's plan entries, in its order
    PLAN = ("dtype", "packed", "rows", "images", "hidden", "heads", "inter", "head_dim", "num_blocks", "block_size",
            "gen_embed", "gen_embed_rows", "gen_embed_dim", "align_w1", "align_b1", "align_w2", "align_b2",
            "align_hidden", "head_w1", "head_b1", "head_w2", "head_b2", "head_hidden", "vocab", "cos", "sin",
            "rope_positions", "final_norm", "buf_x", "buf_emb", "buf_h", "buf_out", "buf_cos", "buf_sin",
            "buf_logits", "embed_rows", "cond_rows", "uncond_rows", "cfg_weight", "temperature", "top_k", "top_p",
            "greedy")
    loop_in_python = False  # tests: run steps() as its per-op Python loop (what it does under torch.profiler)

    def __init__(self, stack: DecodeStack, gen_embed: torch.Tensor, aligner, gen_head, cos: torch.Tensor,
                 sin: torch.Tensor):
        _check(isinstance(stack, DecodeStack) and stack.final_norm is not None,
               "stack must be a DecodeStack with a final_norm")
        dt, self.stack = stack.dtype, stack
        _check_tensor(gen_embed, "gen_embed", (dt,), 2)
        for name, t in (("cos", cos), ("sin", sin)):
            _check_tensor(t, name, (torch.float32,), 2)
            _check(t.shape == cos.shape and t.shape[1] == stack.D, f"{name} must be [P, {stack.D}] like cos")
        self.gen_embed, self.cos, self.sin = gen_embed, cos, sin
        self.adaptors = []
        for name, (w1, b1, w2, b2), k_in, n_out in (("aligner", aligner, gen_embed.shape[1], stack.C),
                                                   ("gen_head", gen_head, stack.C, None)):
            _check(isinstance(w1, PackedWeight) == isinstance(w2, PackedWeight) == stack.packed,
                   f"{name}: weights must be PackedWeight exactly when the stack is packed")
            (H, K), (N, H2) = ((w1.N, w1.K), (w2.N, w2.K)) if stack.packed else (w1.shape, w2.shape)
            for t in (w1, w2) if not stack.packed else ():
                _check_tensor(t, name + " weight", (dt,), 2)
            _check(not stack.packed or (w1.dtype == w2.dtype == dt), f"{name}: packed weights must be {dt}")
            for b, n in ((b1, H), (b2, N)):
                _check_tensor(b, name + " bias", (dt,), 1)
                _check(b.shape[0] == n, f"{name}: a bias of {b.shape[0]} entries for {n} outputs")
            _check(K == k_in and H2 == H and (n_out is None or N == n_out), f"{name}: shapes do not chain")
            w1p, w2p = (w1.data, w2.data) if stack.packed else (w1, w2)
            self.adaptors.append(((w1p, b1, w2p, b2), (K, H, N)))
        self.vocab = self.adaptors[1][1][2]
        self._bufs: dict = {}
        self._prep: tuple = (None, None, ())  # the last batch: (key, _prepared's tuple, the tensors keyed by id)
        self._code = _DTYPE_CODE[dt]
        self._cos_ptr, self._sin_ptr = cos.data_ptr(), sin.data_ptr()

    def _buffers(self, R: int, n: int) -> dict:
        if (R, n) not in self._bufs:
            dt, C, D, E = self.stack.dtype, self.stack.C, self.stack.D, self.gen_embed.shape[1]
            e = lambda *shape, dtype=dt: torch.empty(*shape, dtype=dtype)
            self._bufs = {(R, n): dict(x=e(n, E), emb=e(n, C, dtype=torch.float32), h=e(R, C), out=e(R, C),
                                       cos=e(R, D, dtype=torch.float32), sin=e(R, D, dtype=torch.float32),
                                       logits=e(R, self.vocab, dtype=torch.float32))}
        return self._bufs[(R, n)]

    def _prepared(self, R: int, n: int, embed_rows, cond_rows, uncond_rows, params) -> tuple:
        """The checks and data pointers of one batch's held tensors, redone only when the batch changes (the engine
        holds these per batch): after a step's weight stream every Python operation runs from cold caches, and
        these ~40 tensor attribute reads were a good part of the ~0.2 ms between two steps' csrc calls."""
        held = (embed_rows, cond_rows, uncond_rows, *(params[k] for k in _SAMPLE_PARAMS))
        key = (R, n, *map(id, held))
        if self._prep[0] == key:
            return self._prep[1]
        _check(R >= 1 and n >= 1 and embed_rows.shape[0] == R and cond_rows.shape[0] == n == uncond_rows.shape[0],
               "inconsistent row counts")
        for t in (embed_rows, cond_rows, uncond_rows, params["top_k"]):
            _check(t.dtype == torch.int64 and t.is_contiguous(), "row indices and top_k must be contiguous int64")
        for k, dt in (("cfg_weight", torch.float32), ("temperature", torch.float32), ("top_p", torch.float32),
                      ("top_k", torch.int64), ("greedy", torch.bool)):
            t = params[k]
            _check(t.dtype == dt and t.shape == (n,) and t.is_contiguous(), f"params[{k!r}] must be {dt} [{n}]")
        b = {k: v.data_ptr() for k, v in self._buffers(R, n).items()}
        p = lambda t: t.data_ptr()
        (w1, b1, w2, b2), (K, H, N) = self.adaptors[0]
        embed = (p(self.gen_embed), p(w1), p(b1), p(w2), p(b2), K, H, N, self.gen_embed.shape[0])
        (w1, b1, w2, b2), (K, H, N) = self.adaptors[1]
        head = (p(w1), p(b1), p(w2), p(b2), K, H, N)
        sample = tuple(p(params[k]) for k in _SAMPLE_PARAMS)
        rows = (p(embed_rows), p(cond_rows), p(uncond_rows))
        st = self.stack
        plan = dict(dtype=self._code, packed=int(st.packed), rows=R, images=n, hidden=st.C, heads=st.H,
                    inter=st.inter, head_dim=st.D, num_blocks=st.num_blocks, block_size=st.block_size,
                    gen_embed=embed[0], gen_embed_rows=embed[8], gen_embed_dim=embed[5], align_w1=embed[1],
                    align_b1=embed[2], align_w2=embed[3], align_b2=embed[4], align_hidden=embed[6], head_w1=head[0],
                    head_b1=head[1], head_w2=head[2], head_b2=head[3], head_hidden=head[5], vocab=head[6],
                    cos=self._cos_ptr, sin=self._sin_ptr, rope_positions=self.cos.shape[0],
                    final_norm=st.final_norm.data_ptr(), buf_x=b["x"], buf_emb=b["emb"], buf_h=b["h"],
                    buf_out=b["out"], buf_cos=b["cos"], buf_sin=b["sin"], buf_logits=b["logits"],
                    embed_rows=rows[0], cond_rows=rows[1], uncond_rows=rows[2],
                    **dict(zip(_SAMPLE_PARAMS, sample)))
        plan = _array("q", [int(plan[name]) for name in self.PLAN])  # csrc/image_steps.cpp's order
        # the entry holds the tensors whose ids make the key: none is freed (and its id reused) while cached
        self._prep = (key, (b, embed, head, sample, rows, plan), held)
        return self._prep[1]

    def __call__(self, image_tokens, embed_rows, positions, slots, block_tables, cond_rows, uncond_rows, params,
                 seeds) -> list[int]:
        """One decode step -> the n sampled tokens."""
        return self.steps(image_tokens, embed_rows, positions, [slots], block_tables, cond_rows, uncond_rows, params,
                          [seeds])[0]

    def steps(self, image_tokens, embed_rows, positions, slots, block_tables, cond_rows, uncond_rows, params,
              seeds) -> list[list[int]]:
        """k decode steps in a row, each step's sampled tokens the next step's inputs, without returning to the
        engine in between: slots and seeds are k lists ([R] and [n]); positions are the first step's (step j is at
        positions + j); block_tables must already hold every step's slots. -> k lists of n tokens, the tokens k
        separate calls would give (each step runs the same csrc calls on the same values)."""
        R, n, k = len(positions), len(image_tokens), len(slots)
        _check(k >= 1 and len(seeds) == k, "need k >= 1 steps: k lists of slots and of seeds")
        _check(len(block_tables) == R and all(len(s) == R for s in slots) and all(len(s) == n for s in seeds),
               "inconsistent row counts")
        b, (emb_w, w1, b1, w2, b2, K, H, N, V_img), head, sample, (er, cr, ur), plan = self._prepared(
            R, n, embed_rows, cond_rows, uncond_rows, params)
        ext, code, F32 = _ext(), self._code, _DTYPE_CODE[torch.float32]
        width = max(len(t) for t in block_tables)
        _check(width >= 1, "block_tables need at least one block")
        # every step's inputs in one array each (step j's at offset j * R or j * n); step j > 0 reads its image tokens
        # from the previous step's sampled ones in `out`
        tok = _array("q", image_tokens)
        pos = _array("q", [p + j for j in range(k) for p in positions])
        lens = _array("i", [p + 1 + j for j in range(k) for p in positions])
        sl = _array("q", [x for step in slots for x in step])
        bt = _array("i", [x for t in block_tables for x in (t if len(t) == width else t + [0] * (width - len(t)))])
        sd = _array("q", [x & 0xFFFFFFFF for step in seeds for x in step])
        out = _array("q", bytes(8 * n * k))
        a = lambda arr: arr.buffer_info()[0]
        tok_p, pos_p, lens_p, sl_p, bt_p, sd_p, out_p = a(tok), a(pos), a(lens), a(sl), a(bt), a(sd), a(out)
        P, D = self.cos.shape[0], self.stack.D
        w1h, b1h, w2h, b2h, Kh, Hh, Nh = head
        cfg_w, temp, top_k, top_p, greedy = sample
        st = self.stack
        if not (self.loop_in_python or torch.autograd._profiler_enabled()):  # the k steps in one csrc call
            ext.image_steps(plan.buffer_info()[0], st._layer_table.buffer_info()[0], len(st._ptrs), k, tok_p, pos_p,
                            lens_p, sl_p, bt_p, width, sd_p, out_p, st.eps, st.final_eps, 1.0 / math.sqrt(st.D))
            res = out.tolist()
            return [res[j * n:(j + 1) * n] for j in range(k)]
        # the same calls one by one: under torch.profiler (`janus-rt bench --profile`), each in its named range
        scope = _profiler_scope()
        for j in range(k):
            t_p = tok_p if j == 0 else out_p + 8 * n * (j - 1)
            with scope("janus_rt::cpu_gen_embeds"):
                ext.gather_rows(emb_w, code, t_p, b["x"], code, n, K, V_img)
                ext.mlp_gelu(b["x"], w1, b1, w2, b2, b["emb"], code, n, K, H, N, self.stack.packed, True)
                ext.gather_rows(b["emb"], F32, er, b["h"], code, R, N, n)
            with scope("janus_rt::cpu_decode_layers"):
                ext.gather_rows(self._cos_ptr, F32, pos_p + 8 * R * j, b["cos"], F32, R, D, P)
                ext.gather_rows(self._sin_ptr, F32, pos_p + 8 * R * j, b["sin"], F32, R, D, P)
                self.stack._run(b["h"], b["out"], sl_p + 8 * R * j, bt_p, lens_p + 4 * R * j, b["cos"], b["sin"], R,
                                width)
            with scope("janus_rt::cpu_mlp_gelu"):
                ext.mlp_gelu(b["out"], w1h, b1h, w2h, b2h, b["logits"], code, R, Kh, Hh, Nh, self.stack.packed, True)
            with scope("janus_rt::cpu_cfg_sample"):
                lg = b["logits"]
                ext.cfg_sample(lg, lg, cfg_w, temp, top_k, top_p, sd_p + 8 * n * j, greedy, out_p + 8 * n * j, n,
                               Nh, Nh, Nh, cr, ur, R)
        res = out.tolist()
        return [res[j * n:(j + 1) * n] for j in range(k)]


_SAMPLE_PARAMS = ("cfg_weight", "temperature", "top_k", "top_p", "greedy")  # cfg_sample's order


def _profiler_scope():
    """name -> a torch.profiler range while the profiler records, else a no-op context (one check per step)."""
    if torch.autograd._profiler_enabled():
        return torch.profiler.record_function
    return lambda name: contextlib.nullcontext()


@contextlib.contextmanager
def decode_phase_timing():
    """Time the phases of every csrc decoder-layer call (DecodeStack, ImageStep) made inside the block:

        with cpu_ops.decode_phase_timing() as t:
            engine.step()
        t["calls"], t["seconds"]  # layer calls timed; {phase: seconds summed over them}, phases in run order

    Each phase is its wall time on the critical path (taken by the team's thread 0 after the phase's barrier):
    layer_setup (the call's start to the first phase: buffers, attention plan, the OpenMP team's start),
    input_norm, qkv_proj, rope_kv_store, attention, pack_o, o_proj, residual_post_norm, gate_up_proj, silu_mul,
    down_proj, residual. Process-wide: calls from other threads inside the block are counted too."""
    ext = _ext()
    names = [ext.decode_phase_name(i) for i in range(ext.decode_phase_count())]
    buf = torch.zeros(len(names), dtype=torch.float64)
    ext.decode_phase_read(buf.data_ptr(), True)  # drop anything timed before
    result = {"calls": 0, "seconds": {}}
    ext.decode_phase_timing(True)
    try:
        yield result
    finally:
        ext.decode_phase_timing(False)
        result["calls"] = ext.decode_phase_read(buf.data_ptr(), True)
        result["seconds"] = dict(zip(names, buf.tolist()))


def packed_copy_fits(nbytes: int) -> bool:
    """The rule for making packed copies beside the originals (DecodeStack's packed=None, and what makes the CLI
    pack in place instead): they may take at most half of the memory available now."""
    return nbytes <= available_memory() // 2


def available_memory() -> int:
    """Bytes of memory available to allocate now (MemAvailable of /proc/meminfo, else free physical pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


HUGE_PAGE = 2 << 20


def empty_huge(shape, dtype: torch.dtype) -> torch.Tensor:
    """torch.empty(shape, dtype=dtype) on the CPU, in fresh memory that the kernel is asked to back with 2 MiB
    transparent huge pages (madvise MADV_HUGEPAGE), for the large long-lived buffers every decode step streams:
    packed weights, the KV pool. Why: from DRAM the packed bf16 GEMV read 1B weights 8-13 % faster and paged
    attention 4 % faster in huge pages, whole 1B n = 4 generations 4-12 % (Zen 4, bench/RESULTS.md 2026-12-04).
    A private anonymous mapping of its own (torch.empty may reuse heap pages that are already 4 KiB-backed: an 8 MiB
    matrix got none), 2 MiB-aligned (up to 2 MiB more is mapped, never touched); freed with the tensor. Values are
    uninitialised, as torch.empty's (in fact zeros). Plain torch.empty below 2 MiB, where mmap cannot do it (or
    fails), or with JANUS_RT_HUGE_PAGES=0; where the kernel has no THP, has it off, or has no huge page free at first
    touch, the memory is ordinary 4 KiB pages."""
    shape = tuple(shape) if isinstance(shape, (tuple, list, torch.Size)) else (int(shape),)
    nbytes = math.prod(shape) * dtype.itemsize
    if (nbytes < HUGE_PAGE or os.environ.get("JANUS_RT_HUGE_PAGES", "1") == "0"
            or not hasattr(mmap, "MADV_HUGEPAGE") or not hasattr(mmap, "MAP_PRIVATE")):
        return torch.empty(shape, dtype=dtype)
    try:
        region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError:  # no mapping to be had: torch's allocator decides
        return torch.empty(shape, dtype=dtype)
    buf = torch.frombuffer(region, dtype=torch.uint8)  # holds a reference to the mapping
    start = -buf.data_ptr() % HUGE_PAGE
    try:
        region.madvise(mmap.MADV_HUGEPAGE, start, nbytes // HUGE_PAGE * HUGE_PAGE)
    except OSError:  # a kernel without THP (EINVAL): ordinary pages
        pass
    return buf[start:start + nbytes].view(dtype).view(shape)


def decode_layer(h, in_norm, qkv, o_proj, post_norm, gate_up, down, k_cache, v_cache, slot_mapping, block_tables,
                 context_lens, cos, sin, eps: float, packed: bool | None = False) -> None:
    """One decoder layer (a DecodeStack of one, see there): h [R, C] updated in place."""
    DecodeStack([(in_norm, qkv, o_proj, post_norm, gate_up, down)], [(k_cache, v_cache)], eps, packed=packed)(
        h, slot_mapping, block_tables, context_lens, cos, sin)
