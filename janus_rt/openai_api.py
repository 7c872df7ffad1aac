"""OpenAI-compatible requests and answers for `janus-rt serve`, so that clients written for OpenAI's API (its SDKs,
chat front ends) use the server unchanged. Translation only: the work is serve's own endpoints'.

    GET  /v1/models              -> {"object": "list", "data": [{"id": <the served model>, "object": "model", ...}]}
    POST /v1/chat/completions    understanding: {"messages": [...], "max_completion_tokens" (or "max_tokens"): the
                                 room left in the context and the KV cache, "temperature": 0 (greedy, Janus' own
                                 default; OpenAI's is 1), "top_p": 1, "seed": 0, "stream": false,
                                 "stream_options": {"include_usage": false}}
                                 -> a chat.completion, or chat.completion.chunk events then `data: [DONE]`
    POST /v1/images/generations  generation: {"prompt", "n": 1, "size": the model's ("384x384") or "auto",
                                 "response_format": "b64_json"} and /v1/images' own "seed", "cfg", "temperature",
                                 "top_k", "top_p", "greedy" -> {"created", "data": [{"b64_json": PNG}, ...], "seed"}

Messages: "system" (or "developer") ones first, in place of Janus' system prompt; then "user" and "assistant" turns,
a user's last (consecutive messages of one role are joined by a newline). A user's content is a string or a list of
parts, {"type": "text", "text": ...} and {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
each image where it stands (data URLs only: the server fetches nothing); an assistant's a string, text or refusal
parts, or null. As the official processor, each message is stripped of surrounding whitespace. "model", "user",
"quality", "style" and other fields that change nothing here are ignored; what this model cannot do as asked (n > 1
choices, tools, logprobs, stop sequences, penalties, a size other than its own, image URLs, other output formats) is
a 400 naming it.
Errors on these paths are OpenAI's {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import re
import time
import uuid

from janus_rt.processing import IMAGE_TAG

CHAT_PATH, IMAGES_PATH, MODELS_PATH = "/v1/chat/completions", "/v1/images/generations", "/v1/models"

# chat fields this server cannot honour -> the values that ask for nothing (anything else is refused)
_CHAT_UNSUPPORTED = {"n": (1,), "tools": ([],), "tool_choice": ("none",), "functions": ([],),
                     "function_call": ("none",), "logprobs": (False,), "top_logprobs": (0,), "logit_bias": ({},),
                     "stop": ([], ""), "frequency_penalty": (0,), "presence_penalty": (0,), "audio": (),
                     "modalities": (["text"],), "prediction": ()}
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                405: "invalid_request_error", 411: "invalid_request_error", 429: "rate_limit_error",
                503: "service_unavailable"}


class RequestError(ValueError):
    """What the client sent cannot be served (serve answers 400)."""


def error_body(code: int, message: str) -> dict:
    """OpenAI's error form (its "code" a string or null, as OpenAI's: the HTTP status says the rest)."""
    return {"error": {"message": message, "type": _ERROR_TYPES.get(code, "server_error"), "param": None,
                      "code": "invalid_api_key" if code == 401 else None}}


def models(label: str) -> dict:
    return {"object": "list", "data": [{"id": label, "object": "model", "created": 0, "owned_by": "janus_rt"}]}


# ---- images ------------------------------------------------------------------------------------------------------
def image_request(body: dict, image_size: int) -> dict:
    """An images.generate body -> /v1/images' body (its own fields pass as they are)."""
    size = body.get("size")
    if size not in (None, "auto", f"{image_size}x{image_size}"):
        raise RequestError(f"size: this model draws {image_size}x{image_size} images only, got {size!r}")
    if body.get("response_format") not in (None, "b64_json"):
        raise RequestError(f"response_format: only 'b64_json' (the server keeps no files to link to), "
                           f"got {body['response_format']!r}")
    if body.get("output_format") not in (None, "png"):
        raise RequestError(f"output_format: only 'png', got {body['output_format']!r}")
    if body.get("stream") or body.get("partial_images"):
        raise RequestError("stream / partial_images: not on this path (POST /v1/images with \"stream\": true "
                           "streams each step's progress)")
    return {k: v for k, v in body.items() if k != "stream"}


def image_response(out: dict) -> dict:
    """/v1/images' answer -> an images.generate answer (and the seed, which OpenAI's has not)."""
    return {"created": int(time.time()), "data": [{"b64_json": png} for png in out["images"]], "seed": out["seed"]}


# ---- chat --------------------------------------------------------------------------------------------------------
def chat_request(body: dict) -> tuple[list[tuple[str, str]], str | None, list[str], dict]:
    """A chat.completions body -> (turns [(role, text with an IMAGE_TAG per image)], the system prompt or None for
    Janus' own, the images as base64, /v1/understand's sampling fields)."""
    for key, fine in _CHAT_UNSUPPORTED.items():
        if body.get(key) is not None and body[key] not in fine:
            raise RequestError(f"{key}: not supported by this server (got {body[key]!r})")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise RequestError(f"response_format: only {{'type': 'text'}}, got {fmt!r}")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages: a non-empty list of {\"role\", \"content\"} is required")
    system, turns, images = [], [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(f"messages[{i}]: an object with \"role\" and \"content\" is needed")
        role = m.get("role")
        if role in ("system", "developer"):
            if turns:
                raise RequestError(f"messages[{i}]: a {role} message must come before the conversation's turns")
            system.append(_text(m.get("content"), f"messages[{i}]", images=None))
        elif role in ("user", "assistant"):
            content = m.get("content")
            if role == "assistant" and content is None:  # (an assistant turn that called tools: no text)
                content = ""
            text = _text(content, f"messages[{i}]", images if role == "user" else None)
            if turns and turns[-1][0] == role:
                turns[-1] = (role, turns[-1][1] + "\n" + text)
            else:
                turns.append((role, text))
        else:
            raise RequestError(f"messages[{i}]: role {role!r} is not served (system, developer, user, assistant)")
    if not turns or turns[0][0] != "user" or turns[-1][0] != "user":
        raise RequestError("messages: the turns must begin and end with a user message")
    max_tokens = body.get("max_completion_tokens")
    max_tokens = body.get("max_tokens") if max_tokens is None else max_tokens
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise RequestError(f"max_completion_tokens (max_tokens): an int >= 1, got {max_tokens!r}")
    native = {"max_new_tokens": max_tokens,
              "temperature": body.get("temperature"), "seed": body.get("seed")}
    if native["temperature"] not in (None, 0):  # (greedy has no top_p; OpenAI's clients send one all the same)
        native["top_p"] = body.get("top_p")
    return turns, "\n".join(system) if system else None, images, native


def _text(content, where: str, images: list | None) -> str:
    """A message's content -> its text, each image part an IMAGE_TAG (its base64 appended to `images`; None: a
    message that holds no images)."""
    if isinstance(content, str):
        parts = [{"type": "text", "text": content}]
    elif isinstance(content, list):
        parts = content
    else:
        raise RequestError(f"{where}.content: a string or a list of parts is needed")
    out = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if ((kind == "text" or kind == "refusal" and images is None)  # (a refusal: an assistant's)
                and isinstance(part.get(kind), str)):
            if IMAGE_TAG in part[kind]:
                raise RequestError(f"{where}.content[{j}]: the text holds {IMAGE_TAG} (send images as image_url)")
            out.append(part[kind])
        elif kind == "image_url" and images is not None:
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            match = re.fullmatch(r"data:image/[\w.+-]+;base64,(.*)", url, re.S) if isinstance(url, str) else None
            if match is None:
                raise RequestError(f"{where}.content[{j}]: an image must be a data URL (data:image/png;base64,...); "
                                   "the server fetches nothing")
            images.append(match.group(1))
            out.append(IMAGE_TAG + "\n")
        else:
            raise RequestError(f"{where}.content[{j}]: parts are {{'type': 'text', 'text'}}"
                               + (" or {'type': 'image_url', 'image_url': {'url'}}" if images is not None else ""))
    return "".join(out)


def chat_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def chat_response(answer: dict, model: str, cid: str, created: int) -> dict:
    """/v1/understand's answer (with its prompt_tokens and finish_reason) -> a chat.completion."""
    return {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer["answer"]},
                         "finish_reason": answer["finish_reason"], "logprobs": None}],
            "usage": usage(answer)}


def usage(answer: dict) -> dict:
    return {"prompt_tokens": answer["prompt_tokens"], "completion_tokens": answer["tokens"],
            "total_tokens": answer["prompt_tokens"] + answer["tokens"]}


def chat_chunk(cid: str, created: int, model: str, delta: dict, finish_reason: str | None = None) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
