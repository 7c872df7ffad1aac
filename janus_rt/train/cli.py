"""`janus-rt train` (and `python -m janus_rt.train`): command-line arguments -> TrainConfig -> train()."""
from __future__ import annotations

import argparse

from janus_rt.train.loop import DEFAULT_MODEL, TrainConfig, train


def _ratios(text: str) -> dict[str, float]:
    """"und:5,text:1,t2i:4" -> {"und": 5.0, "text": 1.0, "t2i": 4.0}."""
    try:
        pairs = [item.split(":") for item in text.split(",") if item.strip()]
        return {k.strip(): float(v) for k, v in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected kind:weight pairs like und:5,text:1,t2i:4, got {text!r}")


def add_train_args(p: argparse.ArgumentParser) -> None:
    d = TrainConfig(out="")
    p.add_argument("--model", default=None,
                   help=f"checkpoint folder or preset name (default: {DEFAULT_MODEL}; with --resume, the run's own)")
    p.add_argument("--data", default=None, help="JSONL manifest (t2i / und / text records)")
    p.add_argument("--synthetic", type=int, default=0, metavar="N",
                   help="write N synthetic images (3N records) to OUT/synthetic and train on them")
    p.add_argument("--stage", type=int, choices=(1, 2, 3), default=d.stage,
                   help="1: adaptors + image head; 2: + LLM; 3: all but the VQ (default: %(default)s)")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps (default: %(default)s)")
    p.add_argument("--out", required=True, help="run folder: checkpoints/, log.jsonl, loss.png")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in OUT (without it, an OUT holding checkpoints is "
                        "refused)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (AdamW)")
    g.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="final lr / peak lr")
    g.add_argument("--warmup", type=int, default=d.warmup, help="linear warm-up steps")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="on >= 2-D weights only")
    g.add_argument("--beta1", type=float, default=d.betas[0], help="AdamW beta1")
    g.add_argument("--beta2", type=float, default=d.betas[1], help="AdamW beta2")
    g.add_argument("--clip", type=float, default=d.clip, help="max grad norm, 0 = off")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="packed rows per micro-batch per rank")
    g.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per packed row")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per step per rank")
    g = p.add_argument_group("data")
    g.add_argument("--ratios", type=_ratios, default=None,
                   help="data mix, e.g. und:5,text:1,t2i:4 (default: the stage's)")
    g.add_argument("--cfg-drop", type=float, default=d.cfg_drop, help="unconditional t2i share (for CFG)")
    g.add_argument("--cache-dir", default=None, help="VQ token cache folder (default: next to the manifest)")
    g = p.add_argument_group("execution")
    g.add_argument("--backend", choices=("torch", "triton"), default=d.backend,
                   help="torch reference ops or Triton kernels (default: %(default)s)")
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--amp", choices=("bf16", "none"), default=None, help="default: bf16 on cuda, none on cpu")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute decoder layers in backward")
    g.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard) instead of DDP under torchrun")
    g.add_argument("--seed", type=int, default=d.seed, help="data order and caption drops; a preset's random weights")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    g.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint interval (0: at the end)")
    g.add_argument("--keep", type=int, default=d.keep, help="checkpoints kept (0: all)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (the JSON lines remain)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        out=args.out, model=args.model, data=args.data, synthetic=args.synthetic, stage=args.stage,
        steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, grad_accum=args.grad_accum,
        lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup=args.warmup, weight_decay=args.weight_decay,
        betas=(args.beta1, args.beta2), clip=args.clip, ratios=args.ratios, cfg_drop=args.cfg_drop,
        backend=args.backend, device=args.device, amp=args.amp, grad_checkpointing=args.grad_checkpointing,
        fsdp=args.fsdp, seed=args.seed, save_every=args.save_every, keep=args.keep, resume=args.resume,
        cache_dir=args.cache_dir, threads=args.threads, progress=not args.no_progress,
        keep_freed=True)


def run_train(args: argparse.Namespace) -> list[dict]:
    return train(config_from_args(args))


def main(argv=None) -> None:
    from janus_rt.cli import run_reporting_usage_errors
    from janus_rt.errors import check_environment

    p = argparse.ArgumentParser(prog="python -m janus_rt.train", description=__doc__)
    add_train_args(p)
    args = p.parse_args(argv)
    run_reporting_usage_errors("train", check_environment)  # (as janus-rt train: before anything loads)
    run_reporting_usage_errors("train", run_train, args)
