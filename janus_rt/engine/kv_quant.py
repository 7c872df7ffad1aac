"""The int8 KV cache's numbers, in plain PyTorch: the reference for csrc/kv_int8.h and the int8 path of
csrc/paged_attention.h, and what a path without the extension stores and reads (ops.quantize_kv runs the csrc
quantizer on the cpu backend: the same bytes).

Each cached (token, head) row of D values x is held as D int8 values q and one fp32 scale s, x ~ q * s:
s = max|x| * fp32(1/127), q = round-half-even(x / s) (fp32 division) in [-127, 127]; a row of zeros has s = 0, q = 0.
x is the value the model-dtype cache would hold (K after RoPE, rounded to the model dtype; V rounded to it), so an
int8 cache stores the bf16 cache's rows at 8 bits each, with 4 bytes of scale per 128-value head (Janus-Pro), about
half the bytes a decode step reads from the cache. The error per value is at most s / 2 = max|x| / 254. A head
holding a NaN or an infinity is stored as scale NaN, q = 0, so the attention over it gives NaN as it would over the
float rows.
"""
from __future__ import annotations

import torch


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] (any float dtype) -> (q int8 [..., D], scale fp32 [...]), csrc/kv_int8.h's operations. A head with
    a NaN or an infinity gets scale NaN and q = 0: the attention over it gives NaN for that head (not hidden; a
    float cache's NaN does the same)."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1) * (1.0 / 127)
    bad = ~torch.isfinite(xf).all(dim=-1)
    scale = scale.masked_fill(bad, float("nan"))
    ok = (scale > 0)[..., None]  # (NaN > 0 is false)
    q = torch.where(ok, xf / torch.where(ok, scale[..., None], 1.0), torch.zeros((), dtype=torch.float32))
    return q.round().clamp_(-127, 127).to(torch.int8), scale


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(q int8 [..., D], scale fp32 [...]) -> fp32 [..., D] = q * scale."""
    return q.float() * scale[..., None]


def paged_decode_attention_int8_ref(q, k_cache, v_cache, k_scale, v_scale, block_tables, context_lens,
                                    sm_scale: float | None = None) -> torch.Tensor:
    """ops.paged_decode_attention over an int8 cache: q [B, H, D] (fp32 / bf16); k_cache, v_cache int8
    [num_blocks, block_size, Hkv, D] with k_scale, v_scale fp32 [num_blocks, block_size, Hkv] (H % Hkv == 0: query
    head h reads cache head h // (H / Hkv)); block_tables int32 [B, max_blocks]; context_lens int32 [B] -> [B, H, D]
    in q's dtype. Each row's pages dequantized to fp32, then softmax(q k^T * sm_scale) v in fp32."""
    batch, heads, head_dim = q.shape
    block_size, hkv = k_cache.shape[1], k_cache.shape[2]
    if heads % hkv:
        raise ValueError(f"q heads {heads} must be a multiple of the cache's {hkv}")
    scale = head_dim ** -0.5 if sm_scale is None else sm_scale
    o = torch.zeros_like(q)
    for b in range(batch):
        n = int(context_lens[b])
        if n == 0:
            continue
        pages = block_tables[b, :-(-n // block_size)].long()
        rows = lambda c, sc: dequantize_kv(c[pages], sc[pages]).reshape(-1, hkv, head_dim)[:n]  # [n, Hkv, D]
        k = rows(k_cache, k_scale).repeat_interleave(heads // hkv, dim=1)  # [n, H, D]
        v = rows(v_cache, v_scale).repeat_interleave(heads // hkv, dim=1)
        s = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale
        o[b] = torch.einsum("hn,nhd->hd", torch.softmax(s, dim=-1), v).to(q.dtype)
    return o
