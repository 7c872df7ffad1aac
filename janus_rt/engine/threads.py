"""The CPU decode's team size under contention: one thread while other processes take the cores, the whole team again
once they stop.

A decode layer is a dozen phases, each ending at a barrier of the OpenMP team. When another process holds one of
the two cores, every barrier waits for whichever team-mate the kernel has descheduled, and one thread alone is
faster. Measured beside one busy process (2-core Zen 5, 2026-12-06, ms per decode step, team / one thread): small
shape fp32 n = 4 7.75 / 4.58, 1B n = 1 ~80 / 75, 1B n = 16 183-185 / 169-173; alone the team is faster (small 3.2 /
4.5, 1B n = 1 54 / 73).

The signal is this process's threads' run delay (roofline.run_delays: time runnable but waiting for a CPU), over
windows of at least `window_s` of decode: above `busy_per_s` seconds a second (alone ~0.005, beside one busy process
0.6-0.8) the decode goes to one thread; every `probe_every_s` it tries the team again for a window and keeps it if
the wait has gone. Tokens do not depend on the team size (the csrc kernels compute each value in the same order on
any number of threads; tests/test_threads.py). `JANUS_RT_ADAPTIVE_THREADS=0` keeps the team whatever happens.
"""
from __future__ import annotations

import contextlib
import time

import torch

from janus_rt import cpu_ops
from janus_rt.engine.roofline import run_delays, waited_s


class TeamGovernor:
    """Decides the CPU decode's team size between decode steps: the calling thread's own count (read at each
    step), or 1 while other processes take the cores. Each decode call runs inside step(): one thread only for the
    length of that call, the thread's own count again when it returns or raises, so nothing else (a prefill, the VQ
    decoder, the next engine, an engine aborted or abandoned mid-run, a failed step) inherits the single thread. The
    count set is the stepping thread's own (cpu_ops.set_thread_team): a thread that first uses torch meanwhile (a
    server's connection thread) copies torch's process-wide count, which stays the team's.
    restore() starts the next request on the team (the engine calls it when no request is left running)."""

    def __init__(self, window_s: float = 0.25, probe_every_s: float = 2.0, busy_per_s: float = 0.25,
                 clock=time.perf_counter, delays=run_delays, set_threads=cpu_ops.set_thread_team,
                 get_threads=torch.get_num_threads):
        self.window_s, self.probe_every_s, self.busy_per_s = window_s, probe_every_s, busy_per_s
        self._clock, self._delays, self._set, self._get = clock, delays, set_threads, get_threads
        self.solo = False
        self.switches = 0  # team <-> one thread changes so far (for tests and benchmark rows)
        self._start = self._snap = None  # the current window's start (clock) and run delays
        self._solo_since = 0.0

    @contextlib.contextmanager
    def step(self):
        """Around one decode call: on one thread while solo (the thread's count put back however the call ends); the
        window read after it. A thread already on one thread (the user's torch.set_num_threads(1)) is left alone."""
        team = self._get()
        if team <= 1:
            yield
            return
        self.before_step()
        narrowed = self.solo
        if narrowed:
            self._set(1)
        try:
            yield
        except BaseException:
            self._start = None  # (a window a failed step broke off says nothing)
            raise
        finally:
            if narrowed:
                self._set(team)
        self.after_step()

    def before_step(self) -> None:
        if self._start is None:
            self._start, self._snap = self._clock(), (None if self.solo else self._delays())

    def after_step(self) -> None:
        now = self._clock()
        if self._start is None or now - self._start < self.window_s:
            return
        if self.solo:  # (its own wait says nothing about the other core: try the team now and then)
            if now - self._solo_since >= self.probe_every_s:
                self._use(solo=False)
        else:
            waited = waited_s(self._snap, self._delays())
            if waited is not None and waited / (now - self._start) > self.busy_per_s:
                self._use(solo=True)
                self._solo_since = now
        self._start = None

    def restore(self) -> None:
        if self.solo:
            self._use(solo=False)
        self._start = None

    def _use(self, solo: bool) -> None:  # (the next step() call applies it)
        self.solo = solo
        self.switches += 1
