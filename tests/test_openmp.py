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
    from janus_rt import openmp

    policy, value = _run(first="assert 'torch' not in sys.modules\n")
    assert value == openmp.SPINCOUNT == "1000" and policy == "GOMP_SPINCOUNT=1000 (janus_rt's)"


@pytest.mark.parametrize("name,value", [("GOMP_SPINCOUNT", "5"), ("OMP_WAIT_POLICY", "passive")])
def test_a_users_own_wait_policy_is_kept(name, value):
    policy, spin = _run(**{name: value})
    assert policy == f"the user's {name}={value}"
    assert spin == (value if name == "GOMP_SPINCOUNT" else "None")


def test_torch_imported_first_leaves_libgomp_as_it_is():
    policy, spin = _run(first="import torch\n")
    assert policy == "libgomp's default (torch was imported before janus_rt)" and spin == "None"
