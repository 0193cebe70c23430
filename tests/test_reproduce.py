"""`locbe reproduce` end to end on a tiny synthetic set: tables written, and an interrupted run
resumes to the same table as an uninterrupted one (issue 5)."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from locbe.cli import main as cli
from locbe.config import apply_overrides, get_preset
from locbe.errors import EXIT_ACCEPTANCE
from locbe.train import train

OVERRIDES = ["crop_size=64", "batch_size=4", "max_steps=6", "warmup_steps=2", "num_workers=0", "log_every=1",
             "ckpt_every=2", "val_every=0", "loc_crop_size=32", "cam_scales=[1.0]"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "voc"
    assert cli(["make-synthetic", "--out", str(root), "--num-train", "12", "--num-val", "4", "--seed", "9"]) == 0
    return root


def reproduce(root: Path, out: Path, reports: Path, capsys=None) -> pd.DataFrame:
    args = ["reproduce", "--preset", "smoke", "--data-root", str(root), "--out", str(out), "--reports", str(reports),
            "--no-progress"]
    for o in OVERRIDES:
        args += ["--set", o]
    # 6 steps cannot reach the smoke preset's acceptance line: every stage runs, the tables are written,
    # and the exit code says the acceptance failed
    assert cli(args) == EXIT_ACCEPTANCE
    if capsys is not None:  # the end of the output: a short summary and where the report is, not the report
        out_text = capsys.readouterr().out
        tail = out_text[out_text.index("locbe reproduce: done"):].splitlines()
        assert len(tail) == 7 and tail[-1] == f"report: {reports / 'smoke' / 'results.md'} (training curves: " \
            f"{reports / 'smoke' / 'curves.png'})"
        assert tail[1].split()[:4] == ["seg", "mIoU", "(single", "scale)"] and "FAILED" in tail[5]
        assert "## Notes" not in out_text and "| method" not in out_text
    with open(reports / "smoke" / "results.csv") as f:
        assert {row["seed"] for row in csv.DictReader(f)} == {"0"}  # an integer, not 0.0
    table = pd.read_csv(reports / "smoke" / "results.csv")
    assert "acceptance: >= 2.0: FAILED" in (reports / "smoke" / "results.md").read_text()
    return table


@pytest.mark.slow
def test_interrupted_reproduce_resumes_to_the_same_table(root, tmp_path, capsys):
    full = reproduce(root, tmp_path / "a", tmp_path / "ra", capsys)
    for name in ("results.md", "results.csv", "per_class.csv"):
        assert (tmp_path / "ra" / "smoke" / name).is_file()
    panels = sorted((tmp_path / "ra" / "smoke" / "panels").glob("*.png"))
    assert [p.stem for p in panels] == [f"syn_val_{i:05d}" for i in range(4)]  # the first 4 val images
    for path in panels:
        with Image.open(path) as im:
            assert im.width == 1305 and im.height >= 62 + 100 + 100  # locbe/report/panels.py layout
    md = (tmp_path / "ra" / "smoke" / "results.md").read_text()
    assert "titled with the image id and its image-level classes" in md and "0 background / 1 uncertain" in md
    # the published VOC/COCO numbers are a table of their own, not rows of results that read as failures
    assert "dataset not found" not in md and set(full.dataset) == {"synthetic"}
    published = md.split("## Published numbers (not run here)")[1].split("##")[0]
    assert "| 73.10 " in published and "locbe reproduce --preset coco --data-root DIR" in published
    # one seed: the value and the verdict, no empty statistics columns; the acceptance verdict is in the table
    header = md.split("\n\n")[2].splitlines()[0]
    assert [c.strip() for c in header.strip("|").split("|")] == ["method", "backbone", "dataset", "split", "metric",
                                                                 "value", "verdict"]
    assert "| acceptance ratio " in md.split("\n\n")[2] and "Every row: not comparable to the paper" in md
    # training curves: the run's own (written by training) and the report's, linked from results.md
    assert (tmp_path / "a" / "curves.png").is_file() and (tmp_path / "ra" / "smoke" / "curves.png").is_file()
    assert "![training curves](curves.png)" in md and "[seed 0](../../a/curves.png)" in md

    # interrupt: train half the steps only, as if killed after the step-4 checkpoint
    cfg = apply_overrides(get_preset("smoke"), [f"data_root={json.dumps(str(root))}",
                                                f"out_dir={json.dumps(str(tmp_path / 'b'))}", *OVERRIDES])
    train(dataclasses.replace(cfg), progress=False, max_steps_this_run=4)
    assert not (tmp_path / "b" / "checkpoints" / "final.pth").exists()
    resumed = reproduce(root, tmp_path / "b", tmp_path / "rb")
    pd.testing.assert_series_equal(full["reproduced"], resumed["reproduced"])  # bitwise on CPU

    # re-running a finished reproduction skips every stage and rewrites the same table
    again = reproduce(root, tmp_path / "b", tmp_path / "rb")
    pd.testing.assert_frame_equal(resumed, again)
