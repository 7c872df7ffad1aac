"""janus_rt/openmp.py: `import janus_rt` sets libgomp's spin count before torch loads it, and only where it can
still take effect and the user has not chosen a wait policy."""
import os
import subprocess
import sys

import pytest

SHOW = ("import os, sys\n{first}import janus_rt\nfrom janus_rt import openmp\n"
        "print(openmp.wait_policy()); print(os.environ.get('GOMP_SPINCOUNT'))")


def _run(first="", **env):
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", SHOW.format(first=first)], env={**clean, **env}, check=True,
                         capture_output=True, text=True).stdout.splitlines()
    return out[-2], out[-1]


def test_import_sets_the_spin_count_before_torch_loads_libgomp():
    policy, value = _run(first="assert 'torch' not in sys.modules\n")
    assert policy == "GOMP_SPINCOUNT=1000 (janus_rt's)"
    assert value == "None"  # read by libgomp at torch's import, then out of the environment (settle)


def test_a_child_process_does_not_inherit_janus_rts_spin_count():
    """A subprocess started after `import janus_rt` sees the user's environment: a tool that is not janus_rt keeps
    libgomp's default, and a janus_rt child records the spin count as janus_rt's (not as "the user's")."""
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    parent = ("import subprocess, sys\nimport janus_rt\n"
              f"sys.stdout.write(subprocess.run([sys.executable, '-c', {SHOW.format(first='')!r}], "
              "capture_output=True, text=True, check=True).stdout)\n")
    out = subprocess.run([sys.executable, "-c", parent], env=clean, check=True, capture_output=True,
                         text=True).stdout.splitlines()
    assert out[-2:] == ["GOMP_SPINCOUNT=1000 (janus_rt's)", "None"], out


@pytest.mark.parametrize("name,value", [("GOMP_SPINCOUNT", "5"), ("OMP_WAIT_POLICY", "passive")])
def test_a_users_own_wait_policy_is_kept(name, value):
    policy, spin = _run(**{name: value})
    assert policy == f"the user's {name}={value}"
    assert spin == (value if name == "GOMP_SPINCOUNT" else "None")


def test_torch_imported_first_leaves_libgomp_as_it_is():
    policy, spin = _run(first="import torch\n")
    assert policy == "libgomp's default (torch was imported before janus_rt)" and spin == "None"


IDLE = """import resource, sys, time
{first}import torch
torch.set_num_threads(2)
x = torch.randn(256, 256)
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
for _ in range(20):
    x @ x
c0, t0 = cpu(), time.perf_counter()
for _ in range(100):
    x @ x
    time.sleep(0.003)  # the team waits between regions: libgomp's default spins through it (~7 ms), 1000 spins not
print((cpu() - c0) / (time.perf_counter() - t0))"""


def test_libgomp_takes_the_spin_count():
    """The setting reaches libgomp: between parallel regions 3 ms apart, the team's waiting thread sleeps instead of
    spinning, so the process uses far less CPU than wall time (measured on the 2-core host: 0.13 with janus_rt's
    setting, 1.06 with libgomp's default). Load from other processes can only lower the ratio."""
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}

    def ratio(first):
        out = subprocess.run([sys.executable, "-c", IDLE.format(first=first)], env=clean, check=True,
                             capture_output=True, text=True).stdout
        return float(out.split()[-1])

    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs two cores for an OpenMP team")
    assert ratio("import janus_rt\n") < 0.5
