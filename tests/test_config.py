"""The loss schedule and lr schedule against method.md, written out by hand."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from locbe.config import TrainConfig, apply_overrides, get_preset
from locbe.train import lr_multiplier

# method.md "Total": the weight of every term, per step, written out independently of config.py
VOC_EARLY = {"cls": 1.0, "cls_aux": 1.0, "be": 1.0, "sc": 0.3}
VOC_LATE = {"cls": 1.0, "cls_aux": 1.0, "sc": 0.3, "seg": 0.1, "reg": 0.05, "be": 1.0, "loc": 1.0}


# 0-based steps, as the authors' `for n_iter in range(max_iters)` with `n_iter <= 2000`: 2001 warm-up steps
@pytest.mark.parametrize("step,expected", [(0, VOC_EARLY), (1999, VOC_EARLY), (2000, VOC_EARLY), (2001, VOC_LATE),
                                           (19999, VOC_LATE)])
def test_voc_schedule(step, expected):
    assert get_preset("voc").loss_weights(step) == expected


def test_coco_schedule():
    cfg = get_preset("coco")
    assert cfg.loss_weights(0) == {"cls": 1.0, "cls_aux": 1.0}
    assert cfg.loss_weights(8000) == {"cls": 1.0, "cls_aux": 1.0}
    assert cfg.loss_weights(8001) == {"cls": 1.0, "cls_aux": 1.0, "seg": 0.1, "reg": 0.05}
    assert cfg.phase_at(12000).label_source == "aux"
    assert cfg.loss_weights(12001) == {"cls": 1.0, "cls_aux": 1.0, "seg": 0.2, "reg": 0.05, "be": 1.0,
                                       "loc": 1.0, "sc": 0.3}
    assert cfg.phase_at(12001).label_source == "cam"
    assert (cfg.crop_size, cfg.num_classes, cfg.high, cfg.bkg_thre, cfg.max_steps) == (224, 81, 0.65, 0.45, 80000)


def test_toco_baseline_is_locbe_without_loc_and_be():
    toco, full = get_preset("toco-voc"), get_preset("voc")
    for step in (1, 5000):
        expected = {k: v for k, v in full.loss_weights(step).items() if k not in ("loc", "be")}
        assert toco.loss_weights(step) == expected


def _lr_reference(n, warmup, max_steps, ratio=1e-6, power=0.9):
    if n < warmup:
        # linear from `ratio` at n=0 to 1 at n=warmup
        return ratio + (1 - ratio) * n / warmup
    return (1 - n / max_steps) ** power


@given(st.integers(0, 20000))
def test_lr_schedule_matches_warmup_poly(n):
    cfg = get_preset("voc")
    assert math.isclose(lr_multiplier(n, cfg), _lr_reference(n, 1500, 20000), rel_tol=1e-9, abs_tol=1e-12)


def test_optimizer_hyperparameters_voc():
    cfg = get_preset("voc")
    assert (cfg.lr, cfg.head_lr_mult, cfg.weight_decay, cfg.betas, cfg.eps) == (6e-5, 10.0, 0.01, (0.9, 0.999), 1e-8)
    assert (cfg.warmup_steps, cfg.warmup_ratio, cfg.max_steps, cfg.batch_size, cfg.seed) == (1500, 1e-6, 20000, 2, 0)
    assert cfg.cam_scales == (1.0, 0.5, 1.5) and (cfg.low, cfg.high, cfg.bkg_thre) == (0.25, 0.7, 0.5)


def test_overrides_and_roundtrip():
    cfg = apply_overrides(get_preset("smoke"), ["lr=0.001", "use_loc=false", "cam_scales=[1.0]"])
    assert cfg.lr == 0.001 and cfg.use_loc is False and cfg.cam_scales == (1.0,)
    assert "loc" not in cfg.loss_weights(10**6)
    again = TrainConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.config_hash() == cfg.config_hash()


def test_bad_config_input():
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("vocc")
    with pytest.raises(ValueError, match="unknown config key 'lrr'"):
        apply_overrides(get_preset("voc"), ["lrr=1"])
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(get_preset("voc"), ["lr"])
    with pytest.raises(ValueError, match="low < high"):
        apply_overrides(get_preset("voc"), ["low=0.8"])


def test_config_hash_ignores_paths_but_not_maths():
    a = get_preset("voc")
    assert apply_overrides(a, ["out_dir=elsewhere"]).config_hash() == a.config_hash()
    assert apply_overrides(a, ["lr=1e-4"]).config_hash() != a.config_hash()


def test_photometric_augmentation_is_off_only_in_the_smoke_presets():
    """The paper's presets keep the authors' colour jitter / grayscale / blur; the smoke presets turn them off
    (config.py `_smoke`)."""
    for name in ("voc", "coco", "toco-voc", "toco-coco"):
        assert get_preset(name).photometric_aug is True
    for name in ("smoke", "smoke-toco"):
        assert get_preset(name).photometric_aug is False
    assert TrainConfig().photometric_aug is True
    on = get_preset("smoke")
    assert apply_overrides(on, ["photometric_aug=true"]).config_hash() != on.config_hash()


def test_photometric_switch_reaches_the_train_view(tmp_path):
    """With the switch off the train view is exactly the geometric pipeline (AugmentConfig(photometric=False),
    same draws); with it on the colours change."""
    import json

    import numpy as np
    from PIL import Image

    from locbe.data.synthetic import SyntheticConfig, make_synthetic
    from locbe.data.transforms import AugmentConfig, augment
    from locbe.training.sharding import build_train_dataset

    root = make_synthetic(tmp_path / "syn", SyntheticConfig(num_train=2, num_val=1))
    base = [f"data_root={json.dumps(str(root))}", "crop_size=64"]
    off = build_train_dataset(apply_overrides(get_preset("smoke"), base))
    on = build_train_dataset(apply_overrides(get_preset("smoke"), [*base, "photometric_aug=true"]))
    assert off.aug == AugmentConfig(crop_size=64, photometric=False)
    assert on.aug == AugmentConfig(crop_size=64, photometric=True)
    _, image, mask = off.load(0)
    geometric = AugmentConfig(crop_size=64, photometric=False)
    expected, _, _ = augment(image, Image.fromarray(mask.astype(np.uint8)), geometric,
                             np.random.default_rng([off.seed, off.epoch, 0]))
    np.testing.assert_array_equal(off[0]["image"].numpy(), expected.transpose(2, 0, 1))
    assert not np.allclose(off[0]["image"].numpy(), on[0]["image"].numpy())
