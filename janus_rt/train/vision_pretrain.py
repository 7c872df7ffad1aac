"""Pre-training of the understanding encoder (the SigLIP tower) on the synthetic shapes, before the Janus stages.

Janus-Pro's SigLIP-L comes pre-trained (image-text contrastive); a small tower made here has no such start. Trained
only through the LLM's answers, the embedded model's earlier 64-wide tower (git 966e887) learned colours but
never shapes: the model answered every shape question alike. This trains the tower on its own first, as a classifier
of what the synthetic captions name:

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
from janus_rt.train.vq_pretrain import _lr_at, load_images, synthetic_images

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


def pretrain_vision(tower: SigLIP, pixels, captions: list[str], steps: int = 3000, batch_size: int = 64,
                    lr: float = 1e-3, weight_decay: float = 0.05, seed: int = 0, eval_data=None,
                    log_every: int = 500, log=print) -> dict:
    """Train `tower` in place on pixels [N, 3, S, S] in [-1, 1] with their synthetic captions [N]; returns metrics.

    The heads' start and the batches draw from `seed` (+ 1: not the stream reinit_tower_(seed) drew the tower from).
    eval_data: optional held-out (pixels [M, 3, S, S], captions [M]); adds accuracy_final (per attribute) and
    accuracy_init (the untrained heads on the tower as given: chance for a fresh tower, no measure of a trained one).
    Weight decay on >= 2-D weights only (not the position embedding, gains or biases). Raises ValueError where the
    loss is not finite (the tower is then left part-trained)."""
    def checked(px, caps, what):
        s = tower.cfg.image_size
        if px.dim() != 4 or tuple(px.shape[1:]) != (3, s, s):
            raise ValueError(f"expected {what} images [N, 3, {s}, {s}], got {tuple(px.shape)}")
        if len(px) != len(caps) or len(px) == 0:
            raise ValueError(f"{len(px)} {what} images but {len(caps)} captions")
        return px.to(dev, dtype), caption_labels(caps).to(dev)

    dev, dtype = tower.pos_embed.device, tower.pos_embed.dtype
    pixels, labels = checked(pixels, captions, "training")
    ev = None if eval_data is None else checked(*eval_data, "held-out")
    g = torch.Generator().manual_seed(seed + 1)
    heads = AttributeHeads(tower.cfg.width)
    for h in heads.heads.values():
        nn.init.normal_(h.weight, std=0.02, generator=g)
        nn.init.zeros_(h.bias)
    heads.to(dev, dtype)
    flags, was_training = [p.requires_grad for p in tower.parameters()], tower.training
    tower.requires_grad_(True).train()
    decay, no_decay = [], []  # weight decay on matrices only: not the position embedding, gains or biases
    for n, p in [*tower.named_parameters(), *heads.named_parameters()]:
        (decay if p.dim() >= 2 and n != "pos_embed" else no_decay).append(p)
    params = decay + no_decay
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    metrics = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "history": []}
    if ev is not None:
        metrics["accuracy_init"] = accuracy(tower, heads, *ev)
    t0 = time.perf_counter()
    try:
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, steps, lr, warmup=min(100, steps // 10 + 1))
            i = torch.randint(len(pixels), (batch_size,), generator=g).to(dev)
            x, y = pixels[i], labels[i]
            if torch.rand((), generator=g) < 0.5:  # a mirrored synthetic image shows the same attributes
                x = x.flip(-1)
            loss = sum(F.cross_entropy(lg.float(), y[:, k]) for k, lg in enumerate(heads(tower(x))))
            if not torch.isfinite(loss):
                raise ValueError(f"the loss is {loss.item()} at step {step + 1} (is --lr {lr} too large?)")
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
        metrics["seconds"] = round(time.perf_counter() - t0, 1)
        if ev is not None:
            metrics["accuracy_final"] = accuracy(tower, heads, *ev)
    finally:
        for p, f in zip(tower.parameters(), flags):
            p.requires_grad_(f)
        tower.train(was_training)
    return metrics


# ---- CLI --------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    from janus_rt.errors import folder_problem
    from janus_rt.loading import holds_checkpoint, save_janus
    from janus_rt.models.janus import Janus

    p = argparse.ArgumentParser(prog="python -m janus_rt.train.vision_pretrain", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint folder whose vision tower to train")
    p.add_argument("--out", required=True, help="new checkpoint folder to write (the same model, its tower trained)")
    p.add_argument("--fresh", action="store_true", help="re-initialise the tower first (N(0, 0.02), from --seed)")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=64, help="images per step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW; warm-up, cosine to lr / 10)")
    p.add_argument("--seed", type=int, default=0, help="the tower's fresh start, the heads, batches, images")
    p.add_argument("--data", help="manifest folder or file of t2i records with synthetic captions and square images "
                                  "(loaded as generation images; default: fresh synthetic images)")
    p.add_argument("--n-images", type=int, default=8192, help="synthetic training images when --data is absent")
    p.add_argument("--n-eval", type=int, default=512, help="held-out synthetic images (seed --seed + 10000) for "
                                                          "the accuracy check")
    p.add_argument("--log-every", type=int, default=500, help="steps between log lines (0: none)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    a = p.parse_args(argv)
    if not Path(a.model).is_dir():
        p.error(f"--model {a.model}: no such checkpoint folder")
    if a.data and not Path(a.data).exists():
        p.error(f"--data {a.data}: no such manifest or folder")
    for flag, value, low in (("--steps", a.steps, 1), ("--batch-size", a.batch_size, 1), ("--n-images", a.n_images, 1),
                             ("--n-eval", a.n_eval, 1), ("--seed", a.seed, 0), ("--threads", a.threads, 0),
                             ("--log-every", a.log_every, 0)):
        if value < low:
            p.error(f"{flag} must be >= {low}, got {value}")
    if not (0 < a.lr < math.inf):
        p.error(f"--lr must be a finite number > 0, got {a.lr}")
    out = Path(a.out)
    if out.is_dir() and out.resolve() == Path(a.model).resolve():
        p.error("--out must differ from --model")
    if holds_checkpoint(out):
        p.error(f"--out {a.out} already holds a checkpoint: give a new folder")
    if problem := folder_problem(a.out):
        p.error(problem)
    if a.threads:
        torch.set_num_threads(a.threads)

    model = Janus.from_pretrained(a.model)
    tower = model.vision
    if a.fresh:
        reinit_tower_(tower, seed=a.seed)
    s = model.cfg.vision.image_size
    try:
        train = load_images(a.data, s) if a.data else synthetic_images(a.n_images, s, a.seed)
        held_out = synthetic_images(a.n_eval, s, a.seed + 10_000)
        metrics = pretrain_vision(tower, *train, steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
                                  eval_data=held_out, log_every=a.log_every)
    except ValueError as e:  # a caption that is not a synthetic one, a loss that diverged: nothing is written
        p.exit(1, f"{p.prog}: {e}\n")
    if not a.fresh:
        metrics.pop("accuracy_init", None)  # untrained heads on a trained tower: no measure of it
    out = save_janus(model, a.out)
    tok = Path(a.model) / "tokenizer.json"
    if tok.is_file():
        shutil.copy(tok, out / "tokenizer.json")
    summary = {k: v for k, v in metrics.items() if k != "history"}
    summary.update(model=str(a.model), fresh=a.fresh, data=a.data, n_images=None if a.data else a.n_images,
                   n_eval=a.n_eval)
    (out / "vision_pretrain.json").write_text(json.dumps({**summary, "history": metrics["history"]}, indent=2))
    print(json.dumps(summary))
    return metrics


if __name__ == "__main__":
    main()
