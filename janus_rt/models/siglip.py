"""SigLIP-L/16@384 understanding tower: patch conv + learned positions, pre-norm ViT blocks, final LayerNorm.

No CLS token, no attention pooling (the checkpoint's `attn_pool.*` never runs); the output is the final
LayerNorm applied after the last block (official select_layer = -1).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from janus_rt import ops
from janus_rt.config import SigLIPConfig


class VisionAttention(nn.Module):
    def __init__(self, cfg: SigLIPConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.width // cfg.num_heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x):
        # x: [B, N, C]
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).unbind(2)  # each [B, N, H, Dh]
        o = ops.attention(q, k, v, causal=False)
        return self.proj(o.reshape(b, n, c))


class VisionMLP(nn.Module):
    def __init__(self, cfg: SigLIPConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x):
        return ops.mlp_gelu(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)


class VisionBlock(nn.Module):
    def __init__(self, cfg: SigLIPConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.attn = VisionAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SigLIP(nn.Module):
    def __init__(self, cfg: SigLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(cfg.num_channels, cfg.width, cfg.patch_size, stride=cfg.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(cfg.num_patches, cfg.width))
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)

    def forward(self, pixels):
        # pixels: [B, 3, S, S] in [-1, 1] -> features: [B, N, C], N = (S / patch)^2
        if pixels.shape[-2:] != (self.cfg.image_size, self.cfg.image_size):
            raise ValueError(f"SigLIP expects {self.cfg.image_size}x{self.cfg.image_size} pixels, "
                             f"got {tuple(pixels.shape)}")
        x = self.patch_embed(pixels.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        x = x + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)
