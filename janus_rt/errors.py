"""UsageError: a request the user can fix (a flag's value, a size, a path, a run folder). The command line says it in
one `janus-rt CMD: ...` line; anything else raised inside janus_rt keeps its traceback (a bug to report)."""


class UsageError(ValueError):
    """A ValueError caused by what the caller asked for, not by janus_rt itself."""


def check_device(value) -> "torch.device":
    """--device's value as a torch.device: cpu, cuda or cuda:N, with CUDA present where asked for; UsageError
    otherwise (torch's own errors for 'gpu', or for 'cuda' on a CPU-only build, are tracebacks deep in a run)."""
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {value!r}: expected cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {value}: this torch has no CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {value}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device
