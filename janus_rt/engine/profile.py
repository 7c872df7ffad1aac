"""Where a decode step's time goes (`janus-rt bench --profile DIR`): torch.profiler's per-op table and Perfetto
trace of a few decode steps, then the phases inside the csrc decoder layers timed over more steps (a table, and
DIR/phases.png as a bar chart)."""
from __future__ import annotations

import gc
import time
from pathlib import Path

from janus_rt.engine import benchmark


def profile_decode_step(model, prompt, n, out: Path, layerwise: bool = False, steps: int = 3, phase_warmup: int = 4,
                        steps_per_call: int = 8, kv_cache_dtype=None):
    """Trace `steps` decode steps (after a few warm-up steps, and one more under the profiler whose record is
    dropped: the first step after the profiler starts pays for waking the OpenMP threads and the profiler's own
    set-up, ~1 ms on a 2-core CPU) and print the per-op time breakdown, totals over those steps."""
    from torch.profiler import ProfilerActivity, profile, schedule

    eng = benchmark.image_engine(model, prompt, n, layerwise=layerwise, steps_per_call=steps_per_call,
                                 kv_cache_dtype=kv_cache_dtype)
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
                                steps_per_call=steps_per_call, kv_cache_dtype=kv_cache_dtype)
    if phases:
        print(format_phase_table(phases))
        dtype = str(model.dtype).split(".")[-1]
        plot_phase_times(phases, out / "phases.png", f"janus_rt decode step by phase: {dtype}, n = {n}")
        print(f"phase chart: {out / 'phases.png'}")


def decode_phase_times(model, prompt, n, steps: int = 8, layerwise: bool = False, warmup: int = 4,
                       steps_per_call: int = 8, kv_cache_dtype=None) -> dict | None:
    """Inside the csrc decoder layers: time each phase (cpu_step.decode_phase_timing) over `steps` decode steps of a
    fresh engine after `warmup` steps (`janus-rt bench --profile`: half its --tokens, the benchmark's mean context;
    no profiler running). Returns {steps, rows, context (mean tokens per row), calls, ms_per_step, phases: [{name,
    us_per_layer, pct_of_step, bytes_per_layer, gbs}], rest_ms_per_step}: bytes are a projection's weights, or for
    attention the K/V of every row's context (None for the other phases). None where the step does not run through
    the csrc decoder."""
    from janus_rt import cpu_ops, cpu_step

    if model.device.type != "cpu" or layerwise:
        return None
    eng = benchmark.image_engine(model, prompt, n, steps_per_call=steps_per_call, kv_cache_dtype=kv_cache_dtype)
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
    # a projection's bytes as held (Int8Weight: a byte a value and a scale a row)
    held = lambda w: w.nbytes(w.N, w.K) if isinstance(w, cpu_ops.Int8Weight) else w.numel() * isz
    nbytes = {name: held(w.weight) for name, w in (
        ("qkv_proj", layer.attn.qkv_proj), ("o_proj", layer.attn.o_proj), ("gate_up_proj", layer.mlp.gate_up_proj),
        ("down_proj", layer.mlp.down_proj))}
    # what the attention kernel reads: every row its whole context (the roofline counts blocks that rows share once,
    # roofline.decode_step_bytes_flops; here the rate of the kernel's own reads)
    nbytes["attention"] = kv_tokens / done * eng.cache.bytes_per_block / (c.num_layers * eng.cache.block_size)
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
