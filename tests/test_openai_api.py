"""`janus-rt serve`'s OpenAI-compatible endpoints, through OpenAI's own Python SDK: the same work as serve's own
endpoints, in OpenAI's request and answer forms."""
import base64
import io
import json
import socket
import urllib.error
import urllib.request

import pytest
from PIL import Image
from test_serve import PNG_1PX, call, read_to_close, serving

from janus_rt.processing import encode_conversation

openai = pytest.importorskip("openai")  # (a test dependency: pip install -e '.[test]')


@pytest.fixture(scope="module")
def srv():
    """The embedded default model (it answers colour questions, and stops at EOS)."""
    with serving("127.0.0.1", model=None) as s:
        yield s


def client(srv):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{srv.server_address[1]}/v1", api_key="unused", max_retries=0)


def png_b64(colour, size=32):
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def image_part(b64):
    return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}}


def test_models_lists_the_served_model(srv):
    assert [m.id for m in client(srv).models.list()] == [srv.label]
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.server_address[1]}/v1/models", timeout=30) as r:
        out = json.loads(r.read())
    assert out["object"] == "list" and [(m["id"], m["object"]) for m in out["data"]] == [(srv.label, "model")]
    assert isinstance(out["data"][0]["owned_by"], str) and isinstance(out["data"][0]["created"], int)


def test_images_generate_is_serves_images(srv):
    """images.generate (n, the model's size or "auto", b64_json, serve's seed as an extra field) gives the PNGs POST
    /v1/images gives for the same prompt and seed."""
    c = client(srv)
    side = srv.model.cfg.vq.image_size
    plain = call(srv, "/v1/images", {"prompt": "a blue square", "n": 2, "seed": 7})[1]["images"]
    for size in (f"{side}x{side}", "auto"):
        r = c.images.generate(prompt="a blue square", n=2, size=size, response_format="b64_json",
                              extra_body={"seed": 7})
        assert [d.b64_json for d in r.data] == plain and r.created > 0
    im = Image.open(io.BytesIO(base64.b64decode(plain[0])))
    assert im.size == (side, side)


@pytest.mark.parametrize("streamed", [False, True])
def test_chat_completion_is_serves_answer(srv, streamed):
    """chat.completions.create with an image and a question answers what POST /v1/understand answers (greedy by
    default), with its token counts and finish_reason ("stop" at EOS, "length" at max_tokens); streamed, the chunks'
    text adds up to it, the first carries the role, and include_usage adds the usage."""
    c = client(srv)
    red = png_b64((200, 30, 30))
    native = call(srv, "/v1/understand", {"question": "What colour is the background?", "images": [red],
                                          "max_new_tokens": 32})[1]
    assert native["finish_reason"] == "stop" and native["answer"].strip()
    msgs = [{"role": "user", "content": [image_part(red), {"type": "text", "text": "What colour is the background?"}]}]
    for max_tokens, finish in ((32, "stop"), (2, "length")):
        if streamed:
            chunks = list(c.chat.completions.create(model=srv.label, messages=msgs, max_tokens=max_tokens,
                                                    stream=True, stream_options={"include_usage": True}))
            assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
            text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
            reasons = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
            assert reasons[-1] == finish and set(reasons[:-1]) == {None}
            assert len({ch.id for ch in chunks}) == 1 and not chunks[-1].choices
            usage = chunks[-1].usage
        else:
            r = c.chat.completions.create(model=srv.label, messages=msgs, max_tokens=max_tokens)
            assert r.choices[0].finish_reason == finish and r.choices[0].message.role == "assistant"
            text, usage = r.choices[0].message.content, r.usage
        if finish == "stop":
            assert text == native["answer"] and usage.completion_tokens == native["tokens"]
        else:
            assert native["answer"].startswith(text) and usage.completion_tokens == 2
        assert usage.prompt_tokens == native["prompt_tokens"]
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_a_conversation_reaches_the_engine_in_the_official_template(srv, monkeypatch):
    """System messages, earlier turns and images in any user turn: the engine gets encode_conversation's ids (the
    DeepSeek template), the images in order; consecutive messages of one role are one turn; a text-only chat has
    no images."""
    got = []
    real = srv.bg.submit_text

    def spy(ids, pixels, *a, **kw):
        got.append((ids, None if pixels is None else len(pixels)))
        return real(ids, pixels, *a, **kw)

    monkeypatch.setattr(srv.bg, "submit_text", spy)
    c = client(srv)
    red, green = png_b64((200, 30, 30)), png_b64((30, 200, 30))
    msgs = [{"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": [image_part(red), {"type": "text", "text": "What colour?"}]},
            {"role": "assistant", "content": "Red."},
            {"role": "user", "content": "And this one?"},
            {"role": "user", "content": [image_part(green)]}]
    c.chat.completions.create(model=srv.label, messages=msgs, max_tokens=4)
    turns = [("user", "<image_placeholder>\nWhat colour?"), ("assistant", "Red."),
             ("user", "And this one?\n<image_placeholder>\n")]
    n = srv.model.cfg.vision.num_patches
    assert got[-1] == (encode_conversation(srv.tok, turns, n, system="Answer in one word."), 2)
    c.chat.completions.create(model=srv.label, messages=[{"role": "user", "content": "Hello"}], max_tokens=4)
    assert got[-1] == (encode_conversation(srv.tok, [("user", "Hello")], n), None)
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None},
            {"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]}, {"role": "user", "content": "?"}]
    c.chat.completions.create(model=srv.label, messages=msgs, max_tokens=4)  # (null and refusal: an assistant's)
    assert got[-1][0] == encode_conversation(srv.tok, [("user", "Hi"), ("assistant", "\nNo."), ("user", "?")], n)


def test_without_max_tokens_an_answer_has_the_room_left(srv, monkeypatch):
    """No max_tokens / max_completion_tokens: the answer may run to the room left in the context and the KV cache
    (as OpenAI's and vLLM's), not to /v1/understand's default of 128."""
    got = []
    real = srv.bg.submit_text
    monkeypatch.setattr(srv.bg, "submit_text", lambda ids, px, max_new, *a, **kw: got.append((len(ids), max_new))
                        or real(ids, px, max_new, *a, **kw))
    r = client(srv).chat.completions.create(model=srv.label, messages=[{"role": "user", "content": "Hello"}])
    cache = srv.bg.engine.cache
    room = min(srv.model.cfg.llm.max_position, cache.num_blocks * cache.block_size)
    assert got[-1][1] == room - got[-1][0] > 128 and r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("kw, says", [
    (dict(messages=[{"role": "user", "content": [image_part(PNG_1PX)]}], n=2), "n: not supported"),
    (dict(messages=[{"role": "user", "content": "hi"}], stop=["\n"]), "stop: not supported"),
    (dict(messages=[{"role": "user", "content": "hi"}],
          tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "tools: not supported"),
    (dict(messages=[{"role": "user", "content": "hi"}], logprobs=True), "logprobs: not supported"),
    (dict(messages=[{"role": "user", "content": "hi"}], response_format={"type": "json_object"}), "response_format"),
    (dict(messages=[{"role": "user", "content": "hi"}], max_tokens=0), "max_tokens"),
    (dict(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}]), "end with a user"),
    (dict(messages=[{"role": "user", "content": "hi"}, {"role": "system", "content": "a"},
                    {"role": "user", "content": "b"}]), "must come before"),
    (dict(messages=[{"role": "tool", "content": "hi", "tool_call_id": "x"}]), "role 'tool'"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url",
                                                  "image_url": {"url": "https://x/y.png"}}]}]), "data URL"),
    (dict(messages=[{"role": "user", "content": [image_part("not base64!")]}]), "image_url[0]: not base64"),
    (dict(messages=[{"role": "user", "content": "quoting <image_placeholder>"}]), "holds <image_placeholder>"),
    (dict(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": [
        {"type": "refusal", "refusal": "no <image_placeholder>"}]}, {"role": "user", "content": "?"}]),
     "messages[1].content[0]: the text holds <image_placeholder>"),  # (a refusal part is text too)
    (dict(messages=[{"role": "user", "content": "hi"}], temperature=0, top_p=0.5), None),  # (top_p left to greedy)
    (dict(messages=[{"role": "user", "content": "hi"}], max_tokens=5000), "pass the model's 4096 positions"),
    (dict(messages=[{"role": "user", "content": "hi " * 1400}]), "pass the model's 4096 positions"),  # no room left
    (dict(messages=[{"role": "system", "content": "s" * 86100}, {"role": "user", "content": "hi"}]),
     "longer than the model's 4096 positions can hold"),
])
def test_chat_refuses_what_it_cannot_do(srv, kw, says):
    """What this model cannot do as asked is a 400 in OpenAI's error form naming it, never ignored silently (a
    top_p beside temperature 0 is no such thing: greedy has none)."""
    c = client(srv)
    if says is None:
        assert c.chat.completions.create(model=srv.label, max_tokens=2, **kw).choices[0].message.role == "assistant"
        return
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=srv.label, **kw)
    assert says in e.value.message and e.value.body["type"] == "invalid_request_error" and e.value.body["code"] is None


@pytest.mark.parametrize("kw, says", [(dict(size="1024x1024"), "size"), (dict(response_format="url"), "b64_json"),
                                      (dict(n=0), "n must be >= 1"), (dict(extra_body={"stream": True}), "stream")])
def test_images_refuse_what_they_cannot_do(srv, kw, says):
    with pytest.raises(openai.BadRequestError) as e:
        client(srv).images.generate(prompt="a square", **kw)
    assert says in e.value.message


def test_errors_on_openai_paths_are_openais_form(srv):
    """A GET of a POST path (405) and a body that is not JSON (400) on the OpenAI paths: {"error": {"message", "type",
    "param", "code"}}; serve's own paths keep {"error": message}."""
    port = srv.server_address[1]
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=30)
    err = json.loads(e.value.read())["error"]
    assert e.value.code == 405 and "POST it" in err["message"] and err["type"] == "invalid_request_error"
    status, out = call(srv, "/v1/chat/completions", raw=b"{not json")
    assert status == 400 and "not JSON" in out["error"]["message"] and out["error"]["param"] is None
    status, out = call(srv, "/v1/understand", raw=b"{not json")
    assert status == 400 and isinstance(out["error"], str)


def test_an_api_key_guards_the_v1_paths(monkeypatch):
    """--api-key (default $JANUS_RT_API_KEY): a /v1/ request without `Authorization: Bearer <key>`, or with another
    key, gets 401 (OpenAI's AuthenticationError in its SDK; serve's own paths' error form on theirs), before its body
    is read (an Expect: 100-continue is answered 401); with the key it is served; /health and /metrics stay open."""
    from janus_rt.cli import parser

    monkeypatch.setenv("JANUS_RT_API_KEY", "from-env")
    assert parser().parse_args(["serve"]).api_key == "from-env"
    monkeypatch.delenv("JANUS_RT_API_KEY")
    assert parser().parse_args(["serve"]).api_key is None
    with serving("127.0.0.1", api_key="s3cret") as s:
        port = s.server_address[1]
        for key in ("wrong", "s3cret2"):
            c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
            with pytest.raises(openai.AuthenticationError) as e:
                c.models.list()
            assert "Authorization: Bearer" in e.value.message and e.value.code == "invalid_api_key"
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in c.models.list()] == [s.label]
        status, out = call(s, "/v1/images", {"prompt": "a", "seed": 1})
        assert status == 401 and isinstance(out["error"], str)
        for path in ("/health", "/metrics"):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as r:
                assert r.status == 200
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/images", data=json.dumps({"prompt": "a"}).encode(),
                                     headers={"Authorization": "Bearer s3cret"})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.status == 200 and len(json.loads(r.read())["images"]) == 1
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"POST /v1/images HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\nExpect: 100-continue\r\n\r\n")
            answer = read_to_close(sock)
        assert answer.startswith(b"HTTP/1.1 401") and b"WWW-Authenticate: Bearer" in answer, answer[:200]


def test_a_chunked_body_on_an_openai_path_is_refused_in_openais_form(srv):
    """The 411 for a chunked body is an error on these paths too: {"error": {"message", "type", "param", "code"}}."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=30)
    try:
        conn.request("POST", "/v1/chat/completions", body=iter([b'{"messages": []}']),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        status, out = r.status, json.loads(r.read())
    finally:
        conn.close()
    assert status == 411 and "Content-Length" in out["error"]["message"]
    assert out["error"]["type"] == "invalid_request_error" and out["error"]["code"] is None


def test_chat_sampling_fields_reach_the_engine(srv, monkeypatch):
    """temperature, top_p and seed are passed on as asked (a temperature > 0 samples; none or 0 is greedy, seed 0);
    max_completion_tokens (the SDK's current name) is honoured, and wins over the deprecated max_tokens."""
    got = []
    real = srv.bg.submit_text
    monkeypatch.setattr(srv.bg, "submit_text", lambda ids, px, max_new, params, *a, **kw: got.append((max_new, params))
                        or real(ids, px, max_new, params, *a, **kw))
    c, msgs = client(srv), [{"role": "user", "content": "Hello"}]
    c.chat.completions.create(model=srv.label, messages=msgs, temperature=0.7, top_p=0.9, seed=5, max_tokens=3)
    max_new, p = got[-1]
    assert (max_new, p.greedy, p.temperature, p.top_p, p.seed) == (3, False, pytest.approx(0.7), 0.9, 5)
    c.chat.completions.create(model=srv.label, messages=msgs, max_completion_tokens=2, max_tokens=7)
    max_new, p = got[-1]
    assert (max_new, p.greedy, p.top_p, p.seed) == (2, True, 1.0, 0)
    a = c.chat.completions.create(model=srv.label, messages=msgs, temperature=1.5, seed=11, max_tokens=8)
    b = c.chat.completions.create(model=srv.label, messages=msgs, temperature=1.5, seed=11, max_tokens=8)
    assert a.choices[0].message.content == b.choices[0].message.content and got[-1][1].seed == 11


def _post_raw(srv, path, body):
    """POST body as JSON -> (status, headers, the raw answer text)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=60)
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, r, r.read().decode()
    finally:
        conn.close()


def _sse_data(raw):
    """An event stream's `data:` payloads, in order (comments skipped)."""
    assert raw.endswith("\n\n"), raw[-200:]
    return [line[len("data: "):] for block in raw.split("\n\n")[:-1] for line in block.split("\n")
            if line.startswith("data: ")]


def test_chat_answers_on_the_wire(srv):
    """What clients that do not use the SDK read: a chat.completion naming the served model, a fresh id and the time
    it was made; a stream of chat.completion.chunk data lines, each with a choice (no usage chunk unless
    stream_options.include_usage asks for it), ended by `data: [DONE]`."""
    import time

    body = {"model": "x", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3}
    answers = [json.loads(_post_raw(srv, "/v1/chat/completions", body)[2]) for _ in range(2)]
    for a in answers:
        assert a["object"] == "chat.completion" and a["model"] == srv.label and a["id"].startswith("chatcmpl-")
        assert abs(a["created"] - time.time()) < 60 and a["choices"][0]["logprobs"] is None
    assert answers[0]["id"] != answers[1]["id"]
    for options in (None, {"include_usage": False}):
        status, r, raw = _post_raw(srv, "/v1/chat/completions", dict(body, stream=True, stream_options=options))
        assert status == 200 and r.getheader("Content-Type") == "text/event-stream"
        *chunks, done = _sse_data(raw)
        assert done == "[DONE]" and len(chunks) >= 2
        chunks = [json.loads(c) for c in chunks]
        assert all(c["choices"] and "usage" not in c and c["choices"][0]["logprobs"] is None for c in chunks)
        assert all(c["object"] == "chat.completion.chunk" and c["model"] == srv.label
                   and abs(c["created"] - time.time()) < 60 for c in chunks)
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == answers[0]["choices"][0][
            "message"]["content"]
    *_, usage, done = _sse_data(_post_raw(srv, "/v1/chat/completions",
                                          dict(body, stream=True, stream_options={"include_usage": True}))[2])
    assert done == "[DONE]" and json.loads(usage)["usage"] == answers[0]["usage"]


def test_a_chat_stream_failing_midway_ends_with_an_openai_error(srv, monkeypatch):
    """A step failing once the stream has begun: its last data line is an error in OpenAI's form (which the SDK raises
    as an APIError), not serve's own {"error": message} event."""
    from test_serve import fail_after_the_first_step

    fail_after_the_first_step(srv, monkeypatch)
    status, _, raw = _post_raw(srv, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                             "max_tokens": 8, "stream": True})
    data = _sse_data(raw)
    assert status == 200 and json.loads(data[0])["choices"][0]["delta"]["role"] == "assistant"
    err = json.loads(data[-1])["error"]
    assert "MemoryError" in err["message"] and err["type"] == "server_error" and err["code"] is None
    srv.bg.engine.stats.decode_steps = 0  # (fails again after one step)
    with pytest.raises(openai.APIError, match="MemoryError"):
        list(client(srv).chat.completions.create(model=srv.label, messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=8, stream=True))


def test_an_api_key_is_matched_whole_on_every_v1_path():
    """Under --api-key every /v1/ path (serve's own and OpenAI's) wants the whole key: none, an empty one, a prefix of
    it, a longer one or another scheme is 401; the scheme's case does not matter (RFC 9110)."""
    with serving("127.0.0.1", api_key="s3cret") as s:
        port = s.server_address[1]

        def status(method, path, auth):
            req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                         data=b"{}" if method == "POST" else None,
                                         headers={} if auth is None else {"Authorization": auth})
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    return r.status
            except urllib.error.HTTPError as e:
                return e.code

        for auth in (None, "Bearer ", "Bearer s3cre", "Bearer s", "Bearer s3cret2", "Basic s3cret", "s3cret"):
            assert status("GET", "/v1/models", auth) == 401, auth
        for path in ("/v1/understand", "/v1/images", "/v1/chat/completions", "/v1/images/generations"):
            assert status("POST", path, None) == 401, path
            assert status("POST", path, "Bearer s3cre") == 401, path
            assert status("POST", path, "Bearer s3cret") == 400, path  # (let in: "{}" is then refused)
        assert status("GET", "/v1/models", "bearer s3cret") == status("GET", "/v1/models", "Bearer  s3cret ") == 200
        import http.client  # a client that sends its whole (large) body before it reads gets the 401, not a reset

        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.request("POST", "/v1/chat/completions", body=b"x" * (16 << 20), headers={"Authorization": "Bearer x"})
            r = conn.getresponse()
            assert r.status == 401 and json.loads(r.read())["error"]["code"] == "invalid_api_key"
        finally:
            conn.close()


def test_a_busy_server_is_a_rate_limit_in_openais_form():
    """--max-requests reached: a chat completion is OpenAI's 429 (the SDK's RateLimitError), its body OpenAI's error
    form with Retry-After."""
    from test_serve import busy_server

    with busy_server() as s:
        for query in ({}, {"api-version": "1"}):  # (a query string, as some clients add, changes nothing)
            c = openai.OpenAI(base_url=f"http://127.0.0.1:{s.server_address[1]}/v1", api_key="unused", max_retries=0,
                              default_query=query)
            with pytest.raises(openai.RateLimitError) as e:
                c.chat.completions.create(model=s.label, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
            assert "--max-requests 1" in e.value.message and e.value.body["type"] == "rate_limit_error"
            assert e.value.response.headers["Retry-After"] == "1"


def test_the_metrics_count_the_openai_paths_as_theirs(srv):
    """A chat completion and an images.generate are timed under their own endpoints in /metrics."""
    pytest.importorskip("prometheus_client")
    from test_serve import scrape

    def count(endpoint):
        return scrape(srv).get(("janus_rt_request_latency_seconds_count", frozenset({"endpoint": endpoint}.items())), 0)

    before = {p: count(p) for p in ("/v1/chat/completions", "/v1/images/generations", "/v1/understand", "/v1/images")}
    client(srv).chat.completions.create(model=srv.label, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    client(srv).images.generate(prompt="a", extra_body={"seed": 1})
    after = {p: count(p) for p in before}
    assert [after[p] - before[p] for p in before] == [1, 1, 0, 0]


@pytest.mark.parametrize("field, value", [
    ("logit_bias", {"1": 5}), ("presence_penalty", 0.5), ("frequency_penalty", -0.5), ("top_logprobs", 2),
    ("tool_choice", "auto"), ("functions", [{"name": "f"}]), ("function_call", "auto"), ("audio", {"voice": "x"}),
    ("modalities", ["text", "audio"]), ("prediction", {"type": "content", "content": "x"}), ("stop", "\n"),
    ("response_format", {"type": "json_schema", "json_schema": {}}), ("max_tokens", True),
])
def test_chat_request_refuses_each_field_it_cannot_honour(field, value):
    """Each of them, set to a value that asks for something, is a RequestError naming it (none is ignored)."""
    from janus_rt.openai_api import RequestError, chat_request

    with pytest.raises(RequestError, match=field):
        chat_request({"messages": [{"role": "user", "content": "hi"}], field: value})


def test_chat_request_takes_what_asks_for_nothing():
    """null (as many clients send every field), OpenAI's defaults and {"type": "text"} are no request at all; system
    and developer messages are both the system prompt, joined by a newline; a conversation must open with the user's
    turn; refusal parts are an assistant's only, and a data URL must hold an image."""
    from janus_rt.openai_api import _CHAT_UNSUPPORTED, RequestError, chat_request

    user = [{"role": "user", "content": "hi"}]
    nulls = dict.fromkeys(list(_CHAT_UNSUPPORTED) + ["response_format", "max_tokens", "max_completion_tokens"])
    defaults = {"n": 1, "stop": [], "tools": [], "tool_choice": "none", "logprobs": False, "top_logprobs": 0,
                "logit_bias": {}, "presence_penalty": 0, "frequency_penalty": 0, "response_format": {"type": "text"}}
    for extra in (nulls, defaults):
        assert chat_request({"messages": user, **extra}) == ([("user", "hi")], None, [], {
            "max_new_tokens": None, "temperature": None, "seed": None})
    msgs = [{"role": "developer", "content": "Be brief."}, {"role": "system", "content": "Use English."}] + user
    assert chat_request({"messages": msgs})[1] == "Be brief.\nUse English."
    for msgs, says in (([{"role": "assistant", "content": "a"}] + user, "begin and end with a user"),
                       ([{"role": "user", "content": [{"type": "refusal", "refusal": "no"}]}], "parts are"),
                       ([{"role": "user", "content": [{"type": "image_url", "image_url": {
                           "url": "data:text/plain;base64,aGk="}}]}], "data URL")):
        with pytest.raises(RequestError, match=says):
            chat_request({"messages": msgs})


def test_image_request_and_response():
    """images.generate fields this server cannot honour (another output format, partial images) are refused; the
    answer carries the creation time and the seed used (so an image can be drawn again)."""
    import time

    from janus_rt.openai_api import RequestError, image_request, image_response

    for field, value in (("output_format", "jpeg"), ("partial_images", 2), ("size", "384x768")):
        with pytest.raises(RequestError, match=field):
            image_request({"prompt": "a", field: value}, 384)
    assert image_request({"prompt": "a", "output_format": "png", "size": "384x384", "seed": 3}, 384)["seed"] == 3
    out = image_response({"images": ["QQ=="], "seed": 7})
    assert out["data"] == [{"b64_json": "QQ=="}] and out["seed"] == 7 and abs(out["created"] - time.time()) < 60
