"""Every GPU test and benchmark in one go, inside a time budget (what a lent H100/H200 session runs first).

    python bench/run_gpu.py [--out FILE] [--budget SECONDS] [--skip-tests] [--generate]
    bash bench/gpu_session.sh          # the device tool's one call: janus_rt in place (no install), then this
                                       # with --generate

Sections, most wanted first, each in its own process with a deadline taken from what is left of --budget:
1. with --generate, the engine benchmark at the Janus-Pro-1B shape (n=16, 576 tokens, CUDA graphs) vs transformers,
   then its --profile of three decode steps (per-kernel table; profile/trace.json beside the markdown),
2. tests/test_engine.py on CUDA (the real CUDA-graph engine against the eager one),
3. bench/bench_paged_attention.py (both paged attention kernels side by side), then with --generate the engine
   alone again on the other kernel (JANUS_RT_PAGED_ATTENTION=slots),
4. the whole pytest suite on CUDA (the kernels run natively; the suite's CPU-interpreter shapes run too),
5. every other bench/bench_<op>.py main(), each table under its op name.
The markdown file (--out; default $OUT/gpu_results.md when $OUT is set, else bench/gpu_results.md) is rewritten
after every section, so a session cut short still returns what finished. On a machine without CUDA it says so and
exits 0.
"""
import argparse
import importlib
import importlib.util
import os
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

OPS = ["attention", "paged_attention", "kv_store", "rms_norm", "rope", "rope_kv_store", "swiglu", "mlp", "vq",
       "sampling", "linear_cross_entropy"]
TESTS = [os.path.join(ROOT, "tests")]  # what the pytest section runs
ENGINE_TESTS = [os.path.join(ROOT, "tests", "test_engine.py")]  # run first: the CUDA-graph engine against eager
GENERATE_ARGS = ["--shape", "1b", "-n", "16", "--repeats", "1", "--cuda-graphs"]

# One op's benchmark, run in a child process: its main()'s rows as a markdown table.
_OP_CHILD = """
import sys
sys.path.insert(0, {here!r})
from common import print_table
import bench_{op} as b
print_table(b.main())
"""


def default_out() -> str:
    out = os.environ.get("OUT")
    return os.path.join(out, "gpu_results.md") if out else os.path.join(HERE, "gpu_results.md")


def run_section(cmd: list[str], seconds: float) -> tuple[str, str]:
    """Run cmd from the repository root with a deadline -> (status line, its output)."""
    t = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(1.0, seconds))
        status = f"exit {r.returncode} after {time.perf_counter() - t:.0f} s"
        return status, (r.stdout + r.stderr)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"") + (e.stderr or b"")
        out = out.decode(errors="replace") if isinstance(out, bytes) else out
        return f"STOPPED at its {seconds:.0f} s deadline", out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="markdown file (default: $OUT/gpu_results.md, else bench/)")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for all sections together")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--generate", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to run (the CPU suite is ./run.sh test)")
        return 0
    out = args.out or default_out()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    end = time.perf_counter() + args.budget
    lines = [f"# GPU results: {torch.cuda.get_device_name()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             f"torch {torch.__version__}, triton {importlib.import_module('triton').__version__}, "
             f"python {sys.version.split()[0]}; budget {args.budget:.0f} s", ""]

    def section(title: str, cmd: list[str], share: float, keep_lines: int = 200, full: str | None = None) -> None:
        """Run one section with `share` of the time left (all of it for the last), then rewrite the file.
        full: also write the whole output to this file beside `out`, and list its failed tests in the markdown
        (pytest -v names each as it finishes, so a run stopped at its deadline still names them)."""
        left = end - time.perf_counter()
        if left < 5:
            lines.extend([f"## {title}", "not run: the budget was spent", ""])
        else:
            status, text = run_section(cmd, left * share)
            tail = text.strip().splitlines()[-keep_lines:]
            if full:
                with open(os.path.join(os.path.dirname(os.path.abspath(out)), full), "w") as f:
                    f.write(text)
                failed = {}  # test id -> its first FAILED / ERROR line (-v's line, then -rfE's summary line)
                for ln in text.splitlines():
                    ids = [w for w in ln.split() if "::" in w]
                    if ids and (" FAILED " in f" {ln} " or " ERROR " in f" {ln} "):
                        failed.setdefault(ids[0], ln)
                failed = list(failed.values())
                tail = [f"({len(failed)} failed or erred; whole output in {full})", *failed[:60], "...", *tail]
            lines.extend([f"## {title} ({status})", "```", *tail, "```", ""])
            print(f"[{title}] {status}", flush=True)
        with open(out, "w") as f:
            f.write("\n".join(lines) + "\n")

    py = sys.executable
    op_cmd = lambda op: [py, "-c", _OP_CHILD.format(here=HERE, op=op)]
    ops = list(OPS)
    if args.generate:  # the headline target first: 576 tokens x 16 images in <= 1.0 s
        # --profile: a torch.profiler trace of three decode steps beside the markdown, and the per-kernel table.
        # 2026-12-04 (H200) this section took 147 s without the warm-up runs, the multi-step graphs' captures and the
        # profile it has now: it gets close to half the budget (the row is printed before the profile starts)
        prof = os.path.join(os.path.dirname(os.path.abspath(out)), "profile")
        section("generate (Janus-Pro-1B shape, n=16, 576 tokens, CUDA graphs)",
                [py, "-m", "janus_rt.cli", "bench", *GENERATE_ARGS, "--profile", prof], 0.45, keep_lines=90)
    # -v: every test's name and outcome as it finishes; -n: Triton's compiles dominate, spread them over the cores
    workers = ["-n", str(min(12, os.cpu_count() or 1))] if importlib.util.find_spec("xdist") else []
    if not args.skip_tests and ENGINE_TESTS:  # whether the headline's CUDA graphs give the eager engine's tokens
        section("engine tests on CUDA", [py, "-m", "pytest", "-v", "--no-header", "-p", "no:cacheprovider",
                                         "-rfE", *ENGINE_TESTS], 0.2, keep_lines=15, full="pytest_engine.txt")
    if "paged_attention" in ops:  # its two kernels ("block", "slots") timed side by side: seconds, so early
        ops.remove("paged_attention")
        section("paged_attention", op_cmd("paged_attention"), 0.2, keep_lines=40)
    if args.generate:
        # the same engine on the other paged decode attention kernel (kernels/paged_attention.py's "slots", never
        # timed on a GPU before): the A/B that decides ops.TRITON_PAGED_ATTENTION's default; janus_rt only
        section("generate, paged attention variant=slots",
                ["env", "JANUS_RT_PAGED_ATTENTION=slots", py, "-m", "janus_rt.cli", "bench", *GENERATE_ARGS,
                 "--no-transformers"], 0.3, keep_lines=40)
    if not args.skip_tests:
        section("pytest on CUDA", [py, "-m", "pytest", "-v", "--no-header", "-p", "no:cacheprovider", "-rfE",
                                   *workers, *TESTS], 0.6, keep_lines=15, full="pytest.txt")
    for i, op in enumerate(ops):
        section(op, op_cmd(op), 1.0 / (len(ops) - i), keep_lines=40)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
