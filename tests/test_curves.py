"""Training curves (issue 27): curves.png of a run's log.jsonl, the seeds' curves over one another, and
--tensorboard; tested as the panels are (image sizes, legend entries against the log's keys, same log -> same
bytes)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from PIL import Image

from locbe.report.curves import (
    CURVES_NAME,
    RUN_SIZE,
    build_run_figure,
    build_seed_figure,
    phase_boundaries,
    read_log,
    seed_curves_size,
    series_keys,
    try_write_run_curves,
    write_run_curves,
    write_seed_curves,
)

EARLY = ("cls", "cls_aux", "sc", "be")  # the smoke preset's warm-up terms; seg, reg and loc join after step 200
LATE = ("seg", "reg", "loc")


def fake_log(steps=40, boundary=20, seed=0) -> list[dict]:
    """Rows as locbe/train.py's log_step writes them: steps done, lr, time, the terms of the phase, total."""
    rows = []
    for step in range(1, steps + 1):
        terms = {k: 1.0 / (step + i + seed) for i, k in enumerate(EARLY)}
        if step > boundary:
            terms.update({k: 0.5 / (step + i) - (0.01 if k == "reg" else 0.0) for i, k in enumerate(LATE)})
        rows.append({"step": step, "lr": 1e-3 * (1 - step / (steps + 1)) ** 0.9, "time": 0.5 * step, **terms,
                     "total": sum(terms.values())})
    return rows


def write_run(run_dir: Path, rows: list[dict], phases=({"until": 19}, {"until": None}), seed=0) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"preset": "smoke", "seed": seed, "phases": [{"weights": {"cls": 1.0}, **p} for p in phases]}
    (run_dir / "config.json").write_text(json.dumps(config))
    return run_dir


def legend_texts(legend) -> list[str]:
    return [t.get_text() for t in legend.get_texts()]


def test_series_and_phase_boundaries_come_from_the_log_and_the_config():
    rows = fake_log()
    # first-seen order, total last: every key of the log but step, lr and time
    assert series_keys(rows) == [*EARLY, *LATE, "total"]
    keys = set().union(*rows) - {"step", "lr", "time"}
    assert set(series_keys(rows)) == keys
    # until=19 covers the 0-based steps 0..19, i.e. 20 steps done: the next phase starts after step 20
    assert phase_boundaries({"phases": [{"until": 19}, {"until": None}]}) == [20]
    assert phase_boundaries({"phases": [{"until": 8000}, {"until": 12000}, {"until": None}]}, 10_000) == [8001]
    assert phase_boundaries({}) == []


def test_run_picture_size_legend_and_phase_lines(tmp_path):
    rows = fake_log()
    run = write_run(tmp_path / "run", rows)
    path = write_run_curves(run)
    assert path == run / CURVES_NAME
    with Image.open(path) as im:
        assert im.size == RUN_SIZE == (1000, 640)
    assert [p.name for p in run.iterdir() if p.suffix == ".png"] == [CURVES_NAME]  # no temp files left

    fig = build_run_figure(rows, [20])
    losses, lr_ax = fig.axes
    labels = legend_texts(losses.get_legend())
    assert labels == [*EARLY, *LATE, "total (weighted sum)", "phase boundary"]
    # each loss line is the log's column, a late term only from its first step
    for line in losses.get_lines():
        key = {"total (weighted sum)": "total"}.get(line.get_label(), line.get_label())
        if key == "phase boundary":
            assert list(line.get_xdata()) == [20, 20]
            continue
        expected = [(r["step"], r[key]) for r in rows if key in r]
        assert list(zip(line.get_xdata(), line.get_ydata())) == expected
    lr_line = lr_ax.get_lines()[0]
    assert list(lr_line.get_ydata()) == [r["lr"] for r in rows]
    assert [list(ln.get_xdata()) for ln in lr_ax.get_lines()[1:]] == [[20, 20]]  # the boundary there too


def test_another_log_another_legend(tmp_path):
    rows = [{k: v for k, v in r.items() if k not in LATE} for r in fake_log()]  # no late phase
    fig = build_run_figure(rows, [])
    assert legend_texts(fig.axes[0].get_legend()) == [*EARLY, "total (weighted sum)"]


def test_same_log_same_bytes_another_log_other_bytes(tmp_path):
    a = write_run(tmp_path / "a", fake_log())
    b = write_run(tmp_path / "b", fake_log())
    write_run_curves(a, title="t")
    write_run_curves(b, title="t")
    assert (a / CURVES_NAME).read_bytes() == (b / CURVES_NAME).read_bytes()
    c = write_run(tmp_path / "c", fake_log(seed=3))
    write_run_curves(c, title="t")
    assert (c / CURVES_NAME).read_bytes() != (a / CURVES_NAME).read_bytes()
    png = (a / CURVES_NAME).read_bytes()
    assert b"matplotlib" not in png.lower()  # no version stamp


def test_a_torn_last_line_is_left_out_and_a_broken_log_never_raises(tmp_path, capsys):
    run = write_run(tmp_path / "run", fake_log(steps=5))
    with open(run / "log.jsonl", "a") as f:
        f.write('{"step": 6, "lr": 0.1, "to')
    assert [r["step"] for r in read_log(run / "log.jsonl")] == [1, 2, 3, 4, 5]
    assert write_run_curves(tmp_path / "nothing") is None  # no log yet: nothing drawn
    (run / "config.json").write_text("{not json")
    assert try_write_run_curves(run) is None and try_write_run_curves(run) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "curves.png not written" in err[0] and "training goes on" in err[0]  # once per run


def test_seed_picture_size_legend_and_titles(tmp_path):
    runs = [("seed 0", write_run(tmp_path / "seed-0", fake_log(seed=0), seed=0)),
            ("seed 1", write_run(tmp_path / "seed-1", fake_log(seed=1), seed=1)),
            ("seed 2", tmp_path / "seed-2")]  # a seed without a log (failed before step 1) is left out
    out = tmp_path / "report" / CURVES_NAME
    assert write_seed_curves(out, runs, "smoke")
    n = 1 + len(EARLY) + len(LATE) + 1  # total, the terms, lr
    assert seed_curves_size(n) == (990, 45 + math.ceil(n / 3) * 220 + 40)
    with Image.open(out) as im:
        assert im.size == seed_curves_size(n)
    fig = build_seed_figure([(label, read_log(d / "log.jsonl")) for label, d in runs[:2]], [20], "smoke")
    assert legend_texts(fig.legends[0]) == ["seed 0", "seed 1", "phase boundary"]
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["total (weighted sum)", *EARLY, *LATE, "learning rate"]
    for ax, key in zip(fig.axes, ["total", *EARLY, *LATE, "lr"]):
        seed_lines = [ln for ln in ax.get_lines() if ln.get_label().startswith("seed")]
        assert [ln.get_label() for ln in seed_lines] == ["seed 0", "seed 1"]
        for ln, label in zip(seed_lines, ("seed 0", "seed 1")):
            rows = read_log(dict(runs)[label] / "log.jsonl")
            assert list(ln.get_ydata()) == [r[key] for r in rows if key in r]
    again = tmp_path / "again.png"
    write_seed_curves(again, runs, "smoke")
    assert again.read_bytes() == out.read_bytes()
    assert not write_seed_curves(tmp_path / "none.png", [("seed 9", tmp_path / "missing")])


def test_tensorboard_missing_is_one_line_and_exit_2_before_anything_is_written(tmp_path, monkeypatch, capsys):
    from locbe.cli import main as cli

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    out = tmp_path / "run"
    assert cli(["train", "--preset", "smoke", "--data-root", str(tmp_path / "data"), "--out", str(out),
                "--tensorboard", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tensorboard needs the tensorboard package" in err[0] and "[tensorboard]" in err[0]
    assert not out.exists()
    assert cli(["reproduce", "--preset", "smoke", "--data-root", str(tmp_path / "data"), "--out", str(out),
                "--tensorboard", "--no-progress"]) == 2
    assert "--tensorboard needs" in capsys.readouterr().err and not (tmp_path / "data").exists()


def test_tensorboard_events_hold_the_logged_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from locbe.training.tensorboard import TensorBoardLog

    rows = fake_log(steps=6, boundary=3)
    board = TensorBoardLog(tmp_path, 0)
    for r in rows:
        board.log(r["step"], r["lr"], {k: v for k, v in r.items() if k not in ("step", "lr", "time")})
    board.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {f"loss/{k}" for k in series_keys(rows)} | {"lr"}
    for key in series_keys(rows):
        events = acc.Scalars(f"loss/{key}")
        assert [e.step for e in events] == [r["step"] for r in rows if key in r]
        assert [e.value for e in events] == pytest.approx([r[key] for r in rows if key in r])  # stored as float32
    assert [e.value for e in acc.Scalars("lr")] == pytest.approx([r["lr"] for r in rows])


def test_seed_plots_of_small_values_put_the_power_of_ten_above_the_plot():
    """Tick labels of a series that stays below 0.1 (the reg term, about -0.01 in smoke runs; the lr) would run past
    the plot's left margin as decimals: those plots show multiples of a power of ten, written above the plot; the
    plots of larger values keep plain decimals, and every tick label stays inside the figure."""
    rows = fake_log(steps=60, boundary=20)
    for r in rows:
        if "reg" in r:
            r["reg"] = -0.0125 + 0.0001 * r["step"]
    fig = build_seed_figure([("seed 0", rows)], [20], "smoke")
    fig.canvas.draw()
    offsets = {ax.get_title(): ax.yaxis.get_offset_text().get_text() for ax in fig.axes}
    assert offsets["reg"] and offsets["learning rate"]
    assert offsets["total (weighted sum)"] == "" and offsets["cls"] == ""
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        for label in ax.get_yticklabels():
            if label.get_visible() and label.get_text():
                assert label.get_window_extent(renderer).x0 >= 0, (ax.get_title(), label.get_text())
