"""Paged-KV bookkeeping: which cache blocks each sequence holds. Pure Python, no tensors.

Token i of a sequence lives in block `table[i // block_size]` at offset `i % block_size`, i.e. at flat slot
`block * block_size + offset` of the [num_blocks * block_size] rows that kv_cache.KVCache stores per layer.

Sharing: `fork` hands a child the parent's blocks (ref counts + 1), so the n images of one prompt hold the
conditional prompt's KV once and the n unconditional rows the unconditional prompt's once. Shared blocks are
only read. A sequence appending into a shared, partly filled last block first gets a block of its own and the
caller copies the src block's rows into it (copy-on-write); the last holder left writes in place. So n forks of
a prompt cost the prompt's blocks once plus at most one copied block per fork, and nothing at all when the
prompt's last block is full.

Runs: `reserve` sets free blocks aside for a sequence that will grow to a known length (an image row: its prompt plus
576 tokens), a run of adjacent block ids taken in order by its appends, so the row's K/V lie in one piece of the pool
instead of interleaved with the other rows' (which grow in step and would otherwise take turns at the free list).
On the 2-core Xeon the CPU's paged attention read such rows ~4 % faster, and a whole 1B n = 16 decode step took
165.2 instead of 171.0 ms (bench/RESULTS.md, 2026-12-04). Set-aside blocks still count as free: any
sequence takes them when no other block is free, so a reservation never refuses or delays anything.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable
from typing import NamedTuple

SeqId = Hashable


class OutOfBlocks(RuntimeError):
    """Not enough free blocks; the manager's state is unchanged."""


class UnknownSequence(KeyError):
    """The seq id has no block table (never allocated, or already freed)."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


class DuplicateSequence(ValueError):
    """The seq id already has a block table."""


class AppendCost(NamedTuple):
    """What appending one token to each of some sequences takes from the free list."""

    num_blocks: int  # free blocks taken: fresh blocks plus copy-on-write destinations
    num_copies: int  # how many of them are copy-on-write copies


class BlockManager:
    """Free list, reference counts and per-sequence block tables over `num_blocks` blocks of `block_size`."""

    def __init__(self, num_blocks: int, block_size: int):
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))  # free blocks not set aside
        self._kept: dict[SeqId, deque[int]] = {}  # free blocks set aside for a sequence's appends (reserve)
        self._num_kept = 0
        self._ref: list[int] = [0] * num_blocks
        self._tables: dict[SeqId, list[int]] = {}
        self._num_tokens: dict[SeqId, int] = {}

    # ---- queries ----

    @property
    def num_free_blocks(self) -> int:
        """Blocks held by no sequence (set-aside ones included: they are taken when nothing else is free)."""
        return len(self._free) + self._num_kept

    @property
    def num_sequences(self) -> int:
        return len(self._tables)

    def __contains__(self, seq_id: SeqId) -> bool:
        return seq_id in self._tables

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold `num_tokens` tokens: ceil(num_tokens / block_size)."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return -(-num_tokens // self.block_size)

    def block_table(self, seq_id: SeqId) -> list[int]:
        """A copy of the sequence's block table: [blocks_needed(num_tokens(seq_id))] block ids."""
        return list(self._table(seq_id))

    def num_tokens(self, seq_id: SeqId) -> int:
        self._table(seq_id)
        return self._num_tokens[seq_id]

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    def slots(self, seq_id: SeqId, start: int = 0, end: int | None = None) -> list[int]:
        """Flat slots (block * block_size + offset) of the sequence's tokens [start, end)."""
        table, n, bs = self._table(seq_id), self._num_tokens[seq_id], self.block_size
        end = n if end is None else end
        if not 0 <= start <= end <= n:
            raise ValueError(f"token range [{start}, {end}) is outside sequence {seq_id!r} of {n} tokens")
        return [table[i // bs] * bs + i % bs for i in range(start, end)]

    # ---- allocate / fork / free ----

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) <= self.num_free_blocks

    def allocate(self, seq_id: SeqId, num_tokens: int) -> list[int]:
        """Give a new sequence fresh blocks for `num_tokens` tokens; returns its block table."""
        if seq_id in self._tables:
            raise DuplicateSequence(f"sequence {seq_id!r} is already allocated")
        need = self.blocks_needed(num_tokens)
        if need > self.num_free_blocks:
            raise OutOfBlocks(
                f"sequence {seq_id!r} needs {need} blocks for {num_tokens} tokens; "
                f"{self.num_free_blocks} of {self.num_blocks} are free"
            )
        self._tables[seq_id] = [self._take() for _ in range(need)]
        self._num_tokens[seq_id] = num_tokens
        return list(self._tables[seq_id])

    def fork(self, parent_id: SeqId, child_id: SeqId) -> list[int]:
        """Make `child_id` share every block (and the token count) of `parent_id`; takes no free block."""
        table = self._table(parent_id)
        if child_id in self._tables:
            raise DuplicateSequence(f"sequence {child_id!r} is already allocated")
        for block in table:
            self._ref[block] += 1
        self._tables[child_id] = list(table)
        self._num_tokens[child_id] = self._num_tokens[parent_id]
        return list(table)

    def free(self, seq_id: SeqId) -> int:
        """Drop the sequence; blocks whose ref count reaches 0 return to the free list. Returns how many did."""
        table = self._table(seq_id)
        del self._tables[seq_id], self._num_tokens[seq_id]
        self._unkeep(seq_id)
        released = 0
        for block in reversed(table):
            self._ref[block] -= 1
            if self._ref[block] == 0:
                self._free.append(block)
                released += 1
        return released

    def reserve(self, seq_id: SeqId, num_tokens: int) -> int:
        """Set aside a run of adjacent free blocks for the sequence's appends up to `num_tokens` tokens (replacing an
        earlier reservation of it). Returns how many blocks were set aside: 0 when it needs fewer than 2 more, or no
        run of free blocks is long enough. Takes nothing from what is free (see the top)."""
        return self.reserve_all([(seq_id, num_tokens)])[0]

    def reserve_all(self, items: Iterable[tuple[SeqId, int]]) -> list[int]:
        """reserve for each (seq_id, num_tokens) in turn, in one pass over the free list (an image request's rows at
        once: sorting the free ids per row cost ~50 ms for 32 rows of a 40 000-block pool). Each sequence gets the
        next run long enough after the previous one's, in ascending block ids."""
        items = list(items)
        needs = []
        for seq_id, num_tokens in items:
            table = self._table(seq_id)
            self._unkeep(seq_id)
            n = self._num_tokens[seq_id]
            cow = n % self.block_size != 0 and self._ref[table[-1]] > 1  # its first append copies a shared block
            need = self.blocks_needed(max(num_tokens, n)) - len(table) + cow
            needs.append(need if need >= 2 else 0)
        got = [0] * len(items)
        if not any(needs):
            return got
        runs = self._free_runs()
        ri, pos, kept = 0, runs[0][0] if runs else 0, set()
        for i, ((seq_id, _), need) in enumerate(zip(items, needs)):
            if need == 0:
                continue
            while ri < len(runs) and runs[ri][1] - pos < need:  # the rest of this run is too short
                ri += 1
                pos = runs[ri][0] if ri < len(runs) else 0
            if ri == len(runs):
                break
            self._kept[seq_id] = deque(range(pos, pos + need))
            kept.update(range(pos, pos + need))
            self._num_kept += need
            got[i], pos = need, pos + need
        if kept:
            self._free = deque(b for b in self._free if b not in kept)
        return got

    # ---- append ----

    def append_cost(self, seq_ids: Iterable[SeqId]) -> AppendCost:
        """Free blocks (and copy-on-write copies) that appending one token to each sequence would take."""
        seq_ids = list(seq_ids)
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError("append_cost: a sequence appears more than once")
        num_fresh = 0
        sharers: dict[int, int] = {}  # shared, partly filled last block -> how many of seq_ids append into it
        for seq_id in seq_ids:
            table = self._table(seq_id)
            if self._num_tokens[seq_id] % self.block_size == 0:
                num_fresh += 1
            elif self._ref[table[-1]] > 1:
                sharers[table[-1]] = sharers.get(table[-1], 0) + 1
        # Each copy drops the block's ref count by one, so when all r holders append, the last writes in place.
        num_copies = sum(min(k, self._ref[block] - 1) for block, k in sharers.items())
        return AppendCost(num_fresh + num_copies, num_copies)

    def can_append(self, seq_id: SeqId) -> bool:
        return self.append_cost([seq_id]).num_blocks <= self.num_free_blocks

    def can_append_all(self, seq_ids: Iterable[SeqId]) -> bool:
        """Whether one token can be appended to every sequence in `seq_ids` (distinct ids)."""
        seq_ids = list(seq_ids)
        return self._surely_fits(seq_ids) or self.append_cost(seq_ids).num_blocks <= self.num_free_blocks

    def append_slot(self, seq_id: SeqId) -> tuple[int, tuple[int, int] | None]:
        """Reserve room for one more token of the sequence.

        Returns (slot, copy): the new token's K/V goes to flat slot `slot`; `copy` is None, or (src, dst) when
        the last block was shared and partly filled, and the caller must copy block src's rows into block dst
        (all layers, K and V) before writing the slot.
        """
        table = self._table(seq_id)
        n = self._num_tokens[seq_id]
        offset = n % self.block_size
        copy = None
        if offset == 0:  # no block yet, or the last one is full
            block = self._take(seq_id)
            table.append(block)
        elif self._ref[table[-1]] > 1:  # shared and partly filled: copy on write
            src = table[-1]
            block = self._take(seq_id)
            self._ref[src] -= 1
            table[-1] = block
            copy = (src, block)
        else:
            block = table[-1]
        self._num_tokens[seq_id] = n + 1
        return block * self.block_size + offset, copy

    def append_slots(self, seq_ids: Iterable[SeqId]) -> tuple[list[int], list[tuple[int, int]]]:
        """append_slot for each sequence, all or nothing. Returns ([len(seq_ids)] slots, copy pairs)."""
        seq_ids = list(seq_ids)
        need = 0 if self._surely_fits(seq_ids) else self.append_cost(seq_ids).num_blocks
        if need > self.num_free_blocks:
            raise OutOfBlocks(
                f"appending to {len(seq_ids)} sequences needs {need} blocks; "
                f"{self.num_free_blocks} of {self.num_blocks} are free"
            )
        slots, copies = [], []
        for seq_id in seq_ids:
            slot, copy = self.append_slot(seq_id)
            slots.append(slot)
            if copy is not None:
                copies.append(copy)
        return slots, copies

    # ---- internals ----

    def _surely_fits(self, seq_ids: list[SeqId]) -> bool:
        """Whether one token surely fits for each of seq_ids without counting: as many free blocks as sequences (each
        takes at most one, a fresh one or a copy), all of them known and distinct. Otherwise callers count exactly
        with append_cost, which also refuses unknown or repeated ids before anything changes."""
        return (len(seq_ids) <= self.num_free_blocks and len(set(seq_ids)) == len(seq_ids)
                and all(s in self._tables for s in seq_ids))

    def _table(self, seq_id: SeqId) -> list[int]:
        try:
            return self._tables[seq_id]
        except KeyError:
            raise UnknownSequence(f"unknown sequence {seq_id!r}") from None

    def _take(self, seq_id: SeqId = None) -> int:
        """A free block for seq_id (None: for a new sequence): the next of its run if it has one, else a block no
        one set aside, else the last of the longest run set aside for another."""
        owner = seq_id if seq_id is not None and self._kept.get(seq_id) else None
        if owner is None and not self._free and self._num_kept:
            owner = max(self._kept, key=lambda s: len(self._kept[s]))
        if owner is not None:
            kept = self._kept[owner]
            block = kept.popleft() if owner == seq_id else kept.pop()
            self._num_kept -= 1
            if not kept:
                del self._kept[owner]
        elif self._free:
            block = self._free.popleft()
        else:
            raise OutOfBlocks(f"all {self.num_blocks} blocks are in use")
        self._ref[block] = 1
        return block

    def _unkeep(self, seq_id: SeqId) -> None:
        """Return the sequence's set-aside blocks to the free list."""
        kept = self._kept.pop(seq_id, None)
        if kept:
            self._free.extend(kept)
            self._num_kept -= len(kept)

    def _free_runs(self) -> list[tuple[int, int]]:
        """The maximal runs of adjacent ids among the free blocks not set aside: [(first, end)] in ascending order."""
        runs: list[tuple[int, int]] = []
        for b in sorted(self._free):
            if runs and runs[-1][1] == b:
                runs[-1] = (runs[-1][0], b + 1)
            else:
                runs.append((b, b + 1))
        return runs

    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent (tests call this after every operation)."""

        def require(cond: bool, msg: str) -> None:
            if not cond:
                raise AssertionError(msg)

        kept = [b for run in self._kept.values() for b in run]
        free = set(self._free) | set(kept)
        require(len(free) == len(self._free) + len(kept), "a block is on the free list twice")
        require(len(kept) == self._num_kept and all(self._kept.values()), "set-aside blocks miscounted")
        require(all(s in self._tables for s in self._kept), "blocks set aside for a sequence that is gone")
        require(all(0 <= b < self.num_blocks for b in free), "a free-list entry is not a block id")
        require(all(self._ref[b] == 0 for b in free), "a block on the free list has a nonzero ref count")
        require(self._tables.keys() == self._num_tokens.keys(), "block tables and token counts disagree")

        holders = [0] * self.num_blocks
        fill: dict[int, int] = {}  # block -> tokens in it, which every holder must agree on
        for seq_id, table in self._tables.items():
            n = self._num_tokens[seq_id]
            require(n >= 0, f"sequence {seq_id!r} has {n} tokens")
            require(len(table) == self.blocks_needed(n), f"sequence {seq_id!r}: {len(table)} blocks for {n} tokens")
            require(len(set(table)) == len(table), f"sequence {seq_id!r} holds a block twice")
            for i, block in enumerate(table):
                require(0 <= block < self.num_blocks, f"sequence {seq_id!r} holds non-block {block}")
                holders[block] += 1
                used = min(self.block_size, n - i * self.block_size)
                require(fill.setdefault(block, used) == used, f"holders of shared block {block} disagree on its fill")
        for block in range(self.num_blocks):
            require(self._ref[block] == holders[block],
                    f"block {block}: ref count {self._ref[block]} but {holders[block]} holders")
            require((block in free) == (holders[block] == 0), f"block {block} leaked or freed while in use")
