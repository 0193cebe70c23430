"""`locbe compare A B [C ...]`: is B really better than A? Differences of means per metric and class.

Each argument is a run directory (``config.json`` and ``eval/*.json``), a folder of seed run directories
(``seed-<k>/``, what ``locbe reproduce --seeds`` makes), or a report folder (``seeds.json``). Every later one
is compared with the first: the difference of means (later - first), and where both sides have two seeds or
more Welch's t-test (two-sided) with a verdict at p < 0.05 (``locbe.report.stats.welch``). Where one side is a
single run and the other has two seeds or more (``locbe compare RUN PUBLISHED_REPORT``: "is my run consistent with
yours?"), the single run is placed against the other side's 95 % prediction interval of one run: "inside the
published run-to-run range", "below ..." or "above ..."; the command then exits 3 when an mIoU falls outside.
Runs evaluated on another dataset, split, protocol or number of images are refused: their numbers measure
different things.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from locbe.errors import ConfigError, MissingPathError
from locbe.report import stats
from locbe.report.seeds import METRIC_SOURCES, run_record, seed_dirs
from locbe.report.tables import _markdown
from locbe.runtime.fileio import atomic_write_text

COLUMNS = ["metric", "class", "split", "reference", "reference_n", "reference_mean", "reference_std", "variant",
           "variant_n", "variant_mean", "variant_std", "difference", "welch_t", "p_value", "range_low", "range_high",
           "verdict"]
EXIT_OUTSIDE = 3  # a single run outside the other side's run-to-run range (README "Exit codes")
# what must agree for two numbers to be comparable (per metric); autocast or device may differ: that is a variant
SAME = ("split", "protocol", "num_images")


def load_records(path: str | Path) -> list[dict]:
    """The finished seeds' records of a report folder, a folder of seed run directories, or one run directory."""
    path = Path(path)
    if (path / "seeds.json").is_file():  # a report folder: what `locbe reproduce` published
        records = [{**r, "from_report": True} for r in json.loads((path / "seeds.json").read_text())["records"]]
    elif seed_dirs(path):
        records = [run_record(d, k) for k, d in seed_dirs(path)]
    elif (path / "config.json").is_file() or (path / "eval").is_dir():
        records = [run_record(path)]
    else:
        raise MissingPathError(f"{path}: not a run directory (config.json), a folder of seed-<k> run directories "
                               "or a report folder (seeds.json)")
    records = [r for r in records if r["status"] == "ok" and r["metrics"]]
    if not records:
        raise MissingPathError(f"{path}: no finished evaluation (eval/*.json); run `locbe reproduce` there first")
    return records


def _signature(records: list[dict], metric: str) -> tuple:
    first = records[0]["metrics"][metric]
    return tuple(first.get(k) for k in SAME)


def check_comparable(a: tuple[str, list[dict]], b: tuple[str, list[dict]], metrics: list[str]) -> None:
    """Raise ``ConfigError`` (one line) when the two sides were evaluated on different data or protocols."""
    (la, ra), (lb, rb) = a, b
    for label, recs in (a, b):
        datasets = {r.get("dataset") for r in recs}
        if len(datasets) > 1:
            raise ConfigError(f"cannot compare: the seeds of {label} were trained on different datasets "
                              f"({', '.join(map(str, sorted(datasets, key=str)))})")
    da, db = ra[0].get("dataset"), rb[0].get("dataset")
    if da != db:
        raise ConfigError(f"cannot compare {la} with {lb}: dataset {da} vs {db}")
    if not metrics:
        raise ConfigError(f"cannot compare {la} with {lb}: no metric was evaluated on both")
    for m in metrics:
        for label, recs in (a, b):
            sigs = {_signature([r], m) for r in recs}
            if len(sigs) > 1:
                raise ConfigError(f"cannot compare: the seeds of {label} evaluated {m} differently "
                                  f"({' vs '.join(map(str, sigs))})")
        sa, sb = _signature(ra, m), _signature(rb, m)
        for key, x, y in zip(SAME, sa, sb):
            if x != y:
                raise ConfigError(f"cannot compare {la} with {lb}: {m} evaluated with {key} {x} vs {y}; "
                                  "evaluate both the same way")


def _shared_metrics(ra: list[dict], rb: list[dict], only: list[str] | None) -> list[str]:
    names = [m for m in ra[0]["metrics"] if all(m in r["metrics"] for r in ra + rb)]
    return [m for m in names if only is None or m in only]


def _side(values) -> tuple[int, float, float]:
    s = stats.summarize(values)
    return s.n, s.mean, s.std


def comparison_frame(reference: tuple[str, list[dict]], variants: list[tuple[str, list[dict]]],
                     metrics: list[str] | None = None, class_names: list[str] | None = None) -> pd.DataFrame:
    """One row per variant, metric and class (class "all" for the mIoU): variant against the reference."""
    ref_label, ref = reference
    rows = []
    for label, recs in variants:
        shared = _shared_metrics(ref, recs, metrics)
        check_comparable(reference, (label, recs), shared)
        for m in shared:
            items = [("all", [r["metrics"][m]["value"] for r in ref], [r["metrics"][m]["value"] for r in recs])]
            column = next((c for _, _, name, c in METRIC_SOURCES if name == m), None)
            if column and all(column in r["per_class"] for r in ref + recs):
                n_classes = len(ref[0]["per_class"][column])
                names = class_names or _class_names(n_classes)
                items += [(names[i], [r["per_class"][column][i] for r in ref],
                           [r["per_class"][column][i] for r in recs]) for i in range(n_classes)]
            for cls, a, b in items:
                if not stats.finite(a) or not stats.finite(b):
                    continue  # a class absent from the evaluated images
                d = stats.welch(a, b, ref_label, label)
                na, ma, sa = _side(a)
                nb, mb, sb = _side(b)
                check = _single_run_check(a, b, ref_label, label, ref, recs)
                low, high, verdict = check or (math.nan, math.nan, d.verdict)
                rows.append({"metric": m, "class": cls, "split": ref[0]["metrics"][m]["split"],
                             "reference": ref_label, "reference_n": na, "reference_mean": ma, "reference_std": sa,
                             "variant": label, "variant_n": nb, "variant_mean": mb, "variant_std": sb,
                             "difference": d.diff, "welch_t": d.t, "p_value": d.p, "range_low": low,
                             "range_high": high, "verdict": verdict})
    return pd.DataFrame(rows, columns=COLUMNS)


def _is_published(records: list[dict]) -> bool:
    return bool(records) and all(r.get("from_report") for r in records)


def _single_run_check(a, b, label_a, label_b, recs_a, recs_b) -> tuple[float, float, str] | None:
    """Where one side is a single run and the other has >= 2 seeds: that side's prediction interval of one run
    and where the single run falls in it; None otherwise (Welch's test, or no test, applies)."""
    a, b = stats.finite(a), stats.finite(b)
    if len(a) == 1 and len(b) >= 2:
        run, many, many_label, many_recs = a[0], b, label_b, recs_b
    elif len(b) == 1 and len(a) >= 2:
        run, many, many_label, many_recs = b[0], a, label_a, recs_a
    else:
        return None
    s = stats.summarize(many)
    where = "published run-to-run range" if _is_published(many_recs) else f"run-to-run range of {many_label}"
    return s.pi_low, s.pi_high, f"{stats.run_in_range(run, s)} the {where}"


def _class_names(n: int) -> list[str]:
    from locbe.data import COCO_CLASSES, VOC_CLASSES

    return list(VOC_CLASSES if n == len(VOC_CLASSES) else COCO_CLASSES if n == len(COCO_CLASSES) else
                [str(i) for i in range(n)])


def _cell(n, mean, std) -> str:
    return f"{mean:.2f} (n=1)" if n < 2 else f"{mean:.2f} ± {std:.2f} (n={n})"


def _p(p) -> str | None:
    return None if math.isnan(p) else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


def comparison_markdown(df: pd.DataFrame, title: str) -> str:
    def table(part: pd.DataFrame, with_class: bool) -> str:
        shown = pd.DataFrame({
            "metric": part.metric, **({"class": part["class"]} if with_class else {}), "split": part.split,
            "reference": [f"{lab}: {_cell(n, m, s)}" for lab, n, m, s in zip(
                part.reference, part.reference_n, part.reference_mean, part.reference_std)],
            "variant": [f"{lab}: {_cell(n, m, s)}" for lab, n, m, s in zip(
                part.variant, part.variant_n, part.variant_mean, part.variant_std)],
            "difference": part.difference.map(lambda x: f"{x:+.2f}"), "p (Welch)": part.p_value.map(_p),
            **({"95 % PI of one run": [None if math.isnan(lo) else f"[{lo:.2f}, {hi:.2f}]"
                                       for lo, hi in zip(part.range_low, part.range_high)]}
               if part.range_low.notna().any() else {}),
            "verdict": part.verdict})
        return _markdown(shown, disable_numparse=True)

    overall, per_class = df[df["class"] == "all"], df[df["class"] != "all"]
    md = [f"# {title}", "", "mIoU in %: mean ± sample std over seeds (n seeds); difference = variant - reference; "
          "p: Welch's two-sided t-test where both sides have >= 2 seeds; verdict at p < 0.05. Where one side is a "
          "single run and the other has >= 2 seeds, the single run is placed against the other side's 95 % "
          "prediction interval of one run (mean ± t · s · sqrt(1 + 1/n)): inside it, the gap is seed noise.", "",
          table(overall, False), ""]
    if len(per_class):
        md += ["## Per class (IoU %)", "", table(per_class, True), ""]
    return "\n".join(md)


def write_comparison(out_dir: Path, name: str, title: str, reference: tuple[str, list[dict]],
                     variants: list[tuple[str, list[dict]]], metrics: list[str] | None = None) -> pd.DataFrame:
    """``<name>.md`` and ``<name>.csv`` (one row per variant, metric and class) in ``out_dir``."""
    df = comparison_frame(reference, variants, metrics)
    atomic_write_text(Path(out_dir) / f"{name}.csv", df.to_csv(index=False))
    atomic_write_text(Path(out_dir) / f"{name}.md", comparison_markdown(df, title))
    return df


def add_arguments(p) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="run directories, folders of seed-<k> run directories or report folders; every one after "
                        "the first is compared with the first")
    p.add_argument("--out", help="also write comparison.md and comparison.csv into this folder")
    p.add_argument("--metric", action="append", help="only this metric (repeatable), e.g. 'seg mIoU (single scale)'")


def run(args) -> int:
    if len(args.runs) < 2:
        raise ConfigError("locbe compare needs two runs or more: locbe compare A B [C ...]")
    groups = [(str(p), load_records(p)) for p in args.runs]
    title = f"locbe compare: {', '.join(label for label, _ in groups[1:])} against {groups[0][0]}"
    if args.out:
        df = write_comparison(Path(args.out), "comparison", title, groups[0], groups[1:], args.metric)
    else:
        df = comparison_frame(groups[0], groups[1:], args.metric)
    print(comparison_markdown(df, title))
    if args.out:
        print(f"\nwritten: {Path(args.out) / 'comparison.md'}, {Path(args.out) / 'comparison.csv'}")
    verdict = consistency_verdict(df)
    if verdict is not None:
        print(verdict[1])
        return verdict[0]
    return 0


def consistency_verdict(df: pd.DataFrame) -> tuple[int, str] | None:
    """(exit code, one line) when the comparison placed a single run against a run-to-run range: 0 when every
    mIoU (class "all") is inside, ``EXIT_OUTSIDE`` otherwise; None when no such check was made. Per-class rows
    do not count: 21 classes x 4 metrics at 95 % put some outside by chance."""
    checked = df[(df["class"] == "all") & df.range_low.notna()]
    if checked.empty:
        return None
    outside = checked[~checked.verdict.str.startswith(stats.RUN_INSIDE)]
    if outside.empty:
        return 0, f"consistent: all {len(checked)} mIoU inside the run-to-run range (95 % prediction interval)"
    names = ", ".join(f"{m} {v.split(' the ')[0]}" for m, v in zip(outside.metric, outside.verdict))
    return EXIT_OUTSIDE, (f"not consistent: {len(outside)} of {len(checked)} mIoU outside the run-to-run range "
                          f"({names}); exit {EXIT_OUTSIDE}")
