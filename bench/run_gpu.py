"""Every GPU test and benchmark in one go (what a lent H100/H200 session runs first).

    python bench/run_gpu.py [--out bench/gpu_results.md] [--skip-tests] [--generate]

1. pytest on CUDA (the kernels run natively; the suite's CPU-interpreter shapes run too),
2. every bench/bench_<op>.py main(), each table under its op name,
3. with --generate, the engine benchmark at the Janus-Pro-1B shape (n=16, 576 tokens) vs transformers.
Writes one markdown file with the device name and date; on a machine without CUDA it says so and exits 0.
"""
import argparse
import contextlib
import importlib
import io
import os
import subprocess
import sys
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import print_table  # noqa: E402

OPS = ["attention", "paged_attention", "kv_store", "rms_norm", "rope", "swiglu", "mlp", "vq", "sampling",
       "linear_cross_entropy"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(HERE, "gpu_results.md"))
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--generate", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to run (the CPU suite is ./run.sh test)")
        return 0
    lines = [f"# GPU results: {torch.cuda.get_device_name()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             f"torch {torch.__version__}, triton {importlib.import_module('triton').__version__}", ""]
    if not args.skip_tests:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "--no-header", "-p", "no:cacheprovider",
                            os.path.join(HERE, "..", "tests")], capture_output=True, text=True)
        tail = (r.stdout + r.stderr).strip().splitlines()[-15:]
        lines += ["## pytest on CUDA", "```", *tail, "```", ""]
        print("\n".join(tail), flush=True)
    for op in OPS:
        buf = io.StringIO()
        try:
            mod = importlib.import_module(f"bench_{op}")
            with contextlib.redirect_stdout(buf):
                rows = mod.main()
            table = io.StringIO()
            print_table(rows, file=table)
            lines += [f"## {op}", table.getvalue(), ""]
        except Exception:  # noqa: BLE001 - one failing bench must not hide the others
            lines += [f"## {op}", "```", traceback.format_exc()[-3000:], "```", ""]
        print(f"[{op}] done", flush=True)
    if args.generate:
        from janus_rt.engine.benchmark import add_bench_args
        from janus_rt.engine.benchmark import main as bench_generate

        ap2 = argparse.ArgumentParser()
        add_bench_args(ap2)
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            bench_generate(ap2.parse_args(["--shape", "1b", "-n", "16", "--repeats", "1", "--cuda-graphs"]))
        lines += ["## generate (Janus-Pro-1B shape, n=16, 576 tokens)", "```", buf.getvalue(), "```"]
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
