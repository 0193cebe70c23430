"""The fast training step computes the plain step's maths (issue 6): same losses, same gradients.

The fast path reuses the main forward as the un-flipped scale-1 CAM view, computes only the pooled
logits of the erased BE view, batches equal-shaped LOC crops into one encoder pass, and uses the
low-memory PAR. Per-sample computations are unchanged; only float summation order differs (GEMMs
over differently composed batches, PAR accumulation order), so float32 results agree to about 1e-6
relative; we allow 1e-4 on the loss terms and 1e-3 relative L2 on every gradient.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from locbe.cli import main as cli
from locbe.config import apply_overrides, get_preset
from locbe.data import build_dataset
from locbe.method.par import PAR
from locbe.method.regloss import RegularizedLoss
from locbe.method.step import step_generator, training_step
from locbe.models import build_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic") / "voc"
    assert cli(["make-synthetic", "--out", str(root), "--num-train", "8", "--num-val", "2", "--seed", "5"]) == 0
    cfg = apply_overrides(get_preset("smoke"), [f"data_root={json.dumps(str(root))}", "crop_size=64",
                                                "batch_size=4", "loc_crop_size=32"])
    # every term active at step 10: move the seg phase start to step 2
    cfg = dataclasses.replace(cfg, phases=[dataclasses.replace(p, until=2 if i == 0 else p.until)
                                           for i, p in enumerate(cfg.phases)])
    ds = build_dataset(cfg.dataset, cfg.data_root, cfg.train_split, train=True, crop_size=cfg.crop_size,
                       num_classes=cfg.num_classes, seed=cfg.seed)
    batch = torch.utils.data.default_collate([ds[i] for i in range(4)])
    return cfg, batch


def run_step(cfg, batch, fast: bool, step: int):
    torch.manual_seed(0)
    model = build_model(cfg.backbone, num_classes=cfg.num_classes)
    out = training_step(model, batch, step, cfg, par=PAR(low_memory=fast), reg_loss=RegularizedLoss(),
                        generator=step_generator(cfg.seed, step), fast=fast)
    out.total.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("step", [1, 10])
def test_fast_step_equals_plain_step(setup, step):
    cfg, batch = setup
    plain, g_plain = run_step(cfg, batch, fast=False, step=step)
    fast, g_fast = run_step(cfg, batch, fast=True, step=step)
    assert set(plain.terms) == set(fast.terms)
    if step == 10:
        assert {"seg", "reg", "be", "loc", "sc"} <= set(plain.terms)
    for k in plain.terms:
        assert fast.terms[k].item() == pytest.approx(plain.terms[k].item(), rel=1e-4, abs=1e-7), k
    assert fast.total.item() == pytest.approx(plain.total.item(), rel=1e-4)
    assert set(g_plain) == set(g_fast)
    for name, g in g_plain.items():
        err = float((g_fast[name] - g).norm() / g.norm().clamp_min(1e-12))
        assert err < 1e-3 or float((g_fast[name] - g).abs().max()) < 1e-9, (name, err)


def test_fast_step_encodes_fewer_images(setup, monkeypatch):
    """The speed-up is real structure, not noise: count what each path sends through the encoder."""
    cfg, batch = setup
    b = batch["image"].shape[0]
    model = build_model(cfg.backbone, num_classes=cfg.num_classes)
    calls = []
    original = model.encode
    monkeypatch.setattr(model, "encode", lambda x, *a, **k: calls.append(x.shape[0]) or original(x, *a, **k))
    decoder_calls = []
    model.decoder.register_forward_hook(lambda *a: decoder_calls.append(1))
    counts, images, decoders = {}, {}, {}
    for fast in (False, True):
        calls.clear()
        decoder_calls.clear()
        training_step(model, batch, 10, cfg, par=PAR(low_memory=fast), reg_loss=RegularizedLoss(),
                      generator=step_generator(cfg.seed, 10), fast=fast)
        counts[fast], images[fast], decoders[fast] = len(calls), sum(calls), len(decoder_calls)
    # plain: each CAM scale on [img, flip], main, erased, one pass per LOC crop
    assert counts[False] == len(cfg.cam_scales) + 2 + cfg.loc_num_crops
    assert images[False] == 2 * b * len(cfg.cam_scales) + 2 * b + cfg.loc_num_crops * b
    # fast: the main forward is the un-flipped scale-1 CAM view (b images fewer); equal-shaped crops merge
    assert images[True] == images[False] - b
    assert counts[True] <= counts[False]
    # the decoder runs for the main view only (plain: main and erased view)
    assert (decoders[False], decoders[True]) == (2, 1)


def test_cam_bf16_is_plumbed_through_the_step(setup):
    """cam_bf16 changes only the no-grad CAM views: the CAMs differ from the float32 ones (the option is
    applied) but stay float32; their accuracy is checked in tests/test_cam_par_losses.py."""
    cfg, batch = setup
    outs = {}
    for flag in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg.backbone, num_classes=cfg.num_classes)
        outs[flag] = training_step(model, batch, 10, dataclasses.replace(cfg, cam_bf16=flag), par=PAR(),
                                   reg_loss=RegularizedLoss(), generator=step_generator(cfg.seed, 10), fast=True)
    for key in ("cam", "aux_cam"):
        a, b = outs[False].extras[key], outs[True].extras[key]
        assert b.dtype == torch.float32 and not torch.equal(a, b)
    assert outs[True].terms["cls"] == outs[False].terms["cls"]  # the main forward is untouched


@pytest.mark.parametrize("fast", [False, True])
def test_timings_breakdown_names_every_component(setup, fast):
    cfg, batch = setup
    model = build_model(cfg.backbone, num_classes=cfg.num_classes)
    timings: dict[str, float] = {}
    training_step(model, batch, 10, cfg, par=PAR(low_memory=fast), reg_loss=RegularizedLoss(),
                  generator=step_generator(cfg.seed, 10), fast=fast, timings=timings)
    assert set(timings) == {"cam_forwards", "main_forward", "par", "reg_loss", "be", "loc_crops"}
    assert all(v > 0 for v in timings.values()), timings
