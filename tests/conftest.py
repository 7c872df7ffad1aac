import os

# numpy's OpenBLAS (which the Triton interpreter uses for tl.dot) spins threads on a loaded 2-core machine:
# one interpreted dot took 24 ms instead of 0.03 ms. Must be set before torch (and so numpy) is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

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
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"
