"""How long janus_rt's OpenMP threads spin before they sleep, set before torch loads libgomp.

One OpenMP runtime serves the process: torch's wheel ships libgomp.so.1, and janus_rt._C links libgomp.so.1 by that
name, so it joins the copy torch loaded. libgomp reads its environment once, when it loads (at `import torch`), and
a thread that waits (at a barrier, or for the next parallel region) spins GOMP_SPINCOUNT times before it sleeps:
300000 by default, ~7 ms of pause loops on the 2-core Zen 5 host (23 ns each). That outlasts a scheduler time slice.
When another process holds one of the cores, a thread at one of a decode layer's dozen barriers keeps its own core
busy waiting for a team-mate that is not running, where a sleeping one would let the kernel run the team-mate there.
1000 spins (~23 us) still covers a barrier's usual wait when the team has the machine to itself.
Measured (bench/RESULTS.md, thirty-second session): beside one busy process, the small shape's step 9.8-14.6 ->
7.3-7.8 ms, 1B n = 1 104-167 -> 79-85 ms; alone no slower (small, 1B n = 1 and n = 16 within the host's noise).

`apply()` runs when janus_rt is imported, and sets GOMP_SPINCOUNT only where it can still take effect and where the
user has set neither it nor OMP_WAIT_POLICY. `settle()` runs once torch is imported: libgomp has read the variable, so
janus_rt's setting leaves the environment again (a child process starts from the user's: a tool that is not janus_rt
keeps libgomp's default, and one that imports janus_rt sets it itself and records it as janus_rt's, not the user's).
"""
from __future__ import annotations

import os
import sys

SPINCOUNT = "1000"
_state = "not applied"


def apply() -> str:
    """Set GOMP_SPINCOUNT=SPINCOUNT for the libgomp that torch will load, if torch is not loaded yet and the user set
    neither GOMP_SPINCOUNT nor OMP_WAIT_POLICY. -> what holds (also `wait_policy()`)."""
    global _state
    user = {k: os.environ[k] for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY") if os.environ.get(k)}
    if user:
        _state = "the user's " + ", ".join(f"{k}={v}" for k, v in user.items())
    elif "torch" in sys.modules:  # libgomp has read its environment already
        _state = "libgomp's default (torch was imported before janus_rt)"
    else:
        os.environ["GOMP_SPINCOUNT"] = SPINCOUNT
        _state = f"GOMP_SPINCOUNT={SPINCOUNT} (janus_rt's)"
    return _state


def settle() -> None:
    """After torch's import: take janus_rt's GOMP_SPINCOUNT out of the environment, once libgomp has read it."""
    if _state.endswith("(janus_rt's)") and os.environ.get("GOMP_SPINCOUNT") == SPINCOUNT and _libgomp_loaded():
        del os.environ["GOMP_SPINCOUNT"]


def _libgomp_loaded() -> bool:
    try:
        with open("/proc/self/maps") as f:
            return "libgomp" in f.read()
    except OSError:  # (not Linux: left set)
        return False


def wait_policy() -> str:
    """How the process's OpenMP threads wait, as apply() found it (for benchmark rows)."""
    return _state
