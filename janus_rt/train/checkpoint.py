"""Training checkpoints: everything needed to continue a run exactly where it stopped.

    OUT/checkpoints/step_0000100/
        config.json, model.safetensors, tokenizer.json   janus_rt's model layout: `--model` and
                                                         `Janus.from_pretrained` load the folder as is
        optimizer.safetensors                            "{param}.{exp_avg|exp_avg_sq|step}" (AdamW)
        state.json                                       step, optimizer param groups, the data sampler's
                                                         state (its cursor), per-rank RNG states, run config

A checkpoint is written into `step_N.tmp/` and renamed to `step_N/` only when complete, so a killed run
leaves either the previous checkpoints or a stray `.tmp` folder (removed by the next run), never a
half-written checkpoint that `latest` could pick. Model and optimizer states go through
torch.distributed.checkpoint's full-state-dict API, so the same code saves and loads plain, DDP and FSDP2
(sharded) models; saving is collective and rank 0 writes.
"""
from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from janus_rt.loading import readable_as_umask, write_guidance

_DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d+)$")
_PREFIX = "model."  # PackedLM holds the Janus model as `.model`


def checkpoint_root(out: str | Path) -> Path:
    return Path(out) / _DIR


def latest(out: str | Path) -> Path | None:
    """The newest complete checkpoint under out/checkpoints, or None."""
    root = checkpoint_root(out)
    done = sorted((int(m.group(1)), p) for p in root.glob("step_*") if (m := _NAME.match(p.name)) and p.is_dir())
    return done[-1][1] if done else None


def remove_partial(out: str | Path) -> None:
    """Delete `.tmp` folders left by a run killed while saving."""
    for p in checkpoint_root(out).glob("step_*.tmp"):
        shutil.rmtree(p, ignore_errors=True)


# ---- RNG states (JSON-able) -------------------------------------------------------------------------------------
def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_state() -> dict:
    """This process's torch (CPU and CUDA), numpy and Python RNG states."""
    np_state = np.random.get_state()
    return {
        "torch": _b64(torch.get_rng_state()),
        "cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(_unb64(state["torch"]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# ---- save / load ------------------------------------------------------------------------------------------------
def save(out: str | Path, step: int, module: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict,
         tokenizer=None, keep: int = 2, rank: int = 0) -> Path | None:
    """Write checkpoint `step` (collective: every rank calls it; rank 0 writes). `module` is the PackedLM
    (unwrapped from DDP; FSDP2-sharded is fine). `state`: JSON-able extras (data cursor, RNG, config).
    keep: how many checkpoints to keep (0 = all). Returns the folder on rank 0, else None."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(module, options=opts)
    osd = get_optimizer_state_dict(module, optimizer, options=opts)
    if rank != 0:
        return None
    model = module.model
    root = checkpoint_root(out)
    final = root / f"step_{step:07d}"
    tmp = root / f"step_{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    weights = {_strip(k): v.detach().contiguous() for k, v in msd.items()}
    if model.cfg.llm.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt", "producer": "janus_rt.train"})
    (tmp / "config.json").write_text(json.dumps(model.cfg.to_dict(), indent=2))
    write_guidance(model, tmp)  # (the source checkpoint's recommended --cfg: the fine-tuned model keeps it)
    if tokenizer is not None:
        tokenizer.save(tmp / "tokenizer.json")

    tensors, scalars = {}, {}
    for fqn, st in osd["state"].items():
        for key, value in st.items():
            name = f"{_strip(fqn)}.{key}"
            if isinstance(value, torch.Tensor):
                tensors[name] = value.detach().contiguous()
            else:
                scalars[name] = value
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    for f in ("model.safetensors", "optimizer.safetensors"):
        readable_as_umask(tmp / f)
    groups = [{**g, "params": [_strip(p) for p in g["params"]]} for g in osd["param_groups"]]
    meta = {"version": 1, "step": step, "param_groups": groups, "optimizer_scalars": scalars, **state}
    (tmp / "state.json").write_text(json.dumps(meta))

    if final.exists():  # re-saving a step (e.g. after a resume): the old copy goes only now
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep > 0:
        done = sorted(p for p in root.glob("step_*") if _NAME.match(p.name))
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load(path: str | Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Restore model (and optimizer) state from a checkpoint folder into `module` (a PackedLM, possibly
    FSDP2-sharded); every rank reads the files. Returns state.json's contents."""
    path = Path(path)
    meta = read_state(path)
    weights = load_file(str(path / "model.safetensors"))
    model = module.model
    if model.cfg.llm.tie_word_embeddings:
        weights["lm_head.weight"] = weights["llm.embed_tokens.weight"]
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(module, {_PREFIX + k: v for k, v in weights.items()}, options=opts)
    if optimizer is not None:
        state: dict[str, dict] = {}
        for name, value in [*load_file(str(path / "optimizer.safetensors")).items(),
                            *meta["optimizer_scalars"].items()]:
            param, key = name.rsplit(".", 1)
            state.setdefault(_PREFIX + param, {})[key] = value
        groups = [{**g, "params": [_PREFIX + p for p in g["params"]]} for g in meta["param_groups"]]
        set_optimizer_state_dict(module, optimizer, {"state": state, "param_groups": groups}, options=opts)
    return meta


def read_state(path: str | Path) -> dict:
    """A checkpoint folder's state.json (step, data cursor, RNG states, run config), without reading any tensor."""
    return json.loads((Path(path) / "state.json").read_text())


def _strip(fqn: str) -> str:
    if not fqn.startswith(_PREFIX):
        raise ValueError(f"unexpected parameter name {fqn!r} (expected the PackedLM prefix {_PREFIX!r})")
    return fqn[len(_PREFIX):]
