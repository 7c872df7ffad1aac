"""Pre-training of the VQ image tokenizer (LlamaGen style) on the synthetic shapes, before the Janus stages.

The tokenizer is trained on its own and then frozen: Janus stages 1-3 only ever see its tokens. Loss per batch:

    recon  = |x - x_hat|_1 + |x - x_hat|_2^2            pixels in [-1, 1]
    vq     = |q - sg(z)|^2                              moves the codes towards the latents
    commit = beta * |z - sg(q)|^2                       keeps the encoder near its codes
    z = normalize(quant_conv(encoder(x))), q = normalize(codebook)[nearest(z)], x_hat = decoder(z + sg(q - z))

exactly the official L2-normalised rule that `VQModel.encode` / `decode` use, so a trained model round-trips
through encode/decode with the same numbers. Codes unused for `restart_every` steps are re-seeded from
latents of the current batch (dead-code restart), and the codebook starts from data latents.

    python -m janus_rt.train.vq_pretrain --out DIR --steps N
writes a tiny Janus checkpoint (janus_rt layout + tokenizer.json) whose VQ is trained and all else random.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from janus_rt.models.vq import VQModel
from janus_rt.train.data import load_gen_image, read_manifest
from janus_rt.train.synthetic import caption_color_match, caption_colors, caption_shape, classify_shape, make_synthetic


# ---- data -------------------------------------------------------------------------------------------------
def load_images(data_dir, image_size: int) -> tuple[torch.Tensor, list[str]]:
    """The t2i images of a manifest folder -> (pixels float [N, 3, S, S] in [-1, 1], captions [N]), loaded
    exactly as the Janus data pipeline loads generation images (centre crop, bicubic resize)."""
    path = Path(data_dir)
    manifest = path / "manifest.jsonl" if path.is_dir() else path
    records, _ = read_manifest(manifest)
    recs = [r for r in records if r.kind == "t2i"]
    if not recs:
        raise ValueError(f"{manifest}: no t2i records (images with captions)")
    pixels = torch.stack([load_gen_image(r.images[0], image_size) for r in recs])
    return pixels, [r.caption for r in recs]


def synthetic_images(n: int, image_size: int, seed: int, source_size: int | None = None):
    """n fresh synthetic images rendered at source_size (default: image_size), loaded at image_size:
    (pixels [n, 3, S, S], captions [n])."""
    with tempfile.TemporaryDirectory() as d:
        make_synthetic(d, n=n, image_size=source_size or image_size, seed=seed)
        return load_images(d, image_size)


# ---- the quantiser's forward for training -------------------------------------------------------------------
def quantize(vq: VQModel, z):
    """z: [B, D, h, w] raw latents -> (z_n [B*h*w, D] normalised latents, q_st [B, D, h, w] straight-through
    codes, idx int64 [B*h*w], vq loss, commitment loss without beta)."""
    b, d, h, w = z.shape
    z_n = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, d), dim=-1)  # [BN, D]
    codebook = F.normalize(vq.codebook, dim=-1)  # [K, D]
    with torch.no_grad():
        idx = (z_n @ codebook.t()).argmax(-1)  # unit vectors: nearest = largest dot product
    q = codebook[idx]
    vq_loss = F.mse_loss(q, z_n.detach())
    commit = F.mse_loss(z_n, q.detach())
    q_st = (z_n + (q - z_n).detach()).view(b, h, w, d).permute(0, 3, 1, 2)
    return z_n, q_st, idx, vq_loss, commit


def vq_forward(vq: VQModel, x):
    """x: [B, 3, S, S] -> (x_hat [B, 3, S, S], z_n [B*N, D], idx [B*N], vq loss, commitment loss)."""
    z = vq.quant_conv(vq.encoder(x))
    z_n, q_st, idx, vq_loss, commit = quantize(vq, z)
    return vq.decoder(vq.post_quant_conv(q_st)), z_n, idx, vq_loss, commit


@torch.no_grad()
def reconstruct(vq: VQModel, pixels, batch_size: int = 64):
    """decode(encode(pixels)) through the model's public (inference) path: [N, 3, S, S] -> [N, 3, S, S]."""
    return torch.cat([vq.decode(vq.encode(x)) for x in pixels.split(batch_size)])


@torch.no_grad()
def recon_scores(vq: VQModel, pixels, captions, shape: bool = False) -> dict[str, float]:
    """The round-tripped images' mean caption_color_match against their captions ("color_match") and, with shape,
    the fraction in which classify_shape finds their caption's shape in its colour ("shape_match"); one round trip."""
    from janus_rt.processing import to_pil

    imgs = to_pil(reconstruct(vq, pixels))
    out = {"color_match": float(np.mean([caption_color_match(im, c) for im, c in zip(imgs, captions)]))}
    if shape:
        out["shape_match"] = float(np.mean([classify_shape(im, caption_colors(c)[0]) == caption_shape(c)
                                            for im, c in zip(imgs, captions)]))
    return out


def recon_color_match(vq: VQModel, pixels, captions) -> float:
    """Mean caption_color_match of the round-tripped images against their captions."""
    return recon_scores(vq, pixels, captions)["color_match"]


# ---- training ---------------------------------------------------------------------------------------------
def _as_vq(model_or_vq) -> VQModel:
    return model_or_vq if isinstance(model_or_vq, VQModel) else model_or_vq.vq


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))  # cosine to lr / 10


@torch.no_grad()
def _restart_codes(vq: VQModel, opt, dead, z_n) -> None:
    """Re-seed the dead codes [n_dead] at the latents z_n [M, D] the codebook serves worst (lowest cosine to
    their nearest code), and clear their optimizer moments so the old statistics do not drag them back."""
    worst = (z_n @ F.normalize(vq.codebook, dim=-1).t()).max(-1).values.argsort()  # [M], worst first
    pick = worst[torch.arange(len(dead), device=worst.device) % len(worst)]
    vq.codebook[dead] = z_n[pick] * vq.codebook.norm(dim=-1).mean()
    for state in opt.state.get(vq.codebook, {}).values():
        if torch.is_tensor(state) and state.shape == vq.codebook.shape:
            state[dead] = 0


def _unfrozen(fn):
    """fn(model_or_vq, ...) with the VQ's parameters trainable during the call (loaded models come frozen) and their
    requires_grad flags given back after."""

    @functools.wraps(fn)
    def run(model_or_vq, *args, **kwargs):
        vq = _as_vq(model_or_vq)
        flags = [p.requires_grad for p in vq.parameters()]
        vq.requires_grad_(True)
        try:
            return fn(model_or_vq, *args, **kwargs)
        finally:
            for p, f in zip(vq.parameters(), flags):
                p.requires_grad_(f)

    return run


@_unfrozen
def pretrain_vq(model_or_vq, data, steps: int = 800, batch_size: int = 16, lr: float = 2e-3, seed: int = 0,
                log_every: int = 100, beta: float = 0.25, restart_every: int = 50, weight_decay: float = 0.01,
                grad_clip: float = 1.0, eval_data=None, eval_every: int = 0, log=print) -> dict:
    """Train a VQModel (or a Janus's `.vq`) in place on synthetic images; returns metrics.

    data: a manifest folder / file (t2i images) or pixels float [N, 3, S, S] in [-1, 1] at the VQ's image size.
    eval_data: optional held-out (pixels [M, 3, S, S], captions [M]); adds the colour match of the round trip.
    Metrics: recon_loss_{init,final} (L1 + L2 on a fixed batch through encode/decode), loss (per logged step),
    codes_used (distinct codes over that batch), restarts (codes re-seeded), seconds, color_match_{recon,orig}.
    """
    vq = _as_vq(model_or_vq)
    s = vq.cfg.image_size
    pixels = load_images(data, s)[0] if isinstance(data, (str, Path)) else data
    if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, s, s):
        raise ValueError(f"expected images [N, 3, {s}, {s}], got {tuple(pixels.shape)}")
    dev, dtype = vq.codebook.device, vq.codebook.dtype
    # channels_last: ~2x faster convolutions (and their backward) on CPU at these small channel counts
    vq.to(memory_format=torch.channels_last)
    pixels = pixels.to(dev, dtype).contiguous(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(seed)
    fixed = pixels[torch.randperm(len(pixels), generator=g)[: min(256, len(pixels))]]

    def recon_loss() -> tuple[float, int]:
        vq.eval()
        with torch.no_grad():
            x_hat = reconstruct(vq, fixed)
            codes = torch.cat([vq.encode(x) for x in fixed.split(64)])
        return float(F.l1_loss(x_hat, fixed) + F.mse_loss(x_hat, fixed)), int(codes.unique().numel())

    metrics = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed}
    metrics["recon_loss_init"], metrics["codes_used_init"] = recon_loss()

    k = vq.cfg.codebook_size
    with torch.no_grad():  # start the codebook on data latents: k random draws (+ jitter) from a few batches
        vq.train()
        x0 = pixels[torch.randint(len(pixels), (min(len(pixels), 4 * batch_size),), generator=g)]
        lat = quantize(vq, vq.quant_conv(vq.encoder(x0)))[0]  # [M, D] normalised latents
        pick = torch.randint(len(lat), (k,), generator=g)
        jitter = 0.01 * torch.randn(k, lat.shape[1], generator=g)
        vq.codebook.copy_(lat[pick] + jitter.to(dev, dtype))

    decay = [p for n, p in vq.named_parameters() if p.dim() >= 2 and n != "codebook"]
    no_decay = [p for n, p in vq.named_parameters() if p.dim() < 2 or n == "codebook"]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    usage = torch.zeros(k, dtype=torch.long, device=dev)  # hits since the last restart check
    history, restarts, t0 = [], 0, time.perf_counter()
    vq.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup=min(50, steps // 10 + 1))
        x = pixels[torch.randint(len(pixels), (batch_size,), generator=g)]
        if torch.rand((), generator=g) < 0.5:  # a mirrored synthetic image is as valid as the original
            x = x.flip(-1)
        x = x.contiguous(memory_format=torch.channels_last)
        x_hat, z_n, idx, vq_loss, commit = vq_forward(vq, x)
        rec = F.l1_loss(x_hat, x) + F.mse_loss(x_hat, x)
        loss = rec + vq_loss + beta * commit
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(vq.parameters(), grad_clip)
        opt.step()

        usage += torch.bincount(idx, minlength=k)
        if restart_every and (step + 1) % restart_every == 0 and step + 1 < 0.8 * steps:
            dead = (usage == 0).nonzero().flatten()
            if len(dead):
                _restart_codes(vq, opt, dead, z_n.detach())
                restarts += len(dead)
            usage.zero_()
        if log_every and (step % log_every == 0 or step == steps - 1):
            row = {"step": step, "loss": loss.item(), "recon": rec.item(), "vq": vq_loss.item(),
                   "commit": commit.item(), "codes": int(idx.unique().numel()),
                   "time_s": round(time.perf_counter() - t0, 1)}
            if eval_data is not None and eval_every and (step % eval_every == 0 or step == steps - 1):
                row["color_match"] = recon_color_match(vq, eval_data[0].to(dev, dtype), eval_data[1])
                vq.train()
            history.append(row)
            log(" ".join(f"{a}={b:.4f}" if isinstance(b, float) else f"{a}={b}" for a, b in row.items()))
    metrics["seconds"] = round(time.perf_counter() - t0, 1)
    metrics["recon_loss_final"], metrics["codes_used_final"] = recon_loss()
    metrics["restarts"], metrics["history"] = restarts, history
    if eval_data is not None:
        ev_pixels, ev_captions = eval_data
        metrics["color_match_recon"] = recon_color_match(vq, ev_pixels.to(dev, dtype), ev_captions)
        from janus_rt.processing import to_pil

        metrics["color_match_orig"] = float(np.mean([caption_color_match(im, c) for im, c in
                                                     zip(to_pil(ev_pixels), ev_captions)]))
    vq.to(memory_format=torch.contiguous_format).eval()
    return metrics


# ---- CLI --------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    from janus_rt.config import tiny_config
    from janus_rt.loading import save_janus
    from janus_rt.models.janus import Janus
    from janus_rt.tokenizer import JanusTokenizer

    p = argparse.ArgumentParser(prog="python -m janus_rt.train.vq_pretrain", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="checkpoint folder to write (tiny Janus, trained VQ)")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", help="manifest folder with t2i images (default: fresh synthetic images)")
    p.add_argument("--n-images", type=int, default=2000, help="synthetic training images when --data is absent")
    p.add_argument("--n-eval", type=int, default=256, help="held-out synthetic images for the colour check")
    p.add_argument("--source-size", type=int, default=0, help="render synthetic images at this size "
                   "(0: the VQ image size) before loading them at the VQ image size")
    p.add_argument("--tiny", default="{}", help='JSON overrides for tiny_config, e.g. \'{"image_size": 64}\'')
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    a = p.parse_args(argv)
    if a.data and not Path(a.data).exists():
        p.error(f"--data {a.data}: no such manifest or folder")
    if a.threads:
        torch.set_num_threads(a.threads)

    torch.manual_seed(a.seed)
    cfg = tiny_config(**json.loads(a.tiny))
    model = Janus.from_config(cfg, seed=a.seed)
    vq = VQModel(cfg.vq)  # a from-scratch tokenizer: PyTorch's default init, not the preset's test weights
    s = cfg.vq.image_size
    if a.data:
        train = a.data
    else:
        train = synthetic_images(a.n_images, s, a.seed, a.source_size or None)[0]
    held_out = synthetic_images(a.n_eval, s, a.seed + 10_000, a.source_size or None)
    metrics = pretrain_vq(vq, train, steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
                          log_every=a.log_every, eval_data=held_out)
    model.vq.load_state_dict(vq.state_dict())
    out = save_janus(model, a.out)
    JanusTokenizer.byte_level(cfg.llm.vocab_size, cfg.tokens).save(out / "tokenizer.json")
    summary = {k: v for k, v in metrics.items() if k != "history"}
    summary["tiny_overrides"] = json.loads(a.tiny)
    (out / "vq_pretrain.json").write_text(json.dumps({**summary, "history": metrics["history"]}, indent=2))
    print(json.dumps(summary))
    return metrics


if __name__ == "__main__":
    main()
