"""The int8 KV cache's numbers, in plain PyTorch: the reference for csrc/kv_int8.h and the int8 path of
csrc/paged_attention.h, and what the prefill (and any path without the extension) stores and reads.

Each cached (token, head) row of D values x is held as D int8 values q and one fp32 scale s, x ~ q * s:
s = max|x| * fp32(1/127), q = round-half-even(x / s) (fp32 division) in [-127, 127]; a row of zeros has s = 0, q = 0.
x is the value the model-dtype cache would hold (K after RoPE, rounded to the model dtype; V rounded to it), so an
int8 cache stores the bf16 cache's rows at 8 bits each, with 4 bytes of scale per 128-value head (Janus-Pro), about
half the bytes a decode step reads from the cache. The error per value is at most s / 2 = max|x| / 254.
"""
from __future__ import annotations

import torch


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] (any float dtype, finite) -> (q int8 [..., D], scale fp32 [...]), csrc/kv_int8.h's operations."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1) * (1.0 / 127)
    q = torch.where(scale[..., None] > 0, xf / scale[..., None], torch.zeros((), dtype=torch.float32))
    return q.round().clamp_(-127, 127).to(torch.int8), scale


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(q int8 [..., D], scale fp32 [...]) -> fp32 [..., D] = q * scale."""
    return q.float() * scale[..., None]


def paged_decode_attention_int8_ref(q, k_cache, v_cache, k_scale, v_scale, block_tables, context_lens,
                                    sm_scale: float | None = None) -> torch.Tensor:
    """ops.paged_decode_attention over an int8 cache: q [B, H, D] (fp32 / bf16); k_cache, v_cache int8
    [num_blocks, block_size, H, D] with k_scale, v_scale fp32 [num_blocks, block_size, H]; block_tables int32
    [B, max_blocks]; context_lens int32 [B] -> [B, H, D] in q's dtype. Each row's pages dequantized to fp32, then
    softmax(q k^T * sm_scale) v in fp32 (kernels/paged_attention.py's reference on the dequantized values)."""
    batch, heads, head_dim = q.shape
    block_size = k_cache.shape[1]
    scale = head_dim ** -0.5 if sm_scale is None else sm_scale
    o = torch.zeros_like(q)
    for b in range(batch):
        n = int(context_lens[b])
        if n == 0:
            continue
        pages = block_tables[b, :-(-n // block_size)].long()
        k = dequantize_kv(k_cache[pages], k_scale[pages]).reshape(-1, heads, head_dim)[:n]  # [n, H, D]
        v = dequantize_kv(v_cache[pages], v_scale[pages]).reshape(-1, heads, head_dim)[:n]
        s = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale
        o[b] = torch.einsum("hn,nhd->hd", torch.softmax(s, dim=-1), v).to(q.dtype)
    return o
