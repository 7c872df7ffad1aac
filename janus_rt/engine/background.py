"""An engine stepped on a thread of its own, for servers: any thread submits a request and gets a Future, streams its
tokens through a callback, or aborts it; the engine thread takes submissions and aborts in at step boundaries (the
Engine itself is not thread-safe: only that thread touches it)."""
from __future__ import annotations

import atexit
import threading
import time
import weakref
from concurrent.futures import Future

import torch

from janus_rt.engine.engine import Engine
from janus_rt.engine.request import Request, SamplingParams


class BackgroundEngine:
    """eng = BackgroundEngine(Engine(model, ...)); fut = eng.submit_image(ids, n=4, params=...); fut.result() -> the
    finished Request (its .tokens), or the aborted one (.aborted set; its tokens so far, none where it was aborted
    before its first step). A request the engine refuses (too big for the KV cache) fails its future with that
    error; so does an exception raised by its own on_tokens (the request is aborted, the others go on), and one raised
    by a step it was part of (every request of that step is aborted with it; waiting and later ones go on). Anything
    else that escapes (Ctrl-C, a failed clean-up) fails every open future and stops the thread (`error` says why;
    submit then raises it).

    on_tokens(request) runs on the engine thread after each step in which the request sampled tokens (keep it short:
    the next step waits for it). A submission is taken in at the next step boundary; with multi-step decode that is
    up to Engine.max_steps_per_call decode steps away (lower it for latency). fut.cancel() works until then, abort(fut)
    at any time. Requests' times (Request.time_to_first_token, latency) count from submit(). Finished requests are
    not kept by the engine (a server runs indefinitely). Use as a context manager, or call close(); at interpreter
    exit open requests are aborted and the thread stopped (a thread left inside torch at exit would abort the
    process)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._cv = threading.Condition()
        self._pending: list[tuple[Future, dict]] = []  # submissions not yet in the engine
        self._aborts: list[Future] = []
        self._live: dict[int, tuple[Request, Future, object]] = {}  # req_id -> (request, future, on_tokens)
        self._closed, self._cancel, self._error = False, False, None
        # requests resolved so far, by how (state()), and tokens sampled by kind
        self._counts = dict(finished=0, aborted=0, failed=0, refused=0, image_tokens=0, text_tokens=0)
        # futures to resolve once state() counts them (_publish): a client that has its answer sees its request
        self._settle: dict[Future, tuple[bool, object]] = {}  # future -> (ok, its request or error)
        self._snapshot()
        # the engine thread's OpenMP team: this thread's (a new thread takes torch's process-wide last setting, which
        # another thread's torch.set_num_threads may have changed)
        self._team = torch.get_num_threads()
        self._thread = threading.Thread(target=self._loop, name="janus_rt-engine", daemon=True)
        self._thread.start()
        self._at_exit = _close_at_exit(weakref.ref(self))  # (a weak reference: the registry keeps no engine alive)
        atexit.register(self._at_exit)

    # ---- any thread ------------------------------------------------------------------------------------------
    def submit_image(self, prompt_ids, n: int = 1, params: SamplingParams | None = None,
                     num_tokens: int | None = None, on_tokens=None) -> Future:
        """As Engine.add_image_request -> a Future of the Request."""
        return self._submit(dict(kind="image", args=(prompt_ids, n, params, num_tokens), on_tokens=on_tokens))

    def submit_text(self, prompt_ids, pixel_values=None, max_new_tokens: int = 256,
                    params: SamplingParams | None = None, on_tokens=None) -> Future:
        """As Engine.add_text_request -> a Future of the Request."""
        return self._submit(dict(kind="text", args=(prompt_ids, pixel_values, max_new_tokens, params),
                                 on_tokens=on_tokens))

    def abort(self, future: Future) -> None:
        """Drop the request behind `future` at the next step boundary (Engine.abort); its future then resolves to the
        request with .aborted set. Nothing happens for one that has finished (or failed) by then."""
        with self._cv:
            self._aborts.append(future)
            self._cv.notify()

    def close(self, cancel: bool = False) -> None:
        """Stop taking submissions and wait for the thread: after every open request has finished, or with cancel=True
        after aborting them all. From the engine thread itself (an on_tokens callback) it does not wait."""
        with self._cv:
            self._closed, self._cancel = True, self._cancel or cancel
            self._cv.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()
            atexit.unregister(self._at_exit)

    def state(self) -> dict:
        """What the engine holds and has done, for monitoring (serve's GET /metrics), from any thread: as of the
        engine thread's last step boundary or taking-in of submissions; a request is counted before its future
        resolves (a client that has its answer, or its refusal, finds it here). requests_running / requests_waiting
        (a preempted one waits again) and the running batch's rows_running; requests_pending: submitted, not yet
        taken in; kv_cache_blocks_used / kv_cache_blocks and their kv_cache_usage ratio; decode_steps,
        prefill_seconds, decode_seconds, preemptions (the engine's totals);
        finished / aborted / failed / refused: requests resolved so far (refused: too big for the KV cache or bad
        values); image_tokens / text_tokens: tokens sampled (an image request samples n a step); up: the engine thread
        has not stopped on an error and close() has not finished."""
        with self._cv:
            return dict(self._state, requests_pending=len(self._pending),
                        up=self._error is None and self._thread.is_alive())

    @property
    def closed(self) -> bool:
        """close() was called: submit refuses."""
        return self._closed

    @property
    def error(self) -> BaseException | None:
        """What stopped the engine thread, or None while it runs (or after close())."""
        return self._error

    def __enter__(self) -> "BackgroundEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close(cancel=exc[0] is not None)

    def _submit(self, job: dict) -> Future:
        fut: Future = Future()
        job["submitted"] = time.perf_counter()
        with self._cv:
            if self._error is not None:
                raise RuntimeError("the engine thread stopped on an error") from self._error
            if self._closed:
                raise RuntimeError("BackgroundEngine is closed")
            self._pending.append((fut, job))
            self._cv.notify()
        return fut

    # ---- the engine thread -----------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._steps()
        finally:
            self._publish()  # (what the last steps, a cancel or a failure did)

    def _steps(self) -> None:
        eng = self.engine
        torch.set_num_threads(self._team)
        if eng.model.device.type == "cuda":  # (a thread's CUDA device is its own: Triton launches on it)
            torch.cuda.set_device(eng.model.device)
        while True:
            pending = []
            try:
                self._publish()
                with self._cv:
                    while not (self._pending or self._aborts or self._closed or eng.has_work()):
                        self._cv.wait()
                    pending, self._pending = self._pending, []
                    aborts, self._aborts = self._aborts, []
                    stop, cancel = self._closed, self._cancel
                self._take_in(pending, aborts, cancel)
                if pending or self._settle:  # (taken in, refused, aborted: in state() before the step, however long)
                    self._publish()
                if stop and not eng.has_work():
                    return
                if eng.has_work():
                    before = {rid: req.step for rid, (req, _, _) in self._live.items()}
                    try:
                        finished = eng.step()
                    except Exception as e:  # noqa: BLE001 - that step's requests fail; the engine goes on
                        self._fail_running(e)
                        continue
                    self._count_tokens(before)
                    self._stream(before)
                    for req in finished:
                        if req.req_id in self._live:  # (not when its own callback failed just now)
                            self._resolve(req, eng.finished)
            except BaseException as e:  # noqa: BLE001 - Ctrl-C, or a failure the engine cannot recover from
                with self._cv:
                    self._error = e
                    left, self._pending = self._pending, []
                # (pending: this batch's submissions, also those _take_in had not reached when it failed)
                futs = dict.fromkeys([f for f, _ in pending + left] + [f for _, f, _ in self._live.values()])
                for fut in futs:
                    if fut in self._settle or fut.done():  # (refused or resolved already)
                        continue
                    if not fut.running() and not fut.set_running_or_notify_cancel():  # (cancelled by its client)
                        continue
                    self._counts["failed"] += 1
                    self._settle[fut] = (False, e)
                self._live.clear()
                return

    def _take_in(self, pending, aborts, cancel: bool) -> None:
        """Submissions into the engine (a refused one fails its future; a cancelled one is dropped), then aborts;
        cancel: abort everything."""
        eng = self.engine
        for fut, job in pending:
            if not fut.set_running_or_notify_cancel():  # fut.cancel() came first
                continue
            try:
                add = eng.add_image_request if job["kind"] == "image" else eng.add_text_request
                req = add(*job["args"])
            except Exception as e:  # noqa: BLE001 - the request's own error (too big, bad values), not the engine's
                self._counts["refused"] += 1
                self._settle[fut] = (False, e)
                continue
            req.arrival_time = job["submitted"]
            self._live[req.req_id] = (req, fut, job["on_tokens"])
        request_of = {fut: req for req, fut, _ in self._live.values()}  # futures whose request is in the engine
        for fut in list(request_of) if cancel else aborts:
            req = request_of.get(fut)
            if req is not None and eng.abort(req) is not None:  # (None: it finished in the meantime)
                self._resolve(req, eng.aborted)

    def _fail_running(self, error: Exception) -> None:
        """A step raised: the requests it worked on (Engine.step_requests: a prefill's admitted ones, or every running
        one in a decode step) are aborted (their blocks freed, whatever state the step left them in) and their futures
        get the error; the others and new submissions go on. Where it had none (it failed before admitting any), the
        waiting ones fail instead, or the loop would retry forever. (If the abort itself fails, the error reaches
        _loop's handler and the thread stops.)"""
        eng = self.engine
        s = eng.scheduler
        touched = [r for r in eng.step_requests if r in s.running or r in s.waiting]
        for req in touched or list(s.running) or list(s.waiting):
            self._fail(req, error)

    def _stream(self, before: dict) -> None:
        """Each request's on_tokens after a step that gave it tokens; one that raises aborts its own request only."""
        for rid, (req, _, on_tokens) in list(self._live.items()):
            if on_tokens is None or req.step == before.get(rid, 0):
                continue
            try:
                on_tokens(req)
            except Exception as e:  # noqa: BLE001 - that client's failure (a closed connection), not the engine's
                self._fail(req, e)

    def _count_tokens(self, before: dict) -> None:
        """The tokens the step just run sampled, into state()'s image_tokens / text_tokens."""
        for rid, (req, _, _) in self._live.items():
            made = req.step - before.get(rid, 0)
            self._counts[f"{req.kind}_tokens"] += made * (req.n if req.kind == "image" else 1)

    def _publish(self) -> None:
        """state() as of now, then the futures resolved since the last one (so their clients find them counted)."""
        try:
            self._snapshot()
        finally:
            settle, self._settle = self._settle, {}
            for fut, (ok, value) in settle.items():
                fut.set_result(value) if ok else fut.set_exception(value)

    def _snapshot(self) -> None:
        """state()'s engine part, taken on the engine thread (or in __init__, before it starts): no other thread
        reads the Engine."""
        eng = self.engine
        s, bm = eng.scheduler, eng.bm
        used = bm.num_blocks - bm.num_free_blocks
        state = dict(requests_running=len(s.running), requests_waiting=len(s.waiting),
                     rows_running=sum(r.num_rows for r in s.running), kv_cache_blocks_used=used,
                     kv_cache_blocks=bm.num_blocks, kv_cache_usage=used / max(bm.num_blocks, 1),
                     decode_steps=eng.stats.decode_steps, prefill_seconds=eng.stats.prefill_s,
                     decode_seconds=eng.stats.decode_s, preemptions=s.num_preemptions, **self._counts)
        with self._cv:
            self._state = state

    def _fail(self, req: Request, error: BaseException) -> None:
        """A request that failed: aborted in the engine (its blocks freed; a no-op where it has just finished),
        held neither by the engine nor by this object; its future gets the error (at the next _publish)."""
        self.engine.abort(req)
        self.engine.aborted.pop(req.req_id, None)
        self.engine.finished.pop(req.req_id, None)
        entry = self._live.pop(req.req_id, None)
        if entry is not None:
            self._counts["failed"] += 1
            self._settle[entry[1]] = (False, error)

    def _resolve(self, req: Request, kept: dict) -> None:
        """A finished or aborted request's future gets it (at the next _publish); neither this object nor the engine
        holds it any longer."""
        _, fut, _ = self._live.pop(req.req_id)
        kept.pop(req.req_id, None)
        self._counts["aborted" if req.aborted else "finished"] += 1
        self._settle[fut] = (True, req)


def _close_at_exit(ref):
    def close():
        bg = ref()
        if bg is not None:
            bg.close(cancel=True)

    return close
