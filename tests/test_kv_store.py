"""kv_store: an exact copy into the paged cache; skipped slots stay untouched."""
import pytest
import torch

from janus_rt import kernels as K
from janus_rt.kernels.kv_store import kv_store_ref


def case(n, heads, head_dim, num_blocks, block_size, device, dtype, slot_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(n, 2, heads, head_dim, generator=g).to(device, dtype)  # k, v as strided views
    slots = torch.randperm(num_blocks * block_size, generator=g)[:n]
    slots[::5] = -1                              # padding tokens
    slots[3] = num_blocks * block_size + 7       # past the end: skipped too
    slots[4:5] = num_blocks * block_size         # the first slot past the end: skipped as well (where n > 4)
    # each cache a view of a buffer one block longer: a write past the cache's end lands in that guard block
    caches = [torch.randn(num_blocks + 1, block_size, heads, head_dim, generator=g).to(device, dtype)[:num_blocks]
              for _ in range(2)]
    return kv[:, 0], kv[:, 1], caches, slots.to(device, slot_dtype)


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype,heads,head_dim,block_size", [
    (torch.float32, 3, 64, 16), (torch.bfloat16, 5, 48, 32), (torch.float16, 1, 128, 16), (torch.bfloat16, 16, 128, 32),
])
def test_exact(dtype, heads, head_dim, block_size, slot_dtype, device):
    k, v, (k_cache, v_cache), slots = case(37, heads, head_dim, 6, block_size, device, dtype, slot_dtype)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    guard_k, guard_v = k_cache._base[-1].clone(), v_cache._base[-1].clone()
    want_k, want_v = k_cache.clone(), v_cache.clone()
    kv_store_ref(k, v, want_k, want_v, slots)
    assert K.kv_store(k, v, k_cache, v_cache, slots) is None
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    # the test can fail: rows were written, and every other slot kept its old value
    written = torch.zeros(k_cache.shape[:2], dtype=torch.bool, device=device).view(-1)
    valid = slots[(slots >= 0) & (slots < written.numel())].long()
    written[valid] = True
    written = written.view(k_cache.shape[:2])
    assert valid.numel() > 0 and not torch.equal(k_cache[written], before_k[written])
    assert torch.equal(k_cache[~written], before_k[~written]) and torch.equal(v_cache[~written], before_v[~written])
    for cache, guard in ((k_cache, guard_k), (v_cache, guard_v)):
        assert torch.equal(cache._base[-1], guard)  # nothing past the end


def test_empty_is_noop(device):
    k, v, (k_cache, v_cache), _ = case(4, 2, 64, 2, 16, device, torch.float32, torch.int32)
    before = k_cache.clone()
    K.kv_store(k[:0], v[:0], k_cache, v_cache, torch.empty(0, dtype=torch.int32, device=device))
    assert torch.equal(k_cache, before)


def test_misuse_raises(device):
    k, v, (k_cache, v_cache), slots = case(6, 2, 64, 2, 16, device, torch.float32, torch.int32)
    bad = [
        lambda: K.kv_store(k.half(), v.half(), k_cache, v_cache, slots),      # cache dtype differs
        lambda: K.kv_store(k, v, k_cache, v_cache, slots.float()),            # float slots
        lambda: K.kv_store(k, v, k_cache, v_cache, slots[:3]),                # one slot per row
        lambda: K.kv_store(k[0], v[0], k_cache, v_cache, slots),              # k not 3-D
        lambda: K.kv_store(k, v, k_cache[:, :, :1], v_cache[:, :, :1], slots),  # heads differ
        lambda: K.kv_store(k, v[:, :1], k_cache, v_cache, slots),             # k/v shapes differ
    ]
    for i, call in enumerate(bad):
        with pytest.raises(ValueError):
            call()
            pytest.fail(f"case {i} did not raise")
