"""Pre-training of the understanding encoder (the SigLIP tower) on the synthetic shapes, before the Janus stages.

Janus-Pro's SigLIP-L comes pre-trained (image-text contrastive); a small tower made here has no such start. Trained
only through the LLM's answers, the embedded model's 64-wide tower learned colours but never shapes: it answered every
shape question alike. This trains the tower on its own first, as a classifier of what the synthetic captions name:

    f = mean over patches of tower(x)                          [B, width]
    loss = CE(W_shape f, shape) + CE(W_color f, colour) + CE(W_bg f, background)

The three linear heads are thrown away; the tower's features (every patch, as Janus uses them) go on to the stages.

    python -m janus_rt.train.vision_pretrain --model DIR --out DIR [--fresh]
writes DIR's checkpoint with its vision tower trained (and re-initialised first with --fresh).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from janus_rt.models.siglip import SigLIP
from janus_rt.train.synthetic import PALETTE, SHAPES, caption_colors, caption_shape
from janus_rt.train.vq_pretrain import load_images, synthetic_images

# attribute -> its classes, in head order
ATTRIBUTES = {"shape": list(SHAPES), "color": list(PALETTE), "background": list(PALETTE)}


def caption_labels(captions: list[str]) -> torch.Tensor:
    """Synthetic captions [N] -> int64 [N, 3]: class indices of (shape, colour, background) in ATTRIBUTES."""
    rows = []
    for c in captions:
        shape, colors = caption_shape(c), caption_colors(c)
        if shape is None or len(colors) != 2:
            raise ValueError(f"not a synthetic caption (one shape, a colour and a background): {c!r}")
        rows.append([ATTRIBUTES["shape"].index(shape), ATTRIBUTES["color"].index(colors[0]),
                     ATTRIBUTES["background"].index(colors[1])])
    return torch.tensor(rows, dtype=torch.long)


@torch.no_grad()
def reinit_tower_(tower: SigLIP, seed: int = 0, std: float = 0.02) -> SigLIP:
    """A fresh start: N(0, std) matrices and position embeddings, zero biases, unit norm gains."""
    g = torch.Generator().manual_seed(seed)
    for name, p in tower.named_parameters():
        if p.dim() >= 2 or name == "pos_embed":
            p.copy_(torch.randn(p.shape, generator=g) * std)
        elif name.endswith("weight"):  # LayerNorm gains
            p.fill_(1.0)
        else:
            p.zero_()
    return tower


class AttributeHeads(nn.Module):
    """Mean-pooled tower features [B, N, C] -> logits per attribute."""

    def __init__(self, width: int):
        super().__init__()
        self.heads = nn.ModuleDict({k: nn.Linear(width, len(v)) for k, v in ATTRIBUTES.items()})

    def forward(self, feats):
        f = feats.mean(1)  # [B, C]
        return [self.heads[k](f) for k in ATTRIBUTES]


@torch.no_grad()
def accuracy(tower: SigLIP, heads: AttributeHeads, pixels, labels, batch: int = 256) -> dict[str, float]:
    """Per-attribute accuracy of tower + heads on pixels [N, 3, S, S] with labels [N, 3]."""
    was = tower.training
    tower.eval()
    preds = [torch.cat(p) for p in zip(*(
        [lg.argmax(-1) for lg in heads(tower(x))] for x in pixels.split(batch)))]  # 3 x [N]
    tower.train(was)
    return {k: float((p == labels[:, i]).float().mean()) for i, (k, p) in enumerate(zip(ATTRIBUTES, preds))}


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


def pretrain_vision(tower: SigLIP, pixels, captions: list[str], steps: int = 3000, batch_size: int = 64,
                    lr: float = 1e-3, weight_decay: float = 0.05, seed: int = 0, eval_data=None,
                    log_every: int = 500, log=print) -> dict:
    """Train `tower` in place on pixels [N, 3, S, S] in [-1, 1] with their synthetic captions [N]; returns metrics
    (accuracy per attribute on eval_data = (pixels, captions) before and after, when given, and the loss)."""
    s = tower.cfg.image_size
    if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, s, s):
        raise ValueError(f"expected images [N, 3, {s}, {s}], got {tuple(pixels.shape)}")
    labels = caption_labels(captions)
    if len(labels) != len(pixels):
        raise ValueError(f"{len(pixels)} images but {len(captions)} captions")
    g = torch.Generator().manual_seed(seed)
    heads = AttributeHeads(tower.cfg.width)
    for h in heads.heads.values():
        nn.init.normal_(h.weight, std=0.02, generator=g)
        nn.init.zeros_(h.bias)
    flags = [p.requires_grad for p in tower.parameters()]
    tower.requires_grad_(True).train()
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    ev = None if eval_data is None else (eval_data[0], caption_labels(eval_data[1]))
    metrics = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "history": []}
    if ev is not None:
        metrics["accuracy_init"] = accuracy(tower, heads, *ev)
    t0 = time.perf_counter()
    try:
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, steps, lr, warmup=min(100, steps // 10 + 1))
            i = torch.randint(len(pixels), (batch_size,), generator=g)
            x, y = pixels[i], labels[i]
            if torch.rand((), generator=g) < 0.5:  # a mirrored synthetic image shows the same attributes
                x = x.flip(-1)
            loss = sum(F.cross_entropy(lg, y[:, k]) for k, lg in enumerate(heads(tower(x))))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if log_every and ((step + 1) % log_every == 0 or step == steps - 1):
                row = {"step": step + 1, "loss": round(loss.item(), 4), "time_s": round(time.perf_counter() - t0, 1)}
                if ev is not None:
                    row.update({f"acc_{k}": round(v, 3) for k, v in accuracy(tower, heads, *ev).items()})
                metrics["history"].append(row)
                log(" ".join(f"{a}={b}" for a, b in row.items()))
    finally:
        for p, f in zip(tower.parameters(), flags):
            p.requires_grad_(f)
        tower.eval()
    metrics["seconds"] = round(time.perf_counter() - t0, 1)
    if ev is not None:
        metrics["accuracy_final"] = accuracy(tower, heads, *ev)
    return metrics


# ---- CLI --------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    from janus_rt.loading import save_janus
    from janus_rt.models.janus import Janus

    p = argparse.ArgumentParser(prog="python -m janus_rt.train.vision_pretrain", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="checkpoint folder whose vision tower to train")
    p.add_argument("--out", required=True, help="checkpoint folder to write (the same model, its tower trained)")
    p.add_argument("--fresh", action="store_true", help="re-initialise the tower first (N(0, 0.02))")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", help="manifest folder or file with synthetic t2i images (default: fresh ones)")
    p.add_argument("--n-images", type=int, default=8192, help="synthetic training images when --data is absent")
    p.add_argument("--n-eval", type=int, default=512, help="held-out synthetic images for the accuracy check")
    p.add_argument("--log-every", type=int, default=500)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    a = p.parse_args(argv)
    if not Path(a.model).is_dir():
        p.error(f"--model {a.model}: no such checkpoint folder")
    if a.data and not Path(a.data).exists():
        p.error(f"--data {a.data}: no such manifest or folder")
    if a.steps < 1 or a.batch_size < 1:
        p.error("--steps and --batch-size must be >= 1")
    if Path(a.out).resolve() == Path(a.model).resolve():
        p.error("--out must differ from --model")
    if a.threads:
        torch.set_num_threads(a.threads)

    model = Janus.from_pretrained(a.model)
    tower = model.vision
    if a.fresh:
        reinit_tower_(tower, seed=a.seed)
    s = model.cfg.vision.image_size
    train = load_images(a.data, s) if a.data else synthetic_images(a.n_images, s, a.seed)
    held_out = synthetic_images(a.n_eval, s, a.seed + 10_000)
    metrics = pretrain_vision(tower, *train, steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
                              eval_data=held_out, log_every=a.log_every)
    out = save_janus(model, a.out)
    tok = Path(a.model) / "tokenizer.json"
    if tok.is_file():
        shutil.copy(tok, out / "tokenizer.json")
    summary = {k: v for k, v in metrics.items() if k != "history"}
    summary.update(model=str(a.model), fresh=a.fresh)
    (out / "vision_pretrain.json").write_text(json.dumps({**summary, "history": metrics["history"]}, indent=2))
    print(json.dumps(summary))
    return metrics


if __name__ == "__main__":
    main()
