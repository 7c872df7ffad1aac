"""Shared benchmark helpers: device peaks measured on the machine at hand, bandwidth columns, and a table printer."""
import functools
import sys

import torch


def require_cuda(name: str) -> bool:
    """Print a clear skip line and return False when no CUDA GPU is present (benchmarks then exit 0)."""
    if torch.cuda.is_available():
        return True
    print(f"[{name}] no CUDA GPU: skipping (GPU benchmarks need a CUDA device)", file=sys.stderr)
    return False


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


@functools.lru_cache(maxsize=None)
def peak_bandwidth_gbs() -> float:
    """Measured device-memory bandwidth (GB/s): a 2 GiB device-to-device copy counts read + write."""
    import triton.testing

    n = 1 << 29  # 512M fp32 = 2 GiB
    src = torch.empty(n, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


@functools.lru_cache(maxsize=None)
def peak_tflops(dtype: torch.dtype = torch.bfloat16) -> float:
    """Measured dense matmul throughput (TFLOP/s) of torch.matmul at 8192^3 in `dtype`."""
    import triton.testing

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=25, rep=200)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def bandwidth_cols(nbytes: float, ms: float, peak_gbs: float) -> dict:
    """A table row's bandwidth columns: {"GB/s", "% peak BW"} of `nbytes` moved in `ms` against the measured peak."""
    gbs = nbytes / ms / 1e6
    return {"GB/s": gbs, "% peak BW": 100 * gbs / peak_gbs}


def print_table(rows: list[dict], file=sys.stdout) -> None:
    """Print rows (dicts) as a markdown table; a key some rows lack is an empty cell there."""
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))  # every row's keys, first-seen order
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    print("| " + " | ".join(keys) + " |", file=file)
    print("|" + "---|" * len(keys), file=file)
    for r in rows:
        print("| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |", file=file)
