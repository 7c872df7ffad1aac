"""A small mixed engine run the int8 tests share (test_kv_int8.py, test_w8a8.py)."""
import torch

from janus_rt.engine import Engine, SamplingParams


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
