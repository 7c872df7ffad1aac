"""Serving benchmark: text-to-image requests arriving at random times (Poisson, seeded), served by the engine's
continuous batching (BackgroundEngine: each request joins the running batch at the next step boundary) against the
same engine serving them one at a time in arrival order. Reports throughput (image tokens/s), each request's time
to first tokens and latency (from its arrival), and draws both schedules as a timeline (DIR/serving.png).

    python bench/bench_serving.py                        # small shape, fp32, 12 requests at 2/s, n = 2, 576 tokens
    python bench/bench_serving.py --shape 1b --requests 8 --rate 0.1 -n 4 --out out/serving
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import janus_rt  # noqa: F401 - before torch: janus_rt sets libgomp's wait policy as the CLI runs (openmp.py)
import torch

from janus_rt.engine import BackgroundEngine, Engine, SamplingParams
from janus_rt.engine.benchmark import SHAPES, bench_model


def workload(model, requests: int, rate: float, n: int, seed: int) -> list[dict]:
    """requests x (arrival offset in s, prompt ids, n, seed): exponential gaps of mean 1/rate, prompts of 8-40 random
    tokens between BOS and <begin_of_image>."""
    rnd, t, out = random.Random(seed), 0.0, []
    tok = model.cfg.tokens
    for k in range(requests):
        body = [rnd.randrange(100, 30000) for _ in range(rnd.randint(8, 40))]
        out.append(dict(arrival=t, ids=[tok.bos_id, *body, tok.boi_id], n=n, seed=seed * 1000 + k))
        t += rnd.expovariate(rate)
    return out


def serve_batched(engine: Engine, jobs: list[dict], tokens: int) -> list[dict]:
    """Each job submitted at its arrival time from a client thread; the engine thread batches whatever is in."""
    times = [None] * len(jobs)
    with BackgroundEngine(engine) as bg:
        t0 = time.perf_counter()
        futures = []
        for job in jobs:
            delay = t0 + job["arrival"] - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            futures.append(bg.submit_image(job["ids"], job["n"], SamplingParams(seed=job["seed"]), num_tokens=tokens))
        for k, fut in enumerate(futures):
            req = fut.result()
            times[k] = dict(arrival=jobs[k]["arrival"], first=req.first_token_time - t0, finish=req.finish_time - t0)
    return times


def serve_one_at_a_time(engine: Engine, jobs: list[dict], tokens: int) -> list[dict]:
    """The same arrivals through a FIFO queue of one: a request starts when it has arrived and the one before it has
    finished (the engine alone with it)."""
    times, t0 = [], time.perf_counter()
    for job in jobs:
        delay = t0 + job["arrival"] - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        req = engine.add_image_request(job["ids"], job["n"], SamplingParams(seed=job["seed"]), num_tokens=tokens)
        engine.run()
        times.append(dict(arrival=job["arrival"], first=req.first_token_time - t0, finish=req.finish_time - t0))
    return times


def summary(times: list[dict], jobs: list[dict], tokens: int) -> dict:
    ttft = [t["first"] - t["arrival"] for t in times]
    lat = [t["finish"] - t["arrival"] for t in times]
    span = max(t["finish"] for t in times) - min(t["arrival"] for t in times)
    q = lambda xs, p: statistics.quantiles(xs, n=10, method="inclusive")[p - 1] if len(xs) > 1 else xs[0]
    return dict(tokens_per_s=round(sum(j["n"] for j in jobs) * tokens / span, 1), span_s=round(span, 2),
                ttft_median_s=round(statistics.median(ttft), 3), ttft_p90_s=round(q(ttft, 9), 3),
                latency_median_s=round(statistics.median(lat), 3), latency_p90_s=round(q(lat, 9), 3),
                latency_max_s=round(max(lat), 3))


def plot_timelines(runs: dict[str, list[dict]], path: Path, title: str) -> None:
    """One panel per mode, a row per request: a thin line from its arrival to its first tokens (waiting + prefill),
    a bar from there to its last token."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    n_req = len(next(iter(runs.values())))
    end = max(t["finish"] for times in runs.values() for t in times)
    left, width, row, gap, top = 150, 760, 14, 34, 58
    panel = n_req * row + gap
    img = Image.new("RGB", (left + width + 30, top + panel * len(runs) + 30), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 8), title, fill="black", font=font)
    d.text((10, 26), "a row per request, time from the first arrival: thin line = arrived, waiting and prefilling; "
           "bar = first tokens to last", fill="dimgray", font=font)
    x = lambda s: left + int(width * s / end)
    for p, (name, times) in enumerate(runs.items()):
        y0 = top + p * panel
        d.text((10, y0 + 4), name, fill="black", font=font)
        for i, t in enumerate(times):
            y = y0 + 20 + i * row
            d.line([x(t["arrival"]), y + row // 2, x(t["first"]), y + row // 2], fill="gray", width=1)
            d.rectangle([x(t["first"]), y + 2, max(x(t["first"]) + 1, x(t["finish"])), y + row - 3], fill="steelblue")
    y = top + panel * len(runs)
    for k in range(6):
        s = end * k / 5
        d.line([x(s), y - 4, x(s), y], fill="black")
        d.text((x(s) - 10, y + 2), f"{s:.0f} s" if end >= 10 else f"{s:.1f} s", fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def main(argv=None) -> dict:
    from janus_rt.cli import DTYPES, resolve_dtype

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="small", choices=sorted(SHAPES), help="LLM shape, random weights")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: the shape's")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--requests", type=int, default=12)
    p.add_argument("--rate", type=float, default=2.0, help="mean arrivals per second (Poisson)")
    p.add_argument("-n", type=int, default=2, help="images per request")
    p.add_argument("--tokens", type=int, default=576, help="image tokens per image")
    p.add_argument("--steps-per-call", type=int, default=8, help="Engine(max_steps_per_call=)")
    p.add_argument("--kv-cache-gb", type=float, default=None, help="default: sized for every request at once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/serving", help="folder for serving.png")
    p.add_argument("--json", default=None, help="append the result row to this JSON-lines file")
    args = p.parse_args(argv)
    if args.requests < 1 or args.rate <= 0 or args.n < 1 or args.tokens < 1:
        p.error("--requests, -n and --tokens must be >= 1, --rate > 0")
    from janus_rt.cli import _json_problem
    from janus_rt.errors import folder_problem

    dtype = resolve_dtype(args.dtype or SHAPES[args.shape][4])
    for problem in ((args.tokens > 576 and f"--tokens must be at most 576 (the shapes' image tokens), "
                                           f"got {args.tokens}"),
                    (dtype == torch.float16 and not args.device.startswith("cuda")
                     and "--dtype fp16 needs a GPU; on the CPU use fp32 or bf16"),
                    folder_problem(args.out), _json_problem(args.json)):  # (before the runs, not after them)
        if problem:
            p.error(problem)
    model = bench_model(args.shape, dtype, torch.device(args.device))
    if args.device == "cpu":  # as janus-rt generate and bench hold it: the projections packed in place
        from janus_rt.engine.cpu_decode import pack_in_place

        pack_in_place(model, always=True)
    jobs = workload(model, args.requests, args.rate, args.n, args.seed)
    make = lambda: (Engine(model, kv_cache_gb=args.kv_cache_gb, max_steps_per_call=args.steps_per_call)
                    if args.kv_cache_gb else
                    Engine.for_requests(model, [(len(j["ids"]), j["n"]) for j in jobs],
                                        max_steps_per_call=args.steps_per_call))
    warm = make()  # first touch of weights and pool, any compiles, outside the timed runs
    warm.add_image_request(jobs[0]["ids"], jobs[0]["n"], SamplingParams(seed=0), num_tokens=8)
    warm.run()
    del warm
    runs = {}
    for name, serve in [("continuous batching", serve_batched), ("one at a time", serve_one_at_a_time)]:
        print(f"[bench_serving] {name}: {args.requests} requests ...", file=sys.stderr, flush=True)
        runs[name] = serve(make(), jobs, args.tokens)
    row = dict(bench="serving", device=args.device, shape=args.shape, dtype=str(dtype).replace("torch.", ""),
               requests=args.requests, rate=args.rate, n=args.n, tokens=args.tokens,
               steps_per_call=args.steps_per_call, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               **{f"{'batched' if k.startswith('continuous') else 'single'}": summary(v, jobs, args.tokens)
                  for k, v in runs.items()})
    print(f"{'':22s} {'tokens/s':>9s} {'ttft med':>9s} {'ttft p90':>9s} {'lat med':>9s} {'lat p90':>9s} {'lat max':>9s}")
    for name, key in [("continuous batching", "batched"), ("one at a time", "single")]:
        s = row[key]
        print(f"{name:22s} {s['tokens_per_s']:9.1f} {s['ttft_median_s']:9.2f} {s['ttft_p90_s']:9.2f} "
              f"{s['latency_median_s']:9.2f} {s['latency_p90_s']:9.2f} {s['latency_max_s']:9.2f}")
    out = Path(args.out) / "serving.png"
    plot_timelines(runs, out, f"{args.requests} requests at {args.rate:g}/s, n = {args.n}, {args.tokens} tokens, "
                              f"{args.shape} {row['dtype']} on {args.device}")
    print(f"timeline: {out}")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


if __name__ == "__main__":
    main()
