"""`locbe eval` sharded over 2 processes (torchrun, gloo on CPU) gives the single process's metrics to the
last digit (issue 12): every rank evaluates its chunks of the list, the confusion matrices are summed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict:
    # one intra-op thread in every process: the single run and the ranks do the same arithmetic
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from locbe.data.synthetic import SyntheticConfig, make_synthetic
    from locbe.models import build_model

    tmp = tmp_path_factory.mktemp("sharded")
    root = make_synthetic(tmp / "voc", SyntheticConfig(seed=11, num_train=1, num_val=7, min_size=40, max_size=56))
    torch.manual_seed(0)
    net = build_model("vit_micro_patch16", num_classes=21)
    ckpt = tmp / "ck.pth"
    torch.save({"model": net.state_dict(), "config": {"backbone": "vit_micro_patch16", "num_classes": 21}}, ckpt)
    return root, ckpt, tmp


def _eval_args(root, ckpt, out) -> list[str]:
    return ["eval", "--checkpoint", str(ckpt), "--dataset", "synthetic", "--data-root", str(root), "--split", "val",
            "--multi-scale", "--crf", "--cam", "--device", "cpu", "--batch-size", "2", "--workers", "1",
            "--out", str(out), "--no-progress"]


@pytest.mark.slow
def test_two_process_evaluation_equals_single_process(setup):
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not on PATH")
    root, ckpt, tmp = setup
    single = subprocess.run([sys.executable, "-m", "locbe.cli", *_eval_args(root, ckpt, tmp / "single")], cwd=REPO,
                            env=_env(), capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    sharded = subprocess.run(["torchrun", "--standalone", "--nproc_per_node=2", "-m", "locbe.cli",
                              *_eval_args(root, ckpt, tmp / "sharded")], cwd=REPO, env=_env(), capture_output=True,
                             text=True, timeout=600)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    a = json.loads((tmp / "single" / "metrics_val.json").read_text())
    b = json.loads((tmp / "sharded" / "metrics_val.json").read_text())
    assert a["world_size"] == 1 and b["world_size"] == 2
    assert a["num_images"] == b["num_images"] == 7  # 4 chunks of 2: rank 0 takes 4 images, rank 1 three
    for key in ("seg", "seg_crf", "cam", "pseudo_label_par"):
        assert a[key]["num_pixels"] == b[key]["num_pixels"] > 0, key
        assert json.dumps(a[key]) == json.dumps(b[key]), key  # every digit, NaN classes included
    # the per-image records are summed into the metrics and removed
    assert not list((tmp / "sharded").glob(".eval-*"))


def test_chunks_are_dealt_round_robin_and_cover_the_list():
    from locbe.eval.sharded import chunks, crf_workers, my_chunks
    from locbe.runtime.ranks import RankInfo

    assert chunks(7, 2) == [[0, 1], [2, 3], [4, 5], [6]]
    r0, r1 = my_chunks(7, 2, RankInfo(0, 2)), my_chunks(7, 2, RankInfo(1, 2))
    assert r0 == [[0, 1], [4, 5]] and r1 == [[2, 3], [6]]
    for n, b, w in ((1, 1, 3), (10, 3, 4), (5, 8, 2)):
        seen = sorted(i for r in range(w) for c in my_chunks(n, b, RankInfo(r, w)) for i in c)
        assert seen == list(range(n))
    assert crf_workers(3, RankInfo()) == 3 and crf_workers(None, RankInfo(0, 8, local_world_size=8)) >= 1
