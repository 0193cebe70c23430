"""`locbe check-data` and the fast check before step 0 (issue 17, point 6): every bad file of a split listed in
one run with what is wrong, exit 2; train/reproduce refuse before writing anything unless --no-check-data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from locbe import errors
from locbe.cli import main as cli
from locbe.data.voc_layout import make_voc_layout


@pytest.fixture(scope="module")
def clean_root(tmp_path_factory) -> Path:
    return make_voc_layout(tmp_path_factory.mktemp("layout"), num_train=6, num_val=2, seed=1)


@pytest.fixture
def broken(clean_root, tmp_path) -> tuple[Path, dict[Path, str]]:
    """A copy of the layout with five bad files in train_aug -> (root, {bad path: problem the full check names})."""
    import shutil

    root = tmp_path / "VOC2012"
    shutil.copytree(clean_root, root)
    names = (root / "ImageSets" / "Segmentation" / "train_aug.txt").read_text().split()
    jpg = [root / "JPEGImages" / f"{n}.jpg" for n in names]
    png = [root / "SegmentationClassAug" / f"{n}.png" for n in names]
    data = jpg[0].read_bytes()
    jpg[0].write_bytes(data[: len(data) // 2])  # truncated: the header is intact, the scan data is cut
    jpg[1].write_bytes(b"this is not a jpeg\n" * 40)  # unreadable
    with Image.open(png[2]) as m:
        w, h = m.size
    Image.fromarray(np.zeros((h, w + 1), np.uint8), mode="L").save(png[2])  # one column too many
    with Image.open(png[3]) as m:
        bad_label = np.zeros(m.size[::-1], np.uint8)
    bad_label[5, 7] = 30  # VOC has 21 classes; 255 is the only value allowed beyond them
    bad_label[0, 0] = 255
    Image.fromarray(bad_label, mode="L").save(png[3])
    jpg[4].unlink()  # listed in train_aug.txt, not on disk
    return root, {jpg[0]: "truncated", jpg[1]: "unreadable", png[2]: "mask size differs from the image",
                  png[3]: "labels outside the classes", jpg[4]: "missing"}


def listed(stderr: str) -> dict[Path, str]:
    """{path: problem} of the one-line-per-file listing (``PATH: PROBLEM: DETAIL``)."""
    lines = [line.split(": ", 2) for line in stderr.splitlines() if line.startswith("/")]
    out = {Path(path): problem for path, problem, _ in lines}
    assert len(out) == len(lines), "a file is listed twice"
    return out


def check_data(root: Path, *extra: str) -> int:
    return cli(["check-data", "--dataset", "voc", "--data-root", str(root), "--split", "train_aug", "--no-progress",
                *extra])


@pytest.mark.parametrize("workers", ["1", "2"])
def test_full_check_lists_every_bad_file_in_one_run(broken, capsys, workers):
    root, expected = broken
    assert check_data(root, "--workers", workers) == errors.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert listed(err) == expected
    assert "values [30]" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("locbe check-data: 5 bad files in split 'train_aug'") and str(root) in last
    for problem in set(expected.values()):
        assert f"{problem} 1" in last


def test_num_classes_sets_the_allowed_labels(broken, capsys):
    root, expected = broken
    assert check_data(root, "--num-classes", "31") == errors.EXIT_BAD_INPUT  # 30 is a class now
    assert listed(capsys.readouterr().err) == {p: v for p, v in expected.items() if v != "labels outside the classes"}


def test_size_mismatch_names_both_sizes(broken, capsys):
    root, expected = broken
    check_data(root)
    mask = next(p for p, problem in expected.items() if problem == "mask size differs from the image")
    with Image.open(root / "JPEGImages" / f"{mask.stem}.jpg") as im:
        w, h = im.size
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith(str(mask)))
    assert line.endswith(f"mask {w + 1}x{h}, image {w}x{h}")


def test_fast_check_finds_what_headers_show(broken, capsys):
    """Headers only: truncation after the header and label values need the full decode."""
    root, expected = broken
    assert check_data(root, "--fast") == errors.EXIT_BAD_INPUT
    seen = listed(capsys.readouterr().err)
    assert seen == {p: v for p, v in expected.items() if v not in ("truncated", "labels outside the classes")}


def test_clean_split_passes_and_says_what_it_read(clean_root, capsys):
    assert cli(["check-data", "--dataset", "voc", "--data-root", str(clean_root), "--split", "train_aug",
                "--split", "val", "--no-progress"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and "6 images and 6 masks decoded" in out[0] and "2 images and 2 masks" in out[1]
    assert all(line.endswith("no problems") for line in out)


def test_wrong_mask_mode_and_unreadable_mask(clean_root, tmp_path, capsys):
    import shutil

    root = tmp_path / "VOC2012"
    shutil.copytree(clean_root, root)
    names = (root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    rgb, empty = (root / "SegmentationClassAug" / f"{n}.png" for n in names)
    with Image.open(rgb) as m:
        m.convert("RGB").save(rgb)  # a colour rendering, not class indices
    empty.write_bytes(b"")
    assert cli(["check-data", "--dataset", "voc", "--data-root", str(root), "--split", "val", "--fast",
                "--no-progress"]) == 2
    assert listed(capsys.readouterr().err) == {rgb: "not a class-index mask", empty: "unreadable"}


def test_missing_split_or_root_is_one_line(tmp_path, capsys):
    assert check_data(tmp_path / "nowhere") == 2
    assert capsys.readouterr().err.strip().startswith("locbe check-data: dataset root")
    assert cli(["check-data", "--dataset", "voc", "--data-root", str(tmp_path), "--split", "nosuch"]) == 2
    assert "split file for 'nosuch' not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------- before step 0
TINY = ["crop_size=64", "batch_size=2", "warmup_steps=1", "val_every=0", "loc_crop_size=32", "cam_scales=[1.0]",
        "num_workers=0", 'backbone="vit_micro_patch16"']


def train_cmd(root: Path, out: Path, *extra: str) -> list[str]:
    args = ["train", "--preset", "smoke", "--data-root", str(root), "--out", str(out), "--max-steps", "2",
            "--device", "cpu", "--no-progress", *extra]
    for o in TINY:
        args += ["--set", o]
    return args


def test_train_refuses_before_step_0_and_writes_nothing(broken, tmp_path, capsys):
    root, expected = broken
    out = tmp_path / "run"
    assert cli(train_cmd(root, out)) == errors.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert listed(err) == {p: v for p, v in expected.items() if v not in ("truncated", "labels outside the classes")}
    last = err.strip().splitlines()[-1]
    assert last.startswith("locbe train: 3 bad files in split 'train_aug'") and "--no-check-data" in last
    assert not out.exists()


def test_no_check_data_skips_the_check(broken, tmp_path, capsys):
    """Skipped: no listing; the dataset's own construction check meets the missing image instead."""
    root, _ = broken
    out = tmp_path / "run"
    assert cli(train_cmd(root, out, "--no-check-data")) == errors.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert listed(err) == {} and "1 images of split 'train_aug' are missing" in err
    assert not out.exists()


def test_train_checks_the_val_split_it_validates_on(clean_root, tmp_path, capsys):
    import shutil

    root = tmp_path / "VOC2012"
    shutil.copytree(clean_root, root)
    val = (root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    (root / "JPEGImages" / f"{val[0]}.jpg").write_bytes(b"")
    out = tmp_path / "run"
    args = train_cmd(root, out) + ["--set", "val_every=1"]
    assert cli(args) == errors.EXIT_BAD_INPUT
    assert listed(capsys.readouterr().err) == {root / "JPEGImages" / f"{val[0]}.jpg": "unreadable"}
    assert not out.exists()


def test_reproduce_refuses_before_the_first_stage(broken, tmp_path, capsys):
    root, expected = broken
    out = tmp_path / "run"
    args = ["reproduce", "--preset", "voc", "--data-root", str(root), "--out", str(out), "--device", "cpu",
            "--max-steps", "3", "--max-images", "2", "--no-progress", "--set", "num_workers=0"]
    assert cli(args) == errors.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert listed(err) == {p: v for p, v in expected.items() if v not in ("truncated", "labels outside the classes")}
    assert err.strip().splitlines()[-1].startswith("locbe reproduce: 3 bad files")
    assert not out.exists()
