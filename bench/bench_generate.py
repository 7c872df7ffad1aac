"""Generation benchmark (janus_rt vs transformers' generate, same weights, alternating runs).

    python bench/bench_generate.py --shape small            # hidden 512 / 8 layers, fp32, n=4 (CPU target >= 3x)
    python bench/bench_generate.py --shape 1b -n 16         # Janus-Pro-1B LLM shape, bf16 (CPU target >= 2.5x)
    python bench/bench_generate.py --shape 1b --profile out/prof   # + Perfetto trace, per-op and per-phase tables

Same as `janus-rt bench`; see janus_rt/engine/benchmark.py.
"""
import argparse

from janus_rt.cli import cmd_bench, run_reporting_usage_errors
from janus_rt.engine.benchmark import add_bench_args

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_args(ap)
    ap.set_defaults(cmd="bench")
    run_reporting_usage_errors("bench", cmd_bench, ap.parse_args())  # janus-rt bench's checks and error lines
