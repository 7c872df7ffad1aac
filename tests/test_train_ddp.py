"""Data parallelism on CPU (gloo): 2 ranks x 1 micro-batch train exactly like 1 rank x 2 micro-batches.

Every rank walks the same global micro-batch stream and keeps its share (janus_rt.train.loop), so the two
runs see the same data and normalise the losses by the same token counts; only the gradient reduction
differs (DDP all-reduce, FSDP2 reduce-scatter of sharded parameters). Tolerance: 1e-6 relative.

The FSDP2 run is compared with clipping off (against a one-rank run with clipping off): clipping scales each step's
gradients by 1 / grad norm, FSDP2 sums that norm's squares per shard and then across ranks (another order: 1.1e-6
relative apart at the third step on an Intel Xeon host, 2026-12-04), and Adam carries the difference into the
weights (1.02e-6 relative there). Without clipping its weights came out bit-identical to one rank's; the DDP run,
whose norm is summed as one rank's, is compared with clipping on.
"""
import json
import os
import shutil
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from janus_rt.models.janus import Janus
from janus_rt.train.loop import TrainConfig, train
from janus_rt.train.synthetic import make_synthetic

STEPS = 3
RUN = dict(model="tiny", synthetic=8, steps=STEPS, batch_size=2, seq_len=512, lr=3e-3, warmup=1, threads=1,
           progress=False, stage=3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, runs: list) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for out, kw in runs:
            train(TrainConfig(out=out, **RUN, **kw))
    finally:
        dist.destroy_process_group()


def _logs(out):
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


def _weights(out):
    return load_file(str(out / "checkpoints" / f"step_{STEPS:07d}" / "model.safetensors"))


def test_two_ranks_equal_one_rank(tmp_path):
    src = tmp_path / "src"
    make_synthetic(src / "synthetic", n=8, image_size=32, seed=0)
    (src / "synthetic" / "synthetic.json").write_text(json.dumps({"n": 8, "image_size": 32, "seed": 0}))
    outs = {}
    for name in ("one", "one_noclip", "ddp", "fsdp"):
        outs[name] = tmp_path / name
        shutil.copytree(src / "synthetic", outs[name] / "synthetic")  # token cache built once, by "one"

    train(TrainConfig(out=str(outs["one"]), grad_accum=2, **RUN))
    for name in ("one_noclip", "ddp", "fsdp"):  # copy the now-built cache so the ranks only read it
        shutil.rmtree(outs[name] / "synthetic")
        shutil.copytree(outs["one"] / "synthetic", outs[name] / "synthetic")
    train(TrainConfig(out=str(outs["one_noclip"]), grad_accum=2, clip=0.0, **RUN))
    mp.spawn(_worker, args=(2, _free_port(), [(str(outs["ddp"]), dict(grad_accum=1)),
                                              (str(outs["fsdp"]), dict(grad_accum=1, fsdp=True, clip=0.0))]),
             nprocs=2, join=True)

    init = Janus.from_preset("tiny", seed=0).state_dict()
    assert all(r["grad_norm"] > 1.0 for r in _logs(outs["one"]))  # clipping (at 1.0) acted at every step
    width = init["vision.blocks.0.attn.qkv.bias"].numel() // 3
    for name, ref_name in (("ddp", "one"), ("fsdp", "one_noclip")):
        ref_w, one = _weights(outs[ref_name]), _logs(outs[ref_name])
        assert not torch.equal(ref_w["gen_head.fc2.weight"], init["gen_head.fc2.weight"])  # it did train
        logs = _logs(outs[name])
        assert [r["step"] for r in logs] == list(range(1, STEPS + 1))
        for a, b in zip(logs, one):
            assert a["tokens"] == b["tokens"]  # the same global batch
            for key in ("loss", "loss_t2i", "loss_und", "loss_text", "grad_norm"):
                # grad norm: FSDP2 sums squares per shard, then across ranks (another order of 356k terms)
                rel = 1e-5 if key == "grad_norm" else 1e-6
                if b[key] is None:
                    assert a[key] is None
                else:
                    assert a[key] == pytest.approx(b[key], rel=rel, abs=0), f"{name} step {a['step']} {key}"
        w = _weights(outs[name])
        assert w.keys() == ref_w.keys()
        for k, ref in ref_w.items():
            got = w[k]
            if name == "fsdp" and k.startswith("vision.") and k.endswith("attn.qkv.bias"):
                # The key bias has an exactly-zero true gradient (softmax ignores a per-query constant), so its
                # gradient is rounding noise (~1e-12) that differs with FSDP's buffer layout, and Adam scales
                # noise up to lr-sized steps. Every other element must match.
                got, ref = torch.cat([got[:width], got[2 * width:]]), torch.cat([ref[:width], ref[2 * width:]])
            err = (got - ref).abs().max() / ref.abs().max().clamp_min(1e-12)
            assert err <= 1e-6, f"{name}: {k} rel err {err:.2e}"
