"""Continuous batching: admit waiting requests at step boundaries, preempt the newest running request when the KV
pool cannot hold the next step (the engine copies its cache out and restores it when the request is admitted again).
Pure bookkeeping over the BlockManager."""
from __future__ import annotations

from collections import deque

from janus_rt.engine.block_manager import BlockManager
from janus_rt.engine.request import Request
from janus_rt.errors import UsageError


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_rows: int = 256, block_bytes: int | None = None):
        self.bm = block_manager
        self.max_num_rows = max_num_rows
        self.block_bytes = block_bytes  # the KV pool's bytes per block, for messages only
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        need, have = self.worst_case_blocks(req), self.bm.num_blocks
        if need > have:
            gib = lambda blocks: f" ({blocks * self.block_bytes / 2**30:.3g} GiB)" if self.block_bytes else ""
            smaller = ("a lower n (or fewer tokens per image)" if req.kind == "image"
                       else "fewer images or a shorter answer (max_new_tokens)")
            raise UsageError(f"request {req.req_id} needs up to {need} KV blocks{gib(need)} but the cache has "
                             f"{have}{gib(have)}: give the cache more memory (--kv-cache-gb) or ask for {smaller}")
        if req.num_rows > self.max_num_rows:
            raise UsageError(f"request {req.req_id} has {req.num_rows} rows > max_num_rows {self.max_num_rows}")
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def worst_case_blocks(self, req: Request) -> int:
        """Blocks the request holds at its end with no sharing at all (after a preemption): it must fit alone,
        so preempting every other request always lets it finish."""
        bn = self.bm.blocks_needed
        if req.kind == "text":
            return bn(len(req.prompt_ids) + req.max_new_tokens)
        return req.n * (bn(len(req.prompt_ids) + req.max_new_tokens) + bn(len(req.uncond_ids) + req.max_new_tokens))

    def blocks_for(self, req: Request, shared: bool) -> int:
        """Blocks a request's prefill allocates: 2 prompts when its rows share them, else each row its own."""
        bn = self.bm.blocks_needed
        if req.kind == "text":
            return bn(len(req.prompt_ids) + max(req.step - 1, 0))
        if shared:
            return bn(len(req.prompt_ids)) + bn(len(req.uncond_ids))
        per_row = bn(len(req.prompt_ids) + max(req.step - 1, 0)) + bn(len(req.uncond_ids) + max(req.step - 1, 0))
        return req.n * per_row

    def admit(self) -> list[Request]:
        """FIFO admission of waiting requests whose prefill fits, each with a block of headroom per row for its first
        token, beside what the running rows' next token takes (else the next decode step would preempt a request
        just admitted: its prefill wasted, its K/V copied out and back)."""
        admitted = []
        rows = sum(r.num_rows for r in self.running)
        free = self.bm.num_free_blocks
        if self.running:
            free -= self.bm.append_cost(self.rows()).num_blocks
        while self.waiting:
            req = self.waiting[0]
            need = self.blocks_for(req, shared=not req.preempted)
            # headroom of a block per row, except for a request that would run alone (add() checked it fits)
            alone = not self.running and not admitted
            if need + (0 if alone else req.num_rows) > free or rows + req.num_rows > self.max_num_rows:
                break
            self.waiting.popleft()
            free -= need + req.num_rows  # (the headroom is this request's: the next one's comes on top)
            rows += req.num_rows
            admitted.append(req)
        self.running.extend(admitted)
        return admitted

    def rows(self) -> list[tuple]:
        return [rid for req in self.running for rid in req.row_ids()]

    def make_room_for_decode(self, on_preempt) -> list[Request]:
        """Preempt the newest running requests until every remaining row can append one token. on_preempt(req) runs
        first, while the request still holds its blocks (the engine copies its K/V out there); if it raises, the
        request stays running and nothing is freed."""
        preempted = []
        while self.running and not self.bm.can_append_all(self.rows()):
            req = self.running[-1]
            on_preempt(req)
            self.running.pop()
            for rid in req.row_ids():
                self.bm.free(rid)
            req.preempted = True
            self.waiting.appendleft(req)
            preempted.append(req)
            self.num_preemptions += 1
        return preempted

    def remove(self, req_id: int) -> Request | None:
        """Take a request out, waiting or running, its blocks freed (a preempted one's host K/V copy dropped) ->
        the request, or None where neither queue holds it."""
        for req in self.waiting:
            if req.req_id == req_id:
                self.waiting.remove(req)
                req.swapped = None
                return req
        for req in self.running:
            if req.req_id == req_id:
                self.finish(req)
                return req
        return None

    def finish(self, req: Request) -> None:
        """Out of running, every sequence it holds freed (its rows; its prompts too, where a failed prefill left them
        unforked)."""
        self.running.remove(req)
        for sid in [*req.row_ids(), (req.req_id, "pc"), (req.req_id, "pu")]:
            if sid in self.bm:
                self.bm.free(sid)
