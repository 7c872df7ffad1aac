import os

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
