"""The training loop, top to bottom: setup, then one optimizer step per iteration.

    torchrun --nproc-per-node 8 -m janus_rt.train --model PATH --data manifest.jsonl --stage 2 --steps 1000 --out run/

Data parallelism: every rank walks the same global stream of packed micro-batches (same sampler, same seed)
and keeps its own share, W ranks x A accumulation steps = W*A micro-batches per optimizer step. So W ranks
with A steps train exactly like one rank with W*A steps, the data cursor is one global state, and each
step's token counts are known on every rank without communication (the losses are normalised by them).
The price: every rank also builds the other ranks' micro-batches (tokenising, understanding-image decoding),
in the background prefetch thread.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from janus_rt import ops
from janus_rt.errors import UsageError, check_device, folder_problem
from janus_rt.train import checkpoint
from janus_rt.train.data import KINDS, ManifestDataset
from janus_rt.train.packing import PackedSampler, prefetch
from janus_rt.train.stages import RATIOS, apply_stage
from janus_rt.train.step import PackedLM, prepare


DEFAULT_MODEL = "tiny"


@dataclass
class TrainConfig:
    out: str                        # run folder: checkpoints/, log.jsonl, loss.png (synthetic/ with `synthetic`)
    model: str | None = None        # checkpoint folder or preset name (None: "tiny", or a --resume's own run's)
    data: str | None = None         # JSONL manifest
    synthetic: int = 0              # > 0: write this many synthetic images (3 records each) to OUT/synthetic
    stage: int = 3
    steps: int = 1000
    batch_size: int = 4             # packed rows per micro-batch, per rank
    seq_len: int = 2048
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr_ratio: float = 0.1       # cosine decays to lr * min_lr_ratio at `steps`
    warmup: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    clip: float = 1.0               # max grad norm (0: no clipping)
    ratios: dict[str, float] | None = None  # und : text : t2i mix (default: the stage's)
    cfg_drop: float = 0.1           # share of t2i samples trained as the unconditional (CFG) form
    backend: str = "torch"          # janus_rt.ops backend: torch | triton
    device: str | None = None       # default: cuda if available
    amp: str | None = None          # bf16 | none (default: bf16 on cuda, none on cpu)
    grad_checkpointing: bool = False
    fsdp: bool = False              # FSDP2 (fully_shard) instead of DDP when world size > 1
    seed: int = 0
    save_every: int = 0             # checkpoint every N steps (0: only at the end)
    keep: int = 2                   # checkpoints to keep (0: all)
    resume: bool = False
    lookahead: int = 8
    cache_dir: str | None = None    # VQ token cache (default: next to the manifest)
    threads: int = 0                # torch CPU threads (0: torch's default)
    progress: bool = True
    keep_freed: bool = False        # cpu_ops.retain_freed_memory() once the model is loaded (the CLI's), and the
                                    # blocks a --resume's checkpoint read freed handed back


def get_lr(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine down to cfg.lr * min_lr_ratio at cfg.steps (step is 0-based)."""
    min_lr = cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / (cfg.warmup + 1)
    if step >= cfg.steps:
        return min_lr
    ratio = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - min_lr)


def log_lines_through(log_path: Path, step: int) -> list[str]:
    """The lines of a run's log.jsonl up to `step` (a resumed run's checkpoint), stopping at the first one past it
    or that cannot be read (cut short by a kill mid-write, or edited: said on stderr)."""
    kept = []
    if not log_path.exists():
        return kept
    for ln in log_path.read_text().splitlines():
        try:
            if json.loads(ln)["step"] > step:
                break
        except (ValueError, KeyError, TypeError):
            print(f"note: {log_path}: kept the {len(kept)} lines before an unreadable one", file=sys.stderr)
            break
        kept.append(ln)
    return kept


def check_config(cfg: TrainConfig) -> None:
    """UsageError for a config that cannot run (or would run other than asked), before anything loads or is written;
    for a fresh run into a folder that holds an earlier run's checkpoints (which it would overwrite and whose log it
    would extend); and for a --resume that cannot continue the checkpoint's run."""
    if cfg.synthetic < 0:
        raise UsageError(f"--synthetic must be >= 1, got {cfg.synthetic}")
    if (cfg.synthetic > 0) == bool(cfg.data):
        raise UsageError("give a manifest (--data) or --synthetic N, not both" if cfg.data else
                         "give a manifest (--data) or --synthetic N")
    if cfg.data and Path(cfg.data).is_dir():
        raise UsageError(f"--data {cfg.data!r} is a folder: give its JSONL manifest file")
    if cfg.data and not Path(cfg.data).is_file():
        raise UsageError(f"--data {cfg.data!r}: no such file")
    for name, least in (("steps", 1), ("batch_size", 1), ("seq_len", 2), ("grad_accum", 1), ("warmup", 0),
                        ("save_every", 0), ("keep", 0), ("threads", 0), ("seed", 0)):
        if getattr(cfg, name) < least:  # (a negative --keep or --save-every would pass for something else)
            raise UsageError(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(cfg, name)}")
    if not 0 < cfg.lr < math.inf:
        raise UsageError(f"--lr must be > 0, got {cfg.lr}")
    if not 0 <= cfg.min_lr_ratio <= 1:  # (> 1: the cosine would rise above the peak lr)
        raise UsageError(f"--min-lr-ratio (final lr / peak lr) must be in [0, 1], got {cfg.min_lr_ratio}")
    if not 0 <= cfg.weight_decay < math.inf:
        raise UsageError(f"--weight-decay must be >= 0, got {cfg.weight_decay}")
    for i, beta in enumerate(cfg.betas, 1):
        if not 0 <= beta < 1:
            raise UsageError(f"--beta{i} must be in [0, 1), got {beta}")
    if not cfg.clip >= 0:
        raise UsageError(f"--clip must be >= 0 (0: no clipping), got {cfg.clip}")
    if not 0 <= cfg.cfg_drop <= 1:
        raise UsageError(f"--cfg-drop must be in [0, 1], got {cfg.cfg_drop}")
    if cfg.ratios is not None:
        _check_ratios(cfg.ratios)
    if cfg.device is not None:
        check_device(cfg.device)
    # (before a model loads, or OUT is made; an existing --cache-dir may be read-only: a complete cache is only read)
    for path, flag in ((cfg.out, "--out"), (cfg.cache_dir, "--cache-dir")):
        if path and not (flag == "--cache-dir" and Path(path).is_dir()) and (problem := folder_problem(path, flag)):
            raise UsageError(problem)
    ck = checkpoint.latest(cfg.out)
    if ck is not None and not cfg.resume:
        raise UsageError(f"{cfg.out} holds an earlier run's checkpoints ({ck.name}): pass --resume to continue it, or "
                         f"give another --out")
    if ck is not None:
        _check_resume(cfg, ck)


def _shown(ratios: dict) -> str:
    """{"und": 5.0, "t2i": 4.0} -> "und:5,t2i:4" (as --ratios takes it)."""
    return ",".join(f"{k}:{v:g}" if isinstance(v, (int, float)) else f"{k}:{v!r}" for k, v in ratios.items())


def _check_ratios(ratios: dict) -> None:
    shown = _shown(ratios)
    unknown = [k for k in ratios if k not in KINDS]
    if unknown:
        raise UsageError(f"--ratios {shown}: unknown kind {unknown[0]!r} (the kinds: {', '.join(KINDS)})")
    bad = [k for k, v in ratios.items() if not 0 <= v < math.inf]
    if bad:
        raise UsageError(f"--ratios {shown}: weights must be numbers >= 0, got {bad[0]}:{ratios[bad[0]]}")
    if not any(v > 0 for v in ratios.values()):
        raise UsageError(f"--ratios {shown}: give at least one kind a weight > 0")


def _mixed_kinds(config: dict) -> list[str]:
    """The kinds a run's config mixes (positive weight in its --ratios, or its stage's default)."""
    ratios = config.get("ratios") or RATIOS[config["stage"]]
    return [k for k in KINDS if ratios.get(k, 0) > 0]


def _check_resume(cfg: TrainConfig, ck: Path) -> None:
    """--resume: UsageError where this run cannot continue checkpoint `ck`'s: another world size (per-rank RNG
    states), stage (other trainable tensors, so other optimizer state) or data stream (data source, seed, the kinds
    mixed: what the saved data cursor is a position in). Checked here, before OUT/synthetic is rewritten."""
    try:
        meta = checkpoint.read_state(ck)
    except ValueError as e:
        raise UsageError(f"--resume: {ck / 'state.json'} is unreadable ({e}); remove {ck} to resume from the "
                         f"checkpoint before it") from None
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    if meta.get("world_size", world) != world:
        raise UsageError(f"{ck} was written by {meta['world_size']} rank(s); resume with as many (RNG states are "
                         f"per rank), not {world}")
    then, now = meta.get("config"), asdict(cfg)
    if not then:
        return

    def flags(c: dict, names: list[str]) -> str:
        shown = {"synthetic": f"--synthetic {c['synthetic']}" if c["synthetic"] else f"--data {c['data']}",
                 "stage": f"--stage {c['stage']}", "seed": f"--seed {c['seed']}",
                 "ratios": f"--ratios {_shown(c['ratios'] or RATIOS[c['stage']])}"}
        return " ".join(shown[n] for n in names)

    differ = [n for n in ("synthetic", "stage", "seed") if n in then and then[n] != now[n]]
    if not differ and "ratios" in then and _mixed_kinds(then) != _mixed_kinds(now):
        differ.append("ratios")  # another mix of the same kinds continues the data cursor; other kinds cannot
    if differ:
        raise UsageError(f"--resume: {ck} was written by a run with {flags(then, differ)}, not {flags(now, differ)}; "
                         f"resume with the checkpoint's settings, or give another --out for a new run")
    if cfg.data and meta.get("manifest_sha256") and _sha256(Path(cfg.data)) != meta["manifest_sha256"]:
        raise UsageError(f"--resume: {ck} was written by a run on another manifest ({then.get('data')}: other "
                         f"contents than --data {cfg.data}); its data cursor is a position in that one's records: "
                         f"resume on it, or give another --out for a new run")
    started = then.get("model") or DEFAULT_MODEL
    if cfg.model is not None and not _same_model(started, cfg.model):  # (the checkpoint holds the weights)
        raise UsageError(f"--resume: {ck} continues a run that started from --model {started}, not --model "
                         f"{cfg.model}; resume without --model (the checkpoint holds the weights), or give another "
                         f"--out for a new run")


def _sha256(path: Path) -> str:
    """A manifest's contents, as a resumed run checks them (the same records wherever the file now lies)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _same_model(a: str, b: str) -> bool:
    """Whether --model b may continue a run recorded as started from a: the same checkpoint folder (however spelled)
    or the same preset; True where a is a folder no longer there (moved: nothing to compare against)."""
    from janus_rt.config import PRESETS

    pa, pb = Path(a), Path(b)
    if pa.is_dir() and pb.is_dir():
        return pa.resolve() == pb.resolve()
    return a == b or (a not in PRESETS and not pa.exists())


def _run_model(cfg: TrainConfig, resumed: dict | None) -> str:
    """The --model this run stands for: the one given; else a resumed run's own (as its checkpoint's state,
    `resumed`, recorded it); else the default preset. (Recorded in every checkpoint, and the VQ token cache's tag.)"""
    if cfg.model is not None:  # (a folder recorded absolute: a resume from another working folder finds it)
        return str(Path(cfg.model).resolve()) if Path(cfg.model).is_dir() else cfg.model
    if resumed is not None:
        return (resumed.get("config") or {}).get("model") or DEFAULT_MODEL
    return DEFAULT_MODEL


def train(cfg: TrainConfig) -> list[dict]:
    """Run (or resume) training; returns the per-step log records (the same on every rank)."""
    check_config(cfg)
    resume_from = checkpoint.latest(cfg.out) if cfg.resume else None
    resumed = checkpoint.read_state(resume_from) if resume_from is not None else None
    cfg = replace(cfg, model=_run_model(cfg, resumed))
    if resumed is not None and (done := resumed["step"]) >= cfg.steps:
        if int(os.environ.get("RANK", "0")) == 0:  # (a finished run asked again: not an error, e.g. a re-queued job)
            print(f"note: --resume: {resume_from} is already at step {done} >= --steps {cfg.steps}: nothing to do "
                  f"(a larger --steps trains on)", file=sys.stderr)
        return []
    # ---- distributed and device -------------------------------------------------------------------------------
    own_group = False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo")
        own_group = True
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = check_device(cfg.device) if cfg.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.backend == "triton" and device.type == "cpu":
        # Triton runs on a CPU only through its interpreter (slow: for tests); read when kernels are imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    amp = (cfg.amp or ("bf16" if device.type == "cuda" else "none")) == "bf16"
    barrier = dist.barrier if world > 1 else (lambda: None)
    out = Path(cfg.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_partial(out)
    torch.manual_seed(cfg.seed)

    # ---- model, stage, data -----------------------------------------------------------------------------------
    from janus_rt.cli import load_model  # the CLI's loader: checkpoint folder or preset, plus its tokenizer

    # a resumed run starts from its checkpoint, itself a model folder (not from --model: a preset's random weights)
    model, tok, _ = load_model(str(resume_from or cfg.model), device=str(device), dtype=torch.float32, seed=cfg.seed,
                               for_training=True)
    if cfg.keep_freed:  # from here on (VQ tokens of the data, every step) the same large blocks are freed and
        from janus_rt.cpu_ops import retain_freed_memory  # allocated again: keep them instead of faulting them in

        retain_freed_memory()
    trainable = apply_stage(model, cfg.stage)
    manifest = _manifest(cfg, model, rank, barrier)
    manifest_sha256 = _sha256(manifest)  # (recorded in the checkpoints: a --resume on other contents is refused)
    ds = None
    for turn in (0, 1):  # rank 0 builds the VQ token cache; the others read it after the barrier
        if (rank == 0) == (turn == 0):
            ds = _dataset(cfg, manifest, model, tok, device)
        barrier()
    ratios = cfg.ratios or RATIOS[cfg.stage]
    if not ds.records:  # (not the mix's fault: say why, not --ratios)
        raise UsageError(f"{manifest} has no usable records" + (
            f": all {len(ds.skipped)} were skipped (the warnings above say why)" if ds.skipped else " (it is empty)"))
    if not any(ratios.get(k, 0) > 0 and ds.indices[k] for k in KINDS):
        raise UsageError(f"{manifest} has no records of the kinds the mix {ratios} draws (see --ratios)")
    sampler = PackedSampler(ds, cfg.batch_size, cfg.seq_len, ratios, seed=cfg.seed, lookahead=cfg.lookahead)
    model.llm.gradient_checkpointing = cfg.grad_checkpointing
    model.train()

    # ---- parallel wrappers and optimizer ----------------------------------------------------------------------
    module = PackedLM(model)
    fwd = module
    if world > 1 and cfg.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        for layer in model.llm.layers:  # one all-gather per decoder layer; everything else with the root
            fully_shard(layer, mesh=mesh)
        fully_shard(module, mesh=mesh)
    elif world > 1:
        fwd = torch.nn.parallel.DistributedDataParallel(module)  # PackedLM gives every trainable param a grad
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]  # matrices, embeddings, conv kernels; not biases or gains
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)

    step = 0
    ckpt = resume_from
    if ckpt is not None:
        meta = checkpoint.load(ckpt, module, optimizer)
        step = meta["step"]
        have = {k: len(ds.indices[k]) for k in sampler.kinds}
        if meta["data"]["num_records"] != have:  # (the data source and seed were checked before anything loaded)
            raise UsageError(f"--resume: {ckpt} was written by a run on other data: records per kind "
                             f"{meta['data']['num_records']}, now {have} in {manifest}")
        sampler.load_state_dict(meta["data"])
        if rank == 0:
            print(f"note: --resume: continuing from {ckpt} (step {step})", file=sys.stderr)
        checkpoint.set_rng_state(meta["rng"][rank])
        if cfg.keep_freed:  # the checkpoint's tensors, read and copied in, are not allocated again
            from janus_rt.cpu_ops import release_freed_memory

            release_freed_memory()
    elif cfg.resume and rank == 0:
        print(f"note: --resume: no checkpoint in {checkpoint.checkpoint_root(out)}; starting at step 0",
              file=sys.stderr)
    if rank == 0:
        n_train = sum(p.numel() for p in params)
        print(f"stage {cfg.stage}: training {n_train:,} of {model.num_parameters():,} parameters "
              f"({len(trainable)} tensors) on {world} x {device}, backend {cfg.backend}, amp {amp}, "
              f"{'FSDP2' if world > 1 and cfg.fsdp else 'DDP' if world > 1 else 'single process'}; "
              f"data {manifest} ({len(ds)} records, mix {ratios})", file=sys.stderr)

    # ---- the loop -------------------------------------------------------------------------------------------------
    from tqdm import tqdm

    from janus_rt.train.plot import plot_run

    logs = []
    batches = prefetch(sampler)  # builds micro-batches in a background thread while this one computes
    # a fresh run starts the log; a resumed one keeps the lines up to its checkpoint's step and goes on from there
    log_file = None
    if rank == 0:
        log_path = out / "log.jsonl"
        kept = log_lines_through(log_path, step) if ckpt is not None else []
        log_file = open(log_path, "w")
        log_file.writelines(ln + "\n" for ln in kept)
    bar = tqdm(total=cfg.steps, initial=step, dynamic_ncols=True,
               disable=True if rank != 0 or not cfg.progress else None)  # None: off when not a terminal
    n_micro = world * cfg.grad_accum
    image_id, pad_id = model.cfg.tokens.image_id, model.cfg.tokens.pad_id
    try:
        with ops.use_backend(cfg.backend):
            while step < cfg.steps:
                t0 = time.perf_counter()
                lr = get_lr(step, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr

                # this step's micro-batches, all ranks'; the token counts of all of them normalise the losses
                drawn = [next(batches) for _ in range(n_micro)]
                data_state = drawn[-1][1]  # the sampler right after the step's last micro-batch
                micro = [prepare(b, image_id, pad_id) for b, _ in drawn]
                counts = torch.tensor([sum(mb.counts[k] for mb in micro) for k in range(len(KINDS))])
                n_tokens = sum(mb.num_tokens for mb in micro)
                # per-kind loss weights: image CE averaged over image targets, text CE over text targets
                n_image = int(counts[KINDS.index("t2i")])
                n_text = int(counts.sum()) - n_image
                weights = torch.tensor([1.0 / max(n_image if k == "t2i" else n_text, 1) for k in KINDS],
                                       device=device) * world  # DDP / FSDP average grads over ranks: undo that

                sums = torch.zeros(len(KINDS), device=device)
                mine = micro[rank * cfg.grad_accum:(rank + 1) * cfg.grad_accum]
                for i, mb in enumerate(mine):
                    last = i == len(mine) - 1
                    with _grad_sync(fwd, last), torch.autocast(device.type, torch.bfloat16, enabled=amp):
                        part = fwd(mb.to(device))  # [3] CE sums
                        loss = (part * weights).sum()
                    loss.backward()
                    sums += part.detach()

                if world > 1:
                    dist.all_reduce(sums)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip > 0 else float("inf"))
                if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
                    grad_norm = grad_norm.full_tensor()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1

                # ---- log: "loss" = mean image-token CE + mean text-token CE (what the step minimised) -------------
                sums, counts = sums.cpu().tolist(), counts.tolist()
                per_kind = {k: (s / c if c else None) for k, s, c in zip(KINDS, sums, counts)}
                text_sum = sum(s for k, s in zip(KINDS, sums) if k != "t2i")
                loss_value = (sums[KINDS.index("t2i")] / max(n_image, 1)) + text_sum / max(n_text, 1)
                dt = time.perf_counter() - t0
                rec = {"step": step, "loss": loss_value, **{f"loss_{k}": v for k, v in per_kind.items()},
                       "lr": lr, "grad_norm": float(grad_norm), "tokens": n_tokens,
                       "tokens_per_s": n_tokens / dt, "step_s": dt}
                logs.append(rec)
                if rank == 0:
                    line = json.dumps(rec)
                    log_file.write(line + "\n")
                    log_file.flush()
                    bar.write(line, file=sys.stdout)
                    bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
                    bar.update(1)

                # ---- checkpoint ----------------------------------------------------------------------------------
                if step == cfg.steps or (cfg.save_every and step % cfg.save_every == 0):
                    rng = [None] * world
                    if world > 1:
                        dist.all_gather_object(rng, checkpoint.rng_state())
                    else:
                        rng = [checkpoint.rng_state()]
                    state = {"data": data_state, "rng": rng, "world_size": world, "config": asdict(cfg),
                             "manifest_sha256": manifest_sha256}
                    path = checkpoint.save(out, step, module, optimizer, state, tok, keep=cfg.keep, rank=rank)
                    if rank == 0:
                        try:
                            curves = f"; loss curves: {plot_run(out)}"
                        except Exception as e:  # noqa: BLE001 (a view of the log: never the end of the run)
                            curves = f" (loss curves not drawn: {type(e).__name__}: {e})"
                        bar.write(f"saved {path}{curves}", file=sys.stderr)
    except KeyboardInterrupt:
        if rank == 0:
            bar.close()
            ckpt = checkpoint.latest(out)
            where = (f"the newest checkpoint is {ckpt} (`--resume` continues from it)" if ckpt is not None else
                     "no checkpoint written yet (--save-every N saves one every N steps)")
            print(f"interrupted after step {step} of {cfg.steps}: {where}", file=sys.stderr)
        raise
    finally:
        batches.close()
        bar.close()
        if log_file is not None:
            log_file.close()
        if own_group:
            dist.destroy_process_group()
    return logs


# ---- helpers ------------------------------------------------------------------------------------------------------
def _grad_sync(fwd, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if sync:
        return contextlib.nullcontext()
    if isinstance(fwd, torch.nn.parallel.DistributedDataParallel):
        return fwd.no_sync()
    if hasattr(fwd, "set_requires_gradient_sync"):  # FSDP2

        @contextlib.contextmanager
        def fsdp_no_sync():
            fwd.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                fwd.set_requires_gradient_sync(True)

        return fsdp_no_sync()
    return contextlib.nullcontext()


def _manifest(cfg: TrainConfig, model, rank: int, barrier) -> Path:
    """cfg.data, or the synthetic set written once to OUT/synthetic at the model's image size."""
    if cfg.synthetic <= 0:
        if not cfg.data:
            raise ValueError("give a manifest (--data) or --synthetic N")
        return Path(cfg.data)
    if cfg.data:
        raise ValueError("--data and --synthetic are exclusive")
    from janus_rt.train.synthetic import MANIFEST_NAME, make_synthetic

    folder = Path(cfg.out) / "synthetic"
    size = max(model.cfg.vq.image_size, model.cfg.vision.image_size)
    spec = {"n": cfg.synthetic, "image_size": size, "seed": cfg.seed}
    marker = folder / "synthetic.json"
    if rank == 0 and not (marker.is_file() and json.loads(marker.read_text()) == spec):
        make_synthetic(folder, n=cfg.synthetic, image_size=size, seed=cfg.seed)
        marker.write_text(json.dumps(spec))  # regenerating would change mtimes and rebuild the token cache
    barrier()
    return folder / MANIFEST_NAME


def vq_fingerprint(model) -> str:
    """sha256 of the VQ's weights, part of the token cache's key: the cache names its encoder by content, not only
    by --model (a model folder rewritten in place, e.g. by another vq_pretrain run, must not reuse the old codes)."""
    h = hashlib.sha256()
    for name, t in sorted(model.vq.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def _dataset(cfg: TrainConfig, manifest: Path, model, tok, device) -> ManifestDataset:
    from janus_rt.processing import preprocess_image

    vision_size = model.cfg.vision.image_size

    @torch.no_grad()
    def encode(pixels):  # [B, 3, S, S] in [-1, 1] -> VQ codes [B, N]
        return model.encode_images(pixels.to(device, model.dtype)).cpu()

    return ManifestDataset(manifest, tok, model.cfg.num_image_tokens, encode,
                           lambda im: preprocess_image(im, vision_size), image_size=model.cfg.vq.image_size,
                           cache_dir=cfg.cache_dir, cache_tag=f"{cfg.model}|seed={cfg.seed}|vq={vq_fingerprint(model)}",
                           cfg_drop=cfg.cfg_drop, seed=cfg.seed,
                           log=lambda msg: print(msg, file=sys.stderr, flush=True))
