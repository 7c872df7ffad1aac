"""`janus-rt serve`: an HTTP/JSON server over one BackgroundEngine (Python's standard library server, a thread per
connection; every request, from any connection, joins the engine's running batch).

    GET  /health          -> {"status": "ok", "model": ..., "requests_open": k, "requests_running": k,
                              "requests_waiting": k, "kv_cache_usage": 0..1} (the engine's load at its last step;
                              waiting: also those submitted and not yet taken in, /metrics' requests_pending)
    GET  /metrics         -> Prometheus' text format: responses, latencies, the engine's batch, KV cache and tokens
                             (janus_rt/metrics.py names each)
    POST /v1/images       {"prompt": str, "n": 1, "cfg": <the checkpoint's>, "temperature": 1.0, "top_k": 0,
                           "top_p": 1.0, "greedy": false, "seed": null (random; else an int in [0, 2^64))}
                          -> {"images": [base64 PNG, ...], "seed": int, "time_to_first_token_s": ..., "latency_s": ...}
    POST /v1/understand   {"question": str, "images": [base64 PNG or JPEG, ...] (none: the question alone, a text-only
                           turn), "max_new_tokens": 128,
                           "temperature": 0.0 (greedy), "top_p": 1.0 (another needs a temperature > 0), "seed": 0}
                          -> {"answer": str, "tokens": int, "prompt_tokens": int, "finish_reason": "stop" (EOS) or
                              "length" (max_new_tokens), "time_to_first_token_s": ..., "latency_s": ...}
    GET  /v1/models, POST /v1/chat/completions, POST /v1/images/generations: OpenAI's API over the two above
                          (janus_rt/openai_api.py says what each takes), for clients written for it

Either POST with "stream": true answers as server-sent events (text/event-stream, the connection closed after the
last): `data: {"tokens": k, "of": 576}` after each engine step of an image request (tokens so far per image),
`data: {"text": ..., "tokens": k}` with the text each step adds to an answer, then the whole answer as above with
"done": true; a failure once the events have begun is an `event: error` with {"error", "code"}. While a request waits
(KV blocks, a long prefill) and while its images decode, a `: keep-alive` comment every 15 s keeps proxies from
closing the connection; the first one begins the events (the 200 is sent), so a refusal by the engine after it (too
big for the KV cache, a shutdown's 503) is such an error event too.

Under --api-key a /v1/ request without `Authorization: Bearer <key>` gets 401 (before its body is read; /health and
/metrics need no key). A bad request (JSON, a value, too big for the KV cache) gets 400 and {"error": ...}, one
beyond --max-requests open ones 429 (at once, its body not taken in, nothing queued, in place of a 100 Continue asked
for; Retry-After: 1), HEAD the headers GET would get, another method 405 (PUT, DELETE, PATCH, OPTIONS, GET or HEAD of
a POST path, POST of a GET one; a query string is ignored); a failure inside the engine 500 (the requests of the
step that failed; the server goes on, the traceback in its log). A client that disconnects while it waits has its
request aborted within a quarter of a second (a client that half-closes its side after sending counts as gone).
Ctrl-C or SIGTERM: open requests are aborted (their clients get 503), the connections' threads finish (an answer
still being written has 5 s), the process exits (further signals meanwhile are ignored).
"""
from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import hmac
import io
import json
import math
import queue
import random
import select
import socket
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from janus_rt import openai_api
from janus_rt.engine import BackgroundEngine, Engine, SamplingParams
from janus_rt.errors import UsageError
from janus_rt.processing import (encode_conversation, encode_generation_prompt, encode_understanding_prompt,
                                 preprocess_image, request_images)

try:
    from janus_rt.metrics import ServerMetrics
except ImportError as e:  # prometheus_client missing (a checkout used in place, not installed): no /metrics
    if (e.name or "").split(".")[0] != "prometheus_client":
        raise
    ServerMetrics = None

MAX_BODY = 64 << 20  # bytes of JSON a request may send (a few images)
MAX_IMAGE_PIXELS = 4096 * 4096  # an understanding image larger than this is refused before it is decoded
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")  # what /v1/understand decodes (not every format Pillow knows)
POST_PATHS = ("/v1/images", "/v1/understand", openai_api.IMAGES_PATH, openai_api.CHAT_PATH)
GET_PATHS = ("/health", "/metrics", openai_api.MODELS_PATH)
OPENAI_PATHS = (openai_api.IMAGES_PATH, openai_api.CHAT_PATH, openai_api.MODELS_PATH)  # (errors in OpenAI's form)
STOP_GRACE_S = 5.0  # s a shutdown waits for the answers being written before it cuts their connections
DISCARD_S = 10.0  # s an unread request body is read and dropped for, at most, before its connection closes (_linger)


class BadRequest(ValueError):
    """400: what the client sent."""


class Unavailable(RuntimeError):
    """503: the server is shutting down."""


class TooBusy(RuntimeError):
    """429: --max-requests requests are open already."""


class ClientGone(ConnectionError):
    """The client closed its connection while its request ran: the request was aborted, nobody to answer."""


def listen_family(host: str) -> int:
    """The address family a server listening on `host` takes: IPv6 for an IPv6 address or a name that resolves
    only to one (::1, ::), IPv4 otherwise; '' (every interface) is IPv4's 0.0.0.0, as before. OSError for a name
    that does not resolve."""
    if not host:
        return socket.AF_INET
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    families = {info[0] for info in infos}
    return socket.AF_INET if socket.AF_INET in families else infos[0][0]


class JanusServer(ThreadingHTTPServer):
    """The HTTP server holding the model, its tokenizer and the background engine (close() stops both)."""

    daemon_threads = False  # server_close() joins the connections' threads: none is left inside torch at exit
    block_on_close = True
    request_queue_size = socket.SOMAXCONN  # (the standard 5 dropped connections under a burst of clients)

    def __init__(self, address, model, tok, engine: Engine, label: str = "", default_cfg: float = 5.0,
                 max_requests: int = 0, api_key: str | None = None):
        self.address_family = listen_family(address[0])  # (read by the socket's creation in super().__init__)
        super().__init__(address, _Handler)
        self.model, self.tok, self.label, self.default_cfg = model, tok, label, default_cfg
        self.bg = BackgroundEngine(engine)
        self._conns, self._conns_lock = set(), threading.Lock()  # open connections, for stop()
        self.max_requests = max_requests  # open requests at most (0: no limit); more get 429
        self.api_key = api_key  # what /v1/... requests must bring as `Authorization: Bearer <key>` (None: nothing)
        self.open_requests = 0  # bodies read, not yet answered (under _conns_lock; an upload holds no slot)
        self.metrics = (ServerMetrics(self.bg.state, lambda: self.open_requests, GET_PATHS + POST_PATHS)
                        if ServerMetrics is not None else None)
        # Text longer than this cannot fit the model's positions (a token spans at most the longest token's
        # characters), so it is refused before the tokenizer spends seconds on it (bodies may hold 64 MB).
        self.max_text_chars = model.cfg.llm.max_position * max(map(len, tok.tok.get_vocab()))

    def handle_error(self, request, client_address) -> None:
        """A client that reset or dropped its connection (a keep-alive one between requests) is not a failure to
        print a traceback for; anything else is, as the standard server prints it."""
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)

    def close(self) -> None:
        """Stop serving (from another thread than serve_forever's), abort open requests, join the connections."""
        self.shutdown()
        self.stop()

    def stop(self) -> None:
        """After serve_forever has returned: open requests aborted (their clients get 503), every connection's read
        side shut (an idle or slowly sending client does not hold the exit up); after STOP_GRACE_S for the answers
        under way, both sides of those still open (a client that stopped reading does not hold it up either); the
        connections' threads joined."""
        self.bg.close(cancel=True)
        self._shut(socket.SHUT_RD)
        deadline = time.monotonic() + STOP_GRACE_S
        while self._conns and time.monotonic() < deadline:
            time.sleep(0.02)
        self._shut(socket.SHUT_RDWR)
        self.server_close()

    def _shut(self, how: int) -> None:
        with self._conns_lock:
            for conn in self._conns:
                try:
                    conn.shutdown(how)
                except OSError:  # closed meanwhile
                    pass

    # ---- the endpoints (run on the connection's thread; the engine's work on its own) -------------------------
    def images(self, body: dict, client_gone=None, events=None, endpoint: str = "/v1/images") -> dict:
        """POST /v1/images -> the answer; events(obj) where the client asked for a stream: one a step."""
        prompt = _get(body, "prompt", str)
        if not prompt.strip():
            raise BadRequest("prompt is empty")
        n = _get(body, "n", int, 1)
        if n < 1:
            raise BadRequest(f"n must be >= 1, got {n}")
        seed = _get(body, "seed", int, None)
        seed = random.getrandbits(32) if seed is None else seed
        temperature = _temperature(body, 1.0)
        params = _sampling(cfg_weight=_finite(body, "cfg", self.default_cfg),
                           temperature=temperature if temperature > 0 else 1.0, top_k=_get(body, "top_k", int, 0),
                           top_p=_finite(body, "top_p", 1.0),
                           greedy=_get(body, "greedy", bool, False) or temperature == 0, seed=seed)
        ids = self._encode(encode_generation_prompt, prompt)
        self._check_positions(len(ids), self.model.cfg.num_image_tokens, "an image's tokens")
        progress = None
        if events is not None:  # an event a step: tokens sampled so far per image
            of = self.model.cfg.num_image_tokens
            progress = (lambda r: r.step, lambda step: events({"tokens": step, "of": of}))
        req = self._wait(lambda on_tokens: self.bg.submit_image(ids, n, params, on_tokens=on_tokens), client_gone,
                         progress, events and events.idle)
        pngs = []
        for im in self._decode(req, events and events.idle):
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            pngs.append(base64.b64encode(buf.getvalue()).decode("ascii"))
        if self.metrics is not None:
            self.metrics.images.inc(len(pngs))
        return dict(images=pngs, seed=seed, **self._times(endpoint, req))

    def understand(self, body: dict, client_gone=None, events=None) -> dict:
        """POST /v1/understand -> the answer; events(obj) where the client asked for a stream: the text a step adds."""
        question = _get(body, "question", str)
        if not question.strip():
            raise BadRequest("question is empty")
        max_new, params = _text_sampling(body)
        encoded = _get(body, "images", list, [])  # (none, or []: a text-only turn, as the chat endpoint takes)
        pixels = self._pixels(encoded, "images") if encoded else None
        ids = self._encode(encode_understanding_prompt, question, len(encoded), self.model.cfg.vision.num_patches)
        self._check_positions(len(ids), max_new, "max_new_tokens")
        return self._answer(ids, pixels, max_new, params, client_gone, events, "/v1/understand")

    def chat(self, body: dict, client_gone=None, events=None) -> dict:
        """POST /v1/chat/completions (openai_api): a conversation, with images or none -> a chat.completion."""
        try:
            turns, system, encoded, native = openai_api.chat_request(body)
        except openai_api.RequestError as e:
            raise BadRequest(str(e)) from None
        kw = {} if system is None else {"system": system}
        self._check_text_length(sum(len(text) for _, text in turns) + len(system or ""))
        ids = _encode(lambda *a: encode_conversation(*a, **kw), self.tok, turns, self.model.cfg.vision.num_patches)
        if native["max_new_tokens"] is None:  # (as OpenAI's: the room left, in the context and in the KV cache)
            room = min(self.model.cfg.llm.max_position, self._kv_tokens()) - len(ids)
            native["max_new_tokens"] = max(room, 1)
        max_new, params = _text_sampling(native)
        self._check_positions(len(ids), max_new, "max_tokens")
        pixels = self._pixels(encoded, "image_url") if encoded else None
        out = self._answer(ids, pixels, max_new, params, client_gone, events, openai_api.CHAT_PATH)
        cid, created = (events.id, events.created) if events is not None else (openai_api.chat_id(), int(time.time()))
        return openai_api.chat_response(out, self.label, cid, created)

    def openai_images(self, body: dict, client_gone=None, events=None) -> dict:
        """POST /v1/images/generations (openai_api) -> an images.generate answer."""
        try:
            native = openai_api.image_request(body, self.model.cfg.vq.image_size)
        except openai_api.RequestError as e:
            raise BadRequest(str(e)) from None
        return openai_api.image_response(self.images(native, client_gone, None, openai_api.IMAGES_PATH))

    def _encode(self, fn, text: str, *args) -> list[int]:
        """fn(tok, text, *args), the prompt's ids, after _check_text_length."""
        self._check_text_length(len(text))
        return _encode(fn, self.tok, text, *args)

    def _check_text_length(self, chars: int) -> None:
        if chars > self.max_text_chars:
            most = self.model.cfg.llm.max_position
            raise BadRequest(f"the text ({chars} characters) is longer than the model's {most} positions can hold")

    def _check_positions(self, prompt: int, new: int, what: str) -> None:
        """A request whose prompt and answer (or image) pass the model's positions is refused (the model was not
        trained there: `janus-rt generate` / `understand` warn, a server answers 400, as OpenAI's does)."""
        most = self.model.cfg.llm.max_position
        if prompt + new > most:
            raise BadRequest(f"the prompt's {prompt} tokens and {what} ({new}) pass the model's {most} positions")

    def _kv_tokens(self) -> int:
        """The tokens the KV cache holds at most (one request alone)."""
        cache = self.bg.engine.cache
        return cache.num_blocks * cache.block_size

    def _most_images(self) -> int:
        """The images one request may hold: what the KV cache could take at all."""
        return self._kv_tokens() // self.model.cfg.vision.num_patches

    def _pixels(self, encoded: list, where: str) -> torch.Tensor:
        """Base64 PNG / JPEG / WebP / GIF images -> the model's input [k, 3, S, S], each decoded, checked and
        reduced at once (BadRequest naming where[i] for one that is not an image this server reads)."""
        from PIL import Image

        cfg = self.model.cfg
        most = self._most_images()
        if not 1 <= len(encoded) <= most:
            raise BadRequest(f"{where}: give 1 to {most} (base64 PNG or JPEG; each takes "
                             f"{cfg.vision.num_patches} tokens of the KV cache), got {len(encoded)}")
        pixels = []
        for i, data in enumerate(encoded):
            try:
                raw = base64.b64decode(data, validate=True)
            except (ValueError, TypeError):
                raise BadRequest(f"{where}[{i}]: not base64 (a base64 PNG or JPEG is needed)") from None
            try:
                with Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS) as im:  # (reads the header only)
                    if im.width * im.height > MAX_IMAGE_PIXELS:
                        raise BadRequest(f"{where}[{i}]: {im.width}x{im.height} is more than {MAX_IMAGE_PIXELS} "
                                         f"pixels; send it smaller (the model sees {cfg.vision.image_size} px)")
                    pixels.append(preprocess_image(im.convert("RGB"), cfg.vision.image_size))
            except BadRequest:
                raise
            except Exception:  # noqa: BLE001 - not an image PIL reads (or a truncated one)
                raise BadRequest(f"{where}[{i}]: not a PNG, JPEG, WebP or GIF image that can be read") from None
        return torch.stack(pixels).to(self.model.device, self.model.dtype)

    def _answer(self, ids, pixels, max_new: int, params, client_gone, events, endpoint: str) -> dict:
        """A text request through the engine -> {answer, tokens, prompt_tokens, finish_reason, times}; events(obj)
        where the client asked for a stream: {"text", "tokens"} each step that adds some."""
        progress = None
        if events is not None:
            text, sent = self.tok.stream(), [0]

            def snap(r):  # (the engine thread: the tokens new since the last step, and whether r has finished)
                new = r.tokens[0][sent[0]:]
                sent[0] += len(new)
                return new, r.finished

            def show(item):
                new, finished = item
                chunk = "".join(text.push(i) for i in new)
                if finished:  # a character cut at the end (max_new_tokens) is decode's U+FFFD, as in the answer
                    chunk += text.finish()
                events({"text": chunk, "tokens": len(text.ids)})

            progress = (snap, show)
        req = self._wait(lambda on_tokens: self.bg.submit_text(ids, pixels, max_new, params, on_tokens=on_tokens),
                         client_gone, progress, events and events.idle)
        tokens = req.tokens[0]
        stopped = bool(tokens) and tokens[-1] == self.model.cfg.tokens.eos_id
        return dict(answer=self.tok.decode(tokens), tokens=len(tokens), prompt_tokens=len(ids),
                    finish_reason="stop" if stopped else "length", **self._times(endpoint, req))

    def _decode(self, req, idle=None) -> list:
        """A finished image request -> its PIL images (the VQ decoder); idle() every quarter of a second meanwhile
        where a stream is open (the decode runs on a thread of its own then; whole, so its images are the plain
        answer's)."""
        if idle is None:
            return request_images(self.model, req)
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="janus-rt-vq") as pool:
            fut = pool.submit(request_images, self.model, req)
            while True:
                try:
                    return fut.result(timeout=0.25)
                except concurrent.futures.TimeoutError:
                    idle()  # (a client gone: ConnectionError, once the decode is done)

    def _times(self, endpoint: str, req) -> dict:
        """A finished request's times, for its answer and the metrics."""
        if self.metrics is not None:
            self.metrics.request(endpoint, req.time_to_first_token, req.latency)
        return dict(time_to_first_token_s=round(req.time_to_first_token, 4), latency_s=round(req.latency, 4))

    def check_room(self) -> None:
        """TooBusy where max_requests are open already (before a body is read; takes no slot)."""
        with self._conns_lock:
            self._check_room()

    def _check_room(self) -> None:
        if self.max_requests and self.open_requests >= self.max_requests:
            raise TooBusy(f"{self.open_requests} requests are open, the most this server takes at once "
                          f"(--max-requests {self.max_requests}); retry later")

    @contextlib.contextmanager
    def request_slot(self):
        """Around one POST's work, once its body is read: max_requests open already is 429 (TooBusy), at once."""
        with self._conns_lock:
            self._check_room()
            self.open_requests += 1
        try:
            yield
        finally:
            with self._conns_lock:
                self.open_requests -= 1

    def _wait(self, submit, client_gone=None, progress=None, idle=None):
        """submit(on_tokens) -> the finished request; the engine's refusal as 400, a closing server as 503; where
        client_gone() says the client has left (or a progress event cannot be written), the request is aborted
        (ClientGone). progress = (snap, show): snap(request) on the engine thread after each step that gave it
        tokens (a copy of what show needs), show(that copy) here, in order; idle() here every quarter of a second
        without one."""
        steps, done = queue.SimpleQueue(), object()
        on_tokens = None if progress is None else (lambda r: steps.put(progress[0](r)))
        try:
            fut = submit(on_tokens)
        except RuntimeError:
            if self.bg.closed:
                raise Unavailable("the server is shutting down") from None
            raise
        fut.add_done_callback(lambda _: steps.put(done))  # (after every on_tokens: they run before it resolves)
        try:
            ok = False
            while True:
                try:
                    item = steps.get(timeout=0.25)
                except queue.Empty:
                    # (done after gone: at shutdown stop() shuts the connections' reads only once every future is
                    # resolved, so a request the shutdown aborted is still answered 503 here)
                    if client_gone is not None and client_gone() and not fut.done():
                        self._abort(fut)
                    if idle is not None:
                        try:
                            idle()
                        except (ConnectionError, TimeoutError):  # the stream's client left
                            self._abort(fut)
                    continue
                if item is done:
                    break
                try:
                    progress[1](item)
                except (ConnectionError, TimeoutError):  # the stream's client left
                    self._abort(fut)
            ok = True
            req = fut.result()
        except UsageError as e:  # refused by the engine: too big for the KV cache, placeholders in the question
            raise BadRequest(str(e)) from None
        finally:
            if not ok and not fut.done():  # (a progress event failed otherwise): no request left running for nobody
                with contextlib.suppress(ClientGone):
                    self._abort(fut)
        if req.aborted:
            raise Unavailable("the request was aborted: the server is shutting down")
        return req

    def _abort(self, fut):
        self.bg.abort(fut)
        try:
            fut.result()  # (the abort resolves it)
        except Exception:  # noqa: BLE001 - it failed meanwhile: nobody to tell
            pass
        raise ClientGone("the client left; its request was aborted")


class _Handler(BaseHTTPRequestHandler):
    server: JanusServer
    protocol_version = "HTTP/1.1"
    timeout = 30  # s a connection may sit idle or half-sent (not the wait for a result)

    def setup(self):
        super().setup()
        self.body_unread = False  # set where an answer goes out before (or instead of) reading the body
        with self.server._conns_lock:
            self.server._conns.add(self.connection)

    def finish(self):
        try:
            if self.body_unread:  # (still in _conns: stop() shuts its read side, which ends the linger at once)
                self._linger()
        finally:
            with self.server._conns_lock:
                self.server._conns.discard(self.connection)
        try:
            super().finish()
        except OSError:  # the client left first
            pass

    def do_GET(self):
        if self.headers.get("Content-Length", "0") != "0" or "Transfer-Encoding" in self.headers:
            self._unread()  # a body this server does not read: never parsed as the next request
        path = self.route
        if not self._authorized(path):
            return
        if path == "/metrics":
            metrics = self.server.metrics
            if metrics is None:
                return self._send(404, {"error": "no /metrics: prometheus_client is not installed (pip install -e .)"})
            return self._send(200, *metrics.render())
        if path in POST_PATHS:
            return self._fail(405, f"{self.command} {path} is not served: POST it", headers={"Allow": "POST"})
        if path == openai_api.MODELS_PATH:
            return self._send(200, openai_api.models(self.server.label))
        if path != "/health":
            return self._send(404, {"error": f"no such path {self.path!r} (GET {', '.join(GET_PATHS)})"})
        error = self.server.bg.error
        if error is not None:  # the engine thread stopped: a supervisor should restart the server
            return self._send(503, {"status": "error", "error": f"{type(error).__name__}: {error}"})
        st = self.server.bg.state()
        self._send(200, {"status": "ok", "model": self.server.label, "requests_open": self.server.open_requests,
                         "requests_running": st["requests_running"],
                         "requests_waiting": st["requests_waiting"] + st["requests_pending"],
                         "kv_cache_usage": round(st["kv_cache_usage"], 4)})

    def do_POST(self):
        events = None  # a stream's writer, once the body asks for one
        path = self.route
        if not self._authorized(path):
            return self._unread()
        srv = self.server
        plain = lambda handler, body: _Events(handler)  # (stream(handler, body): the stream's writer)
        route, stream = {"/v1/images": (srv.images, plain), "/v1/understand": (srv.understand, plain),
                         openai_api.IMAGES_PATH: (srv.openai_images, plain),
                         openai_api.CHAT_PATH: (srv.chat, _ChatEvents)}.get(path, (None, None))
        if route is None:
            self._unread()
            if path in GET_PATHS:
                return self._fail(405, f"POST {path} is not served: GET it", headers={"Allow": "GET, HEAD"})
            return self._send(404, {"error": f"no such path {self.path!r} (POST {', '.join(POST_PATHS)})"})
        unread = True  # (a 429 before the body is read closes the connection)
        try:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                self._unread()
                return self._fail(411, "send the body with a Content-Length (no chunked encoding)")
            self.server.check_room()  # (before the body is read: a busy server takes no upload)
            if len(self.headers.get_all("Content-Length") or ()) > 1:  # (which one a proxy in front read is unknown)
                self._unread()
                raise BadRequest("one Content-Length header, not several")
            length = self.headers.get("Content-Length", "0").strip()
            size = int(length) if length.isdigit() else -1  # (digits only: int() would take "1_6" or " +3")
            if not 0 < size <= MAX_BODY:
                self._unread()
                raise BadRequest(f"a JSON body of 1 to {MAX_BODY} bytes with its Content-Length is needed")
            raw, unread = self.rfile.read(size), False  # (outside the slot: a slow upload holds none)
            try:
                body = json.loads(raw)
            except (UnicodeDecodeError, ValueError, RecursionError) as e:  # (JSONDecodeError is a ValueError)
                raise BadRequest(f"body is not JSON this server reads: {str(e)[:200]}") from None
            if not isinstance(body, dict):
                raise BadRequest("body must be a JSON object")
            events = stream(self, body) if _get(body, "stream", bool, False) else None
            with self.server.request_slot():
                out = route(body, lambda: _peer_closed(self.connection), events)
            if events is None:
                self._send(200, out)
            else:
                events(dict(out, done=True))
        except BadRequest as e:
            self._fail(400, str(e), events)
        except Unavailable as e:
            self.close_connection = True
            self._fail(503, str(e), events)
        except TooBusy as e:
            if unread:
                self._unread()
            self._fail(429, str(e), events, headers={"Retry-After": "1"})
        except (TimeoutError, ConnectionError):  # a stalled body, a client gone (ClientGone): nobody to answer
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 - a failure inside: the client hears that much, the log the rest
            print(f"janus-rt serve: {self.command} {self.path} failed:", file=sys.stderr)
            traceback.print_exc()
            self._fail(500, f"internal error ({type(e).__name__}; the server's log has the traceback)", events)

    def _fail(self, code: int, message: str, events=None, headers: dict | None = None) -> None:
        """An error answer: JSON with the code, or, where a stream has begun (its 200 sent), an "error" event (counted
        for /metrics apart: its status line said 200)."""
        if events is not None and events.started:
            if self.server.metrics is not None:
                self.server.metrics.stream_error(self.path, code)
            try:
                events({"error": message, "code": code}, event="error")
            except (ConnectionError, TimeoutError):
                pass
        elif self.route in OPENAI_PATHS:
            self._send(code, openai_api.error_body(code, message), headers=headers)
        else:
            self._send(code, {"error": message}, headers=headers)

    def handle_expect_100(self) -> bool:
        """A client that asks before sending its body (Expect: 100-continue; curl does for large bodies) gets 401
        without the --api-key, or a busy server's 429, instead of 100 Continue, and sends nothing."""
        if self.command == "POST" and self.route in POST_PATHS:
            if not self._authorized(self.route):
                self._unread()
                return False
            try:
                self.server.check_room()
            except TooBusy as e:
                self._unread()  # (a client may send its body all the same)
                self._fail(429, str(e), headers={"Retry-After": "1"})
                return False
        return super().handle_expect_100()

    @property
    def route(self) -> str:
        """The request's path without its query (a query is ignored)."""
        return self.path.split("?")[0]

    def _authorized(self, path: str) -> bool:
        """Whether this request may go on: under --api-key a /v1/ path needs `Authorization: Bearer <key>`; else
        401 is answered here (with WWW-Authenticate) and False returned."""
        key = self.server.api_key
        if not key or not path.startswith("/v1/"):
            return True
        scheme, _, given = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode()):
            return True
        self.close_connection = True
        self._fail(401, "a valid API key is needed: send the header `Authorization: Bearer <key>` (serve's "
                        "--api-key)", headers={"WWW-Authenticate": "Bearer"})
        return False

    def _unread(self) -> None:
        """This request's body (if it has one) is not read: the connection closes after the answer, lingering."""
        self.close_connection = self.body_unread = True

    def _linger(self) -> None:
        """Before a connection whose request body was not read closes: the answer ends (a FIN after it), then the
        body is read and dropped until the client closes, the Content-Length has come, or DISCARD_S. Closing a
        socket with unread bytes resets the connection, and a client still sending its body (most send it whole
        before they read) would get that reset (a broken pipe) instead of the answer. A request with neither
        Content-Length nor Transfer-Encoding has no body (RFC 9112 6.3): nothing is waited for."""
        length = self.headers.get("Content-Length", "").strip()
        if length.isdigit():
            left = int(length)
        else:  # -1: until the client closes (a chunked body, a Content-Length that is no number)
            left = -1 if "Content-Length" in self.headers or "Transfer-Encoding" in self.headers else 0
        deadline = time.monotonic() + DISCARD_S
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            while left != 0 and (wait := deadline - time.monotonic()) > 0:
                self.connection.settimeout(wait)
                chunk = self.rfile.read1(1 << 16 if left < 0 else min(left, 1 << 16))
                if not chunk:  # the client closed (or stop() shut the read side)
                    break
                if left > 0:
                    left -= len(chunk)
        except (OSError, ValueError):  # a reset, the time up; a file closed by a failure in handle()
            pass

    do_HEAD = do_GET  # (a load balancer's health check; _send writes the headers only)

    def _not_allowed(self):
        """PUT, DELETE, PATCH, OPTIONS: 405 in JSON (the standard server answers 501 in HTML)."""
        self._unread()
        self._fail(405, f"{self.command} is not served (GET {', '.join(GET_PATHS)}; POST {', '.join(POST_PATHS)})",
                   headers={"Allow": "GET, HEAD, POST"})

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    def _send(self, code: int, obj: dict | bytes, content_type: str = "application/json",
              headers: dict | None = None) -> None:
        """The response: obj as JSON, or bytes of content_type."""
        data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:  # (said, so that a keep-alive client opens a new one)
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client left first: nothing to tell it
            self.close_connection = True

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (501 for a method it has no do_ for, 505, 414, 431, a request line it cannot
        read) as JSON, as every other answer here (the standard's are an HTML page); the connection closes after, as
        the standard's does."""
        short, long = self.responses.get(code, ("", ""))
        message, explain = message or short, explain or long
        self.log_error("code %d, message %s", code, message)
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # (a request line it could not read: answer with a status line)
            self.request_version = self.protocol_version
        self._send(code, {"error": message + (f" ({explain})" if explain and explain != message else "")})

    def send_response(self, code, message=None):
        """Every response's status line, the standard server's own errors (501, 414, ...) too: counted for /metrics
        (under "other" where the request line was not read as far as its path: self.path is still the previous
        request's on a kept-alive connection, and command is None or '' until the path is set)."""
        if self.server.metrics is not None:
            self.server.metrics.response(self.path if getattr(self, "command", None) else "", code)
        super().send_response(code, message)

    def log_message(self, fmt, *args):  # one line a request, as the standard server does, but quiet in tests
        if getattr(self.server, "verbose", True):
            super().log_message(fmt, *args)


class _Events:
    """A streamed answer (the body's "stream": true): server-sent events, `data: <JSON>` each, the 200 and its headers
    sent with the first; the connection closes after the last (no Content-Length). idle(): a `: keep-alive` comment
    where nothing was written for KEEPALIVE_S (a request waiting for KV blocks, a long prefill), so that a proxy does
    not cut the connection as idle; the first one starts the stream."""

    KEEPALIVE_S = 15.0

    def __init__(self, handler: _Handler):
        self.handler, self.started = handler, False
        self._last = time.monotonic()

    def __call__(self, obj: dict, event: str | None = None) -> None:
        self._write(((f"event: {event}\n" if event else "") + f"data: {json.dumps(obj)}\n\n").encode())

    def idle(self) -> None:
        if time.monotonic() - self._last >= self.KEEPALIVE_S:
            self._write(b": keep-alive\n\n")

    def _write(self, data: bytes) -> None:
        h = self.handler
        if not self.started:
            self.started = h.close_connection = True
            h.send_response(200)
            h.send_header("Content-Type", "text/event-stream")
            h.send_header("Cache-Control", "no-cache")
            h.send_header("X-Accel-Buffering", "no")  # (nginx: pass each event on, do not buffer the stream)
            h.send_header("Connection", "close")
            h.end_headers()
        h.wfile.write(data)
        h.wfile.flush()
        self._last = time.monotonic()


class _ChatEvents(_Events):
    """/v1/chat/completions' stream in OpenAI's form: chat.completion.chunk events (the role, then each step's text),
    the last with the finish_reason, then (stream_options.include_usage) one with the usage, then `data: [DONE]`; a
    failure once begun is `data: {"error": {...}}`. Takes /v1/understand's events: {"text"} each step, the answer
    with "done", {"error", "code"} as event "error"."""

    def __init__(self, handler: _Handler, body: dict):
        super().__init__(handler)
        self.id, self.created, self.model = openai_api.chat_id(), int(time.time()), handler.server.label
        options = body.get("stream_options")
        self.include_usage = isinstance(options, dict) and options.get("include_usage") is True
        self._role_sent = False

    def __call__(self, obj: dict, event: str | None = None) -> None:
        if event == "error":
            return self._data(openai_api.error_body(obj["code"], obj["error"]))
        if obj.get("done"):
            self._delta({}, obj["choices"][0]["finish_reason"])
            if self.include_usage:
                self._data(dict(openai_api.chat_chunk(self.id, self.created, self.model, {}), choices=[],
                                usage=obj["usage"]))
            return self._write(b"data: [DONE]\n\n")
        if obj["text"] or not self._role_sent:
            self._delta({"content": obj["text"]})

    def _delta(self, delta: dict, finish_reason: str | None = None) -> None:
        if not self._role_sent:
            delta, self._role_sent = {"role": "assistant", **delta}, True
        self._data(openai_api.chat_chunk(self.id, self.created, self.model, delta, finish_reason))

    def _data(self, obj: dict) -> None:
        self._write(f"data: {json.dumps(obj)}\n\n".encode())


def _peer_closed(sock) -> bool:
    """Whether the client has closed its side (readable, and a peek reads nothing); pipelined bytes are not that."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):  # reset, or closed here
        return True


def _encode(fn, tok, text, *args):
    """A prompt's ids; text the tokenizer refuses (a lone surrogate) is the client's error."""
    try:
        return fn(tok, text, *args)
    except (TypeError, ValueError) as e:
        raise BadRequest(f"the text cannot be tokenized: {e}") from None


def _get(body: dict, key: str, kind, default=...):
    if key not in body or body[key] is None:
        if default is ...:
            raise BadRequest(f"{key!r} is required")
        return default
    value = body[key]
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise BadRequest(f"{key!r} must be {kind.__name__}, got {type(value).__name__}")
    if kind is int and abs(value) > 2**64:  # (JSON integers have no bound; each field checks its own range after)
        raise BadRequest(f"{key!r} is out of range")
    return value


def _finite(body: dict, key: str, default: float) -> float:
    value = body.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(_float(value)):
        raise BadRequest(f"{key!r} must be a finite number, got {str(value)[:40]}")
    return float(value)


def _float(value) -> float:
    """float(value); an integer past float's range (JSON's have no bound) is inf."""
    try:
        return float(value)
    except OverflowError:
        return math.inf


def _text_sampling(body: dict) -> tuple[int, SamplingParams]:
    """/v1/understand's "max_new_tokens", "temperature" (0, greedy), "top_p", "seed" -> (max_new_tokens, params)."""
    max_new = _get(body, "max_new_tokens", int, 128)
    if max_new < 1:
        raise BadRequest(f"max_new_tokens must be >= 1, got {max_new}")
    temperature = _temperature(body, 0.0)
    top_p = _finite(body, "top_p", 1.0)
    if temperature == 0 and top_p != 1.0:  # (as `janus-rt understand` refuses --top-p without a temperature)
        raise BadRequest("top_p samples, so it needs temperature > 0 (0, the default, is greedy)")
    return max_new, _sampling(temperature=max(temperature, 1e-6), greedy=temperature == 0, top_p=top_p,
                              seed=_get(body, "seed", int, 0))


def _temperature(body: dict, default: float) -> float:
    """The body's temperature: a finite number >= 0 (0 = greedy)."""
    t = _finite(body, "temperature", default)
    if t < 0:
        raise BadRequest(f"temperature must be >= 0 (0 = greedy), got {t}")
    return t


def _sampling(**kw) -> SamplingParams:
    """SamplingParams(**kw); the values it refuses are the client's error."""
    try:
        return SamplingParams(**kw)
    except ValueError as e:
        raise BadRequest(str(e)) from None

