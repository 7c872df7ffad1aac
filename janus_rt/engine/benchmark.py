"""Generation benchmark: janus_rt's engine against transformers' generate on the same weights, alternating runs;
tokens/s, ms/step, peak memory, and each decode step's fraction of the machine's roofline (measured first).
Used by `janus-rt bench` and bench/bench_generate.py."""
from __future__ import annotations

import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from janus_rt.engine.roofline import (CpuWait, decode_step_bytes_flops, device_name, measure_bandwidth_gbs,
                                      measure_int8_matmul_gops, measure_matmul_gflops, peak_memory_gb,
                                      projection_flops, record_cpu_waits, reset_peak_memory, sync)

SHAPES = {
    # name: (LLM hidden, layers, heads, MLP, default dtype, default n)
    "small": (512, 8, 8, 1376, "fp32", 4),
    "1b": (2048, 24, 16, 5632, "bf16", 16),
    "7b": (4096, 30, 32, 11008, "bf16", 16),
}


def weights_label(int8: str) -> str:
    """A result row's "weights" for --int8 (weights, w8a8); bench_understand's rows too."""
    return ("int8 weights and activations (W8A8, LLM projections and heads)" if int8 == "w8a8"
            else "int8 (LLM projections and heads)")


def add_bench_args(p):
    from janus_rt.cli import DTYPES, INT8_MODES

    p.add_argument("--model", default=None, help="checkpoint folder (default: random weights at --shape)")
    p.add_argument("--shape", default=None, choices=sorted(SHAPES),
                   help="LLM shape with random weights (default: small; not with --model, whose shapes it runs)")
    p.add_argument("-n", type=int, default=None, help="images per prompt (default: the shape's; 4 with --model)")
    p.add_argument("--tokens", type=int, default=576, help="image tokens per image (576 = a full image)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="default: the shape's (small: fp32; 1b, 7b: bf16); bf16 with --int8; with --model as "
                        "`janus-rt generate` (bf16 on a GPU, on the CPU the checkpoint's bf16, else fp32)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--repeats", type=int, default=2, help="alternating runs of each implementation")
    p.add_argument("--warmup-tokens", type=int, default=16, metavar="W",
                   help="first an untimed run of each implementation at W tokens per image (Triton's compiles, "
                        "cuBLAS and allocator set-up, the KV pool's first touch); 0: none")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="GPU: replay the decode step from CUDA graphs captured per batch-size bucket")
    p.add_argument("--layerwise", action="store_true",
                   help="cpu backend: run the decode step op by op instead of one csrc call per decoder layer "
                        "(slower; its --profile shows every op)")
    p.add_argument("--steps-per-call", type=int, default=8, metavar="K",
                   help="decode steps per engine step while no request waits (multi-step decode: the CPU's csrc "
                        "image step, or with --cuda-graphs the 8-step image graph when K >= 8; 1 = a return to "
                        "Python after every step)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="also trace three engine steps (each up to --steps-per-call decode steps) with "
                        "torch.profiler (DIR/trace.json for Perfetto, op table) and time the phases inside the csrc "
                        "decoder layers (table + DIR/phases.png)")
    p.add_argument("--int8", nargs="?", const="weights", default=None, choices=INT8_MODES,
                   help="CPU: janus_rt's LLM projections as int8 (per-row scales; implies --dtype bf16; transformers "
                        "keeps the bf16 weights, so its tokens are no longer the same): --int8 (weights) with bf16 "
                        "activations, --int8 w8a8 with activations rounded to int8 per row and group of 512 too "
                        "(AVX512-VNNI)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "int8"),
                   help="CPU: int8 stores each cached K/V head as int8 with an fp32 scale (128-wide heads: a bf16 "
                        "cache's bytes x 0.52, fp32's x 0.26); auto: the model's dtype")
    p.add_argument("--json", default=None, help="append the result row to this JSON-lines file")


def bench_model(shape: str, dtype, device):
    from janus_rt import Janus
    from janus_rt.config import AdaptorConfig, tiny_config

    hidden, layers, heads, inter, _, _ = SHAPES[shape]
    cfg = tiny_config(vocab_size=102400, hidden_size=hidden, num_layers=layers, num_heads=heads,
                      num_kv_heads=heads, intermediate_size=inter, image_size=96, patch_size=4,
                      codebook_size=16384)  # VQ grid 24x24 = 576 tokens; SigLIP/VQ small (not in the decode loop)
    cfg.gen_head = AdaptorConfig(hidden, hidden, 16384)
    return Janus.from_config(cfg, seed=0, device=device, dtype=dtype)


BLOCK_SIZE = 16  # the benchmark engine's KV block size (tokens)


def transformers_baseline(model, device):
    """transformers' JanusForConditionalGeneration holding model's weights, on `device`; None (said on stderr) where
    transformers is not installed."""
    try:
        from janus_rt.verify import to_transformers

        ref = to_transformers(model).to(device)
    except ImportError:
        print("transformers not installed: baseline skipped", file=sys.stderr)
        return None
    try:  # transformers' own default attention (to_transformers asks for eager, what the parity checks compare)
        ref.set_attn_implementation("sdpa")
    except (AttributeError, ValueError) as e:
        print(f"transformers baseline keeps eager attention ({e})", file=sys.stderr)
    return ref


# ---- the two implementations -----------------------------------------------------------------------------------
def bench_engine(model, prompt_len, n, cuda_graphs=False, layerwise=False, steps_per_call=8, kv_cache_dtype=None,
                 block_size=BLOCK_SIZE):
    """An engine sized for one image request of n images of a prompt_len-token prompt; layerwise: no csrc decoder
    on the CPU; steps_per_call: Engine's max_steps_per_call; kv_cache_dtype, block_size: Engine's. Built once and
    reused for every run, as a server holds one (its set-up: the KV pool, on a GPU the CUDA graphs' capture, is
    timed apart)."""
    from janus_rt.engine import Engine

    eng = Engine.for_requests(model, [(prompt_len, n)], block_size=block_size, cuda_graphs=cuda_graphs,
                              max_steps_per_call=steps_per_call, kv_cache_dtype=kv_cache_dtype)
    if layerwise:
        eng.runner.fused_cpu_decode = False
    return eng


def image_engine(model, prompt, n, tokens=None, cuda_graphs=False, layerwise=False, steps_per_call=8,
                 kv_cache_dtype=None, block_size=BLOCK_SIZE):
    """A bench_engine holding one image request (n images of `prompt`, `tokens` each)."""
    from janus_rt.engine import SamplingParams

    eng = bench_engine(model, len(prompt), n, cuda_graphs, layerwise, steps_per_call, kv_cache_dtype, block_size)
    eng.add_image_request(prompt, n=n, params=SamplingParams(seed=0), num_tokens=tokens)
    return eng


def run_janus_rt(eng, prompt, n, tokens):
    """One request on `eng` (bench_engine's) -> (seconds, ms per decode step, the CPU decode path taken:
    "decode_layer[, packed GEMV]" / "layerwise" / None off CPU). ms per step: the engine's decode time over its
    decode steps in this run (tokens - 1: the first token comes from the prefill)."""
    from janus_rt.engine import SamplingParams

    device = eng.runner.device
    s0, n0 = eng.stats.decode_s, eng.stats.decode_steps
    sync(device)
    t = time.perf_counter()
    eng.add_image_request(prompt, n=n, params=SamplingParams(seed=0), num_tokens=tokens)
    eng.run()
    sync(device)
    dt = time.perf_counter() - t
    path = None
    if device.type == "cpu":
        path = "layerwise"
        if eng.runner.uses_cpu_decoder():
            stack = eng.runner.cpu_decoder.stack
            gemv = "W8A8" if stack.w8a8 else "int8" if stack.int8 else "packed" if stack.packed else None
            path = "decode_layer" + (f", {gemv} GEMV" if gemv else "") + (", int8 KV cache" if stack.kv_int8 else "")
    return dt, 1e3 * (eng.stats.decode_s - s0) / max(eng.stats.decode_steps - n0, 1), path


def run_transformers(ref, prompt, n, tokens, cfg):
    """transformers' generate of n images -> (seconds, ms per decode step). Sampling as ours: CFG 5, temperature 1,
    no top-k (transformers' default would cut to the 50 largest). ms per step: from a stamp at each step's logits
    (after the device's queue drains), (last - first) / (tokens - 1): decode steps only, as ours."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class Stamps(LogitsProcessor):
        def __init__(self):
            self.t = []

        def __call__(self, input_ids, scores):
            sync(ref.device)
            self.t.append(time.perf_counter())
            return scores

    stamps = Stamps()
    ids = torch.tensor([prompt] * n, device=ref.device)
    ref.model.vision_model.config.num_image_tokens = tokens
    ref.generation_config.pad_token_id = cfg.tokens.pad_id
    ref.generation_config.bos_token_id = cfg.tokens.bos_id
    ref.generation_config.generation_kwargs = {**(ref.generation_config.generation_kwargs or {}),
                                               "boi_token_id": cfg.tokens.boi_id}
    sync(ref.device)
    t = time.perf_counter()
    with torch.no_grad():
        ref.generate(ids, attention_mask=torch.ones_like(ids), generation_mode="image", do_sample=True,
                     guidance_scale=5.0, top_k=0, logits_processor=LogitsProcessorList([stamps]))
    sync(ref.device)
    dt = time.perf_counter() - t
    ts = stamps.t
    return dt, 1e3 * (ts[-1] - ts[0]) / (len(ts) - 1) if len(ts) > 1 else 1e3 * dt / tokens


def _sig(x: float, digits: int = 3) -> float:
    """x to `digits` significant figures (a small measured fraction stays nonzero, unlike round(x, 3))."""
    return float(f"{x:.{digits}g}")


def _l3_bytes() -> int:
    """The CPU's last-level cache in bytes (sysfs), 0 where unknown."""
    try:
        size = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        return int(size[:-1]) * {"K": 2**10, "M": 2**20}[size[-1]] if size[-1] in "KM" else int(size)
    except (OSError, ValueError, IndexError):
        return 0


def main(args):
    from janus_rt.cli import _dtype, load_model, resolve_dtype

    device = args.device
    shape_name = args.shape or "small"
    shape = SHAPES[shape_name]
    if args.model:  # `janus-rt generate`'s default: bf16 on a GPU or with --int8, on the CPU the checkpoint's bf16
        dtype = _dtype(args)
    else:
        dtype = resolve_dtype(args.dtype or ("bf16" if args.int8 else shape[4]))
    n = args.n or (4 if args.model else shape[5])  # (4: `janus-rt generate`'s -n)
    torch.manual_seed(0)
    if args.model:
        model, _, what = load_model(args.model, device, dtype)
        if args.tokens > model.cfg.num_image_tokens:  # (the random shapes' 576 is checked before loading)
            from janus_rt.errors import UsageError

            raise UsageError(f"--tokens must be at most {model.cfg.num_image_tokens} (this model's image tokens), "
                             f"got {args.tokens}")
    else:
        model, what = bench_model(shape_name, dtype, device), f"random weights, {shape_name} LLM shape"
    prompt = [model.cfg.tokens.bos_id] + list(range(100, 118)) + [model.cfg.tokens.boi_id]
    bw = measure_bandwidth_gbs(device)
    peak = measure_matmul_gflops(device, dtype)
    int8_peak = measure_int8_matmul_gops(device) if args.int8 == "w8a8" else 0.0  # (probed after the runs too)
    dev_name = device_name(device)
    print(f"# {dev_name}: read bandwidth {bw:.1f} GB/s, matmul peak {peak:.0f} GFLOP/s; model: {what}, {dtype}; "
          f"n={n}, {args.tokens} tokens/image", flush=True)
    ref = None if args.no_transformers else transformers_baseline(model, device)
    # as `janus-rt generate` does: on the CPU the projections are held packed only, no second copy for the engine
    # (after the baseline took its own copy of the weights)
    from janus_rt.engine.cpu_decode import pack_in_place

    packed_note = pack_in_place(model, always=True, int8=args.int8)
    if packed_note:
        print(f"# {packed_note}", flush=True)
    # A shared host's read bandwidth moves by 2x within minutes (bench/RESULTS.md, 2026-12-03), so each of our runs
    # is also probed right before and after, and its roofline takes the faster of those two probes: the bandwidth
    # the machine had at that moment, at least.
    ours, theirs, run_bw = [], [], []

    def theirs_run(tokens):
        """transformers' run -> (seconds, ms per step), or None once it has raised (the baseline is then dropped:
        another version's bug must not lose our numbers)."""
        nonlocal ref
        try:
            return run_transformers(ref, prompt, n, tokens, model.cfg)
        except Exception as e:  # noqa: BLE001
            print(f"transformers' generate failed ({type(e).__name__}: {e}); baseline skipped", file=sys.stderr)
            ref = None
            return None

    # An untimed warm-up run of each first. On a GPU our first run compiles every Triton kernel outside the CUDA
    # graphs (gen head, sampling, ...): timed, it was 23x slower per step than the next (H200, 2026-12-04), and
    # with --repeats 1 the median of two runs is their mean.
    sync(device)
    t0 = time.perf_counter()
    eng = bench_engine(model, len(prompt), n, args.cuda_graphs, args.layerwise, args.steps_per_call,
                       args.kv_cache_dtype)
    sync(device)
    setup_s = time.perf_counter() - t0
    warm = min(args.warmup_tokens, args.tokens)
    if warm > 0:
        run_janus_rt(eng, prompt, n, warm)
        if ref is not None:
            theirs_run(warm)
        print(f"# warm-up: one untimed run of each at {warm} tokens per image", flush=True)

    waits = {"janus_rt": [], "transformers": []}  # run delay per second of each timed run (roofline.CpuWait)

    def ours_probed():
        before = measure_bandwidth_gbs(device)
        with CpuWait() as w:
            out = run_janus_rt(eng, prompt, n, args.tokens)
        waits["janus_rt"].append(w.per_s)
        run_bw.append(max(before, measure_bandwidth_gbs(device)))
        return out

    for i in range(args.repeats):  # alternate so drift hits both alike
        ours.append(ours_probed()[:2])
        said = f"# run {i + 1}/{args.repeats}: janus_rt {ours[-1][0]:.2f} s ({ours[-1][1]:.2f} ms/step)"
        if ref is not None:
            reset_peak_memory(device)
            with CpuWait() as w:
                got = theirs_run(args.tokens)
            waits["transformers"].append(w.per_s)
            if got is None:
                theirs = []
                print(said, flush=True)
                continue
            theirs.append(got)
            hf_peak = peak_memory_gb(device)
            said += f", transformers {got[0]:.2f} s ({got[1]:.2f} ms/step)"
        print(said, flush=True)
    # peak memory: one more run of ours with nothing else in its window (no bandwidth probe), not in the timings;
    # like transformers' above, a process peak (both implementations' weights are held throughout)
    reset_peak_memory(device)
    cpu_path = run_janus_rt(eng, prompt, n, args.tokens)[2]
    our_peak = peak_memory_gb(device)
    # probe again after the runs; the whole-benchmark roofline keeps the fastest probe of all, so a slow moment at
    # the start cannot flatter it
    bw_after, peak_after = measure_bandwidth_gbs(device), measure_matmul_gflops(device, dtype)
    print(f"# after the runs: read bandwidth {bw_after:.1f} GB/s, matmul peak {peak_after:.0f} GFLOP/s; probes "
          f"beside our runs: {', '.join(f'{b:.1f}' for b in run_bw)} GB/s", flush=True)
    best_bw, peak = max(bw, bw_after, *run_bw), max(peak, peak_after)
    t_ours = statistics.median(x[0] for x in ours)
    ms_ours = statistics.median(x[1] for x in ours)
    # the n cond rows share the prompt's whole blocks and the n uncond rows the unconditional prompt's (each row
    # copies the partly filled last block on its first write), so a step reads those blocks once per group
    shared = (2, len(prompt) // BLOCK_SIZE * BLOCK_SIZE)
    nbytes, flops = decode_step_bytes_flops(model, 2 * n, len(prompt) + args.tokens // 2, shared=shared,
                                            kv_dtype=eng.cache.dtype)
    # W8A8: the projections' multiply-adds are int8 ones, held to the int8 matmul peak; the rest to the model's
    # (the larger of the probes before and after the runs, as for the bf16 peak)
    int8_peak = max(int8_peak, measure_int8_matmul_gops(device)) if args.int8 == "w8a8" else 0.0
    proj = projection_flops(model, 2 * n) if int8_peak > 0 else 0.0
    compute_s = (flops - proj) / (peak * 1e9) + (proj / (int8_peak * 1e9) if proj else 0.0)
    if int8_peak:
        print(f"# W8A8: the projections' {proj / 1e9:.1f} GOP a step held to the int8 matmul peak "
              f"{int8_peak:.0f} GOP/s (torch._int_mm), the rest to {peak:.0f} GFLOP/s", flush=True)
    roof = lambda bw_gbs: 1e3 * max(nbytes / (bw_gbs * 1e9), compute_s)  # ms per step
    l3 = _l3_bytes() if model.device.type == "cpu" else 0
    if nbytes < l3:
        print(f"# note: a decode step reads {nbytes / 2**20:.0f} MiB, less than this CPU's {l3 / 2**20:.0f} MiB "
              "last-level cache: it may run from that cache, faster than the DRAM rate the roofline assumes "
              "(a fraction near or above 1 says so)", flush=True)
    # per run: its roofline (its own probes) over its ms per step; the row reports the median run
    fractions = [roof(b) / ms for b, (_, ms) in zip(run_bw, ours)]
    row = {
        "date": time.strftime("%Y-%m-%d"), "device": dev_name, "model": what, "dtype": str(dtype).split(".")[-1],
        "n": n, "tokens": args.tokens, "janus_rt_s": round(t_ours, 3), "janus_rt_setup_s": round(setup_s, 4),
        "janus_rt_tok_s": round(n * args.tokens / t_ours, 1), "janus_rt_ms_step": round(ms_ours, 2),
        "janus_rt_ms_steps": [round(x[1], 2) for x in ours], "warmup_tokens": warm,
        "janus_rt_peak_gb": round(our_peak, 2), "roofline_ms_step": round(roof(statistics.median(run_bw)), 2),
        "roofline_fraction": _sig(statistics.median(fractions)),
        "roofline_fractions": [_sig(f) for f in fractions],
        "bandwidth_gbs": round(statistics.median(run_bw), 1),
        "best_bandwidth_gbs": round(best_bw, 1),  # the fastest probe of the whole benchmark, and the fraction of
        "roofline_fraction_vs_best": _sig(roof(best_bw) / ms_ours),  # the median step against its roofline
        "matmul_gflops": round(peak, 1), **({"int8_matmul_gops": round(int8_peak, 1)} if int8_peak else {}),
        "step_mib": round(nbytes / 2**20, 1), "steps_per_call": args.steps_per_call,
    }
    if args.int8:
        row["weights"] = weights_label(args.int8)
    if eng.cache.quantized:
        row["kv_cache"] = "int8 (+ fp32 scale a head)"
    if cpu_path:
        row["cpu_decode"] = cpu_path + (" (packed in place)" if packed_note else "")
        from janus_rt import cpu_ops, openmp

        if cpu_ops.available():  # the csrc kernels' prefetch rules on this CPU
            row["cpu_prefetch_rule"] = cpu_ops.prefetch_rule()
        row["openmp_wait"] = openmp.wait_policy()  # how the team's threads wait (spin, then sleep)
        # team <-> one-thread changes of the decode under contention (engine/threads.py; 0: the team throughout)
        row["cpu_team_switches"] = eng.governor.switches if eng.governor else 0
    # how long each timed run's threads waited for a CPU (s per s): > BUSY_WAIT_PER_S, other processes shared it
    record_cpu_waits(row, {name: w for name, w in waits.items() if w and (name == "janus_rt" or theirs)})
    if theirs:
        t_hf = statistics.median(x[0] for x in theirs)
        row.update({"transformers_s": round(t_hf, 3), "transformers_tok_s": round(n * args.tokens / t_hf, 1),
                    "transformers_ms_step": round(statistics.median(x[1] for x in theirs), 2),
                    "transformers_ms_steps": [round(x[1], 2) for x in theirs],
                    "transformers_peak_gb": round(hf_peak, 2), "speedup": round(t_hf / t_ours, 2),
                    "transformers_attention": getattr(ref.config, "_attn_implementation", None) if ref else None})
    for k, v in row.items():
        print(f"{k:>22}: {v}")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")
    if args.profile:
        # the profile's engines size their KV pools from the free memory: the timed runs' engine and transformers'
        # copy of the model go first (with the copy still held, the 1B n = 16 phase engine got 1185 of its 1216
        # blocks and stopped the benchmark)
        eng = ref = None
        gc.collect()
        from janus_rt.engine.profile import profile_decode_step

        profile_decode_step(model, prompt, n, Path(args.profile), args.layerwise, phase_warmup=args.tokens // 2,
                            steps_per_call=args.steps_per_call, kv_cache_dtype=args.kv_cache_dtype)
    return row
