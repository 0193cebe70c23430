"""Operator-grade runs (issue 13): a run directory bound to its config, exit codes, signals and data
errors that save state, one-line errors, durable writes, help without torch. Faults are injected
for real: SIGTERM / SIGINT to a `locbe train` subprocess, a corrupt JPEG, a changed config."""

from __future__ import annotations

import ast
import errno
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from locbe import errors
from locbe.cli import COMMANDS, build_parser
from locbe.cli import main as cli
from locbe.config import apply_overrides, get_preset
from locbe.train import train

REPO = Path(__file__).resolve().parents[1]
TINY = ["crop_size=64", "batch_size=4", "warmup_steps=2", "log_every=1", "ckpt_every=100", "val_every=0",
        "loc_crop_size=32", "cam_scales=[1.0]"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "voc"
    assert cli(["make-synthetic", "--out", str(root), "--num-train", "12", "--num-val", "4", "--seed", "5"]) == 0
    return root


def overrides(root: Path, out: Path, max_steps: int = 4, workers: int = 0, extra=()) -> list[str]:
    return [f"data_root={json.dumps(str(root))}", f"out_dir={json.dumps(str(out))}", f"max_steps={max_steps}",
            f"num_workers={workers}", *TINY, *extra]


def tiny(root: Path, out: Path, **kw):
    return apply_overrides(get_preset("smoke"), overrides(root, out, **kw))


def steps_logged(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]


def saved_step(out: Path) -> int:
    return int(torch.load(out / "checkpoints" / "last.pth", weights_only=True, mmap=True)["step"])


def locbe_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "locbe.cli", *args]


def subprocess_env() -> dict:
    """The checkout under test first on the path (not an editable install elsewhere); 1 thread per process."""
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def train_args(root: Path, out: Path, **kw) -> list[str]:
    args = ["train", "--preset", "smoke", "--no-progress"]
    for o in overrides(root, out, **kw):
        args += ["--set", o]
    return args


def locbe_lines(stderr: str, command: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"locbe {command}:")]


# ----------------------------------------------------------------------------- run directory bound to its config
def test_resume_with_another_config_refuses_naming_the_fields(root, tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny(root, out, max_steps=4), progress=False, max_steps_this_run=2)
    before = (out / "config.json").read_text()
    changed = train_args(root, out, max_steps=5, extra=["lr=0.1"]) + ["--resume"]
    assert cli(changed) == errors.EXIT_BAD_INPUT
    line, = locbe_lines(capsys.readouterr().err, "train")
    assert "lr: 0.0005 -> 0.1" in line and "max_steps: 4 -> 5" in line and "--force-new" in line
    assert (out / "config.json").read_text() == before  # the record of the steps run is untouched
    assert saved_step(out) == 2

    # --force-new keeps the old run (moved aside) and starts over with the new config
    assert cli(train_args(root, out, max_steps=1, extra=["lr=0.1"]) + ["--force-new"]) == 0
    moved, = tmp_path.glob("run.old-*")
    assert saved_step(moved) == 2 and json.loads((moved / "config.json").read_text())["lr"] == 0.0005
    assert json.loads((out / "config.json").read_text())["lr"] == 0.1 and steps_logged(out) == [1]


def test_a_field_the_stored_config_predates_counts_with_its_default():
    """A run made before a field existed (no key in its config.json) did what the field's default does: no
    difference at that default, ``field: default -> new`` otherwise."""
    from locbe.training.rundir import config_differences

    voc = get_preset("voc")
    stored = json.loads(json.dumps(voc.to_dict()))
    del stored["photometric_aug"]
    assert config_differences(stored, voc) == []
    assert config_differences(stored, apply_overrides(voc, ["photometric_aug=false"])) == [
        "photometric_aug: true -> false"]


def test_resume_without_checkpoint_is_an_error(root, tmp_path, capsys):
    assert cli(train_args(root, tmp_path / "empty") + ["--resume"]) == errors.EXIT_BAD_INPUT
    line, = locbe_lines(capsys.readouterr().err, "train")
    assert "no checkpoint" in line and "last.pth" in line
    assert not (tmp_path / "empty" / "log.jsonl").exists()  # nothing started at step 0
    with pytest.raises(errors.MissingPathError):  # --debug: the exception itself, with its traceback
        cli(["--debug", *train_args(root, tmp_path / "empty"), "--resume"])


def test_fresh_run_starts_clean_and_resume_logs_every_step_once(root, tmp_path):
    out = tmp_path / "run"
    # a run killed before its first checkpoint: a log and a temp file of an interrupted write remain
    (out / "checkpoints").mkdir(parents=True)
    (out / "log.jsonl").write_text('{"step": 1, "total": 9.0}\n{"step": 2, "total": 9.0}\n')
    stale = out / "checkpoints" / ".last.pth.tmp4242"
    stale.write_bytes(b"half a checkpoint")
    train(tiny(root, out, max_steps=6), progress=False, max_steps_this_run=3)
    assert steps_logged(out) == [1, 2, 3] and not stale.exists()
    assert json.loads((out / "log.jsonl").read_text().splitlines()[0])["total"] != 9.0

    # killed after logging steps 4-5 but before a checkpoint; a write was cut in the middle too
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 4, "total": 1.0}\n{"step": 5, "total": 1.0}\n{"step": 6, "to')
    stale.write_bytes(b"half a checkpoint")
    result = train(tiny(root, out, max_steps=6), progress=False, resume=True)
    assert result.step == 6 and steps_logged(out) == [1, 2, 3, 4, 5, 6] and not stale.exists()


def test_reproduce_refuses_a_finished_run_with_another_config(root, tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny(root, out, max_steps=2), progress=False)
    args = ["reproduce", "--preset", "smoke", "--data-root", str(root), "--out", str(out), "--no-progress"]
    for o in [*overrides(root, out, max_steps=2)[2:], "lr=0.1"]:
        args += ["--set", o]
    assert cli(args) == errors.EXIT_BAD_INPUT
    line, = locbe_lines(capsys.readouterr().err, "reproduce")
    assert "final.pth" in line and "lr: 0.0005 -> 0.1" in line and "--force-new" in line
    assert not (out / "eval").exists() and not (out / "report").exists()


def test_reproduce_with_a_missing_data_root_overwrites_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "report").mkdir(parents=True)
    (out / "report" / "results.md").write_text("earlier results")
    rc = cli(["reproduce", "--preset", "voc", "--data-root", str(tmp_path / "typo"), "--out", str(out)])
    assert rc == errors.EXIT_BAD_INPUT
    line, = locbe_lines(capsys.readouterr().err, "reproduce")
    assert str(tmp_path / "typo") in line
    assert (out / "report" / "results.md").read_text() == "earlier results"


def parsed_train_config(*args: str):
    from locbe.training.cli import config_from_args

    return config_from_args(build_parser(["train", *args]).parse_args(["train", *args]))


def test_max_steps_shrinks_the_schedule_in_train_as_in_reproduce():
    preset = get_preset("smoke")
    cfg = parsed_train_config("--preset", "smoke", "--max-steps", "120")
    assert cfg.max_steps == 120 and cfg.warmup_steps == 6  # 60 of 1200 -> 6 of 120, as reproduce's rehearsal
    assert [p.until for p in cfg.phases][0] == 20 and preset.phases[0].until == 200  # steps 0..200 -> 0..20
    longer = parsed_train_config("--preset", "smoke", "--max-steps", "2400")
    assert longer.max_steps == 2400 and longer.warmup_steps == 60 and longer.phases == preset.phases
    assert parsed_train_config("--preset", "smoke").max_steps == 1200  # no flag: the preset's
    raw = parsed_train_config("--preset", "smoke", "--set", "max_steps=120")  # the count alone, as documented
    assert raw.max_steps == 120 and raw.warmup_steps == 60


def test_a_train_run_with_max_steps_is_what_reproduce_with_max_steps_reuses(root, tmp_path, capsys):
    out = tmp_path / "run"
    sets = []
    for o in [o for o in overrides(root, out) if not o.startswith("max_steps=")]:  # the steps: --max-steps
        sets += ["--set", o]
    assert cli(["train", "--preset", "smoke", "--no-progress", "--max-steps", "3", *sets]) == 0
    capsys.readouterr()
    rc = cli(["reproduce", "--preset", "smoke", "--data-root", str(root), "--out", str(out), "--no-progress",
              "--max-steps", "3", "--max-images", "1", *sets])
    out_text, err = capsys.readouterr()
    assert f"[train] {out / 'checkpoints' / 'final.pth'} exists: skipped" in out_text, err[-2000:]
    assert "another config" not in err and rc in (0, errors.EXIT_ACCEPTANCE)  # 3 steps may miss the line


# ----------------------------------------------------------------------------- faults in a real `locbe train`
@pytest.mark.parametrize("signum,workers,group", [(signal.SIGTERM, 0, False), (signal.SIGINT, 1, True)],
                         ids=["SIGTERM", "SIGINT-to-group-with-workers"])
def test_signal_saves_a_resumable_checkpoint_and_exits_cleanly(root, tmp_path, signum, workers, group):
    out = tmp_path / "run"
    proc = subprocess.Popen(locbe_cmd(*train_args(root, out, max_steps=1000, workers=workers)), cwd=REPO,
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not ((out / "log.jsonl").is_file() and len(steps_logged(out)) >= 2):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no training step within 300 s"
            time.sleep(0.2)
        os.killpg(proc.pid, signum) if group else proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == errors.EXIT_INTERRUPTED + signum, stderr
    assert "Traceback" not in stderr
    line, = locbe_lines(stderr, "train")
    assert signal.Signals(signum).name in line and "--resume" in line
    step = saved_step(out)
    assert step >= 2 and steps_logged(out)[-1] == step  # saved at the step boundary after the last logged step
    result = train(tiny(root, out, max_steps=1000, workers=workers), progress=False, resume=True,
                   max_steps_this_run=1)
    assert result.step == step + 1 and steps_logged(out) == list(range(1, step + 2))


def test_corrupt_image_mid_run_saves_state_and_names_the_file(root, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(root, data)
    names = (data / "ImageSets" / "Segmentation" / "train_aug.txt").read_text().split()
    sampler = torch.utils.data.DistributedSampler(range(len(names)), num_replicas=1, rank=0, shuffle=True,
                                                  seed=0, drop_last=True)
    sampler.set_epoch(0)
    bad = data / "JPEGImages" / f"{names[list(sampler)[8]]}.jpg"  # in the third batch (batch size 4): step 3
    data_bytes = bad.read_bytes()  # cut after its header: the fast check before step 0 cannot see it
    bad.write_bytes(data_bytes[: len(data_bytes) // 3])
    out = tmp_path / "run"
    proc = subprocess.run(locbe_cmd(*train_args(data, out, max_steps=6, workers=1)), cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == errors.EXIT_BAD_INPUT, proc.stderr
    assert "Traceback" not in proc.stderr
    line, = locbe_lines(proc.stderr, "train")
    assert str(bad) in line and "step 3" in line and "--resume" in line
    assert saved_step(out) == 2 and steps_logged(out) == [1, 2]


# ----------------------------------------------------------------------------- errors, writes, help
def test_dataloader_worker_errors_are_unwrapped_to_the_failing_file():
    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise errors.DataError(f"cannot read image /data/JPEGImages/{i}.jpg (truncated)")

    with pytest.raises(errors.DataError) as info:
        next(iter(torch.utils.data.DataLoader(Broken(), num_workers=1)))
    assert "Traceback" in str(info.value)  # what torch re-raises: the worker's traceback as the message
    assert errors.one_line(info.value) == "cannot read image /data/JPEGImages/0.jpg (truncated)"


def test_atomic_write_fsyncs_the_file_and_then_its_directory(tmp_path, monkeypatch):
    from locbe.runtime import fileio
    synced, real = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)) or real(fd))
    fileio.atomic_write_text(tmp_path / "a" / "results.md", "x")
    assert synced == [False, True] and (tmp_path / "a" / "results.md").read_text() == "x"
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["results.md"]


def half_then_disk_full(path: Path, payload: bytes) -> None:
    """A writer that gets half of ``payload`` out, then finds the disk full."""
    with open(path, "wb") as f:
        f.write(payload[:len(payload) // 2])
        f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@pytest.mark.parametrize("write", ["atomic_path", "atomic_write_text"])
def test_a_write_that_fails_midway_leaves_the_previous_file_byte_for_byte_and_no_temp_file(tmp_path, monkeypatch,
                                                                                           write):
    from locbe.runtime import fileio

    target = tmp_path / "ckpt" / "last.pth"
    target.parent.mkdir()
    previous = os.urandom(4096)
    target.write_bytes(previous)
    new = os.urandom(8192)
    with pytest.raises(OSError) as info:
        if write == "atomic_path":
            with fileio.atomic_path(target) as tmp:
                half_then_disk_full(tmp, new)
        else:  # a text write whose file write fails after part of the text went out
            real = Path.write_text

            def failing(self, text, *a, **k):
                half_then_disk_full(self, text.encode())
                return real(self, text, *a, **k)

            monkeypatch.setattr(Path, "write_text", failing)
            fileio.atomic_write_text(target, new.hex())
    assert fileio.is_disk_full(info.value)
    assert target.read_bytes() == previous  # not a byte of the new content in the file readers use
    assert [p.name for p in target.parent.iterdir()] == ["last.pth"]  # and no temp file left behind


@pytest.mark.parametrize("error,full", [
    (OSError(errno.ENOSPC, "No space left on device"), True),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 31094144 vs 31094032"), True),
    (RuntimeError("PytorchStreamWriter failed writing file data/3: file write failed"), True),
    (OSError(errno.EACCES, "Permission denied"), False),
    (RuntimeError("shape mismatch"), False),
])
def test_is_disk_full_tells_a_full_disk_from_other_failures(error, full):
    from locbe.runtime.fileio import is_disk_full

    assert is_disk_full(error) is full


def test_results_csv_writes_the_seed_as_an_integer(tmp_path):
    from locbe.report.tables import make_row, write_tables

    env = {"seed": 0, "commit": "4068e63", "config_hash": "1e10"}
    write_tables(tmp_path, [make_row("m", "b", "d", "val", "seg", 0.5, env), make_row("t", "-", "d", "val", "seg",
                                                                                      None, {})], None, "t", [])
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert rows[1].split(",")[-6:-3] == ["4068e63", "1e10", "0"]


def test_help_imports_no_torch():
    code = ("import sys\nfrom locbe.cli import COMMANDS, main\nfor c in COMMANDS:\n"
            "    try:\n        main([c, '--help'])\n    except SystemExit:\n        pass\n"
            "    assert 'torch' not in sys.modules, c\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert all(f"usage: locbe {c}" in proc.stdout for c in COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_flag_has_help(command):
    sub = next(a for a in build_parser([command])._actions if a.dest == "command").choices[command]
    undocumented = [a.option_strings for a in sub._actions if a.option_strings and not (a.help or "").strip()]
    assert not undocumented


def test_help_shows_the_chosen_presets_defaults():
    for preset in ("voc", "smoke"):
        parser = build_parser(["train", "--preset", preset])
        sub = next(a for a in parser._actions if a.dest == "command").choices["train"]
        text = " ".join(sub.format_help().split())
        assert f"optimiser steps (preset {preset}: {get_preset(preset).max_steps})" in text
        assert "(default: None)" not in text


def _raise_messages(path: Path) -> list[str]:
    texts = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Raise) and node.exc is not None:
            texts += [c.value for c in ast.walk(node.exc) if isinstance(c, ast.Constant) and isinstance(c.value, str)]
    return texts


def test_error_hints_name_flags_that_exist():
    options = {cmd: {o for a in next(a for a in build_parser([cmd])._actions if a.dest == "command")
                     .choices[cmd]._actions for o in a.option_strings} for cmd in COMMANDS}
    every = set().union(*options.values())
    for path in sorted((REPO / "locbe").rglob("*.py")):
        train_side = path.name == "train.py" or "training" in path.parts
        for text in _raise_messages(path):
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*[a-z]", text):
                assert flag in every, (path.name, flag, text)
                if train_side:  # raised by `locbe train`: its own flags only
                    assert flag in options["train"], (path.name, flag, text)


def test_exit_codes_are_documented():
    readme = (REPO / "docs" / "runs.md").read_text()  # the README's "More" points there
    assert "exit codes: docs/runs.md" in (REPO / "README.md").read_text()
    section = readme[readme.index("## Exit codes"):] + "\n## "
    section = section[:section.index("\n## ", 1)]
    interrupted = [errors.EXIT_INTERRUPTED + s for s in (signal.SIGINT, signal.SIGTERM)]
    for code in (errors.EXIT_OK, errors.EXIT_FAILURE, errors.EXIT_BAD_INPUT, errors.EXIT_ACCEPTANCE,
                 errors.EXIT_DIVERGED, *interrupted):
        assert re.search(rf"^\| `?{code}`? \|", section, re.M), code
