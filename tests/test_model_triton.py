"""The whole tiny model and the engine with the Triton backend (interpreter on CPU; compiled kernels on a GPU, where
the model is on the device) equal the torch backend."""
import torch

from janus_rt import Janus, ops
from janus_rt.engine import Engine, SamplingParams


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@torch.no_grad()
def test_tiny_forward_triton_equals_torch(device):
    m = Janus.from_preset("tiny", seed=2).to(device)
    cfg = m.cfg
    g = torch.Generator().manual_seed(0)
    n_img = cfg.vision.num_patches
    ids = torch.randint(0, 200, (1, 9), generator=g)
    mm = torch.cat([ids[:, :3], torch.full((1, n_img), cfg.tokens.image_id), ids[:, 3:]], 1).to(device)
    pixels = (torch.rand(1, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g) * 2 - 1).to(device)
    tokens = torch.randint(0, cfg.vq.codebook_size, (1, cfg.num_image_tokens), generator=g).to(device)
    ids = ids.to(device)
    ref = (m.text_logits(mm, pixels), m.image_logits(ids, tokens), m.decode_image_tokens(tokens))
    with ops.use_backend("triton"):
        out = (m.text_logits(mm, pixels), m.image_logits(ids, tokens), m.decode_image_tokens(tokens))
    for o, r in zip(out, ref):
        assert rel(o, r) <= 1e-4


def test_engine_triton_equals_torch(device):
    m = Janus.from_preset("tiny", seed=2).to(device)
    t = m.cfg.tokens
    ids = [t.bos_id] + list(range(20, 37)) + [t.boi_id]  # 19 tokens: the prompt's last block is partly filled
    out = {}
    for backend in ("torch", "triton"):
        eng = Engine.for_requests(m, [(len(ids), 2)], backend=backend)
        eng.record_logits = True
        req = eng.add_image_request(ids, 2, SamplingParams(seed=3), num_tokens=5)
        eng.run()
        out[backend] = req
    assert out["torch"].tokens == out["triton"].tokens
    for (c0, u0), (c1, u1) in zip(out["torch"].logits, out["triton"].logits):
        assert rel(c1, c0) <= 1e-4 and rel(u1, u0) <= 1e-4
