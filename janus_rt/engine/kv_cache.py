"""Paged-KV storage: one preallocated tensor, handed to each layer as views.

data: [num_layers, 2, num_blocks, block_size, H, D]. k_cache(l) = data[l, 0] and v_cache(l) = data[l, 1] are
contiguous [num_blocks, block_size, H, D] views, so flat slot s = block * block_size + offset (as handed out
by block_manager.BlockManager) is row s of k_cache(l).view(-1, H, D). Which blocks belong to which sequence
is the block manager's business, not this file's.

dtype torch.int8 (`--kv-cache-dtype int8`, CPU): data holds each (token, head) row as int8 and `scales`
[num_layers, 2, num_blocks, block_size, H] fp32 its scale (engine/kv_quant.py), about half the bytes of bf16.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from janus_rt import cpu_ops, ops
from janus_rt.errors import UsageError


def available_memory(device: str | torch.device) -> int:
    """Bytes a new allocation on `device` could use now (CUDA: free + cached by torch; CPU: MemAvailable)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # memory torch's caching allocator reserved but no tensor uses is ours to take too
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            return cpu_ops.meminfo_available()
        except RuntimeError as e:
            raise RuntimeError(f"{e}; pass budget_bytes instead") from e
    raise ValueError(f"cannot measure free memory on {device}; pass budget_bytes instead")


class KVCache:
    """K and V for every layer, in blocks of `block_size` token rows of [num_heads, head_dim].

    Zero-filled, so a kernel that multiplies a masked-out row by 0 never meets stale NaNs.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"):
        self._check_dims(num_layers=num_layers, num_blocks=num_blocks, block_size=block_size,
                         num_heads=num_heads, head_dim=head_dim)
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_heads, self.head_dim = num_heads, head_dim
        # data: [L, 2, N, bs, H, D]; on the CPU in huge pages (every decode step streams the rows it reads)
        shape = (num_layers, 2, num_blocks, block_size, num_heads, head_dim)
        if torch.device(device).type == "cpu":
            self.data = cpu_ops.empty_huge(shape, dtype).zero_()
        else:
            self.data = torch.zeros(shape, dtype=dtype, device=device)
        # int8: each row's fp32 scale, [L, 2, N, bs, H] (None for a float cache)
        self.scales = (torch.zeros(shape[:-1], dtype=torch.float32, device=device) if dtype == torch.int8
                       else None)

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def quantized(self) -> bool:
        """Whether the cache holds int8 rows with scales (else the model-dtype rows themselves)."""
        return self.scales is not None

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block id costs: its K and V rows in every layer."""
        return self.block_bytes(self.num_layers, self.block_size, self.num_heads, self.head_dim, self.dtype)

    @property
    def nbytes(self) -> int:
        extra = 0 if self.scales is None else self.scales.numel() * self.scales.element_size()
        return self.data.numel() * self.data.element_size() + extra

    def k_cache(self, layer: int) -> torch.Tensor:
        """[num_blocks, block_size, H, D] view of layer `layer`'s keys."""
        return self.data[layer, 0]

    def v_cache(self, layer: int) -> torch.Tensor:
        """[num_blocks, block_size, H, D] view of layer `layer`'s values."""
        return self.data[layer, 1]

    def k_scale(self, layer: int) -> torch.Tensor:
        """int8 cache: [num_blocks, block_size, H] fp32 view of layer `layer`'s key scales."""
        return self._scales()[layer, 0]

    def v_scale(self, layer: int) -> torch.Tensor:
        """int8 cache: [num_blocks, block_size, H] fp32 view of layer `layer`'s value scales."""
        return self._scales()[layer, 1]

    def _scales(self) -> torch.Tensor:
        if self.scales is None:
            raise ValueError(f"a {self.dtype} KV cache has no scales (only an int8 cache does)")
        return self.scales

    def copy_blocks(self, pairs: Iterable[tuple[int, int]]) -> None:
        """Copy-on-write: for each (src, dst), block dst := block src in every layer, K and V.

        All reads happen before any write. dst ids must be distinct.
        """
        pairs = list(pairs)
        if not pairs:
            return
        src, dst = (list(ids) for ids in zip(*pairs))
        for b in src + dst:
            if not 0 <= b < self.num_blocks:
                raise ValueError(f"copy_blocks: block {b} out of range [0, {self.num_blocks})")
        if len(set(dst)) != len(dst):
            raise ValueError(f"copy_blocks: a destination block appears more than once in {pairs}")
        src_t = torch.tensor(src, dtype=torch.long, device=self.device)
        dst_t = torch.tensor(dst, dtype=torch.long, device=self.device)
        self.data.index_copy_(2, dst_t, self.data.index_select(2, src_t))
        if self.scales is not None:
            self.scales.index_copy_(2, dst_t, self.scales.index_select(2, src_t))

    def _by_slot(self) -> torch.Tensor:
        """data as [L, 2, num_blocks * block_size, H, D]: dimension 2 indexed by flat slot."""
        return self.data.view(self.num_layers, 2, self.num_blocks * self.block_size, self.num_heads, self.head_dim)

    def _scales_by_slot(self) -> torch.Tensor:
        return self._scales().view(self.num_layers, 2, self.num_blocks * self.block_size, self.num_heads)

    def read_slots(self, slots: list[int]) -> torch.Tensor:
        """K and V of every layer at these flat slots, copied out to host memory: [L, 2, T, H, D] (a preempted
        sequence's cache, kept while its blocks serve others; write_slots puts it back). An int8 cache gives
        int8 [L, 2, T, H, D + 4]: each head's D values, then its fp32 scale's 4 bytes (exact both ways)."""
        idx = torch.tensor(slots, dtype=torch.long, device=self.device)
        kv = self._by_slot().index_select(2, idx)
        if self.scales is not None:
            sc = self._scales_by_slot().index_select(2, idx).contiguous()  # [L, 2, T, H]
            kv = torch.cat([kv, sc[..., None].view(torch.int8)], dim=-1)
        return kv.cpu()

    def write_slots(self, slots: list[int], kv: torch.Tensor) -> None:
        """The inverse of read_slots: every layer's K and V at these flat slots := kv [L, 2, T, H, D] (int8
        cache: [L, 2, T, H, D + 4] as read_slots gives)."""
        width = self.head_dim + (4 if self.scales is not None else 0)
        shape = (self.num_layers, 2, len(slots), self.num_heads, width)
        if tuple(kv.shape) != shape or (self.scales is not None and kv.dtype != torch.int8):
            raise ValueError(f"write_slots: kv {list(shape)} expected, got {list(kv.shape)} {kv.dtype}")
        idx = torch.tensor(slots, dtype=torch.long, device=self.device)
        kv = kv.to(device=self.device)
        if self.scales is not None:
            sc = kv[..., self.head_dim:].contiguous().view(torch.float32)[..., 0]  # [L, 2, T, H]
            self._scales_by_slot().index_copy_(2, idx, sc)
            kv = kv[..., :self.head_dim]
        self._by_slot().index_copy_(2, idx, kv.to(dtype=self.dtype))

    def store(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Plain-PyTorch KV write: row slots[t] of layer `layer` := k[t], v[t].

        slots: [T] int64 flat slots; k, v: [T, H, D] in the cache's dtype, on its device (an int8 cache: in the
        model's dtype, quantized here by ops.quantize_kv; slots < 0 write nothing, as ops.kv_store).
        """
        shape = (slots.shape[0], self.num_heads, self.head_dim)
        if slots.dim() != 1 or k.shape != shape or v.shape != shape:
            raise ValueError(f"store: slots [T], k and v {list(shape)} expected; got slots {list(slots.shape)}, "
                             f"k {list(k.shape)}, v {list(v.shape)}")
        rows = self.num_blocks * self.block_size
        if self.scales is not None:
            keep = (slots >= 0) & (slots < rows)
            slots, k, v = slots[keep], k[keep], v[keep]
            for i, x in ((0, k), (1, v)):
                q, sc = ops.quantize_kv(x)
                self.data[layer, i].view(rows, self.num_heads, self.head_dim).index_copy_(0, slots, q)
                self.scales[layer, i].view(rows, self.num_heads).index_copy_(0, slots, sc)
            return
        self.k_cache(layer).view(rows, self.num_heads, self.head_dim).index_copy_(0, slots, k)
        self.v_cache(layer).view(rows, self.num_heads, self.head_dim).index_copy_(0, slots, v)

    @staticmethod
    def block_bytes(num_layers: int, block_size: int, num_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes per block: num_layers * 2 (K, V) * block_size * num_heads * head_dim * itemsize (int8: + a 4-byte
        scale per head)."""
        per_head = head_dim + 4 if dtype == torch.int8 else head_dim * dtype.itemsize
        return num_layers * 2 * block_size * num_heads * per_head

    @classmethod
    def num_blocks_for_budget(cls, budget_bytes: int, num_layers: int, block_size: int, num_heads: int,
                              head_dim: int, dtype: torch.dtype) -> int:
        """How many whole blocks fit in `budget_bytes`; ValueError if not even one does."""
        per_block = cls.block_bytes(num_layers, block_size, num_heads, head_dim, dtype)
        num_blocks = int(budget_bytes) // per_block
        if num_blocks < 1:
            raise UsageError(
                f"KV cache budget of {int(budget_bytes)} bytes holds no block: one block of {block_size} tokens "
                f"takes {per_block} bytes ({num_layers} layers x K,V x {num_heads} heads x {head_dim} x {dtype})"
            )
        return num_blocks

    @classmethod
    def from_budget(cls, num_layers: int, block_size: int, num_heads: int, head_dim: int,
                    dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu", *,
                    budget_bytes: int | None = None, memory_fraction: float | None = None,
                    max_num_blocks: int | None = None) -> KVCache:
        """A cache with as many blocks as fit in `budget_bytes`, or in `memory_fraction` of the memory now
        available on `device` (exactly one of the two), capped at `max_num_blocks` if given."""
        if (budget_bytes is None) == (memory_fraction is None):
            raise ValueError("from_budget: pass exactly one of budget_bytes and memory_fraction")
        if memory_fraction is not None:
            if not 0.0 < memory_fraction <= 1.0:
                raise UsageError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
            budget_bytes = int(available_memory(device) * memory_fraction)
        elif budget_bytes < 0:
            raise UsageError(f"budget_bytes must be >= 0, got {budget_bytes}")
        num_blocks = cls.num_blocks_for_budget(budget_bytes, num_layers, block_size, num_heads, head_dim, dtype)
        if max_num_blocks is not None:
            if max_num_blocks < 1:
                raise ValueError(f"max_num_blocks must be >= 1, got {max_num_blocks}")
            num_blocks = min(num_blocks, max_num_blocks)
        if memory_fraction is None:  # a budget asked for: said plainly where it cannot fit, not by the allocator
            nbytes = num_blocks * cls.block_bytes(num_layers, block_size, num_heads, head_dim, dtype)
            try:
                free = available_memory(device)
            except (RuntimeError, ValueError):
                free = None
            if free is not None and nbytes > free:
                raise UsageError(f"a KV cache of {nbytes / 2**30:.3g} GiB does not fit: {free / 2**30:.3g} GiB "
                                 f"available on {device}")
        return cls(num_layers, num_blocks, block_size, num_heads, head_dim, dtype, device)

    @staticmethod
    def _check_dims(**dims: int) -> None:
        for name, value in dims.items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")

    def __repr__(self) -> str:
        return (f"KVCache(layers={self.num_layers}, blocks={self.num_blocks}, block_size={self.block_size}, "
                f"heads={self.num_heads}, head_dim={self.head_dim}, dtype={self.dtype}, device={self.device}, "
                f"{self.nbytes / 2**30:.2f} GiB)")
