"""janus_rt/train/plot.py: a run's loss curves as a PNG, drawn the right way up, from log.jsonl's records."""
import json

import pytest
from PIL import Image

from janus_rt.train import plot


def records(steps=40, und_every=2):
    """A loss falling linearly from 9 to ~1; und present every `und_every` steps, text never, a NaN t2i once."""
    out = []
    for s in range(1, steps + 1):
        loss = 9 - 8 * (s - 1) / (steps - 1)
        out.append({"step": s, "loss": loss, "loss_t2i": float("nan") if s == 5 else loss + 0.5,
                    "loss_und": loss - 0.5 if s % und_every == 0 else None, "loss_text": None})
    return out


def test_series_skip_missing_and_non_finite_values():
    got = plot.series(records())
    assert set(got) == {"loss", "loss_t2i", "loss_und"}  # no text value at all: no series, no legend entry
    assert [s for s, _ in got["loss_und"]] == list(range(2, 41, 2))
    assert 5 not in [s for s, _ in got["loss_t2i"]] and len(got["loss_t2i"]) == 39
    assert plot.moving_mean([(1, 1.0), (2, 3.0), (3, 5.0)], 2) == [(1, 1.0), (2, 2.0), (3, 4.0)]


def test_the_curve_falls_from_top_left_to_bottom_right(tmp_path):
    path = plot.plot_losses(records(), tmp_path / "sub" / "loss.png", "run")
    img = Image.open(path).convert("RGB")
    assert img.size == (plot.WIDTH, plot.HEIGHT)
    pw, ph = plot.WIDTH - plot.LEFT - plot.RIGHT, plot.HEIGHT - plot.TOP - plot.BOTTOM

    def has(colour, x0, x1, y0, y1):  # fractions of the plot area
        box = (plot.LEFT + int(x0 * pw), plot.TOP + int(y0 * ph), plot.LEFT + int(x1 * pw), plot.TOP + int(y1 * ph))
        return colour in {c for _, c in img.crop(box).getcolors(1 << 20)}

    black, orange = dict(plot.SERIES)["loss"], dict(plot.SERIES)["loss_und"]
    assert has(black, 0.0, 0.1, 0.0, 0.2) and has(black, 0.9, 1.0, 0.8, 1.0)  # high first, low last
    assert not has(black, 0.9, 1.0, 0.0, 0.5) and not has(black, 0.0, 0.1, 0.5, 1.0)
    assert has(orange, 0.0, 1.0, 0.0, 1.0)  # the steps with an und loss make a line


def test_long_runs_are_smoothed_and_flat_ones_drawn(tmp_path):
    long = records(steps=500)
    plot.plot_losses(long, tmp_path / "long.png")
    assert plot.moving_mean(plot.series(long)["loss"], 9)[-1][1] == pytest.approx(
        sum(r["loss"] for r in long[-9:]) / 9)
    flat = [{"step": s, "loss": 2.0} for s in (1, 2)]  # one value: an axis around it, no division by zero
    plot.plot_losses(flat, tmp_path / "flat.png")
    with pytest.raises(ValueError, match="no loss values"):
        plot.plot_losses([{"step": 1, "loss": None}], tmp_path / "none.png")
    assert plot._ticks(1, 12, integers=True) == [5, 10] and plot._ticks(1.3, 8.4) == [2, 4, 6, 8]


def test_plot_a_run_folder_from_the_command_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    lines = [json.dumps(r) for r in records()]
    (run / "log.jsonl").write_text("\n".join(lines) + '\n{"step": 41, "lo')  # a last line cut short by a kill
    plot.main([str(run)])
    assert capsys.readouterr().out.strip() == str(run / "loss.png")
    assert Image.open(run / "loss.png").size == (plot.WIDTH, plot.HEIGHT)
    with pytest.raises(SystemExit, match="no such file"):
        plot.main([str(tmp_path / "nothing")])
    (run / "loss.png").unlink()
    plot.main([str(run / "log.jsonl")])  # the log itself: the same run
    assert capsys.readouterr().out.strip() == str(run / "loss.png") and (run / "loss.png").exists()


def test_tick_labels_tell_a_narrow_range_apart():
    ticks = plot._ticks(10.11, 10.19)
    assert plot._labels(ticks) == ["10.12", "10.14", "10.16", "10.18"]  # ("10.1", "10.1", "10.2", "10.2" at .3g)
    assert plot._labels(plot._ticks(1.3, 8.4)) == ["2", "4", "6", "8"]
    assert plot._labels(plot._ticks(-0.5, 0.5))[plot._ticks(-0.5, 0.5).index(0.0)] == "0"


def test_a_sparse_kind_is_smoothed_over_as_many_steps_as_a_dense_one():
    dense = [(s, 9 - 8 * s / 5000) for s in range(1, 5001)]
    sparse = dense[9::10]  # a kind in one step of ten
    end = plot.moving_mean(dense, 100)[-1][1]
    assert plot.moving_mean(sparse, 100)[-1][1] == pytest.approx(end, abs=0.02)  # (1.79 over 100 points: 1000 steps)


def test_drawn_without_freetype(tmp_path, monkeypatch):
    """Pillow >= 10.1 built without FreeType: load_default(size=...) raises ImportError; the bitmap font is used."""
    from PIL import ImageFont

    DeferredError = getattr(pytest.importorskip("PIL._util"), "DeferredError", None)
    if not hasattr(DeferredError, "new"):
        pytest.skip("this Pillow has no PIL._util.DeferredError.new")
    monkeypatch.setattr(ImageFont, "core", DeferredError.new(ImportError("The _imagingft C module is not installed")))
    assert Image.open(plot.plot_losses(records(), tmp_path / "loss.png")).size == (plot.WIDTH, plot.HEIGHT)
