"""Scheduler policy on a bare BlockManager, no model and no tensors: FIFO admission with a block of headroom per row
(none for a request that would run alone), preemption of the newest running request, and preempted requests
admitted again first, in the order they arrived. Two helpers stand in for Engine._prefill and Engine._decode (each
row its own blocks, prompts unshared; one token a step)."""
from janus_rt.engine.block_manager import BlockManager
from janus_rt.engine.request import Request, SamplingParams
from janus_rt.engine.scheduler import Scheduler


def text(prompt_len: int, max_new: int = 8) -> Request:
    return Request(list(range(prompt_len)), SamplingParams(greedy=True), kind="text", max_new_tokens=max_new)


def image(prompt_len: int, n: int, max_new: int = 8) -> Request:
    ids = list(range(prompt_len))
    return Request(ids, SamplingParams(seed=0), kind="image", n=n, max_new_tokens=max_new, uncond_ids=ids)


def prefill(bm: BlockManager, *reqs: Request) -> None:
    """Each row its prompt's K/V (unshared) and its first token sampled."""
    for r in reqs:
        for rid in r.row_ids():
            bm.allocate(rid, len(r.prompt_ids))
        r.append([0] * r.n)


def decode(bm: BlockManager, reqs: list[Request], steps: int = 1) -> None:
    for _ in range(steps):
        bm.append_slots([rid for r in reqs for rid in r.row_ids()])
        for r in reqs:
            r.append([0] * r.n)


def test_the_newest_running_request_is_preempted_and_comes_back_first():
    bm = BlockManager(num_blocks=9, block_size=4)
    s = Scheduler(bm)
    a, b, c = text(6, max_new=16), text(6, max_new=16), text(6, max_new=16)  # 2 blocks each
    for r in (a, b, c):
        s.add(r)
    assert s.admit() == [a, b, c] and s.running == [a, b, c]  # 2 + 1 of 9 free, 2 + 1 of 6, 2 + 1 of 3
    prefill(bm, a, b, c)
    decode(bm, [a, b, c], steps=6)  # 12 tokens each, 3 full blocks: none free, and a step takes 3 fresh blocks
    assert bm.num_free_blocks == 0
    held = []

    def on_preempt(req):  # called while the request still holds its blocks
        held.append((req, all(rid in bm for rid in req.row_ids())))

    assert s.make_room_for_decode(on_preempt) == [c]  # the newest; its 3 blocks make room for the other two rows
    assert held == [(c, True)] and c.preempted and c.row_ids()[0] not in bm
    assert s.running == [a, b] and list(s.waiting) == [c] and s.num_preemptions == 1
    assert s.make_room_for_decode(on_preempt) == []  # room enough now
    decode(bm, [a, b], steps=4)  # 16 tokens each, 4 full blocks: 1 free, 2 needed
    d = text(4)
    s.add(d)  # arrives after c was preempted
    assert s.make_room_for_decode(on_preempt) == [b] and s.running == [a] and s.num_preemptions == 2
    assert list(s.waiting) == [b, c, d]  # preempted requests first, in the order they arrived, then new arrivals
    # of 5 free blocks a's next token takes one (its 16 tokens fill 4), so b's 16 tokens (4) and a block of headroom
    # do not fit: admitted, b would be preempted again at the next step
    assert s.admit() == []
    s.finish(a)  # 9 free: b's 4 + 1, then c's 12 tokens 3 + 1 (0 left); d's 1 + 1 no longer fit
    assert s.admit() == [b, c] and s.running == [b, c] and list(s.waiting) == [d]
    bm.allocate(b.row_ids()[0], 16)  # (the engine copies their K/V back)
    bm.allocate(c.row_ids()[0], 12)
    assert s.make_room_for_decode(on_preempt) == [] and s.num_preemptions == 2  # each row's fresh block: 2 of 2


def test_admission_keeps_a_block_of_headroom_per_row():
    bm = BlockManager(num_blocks=20, block_size=4)
    s = Scheduler(bm)
    r = text(8)
    s.add(r)
    assert s.admit() == [r]
    prefill(bm, r)  # 2 blocks: 18 free
    x = image(8, n=2)  # its prefill: the 2 shared prompts, 2 blocks each; 4 rows
    s.add(x)
    bm.allocate("other", 4 * 11)  # 7 free: enough for x's prefill (4) but not with its headroom (4 rows)
    assert s.admit() == [] and list(s.waiting) == [x]
    s.add(text(1))  # FIFO: nothing behind the head of the queue is admitted before it, though it would fit
    assert s.admit() == [] and len(s.waiting) == 2
    bm.free("other")
    bm.allocate("other", 4 * 10)  # 8 free: 4 + 4, but r's next token takes a fresh block too (its 8 fill 2)
    assert s.admit() == [] and list(s.waiting)[0] is x
    bm.free("other")
    bm.allocate("other", 4 * 9)  # 9 free: 4 + 4 + 1
    assert s.admit()[0] is x
    assert bm.num_free_blocks == 9  # (admission only decides; the engine's prefill allocates)


def test_each_admitted_request_keeps_its_own_headroom():
    """Two requests that each fit with a block of headroom a row, but not both with theirs: only the first is admitted,
    so the first decode step after their prefills preempts neither."""
    bm = BlockManager(num_blocks=6, block_size=4)
    s = Scheduler(bm)
    a, b = text(8), text(4)  # 2 + 1 and 1 + 1 blocks: 5 of 6 with both headrooms, 4 with a's only
    bm.allocate("other", 4 * 2)  # 4 free
    for r in (a, b):
        s.add(r)
    assert s.admit() == [a] and list(s.waiting) == [b]
    prefill(bm, a)
    assert s.make_room_for_decode(lambda req: None) == []


def test_a_request_that_would_run_alone_needs_no_headroom():
    bm = BlockManager(num_blocks=4, block_size=4)
    s = Scheduler(bm)
    r = text(15, max_new=1)  # 16 tokens at most: the whole pool
    s.add(r)
    assert s.admit() == [r]


def test_a_preempted_image_request_needs_a_block_per_row_and_headroom():
    """Back from preemption each row of an image request holds its own copy of the prompt and its tokens so far, so
    admission counts them per row (a fresh request's rows share the two prompts), plus a block per row."""
    bm = BlockManager(num_blocks=40, block_size=4)
    s = Scheduler(bm)
    a, x = text(6), image(6, n=2)
    for r in (a, x):
        s.add(r)
    assert s.admit() == [a, x]
    prefill(bm, a, x)
    decode(bm, [a, x], steps=6)  # every row: 6 + 6 tokens, 3 full blocks (unshared here)
    bm.allocate("other", 4 * (bm.num_free_blocks - 1))  # 1 free block: 5 rows to append to
    assert s.make_room_for_decode(lambda req: None) == [x] and x.preempted
    bm.free("other")
    used = bm.num_blocks - bm.num_free_blocks
    assert s.blocks_for(x, shared=False) == 4 * 3
    # 12 + 4 rows, and a's next token takes a fresh block (its 12 fill 3)
    bm.allocate("other", 4 * (bm.num_blocks - used - (12 + 4 + 1) + 1))  # 1 block short
    assert s.admit() == []
    bm.free("other")
    bm.allocate("other", 4 * (bm.num_blocks - used - (12 + 4 + 1)))
    assert s.admit() == [x]
