"""`janus-rt serve`: the HTTP/JSON endpoints over one BackgroundEngine (the tiny preset, a free port)."""
import base64
import io
import json
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from janus_rt.cli import main as cli_main  # noqa: F401 - the parser that builds serve's args
from janus_rt.processing import generate_images


@pytest.fixture(scope="module")
def server():
    import argparse

    from janus_rt.cli import make_server

    args = argparse.Namespace(model="tiny", device="cpu", dtype=None, seed=0, kv_cache_gb=0.01, host="127.0.0.1",
                              port=0, memory_fraction=0.3)
    srv, _ = make_server(args)
    srv.verbose = False
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.close()
    thread.join(timeout=30)


def call(srv, path, body=None, raw=None):
    url = f"http://127.0.0.1:{srv.server_address[1]}{path}"
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def png(b64):
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_images_match_generate_images_and_run_concurrently(server):
    """POST /v1/images from four threads at once: each answer's PNGs are the images generate_images makes with the
    same prompt and seed (continuous batching changes nothing), with the request's times."""
    from janus_rt.tokenizer import JanusTokenizer

    prompts = [f"a red circle {k}" for k in range(4)]
    got = [None] * 4

    def client(k):
        got[k] = call(server, "/v1/images", {"prompt": prompts[k], "n": 2, "seed": 10 + k, "cfg": 3.0})

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tok = JanusTokenizer.byte_level(server.model.cfg.llm.vocab_size, server.model.cfg.tokens)
    for k, (status, out) in enumerate(got):
        assert status == 200, out
        want, _ = generate_images(server.model, tok, [prompts[k]], n=2, cfg_weight=3.0, seed=10 + k, progress=False)
        assert out["seed"] == 10 + k and len(out["images"]) == 2
        for b64, im in zip(out["images"], want[0]):
            assert np.array_equal(np.asarray(png(b64)), np.asarray(im))
        assert 0 < out["time_to_first_token_s"] <= out["latency_s"]


def test_understand_and_health(server):
    im = Image.new("RGB", (40, 30), (200, 10, 10))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    status, out = call(server, "/v1/understand", {"question": "What colour?", "max_new_tokens": 5,
                                                  "images": [base64.b64encode(buf.getvalue()).decode()]})
    assert status == 200 and isinstance(out["answer"], str) and 1 <= out["tokens"] <= 5, out
    assert call(server, "/health") == (200, {"status": "ok", "model": "tiny (random weights)"})


@pytest.mark.parametrize("path,body,message", [
    ("/v1/images", {"n": 1}, "'prompt' is required"),
    ("/v1/images", {"prompt": " "}, "prompt is empty"),
    ("/v1/images", {"prompt": "x", "n": 0}, "n must be >= 1"),
    ("/v1/images", {"prompt": "x", "n": "2"}, "'n' must be int"),
    ("/v1/images", {"prompt": "x", "top_p": 2}, "top_p must be in (0, 1]"),
    ("/v1/images", {"prompt": "x", "temperature": 0}, "temperature must be > 0"),
    ("/v1/images", {"prompt": "x", "n": 200}, "KV blocks"),
    ("/v1/understand", {"question": "q", "images": ["not base64!"]}, "images[0]: not base64"),
    ("/v1/understand", {"question": "q", "images": ["aGVsbG8="]}, "images[0]: not an image PIL can read"),
    ("/v1/understand", {"question": "q", "images": []}, "give at least one"),
    ("/v1/understand", {"question": "q", "images": ["aGVsbG8="], "max_new_tokens": 0}, "max_new_tokens must be"),
])
def test_bad_requests_are_400_and_the_server_goes_on(server, path, body, message):
    status, out = call(server, path, body)
    assert status == 400 and message in out["error"], out
    assert call(server, "/health")[0] == 200


def test_bad_bodies_and_paths(server):
    assert call(server, "/v1/images", raw=b"{not json")[0] == 400
    assert call(server, "/v1/images", raw=b"[1, 2]") == (400, {"error": "body must be a JSON object"})
    assert call(server, "/v1/nothing", {"prompt": "x"})[0] == 404
    assert call(server, "/nothing")[0] == 404


def test_serve_refuses_a_taken_port(server):
    with pytest.raises(SystemExit, match="cannot listen on 127.0.0.1"):
        cli_main(["serve", "--model", "tiny", "--port", str(server.server_address[1]), "--kv-cache-gb", "0.01"])
