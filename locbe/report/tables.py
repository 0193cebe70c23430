"""Result tables (Markdown + CSV) against the reported numbers and per-class IoU (panels: locbe/report/panels.py)."""

from __future__ import annotations

import csv
import io
from importlib import resources
from pathlib import Path

import pandas as pd

from locbe.runtime.fileio import atomic_write_text

ROW_COLUMNS = ["method", "backbone", "dataset", "split", "metric", "reported", "reproduced", "delta", "status",
               "commit", "config_hash", "seed", "device", "torch", "timm"]


def reported_numbers() -> pd.DataFrame:
    text = resources.files("locbe.eval").joinpath("reported.csv").read_text()
    return pd.read_csv(io.StringIO(text))


def lookup_reported(method: str, dataset: str, metric: str, protocol: str | None = None,
                    split: str | None = None) -> float | None:
    """The published ViT-B/16 number for a row, or None. A given ``split`` or ``protocol`` matches rows
    with that value or rows whose source does not name one ("unstated"), exact matches first; a
    number for another split or protocol is never returned."""
    df = reported_numbers()
    sel = df[(df.method == method) & (df.dataset == dataset) & (df.metric == metric) & (df.backbone == "ViT-B/16")]
    wanted = {column: value for column, value in (("split", split), ("protocol", protocol)) if value is not None}
    for column, value in wanted.items():
        sel = sel[sel[column].isin([value, "unstated"])]
    if not len(sel):
        return None
    inexact = sum((sel[column] != value).astype(int) for column, value in wanted.items())  # 0: no filter given
    return float(sel.value.loc[inexact.idxmin()] if wanted else sel.value.iloc[0])


def make_row(method, backbone, dataset, split, metric, reproduced, env: dict, reported=None, status="ok") -> dict:
    rep = None if reported is None else round(float(reported), 2)
    val = None if reproduced is None else round(100 * float(reproduced), 2)
    delta = None if rep is None or val is None else round(val - rep, 2)
    return {"method": method, "backbone": backbone, "dataset": dataset, "split": split, "metric": metric,
            "reported": rep, "reproduced": val, "delta": delta, "status": status,
            **{k: env.get(k) for k in ("commit", "config_hash", "seed", "device", "torch", "timm")}}


def _markdown(df: pd.DataFrame, **kwargs) -> str:
    """tabulate's ``missingval`` only replaces None, not NaN: hand it None so missing cells show as "-"."""
    return df.astype(object).where(df.notna(), None).to_markdown(index=False, missingval="-", **kwargs)


def write_tables(out_dir: Path, rows: list[dict], per_class: pd.DataFrame | None, title: str,
                 notes: list[str]) -> None:
    df = pd.DataFrame(rows, columns=ROW_COLUMNS)
    df["seed"] = df["seed"].astype("Int64")  # rows without a run (seed None) would make the column float: 0.0
    buf = io.StringIO()
    df.to_csv(buf, index=False, quoting=csv.QUOTE_MINIMAL)
    atomic_write_text(out_dir / "results.csv", buf.getvalue())
    shown = df[["method", "backbone", "dataset", "split", "metric", "reported", "reproduced", "delta", "status"]]
    md = [f"# {title}", "", _markdown(shown), ""]
    if notes:
        md += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    env_cols = df[["commit", "config_hash", "seed", "device", "torch", "timm"]].dropna(how="all").drop_duplicates()
    # as text: tabulate would read a commit like 4068e63 or a hash like 1e10 as a number
    md += ["## Environment", "", _markdown(env_cols, disable_numparse=True), ""]
    if per_class is not None:
        buf = io.StringIO()
        per_class.to_csv(buf, index=False)
        atomic_write_text(out_dir / "per_class.csv", buf.getvalue())
        md += ["## Per-class IoU (%)", "", _markdown(per_class, floatfmt=".1f"), ""]
    atomic_write_text(out_dir / "results.md", "\n".join(md))
