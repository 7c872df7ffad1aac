"""Prompt templates and image pre/post-processing, as the official Janus-Pro processor does them."""
from __future__ import annotations

import operator
import os

import numpy as np
import torch

from janus_rt.tokenizer import SPECIAL_TOKENS

IMAGE_TAG = SPECIAL_TOKENS["image_id"]  # "<image_placeholder>": where an understanding prompt's image goes

SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)


def generation_prompt(prompt: str) -> str:
    """Text-to-image prompt (no system prompt); the caller appends <begin_of_image>. The prompt is stripped, as the
    official processor strips each message (its generation code templates the prompt as a user turn)."""
    return f"<|User|>: {prompt.strip()}\n\n<|Assistant|>:"


def understanding_prompt(question: str, num_images: int = 1) -> str:
    """System prompt + one user turn whose images come first (one <image_placeholder> each)."""
    images = f"{IMAGE_TAG}\n" * num_images
    return f"{SYSTEM_PROMPT}\n\n<|User|>: {images}{question}\n\n<|Assistant|>:"


def encode_generation_prompt(tok, prompt: str) -> list[int]:
    """BOS + template + <begin_of_image>: the ids a text-to-image request starts from."""
    return [tok.bos_id] + tok.encode(generation_prompt(prompt)) + [tok.boi_id]


def encode_understanding_prompt(tok, question: str, num_images: int = 1, num_image_tokens: int = 576) -> list[int]:
    """BOS + system + user turn, each <image_placeholder> expanded to BOI + N placeholders + EOI; the question stripped
    of surrounding whitespace, as the official processor strips each message."""
    return [tok.bos_id] + encode_with_images(tok, understanding_prompt(question.strip(), num_images), num_image_tokens)


def encode_conversation(tok, turns, num_image_tokens: int = 576, system: str = SYSTEM_PROMPT) -> list[int]:
    """A chat's ids, as the official DeepSeek template lays them out (encode_chat); turns alternate user and
    assistant and end with the user's, the ids ending "<|Assistant|>:" for the answer to follow. One user turn is
    encode_understanding_prompt's ids when its text is "<image_placeholder>\n" per image, then the question."""
    if not turns or turns[-1][0] != "user":
        raise ValueError(f"turns must alternate user, assistant, ..., user; got {[role for role, _ in turns]}")
    return encode_chat(tok, turns, num_image_tokens, system)[0]


def encode_chat(tok, turns, num_image_tokens: int = 576, system: str = SYSTEM_PROMPT) -> tuple[list[int], list[bool]]:
    """A chat's ids and which of them are answers (each assistant turn's text and its EOS: training's loss tokens),
    in the official DeepSeek template:
        BOS "{system}\n\n<|User|>: {user}\n\n<|Assistant|>:" " {answer}" EOS "<|User|>: {user}\n\n<|Assistant|>:" ...
    turns: [(role, text), ...], "user" and "assistant" alternating from the user's; ending with an assistant turn
    (a training record) or a user turn (a prompt). An image is an <image_placeholder> in a user's text (expanded to
    BOI + N placeholders + EOI). Each turn's text is stripped, and the system prompt's start, as the official
    processor strips each message and the whole prompt (an earlier answer sent back with its leading space is
    "<|Assistant|>: text", not two spaces; a turn that ends with its image has no third newline). An answer is
    encoded apart from the prompt before it, as the model generates it after "<|Assistant|>:"; DeepSeek's
    pre-tokenizer (and GPT-2's) splits at that space anyway, so these are the whole string's ids (tested)."""
    roles = [role for role, _ in turns]
    if not roles or roles[::2] != ["user"] * len(roles[::2]) or roles[1::2] != ["assistant"] * len(roles[1::2]):
        raise ValueError(f"turns must alternate user, assistant, ...; got {roles}")
    ids, answer = [tok.bos_id], [False]
    text = f"{system}\n\n".lstrip() if system else ""  # prompt text not yet encoded

    def add(new: list[int], is_answer: bool):
        ids.extend(new)
        answer.extend([is_answer] * len(new))

    for role, content in turns:
        content = content.strip()
        if role == "user":
            text += f"<|User|>: {content}\n\n<|Assistant|>:"
        else:
            if IMAGE_TAG in content:
                raise ValueError(f"an assistant turn holds {IMAGE_TAG} (only user turns hold images)")
            add(encode_with_images(tok, text, num_image_tokens), False)
            add(tok.encode(f" {content}") + [tok.eos_id], True)
            text = ""
    if text:
        add(encode_with_images(tok, text, num_image_tokens), False)
    return ids, answer


def encode_with_images(tok, text: str, num_image_tokens: int) -> list[int]:
    """text's ids, each <image_placeholder> in it BOI + num_image_tokens placeholder ids + EOI; the text between
    the tags encoded apart, as a tokenizer that holds the tag as a special token splits there too."""
    first, *rest = text.split(IMAGE_TAG)
    out = tok.encode(first)
    for piece in rest:
        out += [tok.boi_id] + [tok.image_id] * num_image_tokens + [tok.eoi_id] + tok.encode(piece)
    return out


def unconditional_ids(prompt_ids: list[int] | torch.Tensor, pad_id: int):
    """The CFG unconditional row: every token but the first (BOS) and the last (<begin_of_image>) -> pad."""
    ids = torch.as_tensor(prompt_ids).clone()
    ids[..., 1:-1] = pad_id
    return ids


def preprocess_image(img, image_size: int = 384, min_size: int = 14) -> torch.Tensor:
    """PIL image -> float [3, S, S] in [-1, 1]: long side to S (bicubic, antialiased), centred on a
    (127, 127, 127) square, /255, (x - 0.5) / 0.5."""
    from PIL import Image

    img = img.convert("RGB")
    w, h = img.size
    m = max(w, h)
    new_w, new_h = max(int(w / m * image_size), min_size), max(int(h / m * image_size), min_size)
    img = img.resize((new_w, new_h), Image.BICUBIC)
    side = max(new_w, new_h)
    canvas = Image.new("RGB", (side, side), (127, 127, 127))
    canvas.paste(img, ((side - new_w) // 2, (side - new_h) // 2))
    if side != image_size:  # min_size can leave a side just off the target; the official code does the same
        canvas = canvas.resize((image_size, image_size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - 0.5) / 0.5


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """Decoded pixels [B, 3, H, W] roughly in [-1, 1] -> uint8 [B, H, W, 3] as the official code:
    clip((x + 1) / 2 * 255, 0, 255) truncated."""
    x = ((pixels.float().permute(0, 2, 3, 1) + 1) / 2 * 255).clamp(0, 255)
    return x.to(torch.uint8).cpu().numpy()


def to_pil(pixels: torch.Tensor):
    from PIL import Image

    return [Image.fromarray(a) for a in to_uint8(pixels)]


def request_images(model, req) -> list:
    """A finished image request's tokens [n][N] through the VQ decoder -> its n PIL images."""
    with torch.inference_mode():
        return to_pil(model.decode_image_tokens(torch.tensor(req.tokens, device=model.device)))


def image_grid(images, cols: int | None = None, min_side: int = 0, gap: int = 0):
    """Tile PIL images (all one size) into one grid image, `gap` white pixels between tiles. Tiles smaller than
    `min_side` are enlarged by the smallest whole factor that reaches it, pixels repeated (no blur), so that a grid
    of small images (the embedded model's 32 px) can be looked at."""
    from PIL import Image

    n = len(images)
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = (n + cols - 1) // cols
    w, h = images[0].size
    scale = max(1, -(-min_side // min(w, h)))
    w, h = w * scale, h * scale
    grid = Image.new("RGB", (cols * w + (cols - 1) * gap, rows * h + (rows - 1) * gap), (255, 255, 255))
    for i, im in enumerate(images):
        if scale > 1:
            im = im.resize((w, h), Image.NEAREST)
        grid.paste(im, ((i % cols) * (w + gap), (i // cols) * (h + gap)))
    return grid


GRID_ROWS = 32  # prompts shown in generate_images' grid.png (one row each)


def _png_text(entries: dict):
    """PNG text chunks: "janus_rt" (the version) and "parameters" (the entries as JSON; one chunk, so any PNG reader
    shows what made the image)."""
    import json

    from PIL.PngImagePlugin import PngInfo

    from janus_rt import __version__

    meta = PngInfo()
    meta.add_text("janus_rt", __version__)
    meta.add_text("parameters", json.dumps(entries, ensure_ascii=False, default=str))
    return meta


def png_parameters(path) -> dict:
    """What generate_images wrote into a PNG it saved (the "parameters" text chunk); {} for another PNG."""
    import json

    from PIL import Image

    with Image.open(path) as im:
        text = im.text.get("parameters") if hasattr(im, "text") else None
    try:
        d = json.loads(text) if text else {}
    except json.JSONDecodeError:  # another program's "parameters" (some write plain text there)
        return {}
    return d if isinstance(d, dict) else {}


def generate_images(model, tok, prompts: list[str], n: int = 4, cfg_weight: float | None = None,
                    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0, greedy: bool = False,
                    out_dir=None, engine=None, progress: bool = True, max_grid_rows: int = GRID_ROWS,
                    keep_images: bool = True, info: dict | None = None, written: list | None = None):
    """Text prompts (a list; a string is one prompt) -> PIL images (n per prompt, prompts batched in one engine run;
    prompt k samples with seed + k; cfg_weight None: the checkpoint's guidance_scale where it has one, else 5, as
    `janus-rt generate`). With `out_dir`, also writes img_<prompt>_<i>.png (the decoder's size; each prompt's as soon as
    its request finishes: a run longer than the KV cache holds at once keeps each wave of prompts it has finished) and
    at the end grid.png (one row per prompt for the first max_grid_rows prompts, 2 px apart; tiles enlarged to >= 128 px
    a side). <prompt> is the prompt's index in `prompts`, 2 digits, more from 101 prompts on. Returns (images per
    prompt, engine); with keep_images=False (and out_dir) the prompts past the grid's get None instead of their images,
    which are on disk (a long list of prompts is not held in memory). Each PNG carries the settings that made it as PNG
    text (`png_parameters`): the prompt, its seed, the image's index, the sampling settings, `info`'s entries (values
    JSON cannot hold are written as text). The same model, dtype and settings give the same image (on one machine:
    another CPU's or GPU's kernels may round differently). Each PNG appears whole (written beside it, then renamed) and,
    once it has, its path is appended to `written` where one is given."""
    from pathlib import Path

    from janus_rt.engine import Engine, SamplingParams
    from janus_rt.errors import UsageError, check_count

    if isinstance(prompts, str):  # one prompt (iterated, a string was a prompt per character)
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise UsageError("no prompts given")
    n = check_count("n", n)  # (before an engine is sized from it)
    try:  # every prompt's seed (seed + k) a seed, before any request is added
        for s in (seed, operator.index(seed) + len(prompts) - 1):
            SamplingParams(seed=s)
    except (ValueError, TypeError):
        raise UsageError(f"seed must be an int with seed + {len(prompts) - 1} (prompt k samples with seed + k) in "
                         f"[0, 2^64), got {seed!r}") from None
    seed = operator.index(seed)  # (a numpy int's seed + k would wrap at 2^63)
    if cfg_weight is None:  # as `janus-rt generate`: the checkpoint's guidance_scale, else Janus-Pro's 5
        w = getattr(model, "guidance_scale", None)
        cfg_weight = 5.0 if w is None else w
    ids = [encode_generation_prompt(tok, p) for p in prompts]
    eng = engine or Engine.for_requests(model, [(len(i), n) for i in ids])
    reqs = [eng.add_image_request(i, n=n, params=SamplingParams(cfg_weight=cfg_weight, temperature=temperature,
                                                                top_k=top_k, top_p=top_p, greedy=greedy,
                                                                seed=seed + k))
            for k, i in enumerate(ids)]
    index = {r.req_id: k for k, r in enumerate(reqs)}
    settings = {"n": int(n), "cfg_weight": float(cfg_weight), "temperature": float(temperature), "top_k": int(top_k),
                "top_p": float(top_p), "greedy": bool(greedy)}
    out: list = [None] * len(reqs)
    d = None if out_dir is None else Path(out_dir)
    width = max(2, len(str(len(reqs) - 1)))

    def finished(req):
        k = index.get(req.req_id)
        if k is None:  # another request the caller's engine held
            return
        out[k] = request_images(model, req)
        if d is not None:
            d.mkdir(parents=True, exist_ok=True)
            for i, im in enumerate(out[k]):
                text = {"prompt": prompts[k], "seed": int(seed) + k, "image": i, **settings, **(info or {})}
                path = d / f"img_{k:0{width}d}_{i:02d}.png"
                tmp = path.with_name(path.name + ".tmp")
                try:  # written beside, then renamed: a Ctrl-C mid-write leaves no broken PNG, nor the part
                    im.save(tmp, format="PNG", pnginfo=_png_text(text))
                    os.replace(tmp, path)
                except BaseException:
                    tmp.unlink(missing_ok=True)
                    raise
                if written is not None:
                    written.append(path)
            if not keep_images and k >= max_grid_rows:
                out[k] = None

    eng.run(progress=progress, desc="image tokens", on_finish=finished,
            finish_note=f"decoding {n} image(s)" + (", writing PNGs" if d is not None else ""))
    if d is not None:
        rows = out[:max_grid_rows]
        image_grid([im for images in rows for im in images], cols=n, min_side=128, gap=2).save(d / "grid.png")
    return out, eng
