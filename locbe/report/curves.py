"""Training curves: a picture of a run's ``log.jsonl``, and the seeds' curves over one another.

``log.jsonl`` has one row per logged step: ``step`` (steps done), ``lr``, ``time`` and every loss term the step
computed (unweighted) with ``total`` (the weighted sum that is back-propagated). A term appears from the first
phase of the loss schedule that uses it (``seg``, ``reg``, ``loc`` after the warm-up on VOC and smoke).

- ``<run>/curves.png`` (``write_run_curves``): above, each loss term and the total against the step; below, the
  learning rate; the phase boundaries of the loss schedule (``config.json``'s ``phases``) as dotted lines. The
  training loop writes it at each checkpoint and at the end (``try_write_run_curves``: a plotting error is one
  line on stderr, never the end of a run).
- ``<report>/curves.png`` (``write_seed_curves``): one small plot per series (total, each term, lr), each seed
  one colour, so the seeds' curves lie over one another.

Rendering is matplotlib's Agg without pyplot or global state; the PNG carries no version stamp, so the same log
gives the same bytes. Sizes are fixed in pixels (``RUN_SIZE``, ``seed_curves_size``).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from locbe.runtime.fileio import atomic_path

LOG_NAME = "log.jsonl"
CURVES_NAME = "curves.png"
NOT_LOSSES = ("step", "lr", "time")  # the other keys of a log row are loss terms and the total
DPI = 100
RUN_SIZE = (1000, 640)  # pixels: losses above (about 2/3), the learning rate below
SEED_TILE = (330, 220)  # pixels of one small plot in the seeds' picture
SEED_COLUMNS = 3
SEED_TOP, SEED_BOTTOM = 45, 40  # title band, legend band (pixels)


def read_log(path: str | Path) -> list[dict]:
    """The rows of a ``log.jsonl``; a last line cut short by a killed write is left out."""
    rows = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return sorted(rows, key=lambda r: r["step"])


def series_keys(rows: Sequence[dict]) -> list[str]:
    """Loss keys in the order they first appear in the log, ``total`` last."""
    keys: dict[str, None] = {}
    for row in rows:
        for k in row:
            if k not in NOT_LOSSES and k != "total":
                keys[k] = None
    return [*keys, *(["total"] if any("total" in r for r in rows) else [])]


def phase_boundaries(config: dict, last_step: int | None = None) -> list[int]:
    """Steps done (the log's ``step``) at which one phase of the loss schedule ends and the next begins: a phase
    with ``until=u`` covers the 0-based steps ``n_iter <= u``, so the next starts after ``u + 1`` steps."""
    out = []
    for phase in config.get("phases") or []:
        until = phase.get("until")
        if until is None or (isinstance(until, float) and math.isinf(until)):
            continue
        step = int(until) + 1
        if last_step is None or step < last_step:
            out.append(step)
    return out


def _points(rows: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    xs = [r["step"] for r in rows if r.get(key) is not None]
    return xs, [float(r[key]) for r in rows if r.get(key) is not None]


def _new_figure(size: tuple[int, int]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI)
    FigureCanvasAgg(fig)  # Agg whatever backend the user's matplotlib is set to
    return fig


def _mark_phases(ax, boundaries: Sequence[int], label: bool) -> None:
    for i, b in enumerate(boundaries):
        ax.axvline(b, color="0.35", linestyle=":", linewidth=1.2,
                   label="phase boundary" if label and i == 0 else None)


def _save(fig, path: Path) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=DPI, format="png", metadata={"Software": None})


def build_run_figure(rows: Sequence[dict], boundaries: Sequence[int] = (), title: str = ""):
    """The Figure of one run's log: every loss key (legend = ``series_keys``) above, the learning rate below."""
    fig = _new_figure(RUN_SIZE)
    w, h = RUN_SIZE
    left, right = 70 / w, 1 - 250 / w  # room on the right for the legend
    losses = fig.add_axes((left, 300 / h, right - left, (h - 300 - 45) / h))
    lr_ax = fig.add_axes((left, 55 / h, right - left, 195 / h), sharex=losses)
    colours = {}
    for i, key in enumerate(series_keys(rows)):
        xs, ys = _points(rows, key)
        is_total = key == "total"
        line, = losses.plot(xs, ys, color="black" if is_total else f"C{i % 10}", linewidth=2.0 if is_total else 1.1,
                            label="total (weighted sum)" if is_total else key, zorder=3 if is_total else 2)
        colours[key] = line.get_color()
    _mark_phases(losses, boundaries, label=True)
    losses.set_ylabel("loss (terms unweighted)")
    losses.grid(alpha=0.3)
    losses.tick_params(labelbottom=False)
    losses.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, fontsize=9, frameon=False)
    xs, ys = _points(rows, "lr")
    lr_ax.plot(xs, ys, color="tab:blue", linewidth=1.3, label="base lr")
    _mark_phases(lr_ax, boundaries, label=False)
    lr_ax.set_ylabel("learning rate (base)")
    lr_ax.set_xlabel("step")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    lr_ax.grid(alpha=0.3)
    lr_ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, fontsize=9, frameon=False)
    last = rows[-1]["step"] if rows else 0
    fig.text(left, 1 - 12 / h, title or "training curves", ha="left", va="top", fontsize=12, fontweight="bold")
    fig.text(right, 1 - 14 / h, f"{len(rows)} logged steps, last {last}", ha="right", va="top", fontsize=9)
    return fig


def _read_run(run_dir: Path) -> tuple[list[dict], dict]:
    rows = read_log(run_dir / LOG_NAME)
    config_path = run_dir / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    return rows, config


def write_run_curves(run_dir: str | Path, title: str | None = None) -> Path | None:
    """``<run_dir>/curves.png`` from its ``log.jsonl`` and ``config.json``; None when the log has no row yet."""
    run_dir = Path(run_dir)
    if not (run_dir / LOG_NAME).is_file():
        return None
    rows, config = _read_run(run_dir)
    if not rows:
        return None
    where = Path(*run_dir.parts[-2:]) if len(run_dir.parts) > 1 else run_dir  # the end of the path: fits one line
    title = title or f"training curves: {config.get('preset', '?')}, seed {config.get('seed', '?')}  ({where})"
    fig = build_run_figure(rows, phase_boundaries(config, rows[-1]["step"]), title)
    path = run_dir / CURVES_NAME
    _save(fig, path)
    return path


_WARNED: set[str] = set()


def try_write_run_curves(run_dir: str | Path) -> Path | None:
    """``write_run_curves`` for the training loop: any error is one line on stderr (once per run directory), and
    training goes on."""
    try:
        return write_run_curves(run_dir)
    except Exception as e:  # a picture must never end a run
        key = str(run_dir)
        if key not in _WARNED:
            _WARNED.add(key)
            print(f"curves: {Path(run_dir) / CURVES_NAME} not written ({type(e).__name__}: {e}); training goes on",
                  file=sys.stderr)
        return None


def seed_curves_size(n_series: int) -> tuple[int, int]:
    """(width, height) in pixels of the seeds' picture with ``n_series`` small plots (loss keys and lr)."""
    rows = math.ceil(n_series / SEED_COLUMNS)
    return SEED_COLUMNS * SEED_TILE[0], SEED_TOP + rows * SEED_TILE[1] + SEED_BOTTOM


def build_seed_figure(runs: Sequence[tuple[str, Sequence[dict]]], boundaries: Sequence[int] = (), title: str = ""):
    """One small plot per series (``total``, then the terms, then ``lr``), each run (a seed) one colour; the figure
    legend names the runs, each plot's title its series."""
    keys: dict[str, None] = {"total": None}
    for _, rows in runs:
        keys.update(dict.fromkeys(k for k in series_keys(rows) if k != "total"))
    series = [*keys, "lr"]
    size = seed_curves_size(len(series))
    fig = _new_figure(size)
    w, h = size
    tw, th = SEED_TILE
    steps = [r["step"] for _, rows in runs for r in rows]
    span = (min(steps), max(steps)) if steps else (0, 1)  # every plot over the same steps: a late term starts late
    for i, key in enumerate(series):
        r, c = divmod(i, SEED_COLUMNS)
        y0 = h - SEED_TOP - (r + 1) * th
        ax = fig.add_axes(((c * tw + 55) / w, (y0 + 35) / h, (tw - 75) / w, (th - 65) / h))
        largest = -1.0  # the largest |value| of the series, -1 while it has none
        for j, (label, rows) in enumerate(runs):
            xs, ys = _points(rows, key)
            ax.plot(xs, ys, color=f"C{j % 10}", linewidth=1.0, alpha=0.85, label=label)
            largest = max([largest, *map(abs, ys)])
        _mark_phases(ax, boundaries, label=False)
        ax.set_xlim(span[0] - 0.02 * (span[1] - span[0]), span[1] + 0.02 * (span[1] - span[0]))
        ax.set_title("learning rate" if key == "lr" else ("total (weighted sum)" if key == "total" else key),
                     fontsize=10)
        ax.tick_params(labelsize=8)
        ax.set_xlabel("step", fontsize=8, labelpad=1)
        # series whose values all stay below 0.1 (the reg term, the lr) as multiples of a power of ten written above
        # the plot: their decimals would run past the plot's left margin
        if 0 <= largest < 0.1:
            ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        ax.grid(alpha=0.3)
    handles = [h for h in fig.axes[0].get_lines() if not h.get_label().startswith("_")]
    from matplotlib.lines import Line2D

    phase = [Line2D([], [], color="0.35", linestyle=":", linewidth=1.2)] if boundaries else []
    fig.legend([*handles, *phase], [hd.get_label() for hd in handles] + (["phase boundary"] if boundaries else []),
               loc="lower center", ncol=min(len(handles) + len(phase), 8), fontsize=9, frameon=False,
               bbox_to_anchor=(0.5, 4 / h))
    fig.text(10 / w, 1 - 10 / h, title or "training curves over seeds", ha="left", va="top", fontsize=12,
             fontweight="bold")
    return fig


def write_seed_curves(path: str | Path, runs: Sequence[tuple[str, str | Path]], title: str = "") -> bool:
    """The seeds' curves over one another at ``path`` from each ``(label, run directory)``; runs without a log are
    left out. False when no run has a log row (nothing written)."""
    read = []
    boundaries: list[int] = []
    for label, run_dir in runs:
        run_dir = Path(run_dir)
        if not (run_dir / LOG_NAME).is_file():
            continue
        rows, config = _read_run(run_dir)
        if rows:
            read.append((label, rows))
            boundaries = boundaries or phase_boundaries(config, max(r["step"] for r in rows))
    if not read:
        return False
    _save(build_seed_figure(read, boundaries, title), Path(path))
    return True
