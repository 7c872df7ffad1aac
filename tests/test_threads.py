"""engine/threads.py: the CPU decode goes to one thread while other processes take the cores (its threads' run delay
above busy_per_s a second), tries the team again every probe_every_s, and is back on the whole team when the engine
has nothing left running; tokens are the same on any team size."""
import contextlib
import dataclasses
import threading

import pytest
import torch

from janus_rt import Janus, cpu_ops
from janus_rt.config import preset
from janus_rt.engine import Engine, SamplingParams
from janus_rt.engine.threads import TeamGovernor


class Fake:
    """A clock, a run-delay reading and a thread count the test moves by hand; `inside`: the count each decode call
    ran on."""

    def __init__(self):
        self.t, self.delay_ns, self.n, self.inside = 0.0, 0, 2, []

    def set(self, n):
        self.n = n

    def governor(self, **kw):
        return TeamGovernor(clock=lambda: self.t, delays=lambda: {"1": self.delay_ns}, set_threads=self.set,
                            get_threads=lambda: self.n, **kw)

    def step(self, g, seconds, waited_s=0.0):
        with g.step():
            self.inside.append(self.n)
            self.t += seconds
            self.delay_ns += int(waited_s * 1e9)
        assert self.n == 2  # (outside a decode call: always the thread's own count)


def test_alone_the_team_stays():
    f = Fake()
    g = f.governor()
    for _ in range(100):
        f.step(g, 0.1, waited_s=0.001)  # 0.01 s a second: an idle machine's
    assert not g.solo and set(f.inside) == {2} and g.switches == 0


def test_busy_goes_to_one_thread_and_probes_the_team_again():
    f = Fake()
    g = f.governor(window_s=0.25, probe_every_s=2.0, busy_per_s=0.25)
    f.step(g, 0.1, waited_s=0.07)  # 0.1 s: the window is not over, nothing decided
    assert not g.solo
    f.step(g, 0.2, waited_s=0.07)  # 0.3 s with 0.14 s waited: 0.47 s a second
    assert g.solo and f.inside == [2, 2]
    for _ in range(6):  # 1.8 s of one thread: no probe yet (its own wait is not read)
        f.step(g, 0.3, waited_s=0.3)
    assert g.solo and f.inside[2:] == [1] * 6
    f.step(g, 0.3)  # 2.1 s since: the team again, for a window
    assert not g.solo
    f.step(g, 0.3, waited_s=0.2)  # still busy: one thread again
    assert g.solo and f.inside[-1] == 2
    for _ in range(7):
        f.step(g, 0.3)
    assert not g.solo and f.inside[-7:] == [1] * 7  # probed again ...
    f.step(g, 0.3, waited_s=0.002)  # ... and the machine is free now: the team stays
    f.step(g, 0.3, waited_s=0.002)
    assert not g.solo and f.inside[-2:] == [2, 2] and g.switches == 4


def test_restore_puts_the_team_back():
    f = Fake()
    g = f.governor(window_s=0.0)
    f.step(g, 0.1, waited_s=0.1)
    assert g.solo
    g.restore()
    assert not g.solo and g.switches == 2
    f.step(g, 0.1)
    assert f.inside == [2, 2]
    g.restore()  # (already the team: nothing changes)
    assert g.switches == 2


def test_a_failed_step_puts_the_count_back():
    f = Fake()
    g = f.governor(window_s=0.0)
    f.step(g, 0.1, waited_s=0.1)
    assert g.solo
    with pytest.raises(KeyboardInterrupt):
        with g.step():
            assert f.n == 1
            raise KeyboardInterrupt
    assert f.n == 2 and g.solo


def test_a_user_single_thread_is_left_alone():
    f = Fake()
    g = f.governor(window_s=0.0)
    f.step(g, 0.1, waited_s=0.1)
    assert g.solo
    f.n = 1  # torch.set_num_threads(1) between steps
    with g.step():
        f.t += 1
    assert f.n == 1


def test_unknown_run_delay_changes_nothing():
    g = TeamGovernor(window_s=0.0, clock=iter(range(100)).__next__, delays=lambda: None,
                     set_threads=lambda n: pytest.fail("set"))
    for _ in range(10):
        g.before_step()
        g.after_step()
    assert not g.solo


@pytest.mark.skipif(not cpu_ops.available() or torch.get_num_threads() < 2, reason="needs csrc and two threads")
def test_tokens_do_not_depend_on_the_team_size():
    """A model whose decode layers run on the team (above decode_layer's kTeamWork), generated with a governor that
    switches between one thread and the team at every step, gives the tokens of a run on the team throughout; at the
    end the engine has put the team back."""
    cfg = preset("tiny")
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, hidden_size=256, num_heads=4, num_kv_heads=4,
                                                           head_dim=64, intermediate_size=704),
                              aligner=None, gen_aligner=None, gen_head=None)  # (the adaptors follow the width)
    model = Janus.from_config(cfg, seed=1)
    team = torch.get_num_threads()
    prompt = [cfg.tokens.bos_id, 5, 6, 7, cfg.tokens.boi_id]

    def generate(governor):
        eng = Engine(model, max_num_blocks=64, max_steps_per_call=2)
        eng.governor = governor
        req = eng.add_image_request(prompt, n=2, params=SamplingParams(seed=4), num_tokens=12)
        eng.run()
        return req.tokens, eng

    want, _ = generate(False)
    sizes = []

    def set_threads(n):
        sizes.append(n)
        cpu_ops.set_thread_team(n)

    flip = TeamGovernor(window_s=0.0, probe_every_s=0.0, busy_per_s=-1.0, set_threads=set_threads)
    try:
        got, eng = generate(flip)
        assert got == want
        assert 1 in sizes and sizes.count(team) >= 2 and eng.governor is flip
        assert not flip.solo and torch.get_num_threads() == team  # (restored when nothing was left running)
    finally:
        torch.set_num_threads(team)


def _small_engine(**kw):
    cfg = preset("tiny")
    model = Janus.from_config(dataclasses.replace(cfg, aligner=None, gen_aligner=None, gen_head=None), seed=1)
    eng = Engine(model, max_num_blocks=256, max_steps_per_call=1, **kw)
    return eng, [cfg.tokens.bos_id, 5, 6, 7, cfg.tokens.boi_id]


def _busy():
    """A governor that finds the machine busy at every window: one thread from its second decode call on."""
    return TeamGovernor(window_s=0.0, busy_per_s=-1.0, probe_every_s=1e9)


two_threads = pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs two threads")


@pytest.fixture
def team():
    team = torch.get_num_threads()
    yield team
    torch.set_num_threads(team)


@two_threads
@pytest.mark.parametrize("how", ["abort", "raise", "abandon"])
def test_no_single_thread_left_behind(team, how):
    """A run that ends while the governor is on one thread (the last request aborted, a step that raised, an engine
    no longer stepped) leaves the stepping thread on its team, and the next engine adapts that team."""
    eng, prompt = _small_engine()
    eng.governor = _busy()
    req = eng.add_image_request(prompt, n=1, params=SamplingParams(seed=4), num_tokens=50)
    decode, calls = eng._decode, []

    def decode_then_fail():
        calls.append(torch.get_num_threads())
        if how == "raise" and len(calls) == 3:
            raise KeyboardInterrupt
        return decode()

    eng._decode = decode_then_fail
    with pytest.raises(KeyboardInterrupt) if how == "raise" else contextlib.nullcontext():
        while len(calls) < 4:
            eng.step()
    assert eng.governor.solo and 1 in calls
    if how == "abort":
        eng.abort(req)
        assert not eng.has_work()
    assert torch.get_num_threads() == team
    nxt, _ = _small_engine()
    nxt.add_image_request(prompt, n=1, num_tokens=8)
    nxt.run()
    assert isinstance(nxt.governor, TeamGovernor) and torch.get_num_threads() == team


@two_threads
def test_a_thread_started_during_a_one_thread_call_runs_on_the_team(team):
    """The one-thread decode call sets the stepping thread's count only: a thread that first uses torch meanwhile (a
    server's connection thread decoding its images) takes torch's process-wide count, which is still the team."""
    eng, prompt = _small_engine()
    eng.governor = _busy()
    eng.add_image_request(prompt, n=1, params=SamplingParams(seed=4), num_tokens=6)
    decode, inside, fresh = eng._decode, [], []

    def decode_beside_a_new_thread():
        inside.append(torch.get_num_threads())
        t = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
        t.start()
        t.join()
        return decode()

    eng._decode = decode_beside_a_new_thread
    eng.run()
    assert 1 in inside and len(fresh) == len(inside) and set(fresh) == {team}
    assert torch.get_num_threads() == team


def test_set_thread_team(team, monkeypatch):
    """cpu_ops.set_thread_team: this thread's count (the extension's OpenMP call, which torch follows), torch's own
    call without the extension; n < 1 refused."""
    cpu_ops.set_thread_team(1)
    assert torch.get_num_threads() == 1
    cpu_ops.set_thread_team(team)
    assert torch.get_num_threads() == team
    with pytest.raises(ValueError, match="n >= 1"):
        cpu_ops.set_thread_team(0)
    monkeypatch.setattr(cpu_ops, "_C", None)
    cpu_ops.set_thread_team(1)
    assert torch.get_num_threads() == 1


def _mkl_threads() -> int | None:
    """mkl_get_max_threads() on the calling thread, as torch reports it (None: torch without MKL)."""
    line = [ln for ln in torch.__config__.parallel_info().splitlines() if "mkl_get_max_threads()" in ln]
    return int(line[0].split(":")[1]) if line else None


@two_threads
def test_set_thread_team_narrows_torchs_mkl_calls_too(team):
    """torch's MKL calls (fp32 GEMM: F.linear on more than CPU_GEMV_MAX_ROWS rows or JANUS_RT_CPU_MATMUL=torch; VML)
    take MKL's thread-local count, which torch.set_num_threads sets and omp_set_num_threads does not: a one-thread
    decode call must narrow it as well, and put it back."""
    if _mkl_threads() is None:
        pytest.skip("torch without MKL")
    got = []

    def stepping_thread():
        torch.set_num_threads(team)  # (as BackgroundEngine's thread starts)
        cpu_ops.set_thread_team(1)
        got.append((torch.get_num_threads(), _mkl_threads()))
        cpu_ops.set_thread_team(team)
        got.append((torch.get_num_threads(), _mkl_threads()))

    t = threading.Thread(target=stepping_thread)
    t.start()
    t.join()
    assert got == [(1, 1), (team, team)]


def test_the_switch_turns_it_off(monkeypatch):
    eng, prompt = _small_engine()
    eng.add_image_request(prompt, n=1, num_tokens=4)
    eng.run()
    assert isinstance(eng.governor, TeamGovernor)
    monkeypatch.setenv("JANUS_RT_ADAPTIVE_THREADS", "0")
    eng, _ = _small_engine()
    eng.add_image_request(prompt, n=1, num_tokens=4)
    eng.run()
    assert eng.governor is False


@two_threads
def test_background_engine_thread_takes_its_makers_team(team):
    """torch's count for a new thread is the process's last torch.set_num_threads, from any thread: another engine's
    one-thread decode call may hold it when a BackgroundEngine starts. Its thread runs on its maker's count."""
    from janus_rt.engine.background import BackgroundEngine

    other = threading.Thread(target=torch.set_num_threads, args=(1,))  # (another engine thread, solo just now)
    other.start()
    other.join()
    assert torch.get_num_threads() == team  # (this thread's own count is unchanged)
    eng, prompt = _small_engine()
    seen = []
    with BackgroundEngine(eng) as bg:
        bg.submit_image(prompt, n=1, num_tokens=8, on_tokens=lambda r: seen.append(torch.get_num_threads())).result()
    assert seen and set(seen) == {team}
