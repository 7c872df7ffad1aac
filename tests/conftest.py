import os

# numpy's OpenBLAS (which the Triton interpreter uses for tl.dot) spins threads on a loaded 2-core machine:
# one interpreted dot took 24 ms instead of 0.03 ms. Must be set before torch (and so numpy) is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# The CLI commands the tests run in this process would otherwise change glibc's malloc for the rest of the session
# (cpu_ops.retain_freed_memory is process-wide); tests/test_cpu_ops.py checks it in child processes.
os.environ.setdefault("JANUS_RT_KEEP_FREED", "0")

# Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set before any kernel module is
# imported. Without a GPU every Triton test runs through the CPU interpreter.
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


@pytest.fixture
def route(request):
    """Indirect parameter: the CPU kernels' AMX routes on (True) or off (False, cpu_ops.set_amx) for one test, put
    back after it (engine_runs.amx_routes makes the parameters)."""
    from janus_rt import cpu_ops

    old = cpu_ops.set_amx(request.param)
    yield request.param
    cpu_ops.set_amx(old)


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def poison(monkeypatch):
    """Launchers allocate outputs with torch.empty / empty_like (packed weights: cpu_ops.empty_huge): fill them
    with NaN (floats) or -7 (ints), so an output element a kernel never writes fails the test."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-7) if t.dtype != torch.bool else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_empty_like(*a, **k)))
    from janus_rt import cpu_ops  # its huge-page buffers (PackedWeight's data) come from mmap, not torch.empty

    real_empty_huge = cpu_ops.empty_huge
    monkeypatch.setattr(cpu_ops, "empty_huge", lambda *a, **k: fill(real_empty_huge(*a, **k)))


@pytest.fixture(scope="module")
def one_thread():
    """Modules of tiny ops use it (pytestmark = pytest.mark.usefixtures("one_thread")): on a busy 2-core machine two
    OpenMP threads spin and wait for each other (measured 85 s vs 15 s for the VQ training test at load ~4); the
    results do not depend on the thread count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
