"""An engine stepped on a thread of its own, for servers: any thread submits a request and gets a Future, streams its
tokens through a callback, or aborts it; the engine thread takes submissions and aborts in at step boundaries (the
Engine itself is not thread-safe: only that thread touches it)."""
from __future__ import annotations

import threading
from concurrent.futures import Future

from janus_rt.engine.engine import Engine
from janus_rt.engine.request import Request, SamplingParams


class BackgroundEngine:
    """eng = BackgroundEngine(Engine(model, ...)); fut = eng.submit_image(ids, n=4, params=...); fut.result() -> the
    finished Request (its .tokens), or the aborted one (.aborted set; its tokens so far, none where it was aborted
    before its first step). A request the engine refuses (too big for the KV cache) fails its future with that
    error; a failure inside a step (or a callback) fails every open future and stops the thread (submit then raises
    it). on_tokens(request) runs on the engine thread after each step in which the request sampled tokens (keep it
    short: the next step waits for it). A submission is taken in at the next step boundary; with multi-step decode
    that is up to Engine.max_steps_per_call decode steps away (lower it for latency). Use as a context manager, or
    call close()."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._cv = threading.Condition()
        self._pending: list[tuple[Future, dict]] = []  # submissions not yet in the engine
        self._aborts: list[Future] = []
        self._live: dict[int, tuple[Request, Future, object]] = {}  # req_id -> (request, future, on_tokens)
        self._request_of: dict[Future, Request] = {}  # (engine thread only) futures whose request is in the engine
        self._closed, self._cancel, self._error = False, False, None
        self._thread = threading.Thread(target=self._loop, name="janus_rt-engine", daemon=True)
        self._thread.start()

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
        request with .aborted set. Nothing happens for one that has finished by then."""
        with self._cv:
            self._aborts.append(future)
            self._cv.notify()

    def close(self, cancel: bool = False) -> None:
        """Stop taking submissions and wait for the thread: after every open request has finished, or with cancel=True
        after aborting them all."""
        with self._cv:
            self._closed, self._cancel = True, self._cancel or cancel
            self._cv.notify()
        self._thread.join()

    def __enter__(self) -> "BackgroundEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close(cancel=exc[0] is not None)

    def _submit(self, job: dict) -> Future:
        fut: Future = Future()
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
        eng = self.engine
        while True:
            with self._cv:
                while not (self._pending or self._aborts or self._closed or eng.has_work()):
                    self._cv.wait()
                pending, self._pending = self._pending, []
                aborts, self._aborts = self._aborts, []
                stop, cancel = self._closed, self._cancel
            try:
                self._take_in(pending, aborts, cancel)
                if stop and not eng.has_work():
                    return
                if eng.has_work():
                    before = {rid: req.step for rid, (req, _, _) in self._live.items()}
                    finished = eng.step()
                    for rid, (req, _, on_tokens) in list(self._live.items()):
                        if on_tokens is not None and req.step != before.get(rid, 0):
                            on_tokens(req)
                    for req in finished:
                        _, fut, _ = self._live.pop(req.req_id)
                        self._request_of.pop(fut, None)
                        fut.set_result(req)
            except BaseException as e:  # noqa: BLE001 - a failed step (or callback): every open future gets it
                with self._cv:
                    self._error = e
                    left, self._pending = self._pending, []
                for fut in [f for f, _ in left] + [f for _, f, _ in self._live.values()]:
                    if not fut.done():
                        fut.set_exception(e)
                self._live.clear()
                return

    def _take_in(self, pending, aborts, cancel: bool) -> None:
        """Submissions into the engine (a refused one fails its future), then aborts; cancel: abort everything."""
        eng = self.engine
        for fut, job in pending:
            try:
                add = eng.add_image_request if job["kind"] == "image" else eng.add_text_request
                req = add(*job["args"])
            except Exception as e:  # noqa: BLE001 - the request's own error (too big, bad values), not the engine's
                fut.set_exception(e)
                continue
            self._live[req.req_id] = (req, fut, job["on_tokens"])
            self._request_of[fut] = req
        for fut in [f for _, f, _ in self._live.values()] if cancel else aborts:
            req = self._request_of.pop(fut, None)
            if req is not None and eng.abort(req) is not None:  # (None: it finished in the meantime)
                del self._live[req.req_id]
                fut.set_result(req)
