"""The command line as a new user meets it (issue 27 item 4): `locbe --version`, `python -m locbe`, and `locbe eval`
saying what it wrote and when it replaced an earlier metrics file."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import locbe
from locbe.cli import main as cli

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _declared_version() -> str:
    """pyproject.toml's [project] version, read as text (tomllib is Python 3.11+; locbe supports 3.10)."""
    text = (REPO / "pyproject.toml").read_text()
    project = text[text.index("[project]"):]
    return re.search(r'^version\s*=\s*"([^"]+)"', project, re.M).group(1)


def test_version_prints_the_declared_version_and_exits_0(capsys):
    with pytest.raises(SystemExit) as info:
        cli(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"locbe {_declared_version()}\n"
    assert locbe.__version__ == _declared_version()


def test_python_dash_m_locbe_is_the_console_script():
    version = subprocess.run([sys.executable, "-m", "locbe", "--version"], cwd=REPO, env=_env(),
                             capture_output=True, text=True, timeout=120)
    assert version.returncode == 0, version.stderr[-2000:]
    assert version.stdout == f"locbe {_declared_version()}\n"
    usage = subprocess.run([sys.executable, "-m", "locbe", "eval", "--help"], cwd=REPO, env=_env(),
                           capture_output=True, text=True, timeout=120)
    assert usage.returncode == 0 and usage.stdout.startswith("usage: locbe eval"), usage.stderr[-2000:]
    wrong = subprocess.run([sys.executable, "-m", "locbe", "no-such-command"], cwd=REPO, env=_env(),
                           capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 2 and "invalid choice: 'no-such-command'" in wrong.stderr


@pytest.fixture(scope="module")
def synthetic_and_checkpoint(tmp_path_factory):
    from locbe.models import build_model

    tmp = tmp_path_factory.mktemp("cli_eval")
    root = tmp / "voc"
    assert cli(["make-synthetic", "--out", str(root), "--num-train", "1", "--num-val", "2", "--seed", "3"]) == 0
    torch.manual_seed(0)
    net = build_model("vit_micro_patch16", num_classes=21)
    ckpt = tmp / "ck.pth"
    torch.save({"model": net.state_dict(), "config": {"backbone": "vit_micro_patch16", "num_classes": 21}}, ckpt)
    return root, ckpt


def _eval(root, ckpt, out, *extra) -> list[str]:
    return ["eval", "--checkpoint", str(ckpt), "--dataset", "synthetic", "--data-root", str(root),
            "--device", "cpu", "--no-progress", "--out", str(out), *extra]


def test_eval_says_what_it_wrote_and_when_it_overwrote_metrics(synthetic_and_checkpoint, tmp_path, capsys):
    root, ckpt = synthetic_and_checkpoint
    metrics = tmp_path / "out" / "metrics_val.json"
    assert cli(_eval(root, ckpt, tmp_path / "out")) == 0
    first = capsys.readouterr().out.splitlines()
    assert [line for line in first if "metrics" in line and "written" in line] == [f"metrics written to {metrics}"]
    assert not any("overwrote" in line for line in first)
    assert json.loads(metrics.read_text())["num_images"] == 2

    metrics.write_text('{"an": "earlier evaluation"}')
    assert cli(_eval(root, ckpt, tmp_path / "out", "--max-images", "1",
                     "--save-predictions", str(tmp_path / "pred"))) == 0
    second = capsys.readouterr().out.splitlines()
    said = [line for line in second if "written to" in line]
    assert said == [f"predictions (palette PNGs, 1 image) written to {tmp_path / 'pred'}",
                    f"metrics written to {metrics} (overwrote the metrics_val.json that was there)"]
    assert json.loads(metrics.read_text())["num_images"] == 1  # the earlier file is replaced, as said
    assert len(list((tmp_path / "pred").glob("*.png"))) == 1

    # another split is another file: nothing overwritten
    assert cli(_eval(root, ckpt, tmp_path / "out", "--split", "train")) == 0
    third = capsys.readouterr().out.splitlines()
    assert f"metrics written to {tmp_path / 'out' / 'metrics_train.json'}" in third
    assert not any("overwrote" in line for line in third)
