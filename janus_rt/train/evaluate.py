"""Text-to-image evaluation on the synthetic shapes: do generated images carry the colours their captions name?

For each caption the model generates `n_per_caption` images (classifier-free guidance, seeded), the VQ decodes
them, and `caption_color_match` scores each: the fraction of the caption's colours (shape, background) among
the image's top-m palette colours. 1.0 for a ground-truth synthetic image; chance for random colours is far
lower (two named colours among 12 palette colours). Also reported: `one_object`, the fraction of images whose
shape colour forms exactly one object (`count_objects`; 1.0 for ground-truth images), which drops where a
generator scatters the colour in pieces, and `shape_match`, the fraction in which `classify_shape` finds the
caption's shape in the caption's colour (0.946 for ground-truth 32 px images, chance 1/7). With --understanding N
it also asks N fresh synthetic images the set's shape, colour, background and describe questions
(`understanding_scores`).

    python -m janus_rt.train.evaluate --model DIR [DIR ...] --n 32 --n-per-caption 4
prints one JSON line per model (mean scores, the colour score's standard error over captions; the guidance weight
the checkpoint's own, as `janus-rt generate` takes it, unless --cfg says); `tiny` names the random-weight
preset (with the byte-level tokenizer). Reference points for the tiny preset (2026-11-25): random LLM with the
pre-trained VQ of `janus_rt.train.vq_pretrain` ~0.12; that VQ's own round trip of held-out ground-truth images
~1.0 (the ceiling a generator can reach through it).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time

import numpy as np
import torch

from janus_rt.errors import UsageError
from janus_rt.processing import encode_generation_prompt, to_pil
from janus_rt.train.synthetic import (caption_color_match, caption_colors, caption_shape, classify_shape, count_objects,
                                     describe, make_synthetic)


PROG = "python -m janus_rt.train.evaluate"


def heldout_captions(n: int, seed: int = 12345, exclude=()) -> list[str]:
    """n synthetic t2i captions drawn exactly as `make_synthetic` draws them (its images are not used), skipping any
    in `exclude` (a training set's captions: the synthetic caption space is small, ~2,800 captions and 132 colour
    pairs, so most captions drawn with another seed also occur in a large training set). Without exclude: the
    first n of make_synthetic(n, seed)."""
    exclude, draws = {c.strip() for c in exclude}, n  # (stripped: training and evaluate prompt with it stripped)
    while True:
        with tempfile.TemporaryDirectory() as d:
            manifest = make_synthetic(d, n=draws, image_size=8, seed=seed)  # 8 px: the images are thrown away
            records = [json.loads(line) for line in manifest.read_text().splitlines()]
        captions = [r["caption"] for r in records if r["kind"] == "t2i" and r["caption"] not in exclude][:n]
        if len(captions) == n:
            return captions
        if draws >= 256 * n:
            raise UsageError(f"only {len(captions)} of {draws} synthetic captions (seed {seed}) are not among the "
                             f"{len(exclude)} excluded; ask for fewer than {n}")
        draws *= 4


def training_captions(manifests=(), synthetic=()) -> set[str]:
    """The t2i captions of JSONL manifests and of `janus-rt train --synthetic N --seed S` runs ((N, S) pairs: the
    captions make_synthetic(N, seed=S) writes, whatever the image size)."""
    out = set()
    for path in manifests:
        try:
            lines = open(path, encoding="utf-8").read().splitlines()
        except OSError as e:
            raise UsageError(f"{path}: {e.strerror or e}") from None
        for line in lines:
            try:
                rec = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                continue  # (train skips such lines too)
            if isinstance(rec, dict) and rec.get("kind") == "t2i" and isinstance(rec.get("caption"), str):
                out.add(rec["caption"].strip())  # the caption training prompts with (encode_generation_prompt)
    for n, seed in synthetic:
        out.update(heldout_captions(n, seed))
    return out


@torch.no_grad()
def generate_images(model, tokenizer, caption: str, n: int, seed: int, cfg_weight: float = 5.0,
                    temperature: float = 1.0, kv_cache_dtype=None) -> list:
    """n PIL images for one caption: tokens [n, N] -> pixels [n, 3, S, S] -> RGB. kv_cache_dtype: the engine's
    (None: the model's; "int8")."""
    from janus_rt.engine import Engine

    prompt_ids = encode_generation_prompt(tokenizer, caption)
    kw = {} if kv_cache_dtype is None else {
        "engine": Engine.for_requests(model, [(len(prompt_ids), n)], kv_cache_dtype=kv_cache_dtype)}
    tokens = model.generate_image_tokens(prompt_ids, n=n, seed=seed, cfg_weight=cfg_weight,
                                         temperature=temperature, **kw)
    return to_pil(model.decode_image_tokens(torch.as_tensor(tokens, dtype=torch.long)))


def caption_scores(model, tokenizer, captions: list[str], n_per_caption: int = 4, seed: int = 0,
                   cfg_weight: float = 5.0, temperature: float = 1.0, kv_cache_dtype=None,
                   progress: str | None = None) -> dict[str, list[list[float]]]:
    """Per-image scores [len(captions)][n_per_caption] under "color_match" (caption_color_match), "one_object"
    (1.0 where the caption's shape colour forms exactly one object) and "shape_match" (1.0 where classify_shape finds
    the caption's shape in that colour; nan for a caption that names no shape); caption i samples with seed + i.
    progress: a progress bar on stderr, a caption a tick, with this label (None: none)."""
    from tqdm import tqdm

    if n_per_caption < 1:
        raise ValueError(f"n_per_caption must be >= 1, got {n_per_caption}")
    for caption in captions:
        if not caption_colors(caption):
            raise ValueError(f"caption names no palette colour: {caption!r}")
    out = {"color_match": [], "one_object": [], "shape_match": []}
    for i, caption in enumerate(tqdm(captions, desc=progress, unit="caption", disable=progress is None,
                                     file=sys.stderr)):
        imgs = generate_images(model, tokenizer, caption, n_per_caption, seed + i, cfg_weight, temperature,
                               kv_cache_dtype)
        color, shape = caption_colors(caption)[0], caption_shape(caption)  # (the shape's colour: named first)
        out["color_match"].append([caption_color_match(im, caption) for im in imgs])
        out["one_object"].append([float(count_objects(im, color) == 1) for im in imgs])
        out["shape_match"].append([float("nan") if shape is None else float(classify_shape(im, color) == shape)
                                   for im in imgs])
    return out


def color_match_scores(model, tokenizer, captions: list[str], n_per_caption: int = 4, seed: int = 0,
                       cfg_weight: float = 5.0, temperature: float = 1.0) -> list[list[float]]:
    """Per-image caption_color_match [len(captions)][n_per_caption]; caption i samples with seed + i."""
    return caption_scores(model, tokenizer, captions, n_per_caption, seed, cfg_weight, temperature)["color_match"]


def color_match_score(model, tokenizer, captions: list[str], n_per_caption: int = 4, seed: int = 0,
                      cfg_weight: float = 5.0, temperature: float = 1.0) -> float:
    """Mean caption_color_match over len(captions) * n_per_caption generated images, in [0, 1]."""
    scores = color_match_scores(model, tokenizer, captions, n_per_caption, seed, cfg_weight, temperature)
    return float(np.mean(scores))


UND_QUESTIONS = ("shape", "color", "background", "describe")  # synthetic.QUESTIONS' keys


def understanding_scores(model, tokenizer, n: int, seed: int = 777, max_new_tokens: int = 48,
                         progress: str | None = None, engine=None, kv_cache_dtype=None,
                         wordings: str = "canonical") -> dict[str, list[float]]:
    """Greedy answers to the synthetic set's four questions about n fresh synthetic images (make_synthetic(n, seed),
    drawn at the vision tower's size), per image under "shape", "color", "background": 1.0 where the answer's first
    shape (or palette colour) word is the right one (chance 1/7, 1/12, 1/12); under "describe": 1.0 where the answer
    is the training set's sentence ("A red circle on a blue background."; case and the final full stop aside).
    wordings: each question as synthetic.QUESTIONS words it ("canonical"), or image i asked wording i (cyclically)
    of synthetic.question_wordings(kind, wordings) ("trained": those make_synthetic(wordings=True) writes;
    "heldout": wordings no training set holds).
    engine: the Engine every question runs in (default: one sized for the longest, with kv_cache_dtype: None, the
    model's, or "int8"; a new one per question would repack the LLM each time on the CPU)."""
    from tqdm import tqdm

    from janus_rt.processing import encode_understanding_prompt
    from janus_rt.train.synthetic import question_wordings
    from janus_rt.train.vq_pretrain import synthetic_images

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    forms = {k: question_wordings(k, wordings) for k in UND_QUESTIONS}  # (checks `wordings`)
    pixels, captions = synthetic_images(n, model.cfg.vision.image_size, seed)
    pixels = pixels.to(model.dtype)  # (once, not per question)
    prompts = {k: [encode_understanding_prompt(tokenizer, q, 1, model.cfg.vision.num_patches) for q in forms[k]]
               for k in UND_QUESTIONS}
    if engine is None:
        from janus_rt.engine import Engine

        longest = max(len(ids) for asked in prompts.values() for ids in asked)
        kw = {} if kv_cache_dtype is None else {"kv_cache_dtype": kv_cache_dtype}
        engine = Engine.for_requests(model, [(longest + max_new_tokens, 0)], **kw)
    out = {k: [] for k in UND_QUESTIONS}
    for i, (x, caption) in enumerate(zip(tqdm(pixels, desc=progress, unit="image", disable=progress is None,
                                              file=sys.stderr), captions)):
        shape, (color, background) = caption_shape(caption), caption_colors(caption)
        wanted = {"shape": shape, "color": color, "background": background,
                  "describe": describe(shape, color, background).lower()}
        for kind in UND_QUESTIONS:
            ids = prompts[kind][i % len(prompts[kind])]
            answer = tokenizer.decode(model.generate_text(ids, x[None], max_new_tokens=max_new_tokens, engine=engine))
            if kind == "shape":
                got = caption_shape(answer)
            elif kind == "describe":
                got = answer.strip().rstrip(".").lower()
            else:
                got = (caption_colors(answer) or [None])[0]
            out[kind].append(float(got == wanted[kind]))
    return out


def _mean_or_none(scores) -> float | None:
    """The mean of the scores that are not nan, rounded (None: there are none)."""
    vals = [v for row in scores or [] for v in row if not np.isnan(v)]
    return round(float(np.mean(vals)), 4) if vals else None


def load_model_and_tokenizer(spec: str, dtype: torch.dtype = torch.float32, int8: bool | str = False):
    """A checkpoint folder (any layout janus_rt loads) or the name `tiny` (random weights, byte tokenizer), in
    `dtype`; int8 (True or "weights"; "w8a8"): its LLM projections (and heads) then held as int8
    (Janus.pack_for_cpu_(int8); bf16)."""
    from janus_rt.models.janus import Janus
    from janus_rt.tokenizer import JanusTokenizer

    if spec == "tiny":
        model = Janus.from_preset("tiny", seed=0, dtype=dtype)
        tok = JanusTokenizer.byte_level(model.cfg.llm.vocab_size, model.cfg.tokens)
    else:
        model = Janus.from_pretrained(spec, dtype=dtype)
        tok = JanusTokenizer.from_pretrained(spec, defaults=model.cfg.tokens)
    if int8:  # as --int8 of the CLI (its checks: JANUS_RT_PACKED, finite weights)
        from janus_rt.engine.cpu_decode import pack_in_place

        pack_in_place(model, int8=int8)
    return model, tok


def main(argv=None) -> list[dict]:
    from janus_rt.cli import INT8_MODES

    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Prints one JSON line per model: color_match (mean caption_color_match over every image; stderr: of "
               "the captions' means), one_object (the fraction of images whose shape colour is one object), "
               "shape_match (the fraction in which synthetic.classify_shape finds the caption's shape in its colour; "
               "chance 1/7), the settings, with --understanding the answers' und_* scores, and with --vq-ceiling "
               "vq_ceiling and vq_ceiling_shape (the same scores of the VQ's own round trip of ground-truth images).")
    p.add_argument("--model", nargs="+", required=True, help="checkpoint folder(s), or `tiny`")
    p.add_argument("--n", type=int, default=32, help="captions, drawn as the synthetic set's with --caption-seed")
    p.add_argument("--n-per-caption", type=int, default=4, help="images generated per caption")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (caption i uses seed + i)")
    p.add_argument("--caption-seed", type=int, default=12345, help="seed of the synthetic captions")
    p.add_argument("--exclude-manifest", nargs="+", default=[], metavar="JSONL",
                   help="draw only captions that no t2i record of these training manifests holds (the synthetic "
                        "caption space is small: most captions drawn with another seed were also trained on)")
    p.add_argument("--exclude-synthetic", nargs="+", default=[], metavar="N:SEED",
                   help="likewise for the captions of `janus-rt train --synthetic N --seed SEED` runs")
    p.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance weight (default: the checkpoint's generation_config.json "
                        "guidance_scale, as `janus-rt generate` takes it; else 5)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (> 0)")
    p.add_argument("--vq-ceiling", action="store_true", help="also score the VQ round trip decode(encode(x)) "
                   "of held-out ground-truth images: the most a generator can reach through this VQ")
    p.add_argument("--understanding", type=int, default=0, metavar="N",
                   help="also ask N fresh synthetic images (seed --understanding-seed) the synthetic set's four "
                        "questions, greedy: und_shape, und_color, und_background (the answer's first shape / colour "
                        "word right; chance 1/7, 1/12, 1/12), und_describe (the whole sentence right)")
    p.add_argument("--understanding-seed", type=int, default=777, help="seed of those images")
    p.add_argument("--understanding-wordings", default="canonical", choices=("canonical", "trained", "heldout"),
                   help="how the questions are worded: synthetic.QUESTIONS' wording, or image i asked the i-th "
                        "(cyclically) of synthetic.question_wordings(kind, ...): those make_synthetic(wordings=True) "
                        "trains on, or held-out ones no training set holds")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="the models' dtype")
    p.add_argument("--int8", nargs="?", const="weights", default=None, choices=INT8_MODES,
                   help="the LLM's projections and heads as int8 (needs bf16): --int8 weight-only, --int8 w8a8 "
                        "with int8 activations too")
    p.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "int8"),
                   help="the engine's KV cache (int8: rows + fp32 scales, CPU)")
    a = p.parse_args(argv)
    if a.int8 and a.dtype != "bf16":
        p.error("--int8 needs --dtype bf16")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    if a.n < 1:
        p.error(f"--n must be >= 1, got {a.n}")
    if a.n_per_caption < 1:
        p.error(f"--n-per-caption must be >= 1, got {a.n_per_caption}")
    if a.understanding < 0:
        p.error(f"--understanding must be >= 0, got {a.understanding}")
    if a.understanding_wordings != "canonical" and not a.understanding:
        p.error("--understanding-wordings words the questions of --understanding N: give N too")
    for flag, value in (("--seed", a.seed), ("--caption-seed", a.caption_seed),
                        ("--understanding-seed", a.understanding_seed)):
        if value < 0:
            p.error(f"{flag} must be >= 0, got {value}")
    if a.threads < 0:
        p.error(f"--threads must be >= 0, got {a.threads}")
    if not a.temperature > 0 or not math.isfinite(a.temperature):
        p.error(f"--temperature must be a finite number > 0, got {a.temperature}")
    if a.cfg is not None and not math.isfinite(a.cfg):
        p.error(f"--cfg must be a finite number, got {a.cfg}")
    if a.threads:
        torch.set_num_threads(a.threads)
    synthetic = []
    for spec in a.exclude_synthetic:
        n, _, seed = spec.partition(":")
        if not (n.isdigit() and int(n) >= 1 and seed.isdigit()):
            p.error(f"--exclude-synthetic takes N:SEED (N >= 1, SEED >= 0), got {spec!r}")
        synthetic.append((int(n), int(seed)))
    try:
        trained = training_captions(a.exclude_manifest, synthetic)
        captions = heldout_captions(a.n, a.caption_seed, trained)
    except UsageError as e:
        p.error(str(e))
    rows = []
    for spec in a.model:
        try:
            model, tok = load_model_and_tokenizer(spec, dtype, a.int8)
        except UsageError as e:
            p.error(str(e))
        cfg = a.cfg if a.cfg is not None else model.guidance_scale if model.guidance_scale is not None else 5.0
        t0 = time.perf_counter()
        both = caption_scores(model, tok, captions, a.n_per_caption, a.seed, cfg, a.temperature,
                              None if a.kv_cache_dtype == "auto" else a.kv_cache_dtype, progress=spec)
        scores = both["color_match"]
        per_caption = np.mean(scores, axis=1)  # [n]; captions are the independent units
        n = len(per_caption)
        sem = round(float(np.std(per_caption, ddof=1)) / n**0.5, 4) if n > 1 else None
        row = {"model": spec, "dtype": a.dtype, "int8": bool(a.int8), **({"int8_mode": a.int8} if a.int8 else {}),
               "kv_cache": a.kv_cache_dtype,
               "color_match": round(float(np.mean(scores)), 4), "stderr": sem,
               "one_object": round(float(np.mean(both["one_object"])), 4),
               "shape_match": _mean_or_none(both["shape_match"]),
               "captions": len(captions), "excluded_captions": len(trained), "n_per_caption": a.n_per_caption,
               "cfg": cfg,
               "temperature": a.temperature, "seed": a.seed, "seconds": round(time.perf_counter() - t0, 1)}
        if a.vq_ceiling:
            from janus_rt.train.vq_pretrain import recon_scores, synthetic_images

            n_img = len(captions) * a.n_per_caption
            pixels, truth = synthetic_images(n_img, model.cfg.vq.image_size, a.caption_seed)
            ceiling = recon_scores(model.vq, pixels.to(model.dtype), truth, shape=True)
            row["vq_ceiling"] = round(ceiling["color_match"], 4)
            row["vq_ceiling_shape"] = round(ceiling["shape_match"], 4)
        if a.understanding:
            t0 = time.perf_counter()
            und = understanding_scores(model, tok, a.understanding, a.understanding_seed, progress=f"{spec} (und)",
                                       kv_cache_dtype=None if a.kv_cache_dtype == "auto" else a.kv_cache_dtype,
                                       wordings=a.understanding_wordings)
            row.update({f"und_{k}": round(float(np.mean(v)), 4) for k, v in und.items()})
            row.update(und_images=a.understanding, und_seed=a.understanding_seed,
                       und_wordings=a.understanding_wordings,
                       und_seconds=round(time.perf_counter() - t0, 1))
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


if __name__ == "__main__":
    from janus_rt.cli import run_reporting_usage_errors

    run_reporting_usage_errors("evaluate", main, prog=PROG)
