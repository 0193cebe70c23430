"""The reproduction's tables over seeds: per seed, mean, spread, intervals and the verdict against the
published number (``locbe.report.stats``), per-class IoU mean +- std, and ``seeds.png``.

Files in the report folder:

- ``results.md``: the tables; ``results.csv``: one row per seed and metric (the columns of
  ``locbe.report.tables.ROW_COLUMNS``), so any statistic can be redone with pandas;
- ``summary.csv``: one row per metric with the statistics shown in ``results.md``;
- ``per_class.csv``: one row per class and seed; ``seeds.json``: every seed's record (``locbe.report.seeds``), which
  ``locbe compare`` reads; ``seeds.png``: the picture.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from locbe.report import curves, stats
from locbe.report.tables import ROW_COLUMNS, _markdown, make_row
from locbe.runtime.fileio import atomic_path, atomic_write_text

SUMMARY_COLUMNS = ["method", "backbone", "dataset", "split", "metric", "reported", "n", "seeds", "mean", "std",
                   "min", "max", "ci95_low", "ci95_high", "pi95_low", "pi95_high", "delta", "verdict", "status"]


@dataclass
class Row:
    """One metric of one method; ``runs`` holds (seed record, value in %) per seed, value None for a failed seed.
    A row without runs is a published number that was not run; ``plot`` puts it in ``seeds.png``."""

    method: str
    backbone: str
    dataset: str
    split: str
    metric: str
    runs: list[tuple[dict, float | None]] = field(default_factory=list)
    reported: float | None = None
    status: str = "ok"
    plot: bool = False
    per_seed: bool = True  # False: the same for every seed (a trivial baseline); one value, no interval
    verdict: str | None = None  # replaces the computed verdict (per_seed False)

    def values(self) -> list[float]:
        return [v for _, v in self.runs if v is not None]

    def summary(self) -> stats.Summary:
        return stats.summarize(self.values())


def metric_row(method, backbone, dataset, split, metric, records, reported=None, status="ok", plot=True) -> Row:
    """A row of ``metric`` over seed records (a failed seed, or one without that metric, counts as failed)."""
    runs = [(r, r["metrics"][metric]["value"] if r["status"] == "ok" and metric in r["metrics"] else None)
            for r in records]
    return Row(method, backbone, dataset, split, metric, runs, reported, status, plot)


def _fmt(x, digits=2) -> str | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _interval(lo, hi) -> str | None:
    return None if math.isnan(lo) else f"[{lo:.2f}, {hi:.2f}]"


def summary_frame(rows: list[Row]) -> pd.DataFrame:
    out = []
    for r in rows:
        s = r.summary()
        seeds = [rec["seed"] for rec, v in r.runs if v is not None]
        mean = None if s.n == 0 else s.mean
        delta = None if r.reported is None or mean is None else mean - r.reported
        verdict = r.verdict or (None if s.n == 0 else stats.reported_verdict(r.reported, s))
        out.append({"method": r.method, "backbone": r.backbone, "dataset": r.dataset, "split": r.split,
                    "metric": r.metric, "reported": r.reported, "n": s.n, "seeds": " ".join(map(str, seeds)),
                    "mean": mean, "std": s.std, "min": s.min if s.n else None, "max": s.max if s.n else None,
                    "ci95_low": s.ci_low, "ci95_high": s.ci_high, "pi95_low": s.pi_low, "pi95_high": s.pi_high,
                    "delta": delta, "verdict": verdict, "status": r.status})
    return pd.DataFrame(out, columns=SUMMARY_COLUMNS)


# verdicts that say only why there is none: left out of the Markdown table ("How to read this" explains them)
_SILENT_VERDICTS = (stats.ONE_SEED, stats.NO_REPORTED)


def _summary_markdown(summary: pd.DataFrame) -> tuple[str, str | None]:
    """The main table with only the columns that have a value in some row, and the status shared by every row
    (then said once above the table instead of in a column), or None. One seed: ``value`` (no ``n`` and no
    statistics); more: n, mean, std, range and the intervals."""
    one_seed = bool((summary.n <= 1).all())
    shown = pd.DataFrame({
        "method": summary.method, "backbone": summary.backbone, "dataset": summary.dataset, "split": summary.split,
        "metric": summary.metric, "published": summary.reported.map(_fmt),
        "n": None if one_seed else summary.n,
        "value" if one_seed else "mean": summary["mean"].map(_fmt), "std": summary["std"].map(_fmt),
        "min - max": [None if n < 2 else f"{a:.2f} - {b:.2f}" for n, a, b in zip(summary.n, summary["min"],
                                                                                    summary["max"])],
        "95 % CI of the mean": [_interval(a, b) for a, b in zip(summary.ci95_low, summary.ci95_high)],
        "95 % PI of one run": [_interval(a, b) for a, b in zip(summary.pi95_low, summary.pi95_high)],
        "delta": summary.delta.map(_fmt),
        "verdict": [None if v in _SILENT_VERDICTS else v for v in summary.verdict],
        "status": summary.status})
    shared = None
    if len(set(summary.status)) == 1:
        shared = summary.status.iloc[0]
        shown = shown.drop(columns="status")
    empty = [c for c in shown.columns if shown[c].isna().all()]
    return _markdown(shown.drop(columns=empty), disable_numparse=True), shared


def _published_markdown(rows: list[Row]) -> str:
    """Published numbers of rows that were not run here (another dataset), with how to run them."""
    return _markdown(pd.DataFrame([{"method": r.method, "backbone": r.backbone, "dataset": r.dataset,
                                    "split": r.split, "metric": r.metric, "published": _fmt(r.reported),
                                    "to reproduce it": r.status} for r in rows]), disable_numparse=True)


def _per_seed_markdown(rows: list[Row], seeds: list[int]) -> str:
    out = []
    for r in rows:
        if not r.runs or not r.per_seed:
            continue
        by_seed = {rec["seed"]: v for rec, v in r.runs}
        cells = {f"seed {k}": "failed" if k in by_seed and by_seed[k] is None else _fmt(by_seed.get(k))
                 for k in seeds}
        out.append({"method": r.method, "metric": r.metric, "split": r.split, **cells})
    return _markdown(pd.DataFrame(out), disable_numparse=True)


def results_frame(rows: list[Row]) -> pd.DataFrame:
    """One row per seed and metric (``ROW_COLUMNS``); a failed seed's row has no value and says so."""
    out = []
    for r in rows:
        if not r.runs:
            out.append(make_row(r.method, r.backbone, r.dataset, r.split, r.metric, None, {}, reported=r.reported,
                                status=r.status))
        for rec, v in r.runs:
            status = r.status if v is not None else f"failed: {rec.get('error') or 'metric missing'}"
            env = {**rec.get("env", {}), "seed": rec["seed"]}
            out.append(make_row(r.method, r.backbone, r.dataset, r.split, r.metric,
                                None if v is None else v / 100, env, reported=r.reported, status=status))
    df = pd.DataFrame(out, columns=ROW_COLUMNS)
    df["seed"] = df["seed"].astype("Int64")
    return df


def per_class_frames(records: list[dict], class_names: list[str], columns: list[str]) -> tuple[pd.DataFrame,
                                                                                              pd.DataFrame]:
    """(one row per class and seed, the Markdown cells "mean +- std" per class)."""
    ok = [r for r in records if r["status"] == "ok"]
    long = [{"class": c, "seed": r["seed"], **{col: r["per_class"][col][i] for col in columns
                                                if col in r["per_class"]}}
            for r in ok for i, c in enumerate(class_names)]
    long_df = pd.DataFrame(long, columns=["class", "seed", *columns])
    cells = []
    for i, c in enumerate(class_names):
        row = {"class": c}
        for col in columns:
            s = stats.summarize([r["per_class"][col][i] for r in ok if col in r["per_class"]])
            row[col] = None if s.n == 0 else (f"{s.mean:.1f}" if s.n < 2 else f"{s.mean:.1f} ± {s.std:.1f}")
        cells.append(row)
    return long_df, pd.DataFrame(cells)


def environment_frame(records: list[dict]) -> pd.DataFrame:
    """One row per seed with what changes its numbers (docs/reproducibility.md): code, config, versions, the
    CPU numerics in force, the data read."""
    rows = []
    for r in records:
        env = r.get("env", {})
        num, data = env.get("numerics") or {}, env.get("data") or {}
        rows.append({"seed": r["seed"], "run dir": r["run_dir"],
                     "status": "ok" if r["status"] == "ok" else f"failed (exit {r['exit_code']})",
                     **{k: env.get(k) for k in ("commit", "config_hash", "device", "torch", "timm", "numpy")},
                     "threads": env.get("threads"), "cpu numerics": num.get("cpu_numerics"),
                     "ATen capability": num.get("cpu_capability"), "MKL_CBWR": (num.get("env") or {}).get("MKL_CBWR"),
                     "CPU": num.get("cpu"), "data sha256": data.get("sha256")})
    return pd.DataFrame(rows).dropna(axis=1, how="all")


HOW_TO_READ = [
    "n: seeds that finished; mean and std (sample standard deviation, n-1) over them; min - max their range.",
    "95 % CI of the mean: where the method's mean lies (Student t, n-1 degrees of freedom); it narrows with more "
    "seeds.",
    "95 % PI of one run: mean ± t·std·√(1 + 1/n), where one more run would land. A published number (usually "
    "one run) outside it is not what this implementation produces from run to run: the verdict says "
    "'reported above every plausible run' or 'below'; inside it, the gap is within seed noise.",
    "With one seed no interval can be given: `--seeds 3` (or more) gives them. A metric without a published "
    "number has no verdict.",
]


def write_seed_report(out_dir: Path, title: str, rows: list[Row], records: list[dict], notes: list[str],
                      class_names: list[str] | None = None, per_class_columns: list[str] = ()) -> None:
    """Write results.md / results.csv / summary.csv / per_class.csv / seeds.json / seeds.png into ``out_dir``."""
    out_dir = Path(out_dir)
    seeds = [r["seed"] for r in records]
    published = [r for r in rows if not r.runs]  # a published number of a dataset not run here: its own table
    rows = [r for r in rows if r.runs]
    summary = summary_frame(rows)
    atomic_write_text(out_dir / "results.csv", results_frame(rows).to_csv(index=False))
    atomic_write_text(out_dir / "summary.csv", summary.to_csv(index=False))
    atomic_write_text(out_dir / "seeds.json", json.dumps({"title": title, "records": records}, indent=2))
    failed = [r for r in records if r["status"] != "ok"]
    table, shared_status = _summary_markdown(summary)
    md = [f"# {title}", "", f"Seeds: {', '.join(map(str, seeds))} ({len(records) - len(failed)} finished"
          + (f", {len(failed)} failed" if failed else "") + ")."
          + (f" Every row: {shared_status}." if shared_status and shared_status != "ok" else ""), "", table, ""]
    if any(r.runs and r.per_seed for r in rows) and len(seeds) > 1:
        md += ["## Per seed", "", _per_seed_markdown(rows, seeds), ""]
    if plot_seeds(out_dir / "seeds.png", [r for r in rows if r.plot and r.values()], title):
        md += ["![seeds](seeds.png)", ""]
    md += _curves_section(out_dir, records, title)
    if published:
        md += ["## Published numbers (not run here)", "", _published_markdown(published), ""]
    md += ["## How to read this", ""] + [f"- {n}" for n in HOW_TO_READ] + [""]
    if failed:
        notes = [*notes] + [f"Seed {r['seed']} failed (exit {r['exit_code']}) in {r['run_dir']}: {r['error']}; "
                            "the statistics use the other seeds, and the same command retries it." for r in failed]
    if notes:
        md += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    md += ["## Environment", "", _markdown(environment_frame(records), disable_numparse=True), ""]
    if class_names is not None and per_class_columns:
        long_df, cells = per_class_frames(records, class_names, list(per_class_columns))
        atomic_write_text(out_dir / "per_class.csv", long_df.to_csv(index=False))
        head = "## Per-class IoU (%)" + (", mean ± std over seeds" if len(records) - len(failed) > 1 else "")
        md += [head, "", _markdown(cells, disable_numparse=True, colalign=["left"] + ["right"] * len(
            per_class_columns)), ""]
    atomic_write_text(out_dir / "results.md", "\n".join(md))


def _curves_section(out_dir: Path, records: list[dict], title: str) -> list[str]:
    """``curves.png`` in the report folder (the seeds' training curves over one another) and a link to each run's
    own ``curves.png`` (drawn here from its log when the run predates them); [] when no run has a log."""
    runs = [(f"seed {r['seed']}", Path(r["run_dir"])) for r in records]
    links = []
    for label, run_dir in runs:
        own = run_dir / curves.CURVES_NAME
        if not own.is_file():
            curves.try_write_run_curves(run_dir)
        if own.is_file():
            links.append(f"[{label}]({os.path.relpath(own, out_dir)})")
    if not curves.write_seed_curves(out_dir / curves.CURVES_NAME, runs, f"{title}: training curves"):
        return []
    return ["## Training curves", "",
            "Each loss term (unweighted) and the total against the step, and the learning rate; dotted lines: the "
            "phase boundaries of the loss schedule" + (", each seed one colour." if len(runs) > 1 else "."), "",
            "![training curves](curves.png)", "", "Each run's own picture: " + ", ".join(links) + ".", ""]


def plot_seeds(path: Path, rows: list[Row], title: str) -> bool:
    """Per metric: each seed's value as a point, the mean with its 95 % CI, the 95 % prediction interval of one
    run as a band, and the published value as a line where there is one. False when there is nothing to plot."""
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows) + 0.6, 3.8), squeeze=False)
    for ax, r in zip(axes[0], rows):
        s = r.summary()
        seeds = [rec["seed"] for rec, v in r.runs if v is not None]
        xs = list(range(len(seeds)))
        lo, hi = -0.6, len(seeds) + 0.6  # the seeds at 0..n-1, the mean and its CI at n
        if s.n >= 2:
            ax.axhspan(s.pi_low, s.pi_high, color="tab:blue", alpha=0.12, label="95 % PI of one run")
        ax.hlines(s.mean, lo, hi, colors="tab:blue", linestyles=":", linewidth=1)
        ax.errorbar([len(seeds)], [s.mean], yerr=None if s.n < 2 else [[s.mean - s.ci_low], [s.ci_high - s.mean]],
                    fmt="s", color="tab:blue", capsize=5, elinewidth=2,
                    label=f"mean{' and its 95 % CI' if s.n >= 2 else ''}")
        ax.plot(xs, r.values(), "o", color="black", label="one seed's run")
        if r.reported is not None:
            ax.axhline(r.reported, color="tab:red", linestyle="--", label=f"published {r.reported:.1f}")
        ax.set_xlim(lo, hi)
        ax.set_xticks([*xs, len(seeds)], [*map(str, seeds), f"mean\n(n={s.n})"])
        ax.set_xlabel("seed")
        ax.set_ylabel(f"{r.metric.split(' (')[0]} (%)")
        ax.set_title(f"{r.metric}\n{r.method}, {r.split}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    handles = {}
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            key = "published" if lab.startswith("published") else lab
            handles.setdefault(key, (h, lab if key != "published" else "published value"))
    fig.legend([h for h, _ in handles.values()], [lab for _, lab in handles.values()], loc="lower center",
               ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return True

