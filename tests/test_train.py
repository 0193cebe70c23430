"""End-to-end training on small generated data: learning, exact resume, NaN stop, torchrun."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from locbe.cli import main as cli
from locbe.config import apply_overrides, get_preset
from locbe.train import NonFiniteLossError, lr_multiplier, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "voc"
    assert cli(["make-synthetic", "--out", str(root), "--num-train", "24", "--num-val", "8", "--seed", "3"]) == 0
    return root


def tiny_config(root: Path, out: Path, **overrides):
    """Micro ViT, 64 px crops, every loss term active from 0-based step 3 on (warm-up n_iter <= 2)."""
    cfg = get_preset("smoke")
    cfg = apply_overrides(cfg, [
        f"data_root={json.dumps(str(root))}", f"out_dir={json.dumps(str(out))}",
        "crop_size=64", "batch_size=4", "max_steps=6", "warmup_steps=2", "num_workers=0",
        "log_every=1", "ckpt_every=100", "val_every=0", "loc_crop_size=32",
    ])
    phases = [dataclasses.replace(p, until=2 if i == 0 else p.until) for i, p in enumerate(cfg.phases)]
    return dataclasses.replace(cfg, phases=phases, **overrides)


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_training_runs_all_terms_and_decreases_loss(synthetic_root, tmp_path):
    cfg = tiny_config(synthetic_root, tmp_path / "run", max_steps=40, lr=1e-3)
    result = train(cfg, progress=False)
    rows = read_log(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert {"cls", "cls_aux", "sc", "seg", "reg", "be", "loc"} <= set(rows[-1])  # every term ran
    first = sum(r["cls"] for r in rows[:8]) / 8
    last = sum(r["cls"] for r in rows[-8:]) / 8
    assert last < 0.9 * first, (first, last)
    assert result.checkpoint.name == "final.pth" and result.checkpoint.exists()
    env = json.loads((tmp_path / "run" / "env.json").read_text())
    assert env["seed"] == cfg.seed and env["torch"] == torch.__version__ and env["config_hash"]


def test_phase_boundary_is_zero_based_in_the_loop(synthetic_root, tmp_path):
    """The loop hands training_step the authors' 0-based n_iter: with the warm-up at n_iter <= 2 the
    first three steps (log rows 1-3) have no seg / reg, the fourth has them. In the warm-up the
    decoder still gets AdamW state (fidelity "authors": all-zero gradients, as their 0.0 * seg)."""
    cfg = tiny_config(synthetic_root, tmp_path / "run", max_steps=4)
    train(cfg, progress=False)
    rows = read_log(tmp_path / "run")
    assert [("seg" in r, "reg" in r) for r in rows] == [(False, False)] * 3 + [(True, True)]
    three = train(dataclasses.replace(cfg, max_steps=3, out_dir=str(tmp_path / "three")), progress=False)
    fixed = train(dataclasses.replace(cfg, max_steps=3, fidelity="fixed", out_dir=str(tmp_path / "fixed")),
                  progress=False)
    authors, fixed = (torch.load(r.checkpoint, weights_only=False) for r in (three, fixed))
    decoder_group = next(g for g in authors["optimizer"]["param_groups"] if g["name"] == "decoder")
    assert all(float(authors["optimizer"]["state"][i]["step"]) == 3 for i in decoder_group["params"])
    assert not any(i in fixed["optimizer"]["state"] for i in decoder_group["params"])  # None: no AdamW state
    # same seed, same initial decoder; "fixed" never touched it, "authors" applied AdamW's decoupled decay
    # alone (a zero gradient gives a zero Adam update): w3 = w0 * prod_t (1 - lr_t * weight_decay)
    shrink, run_cfg = 1.0, dataclasses.replace(cfg, max_steps=3)
    for t in range(3):
        shrink *= 1 - cfg.lr * decoder_group["lr_mult"] * lr_multiplier(t, run_cfg) * cfg.weight_decay
    names = [n for n in authors["model"] if n.startswith("decoder.")]
    assert names
    for n in names:
        torch.testing.assert_close(authors["model"][n], fixed["model"][n] * shrink, rtol=1e-6, atol=0)
        assert not torch.equal(authors["model"][n], fixed["model"][n])


def test_resume_is_bitwise_identical(synthetic_root, tmp_path, monkeypatch):
    straight = train(tiny_config(synthetic_root, tmp_path / "a"), progress=False)
    first_half = train(tiny_config(synthetic_root, tmp_path / "b"), progress=False, max_steps_this_run=3)
    assert first_half.step == 3 and not (tmp_path / "b" / "checkpoints" / "final.pth").exists()
    loads, real_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: loads.append(str(f)) or real_load(f, *a, **k))
    resumed = train(tiny_config(synthetic_root, tmp_path / "b"), progress=False, resume=True)
    monkeypatch.undo()
    # the checkpoint is read once for weights, optimiser and RNG
    assert loads.count(str(tmp_path / "b" / "checkpoints" / "last.pth")) == 1, loads
    assert resumed.step == straight.step == 6
    a = torch.load(straight.checkpoint, weights_only=False)
    b = torch.load(resumed.checkpoint, weights_only=False)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert read_log(tmp_path / "a")[3:] == [
        {**r, "time": a_row["time"]} for r, a_row in zip(read_log(tmp_path / "b")[3:], read_log(tmp_path / "a")[3:])
    ]


def test_refuses_to_overwrite_a_run_without_resume(synthetic_root, tmp_path):
    train(tiny_config(synthetic_root, tmp_path / "run", max_steps=1), progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny_config(synthetic_root, tmp_path / "run", max_steps=1), progress=False)


def test_resume_of_a_finished_run_says_so_and_rewrites_nothing(synthetic_root, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = tiny_config(synthetic_root, out, max_steps=2, use_reg=False)
    train(cfg, progress=False)
    files = [out / "checkpoints" / "final.pth", out / "checkpoints" / "last.pth", out / "config.json",
             out / "env.json", out / "log.jsonl"]
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    capsys.readouterr()
    result = train(cfg, resume=True, progress=False)
    assert (result.step, result.checkpoint) == (2, out / "checkpoints" / "final.pth")
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files} == before
    assert f"--resume: the run in {out} finished at step 2" in capsys.readouterr().err
    with pytest.raises(ValueError, match="max_steps: 2 -> 3"):  # another config is still refused, named
        train(dataclasses.replace(cfg, max_steps=3), resume=True, progress=False)


def test_non_finite_loss_stops_and_keeps_last_good_state(synthetic_root, tmp_path, monkeypatch):
    from locbe.method import losses
    real = losses.cls_loss
    calls = {"n": 0}

    def poisoned(logits, labels):
        calls["n"] += 1
        value = real(logits, labels)
        return value * float("nan") if calls["n"] >= 7 else value  # 2 cls terms per step: step 4 is bad

    monkeypatch.setattr(losses, "cls_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match="step 4"):
        train(tiny_config(synthetic_root, tmp_path / "run"), progress=False)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pth", weights_only=False)
    assert ckpt["step"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_missing_data_root_is_a_clear_error(tmp_path):
    cfg = tiny_config(tmp_path / "nowhere", tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        train(cfg, progress=False)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_torchrun_two_processes_match_single_process_gradients(synthetic_root, tmp_path):
    """2-process gloo: (a) with per-sample terms only (cls, cls_aux, be at step 1) the averaged gradient
    equals the single-process gradient of the same global batch; (b) with every term (batch-coupled
    sc/seg/reg/loc computed per rank, as in the authors' multi-GPU runs) it equals the mean of the
    single-process gradients of each rank's half, each with that rank's RNG."""
    from locbe.data import build_dataset
    from locbe.method.par import PAR
    from locbe.method.regloss import RegularizedLoss
    from locbe.method.step import step_generator, training_step
    from locbe.models import build_model

    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = ["torchrun", "--nproc_per_node=2", "--master_port=29533", str(REPO / "tests" / "ddp_worker.py"),
           str(synthetic_root), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    cfg = tiny_config(synthetic_root, tmp_path / "ref", batch_size=2)
    ds = build_dataset("synthetic", str(synthetic_root), "train_aug", train=True, crop_size=cfg.crop_size,
                       num_classes=21, seed=cfg.seed)
    items = [ds[0], ds[1]]
    torch.manual_seed(0)
    net = build_model(cfg.backbone, num_classes=21)
    net.load_state_dict(torch.load(out / "init.pth", weights_only=True))
    par, reg = PAR(), RegularizedLoss()

    def grads(batch_items, step, rank):
        batch = torch.utils.data.default_collate(batch_items)
        net.zero_grad(set_to_none=True)
        training_step(net, batch, step, cfg, par=par, reg_loss=reg,
                      generator=step_generator(cfg.seed, step, rank)).total.backward()
        return {n: None if p.grad is None else p.grad.clone() for n, p in net.named_parameters()}

    ddp = torch.load(out / "grads.pth", weights_only=True)
    # (a) step 1: cls + cls_aux + be (sc off for this check: it is batch-coupled)
    cfg = dataclasses.replace(cfg, use_sc=False)
    ref = grads(items, 1, 0)
    # (b) step 3: every term
    cfg = dataclasses.replace(cfg, use_sc=True)
    halves = [grads([items[r]], 3, r) for r in range(2)]
    for key in ("a", "b"):  # a None gradient stays None under torchrun (AdamW must skip it there too)
        assert {n for n, g in ddp[key].items() if g is None} == {n for n, g in ref.items() if g is None}
    assert {n for n, g in ref.items() if g is None} == {"encoder.pos_embed", "encoder.head.weight",
                                                        "encoder.head.bias", "attn_proj.weight", "attn_proj.bias"}
    ref = {n: g for n, g in ref.items() if g is not None}
    for name in ref:
        # float32 sums in another order (batch of 2 vs 2 x batch of 1, then all-reduce): ~1e-6 relative
        torch.testing.assert_close(ddp["a"][name], ref[name], rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(ddp["b"][name], (halves[0][name] + halves[1][name]) / 2, rtol=1e-4, atol=1e-6,
                                   msg=name)
    assert (out / "run" / "checkpoints" / "final.pth").exists()  # `locbe train` under torchrun completed
    # the same run in one process leaves the optimizer in the same state: the same parameters have
    # AdamW state (decoder included: all-zero gradients in the warm-up), with the same step counts
    single = train(tiny_config(synthetic_root, tmp_path / "single", batch_size=2, max_steps=2), progress=False)
    states = [torch.load(path, weights_only=False)["optimizer"]
              for path in (out / "run" / "checkpoints" / "final.pth", single.checkpoint)]
    steps = [{k: float(v["step"]) for k, v in st["state"].items()} for st in states]
    assert steps[0] == steps[1] and set(steps[0].values()) == {2.0}
    assert [g["params"] for g in states[0]["param_groups"]] == [g["params"] for g in states[1]["param_groups"]]
    n_params = sum(len(g["params"]) for g in states[0]["param_groups"])
    assert len(steps[0]) == n_params - 2  # all but the never-run encoder.head weight and bias got a gradient
