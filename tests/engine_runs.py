"""What the int8 tests share (test_kv_int8.py, test_int8.py, test_w8a8.py): a small mixed engine run, and a
DecodeStack fed a layer of mixed weight kinds."""
import pytest
import torch

from janus_rt import Janus
from janus_rt.cpu_step import DecodeStack
from janus_rt.engine import Engine, SamplingParams


def amx_routes(amx: bool, what: str, other: str) -> list:
    """Parameters for the `route` fixture (conftest.py): the AMX route where this machine has it (amx; else skipped,
    "no <what>") and the other one (id `other`, set_amx(False)) everywhere."""
    return [pytest.param(True, id="amx", marks=pytest.mark.skipif(not amx, reason=f"no {what}")),
            pytest.param(False, id=other)]


def assert_mix_refused(hold, hold_o, match: str):
    """DecodeStack refuses a tiny bf16 layer whose qkv, gate_up and down projections are held as hold(weight) and
    its o projection as hold_o(weight), with a ValueError matching `match`."""
    model = Janus.from_preset("tiny", seed=0, dtype=torch.bfloat16)
    l = model.llm.layers[0]
    c = model.cfg.llm
    kc = torch.zeros(4, 16, c.num_heads, c.head_dim, dtype=torch.bfloat16)
    ws = (l.input_norm.weight.detach(), hold(l.attn.qkv_proj.weight), hold_o(l.attn.o_proj.weight),
          l.post_attn_norm.weight.detach(), hold(l.mlp.gate_up_proj.weight), hold(l.mlp.down_proj.weight))
    with pytest.raises(ValueError, match=match):
        DecodeStack([ws], [(kc, kc.clone())], 1e-6)


def two_image_requests(model, kv=None, fused=True, steps=None):
    """(engine, (a, b)): a greedy n = 2 request of 24 tokens and a seeded n = 1 request of 20 tokens with a longer
    prompt, run together with their logits recorded; kv: the cache dtype (None: the model's); fused=False: the
    layer-by-layer step instead of the csrc one; steps: max_steps_per_call."""
    t = model.cfg.tokens
    ids = [t.bos_id, 5, 9, 30, 7, t.boi_id]
    eng = Engine.for_requests(model, [(len(ids), 2), (len(ids) + 3, 1)], kv_cache_dtype=kv,
                              **({"max_steps_per_call": steps} if steps else {}))
    eng.runner.fused_cpu_decode = fused and eng.runner.fused_cpu_decode
    eng.record_logits = True
    a = eng.add_image_request(ids, n=2, params=SamplingParams(greedy=True), num_tokens=24)
    b = eng.add_image_request(ids[:-1] + [3, 4, 5, t.boi_id], n=1, params=SamplingParams(seed=2), num_tokens=20)
    eng.run()
    return eng, (a, b)


def step_logits(req) -> torch.Tensor:
    """The request's recorded logits, one row a decode step."""
    return torch.stack([c for c, _ in req.logits])
