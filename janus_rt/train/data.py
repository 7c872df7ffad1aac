"""JSONL manifests -> token samples for the three Janus training kinds.

A manifest holds one JSON record per line (paths relative to the manifest's folder):

    {"kind": "t2i",  "caption": str, "image": path}
    {"kind": "und",  "image": path | [path, ...],
                     "conversation": [{"role": "user", "content": "<image_placeholder>\\n..."},
                                      {"role": "assistant", "content": "..."}, ...]}
    {"kind": "text", "text": str}

Bad records are skipped and reported, never dropped silently: one `DataWarning` per record naming file and
line, a summary warning, and an entry (path, line, reason) in `ManifestDataset.skipped`. Blank lines are not
records and are ignored.

Generation images are tokenized once by the VQ encoder into safetensors shards (see `load_or_encode`);
understanding images go through `preprocess_fn` when their sample is built.

Sample layouts follow the official prompt formats (every sequence starts with BOS):
    t2i:  BOS "<|User|>: {caption}\\n\\n<|Assistant|>:" BOI  img_0 .. img_{N-1}  EOI
    und:  BOS "{system}\\n\\n<|User|>: " [BOI image_id*N EOI] "\\n{question}\\n\\n<|Assistant|>:" " {answer}" EOS ...
          (processing.encode_chat: the layout inference prompts with, each turn stripped as the official processor
          strips each message)
    text: BOS "{text}" EOS
Labels are already shifted: label[t] is the token at t+1 when t+1 is a loss token, else IGNORE. t2i puts its
targets in `image_labels` (positions BOI .. img_{N-2} predict img_0 .. img_{N-1} through the gen head; EOI is
never predicted, as at inference); und/text put theirs in `text_labels`.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from janus_rt.processing import IMAGE_TAG, SYSTEM_PROMPT, encode_chat, encode_generation_prompt  # (as inference)

IGNORE = -100
KINDS = ("t2i", "und", "text")
_ROLES = {"user": "user", "<|User|>": "user", "assistant": "assistant", "<|Assistant|>": "assistant"}
_TOKEN_ATTRS = ("bos_id", "eos_id", "pad_id", "boi_id", "eoi_id", "image_id")


class DataWarning(UserWarning):
    """A manifest record was skipped."""


@dataclass(frozen=True)
class Record:
    kind: str
    line: int                        # 1-based line in the manifest
    images: tuple[Path, ...] = ()    # resolved paths (t2i: one; und: one per <image_placeholder>)
    caption: str = ""                # t2i
    turns: tuple[tuple[str, str], ...] = ()  # und: ((role, content), ...), role in {"user", "assistant"}
    text: str = ""                   # text


@dataclass
class Sample:
    input_ids: torch.Tensor        # [T] int64; image-codebook ids where is_gen_image
    is_gen_image: torch.Tensor     # [T] bool
    text_labels: torch.Tensor      # [T] int64, IGNORE where no text loss
    image_labels: torch.Tensor     # [T] int64, IGNORE where no image loss
    pixel_values: torch.Tensor | None  # [n_img, 3, S, S] float (und), else None
    kind: str
    index: int                     # record index in the dataset

    def __len__(self) -> int:
        return self.input_ids.numel()


class _Bad(Exception):
    pass


def _image(value, base: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise _Bad(f"image must be a non-empty path string, got {value!r}")
    path = base / value
    if not path.is_file():
        raise _Bad(f"image not found: {path}")
    try:  # reads the header only; a file that fails to decode later is reported then
        with Image.open(path) as im:
            w, h = im.size
    except Exception as e:  # PIL raises several types for non-images
        raise _Bad(f"unreadable image {path}: {type(e).__name__}: {e}") from None
    if w < 1 or h < 1:
        raise _Bad(f"empty image {path}")
    return path


def _text(obj: dict, field: str) -> str:
    value = obj.get(field)
    if not isinstance(value, str):
        raise _Bad(f"missing {field}" if value is None else f"{field} must be a string")
    if not value.strip():
        raise _Bad(f"empty {field}")
    return value


def _no_tag(value: str, field: str) -> str:
    """A caption or text without IMAGE_TAG: the tokenizer reads it as the image placeholder id, which only an
    understanding image's block may hold (the training forward splices SigLIP features at every one of them)."""
    if IMAGE_TAG in value:
        raise _Bad(f"{IMAGE_TAG} in the {field} (only understanding records' user turns hold images)")
    return value


def _turns(conv) -> tuple[tuple[str, str], ...]:
    if not isinstance(conv, list) or not conv:
        raise _Bad("conversation must be a non-empty list")
    turns = []
    for i, msg in enumerate(conv):
        if not isinstance(msg, dict) or msg.get("role") not in _ROLES or not isinstance(msg.get("content"), str):
            raise _Bad(f"conversation[{i}] must be {{'role': 'user'|'assistant', 'content': str}}")
        role = _ROLES[msg["role"]]
        if role != ("user", "assistant")[i % 2]:
            raise _Bad(f"conversation[{i}]: roles must alternate user, assistant, ...")
        if role == "assistant" and not msg["content"].strip():
            raise _Bad(f"conversation[{i}]: empty assistant answer")
        if role == "assistant" and IMAGE_TAG in msg["content"]:
            raise _Bad(f"conversation[{i}]: {IMAGE_TAG} in an assistant turn")
        turns.append((role, msg["content"]))
    if turns[-1][0] != "assistant":
        raise _Bad("conversation must end with an assistant turn")
    return tuple(turns)


def parse_record(obj, line: int, base: Path) -> Record:
    """One manifest record -> Record; raises _Bad(reason) for a bad one."""
    if not isinstance(obj, dict):
        raise _Bad("record is not a JSON object")
    kind = obj.get("kind")
    if kind == "t2i":
        caption = _no_tag(_text(obj, "caption"), "caption")
        return Record("t2i", line, images=(_image(obj.get("image"), base),), caption=caption)
    if kind == "und":
        turns = _turns(obj.get("conversation"))
        raw = obj.get("image")
        images = tuple(_image(v, base) for v in (raw if isinstance(raw, list) else [raw]))
        n_tags = sum(content.count(IMAGE_TAG) for _, content in turns)
        if n_tags != len(images):
            raise _Bad(f"{n_tags} {IMAGE_TAG} tag(s) for {len(images)} image(s)")
        return Record("und", line, images=images, turns=turns)
    if kind == "text":
        return Record("text", line, text=_no_tag(_text(obj, "text"), "text"))
    raise _Bad(f"unknown kind {kind!r} (expected one of {KINDS})")


def report(skipped: list, path, line: int, reason: str) -> None:
    skipped.append((str(path), line, reason))
    warnings.warn(f"{path}:{line}: skipped: {reason}", DataWarning, stacklevel=3)


def read_manifest(path: str | Path) -> tuple[list[Record], list[tuple[str, int, str]]]:
    """Parse a JSONL manifest. Returns (records, skipped) with skipped = [(path, line, reason)]."""
    path = Path(path)
    base = path.parent
    records, skipped = [], []
    with open(path, "rb") as f:
        for line, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                try:
                    obj = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise _Bad(f"bad JSON: {e}") from None
                records.append(parse_record(obj, line, base))
            except _Bad as e:
                report(skipped, path, line, str(e))
    if skipped:
        warnings.warn(f"{path}: skipped {len(skipped)} of {len(records) + len(skipped)} records "
                      f"(see the warnings above / dataset.skipped)", DataWarning, stacklevel=2)
    return records, skipped


def load_gen_image(path: Path, image_size: int) -> torch.Tensor:
    """Centre-crop to a square, resize (bicubic, antialiased) to image_size; float [3, S, S] in [-1, 1]."""
    with Image.open(path) as im:
        im = im.convert("RGB")
    w, h = im.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    im = im.resize((image_size, image_size), Image.BICUBIC, box=box)
    x = torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1)  # [3, S, S] in [0, 255]
    return x / 127.5 - 1.0


def _cache_key(manifest: Path, items, image_size: int, num_image_tokens: int, cache_tag: str) -> str:
    h = hashlib.sha256(json.dumps([1, image_size, num_image_tokens, cache_tag]).encode())
    h.update(manifest.read_bytes())
    for line, path in items:  # a replaced image file changes its size or mtime
        st = path.stat()
        h.update(f"{line}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def load_or_encode(manifest: Path, items: list[tuple[int, Path]], encode_fn: Callable | None,
                   load_fn: Callable[[Path], torch.Tensor], *, image_size: int, num_image_tokens: int,
                   cache_dir: str | Path | None = None, cache_tag: str = "", batch_size: int = 16,
                   shard_size: int = 4096, log: Callable[[str], None] | None = None, log_every: float = 30.0):
    """Image tokens for the generation records `items` = [(manifest line, image path)], from the cache when
    it matches, else by running encode_fn once over all images and writing the cache.

    The cache is `{stem}.tok-{key}-{shard:05d}.safetensors` shards (tokens int32 [n, N], lines int64 [n]) and
    a `{stem}.tok-{key}.json` index written last, in cache_dir (default <manifest folder>/.janus_cache).
    key hashes the manifest bytes, image_size, num_image_tokens, cache_tag and each image's size and mtime,
    so any change rebuilds it; older `{stem}.tok-*` files are removed then. Build it on one process before
    starting several that share the folder.
    log: called with a line when encoding starts, every `log_every` seconds while it runs (images done, rate),
    and when it ends (the encoder runs over every generation image once: hours for a large set on a large VQ).
    Returns (tokens int32 [n, N], {line: row}, failed [(line, reason)] for images that did not decode).
    """
    none = torch.zeros(0, num_image_tokens, dtype=torch.int32)
    if not items:
        return none, {}, []
    cache = Path(cache_dir) if cache_dir is not None else manifest.parent / ".janus_cache"
    prefix = f"{manifest.stem}.tok-"
    key = _cache_key(manifest, items, image_size, num_image_tokens, cache_tag)
    index = cache / f"{prefix}{key}.json"
    if index.is_file():
        meta = json.loads(index.read_text())
        shards = [load_file(cache / name) for name in meta["shards"]]
        tokens = torch.cat([none] + [s["tokens"] for s in shards])
        lines = [line for s in shards for line in s["lines"].tolist()]
        return tokens, {line: row for row, line in enumerate(lines)}, [tuple(f) for f in meta["failed"]]
    if encode_fn is None:
        raise ValueError(f"no image-token cache for {manifest} in {cache} and no encode_fn to build it")

    chunks, lines, failed, batch, batch_lines = [], [], [], [], []
    t0 = last = time.monotonic()
    if log is not None:
        log(f"{manifest}: encoding {len(items)} generation images with the VQ into the token cache {cache} "
            f"(once; later runs read it)")

    def run():
        with torch.no_grad():
            out = encode_fn(torch.stack(batch))  # [b, N]
        if (not isinstance(out, torch.Tensor) or out.shape != (len(batch), num_image_tokens)
                or out.is_floating_point()):
            raise ValueError(f"encode_fn must return integer ids [{len(batch)}, {num_image_tokens}], got "
                             f"{getattr(out, 'dtype', type(out))} {tuple(getattr(out, 'shape', ()))}")
        chunks.append(out.to(device="cpu", dtype=torch.int32))
        lines.extend(batch_lines)
        batch.clear()
        batch_lines.clear()

    for line, path in items:
        try:
            batch.append(load_fn(path))
        except Exception as e:  # passed the header check at parse time, failed to decode now
            failed.append((line, f"unreadable image {path}: {type(e).__name__}: {e}"))
            continue
        batch_lines.append(line)
        if len(batch) == batch_size:
            run()
            if log is not None and time.monotonic() - last >= log_every:
                last = time.monotonic()
                done = len(lines) + len(failed)
                log(f"  {done}/{len(items)} images encoded ({done / (last - t0):.1f} images/s)")
    if batch:
        run()
    tokens = torch.cat([none] + chunks)
    lines_t = torch.tensor(lines, dtype=torch.int64)

    cache.mkdir(parents=True, exist_ok=True)
    for old in cache.glob(prefix + "*"):
        if not old.name.startswith(prefix + key):
            old.unlink()
    names = []
    for s in range(0, len(tokens), shard_size):
        names.append(f"{prefix}{key}-{s // shard_size:05d}.safetensors")
        save_file({"tokens": tokens[s:s + shard_size].contiguous(), "lines": lines_t[s:s + shard_size].contiguous()},
                  str(cache / names[-1]))
    tmp = index.with_suffix(".tmp")
    tmp.write_text(json.dumps({"manifest": str(manifest), "num_images": len(tokens), "shards": names,
                               "failed": failed}))
    os.replace(tmp, index)  # the index appears only once every shard is written
    if log is not None:
        log(f"{manifest}: {len(tokens)} images encoded in {time.monotonic() - t0:.1f} s"
            + (f" ({len(failed)} did not decode)" if failed else ""))
    return tokens, {line: row for row, line in enumerate(lines)}, failed


class ManifestDataset:
    """Records of one manifest, turned into `Sample`s on demand.

    tok: duck-typed tokenizer, `encode(text) -> list[int]` (no BOS) and the ids bos_id, eos_id, pad_id,
         boi_id, eoi_id, image_id.
    encode_fn: pixels float [B, 3, S, S] in [-1, 1] -> int [B, num_image_tokens] (only called when the token
         cache is missing or stale). preprocess_fn: PIL.Image -> float [3, S', S'] (understanding tower).
    image_size: side S the generation images are centre-cropped and resized to before encode_fn.
    log: progress lines of a token-cache build (see `load_or_encode`).
    cache_dir: where the token shards live (default: <manifest folder>/.janus_cache). cache_tag: any string
         naming the VQ encoder, part of the cache key.
    cfg_drop: probability that a t2i sample becomes the unconditional form (every prompt token but BOS and
         BOI replaced by pad), decided per (seed, index, draw) so it is reproducible.
    """

    def __init__(self, manifest: str | Path, tok, num_image_tokens: int,
                 encode_fn: Callable | None = None, preprocess_fn: Callable | None = None, *,
                 image_size: int = 384, cache_dir: str | Path | None = None, cache_tag: str = "",
                 cfg_drop: float = 0.1, seed: int = 0, system_prompt: str = SYSTEM_PROMPT,
                 encode_batch_size: int = 16, shard_size: int = 4096, log: Callable[[str], None] | None = None):
        missing = [a for a in _TOKEN_ATTRS if not isinstance(getattr(tok, a, None), int)]
        if missing or not callable(getattr(tok, "encode", None)):
            raise ValueError(f"tokenizer needs encode() and integer ids {_TOKEN_ATTRS}; missing {missing}")
        if not 0.0 <= cfg_drop <= 1.0:
            raise ValueError(f"cfg_drop must be in [0, 1], got {cfg_drop}")
        self.manifest = Path(manifest)
        self.tok, self.num_image_tokens = tok, num_image_tokens
        self.preprocess_fn, self.cfg_drop, self.seed = preprocess_fn, cfg_drop, seed
        self.system_prompt = system_prompt
        records, self.skipped = read_manifest(self.manifest)
        if preprocess_fn is None and any(r.kind == "und" for r in records):
            raise ValueError(f"{self.manifest} has understanding records but no preprocess_fn was given")

        gen = [r for r in records if r.kind == "t2i"]
        self.image_tokens, rows, failed = load_or_encode(
            self.manifest, [(r.line, r.images[0]) for r in gen], encode_fn,
            lambda p: load_gen_image(p, image_size), image_size=image_size,
            num_image_tokens=num_image_tokens, cache_dir=cache_dir, cache_tag=cache_tag,
            batch_size=encode_batch_size, shard_size=shard_size, log=log)
        self._token_row = rows  # manifest line -> row of image_tokens [n_t2i, N] int32
        for line, reason in failed:
            report(self.skipped, self.manifest, line, reason)
        bad = {line for line, _ in failed}
        self.records = [r for r in records if r.line not in bad]
        self.indices = {k: [i for i, r in enumerate(self.records) if r.kind == k] for k in KINDS}
        self._failed: set[int] = set()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Sample | None:
        return self.sample(i, draw=i)

    def sample(self, i: int, draw: int = 0) -> Sample | None:
        """The sample of record i; `draw` (the sampler's draw counter) seeds the CFG drop. None when an
        understanding image fails to decode (reported once, like a bad record)."""
        rec = self.records[i]
        if rec.kind == "t2i":
            uncond = np.random.default_rng([self.seed, i, draw]).random() < self.cfg_drop
            return self._t2i(i, rec, uncond)
        if rec.kind == "und":
            return self._und(i, rec)
        return self._text(i, rec)

    def _t2i(self, i: int, rec: Record, uncond: bool) -> Sample:
        t, n = self.tok, self.num_image_tokens
        prompt = encode_generation_prompt(t, rec.caption)  # BOS, the template, BOI
        if uncond:  # the CFG unconditional row: prompt[1:-1] -> pad
            prompt = [prompt[0]] + [t.pad_id] * (len(prompt) - 2) + [prompt[-1]]
        img = self.image_tokens[self._token_row[rec.line]].long()  # [N]
        p = len(prompt)
        ids = torch.cat([torch.tensor(prompt), img, torch.tensor([t.eoi_id])])
        is_gen = torch.zeros(p + n + 1, dtype=torch.bool)
        is_gen[p:p + n] = True
        image_labels = torch.full((p + n + 1,), IGNORE)
        image_labels[p - 1:p - 1 + n] = img  # BOI predicts img_0, img_k predicts img_{k+1}
        return Sample(ids, is_gen, torch.full_like(ids, IGNORE), image_labels, None, "t2i", i)

    def _und(self, i: int, rec: Record) -> Sample | None:
        ids, loss = encode_chat(self.tok, rec.turns, self.num_image_tokens, self.system_prompt)
        try:
            pixels = torch.stack([self._preprocess(p) for p in rec.images])  # [n_img, 3, S, S]
        except Exception as e:
            if i not in self._failed:
                self._failed.add(i)
                report(self.skipped, self.manifest, rec.line, f"unreadable image: {type(e).__name__}: {e}")
            return None
        ids_t = torch.tensor(ids)
        text_labels = torch.full_like(ids_t, IGNORE)
        target = torch.tensor(loss[1:])
        text_labels[:-1][target] = ids_t[1:][target]
        return Sample(ids_t, torch.zeros_like(ids_t, dtype=torch.bool), text_labels,
                      torch.full_like(ids_t, IGNORE), pixels, "und", i)

    def _preprocess(self, path: Path) -> torch.Tensor:
        with Image.open(path) as im:
            x = self.preprocess_fn(im.convert("RGB"))
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[0] != 3:
            raise ValueError(f"preprocess_fn must return a float tensor [3, S, S], got {getattr(x, 'shape', x)}")
        return x

    def _text(self, i: int, rec: Record) -> Sample:
        t = self.tok
        ids = torch.tensor([t.bos_id] + t.encode(rec.text) + [t.eos_id])
        text_labels = torch.full_like(ids, IGNORE)
        text_labels[:-1] = ids[1:]
        return Sample(ids, torch.zeros_like(ids, dtype=torch.bool), text_labels,
                      torch.full_like(ids, IGNORE), None, "text", i)
