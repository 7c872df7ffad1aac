"""VQ-16 image tokenizer (LlamaGen style): conv encoder, L2-normalised codebook, conv decoder.

Module names follow the official checkpoint (conv_blocks.I.res.J, mid.0/1/2, ...), so that layout loads as is.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from janus_rt import ops
from janus_rt.config import VQConfig


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, 1x1-conv projections, scale C^-0.5."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        b, c, hh, ww = x.shape
        h = self.norm(x)
        # [B, C, H, W] -> [B, HW, 1, C]: one head of width C
        q, k, v = (m(h).flatten(2).transpose(1, 2).unsqueeze(2) for m in (self.q, self.k, self.v))
        o = ops.attention(q, k, v, causal=False)
        o = o.squeeze(2).transpose(1, 2).reshape(b, c, hh, ww)
        return x + self.proj_out(o)


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad, then 3x3 stride 2


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        n = len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        c_in = cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            level, c_out = nn.Module(), cfg.ch * mult
            level.res = nn.ModuleList()
            level.attn = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.res.append(ResBlock(c_in, c_out))
                c_in = c_out
                if i == n - 1:  # attention only at the lowest resolution
                    level.attn.append(AttnBlock(c_in))
            if i != n - 1:
                level.downsample = Downsample(c_in)
            self.conv_blocks.append(level)
        self.mid = nn.ModuleList([ResBlock(c_in, c_in), AttnBlock(c_in), ResBlock(c_in, c_in)])
        self.norm_out = _norm(c_in)
        self.conv_out = nn.Conv2d(c_in, cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.conv_blocks:
            for j, res in enumerate(level.res):
                h = res(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for m in self.mid:
            h = m(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        n = len(cfg.ch_mult)
        c_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c_in, 3, padding=1)
        self.mid = nn.ModuleList([ResBlock(c_in, c_in), AttnBlock(c_in), ResBlock(c_in, c_in)])
        self.conv_blocks = nn.ModuleList()
        for i in range(n):  # lowest resolution first
            level, c_out = nn.Module(), cfg.ch * cfg.ch_mult[n - 1 - i]
            level.res = nn.ModuleList()
            level.attn = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.res.append(ResBlock(c_in, c_out))
                c_in = c_out
                if i == 0:
                    level.attn.append(AttnBlock(c_in))
            if i != n - 1:
                level.upsample = Upsample(c_in)
            self.conv_blocks.append(level)
        self.norm_out = _norm(c_in)
        self.conv_out = nn.Conv2d(c_in, cfg.out_channels, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        for m in self.mid:
            h = m(h)
        for level in self.conv_blocks:
            for j, res in enumerate(level.res):
                h = res(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VQModel(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_dim, cfg.z_channels, 1)
        self.codebook = nn.Parameter(torch.zeros(cfg.codebook_size, cfg.codebook_dim))

    def encode(self, pixels):
        """pixels: [B, 3, S, S] in [-1, 1] -> tokens: int64 [B, (S/16)^2], the official L2-normalised rule:
        nearest normalised code to the normalised latent (= largest cosine similarity)."""
        z = self.quant_conv(self.encoder(pixels.to(self.quant_conv.weight.dtype)))  # [B, D, h, w]
        b = z.shape[0]
        z = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, self.cfg.codebook_dim).float(), dim=-1)
        codebook = F.normalize(self.codebook.float(), dim=-1)
        return nearest_code(z, codebook).view(b, -1)

    def decode(self, tokens):
        """tokens: int64 [B, N] (N = grid^2) -> pixels [B, 3, S, S], roughly in [-1, 1]."""
        b, n = tokens.shape
        g = self.cfg.grid
        if n != g * g:
            raise ValueError(f"expected {g * g} image tokens per image ({g}x{g}), got {n}")
        if tokens.min() < 0 or tokens.max() >= self.cfg.codebook_size:
            raise ValueError(f"image token ids must lie in [0, {self.cfg.codebook_size})")
        q = F.normalize(self.codebook[tokens], dim=-1)  # [B, N, D]
        q = q.view(b, g, g, -1).permute(0, 3, 1, 2)  # [B, D, g, g]
        return self.decoder(self.post_quant_conv(q))


def nearest_code(z, codebook):
    """argmin_j ||z_i - c_j||^2 without an N x K matrix where a fused kernel is available.

    z: fp32 [N, D]; codebook: fp32 [K, D] -> int64 [N]. CPU: the csrc OpenMP kernel; CUDA: the Triton kernel;
    otherwise a chunked torch search.
    """
    backend = ops.get_backend()
    if z.is_cuda and backend == "triton":
        from janus_rt import kernels

        return kernels.vq_nearest(z, codebook)
    if not z.is_cuda:
        from janus_rt import cpu_ops

        if cpu_ops.available():
            return cpu_ops.vq_nearest(z.contiguous(), codebook.contiguous())
    return nearest_code_torch(z, codebook)


def nearest_code_torch(z, codebook, chunk: int = 4096):
    c2 = codebook.pow(2).sum(-1)  # [K]
    out = []
    for zc in z.split(chunk):
        d = zc.pow(2).sum(-1, keepdim=True) + c2 - 2 * zc @ codebook.t()
        out.append(d.argmin(-1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=z.device)
