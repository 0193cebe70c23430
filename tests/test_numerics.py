"""cpu_numerics="pinned" (locbe/runtime/numerics.py, issue 25): the smoke presets give the same floats whatever
the caller's thread count, because the `locbe` command pins the thread count and the AVX2 code paths of ATen,
MKL and oneDNN before torch loads, and every run records what was in force in env.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from synthetic_sets import make_synthetic_set

from locbe.cli import numerics_from_argv
from locbe.config import get_preset
from locbe.runtime import numerics

REPO = Path(__file__).resolve().parents[1]


def test_pinning_sets_every_variable_and_says_which_user_setting_it_overrode(capsys):
    environ = {"OMP_NUM_THREADS": "8", "MKL_CBWR": "AVX2", "PATH": "/bin"}
    changed = numerics.apply_pinned_numerics(environ)
    assert {k: environ[k] for k in numerics.PINNED_ENV} == numerics.PINNED_ENV
    assert environ["PATH"] == "/bin"
    # MKL_CBWR was already right: not a change; the unset ones are changes from ""
    assert changed == {"OMP_NUM_THREADS": "8", "ATEN_CPU_CAPABILITY": "", "ONEDNN_MAX_CPU_ISA": "",
                       "MKL_NUM_THREADS": ""}
    numerics.say_overrides(changed)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "OMP_NUM_THREADS=8 -> 1" in err[0] and "cpu_numerics=native" in err[0]
    assert numerics.apply_pinned_numerics(environ) == {}  # a second time changes nothing


@pytest.mark.parametrize("argv, expected", [
    (["reproduce"], "pinned"),  # reproduce's default preset is smoke
    (["reproduce", "--preset", "smoke", "--seeds", "3"], "pinned"),
    (["reproduce", "--preset", "smoke-toco"], "pinned"),
    (["reproduce", "--preset", "voc"], "native"),
    (["train"], "native"),  # train's default preset is voc
    (["train", "--preset", "smoke", "--out", "x"], "pinned"),
    (["train", "--preset", "smoke", "--set", "cpu_numerics=native"], "native"),
    (["train", "--preset", "voc", "--set", "cpu_numerics=pinned"], "pinned"),
    (["eval", "--checkpoint", "x.pth"], "native"),
    (["compare", "a", "b"], "native"),
])
def test_the_command_line_decides_before_torch_loads(argv, expected):
    assert numerics_from_argv(argv[0], argv[1:]) == expected


def test_the_smoke_presets_are_pinned_and_the_paper_presets_native():
    assert get_preset("smoke").cpu_numerics == "pinned" and get_preset("smoke-toco").cpu_numerics == "pinned"
    assert get_preset("voc").cpu_numerics == "native" and get_preset("coco").cpu_numerics == "native"


def test_pinned_threads_are_set_for_the_block_and_restored():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with numerics.pinned_threads("pinned"):
            assert torch.get_num_threads() == numerics.PINNED_THREADS
        assert torch.get_num_threads() == 2
        with numerics.pinned_threads("native"):
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_record_says_when_pinning_is_not_in_force(monkeypatch):
    for name, value in numerics.PINNED_ENV.items():
        monkeypatch.setenv(name, value)
    with numerics.pinned_threads("pinned"):
        record = numerics.numerics_record("pinned")
    expected_ok = torch.backends.cpu.get_cpu_capability() == numerics.EXPECTED_CAPABILITY
    assert record["pinned_ok"] is expected_ok and record["pinned_missing"] == []
    assert record["env"]["MKL_CBWR"] == "AVX2" and record["intra_op_threads"] == 1
    assert record["cpu"] != "unknown" and record["torch_config"].get("parallel_backend")
    monkeypatch.delenv("MKL_CBWR")
    with numerics.pinned_threads("pinned"):
        record = numerics.numerics_record("pinned")
    assert record["pinned_ok"] is False and record["pinned_missing"] == ["MKL_CBWR"]
    line = numerics.pinned_warning(record)
    assert "MKL_CBWR" in line and "`locbe` command" in line and "\n" not in line
    assert numerics.pinned_warning(numerics.numerics_record("native")) is None


# ----------------------------------------------------------------------------- real runs through the command
@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    return make_synthetic_set(tmp_path_factory.mktemp("synthetic"), 16, 4, 5)


def _short_run(root: Path, out: Path, threads: int, *extra: str) -> tuple[list[dict], dict, dict]:
    """A short smoke training through `locbe train` with the caller's OMP_NUM_THREADS = ``threads`` and none of
    the pinned variables in its environment: (log rows, final weights, env.json)."""
    env = {k: v for k, v in os.environ.items() if k not in numerics.PINNED_ENV}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, "-m", "locbe.cli", "train", "--preset", "smoke", "--device", "cpu",
                           "--data-root", str(root), "--out", str(out), "--batch-size", "4", "--num-workers", "0",
                           "--no-progress", "--no-check-data", "--set", "max_steps=6", "--set", "warmup_steps=2",
                           "--set", "log_every=1", "--set", "ckpt_every=6", "--set", "val_every=0",
                           "--set", "crop_size=64", "--set", "loc_crop_size=32", *extra],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    weights = torch.load(out / "checkpoints" / "final.pth", map_location="cpu", weights_only=True)["model"]
    return rows, weights, json.loads((out / "env.json").read_text())


def _losses(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("time",)} for r in rows]


@pytest.mark.slow
def test_a_pinned_smoke_run_gives_the_same_floats_with_one_or_two_caller_threads(synthetic_root, tmp_path):
    one = _short_run(synthetic_root, tmp_path / "one", 1)
    two = _short_run(synthetic_root, tmp_path / "two", 2)
    for rows, _, env in (one, two):
        rec = env["numerics"]
        assert rec["cpu_numerics"] == "pinned" and rec["intra_op_threads"] == numerics.PINNED_THREADS
        assert {k: rec["env"][k] for k in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")} == {
            k: numerics.PINNED_ENV[k] for k in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")}
        assert rec["pinned_ok"] is (rec["cpu_capability"] == "AVX2")
        assert env["data"]["hashed"] == "content" and env["data"]["files"] > 32
        assert len(rows) == 6
    assert _losses(one[0]) == _losses(two[0])
    assert one[1].keys() == two[1].keys()
    different = [k for k in one[1] if not torch.equal(one[1][k], two[1][k])]
    assert different == [], f"weights differ bit for bit in {different[:5]}"
    assert one[2]["data"] == two[2]["data"]


def test_the_dataset_digest_follows_every_byte_and_name(tmp_path):
    from locbe.data.digest import dataset_digest

    root = tmp_path / "data"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "JPEGImages" / "a.jpg").write_bytes(b"abc")
    (root / "list.txt").write_text("a\n")
    first = dataset_digest(root)
    assert first["files"] == 2 and first["bytes"] == 5 and first["hashed"] == "content"
    assert dataset_digest(root) == first  # deterministic
    (root / "JPEGImages" / "a.jpg").write_bytes(b"abd")  # same size, one byte changed
    assert dataset_digest(root)["sha256"] != first["sha256"]
    # a large folder is hashed by names and sizes: the same byte change is not seen, a renamed file is
    by_names = dataset_digest(root, content_limit=1)
    assert by_names["hashed"] == "names and sizes"
    (root / "JPEGImages" / "a.jpg").write_bytes(b"abc")
    assert dataset_digest(root, content_limit=1)["sha256"] == by_names["sha256"]
    (root / "JPEGImages" / "a.jpg").rename(root / "JPEGImages" / "b.jpg")
    assert dataset_digest(root, content_limit=1)["sha256"] != by_names["sha256"]
    assert dataset_digest(tmp_path / "missing") is None and dataset_digest(None) is None
