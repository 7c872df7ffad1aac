"""A built-in synthetic dataset: flat coloured shapes on flat coloured backgrounds.

`make_synthetic` writes PNGs and a JSONL manifest in the format `janus_rt.train.data` reads, with all three
record kinds (text-to-image, understanding, text-only). Every image uses exact palette colours, so an
evaluation can check a generated image against its caption with `dominant_colors` / `caption_colors` /
`caption_color_match`.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# name -> RGB; far enough apart that nearest-palette assignment is unambiguous on clean images
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 30),
    "orange": (245, 135, 20),
    "purple": (130, 40, 170),
    "pink": (245, 130, 200),
    "cyan": (40, 210, 225),
    "brown": (120, 70, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
_ALIASES = {"grey": "gray", "violet": "purple"}

# name -> number of corners (0 for a circle)
SHAPES: dict[str, int] = {
    "circle": 0, "square": 4, "triangle": 3, "diamond": 4, "pentagon": 5, "hexagon": 6, "star": 10,
}

QUESTIONS = {
    "shape": "What shape is in the image?",
    "color": "What colour is the shape?",
    "background": "What colour is the background?",
    "describe": "Describe the image.",
}

# Other wordings of each question: make_synthetic(..., wordings=True) asks each understanding record's question in
# one of QUESTIONS' and these, drawn at random; HELDOUT_WORDINGS are never written to a training set, so that
# `evaluate --understanding-wordings heldout` can see whether answers carry over to wordings a model never saw.
WORDINGS = {
    "shape": ("What shape is this?", "What is the shape?", "Which shape is in the picture?",
              "What shape do you see?", "Name the shape.", "What kind of shape is it?", "What shape is shown?"),
    "color": ("What color is the shape?", "What colour is it?", "What color is it?", "What is the colour of the shape?",
              "Which color is the shape?", "What color is the object?", "Name the shape's colour."),
    "background": ("What color is the background?", "What is the background colour?",
                   "What colour is behind the shape?", "Which color is the background?",
                   "What is the color of the background?", "Name the background's colour.",
                   "What colour is the backdrop?"),
    "describe": ("Describe this picture.", "What is in this picture?", "What do you see?", "What is in the image?",
                 "Describe what you see.", "What does the image show?", "Tell me about the image."),
}
HELDOUT_WORDINGS = {
    "shape": ("Which shape is this?", "What shape is drawn here?"),
    "color": ("What colour is the object?", "What color is the figure?"),
    "background": ("What is the background color?", "What color is behind it?"),
    "describe": ("Describe the picture.", "What is shown in this image?"),
}


def question_wordings(kind: str, which: str = "trained") -> tuple[str, ...]:
    """The wordings of question `kind` (a QUESTIONS key): "canonical" (QUESTIONS' one), "trained" (it and WORDINGS',
    what wordings=True writes) or "heldout" (HELDOUT_WORDINGS', never written)."""
    if kind not in QUESTIONS:
        raise ValueError(f"kind must be one of {list(QUESTIONS)}, got {kind!r}")
    forms = {"canonical": (QUESTIONS[kind],), "trained": (QUESTIONS[kind],) + WORDINGS[kind],
             "heldout": HELDOUT_WORDINGS[kind]}
    if which not in forms:
        raise ValueError(f"which must be one of {list(forms)}, got {which!r}")
    return forms[which]


MANIFEST_NAME = "manifest.jsonl"


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    """Vertices of a regular shape of circumradius r centred at (cx, cy), rotated by rot radians."""
    if shape == "star":  # 5 points, alternating outer/inner radius
        radii = [r if i % 2 == 0 else 0.45 * r for i in range(10)]
    else:
        radii = [r] * SHAPES[shape]
    n = len(radii)
    start = rot - math.pi / 2  # first vertex points up before rotation
    return [(cx + radii[i] * math.cos(start + 2 * math.pi * i / n),
             cy + radii[i] * math.sin(start + 2 * math.pi * i / n)) for i in range(n)]


def draw_shape(shape: str, color: str, background: str, size: int, rng: np.random.Generator
               ) -> tuple[Image.Image, str]:
    """One RGB image [size, size] and its size word ("small" | "large")."""
    img = Image.new("RGB", (size, size), PALETTE[background])
    r = float(rng.uniform(0.25, 0.45)) * size  # circumradius
    cx, cy = (float(rng.uniform(r, size - r)) for _ in range(2))  # fully inside the frame
    _fill_shape(ImageDraw.Draw(img), shape, cx, cy, r, PALETTE[color])
    return img, ("large" if r > 0.35 * size else "small")


def _fill_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    """Fill one shape of circumradius r centred at (cx, cy) in its fixed rotation."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        rot = math.pi / 4 if shape == "square" else 0.0  # a square is a diamond turned by 45 degrees
        draw.polygon(_polygon(shape, cx, cy, r, rot), fill=fill)


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def describe(shape: str, color: str, background: str, size_word: str = "") -> str:
    """"a red circle on a blue background" (with a size word: "a large red circle on ...")."""
    return f"{_a(f'{size_word} {color}'.strip())} {shape} on {_a(background)} background"


def _text_sentence(rng: np.random.Generator) -> str:
    names, shapes = list(PALETTE), list(SHAPES)
    shape, other = (shapes[i] for i in rng.choice(len(shapes), 2, replace=False))
    c1, c2 = (names[i] for i in rng.choice(len(names), 2, replace=False))
    corners = SHAPES[shape]
    templates = [
        f"A {shape} has {'no' if corners == 0 else corners} corners.",
        f"Picture {describe(shape, c1, c2)}.",
        f"A {shape} and {_a(other)} are different shapes.",
        f"The colour {c1} is not the same as {c2}.",
        f"If you paint a {shape} {c1}, it stands out against {c2}.",
    ]
    return templates[int(rng.integers(len(templates)))]


def make_synthetic(out_dir: str | Path, n: int = 64, image_size: int = 384, seed: int = 0,
                   wordings: bool = False) -> Path:
    """Write n images and 3n records (n text-to-image, n understanding, n text-only) under out_dir.

    Layout: out_dir/images/{i:06d}.png and out_dir/manifest.jsonl (image paths relative to out_dir).
    Record i of each kind uses image i; the understanding question's kind cycles over QUESTIONS, asked in QUESTIONS'
    wording, or with `wordings` in one of question_wordings(kind)'s drawn at random (from a generator of its own:
    the images, captions and answers are those of wordings=False). Deterministic in (n, image_size, seed, wordings).
    Returns the manifest path.
    """
    if n < 1 or image_size < 8:
        raise ValueError(f"need n >= 1 and image_size >= 8, got n={n}, image_size={image_size}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    wording_rng = np.random.default_rng([seed, 1])
    names, shapes, qkinds = list(PALETTE), list(SHAPES), list(QUESTIONS)
    lines = []
    for i in range(n):
        shape = shapes[int(rng.integers(len(shapes)))]
        color, background = (names[j] for j in rng.choice(len(names), 2, replace=False))
        img, size_word = draw_shape(shape, color, background, image_size, rng)
        rel = f"images/{i:06d}.png"
        img.save(out / rel, format="PNG")

        caption = describe(shape, color, background, size_word if rng.random() < 0.3 else "")
        answers = {
            "shape": f"A {shape}.",
            "color": f"{color.capitalize()}.",
            "background": f"{background.capitalize()}.",
            "describe": describe(shape, color, background).capitalize() + ".",
        }
        q = qkinds[i % len(qkinds)]
        question = QUESTIONS[q]
        if wordings:
            forms = question_wordings(q)
            question = forms[int(wording_rng.integers(len(forms)))]
        lines.append({"kind": "t2i", "caption": caption, "image": rel})
        lines.append({"kind": "und", "image": rel, "conversation": [
            {"role": "user", "content": f"<image_placeholder>\n{question}"},
            {"role": "assistant", "content": answers[q]},
        ]})
        lines.append({"kind": "text", "text": _text_sentence(rng)})
    manifest = out / MANIFEST_NAME
    manifest.write_text("".join(json.dumps(rec) + "\n" for rec in lines))
    return manifest


# ---------------------------------------------------------------------------------------------------------
# evaluation helpers

_PALETTE_NAMES = list(PALETTE)
_PALETTE_RGB = np.array([PALETTE[k] for k in _PALETTE_NAMES], dtype=np.float32)  # [C, 3]
_COLOR_RE = re.compile(r"\b(" + "|".join(_PALETTE_NAMES + list(_ALIASES)) + r")\b", re.IGNORECASE)
_SHAPE_RE = re.compile(r"\b(" + "|".join(SHAPES) + r")s?\b", re.IGNORECASE)


def _palette_labels(img, max_side: int) -> np.ndarray:
    """Each pixel's nearest palette colour (RGB distance), as an index into _PALETTE_NAMES: [H, W], after
    downscaling to at most max_side pixels a side. img: PIL.Image or uint8 array [H, W, 3]."""
    if isinstance(img, Image.Image):
        pil = img.convert("RGB")
    else:
        arr = np.asarray(img)
        if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise ValueError(f"expected a PIL image or a uint8 array [H, W, 3], got {arr.dtype} {arr.shape}")
        pil = Image.fromarray(arr)
    if max(pil.size) > max_side:
        scale = max_side / max(pil.size)
        # nearest keeps pixels exact palette colours (no blended edges)
        pil = pil.resize((max(1, round(pil.width * scale)), max(1, round(pil.height * scale))), Image.NEAREST)
    px = np.asarray(pil, dtype=np.float32)  # [H, W, 3]
    return ((px[:, :, None, :] - _PALETTE_RGB) ** 2).sum(-1).argmin(-1)  # [H, W]


def _color_mask(img, color: str, max_side: int) -> np.ndarray:
    """[H, W] bool: the pixels whose nearest palette colour is `color` (a palette name or alias), after
    _palette_labels' downscaling; ValueError for a name not in the palette."""
    name = _ALIASES.get(color.lower(), color.lower())
    if name not in PALETTE:
        raise ValueError(f"{color!r} is not a palette colour ({', '.join(_PALETTE_NAMES)})")
    return _palette_labels(img, max_side) == _PALETTE_NAMES.index(name)


def dominant_colors(img, k: int | None = None, max_side: int = 64) -> list[tuple[str, float]]:
    """Palette colours of an image by pixel share: [(name, fraction)], largest first.

    img: PIL.Image or uint8 array [H, W, 3]. Every pixel is assigned to its nearest palette colour (RGB
    distance) after downscaling to at most max_side pixels a side; colours with no pixel are left out.
    k: keep only the top k.
    """
    labels = _palette_labels(img, max_side).ravel()  # [P]
    counts = np.bincount(labels, minlength=len(_PALETTE_NAMES))
    order = np.argsort(-counts, kind="stable")
    out = [(_PALETTE_NAMES[i], float(counts[i] / len(labels))) for i in order if counts[i] > 0]
    return out[:k] if k is not None else out


def count_objects(img, color: str, min_pixels: int = 6, max_side: int = 64) -> int:
    """Separate objects of one palette colour in an image: 4-connected regions of pixels whose nearest palette colour
    is `color`, counting those of at least min_pixels (specks of a blended edge are not objects). A synthetic image
    holds one object of its shape's colour; a generator that scatters the colour in pieces draws several.
    img as dominant_colors takes it (downscaled the same way)."""
    mask = _color_mask(img, color, max_side)  # [H, W]
    seen = np.zeros_like(mask)
    h, w = mask.shape
    objects = 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        stack, size = [(y0, x0)], 0
        while stack:  # flood fill of one region
            y, x = stack.pop()
            size += 1
            for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not seen[yy, xx]:
                    seen[yy, xx] = True
                    stack.append((yy, xx))
        objects += size >= min_pixels
    return objects


def _area_factor(shape: str) -> float:
    """A shape's area over its circumradius squared, as draw_shape draws it (circle: pi)."""
    if shape == "circle":
        return math.pi
    pts = _polygon(shape, 0.0, 0.0, 1.0, math.pi / 4 if shape == "square" else 0.0)
    return 0.5 * abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1])))  # shoelace


def _shape_mask(shape: str, h: int, w: int, cx: float, cy: float, r: float) -> np.ndarray:
    """[h, w] bool: the pixels draw_shape fills for this shape at centre (cx, cy), circumradius r."""
    img = Image.new("L", (w, h), 0)
    _fill_shape(ImageDraw.Draw(img), shape, cx, cy, r, 1)
    return np.asarray(img, dtype=bool)


def shape_ious(img, color: str, max_side: int = 64) -> dict[str, float]:
    """How well each shape explains the pixels of one palette colour: {shape: IoU} ({} for fewer than 4 pixels).

    Each shape is drawn as draw_shape draws it (its fixed rotation), centred on the colour's pixels' centroid and
    sized to their area, and compared with them by intersection over union. A regular shape's centroid is its centre,
    so a clean synthetic image gives its own shape an IoU near 1. img as dominant_colors takes it."""
    mask = _color_mask(img, color, max_side)  # [H, W]
    area = int(mask.sum())
    if area < 4:
        return {}
    ys, xs = np.nonzero(mask)
    cx, cy = float(xs.mean()), float(ys.mean())
    out = {}
    for shape in SHAPES:
        t = _shape_mask(shape, *mask.shape, cx, cy, math.sqrt(area / _area_factor(shape)))
        out[shape] = float((t & mask).sum() / (t | mask).sum())
    return out


def classify_shape(img, color: str, max_side: int = 64) -> str | None:
    """The shape (a SHAPES name) whose outline best fits the pixels of `color` (shape_ious' largest IoU), or None
    where that colour has fewer than 4 pixels. On draw_shape's own images: 0.946 of 700 at 32 px (the errors all
    among circle, hexagon and pentagon, which few pixels barely tell apart), 700 of 700 at 384 px (2026-12-07)."""
    ious = shape_ious(img, color, max_side)
    return max(ious, key=ious.get) if ious else None


def caption_shape(caption: str) -> str | None:
    """The SHAPES name a caption mentions first (None: none)."""
    m = _SHAPE_RE.search(caption)
    return m.group(1).lower() if m else None


def caption_colors(caption: str) -> list[str]:
    """Palette colour names in a caption, in order of mention (for the synthetic captions: shape colour,
    then background colour). "grey" reads as "gray"."""
    names = [_ALIASES.get(m.lower(), m.lower()) for m in _COLOR_RE.findall(caption)]
    return list(dict.fromkeys(names))  # de-duplicate, keep order


def caption_color_match(img, caption: str) -> float:
    """Fraction of the caption's colours found among the image's top-m dominant colours, m = number of
    colours in the caption. 1.0 for a correct synthetic image; nan when the caption names no colour."""
    want = caption_colors(caption)
    if not want:
        return float("nan")
    got = {name for name, _ in dominant_colors(img, k=len(want))}
    return sum(c in got for c in want) / len(want)
