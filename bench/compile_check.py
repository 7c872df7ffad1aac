"""Compile every Triton launch the tests make for a GPU target, on a machine without a GPU.

    TRITON_INTERPRET=0 python bench/compile_check.py [--arch 90] [pytest args, default: the Triton kernel tests]

Why: a lent GPU session is short and rare (bench/RESULTS.md), and the interpreter that runs the kernels here ignores
what only a real compile checks (launch options such as num_warps, shapes tl.dot accepts, register pressure). This
runs the test files under pytest with a stand-in driver that reports a CUDA target (sm_90 by default) and turns
every launch into a compile only: Triton's own front end, optimizer and bundled ptxas produce a cubin per kernel
specialization (and per autotune config), and nothing runs. The tests' assertions then fail (no kernel ran): only
the compile table matters. Prints, per kernel, the specializations compiled, the failures (first error each) and
the most spilled registers seen. Run it under the Triton version the GPU machine has (a venv with that wheel).
"""
import collections
import os
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TESTS = ["test_rms_norm", "test_attention", "test_paged_attention", "test_kv_store", "test_rope",
                 "test_rope_kv_store", "test_swiglu", "test_mlp", "test_vq", "test_sampling",
                 "test_linear_cross_entropy", "test_model_triton", "test_train", "test_engine"]


class CompileOnly:
    """pytest plugin: a stand-in driver for `arch` and compile-only launches, results per kernel."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.driver import driver
        from triton.runtime.jit import JITFunction

        class Driver:  # what JITFunction.run asks of the active driver before it compiles
            def get_current_device(self):
                return 0

            def get_current_stream(self, device=None):
                return 0

            def get_current_target(self):
                return GPUTarget("cuda", arch, 32)

        driver.set_active(Driver())
        self.results = collections.OrderedDict()
        real_run, plugin = JITFunction.run, self

        def run(fn, *args, grid, warmup=False, **kwargs):
            name = fn.fn.__name__
            entry = plugin.results.setdefault(name, {"compiled": 0, "failed": 0, "error": None, "spills": 0})
            try:
                kernel = real_run(fn, *args, grid=grid, warmup=True, **kwargs)
                kernel = kernel.result() if hasattr(kernel, "result") else kernel
                if "cubin" not in (getattr(kernel, "asm", None) or {}):
                    raise RuntimeError("no cubin produced")
                entry["compiled"] += 1
                entry["spills"] = max(entry["spills"], int(getattr(kernel, "n_spills", 0) or 0))
            except Exception:  # noqa: BLE001 - recorded, the table reports it
                entry["failed"] += 1
                entry["error"] = entry["error"] or traceback.format_exc(limit=3)[-800:]
            return None

        def tune_all(tuner, *args, **kwargs):  # every config compiled, none timed (there is nothing to time)
            for config in tuner.configs:
                tuner.fn.run(*args, **kwargs, **config.all_kwargs())

        JITFunction.run = run
        Autotuner.run = tune_all

    def table(self) -> str:
        lines = [f"{'kernel':48} {'launches compiled':>17} {'failed':>6} {'spills':>6}"]
        for name, e in self.results.items():
            lines.append(f"{name:48} {e['compiled']:17d} {e['failed']:6d} {e['spills']:6d}")
        for name, e in self.results.items():
            if e["error"]:
                lines += ["", f"first error of {name}:", e["error"]]
        return "\n".join(lines)


def main(argv: list[str]) -> int:
    import pytest

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("run with TRITON_INTERPRET=0: the interpreter compiles nothing")
    os.environ["TRITON_INTERPRET"] = "0"  # (tests/conftest.py would set 1 on a machine without CUDA)
    arch = 90
    if argv[:1] == ["--arch"]:
        arch, argv = int(argv[1]), argv[2:]
    plugin = CompileOnly(arch)
    tests = argv or [os.path.join(ROOT, "tests", f"{t}.py") for t in DEFAULT_TESTS]
    pytest.main(["-q", "-p", "no:cacheprovider", "--tb=no", "--no-header", *tests], plugins=[plugin])
    import triton

    print(f"\n# Triton {triton.__version__}: every test launch compiled for sm_{arch} (no kernel ran)")
    print(plugin.table())
    return 1 if any(e["failed"] for e in plugin.results.values()) or not plugin.results else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
