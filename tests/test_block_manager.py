"""BlockManager bookkeeping, without tensors: a Python list stands in for the KV cache's slots."""
import importlib.util
import random
import sys

import pytest

from janus_rt.engine.block_manager import (AppendCost, BlockManager, DuplicateSequence, OutOfBlocks,
                                           UnknownSequence)


def snapshot(bm: BlockManager):
    return (list(bm._free), list(bm._ref), {k: list(v) for k, v in bm._tables.items()}, dict(bm._num_tokens),
            {k: list(v) for k, v in bm._kept.items()})


class ShadowCache:
    """Slot storage plus each sequence's token history: reading a sequence's slots must give its history."""

    def __init__(self, bm: BlockManager):
        self.bm = bm
        self.slots = [None] * (bm.num_blocks * bm.block_size)
        self.history: dict = {}
        self.next_token = 0

    def _token(self):
        self.next_token += 1
        return self.next_token

    def allocate(self, seq_id, n):
        self.bm.allocate(seq_id, n)
        self.history[seq_id] = [self._token() for _ in range(n)]
        for slot, tok in zip(self.bm.slots(seq_id), self.history[seq_id]):
            self.slots[slot] = tok

    def fork(self, parent, child):
        self.bm.fork(parent, child)
        self.history[child] = list(self.history[parent])

    def apply_copy(self, copy):
        bs = self.bm.block_size
        src, dst = copy
        self.slots[dst * bs:(dst + 1) * bs] = self.slots[src * bs:(src + 1) * bs]

    def write(self, seq_id, slot):
        tok = self._token()
        self.slots[slot] = tok
        self.history[seq_id].append(tok)

    def free(self, seq_id):
        self.bm.free(seq_id)
        del self.history[seq_id]

    def verify(self):
        self.bm.check_invariants()
        assert set(self.history) == set(self.bm._tables)
        for seq_id, hist in self.history.items():
            assert [self.slots[s] for s in self.bm.slots(seq_id)] == hist, f"sequence {seq_id} reads wrong KV"


def test_imports_without_torch(monkeypatch):
    import janus_rt.engine.block_manager as module

    monkeypatch.setitem(sys.modules, "torch", None)  # any `import torch` now raises ImportError
    spec = importlib.util.spec_from_file_location("block_manager_no_torch", module.__file__)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_blocks_needed_and_allocate():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert [bm.blocks_needed(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    table = bm.allocate("a", 10)
    assert len(table) == 3 and bm.num_free_blocks == 5 and bm.num_tokens("a") == 10
    assert bm.block_table("a") == table
    assert bm.slots("a") == [table[i // 4] * 4 + i % 4 for i in range(10)]
    assert bm.slots("a", 4, 6) == [table[1] * 4, table[1] * 4 + 1]
    bm.block_table("a").append(99)  # a copy: mutating it must not touch the manager
    bm.check_invariants()
    assert bm.allocate("empty", 0) == [] and bm.can_append("empty")
    slot, copy = bm.append_slot("empty")
    assert copy is None and bm.num_tokens("empty") == 1 and bm.num_free_blocks == 4
    assert bm.free("a") == 3 and bm.free("empty") == 1
    assert bm.num_free_blocks == 8 and all(bm.ref_count(b) == 0 for b in range(8))
    bm.check_invariants()


def test_fork_full_last_block_copies_nothing():
    bm = BlockManager(num_blocks=32, block_size=4)
    prompt = bm.allocate("p", 8)  # 2 full blocks
    children = [f"c{i}" for i in range(4)]
    for c in children:
        assert bm.fork("p", c) == prompt
    assert all(bm.ref_count(b) == 5 for b in prompt)
    assert bm.free("p") == 0
    assert bm.append_cost(children) == AppendCost(num_blocks=4, num_copies=0)
    for c in children:
        slot, copy = bm.append_slot(c)
        assert copy is None and slot % 4 == 0 and slot // 4 not in prompt
        assert bm.block_table(c)[:2] == prompt
    assert 32 - bm.num_free_blocks == 2 + 4  # prompt once + one new block each
    bm.check_invariants()


@pytest.mark.parametrize("keep_parent", [False, True])
def test_fork_partial_last_block_copies_once_per_child(keep_parent):
    bs, n = 4, 4
    bm = BlockManager(num_blocks=64, block_size=bs)
    # Janus CFG: the conditional and unconditional prompt (same length), n image rows forked from each
    rows = {}
    for prompt in ("cond", "uncond"):
        table = bm.allocate(prompt, 10)  # 3 blocks, the last holding 2 tokens
        forks = [f"{prompt}{i}" for i in range(n - 1 if keep_parent else n)]
        for f in forks:
            bm.fork(prompt, f)
        if not keep_parent:
            bm.free(prompt)
        rows[prompt] = ([prompt] if keep_parent else []) + forks, table
    assert 64 - bm.num_free_blocks == 2 * 3  # 2 prompts, not 2n
    all_rows = rows["cond"][0] + rows["uncond"][0]
    assert bm.append_cost(all_rows) == AppendCost(2 * (n - 1), 2 * (n - 1))
    assert bm.append_cost(rows["cond"][0][:2]) == AppendCost(2, 2)  # partial subset: each copies
    for prompt, (seqs, table) in rows.items():
        copies = []
        for i, s in enumerate(seqs):
            slot, copy = bm.append_slot(s)
            if i < n - 1:
                assert copy is not None and copy[0] == table[-1] and copy[1] not in table
                assert slot == copy[1] * bs + 2 and bm.block_table(s) == table[:2] + [copy[1]]
                copies.append(copy)
            else:  # the last holder owns the original block now and writes in place
                assert copy is None and slot == table[-1] * bs + 2 and bm.block_table(s) == table
        assert len({d for _, d in copies}) == n - 1
        for s in seqs:  # the block is now private: no more copies
            assert bm.append_slot(s)[1] is None
    assert 64 - bm.num_free_blocks == 2 * 3 + 2 * (n - 1)
    bm.check_invariants()
    for s in all_rows:
        bm.free(s)
    assert bm.num_free_blocks == 64 and all(bm.ref_count(b) == 0 for b in range(64))
    bm.check_invariants()


def test_out_of_blocks_leaves_state_unchanged():
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.allocate("a", 5)  # 3 blocks, last half full
    bm.fork("a", "b")
    before = snapshot(bm)
    assert not bm.can_allocate(3)
    with pytest.raises(OutOfBlocks):
        bm.allocate("c", 3)
    assert snapshot(bm) == before and "c" not in bm
    assert bm.can_append("a") and bm.can_append_all(["a", "b"])  # a copies into the last free block, b in place
    assert bm.append_cost(["a", "b"]) == AppendCost(1, 1)
    bm.append_slots(["a", "b"])  # uses the last block
    assert bm.num_free_blocks == 0 and bm.append_cost(["a", "b"]) == AppendCost(2, 0)
    before = snapshot(bm)
    assert not bm.can_append("a") and not bm.can_append_all(["a", "b"])
    with pytest.raises(OutOfBlocks):
        bm.append_slot("a")
    assert snapshot(bm) == before
    bm.allocate("z", 0)
    bm.free("z")
    bm.free("b")  # frees b's private block: room for one append, not two
    bm.allocate("b", 0)
    assert bm.can_append("a") and not bm.can_append_all(["a", "b"])
    before = snapshot(bm)
    with pytest.raises(OutOfBlocks):  # all or nothing: a's append must not happen either
        bm.append_slots(["a", "b"])
    assert snapshot(bm) == before
    for call in (bm.append_slots, bm.can_append_all, bm.append_cost):  # a sequence twice: refused, nothing taken
        with pytest.raises(ValueError, match="more than once"):
            call(["a", "a"])
    assert snapshot(bm) == before
    bm.check_invariants()
    bm = BlockManager(num_blocks=8, block_size=2)  # free blocks to spare: the no-count shortcut's ground
    bm.allocate("a", 2)
    before = snapshot(bm)
    for call in (bm.append_slots, bm.can_append_all):  # an unknown sequence: refused before a's append happens
        with pytest.raises(UnknownSequence):
            call(["a", "zz"])
    assert snapshot(bm) == before
    bm.check_invariants()


def test_errors():
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.allocate("a", 1)
    with pytest.raises(DuplicateSequence):
        bm.allocate("a", 1)
    bm.allocate("b", 1)
    with pytest.raises(DuplicateSequence):
        bm.fork("a", "b")
    for call in (bm.free, bm.block_table, bm.num_tokens, bm.append_slot, bm.can_append, bm.slots,
                 lambda s: bm.fork(s, "new"), lambda s: bm.append_cost([s])):
        with pytest.raises(UnknownSequence, match="unknown sequence 'nope'"):
            call("nope")
    with pytest.raises(ValueError):
        bm.append_cost(["a", "a"])
    with pytest.raises(ValueError):
        bm.allocate("c", -1)
    with pytest.raises(ValueError):
        bm.slots("a", 0, 2)
    with pytest.raises(ValueError):
        BlockManager(0, 16)
    assert "new" not in bm and bm.num_sequences == 2
    bm.check_invariants()


def test_check_invariants_catches_corruption():
    def fresh():
        bm = BlockManager(num_blocks=6, block_size=2)
        bm.allocate("a", 3)
        bm.fork("a", "b")
        return bm

    for corrupt in (lambda bm: bm._free.append(bm._free[0]),          # double free
                    lambda bm: bm._free.popleft(),                    # leak
                    lambda bm: bm._ref.__setitem__(bm._tables["a"][0], 1),  # wrong ref count
                    lambda bm: bm._tables["a"].append(bm._free[0]),   # table longer than its tokens
                    lambda bm: bm._num_tokens.__setitem__("b", 4)):   # sharers disagree on a block's fill
        bm = fresh()
        bm.check_invariants()
        corrupt(bm)
        with pytest.raises(AssertionError):
            bm.check_invariants()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_operations(seed):
    rng = random.Random(seed)
    bm = BlockManager(num_blocks=40, block_size=4)
    cache = ShadowCache(bm)
    next_id, copies_seen, ooms, reserves = 0, 0, 0, 0
    for _ in range(3000):
        live = list(cache.history)
        pressure = 10 if bm.num_free_blocks < 6 else 2  # free more as the pool fills, so it churns near full
        op = rng.choices(["allocate", "fork", "append", "append_all", "free", "reserve"], [3, 3, 6, 2, pressure, 1])[0]
        if op in ("fork", "append", "append_all", "free", "reserve") and not live:
            op = "allocate"
        before, free_before = snapshot(bm), bm.num_free_blocks
        expect_oom = False  # whether the op must raise OutOfBlocks: too few free blocks, worked out beforehand
        try:
            if op == "allocate":
                n = rng.randint(0, 20)
                expect_oom = bm.blocks_needed(n) > free_before
                assert bm.can_allocate(n) == (not expect_oom)
                cache.allocate(next_id, n)
                next_id += 1
            elif op == "fork":
                cache.fork(rng.choice(live), next_id)
                assert snapshot(bm)[0] == before[0]  # forking takes no block
                next_id += 1
            elif op == "append":
                s = rng.choice(live)
                n, table = bm.num_tokens(s), bm.block_table(s)
                expect_copy = n % 4 != 0 and bm.ref_count(table[-1]) > 1
                expect_new = n % 4 == 0 or expect_copy
                expect_oom = expect_new and free_before == 0
                can = bm.can_append(s)
                slot, copy = bm.append_slot(s)
                assert can and (copy is not None) == expect_copy
                assert bm.num_free_blocks == free_before - expect_new
                if copy:
                    assert copy[0] == table[-1] and slot // 4 == copy[1]
                    cache.apply_copy(copy)
                    copies_seen += 1
                cache.write(s, slot)
            elif op == "append_all":
                seqs = rng.sample(live, rng.randint(1, len(live)))
                cost, free_before = bm.append_cost(seqs), bm.num_free_blocks
                expect_oom = cost.num_blocks > free_before
                # the shortcut (as many free blocks as sequences) agrees with the exact count
                assert bm.can_append_all(seqs) == (cost.num_blocks <= free_before)
                slots, copies = bm.append_slots(seqs)
                assert cost.num_blocks <= free_before
                assert cost == (free_before - bm.num_free_blocks, len(copies))
                assert len(set(slots)) == len(slots)
                for copy in copies:  # the caller copies every block before writing any slot
                    cache.apply_copy(copy)
                copies_seen += len(copies)
                for s, slot in zip(seqs, slots):
                    cache.write(s, slot)
            elif op == "reserve":
                s = rng.choice(live)
                kept = bm.reserve(s, bm.num_tokens(s) + rng.randint(0, 24))
                assert bm.num_free_blocks == free_before  # set aside, still free
                reserves += kept > 0
            else:
                cache.free(rng.choice(live))
        except OutOfBlocks:
            assert expect_oom, (op, free_before)  # refused only when the blocks were really not there
            ooms += 1
            assert snapshot(bm) == before
        else:
            assert not expect_oom, (op, free_before)
        cache.verify()
    # the run really exercised COW, a full pool and set-aside runs
    assert copies_seen > 50 and ooms > 20 and reserves > 10, (copies_seen, ooms, reserves)
    for s in list(cache.history):
        cache.free(s)
    bm.check_invariants()
    assert bm.num_free_blocks == 40 and bm.num_sequences == 0 and all(bm.ref_count(b) == 0 for b in range(40))


def test_reserve_gives_each_row_adjacent_blocks():
    """Rows forked from one prompt and grown in step take turns at the free list; with reservations each row's
    blocks after the prompt are consecutive ids (the copy of the shared partial block first)."""
    bm = BlockManager(num_blocks=64, block_size=4)
    cache = ShadowCache(bm)
    cache.allocate("p", 6)  # blocks 0 (full) and 1 (2 of 4 tokens)
    rows = [("r", i) for i in range(4)]
    for r in rows:
        cache.fork("p", r)
    cache.free("p")
    free = bm.num_free_blocks
    kept = [bm.reserve(r, 6 + 20) for r in rows]
    assert kept == [6] * 4  # 26 tokens: 7 blocks, 1 full shared + a copy + 5 fresh
    assert bm.num_free_blocks == free
    for _ in range(20):
        slots, copies = bm.append_slots(rows)
        for c in copies:
            cache.apply_copy(c)
        for r, slot in zip(rows, slots):
            cache.write(r, slot)
        cache.verify()
    for r in rows[:-1]:  # the last row wrote the shared block in place (the others had copied it away)
        t = bm.block_table(r)
        assert t[0] == 0 and t[1:] == list(range(t[1], t[1] + len(t) - 1)), t
    t = bm.block_table(rows[-1])
    assert t[:2] == [0, 1] and t[2:] == list(range(t[2], t[2] + len(t) - 2)), t
    for r in rows:
        cache.free(r)
    bm.check_invariants()
    assert bm.num_free_blocks == 64 and not bm._kept


def test_reserved_blocks_stay_free_for_others():
    bm = BlockManager(num_blocks=10, block_size=2)
    bm.allocate("a", 1)
    assert bm.reserve("a", 19) == 9 and bm.num_free_blocks == 9  # every free block set aside for "a"
    assert bm.can_allocate(18)
    bm.allocate("b", 6)  # takes 3 of "a"'s, from the end of its run
    bm.check_invariants()
    assert bm.block_table("b") == [9, 8, 7] and bm.num_free_blocks == 6
    slot, _ = bm.append_slot("a")  # "a"'s first block still has room
    slot, _ = bm.append_slot("a")  # a fresh block: the next of its run
    assert slot // 2 == 1
    bm.free("a")  # its remaining run goes back
    bm.check_invariants()
    assert bm.num_free_blocks == 7 and not bm._kept
    assert bm.reserve("b", 6) == 0  # nothing more to come
    assert bm.reserve("b", 7) == 0  # one block more: nothing to gain
    bm.allocate("c", 2)
    with pytest.raises(OutOfBlocks):
        bm.allocate("d", 2 * 7)
    bm.check_invariants()


def test_reserve_all_takes_runs_in_turn_and_skips_short_ones():
    def pool():
        bm = BlockManager(num_blocks=30, block_size=2)
        for i in range(6):  # hold blocks 0-5, then free 1, 3-4
            bm.allocate(("x", i), 2)
        bm.free(("x", 1)), bm.free(("x", 3)), bm.free(("x", 4))
        for s in "abcd":
            bm.allocate(s, 1)  # blocks 6-9 (the free list's order): free runs [1], [3, 4], [10 .. 29]
        return bm

    one, many = pool(), pool()
    wants = [("a", 9), ("b", 5), ("c", 3), ("d", 61)]  # 4, 2, 1 (nothing to gain), 30 (no run that long) more blocks
    in_turn = [one.reserve(s, n) for s, n in wants]
    assert in_turn == [4, 2, 0, 0] and many.reserve_all(wants) == in_turn
    # one at a time each takes the lowest run long enough; all at once each the next after the one before
    assert list(one._kept["a"]) == [10, 11, 12, 13] and list(one._kept["b"]) == [3, 4]
    assert list(many._kept["a"]) == [10, 11, 12, 13] and list(many._kept["b"]) == [14, 15]
    assert one.num_free_blocks == many.num_free_blocks == 23
    one.check_invariants(), many.check_invariants()
