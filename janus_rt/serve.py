"""`janus-rt serve`: an HTTP/JSON server over one BackgroundEngine (Python's standard library server, a thread per
connection; every request, from any connection, joins the engine's running batch).

    GET  /health          -> {"status": "ok", "model": ...}
    POST /v1/images       {"prompt": str, "n": 1, "cfg": <the checkpoint's>, "temperature": 1.0, "top_k": 0,
                           "top_p": 1.0, "greedy": false, "seed": null}
                          -> {"images": [base64 PNG, ...], "seed": int, "time_to_first_token_s": ..., "latency_s": ...}
    POST /v1/understand   {"question": str, "images": [base64 PNG or JPEG, ...], "max_new_tokens": 128,
                           "temperature": 0.0, "top_p": 1.0, "seed": 0}
                          -> {"answer": str, "tokens": int, "time_to_first_token_s": ..., "latency_s": ...}

A bad request (JSON, a value, too big for the KV cache) gets 400 and {"error": ...}; a failure of the engine 500.
A client that disconnects does not stop its request (it finishes, unread).
"""
from __future__ import annotations

import base64
import io
import json
import math
import random
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from janus_rt.engine import BackgroundEngine, Engine, SamplingParams
from janus_rt.errors import UsageError
from janus_rt.processing import (encode_generation_prompt, encode_understanding_prompt, preprocess_image, to_pil)

MAX_BODY = 64 << 20  # bytes of JSON a request may send (a few images)


class BadRequest(ValueError):
    pass


class JanusServer(ThreadingHTTPServer):
    """The HTTP server holding the model, its tokenizer and the background engine (close() stops both)."""

    daemon_threads = True

    def __init__(self, address, model, tok, engine: Engine, label: str = "", default_cfg: float = 5.0):
        super().__init__(address, _Handler)
        self.model, self.tok, self.label, self.default_cfg = model, tok, label, default_cfg
        self.bg = BackgroundEngine(engine)

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self.bg.close(cancel=True)

    # ---- the endpoints (run on the connection's thread; the engine's work on its own) -------------------------
    def images(self, body: dict) -> dict:
        prompt = _get(body, "prompt", str)
        if not prompt.strip():
            raise BadRequest("prompt is empty")
        n = _get(body, "n", int, 1)
        seed = _get(body, "seed", int, None)
        seed = random.getrandbits(32) if seed is None else seed
        try:
            params = SamplingParams(cfg_weight=_finite(body, "cfg", self.default_cfg),
                                    temperature=_finite(body, "temperature", 1.0), top_k=_get(body, "top_k", int, 0),
                                    top_p=_finite(body, "top_p", 1.0), greedy=_get(body, "greedy", bool, False),
                                    seed=seed)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        if n < 1:
            raise BadRequest(f"n must be >= 1, got {n}")
        req = self._wait(self.bg.submit_image(encode_generation_prompt(self.tok, prompt), n, params))
        with torch.inference_mode():
            pixels = self.model.decode_image_tokens(torch.tensor(req.tokens, device=self.model.device))
        pngs = []
        for im in to_pil(pixels):
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            pngs.append(base64.b64encode(buf.getvalue()).decode("ascii"))
        return dict(images=pngs, seed=seed, **_times(req))

    def understand(self, body: dict) -> dict:
        from PIL import Image

        question = _get(body, "question", str)
        if not question.strip():
            raise BadRequest("question is empty")
        max_new = _get(body, "max_new_tokens", int, 128)
        if max_new < 1:
            raise BadRequest(f"max_new_tokens must be >= 1, got {max_new}")
        temperature = _finite(body, "temperature", 0.0)
        if temperature < 0:
            raise BadRequest(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        try:
            params = SamplingParams(temperature=max(temperature, 1e-6), greedy=temperature == 0,
                                    top_p=_finite(body, "top_p", 1.0), seed=_get(body, "seed", int, 0))
        except ValueError as e:
            raise BadRequest(str(e)) from None
        encoded = _get(body, "images", list)
        if not encoded:
            raise BadRequest("images: give at least one (base64 PNG or JPEG)")
        images = []
        for i, data in enumerate(encoded):
            try:
                with Image.open(io.BytesIO(base64.b64decode(data, validate=True))) as im:
                    images.append(im.convert("RGB"))
            except Exception as e:  # noqa: BLE001 - not base64, not an image PIL reads
                why = "not base64" if isinstance(e, (ValueError, TypeError)) else "not an image PIL can read"
                raise BadRequest(f"images[{i}]: {why} (a base64 PNG or JPEG is needed)") from None
        cfg = self.model.cfg
        pixels = torch.stack([preprocess_image(im, cfg.vision.image_size) for im in images])
        ids = encode_understanding_prompt(self.tok, question, len(images), cfg.vision.num_patches)
        fut = self.bg.submit_text(ids, pixels.to(self.model.device, self.model.dtype), max_new, params)
        req = self._wait(fut)
        return dict(answer=self.tok.decode(req.tokens[0]), tokens=len(req.tokens[0]), **_times(req))

    @staticmethod
    def _wait(fut):
        try:
            req = fut.result()
        except UsageError as e:  # refused by the engine: too big for the KV cache
            raise BadRequest(str(e)) from None
        if req.aborted:
            raise RuntimeError("the request was aborted: the server is shutting down")
        return req


class _Handler(BaseHTTPRequestHandler):
    server: JanusServer
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.path != "/health":
            return self._send(404, {"error": f"no such path {self.path!r} (GET /health)"})
        self._send(200, {"status": "ok", "model": self.server.label})

    def do_POST(self):
        route = {"/v1/images": self.server.images, "/v1/understand": self.server.understand}.get(self.path)
        if route is None:
            return self._send(404, {"error": f"no such path {self.path!r} (POST /v1/images, /v1/understand)"})
        try:
            size = int(self.headers.get("Content-Length", "0"))
            if not 0 < size <= MAX_BODY:
                raise BadRequest(f"a JSON body of 1 to {MAX_BODY} bytes is needed (Content-Length {size})")
            try:
                body = json.loads(self.rfile.read(size))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise BadRequest(f"body is not JSON: {e}") from None
            if not isinstance(body, dict):
                raise BadRequest("body must be a JSON object")
            self._send(200, route(body))
        except BadRequest as e:
            self._send(400, {"error": str(e)})
        except Exception as e:  # noqa: BLE001 - the engine's failure: said to the client, the server goes on
            self._send(500, {"error": f"{type(e).__name__}: {e}"})

    def _send(self, code: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, fmt, *args):  # one line a request, as the standard server does, but quiet in tests
        if getattr(self.server, "verbose", True):
            super().log_message(fmt, *args)


def _get(body: dict, key: str, kind, default=...):
    if key not in body or body[key] is None:
        if default is ...:
            raise BadRequest(f"{key!r} is required")
        return default
    value = body[key]
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise BadRequest(f"{key!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def _finite(body: dict, key: str, default: float) -> float:
    value = body.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(f"{key!r} must be a finite number, got {value!r}")
    return float(value)


def _times(req) -> dict:
    return dict(time_to_first_token_s=round(req.time_to_first_token, 4), latency_s=round(req.latency, 4))
