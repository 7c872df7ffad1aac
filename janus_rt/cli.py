"""janus-rt: generate | understand | serve | convert | verify | bench | train."""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

from janus_rt.errors import UsageError, check_device, check_environment, folder_problem

INT8_MODES = ("weights", "w8a8")  # --int8's values: models.packed_linear.INT8_MODES (not imported at start-up)

# The embedded default: the tiny preset trained by janus_rt on its synthetic shapes (see its README); offline.
DEFAULT_MODEL = str(Path(__file__).parent / "assets" / "tiny-shapes")


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    return DTYPES[name]


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default in --help, where the help text does not already say it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def load_model(spec: str | None, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
               for_training: bool = False):
    """A checkpoint folder or a preset name -> (model, tokenizer, description). for_training: a preset's random
    weights are a starting point, not a warning."""
    from janus_rt import Janus
    from janus_rt.config import PRESETS
    from janus_rt.tokenizer import JanusTokenizer

    embedded = spec is None
    if embedded:
        spec = DEFAULT_MODEL
    if Path(spec).is_dir():
        model = Janus.from_pretrained(spec, device=device, dtype=dtype)
        if embedded:
            print(f"note: no --model: the embedded tiny-shapes model ({model.num_parameters() / 1e6:.1f} M parameters "
                  "trained on synthetic coloured shapes, 32 px images, not Janus-Pro weights); pass --model PATH for "
                  "a real checkpoint", file=sys.stderr)
        try:
            tok = JanusTokenizer.from_pretrained(spec, model.cfg.tokens)
        except FileNotFoundError:
            print(f"note: {spec} has no tokenizer.json; using a byte-level tokenizer", file=sys.stderr)
            tok = JanusTokenizer.byte_level(model.cfg.llm.vocab_size, model.cfg.tokens)
        top, vocab = max(tok.tok.get_vocab(with_added_tokens=True).values()), model.cfg.llm.vocab_size
        if top >= vocab:  # (else every prompt holding such a token is refused, one request at a time)
            raise UsageError(f"{spec}: tokenizer.json has token id {top}, past the model's vocabulary of {vocab}: "
                             "a tokenizer from another checkpoint?")
        return model, tok, f"checkpoint {spec}"
    if spec in PRESETS:
        model = Janus.from_preset(spec, seed=seed, device=device, dtype=dtype)
        tok = JanusTokenizer.byte_level(model.cfg.llm.vocab_size, model.cfg.tokens)
        if for_training:
            if os.environ.get("RANK", "0") == "0":  # (under torchrun, once)
                print(f"note: preset {spec!r}: training from random weights (seed {seed})", file=sys.stderr)
        else:
            print(f"note: preset {spec!r} has RANDOM weights (seed {seed}): outputs are noise, not images or "
                  f"answers. Pass --model PATH to a Janus-Pro checkpoint for real results.", file=sys.stderr)
        return model, tok, f"preset {spec} (random weights)"
    if Path(spec).exists():
        raise UsageError(f"--model {spec!r}: a file, not a checkpoint folder or a preset ({', '.join(PRESETS)})")
    raise UsageError(f"--model {spec!r}: no such folder, and not a preset ({', '.join(PRESETS)})")


def _common(p, seed_help: str = "sampling seed (and a preset's random weights)",
            kv_help: str = "KV cache size in GiB (default: sized to the job)"):
    p.add_argument("--model", default=None, help="checkpoint folder or preset (default: the embedded tiny-shapes model)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="default: bf16 on a GPU; on the CPU the checkpoint's own where it is stored in bf16 "
                        "(Janus-Pro's published weights), else fp32 (fp16: GPU only)")
    p.add_argument("--seed", type=int, default=0, help=seed_help)
    p.add_argument("--kv-cache-gb", type=float, default=None, help=kv_help)
    p.add_argument("--int8", nargs="?", const="weights", default=None, choices=INT8_MODES,
                   help="CPU: hold the LLM's projections, its (untied) LM head, the gen head and aligner as int8 "
                        "(per-row scales; implies --dtype bf16), at the quantization's error. --int8 (weights): bf16 "
                        "activations; half the memory, faster decode "
                        "steps on CPUs with AMX (slower without: measured on Zen 5). --int8 w8a8: the activations too "
                        "rounded to int8 per row and group of 512 in each GEMV (AVX512-VNNI): faster decode steps on "
                        "CPUs without AMX (Zen 4/5), at both roundings' error")
    p.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "int8"),
                   help="CPU: int8 holds each cached K/V head as int8 with an fp32 scale (Janus-Pro's 128-wide heads: "
                        "a bf16 cache's bytes x 0.52, fp32's x 0.26: fewer bytes a decode step reads, more tokens a "
                        "--kv-cache-gb holds), at the quantization's error; auto: the model's dtype")


def _dtype(args):
    """--dtype, or its default (chosen once; the CPU's bf16 choice said in a note)."""
    if args.dtype is None:
        cpu = "bf16" if getattr(args, "int8", False) else _cpu_default_dtype(args.model)
        args.dtype = "bf16" if str(args.device).startswith("cuda") else cpu
    return resolve_dtype(args.dtype)


def _checkpoint_folder(spec: str | None) -> Path | None:
    """--model as the checkpoint folder it names (none: the embedded model's), or None for a preset or a bad path."""
    folder = Path(DEFAULT_MODEL if spec is None else spec)
    return folder if folder.is_dir() else None


def _cpu_default_dtype(spec: str | None) -> str:
    """bf16 for a checkpoint folder stored in bf16 (the CPU's fast paths are bf16 ones, and an fp32 copy of bf16
    weights doubles what every decode step reads), else fp32 (presets, fp32 or fp16 weights, the embedded model)."""
    from janus_rt.loading import stored_dtype

    folder = _checkpoint_folder(spec)
    if folder is not None and stored_dtype(folder) == torch.bfloat16:
        print("note: --dtype bf16, as the checkpoint stores its weights (--dtype fp32 for full precision)",
              file=sys.stderr)
        return "bf16"
    return "fp32"


def _model_label(spec: str | None) -> str:
    """What the PNGs name as their model: a preset's name, a checkpoint folder's name (not its whole path)."""
    if spec is None:
        return "tiny-shapes (embedded)"
    from janus_rt.config import PRESETS

    return f"{spec} (random weights)" if spec in PRESETS else (Path(spec).name or spec)


def _read_prompts(path: str) -> list[str]:
    """--prompts-file's prompts: one a line, blank lines and # comments skipped; at least one."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not a prompt
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"janus-rt generate: --prompts-file {path!r}: cannot read it ({e})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise SystemExit(f"janus-rt generate: --prompts-file {path!r} holds no prompt")
    return prompts


def _default_cfg(spec: str | None, what: str = "--cfg") -> float:
    """--cfg's default (what: the name the note gives it): the checkpoint folder's guidance_scale (said in a note),
    else 5.0 (Janus-Pro's official)."""
    from janus_rt.loading import default_guidance

    folder = _checkpoint_folder(spec)
    w = default_guidance(folder) if folder is not None else None
    if w is None:
        if folder is not None and _has_guidance_field(folder):  # there, but not a finite number: say so
            print(f"note: generation_config.json's guidance_scale is not a finite number; {what} 5 (Janus-Pro's)",
                  file=sys.stderr)
        return 5.0
    print(f"note: {what} {w:g}, the checkpoint's guidance_scale (generation_config.json)", file=sys.stderr)
    return w


def _has_guidance_field(folder: Path) -> bool:
    from janus_rt.loading import _json_object_or_none

    d = _json_object_or_none(folder / "generation_config.json")  # (as default_guidance reads it)
    return d is not None and "guidance_scale" in d


def _pack_in_place(model, always: bool = False, int8: bool = False) -> None:
    """The CLI owns its model: on the CPU, pack the LLM's projections in place (engine.cpu_decode.pack_in_place;
    int8: quantized to int8)."""
    from janus_rt.engine.cpu_decode import pack_in_place

    said = pack_in_place(model, always, int8)
    if said:
        print(f"note: {said}", file=sys.stderr)


def _check_args(args, *checks) -> None:
    """Stop with `janus-rt CMD: --flag ...` for the first failed (condition, message) before any model loads."""
    for ok, msg in checks:
        if not ok:
            raise SystemExit(f"janus-rt {args.cmd}: {msg}")


def _device_checks(args):
    """The checks of flags that depend on the device (generate, understand, serve, bench): --dtype fp16, --int8,
    --kv-cache-dtype. (--device itself is checked for every command by main's _checked_device.)"""
    cuda = str(args.device).startswith("cuda")
    return [(cuda or args.dtype is None or DTYPES[args.dtype] != torch.float16,
             "--dtype fp16 needs a GPU; on the CPU use fp32 or bf16"),
            *_int8_checks(args, cuda), *_kv_checks(args, cuda)]


def _common_checks(args):
    """The checks of _common's flags (generate, understand, serve)."""
    from janus_rt.engine.request import SEED_LIMIT

    return [(args.kv_cache_gb is None or args.kv_cache_gb > 0, f"--kv-cache-gb must be > 0, got {args.kv_cache_gb}"),
            (0 <= args.seed < SEED_LIMIT, f"--seed must be in [0, 2^64), got {args.seed}"),
            *_device_checks(args)]


def _kv_dtype(args) -> str:
    """--kv-cache-dtype ("auto" where a caller's namespace predates the flag)."""
    return getattr(args, "kv_cache_dtype", "auto")


def _kv_checks(args, cuda: bool):
    """--kv-cache-dtype's checks, before any model loads."""
    return [(_kv_dtype(args) == "auto" or not cuda,
             "--kv-cache-dtype int8 is the CPU's (csrc kernels); on a GPU leave it out")]


def _weights_label(args) -> str:
    """What --int8 held the LLM's projections as, for the PNGs' info."""
    return "int8 weights, int8 activations (W8A8)" if args.int8 == "w8a8" else "int8"


def _int8_checks(args, cuda: bool):
    """--int8's checks (generate, understand, serve, bench), before any model loads."""
    from janus_rt import cpu_ops
    from janus_rt.engine.cpu_decode import packed_setting

    if not args.int8:
        return []
    w8a8 = args.int8 == "w8a8"
    try:
        packed_off, why = packed_setting() is False, "JANUS_RT_PACKED=0 turns off the packed GEMVs, which int8 runs on"
    except ValueError as e:  # JANUS_RT_PACKED set to something else
        packed_off, why = True, str(e)
    return [(not cuda, "--int8 is the CPU's int8 GEMV; on a GPU leave it out"),
            (cpu_ops.int8_available(), "--int8: this build has no int8 GEMV (it needs a CPU with AVX512_BF16)"),
            (not w8a8 or cpu_ops.w8a8_available(),
             "--int8 w8a8: this build has no W8A8 GEMV (it needs a CPU with AVX512_VNNI); try --int8"),
            (args.dtype is None or DTYPES[args.dtype] == torch.bfloat16,
             f"--int8 takes bf16 activations, not --dtype {args.dtype}"),
            (not packed_off, f"--int8: {why}")]


def _cuda_graphs_note(args) -> None:
    """--cuda-graphs (generate, serve, bench) where the device is not a GPU: said, not refused."""
    if args.cuda_graphs and not str(args.device).startswith("cuda"):
        print("note: --cuda-graphs has no effect on the CPU", file=sys.stderr)


def _n_limit_check(n: int) -> tuple[bool, str]:
    """-n's upper bound, known before the model loads: each image runs as 2 rows (CFG) of the engine's at most
    MAX_NUM_ROWS (the engine would refuse it only after the load, minutes at 7B)."""
    from janus_rt.engine.engine import MAX_NUM_ROWS

    return (n <= MAX_NUM_ROWS // 2, f"-n must be at most {MAX_NUM_ROWS // 2} (each image takes 2 of the engine's "
                                    f"{MAX_NUM_ROWS} rows with CFG), got {n}")


def cmd_generate(args):
    from janus_rt.cpu_ops import retain_freed_memory
    from janus_rt.engine import Engine
    from janus_rt.engine.request import FP32_MAX, SEED_LIMIT
    from janus_rt.engine.roofline import CpuWait, busy_note
    from janus_rt.processing import GRID_ROWS, encode_generation_prompt, generate_images

    _check_args(args, (args.n >= 1, f"-n must be >= 1, got {args.n}"), _n_limit_check(args.n),
                (args.temperature >= 0, f"--temperature must be >= 0 (0 = greedy), got {args.temperature}"),
                _temperature_check(args.temperature),
                (args.top_k >= 0, f"--top-k must be >= 0 (0 = off), got {args.top_k}"),
                (0 < args.top_p <= 1, f"--top-p must be in (0, 1], got {args.top_p}"),
                (not (args.greedy and args.temperature not in (0.0, 1.0)),
                 f"--greedy takes the argmax, which no --temperature changes: give one (got {args.temperature})"),
                (not ((args.greedy or args.temperature == 0) and (args.top_k > 0 or args.top_p < 1)),
                 "--top-k / --top-p sample, so they need --temperature > 0 and no --greedy"),
                (args.cfg is None or (math.isfinite(args.cfg) and abs(args.cfg) <= FP32_MAX),
                 f"--cfg must be a finite number (in fp32), got {args.cfg}"),
                (all(p.strip() for p in args.prompt or ["x"]), "--prompt is empty"),
                (args.out.strip() != "", "--out is empty (give a folder; '.' for this one)"),
                *_common_checks(args))
    if err := folder_problem(args.out):  # before minutes of work
        raise SystemExit(f"janus-rt generate: {err}")
    args.prompts = list(args.prompt or [])
    if args.prompts_file is not None:
        args.prompts += _read_prompts(args.prompts_file)
    if not args.prompts:
        args.prompts = ["a red circle on a blue background"]
    _check_args(args, (args.seed + len(args.prompts) - 1 < SEED_LIMIT,  # (prompts from --prompts-file too)
                       f"--seed must be in [0, 2^64) (prompt k samples with --seed + k), got {args.seed}"))
    stale = sorted(Path(args.out).glob("img_*_*.png"))
    if stale:
        print(f"note: {args.out}/ already holds {len(stale)} img_*.png; this run overwrites those it writes and "
              f"grid.png shows only this run's", file=sys.stderr)
    _cuda_graphs_note(args)
    if args.temperature == 0:
        args.greedy = True
    model, tok, what = load_model(args.model, args.device, _dtype(args), args.seed)
    if args.cfg is None:
        args.cfg = _default_cfg(args.model)
    if args.cfg < 0:
        print(f"note: --cfg {args.cfg:g} < 0 pushes the images away from the prompt", file=sys.stderr)
    # image prompts are short: the packed GEMV is as fast there, one copy less
    _pack_in_place(model, always=True, int8=args.int8)
    retain_freed_memory()  # after the weights are in place: the originals packing freed must go back to the OS
    prompts = args.prompts
    lengths = [len(encode_generation_prompt(tok, p)) for p in prompts]
    if max(lengths) + model.cfg.num_image_tokens > model.cfg.llm.max_position:  # (as understand says it)
        print(f"note: the longest prompt ({max(lengths)} tokens) and its {model.cfg.num_image_tokens} image tokens run "
              f"past the model's {model.cfg.llm.max_position} positions: its images may degrade", file=sys.stderr)
    if args.kv_cache_gb is not None:
        eng = Engine(model, kv_cache_gb=args.kv_cache_gb, cuda_graphs=args.cuda_graphs,
                     kv_cache_dtype=_kv_dtype(args))
    else:
        shapes = [(t, args.n) for t in lengths]
        eng = Engine.for_requests(model, shapes, cuda_graphs=args.cuda_graphs, kv_cache_dtype=_kv_dtype(args))
    t0, written = time.perf_counter(), []
    with CpuWait() as waited:  # (this process's threads' wait for a CPU: other processes taking the cores)
        try:
            images, eng = generate_images(model, tok, prompts, n=args.n, cfg_weight=args.cfg,
                                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                          seed=args.seed, greedy=args.greedy, out_dir=args.out, engine=eng,
                                          keep_images=False,
                                          info={"model": _model_label(args.model), "dtype": args.dtype,
                                                "device": args.device,
                                                **({"weights": _weights_label(args)} if args.int8 else {}),
                                                **({"kv_cache": "int8"} if eng.cache.quantized else {})},
                                          written=written)
        except KeyboardInterrupt:  # each prompt's PNGs are written as it finishes: say what is there
            print(f"interrupted: {len(written)} of {len(prompts) * args.n} image(s) written to {args.out}/ "
                  f"(grid.png not written)", file=sys.stderr)
            raise
        dt = time.perf_counter() - t0
    n_tok = len(prompts) * args.n * model.cfg.num_image_tokens
    s = eng.stats
    grid = "grid.png" if len(prompts) <= GRID_ROWS else f"grid.png: the first {GRID_ROWS} prompts"
    print(f"{what}: {len(prompts) * args.n} image(s) -> {args.out}/ ({grid})")
    print(f"{n_tok} image tokens in {dt:.2f} s (incl. VQ decode): {n_tok / (s.prefill_s + s.decode_s):.1f} tokens/s "
          f"generating, {s.ms_per_step:.2f} ms/decode step ({s.decode_steps} steps), prefill {1e3 * s.prefill_s:.1f} ms, "
          f"backend {eng.backend}, device {args.device}")
    note = busy_note("janus-rt generate", [waited.per_s]) if args.device == "cpu" else None
    if note:  # (the times above are then upper bounds)
        print(note, file=sys.stderr)
    if len(prompts) > 1:  # a queue: how long each prompt waited for its first tokens and for its images
        import statistics

        reqs = list(eng.finished.values())
        span = lambda xs: f"median {statistics.median(xs):.2f} s, max {max(xs):.2f} s"
        print(f"per prompt, from the queue's start: first image tokens {span([r.time_to_first_token for r in reqs])}; "
              f"all its tokens {span([r.latency for r in reqs])}")


def _temperature_check(t: float):
    """(ok, message) for --temperature: 0 (greedy) or a sampling temperature within SamplingParams' range."""
    from janus_rt.engine.request import FP32_MAX, MIN_TEMPERATURE

    return (t == 0 or MIN_TEMPERATURE <= t <= FP32_MAX,
            f"--temperature must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {FP32_MAX:.3g}], got {t}")


def cmd_understand(args):
    from PIL import Image

    from janus_rt.cpu_ops import retain_freed_memory
    from janus_rt.engine import Engine, SamplingParams
    from janus_rt.processing import encode_understanding_prompt, preprocess_image

    _check_args(args, (args.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {args.max_new_tokens}"),
                (args.temperature >= 0, f"--temperature must be >= 0 (0 = greedy), got {args.temperature}"),
                _temperature_check(args.temperature),
                (args.top_p is None or 0 < args.top_p <= 1, f"--top-p must be in (0, 1], got {args.top_p}"),
                (args.top_p is None or args.temperature > 0,
                 "--top-p samples, so it needs --temperature > 0 (the default 0 is greedy)"),
                (args.question.strip(), "--question is empty"), *_common_checks(args))
    images = []
    for path in args.image:  # before loading the model: a wrong path fails at once, with its name
        try:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        except (OSError, Image.DecompressionBombError) as e:  # missing, not an image PIL reads, or too large
            raise SystemExit(f"janus-rt understand: --image {path!r}: {e}") from None
    model, tok, what = load_model(args.model, args.device, _dtype(args), args.seed)
    if args.model is None:
        from janus_rt.train.synthetic import QUESTIONS, question_wordings

        if not images:
            print("note: the embedded model was trained to answer questions about an image: without --image its "
                  "answers are not meaningful", file=sys.stderr)
        elif all(args.question.strip() not in question_wordings(kind) for kind in QUESTIONS):
            print("note: the embedded model was trained on four questions only, each in a few wordings (" +
                  ", ".join(f'"{q}"' for q in QUESTIONS.values()) + "; janus_rt/train/synthetic.py's WORDINGS "
                  "lists the others): its answers to other questions may not be meaningful", file=sys.stderr)
    # only where the engine's copy would not fit (or --int8): torch's matmul is ~3 % faster for prefills
    _pack_in_place(model, int8=args.int8)
    retain_freed_memory()  # after the weights are in place: the originals packing freed must go back to the OS
    pixels = None  # a text-only turn: the prompt holds no image placeholder
    if images:
        pixels = torch.stack([preprocess_image(im, model.cfg.vision.image_size) for im in images])
        pixels = pixels.to(model.device, model.dtype)
    n_img = model.cfg.vision.num_patches
    ids = encode_understanding_prompt(tok, args.question, num_images=len(images), num_image_tokens=n_img)
    t0 = time.perf_counter()
    if args.kv_cache_gb is not None:  # (on the CPU, making an engine packs the decoder weights)
        eng = Engine(model, kv_cache_gb=args.kv_cache_gb, kv_cache_dtype=_kv_dtype(args))
    else:
        eng = Engine.for_requests(model, [(len(ids) + args.max_new_tokens, 0)], kv_cache_dtype=_kv_dtype(args))
    t1 = time.perf_counter()
    if len(ids) + args.max_new_tokens > model.cfg.llm.max_position:
        print(f"note: the prompt ({len(ids)} tokens) and --max-new-tokens {args.max_new_tokens} run past the "
              f"model's {model.cfg.llm.max_position} positions: an answer that long may degrade", file=sys.stderr)
    params = SamplingParams(temperature=args.temperature or 1.0, greedy=args.temperature == 0,
                            top_p=1.0 if args.top_p is None else args.top_p, seed=args.seed)
    req = eng.add_text_request(ids, pixels, max_new_tokens=args.max_new_tokens, params=params)
    stream, t_first = tok.stream(), None
    while eng.has_work():  # the answer printed as it comes, a token a step
        eng.step()
        for i in req.tokens[0][len(stream.ids):]:
            print(stream.push(i), end="", flush=True)
        t_first = t_first or (time.perf_counter() if req.step else None)
    print(stream.finish(), flush=True)
    t2 = time.perf_counter()
    s = eng.stats  # the first token comes from the prefill (vision + prompt); each later one from a decode step
    later = f", then {s.ms_per_step:.1f} ms/token" if s.decode_steps else ""
    print(f"[{what}: {len(req.tokens[0])} tokens in {t2 - t0:.2f} s: engine set-up {t1 - t0:.2f} s, first token "
          f"{t_first - t1:.2f} s{later}]", file=sys.stderr)


def make_server(args):
    """The `serve` command's server, listening but not yet serving (tests drive it; cmd_serve serves forever)."""
    from janus_rt.cpu_ops import retain_freed_memory
    from janus_rt.engine import Engine
    from janus_rt.serve import JanusServer

    _check_args(args, (0 <= args.port < 65536, f"--port must be 0-65535, got {args.port}"),
                (0 < args.memory_fraction < 1, f"--memory-fraction must be in (0, 1), got {args.memory_fraction}"),
                (args.max_requests >= 0, f"--max-requests must be >= 0 (0: no limit), got {args.max_requests}"),
                (args.api_key is None or (args.api_key != "" and args.api_key == args.api_key.strip()),
                 "--api-key (or $JANUS_RT_API_KEY) is empty or has spaces around it (an empty key left /v1/ open, "
                 "a padded one matched no request)"),
                *_common_checks(args))
    _cuda_graphs_note(args)
    _check_listen(args.host, args.port)  # before a load that takes minutes at 7B
    model, tok, what = load_model(args.model, args.device, _dtype(args), args.seed)
    _pack_in_place(model, int8=args.int8)  # only where the engine's copy would not fit (or --int8)
    retain_freed_memory()  # after the weights are in place
    size = (dict(kv_cache_gb=args.kv_cache_gb) if args.kv_cache_gb is not None
            else dict(memory_fraction=args.memory_fraction))
    eng = Engine(model, **size, kv_cache_dtype=_kv_dtype(args), cuda_graphs=args.cuda_graphs)
    try:
        return JanusServer((args.host, args.port), model, tok, eng, label=_model_label(args.model),
                           default_cfg=_default_cfg(args.model, "requests' default \"cfg\""),
                           max_requests=args.max_requests,
                           api_key=args.api_key), what
    except OSError as e:  # the port is taken, the address not ours
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None


def _check_listen(host: str, port: int) -> None:
    """UsageError where (host, port) cannot be listened on now (taken, not this machine's address), probed with a
    socket set up as the server's (its address family, SO_REUSEADDR) and closed again; port 0 (any free one): the
    host alone, on a port the system picks. host '' is every interface, as for the server."""
    import socket

    from janus_rt.serve import listen_family

    try:
        family = listen_family(host)
        infos = socket.getaddrinfo(host or None, port, family=family, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    address = infos[0][4]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def cmd_serve(args):
    server, what = make_server(args)
    host, port = server.server_address[:2]
    host = f"[{host}]" if ":" in host else host  # (an IPv6 address in a URL)
    print(f"{what}: serving on http://{host}:{port} (KV cache {server.bg.engine.cache.num_blocks} blocks of "
          f"{server.bg.engine.cache.block_size} tokens; GET /health, /metrics, POST /v1/images, /v1/understand; "
          "OpenAI's /v1/chat/completions, /v1/images/generations, /v1/models; Ctrl-C stops)", flush=True)
    import signal

    def terminate(signum, frame):  # Ctrl-C or SIGTERM (a supervisor's stop): the same clean shutdown, once
        stop_listening()
        raise KeyboardInterrupt

    def stop_listening():  # a second signal must not break the shutdown under way (raised inside it, it left threads
        for sig in (signal.SIGINT, signal.SIGTERM):  # in torch as Python exited: "terminate called ...", SIGABRT)
            signal.signal(sig, signal.SIG_IGN)

    signal.signal(signal.SIGINT, terminate)
    signal.signal(signal.SIGTERM, terminate)
    try:
        server.serve_forever()
    finally:
        stop_listening()
        server.stop()  # open requests aborted (their clients told 503), the connections' threads joined


def cmd_convert(args):
    from janus_rt.loading import convert

    print(f"converting {args.src} -> {args.dst} ({args.dtype}) ...", file=sys.stderr, flush=True)
    dst = convert(args.src, args.dst, dtype=resolve_dtype(args.dtype))
    print(f"wrote {dst} ({args.dtype}; janus_rt's layout: config.json + model.safetensors)")


def cmd_verify(args):
    from janus_rt.verify import verify

    ok = verify(args.model_dir, dtype=resolve_dtype(args.dtype), device=args.device)
    sys.exit(0 if ok else 1)


def cmd_bench(args):
    from janus_rt.engine.benchmark import main as bench_main

    _check_args(args, (args.steps_per_call >= 1, f"--steps-per-call must be >= 1, got {args.steps_per_call}"),
                (args.n is None or args.n >= 1, f"-n must be >= 1, got {args.n}"),
                _n_limit_check(args.n or 1),
                (args.warmup_tokens >= 0, f"--warmup-tokens must be >= 0 (0: none), got {args.warmup_tokens}"),
                (args.tokens >= 1, f"--tokens must be >= 1, got {args.tokens}"),
                (args.repeats >= 1, f"--repeats must be >= 1, got {args.repeats}"),
                (args.model is None or args.shape is None,
                 f"--shape {args.shape} picks random weights' shapes; --model {args.model} runs its own: give one"),
                (args.model is not None or args.tokens <= 576,  # (a checkpoint's own count: after it loads)
                 f"--tokens must be at most 576 (the random shapes' image tokens), got {args.tokens}"),
                *_device_checks(args))
    _cuda_graphs_note(args)
    # the result files are written after minutes of runs: a path that cannot take them is said first
    _check_args(args, *[(err is None, err) for err in (folder_problem(args.profile, "--profile") if args.profile
                                                      else None, _json_problem(args.json))])
    bench_main(args)


def _json_problem(path: str | None) -> str | None:
    """Why --json PATH cannot take the result row (appended at the end of a run), or None."""
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        return f"--json {path!r} is a folder: give a file to append the result row to"
    if not p.absolute().parent.is_dir():
        return f"--json {path!r}: {str(p.absolute().parent)!r} is not an existing folder"
    if not os.access(p if p.exists() else p.absolute().parent, os.W_OK):  # (opening it would create it)
        return f"--json {path!r}: cannot write it"
    return None


def run_reporting_usage_errors(cmd: str, fn, *args, prog: str | None = None):
    """fn(*args), with what a user's mistake raises (janus_rt's UsageError: a value, a size, a run folder; a missing
    or broken checkpoint or config; a file that cannot be read or written) said in one `janus-rt CMD: ...` line
    (`PROG: ...` where prog is given, for a `python -m` tool). Anything else keeps its traceback (a bug), as does
    everything with JANUS_RT_DEBUG=1."""
    from janus_rt.config import ConfigError
    from janus_rt.loading import CheckpointError

    try:
        return fn(*args)
    except (UsageError, ConfigError, CheckpointError, OSError) as e:
        if os.environ.get("JANUS_RT_DEBUG") == "1":
            raise
        raise SystemExit(f"{prog or 'janus-rt ' + cmd}: {e} (JANUS_RT_DEBUG=1 for the traceback)") from None
    except KeyboardInterrupt:  # Ctrl-C: no traceback; the shell's code for SIGINT
        if os.environ.get("JANUS_RT_DEBUG") == "1":
            raise
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all
            print(f"{prog or 'janus-rt ' + cmd}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


def main(argv=None):
    args = parser().parse_args(argv)
    run_reporting_usage_errors(args.cmd, check_environment)
    run_reporting_usage_errors(args.cmd, _checked_device, args)
    run_reporting_usage_errors(args.cmd, args.fn, args)


def parser() -> argparse.ArgumentParser:
    """The `janus-rt` command line (tests build a command's args with it: every flag at its default)."""
    ap = argparse.ArgumentParser(prog="janus-rt", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    formatter = _HelpFormatter

    g = sub.add_parser("generate", help="text-to-image: PNGs + a grid, tokens/s and ms/step", formatter_class=formatter)
    _common(g)
    g.add_argument("--prompt", action="append",
                   help="repeat for several prompts (batched together); none: 'a red circle on a blue background'")
    g.add_argument("--prompts-file", metavar="FILE",
                   help="one prompt per line (blank lines and lines starting with # skipped), after any --prompt; "
                        "all are queued at once and run as the KV cache admits them")
    g.add_argument("-n", type=int, default=4, help="images per prompt")
    g.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance weight (default: the checkpoint's generation_config.json "
                        "guidance_scale where it has one, else 5, the official value)")
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest image tokens only (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: the smallest set of mass p (1 = off)")
    g.add_argument("--greedy", action="store_true", help="argmax of the guided logits (as --temperature 0)")
    g.add_argument("--cuda-graphs", action="store_true", help="capture the decode step (CUDA only)")
    g.add_argument("--out", default="out", help="folder for img_PP_NN.png and grid.png")
    g.set_defaults(fn=cmd_generate)

    u = sub.add_parser("understand", help="image(s) + question -> answer (or a question alone)",
                       formatter_class=formatter)
    _common(u)
    u.add_argument("--image", action="append", default=[],
                   help="repeat for several images; none: the question alone, a text-only chat turn")
    u.add_argument("--question", required=True,
                   help="asked (about the image(s), if any) in the official prompt template")
    u.add_argument("--max-new-tokens", type=int, default=128, help="answer length at most (stops at EOS)")
    u.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    u.add_argument("--top-p", type=float, default=None, help="nucleus sampling (with --temperature > 0)")
    u.set_defaults(fn=cmd_understand)

    s = sub.add_parser("serve", help="HTTP/JSON server: POST /v1/images and /v1/understand, one batching engine",
                       formatter_class=formatter)
    _common(s, seed_help="a preset's random weights (each request brings its own sampling seed)",
            kv_help="KV cache size in GiB (default: --memory-fraction of the free memory)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=8000, help="port (0: any free one, printed)")
    s.add_argument("--memory-fraction", type=float, default=0.3,
                   help="KV cache as this share of the free memory (at most what 256 rows at the model's longest "
                        "context use), unless --kv-cache-gb")
    s.add_argument("--max-requests", type=int, default=0,
                   help="requests open at once (received, not yet answered: waiting for the KV cache, running, "
                        "their images being decoded), beyond which a new one gets 429 at once (0: no limit)")
    s.add_argument("--cuda-graphs", action="store_true", help="capture the decode step (CUDA only)")
    s.add_argument("--api-key", default=os.environ.get("JANUS_RT_API_KEY") or None,
                   help="requests to /v1/... need the header `Authorization: Bearer KEY` (401 without it; "
                        "/health and /metrics stay open); default: $JANUS_RT_API_KEY, else none needed")
    s.set_defaults(fn=cmd_serve)

    c = sub.add_parser("convert", help="any supported layout -> janus_rt's safetensors layout",
                       formatter_class=formatter)
    c.add_argument("src", help="checkpoint folder (transformers', DeepSeek's or janus_rt's layout)")
    c.add_argument("dst", help="output folder")
    c.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="dtype of the written weights")
    c.set_defaults(fn=cmd_convert)

    v = sub.add_parser("verify", help="janus_rt vs transformers' Janus on fixed inputs: per-path errors",
                       formatter_class=formatter)
    v.add_argument("model_dir", help="checkpoint folder (any supported layout)")
    v.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="dtype of both models")
    v.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    v.set_defaults(fn=cmd_verify)

    b = sub.add_parser("bench", help="generation benchmark: janus_rt vs transformers' generate",
                       formatter_class=formatter)
    from janus_rt.engine.benchmark import add_bench_args

    add_bench_args(b)
    b.set_defaults(fn=cmd_bench)

    try:
        from janus_rt.train.cli import add_train_args, run_train

        t = sub.add_parser("train", help="train Janus (stages 1-3) on a JSONL manifest or the synthetic set",
                           formatter_class=formatter)
        add_train_args(t)
        t.set_defaults(fn=run_train)
    except ImportError:  # the training extra is optional
        pass
    return ap


def _checked_device(args) -> None:
    """--device (every command that has it) checked before anything loads: cpu, cuda or cuda:N, CUDA present."""
    if getattr(args, "device", None) is not None:
        args.device = str(check_device(args.device))


if __name__ == "__main__":
    main()
