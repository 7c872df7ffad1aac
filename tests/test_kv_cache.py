"""KVCache storage: views alias the one tensor, copy-on-write copies exactly, budget arithmetic."""
import pytest
import torch

from janus_rt import cpu_ops
from janus_rt.engine import kv_cache as kvc
from janus_rt.engine.block_manager import BlockManager
from janus_rt.engine.kv_cache import KVCache

L, N, BS, H, D = 3, 7, 4, 2, 5  # odd sizes


def test_views_alias_the_one_tensor(device):
    cache = KVCache(L, N, BS, H, D, torch.float32, device)
    assert cache.data.shape == (L, 2, N, BS, H, D) and cache.data.is_contiguous()
    assert torch.count_nonzero(cache.data) == 0
    layer_bytes = 2 * N * BS * H * D * 4
    for layer in range(L):
        k, v = cache.k_cache(layer), cache.v_cache(layer)
        assert k.shape == v.shape == (N, BS, H, D) and k.is_contiguous() and v.is_contiguous()
        assert k.data_ptr() == cache.data.data_ptr() + layer * layer_bytes
        assert v.data_ptr() == k.data_ptr() + layer_bytes // 2
        k[2, 1, 0, 3] = 1.0 + layer  # writes through the view land in the one tensor
        v[5, 3, 1, 4] = -1.0 - layer
    assert torch.count_nonzero(cache.data) == 2 * L
    for layer in range(L):
        assert cache.data[layer, 0, 2, 1, 0, 3] == 1.0 + layer and cache.data[layer, 1, 5, 3, 1, 4] == -1.0 - layer
    assert cache.nbytes == L * layer_bytes == N * cache.bytes_per_block


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_copy_blocks_exact(device, dtype):
    cache = KVCache(L, N, BS, H, D, dtype, device)
    cache.data.copy_(torch.randn(cache.data.shape, generator=torch.Generator().manual_seed(0)).to(dtype))
    before = cache.data.clone()
    pairs = [(1, 4), (6, 0), (1, 3)]  # one src may feed several dsts
    cache.copy_blocks(pairs)
    expected = before.clone()
    for src, dst in pairs:
        expected[:, :, dst] = before[:, :, src]
    assert torch.equal(cache.data, expected)  # every layer, K and V; blocks 2, 5 and the srcs untouched
    cache.copy_blocks([(0, 6), (6, 0)])  # all reads before any write: a swap
    assert torch.equal(cache.data[:, :, 6], expected[:, :, 0]) and torch.equal(cache.data[:, :, 0], expected[:, :, 6])
    snapshot = cache.data.clone()
    cache.copy_blocks([])
    for bad in ([(0, N)], [(-1, 2)], [(0, 2), (1, 2)]):
        with pytest.raises(ValueError):
            cache.copy_blocks(bad)
    assert torch.equal(cache.data, snapshot)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_read_and_write_slots(device, dtype):
    """read_slots copies every layer's K and V at some slots out to host memory; write_slots puts them back at
    other slots, bit for bit, touching nothing else."""
    cache = KVCache(L, N, BS, H, D, dtype, device)
    cache.data.copy_(torch.randn(cache.data.shape, generator=torch.Generator().manual_seed(1)).to(dtype))
    src = [3, 4, 17, 2 * BS + 1, 5]  # any order, across blocks
    kv = cache.read_slots(src)
    assert kv.shape == (L, 2, len(src), H, D) and kv.device.type == "cpu" and kv.dtype == dtype
    flat = cache.data.view(L, 2, N * BS, H, D)
    for t, s in enumerate(src):
        assert torch.equal(kv[:, :, t].to(device), flat[:, :, s])
    before = cache.data.clone()
    dst = [(N - 2) * BS + i for i in range(len(src))]  # the last two blocks
    cache.write_slots(dst, kv)
    expected = before.view(L, 2, N * BS, H, D).clone()
    expected[:, :, dst] = kv.to(device)
    assert torch.equal(cache.data.view(L, 2, N * BS, H, D), expected)
    with pytest.raises(ValueError, match="write_slots"):
        cache.write_slots(dst[:-1], kv)


def test_store_then_read_through_block_tables(device):
    """KV written at the block manager's slots reads back per sequence, across a fork and its COW."""
    bm = BlockManager(N, BS)
    cache = KVCache(L, N, BS, H, D, torch.float32, device)
    g = torch.Generator().manual_seed(1)
    kv = {}  # seq -> [T, H, D] keys written so far (values are -keys)

    def write(seq, slots, k):
        for layer in range(L):
            cache.store(layer, torch.tensor(slots, device=device), k + layer, -(k + layer))
        kv[seq] = torch.cat([kv.get(seq, k[:0]), k])

    bm.allocate("p", 6)
    write("p", bm.slots("p"), torch.randn(6, H, D, generator=g).to(device))
    bm.fork("p", "c")
    kv["c"] = kv["p"].clone()
    copies = []
    for seq in ("c", "p", "c"):  # c copies p's shared half-full last block; then each writes its own
        slot, copy = bm.append_slot(seq)
        if copy:
            cache.copy_blocks([copy])
            copies.append(copy)
        write(seq, [slot], torch.randn(1, H, D, generator=g).to(device))
    assert len(copies) == 1
    for seq in ("p", "c"):
        rows = torch.tensor(bm.slots(seq), device=device)
        for layer in range(L):
            assert torch.equal(cache.k_cache(layer).view(-1, H, D)[rows], kv[seq] + layer)
            assert torch.equal(cache.v_cache(layer).view(-1, H, D)[rows], -(kv[seq] + layer))
    with pytest.raises(ValueError):
        cache.store(0, torch.tensor([0], device=device), torch.zeros(1, H, D + 1, device=device),
                    torch.zeros(1, H, D, device=device))


def test_budget_arithmetic(monkeypatch):
    # Janus-Pro-7B, bf16, 16-token blocks: 30 layers * 2 * 16 * 32 heads * 128 * 2 bytes = 7.5 MiB per block
    assert KVCache.block_bytes(30, 16, 32, 128, torch.bfloat16) == 30 * 2 * 16 * 32 * 128 * 2 == 7864320
    per = KVCache.block_bytes(L, BS, H, D, torch.float32)
    assert per == L * 2 * BS * H * D * 4
    assert KVCache.num_blocks_for_budget(per * 5 + per - 1, L, BS, H, D, torch.float32) == 5
    cache = KVCache.from_budget(L, BS, H, D, torch.float32, "cpu", budget_bytes=per * 9)
    assert cache.num_blocks == 9 and cache.bytes_per_block == per and cache.nbytes == 9 * per
    assert KVCache.from_budget(L, BS, H, D, torch.float32, budget_bytes=per * 9, max_num_blocks=4).num_blocks == 4
    with pytest.raises(ValueError, match="holds no block"):
        KVCache.from_budget(L, BS, H, D, torch.float32, budget_bytes=per - 1)
    with pytest.raises(ValueError, match="exactly one"):
        KVCache.from_budget(L, BS, H, D, torch.float32)
    with pytest.raises(ValueError, match="exactly one"):
        KVCache.from_budget(L, BS, H, D, torch.float32, budget_bytes=per, memory_fraction=0.5)
    with pytest.raises(ValueError):
        KVCache.from_budget(L, BS, H, D, torch.float32, memory_fraction=1.5)

    monkeypatch.setattr(kvc, "available_memory", lambda device: per * 10)
    assert KVCache.from_budget(L, BS, H, D, torch.float32, memory_fraction=0.35).num_blocks == 3
    with pytest.raises(ValueError, match="holds no block"):
        KVCache.from_budget(L, BS, H, D, torch.float32, memory_fraction=0.05)


def test_available_memory(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:         1000000 kB\nMemAvailable:   12345678 kB\n")
    assert cpu_ops.meminfo_available(str(meminfo)) == 12345678 * 1024
    meminfo.write_text("MemTotal:       24000000 kB\n")
    with pytest.raises(RuntimeError, match="MemAvailable"):
        cpu_ops.meminfo_available(str(meminfo))
    with pytest.raises(RuntimeError, match="cannot read"):
        cpu_ops.meminfo_available(str(tmp_path / "missing"))
    assert 0 < cpu_ops.available_memory() and 0 < kvc.available_memory("cpu")
    # where /proc/meminfo cannot be read: the packing rule still gets a number, the KV budget says what to pass
    def unreadable(path="/proc/meminfo"):
        raise RuntimeError(f"cannot read free memory from {path}")

    monkeypatch.setattr(cpu_ops, "meminfo_available", unreadable)
    assert cpu_ops.available_memory() > 0
    with pytest.raises(RuntimeError, match="budget_bytes"):
        kvc.available_memory("cpu")
    monkeypatch.undo()
    assert kvc.available_memory("cpu") > 0
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        assert free <= kvc.available_memory("cuda") <= total
    with pytest.raises(ValueError):
        kvc.available_memory("meta")


def test_bad_dims():
    for dims in ((0, N, BS, H, D), (L, N, BS, -1, D), (L, N, 2.0, H, D)):
        with pytest.raises(ValueError):
            KVCache(*dims)
