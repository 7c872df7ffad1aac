"""The engine's CPU decode step: one csrc call per decoder layer (engine/cpu_decode.py, csrc/decode_layer.cpp)
against the layer-by-layer cpu path (ops.* per op: csrc GEMV, KV store and paged attention, torch for the rest).

Same engine, same random weights, one image request (n images -> 2n rows), alternating runs; ms per decode step
(the whole step: LLM, gen head, CFG sampling, next-token embedding). Shapes from janus_rt.engine.benchmark.

Run: python bench/bench_cpu_decode.py [--shape small|1b] [-n N] [--tokens 100] [--repeats 2]. Prints a markdown table.
"""
import argparse
import datetime
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gemv import cpu_name  # noqa: E402
from common import print_table  # noqa: E402

from janus_rt import cpu_ops  # noqa: E402
from janus_rt.engine.benchmark import SHAPES, bench_model, image_engine  # noqa: E402


def step_ms(model, prompt, n, tokens, fused: bool) -> float:
    eng = image_engine(model, prompt, n, tokens, layerwise=not fused)
    eng.run()
    return eng.stats.ms_per_step


def main(shape: str = "small", tokens: int = 100, repeats: int = 2, n: int | None = None) -> list[dict]:
    if not cpu_ops.available():
        print("[bench_cpu_decode] janus_rt._C not built: skipping", file=sys.stderr)
        return []
    _, _, _, _, dtype, n_default = SHAPES[shape]
    n = n or n_default
    dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    model = bench_model(shape, dtype, "cpu")
    prompt = [model.cfg.tokens.bos_id] + list(range(100, 118)) + [model.cfg.tokens.boi_id]
    print(f"# bench_cpu_decode: {cpu_name()}, {torch.get_num_threads()} threads, {datetime.date.today()}; "
          f"{shape} LLM shape {dtype}, n={n} ({2 * n} rows), {tokens} tokens/image")
    times = {True: [], False: []}
    for _ in range(repeats):
        for fused in (True, False):
            times[fused].append(step_ms(model, prompt, n, tokens, fused))
    rows = []
    for fused, name in ((True, "decode_layer (one csrc call per layer)"), (False, "layer by layer (ops.*)")):
        rows.append({"path": name, "best_ms/step": min(times[fused]), "median_ms/step": statistics.median(times[fused])})
    rows[0]["speedup"] = min(times[False]) / min(times[True])
    print_table(rows)
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="small", choices=["small", "1b"])
    ap.add_argument("--tokens", type=int, default=100, help="image tokens per image (decode steps)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("-n", type=int, default=None, help="images per prompt (default: the shape's; rows = 2n)")
    args = ap.parse_args()
    main(args.shape, args.tokens, args.repeats, args.n)
