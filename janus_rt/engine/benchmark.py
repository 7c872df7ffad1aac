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

SHAPES = {
    # name: (LLM hidden, layers, heads, MLP, default dtype, default n)
    "small": (512, 8, 8, 1376, "fp32", 4),
    "1b": (2048, 24, 16, 5632, "bf16", 16),
    "7b": (4096, 30, 32, 11008, "bf16", 16),
}


def add_bench_args(p):
    p.add_argument("--model", default=None, help="checkpoint folder (default: random weights at --shape)")
    p.add_argument("--shape", default="small", choices=sorted(SHAPES), help="LLM shape with random weights")
    p.add_argument("-n", type=int, default=None, help="images per prompt (default: the shape's)")
    p.add_argument("--tokens", type=int, default=576, help="image tokens per image (576 = a full image)")
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=2, help="alternating runs of each implementation")
    p.add_argument("--warmup-tokens", type=int, default=16, metavar="W",
                   help="first an untimed run of each implementation at W tokens per image (Triton's compiles, "
                        "cuBLAS and allocator set-up, the KV pool's first touch); 0: none")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    p.add_argument("--cuda-graphs", action="store_true")
    p.add_argument("--layerwise", action="store_true",
                   help="cpu backend: run the decode step op by op instead of one csrc call per decoder layer "
                        "(slower; its --profile shows every op)")
    p.add_argument("--steps-per-call", type=int, default=8, metavar="K",
                   help="decode steps per engine step while no request waits (multi-step decode: the CPU's csrc "
                        "image step, or with --cuda-graphs the 8-step image graph when K >= 8; 1 = a return to "
                        "Python after every step)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="also trace three decode steps with torch.profiler (DIR/trace.json for Perfetto, op table) "
                        "and time the phases inside the csrc decoder layers (table + DIR/phases.png)")
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


# ---- the machine -----------------------------------------------------------------------------------------------
def measure_bandwidth_gbs(device) -> float:
    """Read bandwidth. GPU: a reduction over a 1 GiB buffer (best of 5). CPU: the faster of cpu_read_bandwidth_gbs'
    probes (torch.sum reads slower than the hardware allows; the roofline takes the faster)."""
    if str(device) == "cpu":
        return max(cpu_read_bandwidth_gbs().values())
    x = torch.ones(2**28, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(5):
        _sync(device)
        t = time.perf_counter()
        x.sum()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def cpu_read_bandwidth_gbs(gib: float = 1.0, rounds: int = 3) -> dict:
    """DRAM read bandwidth (GB/s) of two probes over 64 MiB slices of a `gib` GiB fp32 array, visited in turn so
    no slice is in the L3: torch.sum, and cpu_ops.stream_sum (an unrolled vector sum; torch.sum reads slower than
    the GEMV it should bound) when the extension is built. Best slice time, so a shared machine's time slicing
    does not pass for slow memory. Also bench/bench_gemv.py's roofline."""
    from janus_rt import cpu_ops

    a = torch.ones(int(gib * (1 << 30)) // 4)
    slices = a.split((64 << 20) // 4)
    nbytes = slices[0].numel() * 4
    probes = {"torch.sum": lambda x: x.sum()}
    if cpu_ops.available():
        probes["stream_sum"] = cpu_ops.stream_sum
    out = {}
    for name, fn in probes.items():
        fn(a)
        best = float("inf")
        for _ in range(rounds):
            for sl in slices:
                t = time.perf_counter()
                fn(sl)
                best = min(best, time.perf_counter() - t)
        out[name] = nbytes / best / 1e9
    return out


def measure_matmul_gflops(device, dtype) -> float:
    """The machine's matmul peak for a model in `dtype`: torch's n x n matmul in `dtype`. On a CPU the fp32 matmul
    is measured too and the larger taken: torch's bf16 matmul on CPUs without bf16 dot instructions (AVX2 only) runs
    far below the fp32 FMA peak the hardware can give a bf16 model (which would make every step 'compute bound'),
    while on CPUs with them (AVX512_BF16: Zen 4/5, Sapphire Rapids) it is several times the fp32 peak."""
    n = 2048 if device == "cpu" else 8192
    dtypes = [dtype] if device != "cpu" else sorted({torch.float32, dtype}, key=str)
    best_gflops = 0.0
    for dt in dtypes:
        a = torch.randn(n, n, device=device, dtype=dt)
        b = torch.randn(n, n, device=device, dtype=dt)
        a @ b
        best = float("inf")
        for _ in range(3):
            _sync(device)
            t = time.perf_counter()
            a @ b
            _sync(device)
            best = min(best, time.perf_counter() - t)
        best_gflops = max(best_gflops, 2 * n**3 / best / 1e9)
    return best_gflops


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _reset_peak(device):
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS)
        except OSError:
            pass


def _peak_gb(device) -> float:
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def decode_step_bytes_flops(model, rows: int, context: int, shared: tuple[int, int] = (0, 0)) -> tuple[float, float]:
    """Bytes a decode step must read (LLM + gen head/aligner weights once, plus the KV cache it attends over) and its
    FLOPs, for `rows` rows of `context` cached tokens each. shared = (groups, tokens): the first `tokens` of every row
    sit in blocks that `groups` sets of rows share (an image request's cond and uncond prompts: 2 groups; whole
    blocks only), so they are stored, and must be read, once per group rather than once per row. FLOPs count every
    row's full context."""
    from janus_rt.models.packed_linear import packed_weight_numel

    isz = model.dtype.itemsize
    llm = sum(p.numel() for n, p in model.llm.named_parameters() if "embed_tokens" not in n)
    llm += packed_weight_numel(model.llm)  # projections packed in place (Janus.pack_for_cpu_)
    heads = sum(p.numel() for p in model.gen_head.parameters()) + sum(p.numel() for p in model.gen_aligner.parameters())
    c = model.cfg.llm
    groups, prompt = shared
    kv_tokens = rows * context - (rows - groups) * prompt if groups else rows * context
    kv = kv_tokens * c.num_layers * 2 * c.num_kv_heads * c.head_dim * isz
    flops = 2 * (llm + heads) * rows + rows * context * c.num_layers * 4 * c.num_heads * c.head_dim
    return (llm + heads) * isz + kv, flops


def device_name(device) -> str:
    """The GPU's name, or the CPU's model name and core count."""
    return torch.cuda.get_device_name() if str(device).startswith("cuda") else _cpu_name()


def transformers_baseline(model, device):
    """transformers' JanusForConditionalGeneration holding model's weights, on `device`; None (said on stderr) where
    transformers is not installed."""
    try:
        from janus_rt.verify import to_transformers

        return to_transformers(model).to(device)
    except ImportError:
        print("transformers not installed: baseline skipped", file=sys.stderr)
        return None


# ---- the two implementations -----------------------------------------------------------------------------------
def _image_engine(model, prompt, n, tokens=None, cuda_graphs=False, layerwise=False, steps_per_call=8):
    """An engine holding one image request (n images of `prompt`); layerwise: no csrc decoder on the CPU;
    steps_per_call: Engine's max_steps_per_call."""
    from janus_rt.engine import Engine, SamplingParams

    eng = Engine.for_requests(model, [(len(prompt), n)], block_size=BLOCK_SIZE, cuda_graphs=cuda_graphs,
                              max_steps_per_call=steps_per_call)
    if layerwise:
        eng.runner.fused_cpu_decode = False
    eng.add_image_request(prompt, n=n, params=SamplingParams(seed=0), num_tokens=tokens)
    return eng


def run_janus_rt(model, prompt, n, tokens, cuda_graphs=False, layerwise=False, steps_per_call=8):
    """-> (seconds, ms per decode step, the CPU decode path taken: "decode_layer[, packed GEMV]" / "layerwise" / None off
    CPU)."""
    eng = _image_engine(model, prompt, n, tokens, cuda_graphs, layerwise, steps_per_call)
    _sync(model.device)
    t = time.perf_counter()
    eng.run()
    _sync(model.device)
    path = None
    if model.device.type == "cpu":
        path = "layerwise"
        if eng.runner.uses_cpu_decoder():
            path = "decode_layer, packed GEMV" if eng.runner.cpu_decoder.stack.packed else "decode_layer"
    return time.perf_counter() - t, eng.stats.ms_per_step, path


def run_transformers(ref, prompt, n, tokens, cfg):
    ids = torch.tensor([prompt] * n, device=ref.device)
    ref.model.vision_model.config.num_image_tokens = tokens
    ref.generation_config.pad_token_id = cfg.tokens.pad_id
    ref.generation_config.bos_token_id = cfg.tokens.bos_id
    ref.generation_config.generation_kwargs = {"boi_token_id": cfg.tokens.boi_id}
    _sync(ref.device)
    t = time.perf_counter()
    with torch.no_grad():
        ref.generate(ids, attention_mask=torch.ones_like(ids), generation_mode="image", do_sample=True,
                     guidance_scale=5.0)
    _sync(ref.device)
    dt = time.perf_counter() - t
    return dt, 1e3 * dt / tokens


def main(args):
    from janus_rt.cli import load_model, resolve_dtype

    device = args.device
    shape = SHAPES[args.shape]
    dtype = resolve_dtype(args.dtype or shape[4])
    n = args.n or shape[5]
    torch.manual_seed(0)
    if args.model:
        model, _, what = load_model(args.model, device, dtype)
    else:
        model, what = bench_model(args.shape, dtype, device), f"random weights, {args.shape} LLM shape"
    prompt = [model.cfg.tokens.bos_id] + list(range(100, 118)) + [model.cfg.tokens.boi_id]
    bw = measure_bandwidth_gbs(device)
    peak = measure_matmul_gflops(device, dtype)
    dev_name = device_name(device)
    print(f"# {dev_name}: read bandwidth {bw:.1f} GB/s, matmul peak {peak:.0f} GFLOP/s; model: {what}, {dtype}; "
          f"n={n}, {args.tokens} tokens/image", flush=True)
    ref = None if args.no_transformers else transformers_baseline(model, device)
    # as `janus-rt generate` does: on the CPU the projections are held packed only, no second copy for the engine
    # (after the baseline took its own copy of the weights)
    from janus_rt.engine.cpu_decode import pack_in_place

    packed_note = pack_in_place(model, always=True)
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
    warm = min(args.warmup_tokens, args.tokens)
    if warm > 0:
        run_janus_rt(model, prompt, n, warm, args.cuda_graphs, args.layerwise, args.steps_per_call)
        if ref is not None:
            theirs_run(warm)
        print(f"# warm-up: one untimed run of each at {warm} tokens per image", flush=True)

    def ours_probed():
        before = measure_bandwidth_gbs(device)
        out = run_janus_rt(model, prompt, n, args.tokens, args.cuda_graphs, args.layerwise, args.steps_per_call)
        run_bw.append(max(before, measure_bandwidth_gbs(device)))
        return out

    for _ in range(args.repeats):  # alternate so drift hits both alike
        ours.append(ours_probed()[:2])
        if ref is not None:
            _reset_peak(device)
            got = theirs_run(args.tokens)
            if got is None:
                theirs = []
                continue
            theirs.append(got)
            hf_peak = _peak_gb(device)
    _reset_peak(device)
    dt, ms_step, cpu_path = ours_probed()
    ours.append((dt, ms_step))
    our_peak = _peak_gb(device)
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
    nbytes, flops = decode_step_bytes_flops(model, 2 * n, len(prompt) + args.tokens // 2, shared=shared)
    roof = lambda bw_gbs: 1e3 * max(nbytes / (bw_gbs * 1e9), flops / (peak * 1e9))  # ms per step
    # per run: its roofline (its own probes) over its ms per step; the row reports the median run
    fractions = [roof(b) / ms for b, (_, ms) in zip(run_bw, ours)]
    row = {
        "date": time.strftime("%Y-%m-%d"), "device": dev_name, "model": what, "dtype": str(dtype).split(".")[-1],
        "n": n, "tokens": args.tokens, "janus_rt_s": round(t_ours, 3),
        "janus_rt_tok_s": round(n * args.tokens / t_ours, 1), "janus_rt_ms_step": round(ms_ours, 2),
        "janus_rt_ms_steps": [round(x[1], 2) for x in ours], "warmup_tokens": warm,
        "janus_rt_peak_gb": round(our_peak, 2), "roofline_ms_step": round(roof(statistics.median(run_bw)), 2),
        "roofline_fraction": round(statistics.median(fractions), 3),
        "roofline_fractions": [round(f, 3) for f in fractions],
        "bandwidth_gbs": round(statistics.median(run_bw), 1),
        "best_bandwidth_gbs": round(best_bw, 1),  # the fastest probe of the whole benchmark, and the fraction of
        "roofline_fraction_vs_best": round(roof(best_bw) / ms_ours, 3),  # the median step against its roofline
        "matmul_gflops": round(peak, 1), "steps_per_call": args.steps_per_call,
    }
    if cpu_path:
        row["cpu_decode"] = cpu_path + (" (packed in place)" if packed_note else "")
    if theirs:
        t_hf = statistics.median(x[0] for x in theirs)
        row.update({"transformers_s": round(t_hf, 3), "transformers_tok_s": round(n * args.tokens / t_hf, 1),
                    "transformers_ms_step": round(statistics.median(x[1] for x in theirs), 2),
                    "transformers_ms_steps": [round(x[1], 2) for x in theirs],
                    "transformers_peak_gb": round(hf_peak, 2), "speedup": round(t_hf / t_ours, 2)})
    for k, v in row.items():
        print(f"{k:>22}: {v}")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")
    if args.profile:
        # the profile's engines size their KV pools from the free memory: transformers' copy of the model goes first
        # (with it still held, the 1B n = 16 phase engine got 1185 of its 1216 blocks and stopped the benchmark)
        ref = None
        gc.collect()
        profile_decode_step(model, prompt, n, Path(args.profile), args.layerwise, phase_warmup=args.tokens // 2,
                            steps_per_call=args.steps_per_call)
    return row


def profile_decode_step(model, prompt, n, out: Path, layerwise: bool = False, steps: int = 3, phase_warmup: int = 4,
                        steps_per_call: int = 8):
    """Trace `steps` decode steps (after a few warm-up steps, and one more under the profiler whose record is
    dropped: the first step after the profiler starts pays for waking the OpenMP threads and the profiler's own
    set-up, ~1 ms on a 2-core CPU) and print the per-op time breakdown, totals over those steps."""
    from torch.profiler import ProfilerActivity, profile, schedule

    eng = _image_engine(model, prompt, n, layerwise=layerwise, steps_per_call=steps_per_call)
    for _ in range(4):
        if eng.has_work():
            eng.step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if model.device.type == "cuda" else [])
    out.mkdir(parents=True, exist_ok=True)
    tables = []
    key = "self_cuda_time_total" if model.device.type == "cuda" else "self_cpu_time_total"

    def ready(p):
        p.export_chrome_trace(str(out / "trace.json"))
        tables.append(p.key_averages().table(sort_by=key, row_limit=25))

    counted = []  # decode steps of each engine step (several per engine step with multi-step decode)
    with profile(activities=acts, record_shapes=True, on_trace_ready=ready,
                 schedule=schedule(wait=0, warmup=1, active=steps, repeat=1)) as prof:
        for _ in range(steps + 1):
            if not eng.has_work():  # a short run (--tokens): the steps it has
                break
            before = eng.stats.decode_steps
            eng.step()
            counted.append(eng.stats.decode_steps - before)
            prof.step()
    print(f"per-op time over {sum(counted[1:])} decode steps in {len(counted[1:])} engine steps (totals; 'avg' "
          "columns per call):")
    print(tables[0] if tables else "(no profile recorded)")
    print(f"trace: {out / 'trace.json'} (open in https://ui.perfetto.dev)")
    del eng, prof  # the phase timing's engine sizes its KV pool from the free memory: this one's pool goes first
    gc.collect()
    phases = decode_phase_times(model, prompt, n, layerwise=layerwise, warmup=phase_warmup,
                                steps_per_call=steps_per_call)
    if phases:
        print(format_phase_table(phases))
        dtype = str(model.dtype).split(".")[-1]
        plot_phase_times(phases, out / "phases.png", f"janus_rt decode step by phase: {dtype}, n = {n}")
        print(f"phase chart: {out / 'phases.png'}")


def decode_phase_times(model, prompt, n, steps: int = 8, layerwise: bool = False, warmup: int = 4,
                       steps_per_call: int = 8) -> dict | None:
    """Inside the csrc decoder layers: time each phase (cpu_step.decode_phase_timing) over `steps` decode steps of a
    fresh engine after `warmup` steps (`janus-rt bench --profile`: half its --tokens, the benchmark's mean context;
    no profiler running). Returns {steps, rows, context (mean tokens per row), calls, ms_per_step, phases: [{name,
    us_per_layer, pct_of_step, bytes_per_layer, gbs}], rest_ms_per_step}: bytes are a projection's weights, or for
    attention the K/V of every row's context (None for the other phases). None where the step does not run through
    the csrc decoder."""
    from janus_rt import cpu_step

    if model.device.type != "cpu" or layerwise:
        return None
    eng = _image_engine(model, prompt, n, steps_per_call=steps_per_call)
    if not eng.runner.uses_cpu_decoder():
        return None
    eng.step()  # prefill
    while eng.has_work() and eng.stats.decode_steps < warmup:  # (multi-step decode: may pass warmup by a few)
        eng.step()
    c, isz = model.cfg.llm, model.dtype.itemsize
    kv_tokens, done = 0, 0
    with cpu_step.decode_phase_timing() as timed:
        t0 = time.perf_counter()
        while done < steps and eng.has_work():
            ctx = [eng.bm.num_tokens(r) + 1 for r in eng.scheduler.rows()]  # + the token the first step adds
            before = eng.stats.decode_steps
            eng.step()
            k = eng.stats.decode_steps - before  # decode steps in this engine step (multi-step decode)
            kv_tokens += sum(k * c + k * (k - 1) // 2 for c in ctx)
            done += k
        wall = time.perf_counter() - t0
    calls = timed["calls"]
    if not done or not calls:
        return None
    layer = model.llm.layers[0]  # a projection phase reads its weight once per layer call
    nbytes = {name: w.weight.numel() * isz for name, w in (
        ("qkv_proj", layer.attn.qkv_proj), ("o_proj", layer.attn.o_proj), ("gate_up_proj", layer.mlp.gate_up_proj),
        ("down_proj", layer.mlp.down_proj))}
    nbytes["attention"] = kv_tokens / done * 2 * c.num_kv_heads * c.head_dim * isz
    phases = []
    for name, sec in timed["seconds"].items():
        per = sec / calls
        b = nbytes.get(name)
        phases.append({"name": name, "us_per_layer": 1e6 * per, "pct_of_step": 100 * sec / wall,
                       "bytes_per_layer": b, "gbs": b / per / 1e9 if b and per > 0 else None})
    layers_s = sum(timed["seconds"].values())
    return {"steps": done, "rows": 2 * n, "context": kv_tokens / done / (2 * n), "calls": calls,
            "ms_per_step": 1e3 * wall / done, "phases": phases, "rest_ms_per_step": 1e3 * (wall - layers_s) / done}


def format_phase_table(t: dict) -> str:
    """decode_phase_times' result as a text table."""
    lines = [f"inside the csrc decoder layers, {t['steps']} decode steps ({t['rows']} rows, mean context "
             f"{t['context']:.0f} tokens, {t['calls']} layer calls; {t['ms_per_step']:.2f} ms/step):",
             f"{'phase':>20} {'us/layer':>9} {'% of step':>9} {'MB/layer':>9} {'GB/s':>7}"]
    for p in t["phases"]:
        mb = f"{p['bytes_per_layer'] / 1e6:9.2f}" if p["bytes_per_layer"] else f"{'':>9}"
        rate = f"{p['gbs']:7.1f}" if p["gbs"] else f"{'':>7}"
        lines.append(f"{p['name']:>20} {p['us_per_layer']:9.1f} {p['pct_of_step']:9.1f} {mb} {rate}")
    lines.append(f"{'all layers':>20} {sum(p['us_per_layer'] for p in t['phases']):9.1f} "
                 f"{sum(p['pct_of_step'] for p in t['phases']):9.1f}")
    lines.append(f"rest of the step (gen embedding + aligner, gen head, CFG sampling, host): "
                 f"{t['rest_ms_per_step']:.2f} ms/step")
    return "\n".join(lines)


def plot_phase_times(t: dict, path: Path, title: str = "") -> None:
    """decode_phase_times' result as a PNG bar chart: one bar per phase (share of the decode step), labelled with
    its time per layer and read rate, and one for the rest of the step."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    bars = [(p["name"], p["pct_of_step"], f"{p['us_per_layer']:.1f} us/layer"
             + (f", {p['gbs']:.1f} GB/s" if p["gbs"] else "")) for p in t["phases"]]
    rest_pct = 100 * t["rest_ms_per_step"] / t["ms_per_step"]
    bars.append(("rest of the step", rest_pct, f"{t['rest_ms_per_step']:.2f} ms/step (gen head, sampling, host)"))
    left, bar_w, row_h, top = 170, 420, 26, 56
    img = Image.new("RGB", (left + bar_w + 330, top + row_h * len(bars) + 16), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 8), title or "decode step, by phase", fill="black", font=font)
    d.text((10, 28), f"{t['rows']} rows, mean context {t['context']:.0f} tokens, {t['ms_per_step']:.2f} ms/step "
           f"over {t['steps']} steps; bars: % of the step", fill="dimgray", font=font)
    scale = bar_w / max(max(pct for _, pct, _ in bars), 1e-9)
    for i, (name, pct, label) in enumerate(bars):
        y = top + i * row_h
        colour = "gray" if name == "rest of the step" else ("darkorange" if name == "attention" else "steelblue")
        d.text((10, y + 4), name, fill="black", font=font)
        d.rectangle([left, y + 3, left + max(1, int(pct * scale)), y + row_h - 5], fill=colour)
        d.text((left + int(pct * scale) + 8, y + 4), f"{pct:.1f}%  {label}", fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                import os

                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return "cpu"
