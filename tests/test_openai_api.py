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
