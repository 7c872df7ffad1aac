"""Decode-time linear layers on the CPU: janus_rt.cpu_ops.linear vs torch F.linear, in GB/s of weights read.
The packed GEMV (cpu_ops.PackedWeight, what the decode step uses) is timed alongside: fp32, and bf16 on AVX512_BF16;
and for bf16 weights the weight-only int8 GEMV (cpu_ops.Int8Weight, `--int8` of the CLI; its own copies of W, half
the bytes): int8_ms, and int8_x = how many times faster than the packed bf16 GEMV.

A decode step reads every weight once, so y[M, N] = x[M, K] @ W[N, K]^T is bound by the weight stream for small
M. Shapes are Janus-Pro-1B's (attention 2048->2048, MLP 2048->5632 and 5632->2048, gen/lm head 2048->16384),
M = rows decoded at once. Each timed call reads a different copy of W (copies totalling > 4x the L3), so the
numbers are DRAM-streaming numbers, not cache hits. The roofline is the machine's DRAM read bandwidth, measured
here by summing a 1 GiB array (janus_rt.engine.roofline.cpu_read_bandwidth_gbs: the faster of torch.sum and cpu_ops.stream_sum). Times are best-of-N (median columns alongside): on a
shared machine the best is the one least disturbed by other processes.

Run: python bench/bench_gemv.py [--quick] [--threads N]. Prints a markdown table; main() returns the rows.
"""
import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_table  # noqa: E402

from janus_rt import cpu_ops  # noqa: E402
from janus_rt.engine.benchmark import _l3_bytes  # noqa: E402
from janus_rt.engine.roofline import cpu_read_bandwidth_gbs  # noqa: E402

SHAPES = [(2048, 2048), (2048, 5632), (5632, 2048), (2048, 16384)]  # (K, N): x [M, K] -> y [M, N]
MS = [1, 2, 8, 32]
_L3_BYTES = _l3_bytes() or 32 << 20  # this CPU's last-level cache (sysfs), 32 MiB where unknown


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return platform.processor() or "cpu"


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_rotating(fn, weights, min_time: float = 0.3, max_reps: int = 200) -> tuple[float, float]:
    """(best, median) seconds of fn(w) over calls cycling through `weights`, after one warm-up pass."""
    for w in weights:
        fn(w)
    times, i, total = [], 0, 0.0
    while (total < min_time or len(times) < 5) and len(times) < max_reps:
        t = _timed(lambda: fn(weights[i % len(weights)]))
        times.append(t)
        total += t
        i += 1
    return min(times), statistics.median(times)


def main(quick: bool = False) -> list[dict]:
    if not cpu_ops.available():
        print("[bench_gemv] janus_rt._C not built: skipping", file=sys.stderr)
        return []
    shapes, ms = (SHAPES[:2], [1, 8]) if quick else (SHAPES, MS)
    probes = cpu_read_bandwidth_gbs()
    dram = max(probes.values())
    print(f"# bench_gemv: {cpu_name()}, ISA {cpu_ops.simd_isa()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {datetime.date.today()}; DRAM read GB/s: "
          + ", ".join(f"{k} {v:.1f}" for k, v in probes.items()) + f" -> roofline {dram:.1f}")
    rows = []
    for K, N in shapes:
        for wdtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            nbytes = N * K * (4 if wdtype == torch.float32 else 2)
            copies = max(2, -(-4 * _L3_BYTES // nbytes))
            weights = [torch.randn(N, K).to(wdtype) for _ in range(copies)]
            packed = [cpu_ops.PackedWeight(w) for w in weights] if cpu_ops.packed_available(wdtype) else None
            int8 = None
            if wdtype == torch.bfloat16 and cpu_ops.int8_available():  # enough copies that they too miss the L3
                n8 = max(copies, -(-4 * _L3_BYTES // (N * K)))
                int8 = [cpu_ops.Int8Weight(weights[i % copies]) for i in range(n8)]
            for M in ms:
                # x in the weights' dtype, as a model passes it (bf16 x and W: the bf16 dot product where the CPU
                # has one) and torch's own fast path in that dtype
                x = torch.randn(M, K).to(wdtype)
                ours_best, ours_med = time_rotating(lambda w: cpu_ops.linear(x, w), weights)
                torch_best, torch_med = time_rotating(lambda w: F.linear(x, w), weights)
                gbs = nbytes / ours_best / 1e9
                rows.append({
                    "K->N": f"{K}->{N}", "W": name, "M": M,
                    "ours_ms": ours_best * 1e3, "ours_GB/s": gbs, "ours_GFLOP/s": 2 * M * N * K / ours_best / 1e9,
                    "ours_%DRAM": 100 * gbs / dram,
                    "torch_ms": torch_best * 1e3, "torch_GB/s": nbytes / torch_best / 1e9,
                    "speedup": torch_best / ours_best,
                    "ours_med_GB/s": nbytes / ours_med / 1e9, "torch_med_GB/s": nbytes / torch_med / 1e9,
                })
                if packed:
                    pk_best, _ = time_rotating(lambda p: p(x), packed)
                    rows[-1].update({"packed_GB/s": nbytes / pk_best / 1e9,
                                     "packed_GFLOP/s": 2 * M * N * K / pk_best / 1e9})
                    if int8:
                        i8_best, _ = time_rotating(lambda p: p(x), int8)
                        rows[-1].update({"int8_ms": i8_best * 1e3, "int8_x": pk_best / i8_best})
                print(f"  {K}->{N} {name} M={M}: ours {gbs:.1f} GB/s, torch {rows[-1]['torch_GB/s']:.1f} GB/s",
                      file=sys.stderr)
            del weights, packed, int8
    print_table(rows)
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="two shapes, M in {1, 8}")
    ap.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: all cores)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # also the OpenMP team size of janus_rt._C (one libgomp)
    main(args.quick)
