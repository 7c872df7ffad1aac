"""A training run's loss curves as a PNG (RUN/loss.png), drawn from its log.jsonl records with Pillow.

The training loop redraws it at every checkpoint and at the end; `python -m janus_rt.train.plot RUN` draws it from a
run folder's log.jsonl (a run still going, or one from before this file existed).

One panel: the step's loss (what it minimised: mean image-token CE + mean text-token CE) and each kind's CE
(t2i, und, text; over the steps that had that kind), raw per step in a light shade and a moving mean over ~2 % of
the run on top, on a shared linear y axis from the lowest to the highest value drawn.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from janus_rt.train.data import KINDS

# (log key, line colour): the step's loss in black, each kind's CE in blue, orange, green
SERIES = [("loss", (0, 0, 0)), *zip((f"loss_{k}" for k in KINDS), ((31, 119, 180), (255, 127, 14), (44, 160, 44)))]
WIDTH, HEIGHT = 900, 520
LEFT, RIGHT, TOP, BOTTOM = 70, 170, 40, 50  # plot area margins (the legend sits in the right one)


def series(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """{key: [(step, value), ...]} for each of SERIES with at least one finite value (None / NaN / inf skipped)."""
    out = {}
    for key, _ in SERIES:
        pts = [(int(r["step"]), float(r[key])) for r in records
               if r.get(key) is not None and math.isfinite(float(r[key]))]
        if pts:
            out[key] = pts
    return out


def moving_mean(pts: list[tuple[int, float]], window: int) -> list[tuple[int, float]]:
    """The mean of each point's values over its last `window` steps (the points with step > its step - window: fewer
    at the start, and fewer for a kind that some steps lack, so a sparse kind is not smoothed over more of the run)."""
    out, acc, j = [], 0.0, 0
    for i, (s, v) in enumerate(pts):
        acc += v
        while pts[j][0] <= s - window:  # (j <= i: pts[i]'s own step is > s - window)
            acc -= pts[j][1]
            j += 1
        out.append((s, acc / (i + 1 - j)))
    return out


def _ticks(lo: float, hi: float, n: int = 5, integers: bool = False) -> list[float]:
    """About n round values spanning [lo, hi] (whole numbers only with `integers`)."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    if integers:
        mag = max(mag, 1)
    step = next(m * mag for m in ((1, 2, 5, 10) if integers else (1, 2, 2.5, 5, 10)) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _labels(ticks: list[float]) -> list[str]:
    """The ticks' labels, with as many significant digits as their spacing needs (3 at least: 10.12 and 10.14 must
    not both read 10.1)."""
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 0.0
    out = []
    for v in ticks:
        if step > 0 and abs(v) < 1e-9 * step:  # (a zero tick off by rounding)
            v = 0.0
        digits = 3
        if v != 0 and step > 0:
            digits = max(3, math.floor(math.log10(abs(v))) - math.floor(math.log10(step)) + 2)
        out.append(f"{v:.{digits}g}")
    return out


def plot_losses(records: list[dict], path: str | Path, title: str = "") -> Path:
    """Draw the loss curves of `records` (log.jsonl's dicts) to `path` (PNG). -> the path."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=13)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1, or built without FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    data = series(records)
    if not data:
        raise ValueError("no loss values to plot (an empty log?)")
    steps = [s for pts in data.values() for s, _ in pts]
    values = [v for pts in data.values() for _, v in pts]
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    y0, y1 = min(values), max(values)
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = 0.03 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad
    pw, ph = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(step: float, value: float) -> tuple[float, float]:
        return LEFT + (step - x0) / (x1 - x0) * pw, TOP + (y1 - value) / (y1 - y0) * ph

    img = Image.new("RGB", (WIDTH, HEIGHT), "white")
    d = ImageDraw.Draw(img)
    d.text((LEFT, 12), title or "training loss", fill="black", font=font)
    y_ticks = _ticks(y0, y1)
    for v, label in zip(y_ticks, _labels(y_ticks)):  # y grid and labels
        _, y = px(x0, v)
        d.line([(LEFT, y), (LEFT + pw, y)], fill=(230, 230, 230))
        d.text((8, y - 7), label, fill="dimgray", font=font)
    for s in _ticks(x0, x1, integers=True):  # x ticks
        x, _ = px(s, y0)
        d.line([(x, TOP + ph), (x, TOP + ph + 5)], fill="gray")
        d.text((x - 10, TOP + ph + 8), f"{int(s)}", fill="dimgray", font=font)
    d.text((LEFT + pw // 2 - 15, HEIGHT - 20), "step", fill="dimgray", font=font)
    d.rectangle([LEFT, TOP, LEFT + pw, TOP + ph], outline="gray")
    window = max(1, (x1 - x0) // 50)
    for i, (key, rgb) in enumerate(SERIES):
        if key not in data:
            continue
        light = tuple(int(c + (255 - c) * 0.7) for c in rgb)
        if window > 1:
            _polyline(d, [px(s, v) for s, v in data[key]], light, 1)
        curve = moving_mean(data[key], window) if window > 1 else data[key]
        _polyline(d, [px(s, v) for s, v in curve], rgb, 2)
        last = data[key][-1][1]
        ly = TOP + 10 + 20 * i
        d.line([(LEFT + pw + 12, ly + 7), (LEFT + pw + 36, ly + 7)], fill=rgb, width=3)
        d.text((LEFT + pw + 42, ly), f"{key} {last:.3f}", fill="black", font=font)
    if window > 1:
        d.text((LEFT + pw + 12, TOP + 10 + 20 * len(SERIES)), f"(mean of {window} steps;", fill="dimgray", font=font)
        d.text((LEFT + pw + 12, TOP + 26 + 20 * len(SERIES)), " light: each step)", fill="dimgray", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def _polyline(d, xy: list[tuple[float, float]], fill, width: int) -> None:
    if len(xy) == 1:
        d.point(xy, fill=fill)
    else:
        d.line(xy, fill=fill, width=width)


def plot_run(run: str | Path) -> Path:
    """RUN/loss.png from RUN/log.jsonl (lines that do not parse, e.g. one cut short by a kill, are skipped)."""
    run = Path(run)
    records = []
    for line in (run / "log.jsonl").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return plot_losses(records, run / "loss.png", f"training loss: {run.name}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m janus_rt.train.plot",
                                description="Draw a training run's loss curves (RUN/log.jsonl -> RUN/loss.png).")
    p.add_argument("run", help="the run folder (janus-rt train --out)")
    args = p.parse_args(argv)
    if Path(args.run).is_file() and Path(args.run).name == "log.jsonl":  # the log itself: its folder is the run
        args.run = str(Path(args.run).parent)
    log = Path(args.run) / "log.jsonl"
    if not log.is_file():
        raise SystemExit(f"{log}: no such file (give the folder a `janus-rt train --out` wrote)")
    print(plot_run(args.run))


if __name__ == "__main__":
    main()
