"""engine/threads.py: the CPU decode goes to one thread while other processes take the cores (its threads' run delay
above busy_per_s a second), tries the team again every probe_every_s, and is back on the whole team when the engine
has nothing left running; tokens are the same on any team size."""
import dataclasses

import pytest
import torch

from janus_rt import Janus, cpu_ops
from janus_rt.config import preset
from janus_rt.engine import Engine, SamplingParams
from janus_rt.engine.threads import TeamGovernor


class Fake:
    """A clock and a run-delay reading the test moves by hand, and the team sizes the governor set."""

    def __init__(self):
        self.t, self.delay_ns, self.sizes = 0.0, 0, []

    def governor(self, **kw):
        return TeamGovernor(2, clock=lambda: self.t, delays=lambda: {"1": self.delay_ns},
                            set_threads=self.sizes.append, **kw)

    def step(self, g, seconds, waited_s=0.0):
        g.before_step()
        self.t += seconds
        self.delay_ns += int(waited_s * 1e9)
        g.after_step()


def test_alone_the_team_stays():
    f = Fake()
    g = f.governor()
    for _ in range(100):
        f.step(g, 0.1, waited_s=0.001)  # 0.01 s a second: an idle machine's
    assert not g.solo and f.sizes == [] and g.switches == 0


def test_busy_goes_to_one_thread_and_probes_the_team_again():
    f = Fake()
    g = f.governor(window_s=0.25, probe_every_s=2.0, busy_per_s=0.25)
    f.step(g, 0.1, waited_s=0.07)  # 0.1 s: the window is not over, nothing decided
    assert f.sizes == []
    f.step(g, 0.2, waited_s=0.07)  # 0.3 s with 0.14 s waited: 0.47 s a second
    assert g.solo and f.sizes == [1]
    for _ in range(6):  # 1.8 s of one thread: no probe yet (its own wait is not read)
        f.step(g, 0.3, waited_s=0.3)
    assert f.sizes == [1]
    f.step(g, 0.3)  # 2.1 s since: the team again, for a window
    assert not g.solo and f.sizes == [1, 2]
    f.step(g, 0.3, waited_s=0.2)  # still busy: one thread again
    assert g.solo and f.sizes == [1, 2, 1]
    for _ in range(7):
        f.step(g, 0.3)
    assert f.sizes == [1, 2, 1, 2]  # probed again ...
    f.step(g, 0.3, waited_s=0.002)  # ... and the machine is free now: the team stays
    f.step(g, 0.3, waited_s=0.002)
    assert not g.solo and f.sizes == [1, 2, 1, 2] and g.switches == 4


def test_restore_puts_the_team_back():
    f = Fake()
    g = f.governor(window_s=0.0)
    f.step(g, 0.1, waited_s=0.1)
    assert g.solo
    g.restore()
    assert not g.solo and f.sizes == [1, 2]
    g.restore()  # (already the team: nothing to set)
    assert f.sizes == [1, 2]


def test_unknown_run_delay_changes_nothing():
    g = TeamGovernor(2, window_s=0.0, clock=iter(range(100)).__next__, delays=lambda: None,
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
        torch.set_num_threads(n)

    flip = TeamGovernor(team, window_s=0.0, probe_every_s=0.0, busy_per_s=-1.0, set_threads=set_threads)
    try:
        got, eng = generate(flip)
        assert got == want
        assert 1 in sizes and sizes.count(team) >= 2 and eng.governor is flip
        assert not flip.solo and torch.get_num_threads() == team  # (restored when nothing was left running)
    finally:
        torch.set_num_threads(team)
