"""The one Python accessor of janus_rt._C, the C++/OpenMP CPU kernels (csrc/).

Each function checks every tensor (device, dtype, contiguity, shape) and raises ValueError on misuse, allocates
the output with torch.empty, and passes data pointers and sizes to C++, which guards the sizes and any
data-dependent indices (block tables, slots) again. All math is fp32; bf16 inputs are read as their uint16 bits.
The decode step built from these kernels on held buffers (DecodeStack, ImageStep) is cpu_step's.
"""
from __future__ import annotations

import math
import mmap
import os
import sys

import torch

from janus_rt.errors import env_switch

try:
    from janus_rt import _C
except ImportError:  # extension not built: available() is False and every op raises
    _C = None

_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1}
_INT8_CODE = 2  # the packed ops' code for int8 weights with fp32 row scales and bf16 x (csrc/int8_gemv.h)
_W8A8_CODE = 4  # ... for those weights with x quantized to int8 per row and group in the call (csrc/w8a8_gemv.h)
W8A8_GROUP = 512  # W8A8: columns of x per quantization group (one scale each)
_KV_INT8_CODE = 3  # the cache code for an int8 KV cache with fp32 scales (csrc/kv_int8.h)


def available() -> bool:
    """True when janus_rt._C is built and importable."""
    return _C is not None


def simd_isa() -> str:
    """Vector ISA the extension was compiled for: "avx512", "avx2" or "scalar"."""
    return _ext().simd_isa()


def prefetch_rules() -> dict[str, int]:
    """The decode kernels' software-prefetch rules as this CPU takes them (csrc/packed_gemv.h, w8a8_gemv.h,
    paged_attention.h): amd_family (AMD's CPUID family, 0x19 Zen 3 / Zen 4, 0x1A Zen 5; 0 on other vendors), intel
    (1 on Intel CPUs), zen5 (1 where the Zen 5 rules apply: AMD family 0x1A and later), the rows of x from which the
    packed bf16 / fp32 and W8A8 GEMVs prefetch the next weight tile (packed_bf16_min_rows -1 in a build without the
    bf16 GEMV), the paged attention's prefetch locality (2 = L2, 3 = L1), and whether it prefetches a row's next cache
    chunk's K during the V pass (1: Zen 4; for a bf16 cache, attention_k_during_v_bf16, Zen 4 and Intel) or during
    the K scoring. bench/RESULTS.md (thirtieth, thirty-seventh and forty-fifth sessions) has why."""
    return dict(_ext().prefetch_rules())


def set_thread_team(n: int) -> None:
    """This thread's OpenMP team only: n threads for the csrc kernels and torch's ops called from this thread, while
    torch's process-wide count (torch.set_num_threads'; each thread copies it at its first torch op) stays as it is.
    torch's MKL calls (fp32 GEMM, VML) take MKL's own thread-local count, set here too (as torch.set_num_threads
    does). Where torch does not follow (another OpenMP runtime than the extension's), or without the extension:
    torch.set_num_threads(n)."""
    _check(n >= 1, f"a team needs n >= 1 threads, got {n}")
    torch.get_num_threads()  # (torch's once-per-thread set-up first: it would set this thread's count from its own)
    if _C is not None:
        _C.set_thread_team(n)
        if torch.get_num_threads() == n:
            mkl = _mkl_set_num_threads_local()
            if mkl is not None:
                mkl(n)
            return
    torch.set_num_threads(n)


_MKL_LOCAL = ...


def _mkl_set_num_threads_local():
    """MKL's C call MKL_Set_Num_Threads_Local(int) (the lower-case name is the Fortran one, which takes int *), from
    torch's CPU library (MKL is linked into it), or None (no MKL)."""
    global _MKL_LOCAL
    if _MKL_LOCAL is ...:
        _MKL_LOCAL = None
        if torch.backends.mkl.is_available():
            import ctypes
            import glob

            for path in glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "*torch_cpu.*")):
                try:
                    fn = ctypes.CDLL(path).MKL_Set_Num_Threads_Local
                except (OSError, AttributeError):
                    continue
                fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
                _MKL_LOCAL = fn
                break
    return _MKL_LOCAL


def prefetch_rule() -> str:
    """"zen5" where the decode kernels take Zen 5's prefetch rules (prefetch_rules()), "zen4" where they take the
    default ones plus the paged attention's K-during-V prefetch (Zen 4's), "intel" where they take the default ones
    plus that prefetch for bf16 caches (Intel's), else "default"."""
    rules = prefetch_rules()
    if rules["zen5"]:
        return "zen5"
    if rules["attention_k_during_v"]:
        return "zen4"
    return "intel" if rules["attention_k_during_v_bf16"] else "default"


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
    at widths from TORCH_MATMUL_MIN_WIDTH where torch's oneDNN matmul can use AMX-BF16 tiles (onednn_amx_usable())
    and this build's GEMV cannot (no amx_available(): a portable build, or JANUS_RT_AMX=0).
    Measured on such a host (Intel Xeon, 2 cores, 2026-12-04, ms per decode step): Janus-Pro-1B n = 16 with the
    AVX512-BF16 GEMV 498 vs torch 275, then with the AMX GEMV 245; hidden 512 x 8 layers n = 4 4.1 (AVX512-BF16) vs
    12.4 (torch) and the tiny preset 0.07 vs 1.70, where the layer-by-layer step's Python costs more than the matmuls
    save (bench/RESULTS.md). Where neither can use the tiles (an OS that refuses them to the process; measured with
    oneDNN capped at AVX512_CORE_BF16, 2026-12-08): 1B n = 1 torch 554.67 vs csrc 113.97, n = 16 621.19 vs 451.05,
    so the csrc GEMVs there."""
    v = env_switch("JANUS_RT_CPU_MATMUL")
    if v in ("torch", "csrc"):
        return v == "torch"
    return (dtype == torch.bfloat16 and (width is None or width >= TORCH_MATMUL_MIN_WIDTH)
            and torch.backends.mkldnn.is_available() and not amx_available() and onednn_amx_usable())


_ONEDNN_AMX = None  # onednn_amx_usable()'s answer from the OS (asked once)
# ONEDNN_MAX_CPU_ISA's values (oneDNN's CPU dispatcher control) that leave AMX out
_ONEDNN_CAPS_BELOW_AMX = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_MIC",
                                    "AVX512_MIC_4OPS", "AVX512_CORE", "AVX512_CORE_VNNI", "AVX512_CORE_BF16",
                                    "AVX512_CORE_FP16", "AVX10_1_512"})


def onednn_amx_usable() -> bool:
    """Whether torch's oneDNN matmul can run on AMX-BF16 tiles here: the CPU has them (/proc/cpuinfo), Linux grants
    this process their state (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA, as oneDNN asks: kernels before 5.16 list
    the flags but refuse it), and ONEDNN_MAX_CPU_ISA (or DNNL_MAX_CPU_ISA) does not cap oneDNN below AMX."""
    global _ONEDNN_AMX
    if "amx_bf16" not in cpu_flags():
        return False
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    if cap in _ONEDNN_CAPS_BELOW_AMX:  # (oneDNN ignores a name it does not know: no cap)
        return False
    if _ONEDNN_AMX is None:
        _ONEDNN_AMX = _os_grants_amx()
    return _ONEDNN_AMX


def _os_grants_amx() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    sys_arch_prctl, req_xcomp_perm, xfeature_xtiledata = 158, 0x1023, 18
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(sys_arch_prctl, req_xcomp_perm, xfeature_xtiledata) == 0
    except (OSError, AttributeError):
        return False


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


def _check_tensor(t, name: str, dtypes, ndim: int | None = None, contiguous: bool = True) -> None:
    # called on every kernel call: the messages are formatted only on failure (eagerly it was ~9 us a call)
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} is on {t.device}; the CPU kernels need CPU tensors")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {t.dtype}; expected one of {list(dtypes)}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous())")


def _rows(t, name: str, dtypes) -> torch.Tensor:
    """t [..., n] as a [R, n] view whose rows are n contiguous elements at one row stride (a contiguous tensor, or
    a slice of its last dim such as q of a qkv projection's output or a half of gate_up's); a copy where t has no
    such view."""
    _check_tensor(t, name, dtypes, contiguous=False)
    _check(t.dim() >= 1, f"{name} must have at least one dim")
    n = t.shape[-1]
    try:
        v = t.view(-1, n)
    except RuntimeError:
        v = t.contiguous().view(-1, n)
    if v.stride(-1) != 1 and v.numel() > 0:
        v = v.contiguous()
    return v


def _ld(v: torch.Tensor) -> int:
    """The row stride of _rows' view (any stride >= n where it has one row)."""
    return max(v.stride(0), v.shape[1]) if v.shape[0] <= 1 else v.stride(0)


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
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode token per sequence against a paged KV cache.

    q: [B, H, D] fp32 or bf16; k_cache, v_cache: [num_blocks, block_size, Hkv, D] fp32 or bf16 (H % Hkv == 0), or
    int8 with k_scale, v_scale fp32 [num_blocks, block_size, Hkv] (engine/kv_quant.py's format);
    block_tables: int32 [B, max_blocks]; context_lens: int32 [B]; sm_scale defaults to D^-0.5.
    Returns o: [B, H, D] in q's dtype (fp32 accumulation); a sequence with context_len 0 gets zeros.
    """
    _check_tensor(q, "q", _FP, 3)
    _check_tensor(k_cache, "k_cache", _FP + (torch.int8,), 4)
    _check_tensor(v_cache, "v_cache", _FP + (torch.int8,), 4)
    int8 = k_cache.dtype == torch.int8
    _check((k_scale is not None) == int8 == (v_scale is not None),
           "k_scale and v_scale are given exactly when the caches are int8")
    if int8:
        for name, t in (("k_scale", k_scale), ("v_scale", v_scale)):
            _check_tensor(t, name, (torch.float32,), 3)
            _check(tuple(t.shape) == tuple(k_cache.shape[:3]), f"{name} {tuple(t.shape)} must be the cache's "
                                                              f"[num_blocks, block_size, Hkv] {tuple(k_cache.shape[:3])}")
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
        q.data_ptr(), _DTYPE_CODE[q.dtype], k_cache.data_ptr(), v_cache.data_ptr(),
        _KV_INT8_CODE if int8 else _DTYPE_CODE[k_cache.dtype], block_tables.data_ptr(), context_lens.data_ptr(),
        o.data_ptr(), B, H, hkv, D, num_blocks, block_size, block_tables.shape[1], scale,
        k_scale.data_ptr() if int8 else 0, v_scale.data_ptr() if int8 else 0,
    )
    return o


def prefill_attention_available() -> bool:
    """True when the extension has the bf16 prefill attention (csrc/prefill_attention.cpp: AVX512_BF16)."""
    return available() and bool(_C.prefill_attention_available())


def _token_rows(t: torch.Tensor) -> bool:
    """t [B, T, H, D] holds each token's H x D values contiguously, tokens apart by at least that (size-1 dims: any
    stride)."""
    _, T, H, D = t.shape
    return t.stride(3) == 1 and (H == 1 or t.stride(2) == D) and (T == 1 or t.stride(1) >= H * D)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                      sm_scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v for bf16 q [B, Tq, H, D], k, v [B, Tk, Hkv, D] (H a multiple of Hkv; D a multiple of
    16 up to 256) -> [B, Tq, H, D] bf16; causal aligned bottom-right (Tq <= Tk). Scores and sums in fp32, the softmax
    weights rounded to bf16 for the product with v (as torch's CPU flash attention does): ops.attention_torch's result
    to bf16 rounding (tests/test_prefill_attention.py); a row with a NaN or +inf score is NaN, as torch's."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(t, name, (torch.bfloat16,), 4, contiguous=False)
    # each token's heads x D contiguous, any batch and token strides (views of a fused qkv output need no copy)
    q, k, v = (t if _token_rows(t) else t.contiguous() for t in (q, k, v))
    st = lambda t: (t.stride(0), t.stride(1) if t.shape[1] > 1 else t.shape[2] * t.shape[3])  # (a size-1 dim's
    B, Tq, H, D = q.shape                                                                     # stride is arbitrary)
    _, Tk, hkv, dk = k.shape
    _check(v.shape == k.shape and k.shape[0] == B, f"k {tuple(k.shape)} and v {tuple(v.shape)} must be [B, Tk, Hkv, D]"
           f" with q's B = {B}")
    _check(dk == D and D % 16 == 0 and 16 <= D <= 256, f"head_dim {D} (k: {dk}) must be a multiple of 16 up to 256")
    _check(H % hkv == 0, f"q heads {H} must be a multiple of k/v heads {hkv}")
    _check(not causal or Tq <= Tk, f"causal attention needs Tq <= Tk (got {Tq} > {Tk})")
    # contiguous [B, Tq, H, D], the layout the kernel writes (empty_like would copy a dense permuted q's strides)
    o = torch.empty(q.shape, dtype=q.dtype)
    if o.numel():
        _ext().prefill_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), B, Tq, Tk, H, hkv, D,
                                 bool(causal), 1.0 / math.sqrt(D) if sm_scale is None else float(sm_scale),
                                 *st(q), *st(k), *st(v))
    return o


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] fp32 or bf16 -> (q int8 [..., D], scale fp32 [...]): the int8 KV cache's rows (csrc/kv_int8.h),
    bit-identical to engine/kv_quant.quantize_kv, the PyTorch reference."""
    _check_tensor(x, "x", _FP)
    _check(x.dim() >= 1 and x.shape[-1] >= 1, "x needs a last dimension of at least one element")
    q = torch.empty(x.shape, dtype=torch.int8)
    scale = torch.empty(x.shape[:-1], dtype=torch.float32)
    _ext().kv_quantize(x.data_ptr(), _DTYPE_CODE[x.dtype], q.data_ptr(), scale.data_ptr(), x.numel() // x.shape[-1],
                       x.shape[-1])
    return q, scale


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
    (csrc/swiglu.h) as an op; gate and up may be slices of one tensor's last dim (the halves of gate_up's output).
    Returns a contiguous tensor of gate's shape. No autograd."""
    _check_tensor(gate, "gate", _FP, contiguous=False)
    _check_tensor(up, "up", (gate.dtype,), contiguous=False)
    _check(gate.shape == up.shape, f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ in shape")
    out = torch.empty(gate.shape, dtype=gate.dtype)
    if gate.dim() == 0:
        return out.copy_(swiglu(gate[None], up[None])[0])
    g, u = _rows(gate, "gate", _FP), _rows(up, "up", _FP)
    _ext().swiglu(g.data_ptr(), _ld(g), u.data_ptr(), _ld(u), out.data_ptr(), g.shape[0], g.shape[1],
                  _DTYPE_CODE[gate.dtype])
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """LlamaRMSNorm of x's last dim in x's dtype (fp32 or bf16) with ops.rms_norm_torch's rounding points
    (csrc/rms_norm.h, decode_layer's row code, rows in parallel); with `residual`, returns (norm(x + residual),
    x + residual) as ops.rms_norm does. x and residual may be slices of a wider last dim; outputs are contiguous.
    No autograd."""
    xv = _rows(x, "x", _FP)
    _check_tensor(weight, "weight", (x.dtype,), 1)
    C = xv.shape[1]
    _check(weight.shape[0] == C and C >= 1, f"weight has {weight.shape[0]} entries; x's last dim is {C}")
    out = torch.empty(x.shape, dtype=x.dtype)
    h = None
    if residual is not None:
        _check(residual.shape == x.shape, f"residual {tuple(residual.shape)} and x {tuple(x.shape)} differ in shape")
        rv = _rows(residual, "residual", (x.dtype,))
        h = torch.empty(x.shape, dtype=x.dtype)
    if xv.shape[0]:
        _ext().rms_norm(xv.data_ptr(), _ld(xv), 0 if h is None else rv.data_ptr(), 0 if h is None else _ld(rv),
                        weight.data_ptr(), out.data_ptr(), 0 if h is None else h.data_ptr(), xv.shape[0], C,
                        float(eps), _DTYPE_CODE[x.dtype])
    return out if h is None else (out, h)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of x [..., H, D] (fp32 or bf16) with ops.rope_torch's rounding points (csrc/rope.h,
    decode_layer's head code): cos, sin fp32 [R, D] for the R = x.numel() / (H * D) rows of x, holding values of x's
    dtype (ops.rope_tables(...).float()). x may be a slice of a wider last dim (q or k of a qkv output viewed as
    heads); returns a contiguous tensor of x's shape. No autograd."""
    _check(isinstance(x, torch.Tensor) and x.dim() >= 2, "x must be a tensor [..., H, D]")
    H, D = x.shape[-2], x.shape[-1]
    _check(D >= 2 and D % 2 == 0, f"head_dim must be even, got {D}")
    xv = _rows(x.flatten(-2), "x", _FP)  # a view where each row's heads are contiguous (else a copy)
    R = xv.shape[0]
    for name, t in (("cos", cos), ("sin", sin)):
        _check_tensor(t, name, (torch.float32,), 2)
        _check(tuple(t.shape) == (R, D), f"{name} {tuple(t.shape)} must be [{R}, {D}]")
    out = torch.empty(x.shape, dtype=x.dtype)
    if R:
        _ext().rope(xv.data_ptr(), _ld(xv), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), R, H, D,
                    _DTYPE_CODE[x.dtype])
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


def amx_w8a8_available() -> bool:
    """True when W8A8 GEMVs (W8A8Weight, a W8A8 decoder's projections) of 4 or more rows of x run on AMX-INT8 tiles
    (csrc/amx_w8a8.h): an extension built for a CPU with AMX-INT8, an OS that grants the tiles, and the route on (as
    amx_available). Input widths that are not a multiple of 64 take the VPDPBUSD kernel even then. Both give the
    same bits (w8a8_reference's)."""
    return available() and bool(_C.amx_w8a8_available())


def set_amx(on: bool) -> bool:
    """Turn the AMX routes of the packed GEMVs (bf16, and W8A8's AMX-INT8 one) on or off for this process
    (JANUS_RT_AMX=0 starts them off); returns the previous setting. For comparing the routes: bf16 outputs differ in
    summation order only, W8A8 ones not at all. Call it
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


def int8_available() -> bool:
    """True when the extension has the weight-only int8 GEMV (Int8Weight; csrc/int8_gemv.h): int8 weights with one
    fp32 scale per output row, bf16 x. Needs a build for a CPU with AVX512_BF16; on AMX-BF16 tiles where
    amx_available()."""
    return available() and bool(_C.packed_available(_INT8_CODE))


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row (per output channel) int8 of a weight [N, K]: (q int8 [N, K], scale fp32 [N]) with
    scale[n] = max_k |w[n, k]| / 127 and q = round(w / scale) in [-127, 127], so w ~ q * scale[:, None] with an
    error of at most scale / 2 per element (a row of zeros: scale 0, q 0). Computed in fp32 from w's values. (For a
    row whose scale falls below fp32's normal range, max |w| < ~1.5e-36, the scale itself is rounded to a subnormal
    and the bound holds only to that rounding; bf16 weights, --int8's, stay within it.)"""
    _check(isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.is_floating_point()
           and weight.numel() > 0, "weight must be a non-empty floating-point [N, K] tensor")
    _check(bool(torch.isfinite(weight).all()), "weight has inf or nan entries; int8 needs finite weights")
    N, K = weight.shape
    q, scale = torch.empty(N, K, dtype=torch.int8), torch.empty(N, dtype=torch.float32)
    # rows in chunks of ~16 M values: the fp32 temporaries of a whole 7B LM head were ~3 GB (rows are independent)
    step = max(1, (1 << 24) // K)
    for r in range(0, N, step):
        w = weight[r:r + step].detach().to(device="cpu", dtype=torch.float32)
        s = w.abs().amax(dim=1) / 127.0
        q[r:r + step] = torch.round(w / torch.where(s > 0, s, 1.0)[:, None]).clamp_(-127, 127)
        scale[r:r + step] = s
    return q, scale


class Int8Weight(PackedWeight):
    """A weight [N, K] held as symmetric per-row int8 (quantize_int8) in csrc/int8_gemv.h's layout, half the bytes
    of bf16; calling it is the linear of the dequantized weight:

        iw = Int8Weight(weight); y = iw(x, bias=None)   # x bf16 [..., K] -> y fp32 [..., N] = x @ (q * s)^T + bias
        iw = Int8Weight.from_quantized(q, scale)          # q, scale as quantize_int8 gives them

    The products q * x are exact in fp32 and summed in k order per element, the scale applied to the sum, so each
    row of y is bit-identical whatever the number of rows of x. `dtype` is x's (bf16), as the model's. K even.
    Needs int8_available()."""

    code = _INT8_CODE  # the packed ops' weight code
    activations = "bf16"
    _needs = "the int8 GEMV needs an extension built for a CPU with AVX512_BF16"
    _k_step = 2  # K a multiple of this (k pairs)

    def __init__(self, weight: torch.Tensor):
        q, scale = quantize_int8(weight)
        self._pack(q, scale)

    @classmethod
    def from_quantized(cls, q: torch.Tensor, scale: torch.Tensor) -> "Int8Weight":
        _check_tensor(q, "q", (torch.int8,), 2)
        _check_tensor(scale, "scale", (torch.float32,), 1)
        _check(scale.shape[0] == q.shape[0], f"scale has {scale.shape[0]} entries; q has {q.shape[0]} rows")
        _check(bool(torch.isfinite(scale).all()) and bool((scale >= 0).all()), "scales must be finite and >= 0")
        self = cls.__new__(cls)
        self._pack(q, scale)
        return self

    @staticmethod
    def _available() -> bool:
        return int8_available()

    def _pack(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        _check(self._available(), self._needs)
        self.N, self.K = q.shape
        step = self._k_step
        _check(self.N >= 1 and self.K >= step and self.K % step == 0,
               f"weight {tuple(q.shape)} needs N >= 1 and " + ("an even K" if step == 2 else "K >= 1"))
        self.dtype = torch.bfloat16
        self.data = empty_huge(_C.packed_size(self.N, self.K, self.code), torch.int8)  # streamed every step
        pack = _C.pack_w8a8 if self.code == _W8A8_CODE else _C.pack_int8
        pack(q.data_ptr(), scale.data_ptr(), self.data.data_ptr(), self.N, self.K)

    @classmethod
    def nbytes(cls, N: int, K: int, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes of the int8 copy of an [N, K] weight (its scales included)."""
        return _C.packed_size(N, K, cls.code)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        _check_tensor(x, "x", (torch.bfloat16,))
        _check(x.dim() >= 1 and x.shape[-1] == self.K, f"x {tuple(x.shape)} must end in K = {self.K}")
        if bias is not None:
            _check_tensor(bias, "bias", (torch.float32,), 1)
            _check(bias.shape[0] == self.N, f"bias has {bias.shape[0]} entries; the weight has N = {self.N} rows")
        M = x.numel() // self.K
        y = torch.empty(*x.shape[:-1], self.N, dtype=torch.float32)
        if M:
            _C.linear_packed(x.data_ptr(), self.data.data_ptr(), 0 if bias is None else bias.data_ptr(),
                             y.data_ptr(), M, self.N, self.K, self.code)
        return y


def w8a8_available() -> bool:
    """True when the extension has the W8A8 GEMV (W8A8Weight; csrc/w8a8_gemv.h): a build for a CPU with AVX512_VNNI
    (and AVX512_BF16, which the bf16 model around it needs)."""
    return available() and bool(_C.packed_available(_W8A8_CODE)) and bool(_C.packed_available(1))


def quantize_activations(x: torch.Tensor, group: int = W8A8_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (any float dtype) quantized per row and per group of `group` columns, as the W8A8 GEMV does before
    its products: (codes int8 [M, K], scales fp32 [M, ceil(K / group)]), each group by engine.kv_quant.quantize_kv's
    rule (s = max|x| * fp32(1/127), codes round-half-even(x / s) in [-127, 127]; a group with a NaN or an infinity:
    s NaN, codes 0)."""
    from janus_rt.engine.kv_quant import quantize_kv

    M, K = x.shape
    ng = -(-K // group)
    xf = torch.nn.functional.pad(x.float(), (0, ng * group - K))  # zeros change neither a group's max nor codes
    q, s = quantize_kv(xf.view(M, ng, group))
    return q.view(M, ng * group)[:, :K].contiguous(), s


def w8a8_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                   group: int = W8A8_GROUP) -> torch.Tensor:
    """The W8A8 GEMV's numbers in plain PyTorch: x [M, K] bf16, (q int8 [N, K], scale fp32 [N]) as quantize_int8
    gives them -> y fp32 [M, N]. x is quantized by quantize_activations; per group g the integer dot products
    acc_g = codes_g @ q_g^T are exact (here in float64; |acc| <= 512 * 127 * 127 < 2^24), then in fp32, each
    operation rounded once: c = acc_0 * sx_0, c = c + acc_g * sx_g for g = 1, 2, ...; y = c * scale (+ bias).
    csrc/w8a8_gemv.h does the same operations, so its y is bit-identical to this."""
    M, K = x.shape
    codes, sx = quantize_activations(x, group)
    c = None
    for g in range(sx.shape[1]):
        cols = slice(g * group, min(K, (g + 1) * group))
        acc = (codes[:, cols].double() @ q[:, cols].double().T).float()  # integers below 2^24: exact in fp32
        f = acc * sx[:, g:g + 1]
        c = f if c is None else c + f
    y = c * scale.float()
    return y if bias is None else y + bias.float()


class W8A8Weight(Int8Weight):
    """An Int8Weight (the same per-row int8 weights) whose GEMV also quantizes x, per row and per group of 512
    columns (quantize_activations), and multiplies int8 by int8 with AVX512-VNNI's VPDPBUSD (csrc/w8a8_gemv.h):
    twice the multiplies per instruction of the bf16 dot product that a weight-only int8 GEMV widens its weights
    for, so faster where the decode step's projections are bound by multiplies rather than bytes (many rows of x).
    On a CPU with AMX-INT8, 4 or more rows run on its tiles (csrc/amx_w8a8.h; amx_w8a8_available()), the same bits.
    x's rounding to 8 bits per group comes on top of the weights' (w8a8_reference: bit-identical).
    Each row of y depends on that row of x only. K any size >= 1. Needs w8a8_available()."""

    code = _W8A8_CODE  # (its bytes unsigned: q + 128)
    activations = "int8"
    _needs = "the W8A8 GEMV needs an extension built for a CPU with AVX512_VNNI and AVX512_BF16"
    _k_step = 1

    @staticmethod
    def _available() -> bool:
        return w8a8_available()


def mlp_gelu(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
             b2: torch.Tensor | None) -> torch.Tensor:
    """y = GELU(x @ w1^T + b1) @ w2^T + b2 (GELU with erf) for decode-sized x, in one csrc call.

    x: [..., K]; w1: [H, K]; b1: [H] or None; w2: [N, H]; b2: [N] or None; all fp32 or all bf16 -> y: fp32 [..., N].
    w1 and w2 may both be PackedWeight (of x's dtype): then both GEMVs are the packed one; or both Int8Weight, or
    both W8A8Weight (x bf16): the int8 GEMV, or the W8A8 one (x and the hidden layer quantized as its call does).
    The hidden layer is rounded to x's dtype before and after the GELU, as ops.mlp_gelu's cpu path rounds it: y is
    then the chain ops.linear(F.gelu(ops.linear(x, w1, b1) in x's dtype), w2, b2) gives, up to the GELU's last bit.
    """
    _check_tensor(x, "x", _FP)
    dt = x.dtype
    packed = isinstance(w1, PackedWeight)
    _check(packed == isinstance(w2, PackedWeight), "w1 and w2 must both be PackedWeight or both tensors")
    _check(type(w1) is type(w2) or not (isinstance(w1, Int8Weight) or isinstance(w2, Int8Weight)),
           f"w1 and w2 must be held alike (int8 kinds too); got {type(w1).__name__} and {type(w2).__name__}")
    kind = w1.code if isinstance(w1, Int8Weight) else int(packed)  # csrc mlp_gelu's packed: 0, 1, 2 int8, 4 W8A8
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
                    0 if b2 is None else b2.data_ptr(), y.data_ptr(), _DTYPE_CODE[dt], M, K, H, N, kind)
    return y


def packed_copy_fits(nbytes: int) -> bool:
    """The rule for making packed copies beside the originals (DecodeStack's packed=None, and what makes the CLI
    pack in place instead): they may take at most half of the memory available now."""
    return nbytes <= available_memory() // 2


def meminfo_available(path: str = "/proc/meminfo") -> int:
    """MemAvailable from /proc/meminfo, in bytes (Linux; no psutil). RuntimeError where it cannot be read."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    _, value, unit = line.split()
                    if unit != "kB":
                        raise RuntimeError(f"unexpected unit {unit!r} in {path}: {line.strip()!r}")
                    return int(value) * 1024
    except OSError as e:
        raise RuntimeError(f"cannot read free memory from {path} ({e})") from e
    raise RuntimeError(f"no MemAvailable line in {path}")


def available_memory() -> int:
    """Bytes of memory available to allocate now: meminfo_available(), else the free physical pages."""
    try:
        return meminfo_available()
    except RuntimeError:
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
    if (nbytes < HUGE_PAGE or env_switch("JANUS_RT_HUGE_PAGES") == "0"
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


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
RETAIN_BYTES = 1 << 30  # freed blocks up to this size stay in the process for the next allocation


def retain_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed blocks of up to RETAIN_BYTES in the process (mmap threshold 1 GiB, trim
    threshold 2 GiB) instead of giving each back to the kernel when torch frees it. Why: a prefill, the SigLIP pass
    and the VQ decoder allocate and free tens of MB per op; by default every such block is a fresh mapping whose pages
    fault in again on first touch, which on a VM costs more than the op's own memory traffic (`janus-rt understand`
    at the 1B shapes, first token 2.8-3.7 -> 1.9-2.1 s; bench/RESULTS.md 2026-12-05). The cost: the process
    keeps its peak heap, and a block freed later stays resident: call it once the weights are in place (after
    loading and `pack_in_place`, whose freed originals would otherwise stay: +2.7 GB at 1B, more than a 24 GB machine
    has at 7B). Process-wide and permanent, so janus_rt's own commands call it (`janus-rt generate`, `understand`),
    not the library on import. False where it cannot (not glibc, mallopt refused) or with JANUS_RT_KEEP_FREED=0."""
    import ctypes

    mallopt = _glibc_malloc_function("mallopt", [ctypes.c_int, ctypes.c_int])
    if mallopt is None:
        return False
    # the trim threshold also turns off glibc's dynamic mmap threshold: set both, or every block > 128 KiB is mmapped
    return bool(mallopt(_M_MMAP_THRESHOLD, RETAIN_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def release_freed_memory() -> bool:
    """Hand the freed blocks that retain_freed_memory keeps back to the OS now (glibc's malloc_trim(0)), after a
    one-off burst of allocations that will not recur (a checkpoint read into memory and copied into the model).
    False where it cannot (not glibc) or with JANUS_RT_KEEP_FREED=0 (nothing kept then)."""
    import ctypes

    trim = _glibc_malloc_function("malloc_trim", [ctypes.c_size_t])
    if trim is None:
        return False
    trim(0)
    return True


def _glibc_malloc_function(name: str, argtypes):
    """glibc's malloc tuning function `name` (int-returning) for the two calls above, or None where they must not or
    cannot act: JANUS_RT_KEEP_FREED=0, not Linux, not glibc."""
    if env_switch("JANUS_RT_KEEP_FREED") == "0" or not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        fn = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):  # not glibc
        return None
    fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return fn
