"""rope_kv_store (RoPE + the KV store of a decode step in one launch) vs rope + kv_store (the launches it replaces,
bit for bit) and vs its PyTorch reference; padding and out-of-range slots; the engine's decode on it."""
import pytest
import torch

from janus_rt import kernels as K
from janus_rt.kernels.rope_kv_store import rope_kv_store_ref
from tolerances import assert_matches

pytestmark = pytest.mark.usefixtures("poison")


def case(N, Hq, Hk, D, dtype, device, blocks=6, block_size=4, seed=0):
    """q, k, v as views of one qkv buffer (rows at its stride), positions, caches full of noise, and slots: distinct,
    one padding row (-1) and two past the cache (one just past its end) where N allows."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(N, (Hq + 2 * Hk) * D, generator=g).to(device, dtype)
    q = qkv[:, :Hq * D].view(N, Hq, D)
    k = qkv[:, Hq * D:(Hq + Hk) * D].view(N, Hk, D)
    v = qkv[:, (Hq + Hk) * D:].view(N, Hk, D)
    pos = torch.randint(0, 4096, (N,), generator=g).to(device)
    cache = torch.randn(2, blocks, block_size, Hk, D, generator=g).to(device, dtype)
    slots = torch.randperm(blocks * block_size, generator=g)[:N]
    if N >= 3:
        slots[1], slots[2] = -1, blocks * block_size + 5
    if N >= 5:
        slots[3] = blocks * block_size  # the first slot past the end (a write there would land in the V cache)
    return q, k, v, pos, cache, slots.to(device)


@pytest.mark.parametrize("N,Hq,Hk,D", [(1, 2, 2, 64), (5, 4, 2, 48), (9, 16, 16, 128), (3, 3, 1, 6)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_rope_then_kv_store(device, N, Hq, Hk, D, dtype):
    q, k, v, pos, cache, slots = case(N, Hq, Hk, D, dtype, device)
    fused, split = cache.clone(), cache.clone()
    q_out = K.rope_kv_store(q, k, v, pos, 10000.0, fused[0], fused[1], slots)
    q_rot, k_rot = K.rope(q, k, pos, 10000.0)
    K.kv_store(k_rot, v, split[0], split[1], slots)
    assert q_out.shape == q.shape and q_out.is_contiguous()
    assert torch.equal(q_out, q_rot) and torch.equal(fused, split)
    # and against the plain PyTorch reference (the suite's tolerance rule), cache rows included
    ref_lp, ref32 = cache.clone(), cache.float().clone()
    q_lp = rope_kv_store_ref(q, k, v, pos, 10000.0, ref_lp[0], ref_lp[1], slots)
    q32 = rope_kv_store_ref(q.float(), k.float(), v.float(), pos, 10000.0, ref32[0], ref32[1], slots)
    assert_matches(q_out, q_lp, q32, "q_out")
    assert_matches(fused, ref_lp, ref32, "caches")
    if N >= 3:  # the padding row and the one past the cache wrote nothing: rows of other slots only changed
        untouched = torch.ones(cache.shape[1] * cache.shape[2], dtype=torch.bool)
        untouched[slots[slots >= 0][slots[slots >= 0] < untouched.numel()].cpu()] = False
        flat = lambda t: t.reshape(2, -1, Hk, D)[:, untouched.to(t.device)]
        assert torch.equal(flat(fused), flat(cache))


def test_misuse_raises(device):
    q, k, v, pos, cache, slots = case(4, 2, 2, 8, torch.float32, device)
    for bad in (lambda: K.rope_kv_store(q.half(), k, v, pos, 1e4, cache[0], cache[1], slots),      # dtypes differ
                lambda: K.rope_kv_store(q, k, v, pos[:3], 1e4, cache[0], cache[1], slots),         # positions short
                lambda: K.rope_kv_store(q, k, v, pos, 1e4, cache[0], cache[1], slots[:3]),         # slots short
                lambda: K.rope_kv_store(q[..., :7], k[..., :7], v[..., :7], pos, 1e4, cache[0, ..., :7],
                                        cache[1, ..., :7], slots),                                  # odd head_dim
                lambda: K.rope_kv_store(q, k, v, pos, 0.0, cache[0], cache[1], slots)):            # theta
        with pytest.raises(ValueError):
            bad()
