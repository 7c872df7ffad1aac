"""Tests' paged caches: the same per-sequence rows laid out in blocks of any size."""
import math

import torch


def paged_layout(rows, block_size, generator, spare_columns=0):
    """Per-sequence token rows [n_b, ...] -> (a paged cache [num_blocks, block_size, ...] holding them in blocks
    shuffled by `generator`, its block table int32 [B, max_blocks + spare_columns]); unused table entries are 0."""
    need = [max(1, math.ceil(len(r) / block_size)) for r in rows]
    width, num_blocks = max(need) + spare_columns, sum(need) + 2
    order = torch.randperm(num_blocks, generator=generator).int()
    cache = torch.zeros(num_blocks, block_size, *rows[0].shape[1:], dtype=rows[0].dtype)
    tables = torch.zeros(len(rows), width, dtype=torch.int32)
    used = 0
    for b, r in enumerate(rows):
        tables[b, : need[b]] = order[used : used + need[b]]
        used += need[b]
        for t in range(len(r)):
            cache[tables[b, t // block_size], t % block_size] = r[t]
    return cache, tables
