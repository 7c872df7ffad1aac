"""UsageError: a request the user can fix (a flag's value, a size, a path, a run folder). The command line says it in
one `janus-rt CMD: ...` line; anything else raised inside janus_rt keeps its traceback (a bug to report). Beside it,
the checks of user input that several modules share (counts, --device, output folders, the JANUS_RT_* switches)."""
import operator
import os


class UsageError(ValueError):
    """A ValueError caused by what the caller asked for, not by janus_rt itself."""


def check_count(name: str, value) -> int:
    """value as an int >= 1 (numpy's and torch's integers too), else a UsageError (n = 2.5 or -1 used to surface as a
    misleading cache-size error)."""
    try:
        v = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        v = None
    if v is None or v < 1:
        raise UsageError(f"{name} must be an int >= 1, got {value!r}")
    return v


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


# janus_rt's environment switches and the values each takes ("" = unset, its default)
ENV_SWITCHES = {"JANUS_RT_CPU_MATMUL": ("auto", "torch", "csrc"), "JANUS_RT_PACKED": ("auto", "0", "1"),
                "JANUS_RT_AMX": ("1", "0"), "JANUS_RT_HUGE_PAGES": ("1", "0"), "JANUS_RT_KEEP_FREED": ("1", "0"),
                "JANUS_RT_PAGED_ATTENTION": ("block", "slots"), "JANUS_RT_DEBUG": ("0", "1"),
                "JANUS_RT_ADAPTIVE_THREADS": ("1", "0"),
                # the bf16 packed layout's K tile in KiB (csrc/packed_layout.h reads it; auto: the build's, 64)
                "JANUS_RT_BF16_KTILE_KIB": ("auto",) + tuple(str(1 << i) for i in range(2, 11))}


def folder_problem(path: str, flag: str = "--out") -> str | None:
    """Why `path` cannot become the output folder, found before any work (and without creating it: a run that fails
    later leaves nothing behind); None where it can. Probes its nearest existing folder with a folder of its own."""
    import tempfile
    from pathlib import Path

    p = Path(path).absolute()
    if p.exists() and not p.is_dir():
        return f"{flag} {path!r} is a file, not a folder"
    if p.is_dir():
        probe_in = p
    else:
        probe_in = p.parent
        while not probe_in.exists():
            probe_in = probe_in.parent
        if not probe_in.is_dir():
            return f"{flag} {path!r}: cannot create it ({probe_in} is a file)"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".janus-rt-probe-", dir=probe_in))
    except OSError as e:
        return f"{flag} {path!r}: cannot write in {probe_in} ({e.strerror or e})"
    return None


def env_switch(name: str) -> str:
    """The value of janus_rt's environment switch `name` (lower case; its default where unset or empty), or a
    UsageError for a value it does not take (JANUS_RT_KEEP_FREED=no used to count as on, JANUS_RT_PACKED=maybe was a
    traceback from inside the engine)."""
    choices = ENV_SWITCHES[name]
    v = os.environ.get(name, "").lower() or choices[0]  # (not stripped: csrc reads JANUS_RT_AMX as it is)
    if v not in choices:
        shown = ", ".join(choices[:-1]) + f" or {choices[-1]}"
        raise UsageError(f"{name}={os.environ[name]!r}: expected {shown} (unset: {choices[0]})")
    return v


def check_environment() -> None:
    """Every switch of ENV_SWITCHES checked at once (the command line, before any work)."""
    for name in ENV_SWITCHES:
        env_switch(name)
