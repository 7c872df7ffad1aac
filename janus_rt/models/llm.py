"""The DeepSeek-LLM language model (Llama architecture): RMSNorm, RoPE, MHA/GQA, SwiGLU.

q/k/v and gate/up are stored fused (`qkv_proj`, `gate_up_proj`): one GEMM each instead of three / two.
Attention over past tokens is delegated to a `kv` object (`kv.attend(layer, q, k, v) -> o`, q and k rotated) so the
same layers serve the plain causal forward (kv=None), a contiguous cache (below) and the engine's paged cache; a kv
object with `attend_rope(layer, q, k, v, positions, theta)` is handed q and k before RoPE instead (the engine's
decode step, which rotates them in its KV store).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from janus_rt import ops
from janus_rt.config import LLMConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x, residual=None):
        return ops.rms_norm(x, self.weight, self.eps, residual=residual)


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.theta = cfg.rope_theta
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, q_dim + 2 * kv_dim, bias=False)
        self.o_proj = nn.Linear(q_dim, cfg.hidden_size, bias=False)

    def forward(self, x, positions, kv=None):
        # x: [B, T, C]; positions: [B, T]
        b, t, _ = x.shape
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = ops.linear(x, self.qkv_proj.weight).split([q_dim, kv_dim, kv_dim], dim=-1)
        q = q.view(b, t, self.num_heads, self.head_dim)
        k = k.view(b, t, self.num_kv_heads, self.head_dim)
        v = v.view(b, t, self.num_kv_heads, self.head_dim)
        if hasattr(kv, "attend_rope"):  # a kv object that rotates q and k itself (a decode step's fused op)
            o = kv.attend_rope(self.layer_idx, q, k, v, positions, self.theta)
        else:
            q, k = ops.rope(q, k, positions, self.theta)
            if kv is None:
                o = ops.attention(q, *_expand_kv(k, v, self.num_heads), causal=True)
            else:
                o = kv.attend(self.layer_idx, q, k, v)
        return ops.linear(o.reshape(b, t, q_dim), self.o_proj.weight)


def _expand_kv(k, v, num_heads: int):
    """GQA: repeat K/V heads to the query head count (a no-op for Janus-Pro's MHA)."""
    rep = num_heads // k.shape[2]
    if rep == 1:
        return k, v
    return k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)


class MLP(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = ops.linear(x, self.gate_up_proj.weight).chunk(2, dim=-1)
        return ops.linear(ops.swiglu(gate, up), self.down_proj.weight)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, layer_idx: int):
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.attn = Attention(cfg, layer_idx)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, residual, positions, kv=None):
        # Pre-norm residual stream; the residual add is fused into the next norm (x, residual -> norm, sum).
        if residual is None:
            h, residual = self.input_norm(x), x
        else:
            h, residual = self.input_norm(x, residual)
        h = self.attn(h, positions, kv)
        h, residual = self.post_attn_norm(h, residual)
        return self.mlp(h), residual


class LLM(nn.Module):
    """Embeddings in, final-normed hidden states out; the heads live on the Janus model."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.gradient_checkpointing = False

    def forward(self, embeds, positions=None, kv=None):
        # embeds: [B, T, C]; positions: [B, T] (default 0..T-1) -> hidden: [B, T, C]
        b, t, _ = embeds.shape
        if positions is None:
            positions = torch.arange(t, device=embeds.device).expand(b, t)
        x, residual = embeds, None
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x, residual = torch.utils.checkpoint.checkpoint(layer, x, residual, positions, kv,
                                                                use_reentrant=False)
            else:
                x, residual = layer(x, residual, positions, kv)
        h, _ = self.norm(x, residual)
        return h


class ContiguousKVCache:
    """A simple [layers, B, max_len, H, D] cache: the reference the paged engine is checked against.

    Call `advance(t)` after each forward of t new tokens per row (all rows in step).
    """

    def __init__(self, cfg: LLMConfig, batch: int, max_len: int, dtype, device):
        shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_heads = cfg.num_heads
        self.length = 0

    def attend(self, layer: int, q, k, v):
        t = q.shape[1]
        end = self.length + t
        if end > self.k.shape[2]:
            raise RuntimeError(f"ContiguousKVCache overflow: {end} > {self.k.shape[2]}")
        self.k[layer, :, self.length:end] = k
        self.v[layer, :, self.length:end] = v
        ks, vs = _expand_kv(self.k[layer, :, :end], self.v[layer, :, :end], self.num_heads)
        return ops.attention(q, ks, vs, causal=True)

    def advance(self, t: int):
        self.length += t

