"""A full disk said plainly (issue 25): a warning before step 0 when the run directory's file system has less free
space than two checkpoints and the logs; a write that finds the disk full ends the run with one line naming the
file, the space it needs and has, the step whose state ``last.pth`` keeps (intact) and how to continue (exit 2).
Both a simulated failing write (torch.save's short write, ENOSPC) and a real small file system (tmpfs, where the
machine lets a test mount one: CI runs as root)."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import uuid
from pathlib import Path

import pytest
import torch

from locbe import errors
from locbe.cli import main as cli
from locbe.config import apply_overrides, get_preset
from locbe.models import build_model
from locbe.training import checkpoint as ckpt_module
from locbe.training.optim import build_optimizer

TINY = ["crop_size=64", "batch_size=4", "warmup_steps=2", "log_every=1", "val_every=0", "loc_crop_size=32",
        "cam_scales=[1.0]", "num_workers=0"]
LINE = re.compile(r"^locbe (train|reproduce): disk full writing (\S+) \(needs about (\d+) MB, (\d+) MB free\); "
                  r"the state after step (\d+) is in (\S+); free space and (.+)$")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "voc"
    assert cli(["make-synthetic", "--out", str(root), "--num-train", "12", "--num-val", "4", "--seed", "5"]) == 0
    return root


def train_args(root: Path, out: Path, max_steps: int = 4, ckpt_every: int = 2) -> list[str]:
    args = ["train", "--preset", "smoke", "--no-progress", "--data-root", str(root), "--out", str(out)]
    for o in [*TINY, f"max_steps={max_steps}", f"ckpt_every={ckpt_every}"]:
        args += ["--set", o]
    return args


def locbe_lines(stderr: str, command: str = "train") -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"locbe {command}:")]


def steps_logged(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]


def step_of(path: Path) -> int:
    return int(torch.load(path, weights_only=True, mmap=True)["step"])


def no_temp_files(out: Path) -> bool:
    return not [p for p in out.rglob(".*") if ".tmp" in p.name]


def test_checkpoint_size_estimate_is_close_to_a_real_checkpoint(tmp_path):
    cfg = get_preset("smoke")
    net = build_model(cfg.backbone, num_classes=cfg.num_classes, aux_layer=cfg.aux_layer)
    optimizer = build_optimizer(net, cfg)
    estimate = ckpt_module.checkpoint_bytes(net, optimizer)  # before step 0: no AdamW moments yet
    for p in net.parameters():
        p.grad = torch.ones_like(p) if p.requires_grad else None
    optimizer.step()  # now the moments exist
    path = tmp_path / "last.pth"
    ckpt_module.save_checkpoint(path, net, optimizer, 1, cfg)
    assert abs(estimate - path.stat().st_size) < 0.05 * path.stat().st_size, (estimate, path.stat().st_size)
    assert abs(ckpt_module.checkpoint_bytes(net, optimizer) - path.stat().st_size) < 0.05 * path.stat().st_size


class FailingSave:
    """torch.save that works for the first ``good`` checkpoints, then writes half of one and fails as torch
    does on a full disk; it keeps the bytes of ``last.pth`` as they were just before the failing write."""

    def __init__(self, error: BaseException, good: int = 1):
        self.real, self.error, self.good, self.calls, self.last_before = torch.save, error, good, 0, None

    def __call__(self, obj, f, *a, **k):
        self.calls += 1
        if self.calls <= self.good:
            return self.real(obj, f, *a, **k)
        last = Path(f.name).parent / "last.pth"
        self.last_before = last.read_bytes() if last.is_file() else None
        f.write(b"PK\x03\x04 half a checkpoint")
        raise self.error


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 31094144 vs 31094032"),
    OSError(errno.ENOSPC, "No space left on device"),
], ids=["torch-short-write", "ENOSPC"])
def test_a_checkpoint_write_on_a_full_disk_ends_with_one_line_and_keeps_the_previous_state(root, tmp_path, capsys,
                                                                                         monkeypatch, error):
    out = tmp_path / "run"
    failing = FailingSave(error)
    monkeypatch.setattr(torch, "save", failing)
    assert cli(train_args(root, out)) == errors.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    line, = locbe_lines(err)
    assert "Traceback" not in err
    m = LINE.match(line)
    assert m, line
    last = out / "checkpoints" / "last.pth"
    assert m.group(2) == str(last) and m.group(6) == str(last) and m.group(5) == "2"
    assert m.group(7) == "rerun with --resume"
    assert 30 <= int(m.group(3)) <= 50  # the smoke model's checkpoint: about 40 MB
    assert last.read_bytes() == failing.last_before and step_of(last) == 2  # the previous state, byte for byte
    assert no_temp_files(out)
    monkeypatch.setattr(torch, "save", failing.real)  # space freed: the advice given works
    assert cli(train_args(root, out) + ["--resume"]) == 0
    assert "resuming from step 2 (of 4)" in capsys.readouterr().err
    assert steps_logged(out) == [1, 2, 3, 4] and step_of(out / "checkpoints" / "final.pth") == 4


def test_reproduce_says_to_rerun_the_same_command(root, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(torch, "save", FailingSave(OSError(errno.ENOSPC, "No space left on device")))
    args = ["reproduce", "--preset", "smoke", "--data-root", str(root), "--out", str(out), "--no-progress",
            "--no-check-data"]
    for o in [*TINY, "max_steps=4", "ckpt_every=2"]:
        args += ["--set", o]
    assert cli(args) == errors.EXIT_BAD_INPUT
    line, = locbe_lines(capsys.readouterr().err, "reproduce")
    m = LINE.match(line)
    assert m and m.group(5) == "2", line
    assert m.group(7).startswith("rerun the same `locbe reproduce` command") and "--resume" not in m.group(7).split(
        "(")[0]


def test_the_first_checkpoint_failing_says_nothing_is_saved_yet(root, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(torch, "save", FailingSave(OSError(errno.ENOSPC, "No space left on device"), good=0))
    assert cli(train_args(root, out)) == errors.EXIT_BAD_INPUT
    line, = locbe_lines(capsys.readouterr().err)
    assert line.startswith(f"locbe train: disk full writing {out / 'checkpoints' / 'last.pth'} (needs about ")
    assert "no state is saved yet" in line and "rerun the same command" in line
    assert not (out / "checkpoints" / "last.pth").exists() and no_temp_files(out)
    monkeypatch.setattr(torch, "save", torch.serialization.save)  # space freed: the same command starts again
    assert cli(train_args(root, out)) == 0 and steps_logged(out) == [1, 2, 3, 4]


def test_a_log_write_on_a_full_disk_is_said_the_same_way(root, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real_open, rows = open, []

    def full_on_third_row(file, mode="r", *a, **k):
        if str(file).endswith("log.jsonl") and "a" in mode:
            rows.append(file)
            if len(rows) == 3:
                raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr("builtins.open", full_on_third_row)
    assert cli(train_args(root, out)) == errors.EXIT_BAD_INPUT
    line, = locbe_lines(capsys.readouterr().err)
    m = LINE.match(line)
    assert m and m.group(2) == str(out / "log.jsonl") and m.group(5) == "2", line


# ----------------------------------------------------------------------------- a real small file system
@pytest.fixture
def small_fs(tmp_path):
    """A tmpfs mounted for the test (size set by the test with ``resize``); skipped where mounting is not allowed."""
    mnt = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot mount a tmpfs here: {e}")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (not root, or no CAP_SYS_ADMIN): {proc.stderr.strip()}")

    def resize(megabytes: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={megabytes}m", str(mnt)], check=True, timeout=30)

    try:
        yield mnt, resize
    finally:
        subprocess.run(["umount", "-l", str(mnt)], timeout=30)


def test_a_real_full_file_system(root, tmp_path, small_fs, capsys):
    mnt, resize = small_fs
    probe = tmp_path / "probe"  # the size of this config's checkpoint, measured on the ordinary disk
    assert cli(train_args(root, probe, max_steps=1, ckpt_every=1)) == 0
    size_mb = (probe / "checkpoints" / "last.pth").stat().st_size / 2**20
    resize(int(size_mb * 1.5))  # one checkpoint fits, a second (the temp copy that replaces it) does not
    out = mnt / "run"
    assert cli(train_args(root, out)) == errors.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    warning, line = locbe_lines(err)
    assert warning.startswith(f"locbe train: warning: {int(size_mb * 1.5) - 1} MB free for {out}") or \
        warning.startswith(f"locbe train: warning: {int(size_mb * 1.5)} MB free for {out}"), warning
    assert "two checkpoints" in warning
    m = LINE.match(line)
    assert m, line
    last = out / "checkpoints" / "last.pth"
    assert m.group(2) == str(last) and m.group(5) == "2" and m.group(7) == "rerun with --resume"
    assert abs(int(m.group(3)) - size_mb) <= 2  # needs about one checkpoint
    free_now = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize / 2**20
    assert abs(int(m.group(4)) - free_now) <= 1  # what is free after the failed write was removed
    assert step_of(last) == 2 and no_temp_files(out)  # the previous state, loadable
    resize(int(size_mb * 3))  # space freed
    assert cli(train_args(root, out) + ["--resume"]) == 0
    err = capsys.readouterr().err
    assert "resuming from step 2 (of 4)" in err and "warning" not in err
    assert steps_logged(out) == [1, 2, 3, 4] and step_of(out / "checkpoints" / "final.pth") == 4


def test_torch_save_on_a_real_full_file_system_is_recognised(small_fs):
    from locbe.runtime.fileio import is_disk_full

    mnt, resize = small_fs
    resize(2)
    previous = os.urandom(1000)
    (mnt / "x.pth").write_bytes(previous)
    with pytest.raises((RuntimeError, OSError)) as info:
        ckpt_module.atomic_torch_save({"w": torch.zeros(2**20)}, mnt / "x.pth")  # 4 MB
    assert is_disk_full(info.value), repr(info.value)
    assert (mnt / "x.pth").read_bytes() == previous and [p.name for p in mnt.iterdir()] == ["x.pth"]


def test_the_warning_before_step_0_counts_two_checkpoints_and_the_logs(tmp_path, monkeypatch):
    cfg = apply_overrides(get_preset("smoke"), [f"out_dir={json.dumps(str(tmp_path))}", "max_steps=100",
                                                "log_every=1", "val_every=0"])
    needed = ckpt_module.space_needed(cfg, 40 * 2**20, 0, 0)
    assert 80 * 2**20 < needed < 81 * 2**20  # two checkpoints and 101 rows of the log
    assert ckpt_module.space_needed(cfg, 40 * 2**20, 50, 40 * 2**20) < 41 * 2**20  # a resume has one already
    monkeypatch.setattr(ckpt_module, "free_bytes", lambda path: needed)
    assert ckpt_module.warn_if_short_of_space(tmp_path, needed, 40 * 2**20, "train") is None
    monkeypatch.setattr(ckpt_module, "free_bytes", lambda path: needed - 1)
    warning = ckpt_module.warn_if_short_of_space(tmp_path, needed, 40 * 2**20, "train")
    assert warning == (f"locbe train: warning: 80 MB free for {tmp_path}, the run needs about 81 MB (two checkpoints "
                       "of about 40 MB and the logs); a write that does not fit stops the run: free space now or "
                       "choose another --out")
