"""roofline.run_delays / CpuWait / busy_note: how long this process's threads waited for a CPU, which the benchmarks
record beside their times so that a run shared with other processes says so."""
import os
import subprocess
import sys

import pytest

from janus_rt.engine.roofline import BUSY_WAIT_PER_S, CpuWait, busy_note, run_delays

CHILD = """import os, threading, time
from janus_rt.engine.roofline import CpuWait
import torch
os.sched_setaffinity(0, {{min(os.sched_getaffinity(0))}})  # one CPU for every thread of this process
x = torch.randn(384, 384)
def work():
    t = time.perf_counter()
    while time.perf_counter() - t < 0.6:
        x @ x  # (~ms without the GIL: the threads really compete for the CPU, not for the GIL)
done, release = threading.Barrier({n} + 1), threading.Event()
def run():
    work()
    done.wait()
    release.wait()  # (alive until measured: an exited thread's run delay no longer counts)
threads = [threading.Thread(target=run) for _ in range({n})]
with CpuWait() as w:
    for t in threads:
        t.start()
    done.wait()
release.set()
for t in threads:
    t.join()
print(w.per_s)"""


def _wait_per_s(n: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # (a new thread's matmul would start a team of its own)
    out = subprocess.run([sys.executable, "-c", CHILD.format(n=n)], env=env, check=True, capture_output=True,
                         text=True)
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(run_delays() is None or not hasattr(os, "sched_setaffinity"),
                    reason="needs Linux schedstat and CPU affinity")
def test_threads_that_share_one_cpu_wait_for_it():
    """Four busy threads on one CPU each wait ~3/4 of the time (~3 s of run delay a second); one alone barely waits.
    (Time on the CPU would read ~1 s a second in both cases: the two cases tell it from the run delay.)"""
    four, one = _wait_per_s(4), _wait_per_s(1)
    # (relative: on a loaded host one other process on the pinned CPU alone gives the single thread ~0.5 s/s)
    assert four > 2.0 and four - one > 1.5, (four, one)


EXITS = """import os, threading, time
from janus_rt.engine.roofline import CpuWait, run_delays
import torch
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
x = torch.randn(384, 384)
def work():
    t = time.perf_counter()
    while time.perf_counter() - t < 0.6:
        x @ x
go = threading.Event()
def helper():
    work()  # (competing with the main thread for the one CPU: it piles up run delay)
    go.wait()
h = threading.Thread(target=helper)
h.start()
work()
before = sum(run_delays().values()) / 1e9
with CpuWait() as w:
    go.set()
    h.join()  # the helper exits inside the block, taking its run delay with it
    time.sleep(0.05)
print(before, w.per_s)"""


@pytest.mark.skipif(run_delays() is None or not hasattr(os, "sched_setaffinity"),
                    reason="needs Linux schedstat and CPU affinity")
def test_a_thread_that_exits_inside_the_block_is_no_negative_wait():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", EXITS], env=env, check=True, capture_output=True, text=True)
    before, per_s = map(float, out.stdout.split()[-2:])
    assert before > 0.1  # (the helper did wait before the block)
    assert 0 <= per_s < 0.5, per_s


def test_run_delays_grow_and_a_block_measures_them():
    w = run_delays()
    if w is None:
        pytest.skip("no schedstat here")
    later = run_delays()
    assert all(v >= 0 for v in w.values()) and all(later[t] >= v for t, v in w.items() if t in later)
    with CpuWait() as c:
        sum(range(10000))
    assert c.per_s is not None and c.per_s >= 0


def test_busy_note_only_past_the_threshold():
    assert busy_note("janus_rt", [0.004, None, BUSY_WAIT_PER_S]) is None
    assert busy_note("janus_rt", [None]) is None and busy_note("janus_rt", []) is None
    note = busy_note("transformers", [0.01, 0.63])
    assert note.startswith("note: transformers' threads waited for a CPU up to 0.63 s per second")
    assert busy_note("janus_rt", [0.2]).startswith("note: janus_rt's threads waited for a CPU 0.20 s per second of "
                                                    "its run: other processes")
