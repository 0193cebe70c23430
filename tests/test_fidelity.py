"""Where ``fidelity`` is wired, outside the training step (docs/fidelity.md; issue 19).

The step's three switches (pixel box of the sc labels, uint8 PAR input, zero decoder gradients) are
pinned by the golden traces (tests/test_golden_step.py). These tests pin the rest: the default of
every preset, the ``--fidelity`` flag, the training dataset's box mirroring, and the ablation row of
``locbe reproduce``. Each fails when its switch is inverted where it is used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json

import numpy as np
import pytest
from PIL import Image

from locbe.cli import main as cli_main
from locbe.config import PRESETS, TrainConfig, get_preset

IGNORE = 255


def test_every_preset_reproduces_the_authors_by_default():
    assert TrainConfig().fidelity == "authors"
    assert {name: get_preset(name).fidelity for name in PRESETS} == {name: "authors" for name in PRESETS}


@pytest.mark.parametrize("flag,expected", [([], "authors"), (["--fidelity", "fixed"], "fixed"),
                                           (["--fidelity", "authors"], "authors")])
def test_fidelity_flag_reaches_the_config(flag, expected):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main(["train", "--preset", "smoke", *flag, "--print-config"]) == 0
    assert json.loads(out.getvalue())["fidelity"] == expected


def test_reproduce_fixed_ablation_is_the_only_fixed_row():
    from locbe.reproduce import ABLATIONS

    fidelity = {name: dataclasses.replace(get_preset("smoke"), **switches).fidelity
                for name, switches in ABLATIONS.items()}
    fixed = [name for name, mode in fidelity.items() if mode == "fixed"]
    assert fixed == ["authors' defects fixed (full, fidelity=fixed)"]
    assert all(mode == "authors" for name, mode in fidelity.items() if name not in fixed)


def _narrow_layout(root, n: int = 6, h: int = 20, w: int = 14) -> None:
    """Images narrower than the crop (so every crop is padded sideways), masks of class 1 everywhere:
    after augmentation the mask's non-255 pixels are exactly the image's pixels."""
    for d in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = [f"narrow{i}" for i in range(n)]
    for name in names:
        Image.fromarray(rng.integers(40, 256, (h, w, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
        Image.fromarray(np.ones((h, w), dtype=np.uint8), mode="L").save(root / "SegmentationClassAug" / f"{name}.png")
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(names) + "\n")


def _box_misses_the_image(item) -> bool:
    y0, y1, x0, x1 = (int(v) for v in item["img_box"])
    inside = np.zeros(item["mask"].shape, dtype=bool)
    inside[y0:y1, x0:x1] = True
    return not np.array_equal(inside, item["mask"].numpy() != IGNORE)


def test_training_dataset_mirrors_the_box_only_when_fixed(tmp_path):
    """The box of a training item follows the image through the view flip under "fixed", and stays
    where it was recorded under "authors" (the image moves, the box does not) for some items."""
    from locbe.training.sharding import build_train_dataset

    _narrow_layout(tmp_path)
    missed = {}
    for mode in ("authors", "fixed"):
        cfg = dataclasses.replace(get_preset("smoke"), data_root=str(tmp_path), train_split="train", crop_size=32,
                                  fidelity=mode)
        dataset = build_train_dataset(cfg)
        count = 0
        for epoch in range(4):
            dataset.set_epoch(epoch)
            count += sum(_box_misses_the_image(dataset[i]) for i in range(len(dataset)))
        missed[mode] = (count, 4 * len(dataset))
    assert missed["fixed"][0] == 0, missed
    assert 0 < missed["authors"][0] < missed["authors"][1], missed
