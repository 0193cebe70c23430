"""Checkpoint files as users hand them to `locbe eval` (issue 17 points 7 and 8): files that are not checkpoints,
ToCo's layout on the command line, and the authors' COCO checkpoint without --num-classes."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from locbe.cli import main as cli
from locbe.errors import CheckpointError
from locbe.models import build_model, load_checkpoint
from locbe.models.checkpoint import read_checkpoint

MICRO = "vit_micro_patch16"


def _authors_file(path, num_classes: int, seed: int = 0, drop=(), extra=None):
    """A plain state dict with `module.` keys and no config, as the authors' and ToCo's scripts save one."""
    torch.manual_seed(seed)
    model = build_model(MICRO, num_classes=num_classes)
    state = {"module." + k: v for k, v in model.state_dict().items() if k not in drop}
    state.update(extra or {})
    torch.save(state, path)
    return model


def _zip_of_text() -> bytes:
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("notes.txt", "not weights")
    return buffer.getvalue()


@pytest.mark.parametrize("content", [os.urandom(4096), b"", b"hello\n", _zip_of_text()])
def test_a_file_that_is_not_a_checkpoint_gets_one_plain_line(tmp_path, content):
    """Random bytes, an empty file, text, a zip archive that torch did not write."""
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"{path} is not a checkpoint: neither a torch.save file nor safetensors")
    assert "weights_only" not in message and "\n" not in message


def test_a_numpy_file_and_a_pickled_object_are_named_as_such(tmp_path):
    np.save(tmp_path / "array.npy", np.zeros(3))
    with pytest.raises(CheckpointError, match="array.npy is not a checkpoint"):
        read_checkpoint(tmp_path / "array.npy")
    import argparse

    torch.save({"args": argparse.Namespace(lr=1), "model": {}}, tmp_path / "with_args.pth")
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(tmp_path / "with_args.pth")
    assert "holds a Python object (argparse.Namespace) besides tensors" in str(info.value)
    assert "weights_only=False" not in str(info.value)


def test_a_truncated_checkpoint_is_called_damaged(tmp_path):
    torch.save({"w": torch.zeros(10_000)}, tmp_path / "full.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "full.pth").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"cut.pth is a damaged torch checkpoint \(.*\): copy it again$"):
        read_checkpoint(tmp_path / "cut.pth")


def test_safetensors_and_legacy_torch_files_still_load(tmp_path):
    from safetensors.torch import save_file

    weights = {"w": torch.arange(6.0).reshape(2, 3)}
    save_file(weights, tmp_path / "w.safetensors")
    torch.save(weights, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    for name in ("w.safetensors", "legacy.pth"):
        assert torch.equal(read_checkpoint(tmp_path / name)["w"], weights["w"]), name


def test_eval_cli_on_a_random_bytes_file_exits_2_with_one_line(tmp_path, capsys):
    (tmp_path / "model.pth").write_bytes(os.urandom(1024))
    code = cli(["eval", "--checkpoint", str(tmp_path / "model.pth"), "--data-root", str(tmp_path),
                "--backbone", MICRO, "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"locbe eval: {tmp_path / 'model.pth'} is not a checkpoint")


def _coco_layout(root):
    assert cli(["make-layout", "--dataset", "coco", "--out", str(root), "--num-train", "1", "--num-val", "2"]) == 0
    return root


def test_eval_coco_takes_81_classes_from_the_dataset(tmp_path, capsys):
    """The authors' COCO checkpoint carries no config; `--dataset coco` says 81 classes, no --num-classes needed."""
    root = _coco_layout(tmp_path / "coco")
    _authors_file(tmp_path / "coco_authors.pth", num_classes=81)
    code = cli(["eval", "--checkpoint", str(tmp_path / "coco_authors.pth"), "--dataset", "coco",
                "--data-root", str(root), "--backbone", MICRO, "--device", "cpu", "--max-images", "1",
                "--no-progress", "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "out" / "metrics_val.json").read_text())
    assert len(metrics["seg"]["iou"]) == 81


def test_eval_cli_loads_a_toco_checkpoint_and_names_its_training_only_heads(tmp_path, capsys):
    root = _coco_layout(tmp_path / "coco")
    heads = {f"module.{head}.{k}": torch.zeros(shape) for head in ("proj_head", "proj_head_t")
             for k, shape in (("mlp.0.weight", (64, 96)), ("mlp.0.bias", (64,)), ("mlp.2.weight", (64, 64)),
                              ("mlp.2.bias", (64,)), ("mlp.4.weight", (16, 64)), ("mlp.4.bias", (16,)),
                              ("last_layer.weight_g", (32, 1)), ("last_layer.weight_v", (32, 16)))}
    src = _authors_file(tmp_path / "toco.pth", num_classes=81, drop=("attn_proj.weight", "attn_proj.bias"),
                        extra=heads)
    code = cli(["eval", "--checkpoint", str(tmp_path / "toco.pth"), "--dataset", "coco", "--data-root", str(root),
                "--backbone", MICRO, "--device", "cpu", "--max-images", "1", "--no-progress",
                "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 0, err
    assert (f"{tmp_path / 'toco.pth'}: left out 16 tensors of ToCo's training-only heads proj_head and "
            "proj_head_t") in err
    dst = build_model(MICRO, num_classes=81)
    load_checkpoint(dst, tmp_path / "toco.pth")
    assert torch.equal(dst.decoder.conv8.weight, src.decoder.conv8.weight)
