"""Fused classifier-free-guidance sampling: one program per row, logits -> one int64 token.

Semantics (shared bit for bit with the C++ CPU kernel; every implementation must follow this):

Inputs per row b (scalars broadcast to all rows): cond[b], uncond[b] (V logits, any float dtype, read as fp32),
w = cfg_weight (fp32), t = temperature (fp32, > 0 where sampling), k = top_k (int, 0 = off), p = top_p (fp32,
>= 1 = off), seed (int64; only the low 32 bits are used), greedy (bool).

1. x_j = c_j                                    if uncond is None
   x_j = u_j + w * (c_j - u_j)                  otherwise; fp32, each of -, *, + rounded separately (no FMA)
2. greedy rows: token = argmax_j x_j; ties -> smallest j. Nothing below applies.
3. l_j = x_j / t                                fp32 IEEE division (correctly rounded)
4. top-k (when 0 < k < V): keep j iff l_j >= the k-th largest l (ties kept, so more than k may survive).
5. top-p (when p < 1), on the tokens kept by 4: m = max kept l; e_j = exp(l_j - m) for kept j (0 otherwise);
   Z = sum_j e_j; keep j iff l_j >= t_p where t_p is the largest value with S(t_p) = sum_{l_j >= t_p} e_j
   satisfying S(t_p) >= p * Z and S(t_p) > 0 (so p <= 0 keeps the top value). Sums are fp32 in an unspecified
   order: tokens whose cumulative mass lies within rounding of p may differ between implementations.
6. Gumbel-max over the kept tokens: token = argmax_j (l_j + g_j) over kept j, ties -> smallest j, where with
   uint32 wrap-around arithmetic
       h(x):  x ^= x >> 16; x *= 0x21f0aaad; x ^= x >> 15; x *= 0x735a2d97; x ^= x >> 15
       bits_j = h(h(seed mod 2^32) ^ j)
       u_j = min(fp32(fp32(bits_j >> 8) + 0.5f) * 2^-24, 1 - 2^-24)      (fp32 round-to-nearest-even)
       g_j = -log(-log(u_j))                                              (fp32)
   The clamp matters: bits >> 8 = 2^24 - 1 rounds to u = 1.0 in fp32, which would give g = +inf.
   log is not correctly rounded everywhere, so l + g ties within an ulp may resolve differently across
   implementations; the hash, u and the kept set are exact.

Thresholds in 4 and 5 are found by 32-step bisection over an order-preserving uint32 key of l (exact, no sort).
A row's token depends only on that row's inputs and seed.
"""
import torch
import triton
import triton.language as tl

from .utils import check, check_tensor, next_pow2

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_MAX_SINGLE_BLOCK = 16384  # rows up to this many logits stay in registers for the whole kernel
_LOOP_BLOCK = 4096  # block size of the multi-pass kernel for longer rows (text vocab 102400)
_TWO_M24 = tl.constexpr(2.0**-24)
_U_MAX = tl.constexpr(1.0 - 2.0**-24)


@triton.jit
def _hash_u32(x):
    # x: uint32, wraps mod 2^32
    x = x ^ (x >> 16)
    x = x * 0x21F0AAAD
    x = x ^ (x >> 15)
    x = x * 0x735A2D97
    x = x ^ (x >> 15)
    return x


@triton.jit
def _gumbel(seed_hash, idx):
    # seed_hash: uint32 scalar, idx: int32 [BLOCK] -> fp32 [BLOCK] Gumbel(0, 1) noise
    bits = _hash_u32(seed_hash ^ idx.to(tl.uint32))
    u = tl.minimum(((bits >> 8).to(tl.float32) + 0.5) * _TWO_M24, _U_MAX)
    return -tl.log(-tl.log(u))


@triton.jit
def _order_key(x):
    # fp32 -> uint32 with a < b <=> key(a) < key(b) for non-NaN values; -0.0 and +0.0 share a key
    bits = x.to(tl.uint32, bitcast=True)
    # (bits ^ 0xFFFFFFFF, not ~bits: Triton 3.8's interpreter lowers ~ on uint32 to an xor with -1 and fails)
    key = tl.where((bits >> 31) == 1, bits ^ 0xFFFFFFFF, bits | 0x80000000)
    return tl.where(x == 0.0, 0x80000000, key)


@triton.jit
def _mixed_logits(cond_ptr, uncond_ptr, offs, mask, w, HAS_UNCOND: tl.constexpr):
    # cond_ptr/uncond_ptr: row starts; -> fp32 [BLOCK], -inf off the row
    c = tl.load(cond_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_UNCOND:
        u = tl.load(uncond_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        c = u + w * (c - u)
    return tl.where(mask, c, float("-inf"))


@triton.jit
def _bit(i):
    # uint32 scalar with bit (31 - i) set: the candidate bit of bisection step i
    return tl.full((), 1, tl.uint32) << (31 - i)


@triton.jit
def _cfg_sample_fwd_kernel(cond_ptr, uncond_ptr, w_ptr, temp_ptr, top_k_ptr, top_p_ptr, seed_ptr, greedy_ptr,
                           out_ptr, V, stride_c, stride_u, HAS_UNCOND: tl.constexpr, BLOCK_V: tl.constexpr):
    # The whole row lives in registers: one read of the logits, every bisection step reduces over registers.
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_V)
    mask = offs < V
    x = _mixed_logits(cond_ptr + row.to(tl.int64) * stride_c, uncond_ptr + row.to(tl.int64) * stride_u,
                      offs, mask, tl.load(w_ptr + row), HAS_UNCOND)  # [BLOCK_V]
    if tl.load(greedy_ptr + row) != 0:
        token = tl.argmax(x, axis=0)
    else:
        l = tl.math.div_rn(x, tl.load(temp_ptr + row))
        key = _order_key(l)
        thr_k = tl.full((), 0, tl.uint32)
        k = tl.load(top_k_ptr + row)
        if (k > 0) & (k < V):
            # largest key T with #{key >= T} >= k, i.e. the key of the k-th largest l
            for i in range(32):
                cand = thr_k | _bit(i)
                count = tl.sum((mask & (key >= cand)).to(tl.int32), axis=0)
                thr_k = tl.where(count >= k, cand, thr_k)
        keep = mask & (key >= thr_k)
        thr_p = tl.full((), 0, tl.uint32)
        p = tl.load(top_p_ptr + row)
        if p < 1.0:
            m = tl.max(tl.where(keep, l, float("-inf")), axis=0)
            e = tl.where(keep, tl.exp(l - m), 0.0)
            target = p * tl.sum(e, axis=0)
            for i in range(32):
                cand = thr_p | _bit(i)
                mass = tl.sum(tl.where(key >= cand, e, 0.0), axis=0)
                thr_p = tl.where((mass >= target) & (mass > 0.0), cand, thr_p)
        keep = keep & (key >= thr_p)
        g = _gumbel(_hash_u32(tl.load(seed_ptr + row).to(tl.uint32)), offs)
        token = tl.argmax(tl.where(keep, l + g, float("-inf")), axis=0)
    tl.store(out_ptr + row, token.to(tl.int64))


@triton.jit
def _cfg_sample_loop_kernel(cond_ptr, uncond_ptr, w_ptr, temp_ptr, top_k_ptr, top_p_ptr, seed_ptr, greedy_ptr,
                            out_ptr, V, stride_c, stride_u, HAS_UNCOND: tl.constexpr, BLOCK_V: tl.constexpr):
    # Rows longer than the register budget: every pass re-reads the row in BLOCK_V pieces (from L2).
    row = tl.program_id(0)
    cond_row = cond_ptr + row.to(tl.int64) * stride_c
    uncond_row = uncond_ptr + row.to(tl.int64) * stride_u
    w = tl.load(w_ptr + row)
    t = tl.load(temp_ptr + row)
    offs = tl.arange(0, BLOCK_V)
    best = tl.full((), float("-inf"), tl.float32)
    token = tl.full((), 0, tl.int32)
    if tl.load(greedy_ptr + row) != 0:
        for start in range(0, V, BLOCK_V):
            x = _mixed_logits(cond_row, uncond_row, start + offs, start + offs < V, w, HAS_UNCOND)
            blk_max, blk_idx = tl.max(x, axis=0, return_indices=True)
            better = blk_max > best  # strict: an earlier block wins ties
            best = tl.where(better, blk_max, best)
            token = tl.where(better, start + blk_idx, token)
    else:
        thr_k = tl.full((), 0, tl.uint32)
        k = tl.load(top_k_ptr + row)
        if (k > 0) & (k < V):
            for i in range(32):
                cand = thr_k | _bit(i)
                count = tl.zeros((), tl.int32)
                for start in range(0, V, BLOCK_V):
                    mask = start + offs < V
                    x = _mixed_logits(cond_row, uncond_row, start + offs, mask, w, HAS_UNCOND)
                    key = _order_key(tl.math.div_rn(x, t))
                    count += tl.sum((mask & (key >= cand)).to(tl.int32), axis=0)
                thr_k = tl.where(count >= k, cand, thr_k)
        thr_p = tl.full((), 0, tl.uint32)
        p = tl.load(top_p_ptr + row)
        if p < 1.0:
            m = tl.full((), float("-inf"), tl.float32)
            for start in range(0, V, BLOCK_V):
                mask = start + offs < V
                l = tl.math.div_rn(_mixed_logits(cond_row, uncond_row, start + offs, mask, w, HAS_UNCOND), t)
                keep = mask & (_order_key(l) >= thr_k)
                m = tl.maximum(m, tl.max(tl.where(keep, l, float("-inf")), axis=0))
            total = tl.zeros((), tl.float32)
            for start in range(0, V, BLOCK_V):
                mask = start + offs < V
                l = tl.math.div_rn(_mixed_logits(cond_row, uncond_row, start + offs, mask, w, HAS_UNCOND), t)
                keep = mask & (_order_key(l) >= thr_k)
                total += tl.sum(tl.where(keep, tl.exp(l - m), 0.0), axis=0)
            target = p * total
            for i in range(32):
                cand = thr_p | _bit(i)
                mass = tl.zeros((), tl.float32)
                for start in range(0, V, BLOCK_V):
                    mask = start + offs < V
                    l = tl.math.div_rn(_mixed_logits(cond_row, uncond_row, start + offs, mask, w, HAS_UNCOND), t)
                    key = _order_key(l)
                    mass += tl.sum(tl.where(mask & (key >= thr_k) & (key >= cand), tl.exp(l - m), 0.0), axis=0)
                thr_p = tl.where((mass >= target) & (mass > 0.0), cand, thr_p)
        seed_hash = _hash_u32(tl.load(seed_ptr + row).to(tl.uint32))
        for start in range(0, V, BLOCK_V):
            mask = start + offs < V
            l = tl.math.div_rn(_mixed_logits(cond_row, uncond_row, start + offs, mask, w, HAS_UNCOND), t)
            key = _order_key(l)
            keep = mask & (key >= thr_k) & (key >= thr_p)
            score = tl.where(keep, l + _gumbel(seed_hash, start + offs), float("-inf"))
            blk_max, blk_idx = tl.max(score, axis=0, return_indices=True)
            better = blk_max > best
            best = tl.where(better, blk_max, best)
            token = tl.where(better, start + blk_idx, token)
    tl.store(out_ptr + row, token.to(tl.int64))


def _per_row(x, B: int, dtype: torch.dtype, device, name: str, keep=()) -> torch.Tensor:
    """A Python scalar or a tensor of 1 or B elements -> contiguous [B] tensor of `dtype` (or of a dtype in
    `keep`, which the kernel reads as is: a [B] tensor passed by the caller then costs no extra launch)."""
    if isinstance(x, torch.Tensor):
        check(x.dim() <= 1 and x.numel() in (1, B),
              f"{name} must be a scalar or have shape [{B}], got {tuple(x.shape)}")
        check(x.device == torch.device(device), f"{name} is on {x.device}; expected {device}")
        return x.reshape(-1).to(x.dtype if x.dtype in keep else dtype).expand(B).contiguous()
    if dtype == torch.int64:
        x = int(x) & 0xFFFFFFFF  # seeds: only the low 32 bits matter
    return torch.full((B,), x, dtype=dtype, device=device)


def _prepare(cond, uncond, cfg_weight, temperature, top_k, top_p, seeds, greedy):
    check_tensor(cond, "cond", ndim=2, dtypes=_FLOATS)
    B, V = cond.shape
    check(V > 0, "cond has no logits (V == 0)")
    if uncond is not None:
        check_tensor(uncond, "uncond", ndim=2, dtypes=_FLOATS, device=cond.device)
        check(uncond.shape == cond.shape, f"uncond shape {tuple(uncond.shape)} != cond shape {tuple(cond.shape)}")
    if not isinstance(temperature, torch.Tensor) and not (isinstance(greedy, bool) and greedy):
        check(temperature > 0, f"temperature must be > 0 for sampled rows, got {temperature}")
    dev = cond.device
    return (_per_row(cfg_weight, B, torch.float32, dev, "cfg_weight"),
            _per_row(temperature, B, torch.float32, dev, "temperature"),
            _per_row(top_k, B, torch.int32, dev, "top_k", keep=(torch.int64,)),
            _per_row(top_p, B, torch.float32, dev, "top_p"),
            _per_row(seeds, B, torch.int64, dev, "seeds"),
            _per_row(greedy, B, torch.int32, dev, "greedy", keep=(torch.bool, torch.uint8)))


def cfg_sample(cond: torch.Tensor, uncond: torch.Tensor | None = None, cfg_weight=1.0, temperature=1.0, top_k=0,
               top_p=1.0, seeds=0, greedy=False, *, block_v: int | None = None) -> torch.Tensor:
    """CFG mix + temperature + top-k + top-p + seeded Gumbel-max sample (module docstring): -> int64 tokens [B].

    cond, uncond: [B, V] logits (uncond None = no guidance; rows may be strided views, e.g. logits[0::2]).
    cfg_weight, temperature, top_p: float or fp32 [B]; top_k: int or int [B]; seeds: int or int64 [B];
    greedy: bool or bool [B]. block_v forces the multi-pass kernel with that block size (tests).
    """
    params = _prepare(cond, uncond, cfg_weight, temperature, top_k, top_p, seeds, greedy)
    check(cond.stride(1) == 1 and (uncond is None or uncond.stride(1) == 1), "logit rows must be contiguous")
    B, V = cond.shape
    out = torch.empty(B, dtype=torch.int64, device=cond.device)
    if B == 0:
        return out
    u = cond if uncond is None else uncond
    args = (cond, u, *params, out, V, cond.stride(0), u.stride(0))
    if block_v is None and next_pow2(V) <= _MAX_SINGLE_BLOCK:
        BLOCK_V = next_pow2(V)
        _cfg_sample_fwd_kernel[(B,)](*args, HAS_UNCOND=uncond is not None, BLOCK_V=BLOCK_V,
                                     num_warps=min(16, max(4, BLOCK_V // 1024)), enable_fp_fusion=False)
    else:
        BLOCK_V = next_pow2(block_v) if block_v is not None else _LOOP_BLOCK
        _cfg_sample_loop_kernel[(B,)](*args, HAS_UNCOND=uncond is not None, BLOCK_V=BLOCK_V,
                                      num_warps=min(8, max(4, BLOCK_V // 512)), enable_fp_fusion=False)
    return out


def _hash_u32_ref(x: torch.Tensor) -> torch.Tensor:
    """The h() of the module docstring on int64 tensors holding uint32 values (products stay below 2^63)."""
    m = 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & m
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & m
    return x ^ (x >> 15)


def gumbel_ref(seed, V: int, device="cpu") -> torch.Tensor:
    """Gumbel noise g_j of the module docstring: seed int -> fp32 [V]; seed int64 tensor [B] -> fp32 [B, V]."""
    s = torch.as_tensor(seed, dtype=torch.int64, device=device) & 0xFFFFFFFF
    bits = _hash_u32_ref(_hash_u32_ref(s)[..., None] ^ torch.arange(V, device=s.device))  # [..., V]
    u = (((bits >> 8).float() + 0.5) * 2.0**-24).clamp(max=1.0 - 2.0**-24)
    return -torch.log(-torch.log(u))


def cfg_sample_ref(cond, uncond=None, cfg_weight=1.0, temperature=1.0, top_k=0, top_p=1.0, seeds=0,
                   greedy=False) -> torch.Tensor:
    """Reference of cfg_sample with explicit sorts: top-k value and top-p cutoff read off sorted rows -> [B]."""
    w, t, k, p, seeds, greedy = _prepare(cond, uncond, cfg_weight, temperature, top_k, top_p, seeds, greedy)
    B, V = cond.shape
    x = cond.float()
    if uncond is not None:
        u = uncond.float()
        x = u + w[:, None] * (x - u)  # [B, V]
    l = x / t[:, None]
    l_sorted, order = l.sort(dim=1, descending=True, stable=True)  # [B, V]
    kth = l_sorted.gather(1, (k.clamp(1, V) - 1).long()[:, None])  # [B, 1]
    keep = ~((k > 0) & (k < V))[:, None] | (l >= kth)
    m = torch.where(keep, l, float("-inf")).amax(dim=1, keepdim=True)
    e = torch.where(keep, torch.exp(l - m), 0.0).double()  # [B, V]
    cum = e.gather(1, order).cumsum(dim=1)  # mass of the i+1 largest values
    reached = (cum >= p.double()[:, None] * e.sum(dim=1, keepdim=True)) & (cum > 0)
    first = reached.int().argmax(dim=1, keepdim=True)  # smallest prefix holding mass >= p
    keep &= ~(p < 1.0)[:, None] | (l >= l_sorted.gather(1, first))
    score = torch.where(keep, l + gumbel_ref(seeds, V, device=cond.device), float("-inf"))
    return torch.where(greedy != 0, x.argmax(dim=1), score.argmax(dim=1))
