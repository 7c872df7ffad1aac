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
    bm = BlockManager(num_blocks=7, block_size=4)
    s = Scheduler(bm)
    a, b, c = text(8), text(8), text(8)  # 2 blocks each
    for r in (a, b, c):
        s.add(r)
    assert s.admit() == [a, b, c] and s.running == [a, b, c]  # 2, then 2 + 1 of 5 free, then 2 + 1 of 3 free
    prefill(bm, a, b, c)
    assert bm.num_free_blocks == 1  # and each row's blocks are full: a step takes 3 fresh blocks
    held = []

    def on_preempt(req):  # called while the request still holds its blocks
        held.append((req, all(rid in bm for rid in req.row_ids())))

    assert s.make_room_for_decode(on_preempt) == [c]  # the newest; its 2 blocks make room for the other two rows
    assert held == [(c, True)] and c.preempted and c.row_ids()[0] not in bm
    assert s.running == [a, b] and list(s.waiting) == [c] and s.num_preemptions == 1
    assert s.make_room_for_decode(on_preempt) == []  # room enough now
    decode(bm, [a, b], steps=4)  # 12 tokens each, 3 full blocks: 1 free, 2 needed
    d = text(4)
    s.add(d)  # arrives after c was preempted
    assert s.make_room_for_decode(on_preempt) == [b] and s.running == [a] and s.num_preemptions == 2
    assert list(s.waiting) == [b, c, d]  # preempted requests first, in the order they arrived, then new arrivals
    assert s.admit() == [b]  # a holds 3 blocks: b's 12 tokens (3) and a block of headroom; c's 2 + 1 no longer fit
    bm.allocate(b.row_ids()[0], 12)  # (the engine copies its K/V back)
    s.finish(a)
    assert s.admit() == [c, d] and s.running == [b, c, d] and not s.waiting  # 2 + 1 of 4, then 1 + 1 of 2


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
    bm.allocate("other", 4 * 10)  # 8 free: 4 + 4 fit
    assert s.admit()[0] is x
    assert bm.num_free_blocks == 8  # (admission only decides; the engine's prefill allocates)


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
    bm.allocate("other", 4 * (bm.num_blocks - used - (12 + 4) + 1))  # 1 block short of 12 + 4 rows
    assert s.admit() == []
    bm.free("other")
    bm.allocate("other", 4 * (bm.num_blocks - used - (12 + 4)))
    assert s.admit() == [x]
