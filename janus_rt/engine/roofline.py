"""The roofline the benchmarks divide by: the machine's two ceilings, measured (read bandwidth; matmul peak), and the
bytes and FLOPs a decode step must move and do; with the small device helpers the benchmarks share (sync, peak
memory, the device's name). Used by engine/benchmark.py (`janus-rt bench`), bench/bench_understand.py and the
kernel benchmarks."""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch


def measure_bandwidth_gbs(device) -> float:
    """Read bandwidth. GPU: a reduction over a 1 GiB buffer (best of 5). CPU: the faster of cpu_read_bandwidth_gbs'
    probes (torch.sum reads slower than the hardware allows; the roofline takes the faster)."""
    if str(device) == "cpu":
        return max(cpu_read_bandwidth_gbs().values())
    x = torch.ones(2**28, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        x.sum()
        sync(device)
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
        best_gflops = max(best_gflops, 2 * n**3 / _best_seconds(lambda: a @ b, device) / 1e9)
    return best_gflops


def _best_seconds(fn, device, repeats: int = 3) -> float:
    """The fastest of `repeats` timed calls of fn() (device synced around each)."""
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def run_delays() -> dict[str, int] | None:
    """{thread id: its run delay in ns (Linux schedstat)} over this process's live threads, or None where the kernel
    does not say."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    out = {}
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/schedstat") as f:
                out[task] = int(f.read().split()[1])
        except (OSError, ValueError, IndexError):  # (a thread that ended meanwhile)
            continue
    return out or None


class CpuWait:
    """Run delay per second of wall time over a `with` block (waited_s between run_delays() at its start and end):
    .per_s, None where unknown. It says whether other processes took the cores the block wanted: ~0.005 alone on
    the 2-core host, 0.63 beside one busy process (2026-12-06)."""

    def __enter__(self):
        self._d, self._t = run_delays(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        waited, dt = waited_s(self._d, run_delays()), time.perf_counter() - self._t
        self.per_s = waited / dt if waited is not None and dt > 0 else None
        return False


def waited_s(before: dict | None, after: dict | None) -> float | None:
    """Seconds of run delay between two run_delays() snapshots, thread by thread over the threads alive at `after`
    (a thread that exited in between takes its delay with it: never negative, as a difference of sums could be; max
    with 0: a thread id reused by a new thread), or None where either is unknown."""
    if before is None or after is None:
        return None
    return sum(max(0, v - before.get(tid, 0)) for tid, v in after.items()) / 1e9


# above this much run delay per second, a benchmark's times were shared with other processes (alone ~0.005)
BUSY_WAIT_PER_S = 0.05


def busy_note(name: str, per_s: list) -> str | None:
    """A one-line note where `name`'s timed runs waited for a CPU more than BUSY_WAIT_PER_S, else None."""
    known = [w for w in per_s if w is not None]
    if not known or max(known) <= BUSY_WAIT_PER_S:
        return None
    whose = name + ("'" if name.endswith("s") else "'s")
    how = (f"{known[0]:.2f} s per second of its run" if len(per_s) == 1 else
           f"up to {max(known):.2f} s per second of its timed runs")
    return (f"note: {whose} threads waited for a CPU {how}: other processes shared the cores, so its times are upper "
            f"bounds")


def record_cpu_waits(row: dict, waits: dict) -> None:
    """row[f"{name}_cpu_wait_per_s"] = each of name's timed runs' CpuWait.per_s (rounded), for each name in `waits`;
    and busy_note's line printed for a name whose runs waited past BUSY_WAIT_PER_S."""
    for name, per_s in waits.items():
        row[f"{name}_cpu_wait_per_s"] = [None if x is None else round(x, 3) for x in per_s]
        note = busy_note(name, per_s)
        if note:
            print(f"# {note}", flush=True)


def reset_peak_memory(device):
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS)
        except OSError:
            pass


def peak_memory_gb(device) -> float:
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def measure_int8_matmul_gops(device) -> float:
    """The CPU's int8 matmul peak (GOP/s, a multiply-add = 2): torch._int_mm on n x n int8 (oneDNN's VNNI / AMX
    kernels), best of three; what W8A8's projections (--int8 w8a8) are held to. 0.0 where this torch has none."""
    if torch.device(device).type != "cpu" or not hasattr(torch, "_int_mm"):
        return 0.0
    n = 2048
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (n, n), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (n, n), dtype=torch.int8, generator=g)
    try:
        torch._int_mm(a, b)
    except RuntimeError:
        return 0.0
    return 2 * n**3 / _best_seconds(lambda: torch._int_mm(a, b), device) / 1e9


def projection_flops(model, rows: int) -> float:
    """FLOPs of a decode step's LLM projections (qkv, o, gate_up, down; 2 a weight a row) for `rows` rows, and of
    the gen head's and gen aligner's linears where they are held int8 (pack_for_cpu_(int8=...)): the part of
    decode_step_bytes_flops' FLOPs that W8A8 does as int8."""
    from janus_rt.models.packed_linear import GEN_ADAPTORS, PROJECTIONS, Int8Linear

    n = 0
    for l in model.llm.layers:
        for part, name in PROJECTIONS:
            m = getattr(getattr(l, part), name)
            n += m.in_features * m.out_features
    for m in (getattr(getattr(model, a), fc) for a in GEN_ADAPTORS for fc in ("fc1", "fc2")):
        if isinstance(m, Int8Linear):
            n += m.in_features * m.out_features
    return 2.0 * n * rows


def decode_step_bytes_flops(model, rows: int, context: int, shared: tuple[int, int] = (0, 0),
                            kv_dtype: torch.dtype | None = None) -> tuple[float, float]:
    """Bytes a decode step must read (LLM + gen head/aligner weights once, plus the KV cache it attends over) and its
    FLOPs, for `rows` rows of `context` cached tokens each. shared = (groups, tokens): the first `tokens` of every row
    sit in blocks that `groups` sets of rows share (an image request's cond and uncond prompts: 2 groups; whole
    blocks only), so they are stored, and must be read, once per group rather than once per row. FLOPs count every
    row's full context. kv_dtype: the cache's (default the model's; torch.int8: a byte a value + a 4-byte scale a
    head, kv_cache.KVCache.block_bytes)."""
    from janus_rt.engine.kv_cache import KVCache
    from janus_rt.models.packed_linear import packed_weight_nbytes, packed_weight_numel

    isz = model.dtype.itemsize
    mods = (model.llm, model.gen_head, model.gen_aligner)
    # parameters at the model dtype's size (the LLM's but its embedding); the weights held in place for the CPU
    # (Janus.pack_for_cpu_: the projections, and with int8 the adaptors too) as held (int8: a byte each, + scales)
    params = (sum(p.numel() for n, p in model.llm.named_parameters() if "embed_tokens" not in n)
              + sum(p.numel() for m in mods[1:] for p in m.parameters()))
    held, held_bytes = sum(packed_weight_numel(m) for m in mods), sum(packed_weight_nbytes(m) for m in mods)
    c = model.cfg.llm
    groups, prompt = shared
    kv_tokens = rows * context - (rows - groups) * prompt if groups else rows * context
    kv = kv_tokens * KVCache.block_bytes(c.num_layers, 1, c.num_kv_heads, c.head_dim, kv_dtype or model.dtype)
    flops = 2 * (params + held) * rows + rows * context * c.num_layers * 4 * c.num_heads * c.head_dim
    return params * isz + held_bytes + kv, flops


def device_name(device) -> str:
    """The GPU's name, or the CPU's model name and core count."""
    return torch.cuda.get_device_name() if str(device).startswith("cuda") else _cpu_name()



def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return "cpu"
