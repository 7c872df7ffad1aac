"""`janus-rt serve`: the HTTP/JSON endpoints over one BackgroundEngine (the tiny preset, a free port)."""
import base64
import contextlib
import http.client
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from janus_rt.cli import main as cli_main
from janus_rt.processing import generate_images
from janus_rt.serve import ServerMetrics


@contextlib.contextmanager
def serving(host, **kw):
    """`janus-rt serve --model tiny --device cpu --kv-cache-gb 0.01 --host HOST --port 0`, serving on a thread;
    closed after. (--device cpu said: its default is cuda where a GPU is.)"""
    from janus_rt.cli import make_server, parser

    args = parser().parse_args(["serve", "--model", "tiny", "--device", "cpu", "--kv-cache-gb", "0.01", "--host", host,
                                "--port", "0"])
    vars(args).update(dict(api_key=None) | kw)  # (a JANUS_RT_API_KEY of the shell's is not these tests')
    srv, _ = make_server(args)
    srv.verbose = False
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.close()
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def server():
    with serving("127.0.0.1") as srv:
        yield srv


def call(srv, path, body=None, raw=None):
    url = f"http://127.0.0.1:{srv.server_address[1]}{path}"
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _png_1px():
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


PNG_1PX = _png_1px()


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
    assert call(server, "/health") == (200, {"status": "ok", "model": "tiny (random weights)", "requests_open": 0,
                                             "requests_running": 0, "requests_waiting": 0, "kv_cache_usage": 0.0})


def test_understand_takes_a_question_alone(server):
    """/v1/understand with no images (the key absent, or []): the question alone, a text-only turn, answered as
    generate_text answers the official template's ids with no image placeholder (the chat endpoint's text-only turn)."""
    from janus_rt.processing import encode_understanding_prompt
    from janus_rt.tokenizer import JanusTokenizer

    tok = JanusTokenizer.byte_level(server.model.cfg.llm.vocab_size, server.model.cfg.tokens)
    ids = encode_understanding_prompt(tok, "What is a circle?", num_images=0)
    want = server.model.generate_text(ids, max_new_tokens=6)
    for images in ({}, {"images": []}):
        status, out = call(server, "/v1/understand", {"question": "What is a circle?", "max_new_tokens": 6, **images})
        assert status == 200, out
        assert out["answer"] == tok.decode(want) and out["prompt_tokens"] == len(ids), out


@pytest.mark.parametrize("path,body,message", [
    ("/v1/images", {"n": 1}, "'prompt' is required"),
    ("/v1/images", {"prompt": " "}, "prompt is empty"),
    ("/v1/images", {"prompt": "x", "n": 0}, "n must be >= 1"),
    ("/v1/images", {"prompt": "x", "n": "2"}, "'n' must be int"),
    ("/v1/images", {"prompt": "x", "top_p": 2}, "top_p must be in (0, 1]"),
    ("/v1/images", {"prompt": "x", "temperature": -1}, "temperature must be >= 0"),
    ("/v1/images", {"prompt": "x", "temperature": 1e-300}, "temperature must be >= 1e-06"),
    ("/v1/images", {"prompt": "x", "top_k": 2**63}, "top_k must be in [0, 2^31)"),
    ("/v1/images", {"prompt": "x", "seed": 2**64}, "seed must be an int in [0, 2^64)"),
    ("/v1/images", {"prompt": "x", "seed": -1}, "seed must be an int in [0, 2^64)"),
    ("/v1/understand", {"question": "q", "top_p": 0.5, "images": [PNG_1PX]}, "top_p samples, so it needs temperature"),
    ("/v1/images", {"prompt": "x", "n": 100}, "KV blocks"),
    ("/v1/images", {"prompt": "x", "n": 10**9}, "max_num_rows"),
    ("/v1/understand", {"question": "q", "images": ["not base64!"]}, "images[0]: not base64"),
    ("/v1/understand", {"question": "q", "images": ["aGVsbG8="]}, "images[0]: not a PNG, JPEG, WebP or GIF image"),
    ("/v1/images", {"prompt": "x", "temperature": 1e39}, "temperature must be a finite number (in fp32)"),
    ("/v1/understand", {"question": "q", "temperature": 1e39, "images": [PNG_1PX]}, "finite number (in fp32)"),
    ("/v1/understand", {"question": "<image_placeholder> q", "images": [PNG_1PX]}, "image placeholders"),
    ("/v1/images", {"prompt": "\ud800"}, "cannot be tokenized"),
    ("/v1/understand", {"question": "q", "images": ["aGVsbG8="] * 10**4}, "images: give 1 to"),
    # past the model's positions (the tiny model's 4096; its KV cache here holds 10480 tokens)
    ("/v1/understand", {"question": "q", "max_new_tokens": 10**6, "images": [PNG_1PX]},
     "pass the model's 4096 positions"),
    ("/v1/understand", {"question": "q " * 2100, "images": [PNG_1PX]}, "pass the model's 4096 positions"),
    ("/v1/images", {"prompt": "word " * 820}, "tokens and an image's tokens (64) pass the model's 4096 positions"),
    ("/v1/images", {"prompt": "a" * 86017}, "longer than the model's 4096 positions can hold"),  # not tokenized
    # JSON integers past any range (a 500 before: float() overflowed, or int -> str in a message)
    ("/v1/images", {"prompt": "x", "cfg": 10**400}, "'cfg' must be a finite number"),
    ("/v1/images", {"prompt": "x", "n": 10**400}, "'n' is out of range"),
    ("/v1/understand", {"question": "q", "max_new_tokens": 10**400, "images": [PNG_1PX]}, "out of range"),
    ("/v1/understand", {"question": "q", "images": ["aGVsbG8="], "max_new_tokens": 0}, "max_new_tokens must be"),
])
def test_bad_requests_are_400_and_the_server_goes_on(server, path, body, message):
    status, out = call(server, path, body)
    assert status == 400 and message in out["error"], out
    assert call(server, "/health")[0] == 200


def test_bad_bodies_and_paths(server):
    assert call(server, "/v1/images", raw=b"{not json")[0] == 400
    assert call(server, "/v1/images", raw=b"[" * 100000)[0] == 400  # too deep for the parser: still the client's
    assert call(server, "/v1/images", raw=b"[1, 2]") == (400, {"error": "body must be a JSON object"})
    assert call(server, "/v1/nothing", {"prompt": "x"})[0] == 404
    assert call(server, "/nothing")[0] == 404
    assert call(server, "/health?probe=1")[0] == 200
    assert call(server, "/v1/images?probe=1", {"prompt": " "}) == (400, {"error": "prompt is empty"})  # routed
    for method in ("PUT", "DELETE", "PATCH", "OPTIONS"):  # JSON, as every other answer (the standard's: HTML 501)
        req = urllib.request.Request(f"http://127.0.0.1:{server.server_address[1]}/v1/images", method=method,
                                     data=b"{}")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 405 and e.value.headers["Allow"] == "GET, HEAD, POST"
        assert json.loads(e.value.read())["error"].startswith(f"{method} is not served")


def test_head_gets_the_headers_of_get_and_no_body(server):
    """HEAD /health (a load balancer's check) on one kept-alive connection: GET's status and headers, no body, and
    the connection still in step for the GET after it."""
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    try:
        conn.request("HEAD", "/health")
        head = conn.getresponse()
        assert head.status == 200 and head.read() == b""
        conn.request("GET", "/health")
        got = conn.getresponse()
        body = got.read()
        assert got.status == 200 and json.loads(body)["status"] == "ok"
        assert head.getheader("Content-Length") == got.getheader("Content-Length") == str(len(body))
        assert head.getheader("Content-Type") == "application/json"
        conn.request("HEAD", "/nothing")
        missing = conn.getresponse()
        assert missing.status == 404 and missing.read() == b""
    finally:
        conn.close()
    big = Image.new("RGB", (4100, 4100))
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    status, out = call(server, "/v1/understand", {"question": "q", "images": [base64.b64encode(buf.getvalue()).decode()]})
    assert status == 400 and "4100x4100 is more than" in out["error"]


def test_keep_alive_stays_in_step_after_an_error(server):
    """Two requests on one connection where the first's body is not read (an unknown path): the server closes that
    connection instead of reading the leftover body as the next request."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    conn.request("POST", "/v1/nothing", body=json.dumps({"prompt": "x"}), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 404 and r.getheader("Connection") == "close"
    r.read()
    conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    conn.close()


def test_a_failed_step_is_500_and_the_server_goes_on(server, monkeypatch):
    """A failure inside the engine's step: 500 for that step's request (no internals but the error's type), the
    traceback in the log; the next request is served and /health stays ok."""
    eng = server.bg.engine
    real, fails = eng.runner.prefill, []

    def failing(*a, **kw):
        if not fails:
            fails.append(1)
            raise MemoryError("no memory for the prefill")
        return real(*a, **kw)

    monkeypatch.setattr(eng.runner, "prefill", failing)
    status, out = call(server, "/v1/images", {"prompt": "x", "n": 1, "seed": 1})
    assert status == 500 and out["error"].startswith("internal error (MemoryError")
    assert call(server, "/v1/images", {"prompt": "x", "n": 1, "seed": 1})[0] == 200
    assert call(server, "/health")[0] == 200 and eng.bm.num_free_blocks == eng.bm.num_blocks


def test_a_bad_request_does_not_touch_a_running_one(server):
    """While one client's request decodes, another's refused values (caught before any step) leave it alone: it
    gets its images, the same as generate_images'."""
    from janus_rt.tokenizer import JanusTokenizer

    out = {}
    victim = threading.Thread(target=lambda: out.setdefault("v", call(server, "/v1/images",
                                                                      {"prompt": "y", "n": 8, "seed": 3})))
    victim.start()
    for body in ({"prompt": "x", "temperature": 1e39}, {"prompt": "x", "cfg": float("1e39")}):
        assert call(server, "/v1/images", body)[0] == 400
    victim.join()
    status, got = out["v"]
    tok = JanusTokenizer.byte_level(server.model.cfg.llm.vocab_size, server.model.cfg.tokens)
    want, _ = generate_images(server.model, tok, ["y"], n=8, cfg_weight=server.default_cfg, seed=3, progress=False)
    assert status == 200 and all(np.array_equal(np.asarray(png(b)), np.asarray(im)) for b, im in zip(got["images"], want[0]))


def test_serve_refuses_a_taken_port(server, monkeypatch):
    """A taken port is said before the model loads (minutes at 7B), not after."""
    import janus_rt.cli as cli

    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("loaded before the port was checked"))
    with pytest.raises(SystemExit, match="cannot listen on 127.0.0.1"):
        cli_main(["serve", "--model", "tiny", "--port", str(server.server_address[1]), "--kv-cache-gb", "0.01"])
    with pytest.raises(SystemExit, match="cannot listen on 192.0.2.1:0"):  # not this machine's: port 0 is no excuse
        cli_main(["serve", "--model", "tiny", "--host", "192.0.2.1", "--port", "0", "--kv-cache-gb", "0.01"])
    cli._check_listen("", 0)  # '' (every interface) and port 0 (any free one) pass
    with socket.socket() as s:  # a port free a moment ago
        s.bind(("", 0))
        free = s.getsockname()[1]
    cli._check_listen("", free)


def test_serve_on_ipv6():
    """--host ::1 listens on IPv6 (it was refused: the server was IPv4 only) and answers there."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    with serving("::1") as srv:
        assert srv.address_family == socket.AF_INET6
        with urllib.request.urlopen(f"http://[::1]:{srv.server_address[1]}/health", timeout=30) as r:
            assert r.status == 200


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGTERM SIGTERM SIGTERM", "SIGINT SIGTERM SIGINT"])
def test_signal_with_requests_in_flight_exits_cleanly(sig):
    """Ctrl-C or SIGTERM while clients wait: the process exits with 130 within seconds (no abort from a thread left
    inside torch), every client gets an answer (503 for the aborted, 200 for those already done), none a reset.
    A SIGTERM during that shutdown (`timeout` and a process group's kill both deliver one) does not break it."""
    import signal
    import subprocess
    import sys
    import time

    p = subprocess.Popen([sys.executable, "-m", "janus_rt.cli", "serve", "--model", "tiny", "--port", "0",
                          "--kv-cache-gb", "0.3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = p.stdout.readline().split("serving on ")[1].split(" ")[0]
        got = []

        def client(k):
            req = urllib.request.Request(url + "/v1/images", data=json.dumps({"prompt": "x", "n": 100, "seed": k}).encode())
            try:
                with urllib.request.urlopen(req, timeout=120) as r:
                    got.append(r.status)
            except urllib.error.HTTPError as e:
                got.append(e.code)
            except Exception as e:  # noqa: BLE001 - a reset or a timeout: what must not happen
                got.append(type(e).__name__)

        import socket

        idle = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))  # connected, never sends
        threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        for k, name in enumerate(sig.split()):
            if k:
                time.sleep(0.02)
            p.send_signal(getattr(signal, name))
        _, err = p.communicate(timeout=60)
        took = time.monotonic() - t0
        idle.close()
        for t in threads:
            t.join(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130 and "terminate called" not in err and "Traceback" not in err, err[-2000:]
    assert took < 15, took  # the idle connection does not hold the exit up (its 30 s timeout did)
    assert len(got) == 8 and set(got) <= {200, 503} and 503 in got, got


def test_a_reset_connection_is_no_traceback(server, capfd):
    """A keep-alive client that resets its connection between requests is not a server failure: no traceback."""
    import struct

    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=30) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < int(
                answer.split(b"Content-Length: ")[1].split(b"\r\n")[0]):  # the whole answer: the server waits for
            answer += s.recv(4096)                                          # the next request, not inside a write
        assert answer.split(b"\r\n")[0].endswith(b" 200 OK")  # answered; the connection stays open
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close -> RST
    deadline = time.monotonic() + 10  # the connection's thread has finished (handle_error comes after finish())
    while any(t.is_alive() for t in list(server._threads or [])) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not server._conns and not any(t.is_alive() for t in list(server._threads or []))
    err = capfd.readouterr().err
    assert "Traceback" not in err and "ConnectionResetError" not in err, err


def test_a_client_that_leaves_has_its_request_aborted(server, monkeypatch):
    """A client that closes its connection while its request runs: the request is aborted (its blocks back in the
    pool) instead of running to its end for nobody; the server goes on."""
    import socket
    import time

    eng, aborted = server.bg.engine, []
    real, real_step = eng.abort, eng.step
    monkeypatch.setattr(eng, "abort", lambda req: aborted.append(req) or real(req))
    # a request of ~2 s: 64 steps of a token each (the CPU's multi-step decode would take 8 tokens a step, 9 steps of
    # ~0.03 s, about one of the server's 0.25 s looks at the client: the request could finish before one)
    monkeypatch.setattr(eng, "max_steps_per_call", 1)
    monkeypatch.setattr(eng, "step", lambda: time.sleep(0.03) or real_step())
    body = json.dumps({"prompt": "x", "n": 2, "seed": 5}).encode()
    s = socket.create_connection(("127.0.0.1", server.server_address[1]))
    s.sendall(b"POST /v1/images HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    deadline = time.monotonic() + 30
    while not server.bg._live and time.monotonic() < deadline:  # until the engine has it
        time.sleep(0.01)
    s.close()
    while server.bg._live and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(aborted) == 1 and aborted[0].aborted and aborted[0].step < eng.model.cfg.num_image_tokens
    assert eng.bm.num_free_blocks == eng.bm.num_blocks
    assert call(server, "/health")[0] == 200


def scrape(srv) -> dict:
    """GET /metrics -> {(sample name, frozenset of its labels): value}, parsed by prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{srv.server_address[1]}/metrics", timeout=30) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain; version=")
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics():
    """GET /metrics (Prometheus' text format) on a server of its own: responses by path and code, each finished
    request's latency and first-token time, images returned, and the engine's state: nothing running at rest, the
    tokens each request sampled, requests by outcome, the KV pool emptied again."""
    pytest.importorskip("prometheus_client")
    with serving("127.0.0.1") as srv:
        m = scrape(srv)
        assert m[("janus_rt_engine_up", frozenset())] == 1
        assert m[("janus_rt_engine_requests_running", frozenset())] == 0
        assert m[("janus_rt_engine_kv_cache_blocks", frozenset())] == srv.bg.engine.bm.num_blocks > 0
        assert m[("janus_rt_images_total", frozenset())] == 0
        status, out = call(srv, "/v1/images", {"prompt": "a red circle", "n": 2, "seed": 1})
        assert status == 200 and len(out["images"]) == 2
        im = io.BytesIO()
        Image.new("RGB", (8, 8), (0, 200, 0)).save(im, format="PNG")
        status, answer = call(srv, "/v1/understand", {"question": "What colour?", "max_new_tokens": 4,
                                                      "images": [base64.b64encode(im.getvalue()).decode()]})
        assert status == 200
        assert call(srv, "/v1/images", {"prompt": " "})[0] == 400
        assert call(srv, "/v1/images", {"prompt": "x", "n": 100})[0] == 400  # refused by the engine: too big
        assert call(srv, "/nothing")[0] == 404
        m = scrape(srv)

    def responses(path, code):
        return m.get(("janus_rt_http_responses_total", frozenset({"path": path, "code": code}.items())), 0)

    assert (responses("/v1/images", "200"), responses("/v1/images", "400"), responses("/v1/understand", "200"),
            responses("other", "404"), responses("/metrics", "200")) == (1, 2, 1, 1, 1)
    images = frozenset({"endpoint": "/v1/images"}.items())
    assert m[("janus_rt_request_latency_seconds_count", images)] == 1
    assert m[("janus_rt_request_latency_seconds_sum", images)] == pytest.approx(out["latency_s"], abs=1e-4)
    assert m[("janus_rt_time_to_first_token_seconds_sum", images)] == pytest.approx(out["time_to_first_token_s"],
                                                                                    abs=1e-4)
    assert m[("janus_rt_request_latency_seconds_bucket", images | {("le", "+Inf")})] == 1
    assert m[("janus_rt_request_latency_seconds_count", frozenset({"endpoint": "/v1/understand"}.items()))] == 1
    assert m[("janus_rt_images_total", frozenset())] == 2
    tokens = {kind: m[("janus_rt_engine_tokens_total", frozenset({"kind": kind}.items()))]
              for kind in ("image", "text")}
    assert tokens == {"image": 2 * srv.model.cfg.num_image_tokens, "text": answer["tokens"]}
    outcomes = {o: m[("janus_rt_engine_requests_total", frozenset({"outcome": o}.items()))]
                for o in ("finished", "aborted", "failed", "refused")}
    assert outcomes == {"finished": 2, "aborted": 0, "failed": 0, "refused": 1}
    assert m[("janus_rt_engine_kv_cache_blocks_used", frozenset())] == 0
    assert m[("janus_rt_engine_kv_cache_usage_ratio", frozenset())] == 0
    assert m[("janus_rt_engine_decode_steps_total", frozenset())] > 0


def test_metrics_without_prometheus_client(monkeypatch):
    """A checkout used in place without prometheus_client (the lent GPU machines'): the server runs, /metrics says why
    it is missing (404), HEAD /metrics gets GET's headers only."""
    import janus_rt.serve

    monkeypatch.setattr(janus_rt.serve, "ServerMetrics", None)
    with serving("127.0.0.1") as srv:
        status, out = call(srv, "/metrics")
        assert status == 404 and "prometheus_client is not installed" in out["error"]
        assert call(srv, "/health")[0] == 200
    monkeypatch.undo()
    pytest.importorskip("prometheus_client")
    with serving("127.0.0.1") as srv:
        conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=30)
        try:
            conn.request("HEAD", "/metrics")
            head = conn.getresponse()
            assert head.status == 200 and head.read() == b"" and int(head.getheader("Content-Length")) > 1000
        finally:
            conn.close()


def _held(srv):
    """The engine's next step held until the returned event is set (entered: it has begun)."""
    eng = srv.bg.engine
    real_step, entered, release = eng.step, threading.Event(), threading.Event()

    def held_step():
        entered.set()
        assert release.wait(timeout=60)
        eng.step = real_step
        return real_step()

    eng.step = held_step
    return entered, release


def test_max_requests():
    """--max-requests 1: while one request is open (held here inside the engine's step), a second gets 429 at once
    and nothing of it reaches the engine; once the first is answered the next is served. /metrics counts the open
    request and the 429s. A negative limit is refused before anything loads."""
    with serving("127.0.0.1", max_requests=1) as srv:
        entered, release = _held(srv)
        first = []
        t = threading.Thread(target=lambda: first.append(call(srv, "/v1/images", {"prompt": "a", "seed": 1})))
        t.start()
        assert entered.wait(timeout=60)
        status, out = call(srv, "/v1/images", {"prompt": "b", "seed": 2})
        assert status == 429 and "--max-requests 1" in out["error"], out
        status, out = call(srv, "/v1/understand", {"question": "q", "images": [PNG_1PX]})
        assert status == 429
        if ServerMetrics is not None:
            m = scrape(srv)
            assert m[("janus_rt_requests_open", frozenset())] == 1
            assert [m[("janus_rt_http_responses_total", frozenset({"path": path, "code": "429"}.items()))]
                    for path in ("/v1/images", "/v1/understand")] == [1, 1]
        health = call(srv, "/health")[1]  # (the held request: open, taken in, not yet admitted by its first step)
        assert (health["requests_open"], health["requests_running"], health["requests_waiting"]) == (1, 0, 1)
        # the 429 comes before the body is read: a client that announces a body and sends none has it at once
        with socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=10) as sock:
            sock.sendall(b"POST /v1/images HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
            head = sock.recv(4096)
        assert head.startswith(b"HTTP/1.1 429") and b"Retry-After: 1" in head and b"Connection: close" in head
        expect = b"POST /v1/images HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nExpect: 100-continue\r\n\r\n"
        with socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=10) as sock:
            sock.sendall(expect % 1000)  # (asks before sending its body: told 429 instead of 100 Continue)
            head = sock.recv(4096)
        assert head.startswith(b"HTTP/1.1 429") and b"100 Continue" not in head
        release.set()
        t.join(timeout=60)
        assert first[0][0] == 200 and srv.open_requests == 0
        assert call(srv, "/v1/images", {"prompt": "b", "seed": 2})[0] == 200
        body = json.dumps({"prompt": "c", "seed": 3}).encode()
        with socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=30) as sock:
            sock.sendall(expect % len(body))  # (room now: 100 Continue, then the body, then the answer)
            assert sock.recv(4096).startswith(b"HTTP/1.1 100 Continue")
            sock.sendall(body)
            got = b""
            while b"\r\n\r\n" not in got:
                got += sock.recv(4096)
        assert got.startswith(b"HTTP/1.1 200")
        st = srv.bg.state()
        assert st["finished"] == 3 and st["refused"] == 0  # (the 429s never reached the engine)
    with pytest.raises(SystemExit, match="janus-rt serve: --max-requests must be >= 0"):
        cli_main(["serve", "--max-requests", "-1"])


def stream(srv, path, body):
    """POST with "stream": true -> (status, content type, [(event name or None, JSON), ...]) read until the server
    closes the connection."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=60)
    try:
        conn.request("POST", path, body=json.dumps(dict(body, stream=True)),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        raw = r.read().decode()
    finally:
        conn.close()
    if r.status != 200:
        return r.status, r.getheader("Content-Type"), [(None, json.loads(raw))]
    events = []
    for block in raw.split("\n\n")[:-1]:
        if block.startswith(":"):  # a comment (keep-alive): no event
            events.append((":", block[1:].strip()))
            continue
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((lines.get("event"), json.loads(lines["data"])))
    assert raw.endswith("\n\n")
    return r.status, r.getheader("Content-Type"), events


def test_streamed_answers_are_the_plain_ones_step_by_step(server):
    """"stream": true: an image request's events count its tokens up to the image's, an answer's events carry its text
    in pieces that add up to the answer; the last event is the plain request's answer (same seed) with done."""
    body = {"prompt": "a green square", "n": 2, "seed": 5}
    plain = call(server, "/v1/images", body)[1]
    status, ctype, events = stream(server, "/v1/images", body)
    assert status == 200 and ctype == "text/event-stream"
    *steps, (_, last) = events
    of = server.model.cfg.num_image_tokens
    counts = [e["tokens"] for _, e in steps]
    assert len(steps) >= 2 and counts == sorted(set(counts)) and counts[-1] == of
    assert all(name is None and e["of"] == of for name, e in steps)
    assert last["done"] and last["images"] == plain["images"] and last["seed"] == 5

    body = {"question": "What colour?", "max_new_tokens": 6, "images": [PNG_1PX]}
    plain = call(server, "/v1/understand", body)[1]
    status, ctype, events = stream(server, "/v1/understand", body)
    *steps, (_, last) = events
    assert status == 200 and last["done"] and last["answer"] == plain["answer"] and last["tokens"] == plain["tokens"]
    assert "".join(e["text"] for _, e in steps) == plain["answer"]
    assert [e["tokens"] for _, e in steps] == list(range(1, plain["tokens"] + 1))  # (one token a step: no multi-step)


def test_a_stream_that_fails_before_its_first_event_is_a_plain_error(server):
    status, ctype, events = stream(server, "/v1/images", {"prompt": "x", "n": 100})
    assert status == 400 and ctype == "application/json" and "KV blocks" in events[0][1]["error"]
    assert call(server, "/v1/images", {"prompt": "x", "stream": "yes"}) == (400, {"error": "'stream' must be bool, "
                                                                                  "got str"})


def fail_after_the_first_step(server, monkeypatch):
    """The server's engine fails every decode step after its first (a MemoryError), so a stream fails midway."""
    eng = server.bg.engine
    real = eng._decode

    def fail_after_the_first():
        if eng.stats.decode_steps > 0:
            raise MemoryError("out of memory in a step")
        return real()

    eng.stats.decode_steps = 0
    monkeypatch.setattr(eng, "_decode", fail_after_the_first)


def test_a_stream_failing_midway_ends_with_an_error_event(server, monkeypatch):
    """A step failing after the stream's first event: an `event: error` with the 500's message ends it. Its status
    line said 200: /metrics counts the error apart, or a dashboard of 5xx rates never sees a streamed failure."""
    fail_after_the_first_step(server, monkeypatch)
    key = ("janus_rt_http_stream_errors_total", frozenset({"path": "/v1/images", "code": "500"}.items()))
    before = scrape(server).get(key, 0) if ServerMetrics is not None else None
    status, _, events = stream(server, "/v1/images", {"prompt": "a", "seed": 3})
    assert status == 200 and events[-1][0] == "error" and events[-1][1]["code"] == 500
    assert "MemoryError" in events[-1][1]["error"] and events[0][0] is None
    if ServerMetrics is not None:
        assert scrape(server).get(key, 0) == before + 1


def test_a_stream_whose_client_leaves_is_aborted():
    """The client of a stream closes its connection after the first event: its request is aborted, its blocks freed."""
    with serving("127.0.0.1") as srv:
        eng = srv.bg.engine
        real_step, release = eng.step, threading.Event()

        def held_step():  # (the second and later steps wait until the client has left)
            if eng.stats.decode_steps > 0:
                assert release.wait(timeout=60)
            return real_step()

        eng.step = held_step
        sock = socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=30)
        body = json.dumps({"prompt": "a", "seed": 1, "stream": True}).encode()
        sock.sendall(b"POST /v1/images HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        got = b""
        while b"data: " not in got:
            got += sock.recv(4096)
        assert got.startswith(b"HTTP/1.1 200") and b"text/event-stream" in got
        sock.close()
        time.sleep(0.6)  # (the connection's thread finds the client gone while the step is held)
        release.set()
        deadline = time.time() + 30
        while srv.bg.state()["aborted"] < 1 and time.time() < deadline:
            time.sleep(0.05)
        st = srv.bg.state()
        assert st["aborted"] == 1 and st["finished"] == 0 and st["kv_cache_blocks_used"] == 0


def test_metrics_count_a_refused_request_at_once():
    """A client refused by the engine (400) that scrapes /metrics next sees its refusal counted, while another
    request keeps the engine busy (the state used to be taken only at the next step boundary)."""
    pytest.importorskip("prometheus_client")
    from janus_rt.engine import SamplingParams
    from janus_rt.processing import encode_generation_prompt

    with serving("127.0.0.1") as srv:
        busy = srv.bg.submit_image(encode_generation_prompt(srv.tok, "a long one"), 1, SamplingParams(seed=1),
                                   on_tokens=lambda req: time.sleep(0.3))  # (each step ends 0.3 s late)
        try:
            assert call(srv, "/v1/images", {"prompt": "x", "n": 100})[0] == 400  # refused by the engine: too big
            m = scrape(srv)
            assert m[("janus_rt_engine_requests_total", frozenset({"outcome": "refused"}.items()))] == 1
        finally:
            srv.bg.abort(busy)
            busy.result(timeout=60)


def test_a_streamed_answer_cut_inside_a_character_adds_up_to_the_answer(server):
    """An answer whose last token leaves a UTF-8 character incomplete (max_new_tokens cut it, or a random model's
    bytes): the streamed text still adds up to the answer (decode's U+FFFD included), as the docstring promises; it
    lacked the held-back tail (DecodeStream waits for the rest of the character; TextStream.finish was never called)."""
    for seed in range(8):  # (sampled bytes of the tiny model: most of these end inside a character)
        body = {"question": "q", "max_new_tokens": 5, "images": [PNG_1PX], "temperature": 1.0, "seed": seed}
        status, _, events = stream(server, "/v1/understand", body)
        *steps, (_, last) = events
        assert status == 200 and last["done"]
        assert "".join(e["text"] for _, e in steps) == last["answer"], (seed, steps, last)
        assert [e["tokens"] for _, e in steps][-1] == last["tokens"]


def test_a_stream_whose_event_fails_otherwise_has_its_request_aborted():
    """A progress event that fails with something other than a closed connection (here the text decoder) ends the
    stream with an error event and aborts the request: it does not run on in the engine for nobody (after its
    --max-requests slot was given back)."""
    with serving("127.0.0.1") as srv:
        eng = srv.bg.engine
        real_step, release = eng.step, threading.Event()

        def held_step():  # (later decode steps wait until the connection's thread has failed)
            if eng.stats.decode_steps > 0:
                assert release.wait(timeout=60)
            return real_step()

        eng.step = held_step
        real_stream = srv.tok.stream

        class Failing:
            def __init__(self):
                self.inner, self.ids = real_stream(), []

            def push(self, i):
                if len(self.ids) == 1:
                    threading.Timer(0.5, release.set).start()
                    raise RuntimeError("the decoder failed")
                self.ids.append(i)
                return self.inner.push(i)

            def finish(self):
                return self.inner.finish()

        srv.tok.stream = Failing
        status, _, events = stream(srv, "/v1/understand", {"question": "What colour?", "max_new_tokens": 64,
                                                           "images": [PNG_1PX]})
        assert status == 200 and events[-1][0] == "error" and events[-1][1]["code"] == 500
        deadline = time.time() + 30
        while srv.bg._live and time.time() < deadline:
            time.sleep(0.05)
        st = srv.bg.state()
        assert st["aborted"] == 1 and st["finished"] == 0 and st["kv_cache_blocks_used"] == 0, st


def test_a_stream_keeps_its_connection_alive_while_it_waits(monkeypatch):
    """A streamed request that waits (here: its first step held) gets `: keep-alive` comments every KEEPALIVE_S, the
    first one starting the stream (its headers ask proxies not to buffer it); its events follow as usual. GET of a
    POST path is 405 with Allow: POST."""
    import janus_rt.serve

    monkeypatch.setattr(janus_rt.serve._Events, "KEEPALIVE_S", 0.3)
    with serving("127.0.0.1") as srv:
        eng = srv.bg.engine
        real_step = eng.step
        held = [True]

        def held_step():
            if held[0]:
                held[0] = False
                time.sleep(1.2)
            return real_step()

        eng.step = held_step
        status, _, events = stream(srv, "/v1/images", {"prompt": "a", "seed": 1})
        assert status == 200
        kinds = [name for name, _ in events]
        assert kinds[0] == ":" and 2 <= kinds.count(":") <= 4 and events[0][1] == "keep-alive"
        plain = call(srv, "/v1/images", {"prompt": "a", "seed": 1})[1]
        assert events[-1][1]["done"] and events[-1][1]["images"] == plain["images"]
        conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=30)
        try:
            conn.request("POST", "/v1/images", body=json.dumps({"prompt": "a", "seed": 1, "stream": True}))
            r = conn.getresponse()
            assert r.getheader("X-Accel-Buffering") == "no" and r.getheader("Content-Type") == "text/event-stream"
            r.read()
        finally:
            conn.close()
        req = urllib.request.Request(f"http://127.0.0.1:{srv.server_address[1]}/v1/images")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 405 and e.value.headers["Allow"] == "POST"


def test_serving_is_the_cpus_where_a_gpu_is(monkeypatch):
    """The tests' server is the CPU's on a GPU machine too (--device defaults to cuda there; the hand-made Namespace
    these tests had before cli.parser() said cpu)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with serving("127.0.0.1") as srv:
        assert srv.model.device.type == "cpu"


@contextlib.contextmanager
def busy_server():
    """A server under --max-requests 1 with its one request open (held inside the engine's step) while the block
    runs; released and answered after."""
    with serving("127.0.0.1", max_requests=1) as srv:
        entered, release = _held(srv)
        t = threading.Thread(target=lambda: call(srv, "/v1/images", {"prompt": "a", "seed": 1}))
        t.start()
        try:
            assert entered.wait(timeout=60)
            yield srv
        finally:
            release.set()
            t.join(timeout=60)


def read_to_close(sock, size: int = 1 << 16) -> bytes:
    """Everything the server sends on sock until it closes its side."""
    got = b""
    while chunk := sock.recv(size):
        got += chunk
    return got


def test_a_429_reaches_a_client_still_sending_its_body():
    """A busy server's 429 comes before the body is read, yet a client that sends its whole (large) body before it
    reads the answer (http.client, urllib, requests) gets that 429, not a connection reset: the unread body is
    read and dropped before the connection closes."""
    with busy_server() as srv:
        body = json.dumps({"question": "q", "images": [PNG_1PX], "pad": "x" * (16 << 20)}).encode()
        conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=30)
        try:
            conn.request("POST", "/v1/understand", body=body)
            r = conn.getresponse()
            assert r.status == 429 and r.getheader("Retry-After") == "1" and b"--max-requests 1" in r.read()
        finally:
            conn.close()


def test_a_slow_upload_holds_no_slot():
    """--max-requests counts requests whose body has been read: a client still sending its body (here: one byte of
    a hundred, then nothing) does not make the server refuse others with 429."""
    with serving("127.0.0.1", max_requests=1) as srv:
        with socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=10) as sock:
            sock.sendall(b"POST /v1/images HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            time.sleep(0.5)
            status, out = call(srv, "/v1/images", {"prompt": "a", "seed": 1})
            assert status == 200, out


def test_post_of_a_get_path_is_405():
    """POST /health or /metrics: 405 with Allow: GET, HEAD (as GET or HEAD of a POST path is 405 with Allow: POST);
    HEAD of a POST path: the 405's headers only, and the connection serves on."""
    with serving("127.0.0.1") as srv:
        for path in ("/health", "/metrics?x=1"):
            conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=30)
            try:
                conn.request("POST", path, body=b"{}")
                r = conn.getresponse()
                assert r.status == 405 and r.getheader("Allow") == "GET, HEAD", (path, r.status)
                r.read()
            finally:
                conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=30)
        try:
            conn.request("HEAD", "/v1/understand")
            r = conn.getresponse()
            assert r.status == 405 and r.getheader("Allow") == "POST" and r.read() == b""
            conn.request("GET", "/health")
            assert conn.getresponse().status == 200
        finally:
            conn.close()


def test_a_bad_request_line_is_counted_as_other_path():
    """The standard server's own 400 for a request line it cannot read (here an HTTP version it does not know) is
    counted under path "other", not under the path of the request before it on the same kept-alive connection."""
    if ServerMetrics is None:
        pytest.skip("no prometheus_client")

    def responses(m, path, code):
        return m.get(("janus_rt_http_responses_total", frozenset({"path": path, "code": code}.items())), 0)

    with serving("127.0.0.1") as srv:
        with socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=30) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /health XTTP/1.1\r\nHost: x\r\n\r\n")
            got = read_to_close(sock)  # (both answers: the server closes the connection after its 400)
        assert got.startswith(b"HTTP/1.1 200") and b" 400 " in got
        m = scrape(srv)
        assert [responses(m, *key) for key in (("/health", "200"), ("/health", "400"), ("other", "400"))] == [1, 0, 1]


def test_a_client_that_stops_reading_does_not_hold_the_shutdown_up(monkeypatch):
    """A client that stopped reading its (large) answer: the shutdown waits STOP_GRACE_S for it, then cuts the
    connection, instead of the socket's 30 s timeout."""
    import janus_rt.serve

    monkeypatch.setattr(janus_rt.serve, "STOP_GRACE_S", 0.5)
    with serving("127.0.0.1") as srv:
        monkeypatch.setattr(srv, "images", lambda body, *a: {"images": ["x" * (64 << 20)]})  # (more than buffers hold)
        sock = socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=30)
        body = json.dumps({"prompt": "a"}).encode()
        sock.sendall(b"POST /v1/images HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        sock.recv(1024)  # (the answer has begun; not one byte more is read)
        time.sleep(0.5)
        t0 = time.monotonic()
    took = time.monotonic() - t0  # (serving() closed the server)
    sock.close()
    assert took < 5, took


def _big_request(srv, method, path, body, headers=None):
    """http.client sends the whole body (an iterable: chunked) before it reads the answer -> (status, body), or the
    error a reset gave it."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


@pytest.mark.parametrize("case", ["get_with_body", "chunked", "over_max_body"])
def test_an_answer_before_the_body_reaches_a_client_still_sending_it(server, monkeypatch, case):
    """Answers this server gives without reading the request's body (a GET with one, a chunked POST's 411, a POST
    over MAX_BODY's 400) reach a client that sends its whole (large) body before it reads: the connection is closed
    only once the client has sent it (or DISCARD_S), not reset under it."""
    from janus_rt import serve

    big = b"x" * (16 << 20)
    if case == "get_with_body":
        status, out = _big_request(server, "GET", "/health", big)
        assert status == 200 and json.loads(out)["status"] == "ok"
    elif case == "chunked":
        status, out = _big_request(server, "POST", "/v1/images", iter([big[:1 << 20]] * 16))
        assert status == 411 and b"Content-Length" in out
    else:
        monkeypatch.setattr(serve, "MAX_BODY", 1 << 20)
        status, out = _big_request(server, "POST", "/v1/images", big)
        assert status == 400 and b"1048576 bytes" in out


def test_a_429_to_expect_100_reaches_a_client_that_sends_its_body_anyway():
    """A client that asked Expect: 100-continue but sends its body without waiting for the 100 (curl does after a
    second) still reads the busy server's 429 whole, not a reset."""
    with busy_server() as srv:
        size = 16 << 20
        with socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=30) as sock:
            sock.sendall(b"POST /v1/images HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
                         b"Expect: 100-continue\r\n\r\n" % size)
            sock.sendall(b"x" * size)
            answer = read_to_close(sock)
        assert answer.startswith(b"HTTP/1.1 429") and b"--max-requests 1" in answer, answer[:200]


def test_a_stream_keeps_its_connection_alive_while_its_images_decode(monkeypatch):
    """The VQ decode after a stream's last token (about a second an image at 1B on a CPU) is no silence either:
    `: keep-alive` comments come between the last token event and the answer, whose images are the plain ones."""
    import janus_rt.serve

    monkeypatch.setattr(janus_rt.serve._Events, "KEEPALIVE_S", 0.3)
    with serving("127.0.0.1") as srv:
        real = srv.model.decode_image_tokens

        def slow(*a, **kw):
            time.sleep(1.2)
            return real(*a, **kw)

        monkeypatch.setattr(srv.model, "decode_image_tokens", slow)
        status, _, events = stream(srv, "/v1/images", {"prompt": "a", "seed": 1, "n": 2})
        assert status == 200
        last_token = max(i for i, (name, e) in enumerate(events) if name is None and "tokens" in e)
        assert events[last_token][1]["tokens"] == events[last_token][1]["of"]
        assert 2 <= [name for name, _ in events[last_token:]].count(":") <= 4
        plain = call(srv, "/v1/images", {"prompt": "a", "seed": 1, "n": 2})[1]
        assert events[-1][1]["done"] and events[-1][1]["images"] == plain["images"]


@pytest.mark.parametrize("request_head", [
    b"POST /nope HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10,  # (a 404, its body not all sent)
    b"POST /v1/images HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",  # (a 411)
])
def test_a_lingering_connection_does_not_hold_the_shutdown_up(request_head):
    """A client that keeps its connection open after an answer given without reading its body: the linger (up to
    DISCARD_S) ends when the server stops, as an idle connection's wait does."""
    with serving("127.0.0.1") as srv:
        sock = socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=30)
        sock.sendall(request_head)
        answer = read_to_close(sock)  # (the answer, then the FIN the linger begins with)
        assert answer.startswith(b"HTTP/1.1 4"), answer[:100]
        t0 = time.monotonic()
    took = time.monotonic() - t0  # (serving() closed the server)
    sock.close()
    assert took < 5, took


@pytest.mark.parametrize("request_head", [
    b"OPTIONS /v1/images HTTP/1.1\r\nHost: x\r\n\r\n",  # (a browser's CORS preflight: 405)
    b"POST /nope HTTP/1.1\r\nHost: x\r\n\r\n",  # (a 404)
    b"POST /v1/images HTTP/1.1\r\nHost: x\r\n\r\n",  # (no Content-Length: 400)
])
def test_a_refused_request_without_a_body_does_not_linger(server, request_head):
    """A request with neither Content-Length nor Transfer-Encoding has no body (RFC 9112 6.3): once it is answered
    its connection ends at once, not after DISCARD_S of waiting for a body that never comes (a thread and a
    connection held 10 s for each such request while the client keeps its socket open)."""
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=30) as sock:
        sock.sendall(request_head)
        answer = read_to_close(sock)  # (the answer, then the server's FIN; the socket stays open here)
        assert answer.startswith(b"HTTP/1.1 4"), answer[:100]
        deadline = time.monotonic() + 3
        while server._conns and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not server._conns, "the connection lingered for a body it does not have"


@pytest.mark.parametrize("key", ["", " s3cret", "s3cret\n"])
def test_an_empty_or_padded_api_key_is_refused_before_the_load(monkeypatch, key):
    """`--api-key "$KEY"` with KEY unset must not serve /v1/ to everyone (an empty key turned the check off), and a key
    with spaces around it could never match (the header's token is stripped): both refused before the model loads."""
    import janus_rt.cli as cli

    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("loaded with a bad --api-key"))
    args = cli.parser().parse_args(["serve", "--model", "tiny", "--device", "cpu", "--port", "0", "--api-key", key])
    with pytest.raises(SystemExit, match=r"janus-rt serve: --api-key \(or \$JANUS_RT_API_KEY\) is empty or has"):
        cli.make_server(args)


def test_two_content_lengths_are_refused(server):
    """A POST with two Content-Length headers is a 400 (the first used to be read: a proxy in front that read the
    other would frame the connection's next request differently); the server goes on."""
    import socket

    body = json.dumps({"prompt": "x"}).encode()
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=30) as s:
        s.sendall(b"POST /v1/images HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n".encode() + body)
        answer = read_to_close(s)
    assert answer.startswith(b"HTTP/1.1 400") and b"one Content-Length header" in answer, answer[:300]
    assert call(server, "/health")[0] == 200


@pytest.mark.parametrize("request_head, code", [
    (b"TRACE /health HTTP/1.1\r\nHost: x\r\n\r\n", 501),  # a method with no do_TRACE
    (b"post /v1/images HTTP/1.1\r\nHost: x\r\n\r\n", 501),  # (methods are case-sensitive)
    (b"GET /health HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    (b"GET /health HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(120)) + b"\r\n", 431),
    (b'GET /he"alth\\ HTTP/1.1 x\r\n\r\n', 400),  # a request line it cannot read, quotes and a backslash in it
])
def test_the_standard_servers_own_errors_are_json(server, request_head, code):
    """The errors http.server answers by itself are JSON too (an HTML page before), and the server goes on."""
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=30) as s:
        s.sendall(request_head)
        got = read_to_close(s)
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % code) and b"Content-Type: application/json" in head, got[:300]
    assert isinstance(json.loads(body)["error"], str) and b"Connection: close" in head
    assert call(server, "/health")[0] == 200
