"""`--set key=value` is parsed and checked for every config field (issue 17 point 3).

The tables below say, per field and from what the field means, which values it takes and which it does not;
they are written out by hand, not read from config.py, and a test fails when a field is added without an entry.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from locbe.config import TrainConfig, apply_overrides, get_preset
from locbe.errors import EXIT_BAD_INPUT, ConfigError, LocbeError

REPO = Path(__file__).resolve().parents[1]
BASE = "smoke"  # vit_micro_patch16 (6 blocks), crop 128, cam_scales (1.0, 0.5, 1.5), low 0.25, high 0.7

# text that stays text: not JSON, not None (those would be read as numbers, booleans, null)
words = st.from_regex(r"[A-Za-z_][A-Za-z0-9_./-]{0,15}", fullmatch=True).filter(
    lambda s: s not in ("true", "false", "null", "None", "NaN", "Infinity"))
paths = st.builds(lambda parts: "/".join(parts), st.lists(words, min_size=1, max_size=3))
finite = dict(allow_nan=False, allow_infinity=False)
terms = ("cls", "cls_aux", "sc", "seg", "reg", "be", "loc")


@st.composite
def phase_lists(draw):
    untils = sorted(draw(st.sets(st.integers(0, 10**6), min_size=0, max_size=3)))
    weights = st.dictionaries(st.sampled_from(terms), st.floats(0, 10, **finite), max_size=7)
    sources = st.sampled_from(["cam", "aux"])
    return [{"until": u, "weights": draw(weights), "label_source": draw(sources)} for u in [*untils, None]]


# field -> (kind, valid values against the smoke preset, each alone)
FIELDS = {
    "preset": ("str", words),
    "dataset": ("choice", st.sampled_from(["voc", "coco", "synthetic"])),
    "data_root": ("optional str", st.none() | paths),
    "train_split": ("str", words),
    "val_split": ("str", words),
    "num_classes": ("int", st.integers(1, 1000)),
    "crop_size": ("int", st.integers(32, 2048)),  # x 0.5 (the smallest CAM scale) >= one 16px patch
    "photometric_aug": ("bool", st.booleans()),
    "num_workers": ("int", st.integers(0, 64)),
    "backbone": ("str", st.sampled_from(["vit_base_patch16_224", "vit_small_patch16_224", "vit_tiny_patch16_224",
                                         "vit_micro_patch16"])),
    "pretrained": ("optional str", st.none() | paths),
    "aux_layer": ("int", st.integers(-6, 5)),  # a block of vit_micro_patch16's 6
    "batch_size": ("int", st.integers(1, 512)),
    "max_steps": ("int", st.integers(1, 10**7)),
    "lr": ("float", st.floats(1e-9, 10, **finite)),
    "head_lr_mult": ("float", st.floats(1e-3, 1e3, **finite)),
    "weight_decay": ("float", st.floats(0, 1, **finite)),
    "betas": ("pair", st.tuples(st.floats(0, 0.999, **finite), st.floats(0, 0.999, **finite))),
    "eps": ("float", st.floats(1e-12, 1, **finite)),
    "warmup_steps": ("int", st.integers(0, 10**5)),
    "warmup_ratio": ("float", st.floats(0, 1, **finite)),
    "poly_power": ("float", st.floats(0, 5, **finite)),
    "grad_clip": ("optional float", st.none() | st.floats(1e-3, 100, **finite)),
    "cam_scales": ("floats", st.lists(st.floats(0.125, 4, **finite), min_size=1, max_size=5).map(tuple)),
    "high": ("float", st.floats(0.26, 1, **finite)),  # above the preset's low (0.25)
    "low": ("float", st.floats(0, 0.69, **finite)),  # below the preset's high (0.7)
    "bkg_thre": ("float", st.floats(0, 1, **finite)),
    "loc_num_crops": ("int", st.integers(1, 64)),
    "loc_crop_size": ("int", st.integers(1, 1024)),
    "phases": ("phases", phase_lists()),
    "use_loc": ("bool", st.booleans()),
    "use_be": ("bool", st.booleans()),
    "use_sc": ("bool", st.booleans()),
    "use_seg": ("bool", st.booleans()),
    "use_reg": ("bool", st.booleans()),
    "fidelity": ("choice", st.sampled_from(["authors", "fixed"])),
    "seed": ("int", st.integers(0, 2**63 - 1)),
    "device": ("choice", st.sampled_from(["auto", "cpu", "cuda"])),
    "bf16": ("bool", st.booleans()),
    "deterministic": ("bool", st.booleans()),
    "cpu_numerics": ("choice", st.sampled_from(["native", "pinned"])),
    "fast_step": ("bool", st.booleans()),
    "cam_bf16": ("bool", st.booleans()),
    "out_dir": ("str", paths),
    "log_every": ("int", st.integers(1, 10**4)),
    "val_every": ("int", st.integers(0, 10**5)),
    "ckpt_every": ("int", st.integers(1, 10**5)),
    "val_max_images": ("optional int", st.none() | st.integers(1, 10**5)),
}

# kind -> values of the wrong type, as typed after `--set key=`
WRONG = {
    "int": ["abc", "1.5", "true", "[1]", "null", "", "1e400", "0x10"],
    "optional int": ["abc", "1.5", "true", "[1]", ""],
    "float": ["abc", "true", "[0.5]", "null", "NaN", "Infinity", "-Infinity", "", "1,5e-3x"],
    "optional float": ["abc", "true", "[0.5]", "NaN", ""],
    "bool": ["maybe", "2", "1.5", "null", "[true]", "yes", ""],
    "str": ["true", "false", "null", "[1, 2]", '{"a": 1}', ""],
    "optional str": ["true", "[1, 2]", '{"a": 1}', ""],
    "choice": ["nope", "1", "null", "true", "[]", ""],
    "pair": ["abc", "[0.9]", "[0.9, 0.99, 0.999]", '["a", "b"]', "null", "0.9"],
    "floats": ["abc", "[]", '["a"]', "true", "null", "[1.0, null]"],
    "phases": ["abc", "[]", "[1]", "null", '[{"until": "x", "weights": {}}]',
               '[{"until": null, "weights": {"colour": 1.0}}]', '[{"weights": {"cls": "heavy"}}]'],
}

# field -> values of the right type that the config's own checks refuse (smoke preset)
OUT_OF_RANGE = {
    "num_classes": ["0", "-3"], "crop_size": ["0", "8", "31"], "num_workers": ["-1"], "batch_size": ["0"],
    "max_steps": ["0", "-5"], "lr": ["0", "-1e-4"], "head_lr_mult": ["0"], "weight_decay": ["-0.1"],
    "betas": ["[1.0, 0.999]", "[-0.1, 0.9]"], "eps": ["0"], "warmup_steps": ["-1"], "warmup_ratio": ["1.5", "-1"],
    "poly_power": ["-1"], "grad_clip": ["0", "-1"], "cam_scales": ["[1.0, 0.0]", "[0.1]", "-1"],
    "high": ["0.2", "1.5"], "low": ["0.8", "-0.1"], "bkg_thre": ["1.5"], "loc_num_crops": ["0"],
    "loc_crop_size": ["0"], "seed": ["-1", str(2**63)], "log_every": ["0"], "val_every": ["-1"],
    "ckpt_every": ["0"], "val_max_images": ["0"], "backbone": ["vit_huge", "resnet50"], "aux_layer": ["6", "-7"],
    "phases": ['[{"until": 10, "weights": {}}, {"until": 5, "weights": {}}]',
               '[{"until": null, "weights": {"cls": -1}}]', '[{"until": -1, "weights": {}}]'],
}


def texts(kind: str, value) -> list[str]:
    """How a user may type ``value`` after ``--set key=``."""
    if value is None:
        return ["null", "None"]
    if kind.endswith("str") or kind == "choice":
        return [value, json.dumps(value)]
    if kind.endswith("bool"):
        return [json.dumps(value), str(value)]  # true / True
    if kind.endswith("float"):
        return [repr(value)] + ([str(int(value))] if value.is_integer() else [])
    if kind in ("pair", "floats"):
        return [json.dumps(list(value)), ",".join(repr(v) for v in value)]
    return [json.dumps(value)]


def test_every_field_has_an_entry():
    assert set(FIELDS) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(OUT_OF_RANGE) <= set(FIELDS)


@pytest.mark.parametrize("key", sorted(FIELDS))
@settings(max_examples=25)
@given(data=st.data())
def test_valid_value_round_trips(key, data):
    kind, values = FIELDS[key]
    value = data.draw(values)
    for text in texts(kind, value):
        cfg = apply_overrides(get_preset(BASE), [f"{key}={text}"])
        got = cfg.to_dict()[key]
        assert got == value and type(got) is type(value), (text, got)
        stored = json.loads(json.dumps(cfg.to_dict()))  # what config.json holds
        assert TrainConfig.from_dict(stored) == cfg


def _refused(item: str) -> str:
    with pytest.raises(ConfigError) as info:
        apply_overrides(get_preset(BASE), [item])
    message = str(info.value)
    assert isinstance(info.value, LocbeError) and info.value.exit_code == EXIT_BAD_INPUT
    assert "\n" not in message
    return message


@pytest.mark.parametrize("key", sorted(FIELDS))
def test_value_of_the_wrong_type_is_refused_naming_key_and_value(key):
    for text in WRONG[FIELDS[key][0]]:
        message = _refused(f"{key}={text}")
        assert message.startswith(f"--set {key}={text}: {key} takes "), message
        assert repr(text) in message


@pytest.mark.parametrize("key", sorted(OUT_OF_RANGE))
def test_value_out_of_range_is_refused_naming_key_and_value(key):
    for text in OUT_OF_RANGE[key]:
        message = _refused(f"{key}={text}")
        assert key in message and (text in message or json.dumps(json.loads(text)) in message), message


@settings(max_examples=50)
@given(key=st.sampled_from(sorted(k for k, (kind, _) in FIELDS.items() if kind in ("int", "float", "bool"))),
       text=st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12))
def test_any_text_is_either_taken_or_refused_with_one_line(key, text):
    """Random text never escapes as anything but a ConfigError (no TypeError from deep inside)."""
    try:
        cfg = apply_overrides(get_preset(BASE), [f"{key}={text}"])
    except ConfigError as e:
        assert "\n" not in str(e) and key in str(e)
    else:
        assert type(getattr(cfg, key)) is {"int": int, "float": float, "bool": bool}[FIELDS[key][0]]


def test_relations_between_fields():
    assert "low < high" in _refused("low=0.7")
    assert "crop_size * min(cam_scales) >= 16" in _refused("crop_size=16")
    ok = apply_overrides(get_preset(BASE), ["low=0.5", "high=0.6", "crop_size=32"])
    assert (ok.low, ok.high, ok.crop_size) == (0.5, 0.6, 32)


def test_bad_stored_config_names_the_key():
    stored = get_preset(BASE).to_dict()
    with pytest.raises(ConfigError, match=r"config key lr: expected a finite number, got \"abc\""):
        TrainConfig.from_dict({**stored, "lr": "abc"})


def test_presets_are_unchanged_by_the_checks():
    """Every preset passes its own checks and keeps its hash through an empty override (no value converted)."""
    from locbe.config import PRESETS

    for name in PRESETS:
        cfg = get_preset(name)
        again = apply_overrides(cfg, [])
        assert again == cfg and again.config_hash() == cfg.config_hash()


# --------------------------------------------------------------------------- the command line

def _locbe(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "locbe.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize(("command", "args", "line"), [
    ("train", ["--set", "lr=abc"], "locbe train: --set lr=abc: lr takes a finite number (now 0.0005), got 'abc'"),
    ("train", ["--set", "lr=abc", "--print-config"],
     "locbe train: --set lr=abc: lr takes a finite number (now 0.0005), got 'abc'"),
    ("train", ["--set", "use_loc=maybe"],
     "locbe train: --set use_loc=maybe: use_loc takes true or false (now true), got 'maybe'"),
    ("train", ["--set", "batch_size=0"],
     "locbe train: --set batch_size=0: batch_size takes a positive integer, got '0'"),
    ("train", ["--max-steps", "0"], "locbe train: --max-steps 0: max_steps takes a positive integer"),
    ("train", ["--set", "betas=[0.9]"],
     "locbe train: --set betas=[0.9]: betas takes a list of 2 numbers (now [0.9, 0.999]), got '[0.9]'"),
    ("reproduce", ["--set", "fidelity=authers"],
     "locbe reproduce: --set fidelity=authers: fidelity takes one of 'authors', 'fixed' (now \"authors\"), "
     "got 'authers'"),
])
def test_cli_refuses_a_bad_value_with_one_line_and_writes_nothing(tmp_path, command, args, line):
    out = tmp_path / "run"
    proc = _locbe(command, "--preset", "smoke", "--data-root", str(tmp_path / "data"), "--out", str(out), *args,
                  cwd=tmp_path)
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr
    assert proc.stderr.splitlines() == [line]
    assert proc.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no run dir, no data, no config.json
