"""VOC- and COCO-shaped rehearsals (issue 12): `locbe reproduce --preset voc|coco` on synthetic sets laid out
exactly like the real ones, with the steps and images capped and a micro backbone, runs the real preset's
code path end to end: its schedule (every phase), its evaluation protocol and split, its report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from locbe.cli import main as cli
from locbe.config import get_preset
from locbe.data import COCO_CLASSES, VOC_CLASSES
from locbe.rehearsal import cap_schedule

CAPS = ["--max-steps", "3", "--max-images", "2", "--set", 'backbone="vit_micro_patch16"', "--set", "num_workers=0",
        "--device", "cpu", "--no-progress"]


def test_voc_layout_is_voc(tmp_path):
    assert cli(["make-layout", "--dataset", "voc", "--out", str(tmp_path), "--num-train", "4", "--num-val", "2"]) == 0
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    lists = voc / "ImageSets" / "Segmentation"
    train_aug = (lists / "train_aug.txt").read_text().split()
    val = (lists / "val.txt").read_text().split()
    assert len(train_aug) == 4 and len(val) == 2 and set((lists / "train.txt").read_text().split()) <= set(train_aug)
    for name in train_aug + val:
        assert len(name) == 11 and name[4] == "_" and name[:4].isdigit()  # 2008_000123
        with Image.open(voc / "JPEGImages" / f"{name}.jpg") as im:
            assert im.format == "JPEG" and max(im.size) == 500 and min(im.size) >= 281
            size = im.size
        with Image.open(voc / "SegmentationClassAug" / f"{name}.png") as m:
            assert m.mode == "L" and m.size == size  # SBD ships single-channel class-index PNGs
            values = set(np.unique(np.asarray(m)).tolist())
            assert values <= set(range(len(VOC_CLASSES))) | {255} and 255 in values
    assert not (voc / "cls_labels_onehot.npy").exists()  # VOC ships none; locbe derives the labels


def test_coco_layout_is_the_authors(tmp_path):
    assert cli(["make-layout", "--dataset", "coco", "--out", str(tmp_path), "--num-train", "3", "--num-val", "4"]) == 0
    for split, folder in (("train", "train2014"), ("val", "val2014")):
        names = (tmp_path / "ImageSets" / f"{split}.txt").read_text().split()
        for name in names:
            assert name.startswith(f"COCO_{folder}_") and len(name.split("_")[-1]) == 12
            assert (tmp_path / "JPEGImages" / folder / f"{name}.jpg").is_file()
            with Image.open(tmp_path / "SegmentationClass" / folder / f"{name}.png") as m:
                assert m.mode == "L"  # class indices in one channel, as the authors' loader reads them
    part = (tmp_path / "ImageSets" / "val_part.txt").read_text().split()
    assert set(part) < set((tmp_path / "ImageSets" / "val.txt").read_text().split())
    labels = np.load(tmp_path / "cls_labels_onehot.npy", allow_pickle=True).item()
    assert len(next(iter(labels.values()))) == len(COCO_CLASSES) - 1 == 80


def test_cap_schedule_keeps_every_phase():
    for preset, n_phases in (("voc", 2), ("coco", 3)):
        cfg = cap_schedule(get_preset(preset), 3)
        assert cfg.max_steps == 3 and len(cfg.phases) == n_phases
        seen = [tuple(sorted(cfg.loss_weights(s))) for s in range(3)]  # 0-based steps
        assert len(set(seen)) == n_phases  # every phase of the real schedule gets a step
        real = get_preset(preset)
        assert seen[0] == tuple(sorted(real.loss_weights(0)))
        assert seen[-1] == tuple(sorted(real.loss_weights(real.max_steps - 1)))
    for steps in (10, 200):  # larger caps keep the phases' shares of the schedule
        cfg = cap_schedule(get_preset("voc"), steps)
        assert cfg.phases[0].until + 1 == math.ceil(2001 * steps / 20000)  # 2001 of 20000 steps, rounded up
    with pytest.raises(ValueError, match="too few"):
        cap_schedule(get_preset("coco"), 2)


def _log(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_voc_rehearsal_runs_the_real_preset(tmp_path):
    assert cli(["make-layout", "--dataset", "voc", "--out", str(tmp_path / "data"), "--num-train", "6",
                "--num-val", "3"]) == 0
    root = tmp_path / "data" / "VOCdevkit" / "VOC2012"
    assert cli(["reproduce", "--preset", "voc", "--data-root", str(root), "--out", str(tmp_path / "run"),
                "--reports", str(tmp_path / "reports"), *CAPS]) == 0
    log = _log(tmp_path / "run")
    assert "seg" not in log[0] and {"seg", "reg", "loc", "be", "sc"} <= set(log[-1])  # both VOC phases ran
    ms = json.loads((tmp_path / "run" / "eval" / "val_ms_crf.json").read_text())
    assert ms["protocol"] == "voc" and ms["scales"] == [1.0, 1.5, 1.25] and ms["split"] == "val"
    assert ms["num_images"] == 2 and ms["autocast"] == "off" and ms["device"] == "cpu"
    table = pd.read_csv(tmp_path / "reports" / "voc" / "results.csv")
    assert list(table["split"]) == ["val", "val", "train_aug"]
    assert table["status"].str.startswith("rehearsal").all() and table["reproduced"].notna().all()
    md = (tmp_path / "reports" / "voc" / "results.md").read_text()
    assert "protocol `voc`" in md and "autocast off" in md
    assert list((tmp_path / "reports" / "voc" / "panels").glob("*.png"))


@pytest.mark.slow
def test_coco_rehearsal_evaluates_full_val_with_the_coco_protocol(tmp_path):
    root = tmp_path / "coco"
    assert cli(["make-layout", "--dataset", "coco", "--out", str(root), "--num-train", "6", "--num-val", "3"]) == 0
    assert cli(["reproduce", "--preset", "coco", "--data-root", str(root), "--out", str(tmp_path / "run"),
                "--reports", str(tmp_path / "reports"), *CAPS]) == 0
    log = _log(tmp_path / "run")
    assert set(log[0]) >= {"cls", "cls_aux"} and "seg" not in log[0]
    assert "seg" in log[1] and "be" not in log[1] and {"be", "loc", "sc"} <= set(log[2])  # the three COCO phases
    ms = json.loads((tmp_path / "run" / "eval" / "val_ms_crf.json").read_text())
    assert ms["protocol"] == "coco" and ms["split"] == "val"  # the full val list, not val_part
    assert ms["seg_crf"]["num_pixels"] > 0 and len(ms["seg_crf"]["iou"]) == 81
    table = pd.read_csv(tmp_path / "reports" / "coco" / "results.csv")
    assert list(table["split"])[:2] == ["val", "val"]
    assert (tmp_path / "run" / "val.jsonl").is_file()  # training-time validation (val_part) ran too


def test_reproduce_has_no_hard_coded_device():
    """Every stage of reproduce takes the configured device (issue 12): no "cpu"/"cuda" literal in the module."""
    import ast

    import locbe.reproduce

    tree = ast.parse(Path(locbe.reproduce.__file__).read_text())
    literals = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    assert not [v for v in literals if v.strip().lower() in ("cpu", "cuda")]


def test_resolve_device_rules(monkeypatch):
    import torch

    from locbe.runtime.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu" and resolve_device(None).type == "cpu"
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(RuntimeError, match="no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(ValueError):
        resolve_device("tpu")


@pytest.mark.slow
def test_voc_rehearsal_under_torchrun_two_processes(tmp_path):
    """reproduce under torchrun (gloo, 2 CPU processes): training averages over the ranks, every evaluation is
    sharded over them, rank 0 alone writes the tables."""
    import os
    import shutil
    import subprocess

    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not on PATH")
    repo = Path(__file__).resolve().parents[1]
    assert cli(["make-layout", "--dataset", "voc", "--out", str(tmp_path / "data"), "--num-train", "6",
                "--num-val", "3"]) == 0
    root = tmp_path / "data" / "VOCdevkit" / "VOC2012"
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(["torchrun", "--standalone", "--nproc_per_node=2", "-m", "locbe.cli", "reproduce",
                          "--preset", "voc", "--data-root", str(root), "--out", str(tmp_path / "run"),
                          "--reports", str(tmp_path / "reports"), *CAPS], cwd=repo, env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    for key in ("val_ms_crf", "val_single", "train_cam"):
        res = json.loads((tmp_path / "run" / "eval" / f"{key}.json").read_text())
        assert res["world_size"] == 2 and res["num_images"] == 2, key
    assert json.loads((tmp_path / "run" / "env.json").read_text())["world_size"] == 2
    assert "x 2 process(es)" in (tmp_path / "reports" / "voc" / "results.md").read_text()
    assert not list((tmp_path / "run" / "eval").glob("*.parts"))  # records summed into the metrics, removed
