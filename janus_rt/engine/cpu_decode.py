"""The CPU decode step: one csrc call per decoder layer (csrc/decode_layer.cpp).

On the cpu backend the layer-by-layer path runs ~15 small torch ops and five csrc calls per layer, each its own
interpreter round trip and OpenMP fork/join; on a 2-core CPU that overhead was as large as the weight reads of
the small model's step. `decode_layer` does norm, QKV, RoPE, KV store, paged attention, output projection and
the SwiGLU MLP for all rows in one parallel region, with the torch path's rounding points, so the two paths give
the same hidden states up to summation order (tests/test_cpu_decode.py).
"""
from __future__ import annotations

import torch

from janus_rt import cpu_ops, ops


def supported(model, cache) -> bool:
    """fp32 or bf16 MHA model on the CPU, cache in the model's dtype, extension built."""
    c = model.cfg.llm
    return (cpu_ops.available() and model.device.type == "cpu" and model.dtype in (torch.float32, torch.bfloat16)
            and cache.dtype == model.dtype and c.num_kv_heads == c.num_heads)


@torch.inference_mode()
def decode(model, cache, embeds, positions, slot_mapping, block_tables, context_lens):
    """embeds [R, C]; positions, slot_mapping int64 [R]; block_tables int32 [R, max_blocks]; context_lens int32 [R]
    -> final-normed hidden states [R, C] (the LLM forward for one new token per row over the paged cache)."""
    llm, c = model.llm, model.cfg.llm
    h = embeds.to(model.dtype).contiguous().clone()  # the residual stream, updated in place layer by layer
    cos, sin = (t.float().contiguous() for t in ops.rope_tables(positions, c.head_dim, c.rope_theta, model.dtype))
    for i, layer in enumerate(llm.layers):
        with ops._scope("janus_rt::cpu_decode_layer"):
            cpu_ops.decode_layer(
                h, layer.input_norm.weight, layer.attn.qkv_proj.weight, layer.attn.o_proj.weight,
                layer.post_attn_norm.weight, layer.mlp.gate_up_proj.weight, layer.mlp.down_proj.weight,
                cache.k_cache(i), cache.v_cache(i), slot_mapping, block_tables, context_lens, cos, sin,
                layer.input_norm.eps)
    return ops.rms_norm_torch(h, llm.norm.weight, llm.norm.eps)
