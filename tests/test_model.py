"""The LOC-BE network and its weight loading (locbe/models) against method.md "Network" and "Checkpoint layout".

References are written independently of the code under test: explicit loops in float64 for the pooling,
a matmul for the 1x1-conv CAMs, a hand-assembled encoder pass for the position-embedding resize and the
aux tap, and the spec's literal key list for the checkpoint layout.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode

import locbe
from locbe.models import LOCBENet, build_model, list_backbones, load_checkpoint, load_pretrained_encoder
from locbe.models.locbe_vit import gmp, hybrid_pool, resize_pos_embed

MICRO = "vit_micro_patch16"
BASE = "vit_base_patch16_224"


def _micro(num_classes: int = 21, seed: int = 0) -> LOCBENet:
    torch.manual_seed(seed)
    return build_model(MICRO, num_classes=num_classes).eval()


@pytest.fixture(scope="module")
def micro() -> LOCBENet:
    return _micro()


class _LinspaceOnCpu(TorchFunctionMode):
    """timm 1.0.3 (the lowest timm locbe allows) turns the stochastic-depth rates into floats in the ViT's
    constructor, ``[x.item() for x in torch.linspace(...)]``, and ``.item()`` fails on the meta device. Under this
    mode (entered inside ``torch.device("meta")``) a ``torch.linspace`` without a device is made on the CPU; every
    parameter is still made on the meta device."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.linspace and kwargs.get("device") is None:
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def _base_shapes_only(num_classes: int) -> LOCBENet:
    """vit_base on the meta device: real module tree and parameter shapes, no (slow) random init."""
    with torch.device("meta"), _LinspaceOnCpu():
        model = build_model(BASE, num_classes=num_classes)
    assert all(p.is_meta for p in model.parameters())
    return model


def _img(h: int, w: int, b: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, h, w, generator=g)


# --------------------------------------------------------------------------- checkpoint layout (spec)

def _spec_layout(num_classes: int) -> dict[str, tuple[int, ...]]:
    """method.md "Checkpoint layout of the authors' code", written out key by key (ViT-B/16)."""
    d, f = 768, num_classes - 1
    keys: dict[str, tuple[int, ...]] = {
        "encoder.cls_token": (1, 1, d),
        "encoder.pos_embed": (1, 197, d),
        "encoder.patch_embed.proj.weight": (d, 3, 16, 16),
        "encoder.patch_embed.proj.bias": (d,),
    }
    for i in range(12):
        pre = f"encoder.blocks.{i}."
        keys.update({
            pre + "norm1.weight": (d,), pre + "norm1.bias": (d,),
            pre + "attn.qkv.weight": (3 * d, d), pre + "attn.qkv.bias": (3 * d,),
            pre + "attn.proj.weight": (d, d), pre + "attn.proj.bias": (d,),
            pre + "norm2.weight": (d,), pre + "norm2.bias": (d,),
            pre + "mlp.fc1.weight": (4 * d, d), pre + "mlp.fc1.bias": (4 * d,),
            pre + "mlp.fc2.weight": (d, 4 * d), pre + "mlp.fc2.bias": (d,),
        })
    keys.update({
        "encoder.norm.weight": (d,), "encoder.norm.bias": (d,),
        "encoder.head.weight": (1000, d), "encoder.head.bias": (1000,),
        "attn_proj.weight": (1, 24, 1, 1), "attn_proj.bias": (1,),
        "decoder.conv6.weight": (512, d, 3, 3),
        "decoder.conv7.weight": (512, 512, 3, 3),
        "decoder.conv8.weight": (num_classes, 512, 1, 1),
        "classifier.weight": (f, d, 1, 1),
        "aux_classifier.weight": (f, d, 1, 1),
    })
    return keys


def test_vit_base_voc_state_dict_matches_spec_layout():
    base_voc = _base_shapes_only(21)
    sd = base_voc.state_dict()
    spec = _spec_layout(21)
    assert len(spec) == 159  # the spec's count, a check on the hand-written list itself
    assert len(sd) == 159
    assert set(sd) == set(spec), (sorted(set(sd) - set(spec)), sorted(set(spec) - set(sd)))
    for k, shape in spec.items():
        assert tuple(sd[k].shape) == shape, k
    assert base_voc.aux_index == 9  # aux_layer -3 = the 10th of 12 blocks
    assert base_voc.encoder.norm.eps == pytest.approx(1e-6)
    assert base_voc.encoder.blocks[0].attn.num_heads == 12


def test_vit_base_coco_classifier_shapes():
    sd = _base_shapes_only(81).state_dict()
    spec = _spec_layout(81)
    assert len(sd) == 159
    for k in ("classifier.weight", "aux_classifier.weight", "decoder.conv8.weight"):
        assert tuple(sd[k].shape) == spec[k], k
    assert tuple(sd["classifier.weight"].shape) == (80, 768, 1, 1)
    assert tuple(sd["decoder.conv8.weight"].shape) == (81, 512, 1, 1)


def test_decoder_is_largefov(micro):
    dec = micro.decoder
    for conv in (dec.conv6, dec.conv7):
        assert conv.kernel_size == (3, 3) and conv.dilation == (5, 5) and conv.padding == (5, 5)
        assert conv.bias is None
    assert dec.conv8.kernel_size == (1, 1) and dec.conv8.bias is None
    assert micro.classifier.bias is None and micro.aux_classifier.bias is None
    # reference: conv6 -> relu -> conv7 -> relu -> conv8 written with F.conv2d on the raw weights
    x = torch.randn(1, micro.encoder.embed_dim, 5, 7, dtype=torch.float64)
    w6, w7, w8 = (c.weight.detach().double() for c in (dec.conv6, dec.conv7, dec.conv8))
    ref = F.conv2d(F.relu(F.conv2d(F.relu(F.conv2d(x, w6, padding=5, dilation=5)), w7, padding=5, dilation=5)), w8)
    out = dec.double()(x)
    dec.float()
    torch.testing.assert_close(out, ref)


# --------------------------------------------------------------------------- load_checkpoint round trips

def _save_authors(model: torch.nn.Module, path, drop=(), extra=None):
    sd = {"module." + k: v.clone() for k, v in model.state_dict().items() if k not in drop}
    sd.update(extra or {})
    torch.save(sd, path)
    return path


def test_load_checkpoint_roundtrip_module_prefix(tmp_path):
    src = _micro(seed=1)
    path = _save_authors(src, tmp_path / "authors.pth")
    raw = torch.load(path, weights_only=True)
    assert all(k.startswith("module.") for k in raw)

    dst = _micro(seed=2)
    x = _img(64, 48)
    with torch.no_grad():
        before = dst(x).seg_logits
        report = locbe.load_checkpoint(dst, path)
        a, b = src(x), dst(x)
    assert report.ok and report.missing == [] and report.unexpected == [] and report.skipped_optional == []
    assert report.stripped_prefix
    assert not torch.equal(before, a.seg_logits)  # the fresh model really differed before loading
    for name in ("cls_logits", "aux_cls_logits", "seg_logits", "cls_token", "patch_tokens", "aux_tokens"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k


def test_load_checkpoint_training_checkpoint_and_plain_dict(tmp_path):
    src = _micro(seed=3)
    torch.save({"model": src.state_dict(), "step": 7}, tmp_path / "ours.pth")
    dst = _micro(seed=4)
    report = load_checkpoint(dst, tmp_path / "ours.pth")
    assert report.ok and not report.stripped_prefix
    assert torch.equal(dst.classifier.weight, src.classifier.weight)


def test_load_toco_checkpoint_without_attn_proj(tmp_path):
    src = _micro(seed=5)
    path = _save_authors(src, tmp_path / "toco.pth", drop=("attn_proj.weight", "attn_proj.bias"))
    dst = _micro(seed=6)
    init_attn = dst.attn_proj.weight.detach().clone()
    report = load_checkpoint(dst, path)  # strict by default
    assert report.ok
    assert report.skipped_optional == ["attn_proj.bias", "attn_proj.weight"]
    assert torch.equal(dst.attn_proj.weight, init_attn)  # left at its init
    assert torch.equal(dst.decoder.conv7.weight, src.decoder.conv7.weight)


def _toco_heads(d: int) -> dict[str, tuple[int, ...]]:
    """ToCo's two training-only contrast heads, as method.md names their tensors (``mlp.{0,2,4}``, a weight-normalised
    ``last_layer``). method.md gives no sizes; assumed here: a DINO-style projection head on the d-dim patch tokens,
    Linear(d, 2048) GELU Linear(2048, 2048) GELU Linear(2048, 256), then weight_norm(Linear(256, 1024, bias=False))
    (weight_g of shape (out, 1), as torch's weight_norm over dim 0 stores it). The loader keys on the names only."""
    shapes = {"mlp.0.weight": (2048, d), "mlp.0.bias": (2048,), "mlp.2.weight": (2048, 2048), "mlp.2.bias": (2048,),
              "mlp.4.weight": (256, 2048), "mlp.4.bias": (256,),
              "last_layer.weight_g": (1024, 1), "last_layer.weight_v": (1024, 256)}
    return {f"{head}.{k}": v for head in ("proj_head", "proj_head_t") for k, v in shapes.items()}


def _toco_layout(num_classes: int) -> dict[str, tuple[int, ...]]:
    """method.md: a ToCo checkpoint is the authors' layout minus attn_proj plus the two heads, every key `module.`."""
    keys = {k: v for k, v in _spec_layout(num_classes).items() if not k.startswith("attn_proj.")}
    keys.update(_toco_heads(768))
    return {"module." + k: v for k, v in keys.items()}


def test_toco_voc_checkpoint_layout_loads_into_vit_base():
    """All 173 tensors of ToCo's VOC checkpoint, key for key (on the meta device: names and shapes, no data)."""
    from locbe.models.checkpoint import load_state

    layout = _toco_layout(21)
    assert len(layout) == 173  # method.md's count, a check on the hand-written list
    state = {k: torch.empty(shape, device="meta") for k, shape in layout.items()}
    report = load_state(_base_shapes_only(21), state, "toco_voc.pth", strict=True)
    assert report.ok and report.stripped_prefix and report.missing == [] and report.unexpected == []
    assert report.training_only == sorted(_toco_heads(768)) and len(report.training_only) == 16
    assert report.skipped_optional == ["attn_proj.bias", "attn_proj.weight"]
    assert "16 tensors of ToCo's training-only heads proj_head and proj_head_t" in report.note()


def test_toco_checkpoint_file_loads_its_network_and_leaves_out_the_heads(tmp_path):
    """A file written as ToCo's training script writes it (state_dict() of the DDP-wrapped network: `module.` keys,
    no attn_proj, the two heads with real values): every tensor of the network is loaded, the heads are not."""
    src = _micro(seed=11)
    g = torch.Generator().manual_seed(0)
    heads = {"module." + k: torch.randn(shape, generator=g) for k, shape in _toco_heads(src.encoder.embed_dim).items()}
    path = _save_authors(src, tmp_path / "toco.pth", drop=("attn_proj.weight", "attn_proj.bias"), extra=heads)
    assert len(torch.load(path, weights_only=True)) == len(src.state_dict()) - 2 + 16

    dst = _micro(seed=12)
    attn_init = dst.attn_proj.weight.detach().clone()
    report = load_checkpoint(dst, path)  # strict
    assert report.training_only == sorted(k.removeprefix("module.") for k in heads)
    assert not any(k.startswith("proj_head") for k in dst.state_dict())
    for k, v in src.state_dict().items():
        if not k.startswith("attn_proj."):
            assert torch.equal(dst.state_dict()[k], v), k
    assert torch.equal(dst.attn_proj.weight, attn_init)
    x = _img(48, 64)
    with torch.no_grad():
        assert torch.equal(src(x).seg_logits, dst(x).seg_logits)


def test_toco_checkpoint_starts_the_toco_baseline_preset(tmp_path, capsys):
    """`locbe train --preset smoke-toco --init-from toco.pth`: the network starts from the file, and the
    training-only heads are named on stderr."""
    import dataclasses

    from locbe.config import get_preset
    from locbe.train import build_training

    cfg = dataclasses.replace(get_preset("smoke-toco"), use_reg=False)
    src = _micro(seed=13)
    heads = {"module." + k: torch.zeros(shape) for k, shape in _toco_heads(src.encoder.embed_dim).items()}
    path = _save_authors(src, tmp_path / "toco.pth", drop=("attn_proj.weight", "attn_proj.bias"), extra=heads)
    net, *_ = build_training(cfg, torch.device("cpu"), str(path))
    assert torch.equal(net.classifier.weight, src.classifier.weight)
    assert torch.equal(net.encoder.blocks[3].mlp.fc1.weight, src.encoder.blocks[3].mlp.fc1.weight)
    err = capsys.readouterr().err
    assert f"--init-from {path}: left out 16 tensors of ToCo's training-only heads proj_head and proj_head_t" in err


@pytest.mark.parametrize(("ckpt_classes", "model_classes"), [(21, 81), (81, 21)])
def test_load_checkpoint_wrong_class_count(tmp_path, ckpt_classes, model_classes):
    path = _save_authors(_micro(num_classes=ckpt_classes), tmp_path / "ckpt.pth")
    dst = _micro(num_classes=model_classes)
    before = dst.encoder.pos_embed.detach().clone()
    with pytest.raises(ValueError, match=rf"{ckpt_classes} classes.*--num-classes {ckpt_classes}") as exc:
        load_checkpoint(dst, path)
    assert "ckpt.pth" in str(exc.value)
    assert torch.equal(dst.encoder.pos_embed, before)  # nothing half-loaded


def test_load_checkpoint_unexpected_and_missing_keys_named(tmp_path):
    src = _micro(seed=7)
    extra = _save_authors(src, tmp_path / "extra.pth", extra={"module.projector.weight": torch.zeros(3)})
    with pytest.raises(KeyError, match=r"projector\.weight"):
        load_checkpoint(_micro(), extra)
    missing = _save_authors(src, tmp_path / "missing.pth", drop=("encoder.norm.bias",))
    with pytest.raises(KeyError, match=r"encoder\.norm\.bias"):
        load_checkpoint(_micro(), missing)

    # non-strict: reported by name, everything else loaded
    dst = _micro(seed=8)
    rep = load_checkpoint(dst, extra, strict=False)
    assert rep.unexpected == ["projector.weight"] and rep.missing == [] and not rep.ok
    assert torch.equal(dst.classifier.weight, src.classifier.weight)
    dst = _micro(seed=8)
    norm_bias = dst.encoder.norm.bias.detach().clone()
    rep = load_checkpoint(dst, missing, strict=False)
    assert rep.missing == ["encoder.norm.bias"] and rep.unexpected == []
    assert torch.equal(dst.encoder.norm.bias, norm_bias)
    assert torch.equal(dst.encoder.norm.weight, src.encoder.norm.weight)


def test_load_checkpoint_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(_micro(), tmp_path / "nope.pth")
    torch.save({"model": "not a state dict", "lr": 0.1}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="odd.pth"):
        load_checkpoint(_micro(), tmp_path / "odd.pth")


# --------------------------------------------------------------------------- encoder: dynamic size, pos embed

def _reference_encode(model: LOCBENet, x: torch.Tensor):
    """Encoder pass assembled by hand: floor crop, patch embedding as a stride-16 conv, the position
    embedding resized with plain F.interpolate (class token kept), blocks, aux tap, final norm."""
    enc, p = model.encoder, model.patch_size
    h, w = x.shape[-2] // p, x.shape[-1] // p
    x = x[..., : h * p, : w * p].contiguous()
    patches = F.conv2d(x, enc.patch_embed.proj.weight, enc.patch_embed.proj.bias, stride=p)  # (B, D, h, w)
    patches = patches.flatten(2).transpose(1, 2)
    pe = enc.pos_embed
    n = 14
    grid = pe[:, 1:].reshape(1, n, n, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
    pe = torch.cat([pe[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)
    t = torch.cat([enc.cls_token.expand(x.shape[0], -1, -1), patches], dim=1) + pe
    aux = None
    for i, blk in enumerate(enc.blocks):
        t = blk(t)
        if i == len(enc.blocks) - 3:
            aux = t[:, 1:]
    t = enc.norm(t)
    to_map = lambda z: z.transpose(1, 2).reshape(x.shape[0], -1, h, w)
    return t[:, 0], to_map(t[:, 1:]), to_map(aux)


def test_encode_native_grid_equals_timm_forward_features(micro):
    x = _img(224, 224, b=1)
    with torch.no_grad():
        cls, patches, _ = micro.encode(x)
        ref = micro.encoder.forward_features(x)  # timm's own path: no resize at 14x14
    torch.testing.assert_close(cls, ref[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(patches, ref[:, 1:].transpose(1, 2).reshape(1, -1, 14, 14), rtol=1e-5, atol=1e-5)


@hsettings(max_examples=10)
@given(gh=st.integers(1, 8), gw=st.integers(1, 8), b=st.integers(1, 2))
def test_output_and_cam_shapes_any_grid(micro, gh, gw, b):
    x = _img(16 * gh, 16 * gw, b=b)
    with torch.no_grad():
        out = micro(x)
        hyb = micro(x, pooling="hybrid")
        cam, aux = micro.cams(x)
    d, f, c = micro.encoder.embed_dim, micro.num_classes - 1, micro.num_classes
    assert out.cls_logits.shape == hyb.cls_logits.shape == (b, f)
    assert out.aux_cls_logits.shape == (b, f)
    assert out.seg_logits.shape == (b, c, gh, gw)
    assert out.cls_token.shape == (b, d)
    assert out.patch_tokens.shape == out.aux_tokens.shape == (b, d, gh, gw)
    assert cam.shape == aux.shape == (b, f, gh, gw)
    assert all(torch.isfinite(t).all() for t in (out.cls_logits, out.seg_logits, cam, aux))


@hsettings(max_examples=8)
@given(gh=st.integers(1, 8), gw=st.integers(1, 8), dh=st.integers(0, 15), dw=st.integers(0, 15))
def test_encode_matches_hand_assembled_reference(micro, gh, gw, dh, dw):
    """Any H, W (multiple of 16 or not): grid floor(H/16) x floor(W/16), bicubic pos-embed resize, aux = block -3."""
    x = _img(16 * gh + dh, 16 * gw + dw, b=2, seed=gh * 100 + gw)
    with torch.no_grad():
        got = micro.encode(x)
        ref = _reference_encode(micro, x)
    for g, r in zip(got, ref):
        assert g.shape == r.shape
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


def test_input_not_multiple_of_patch_is_floor_cropped(micro):
    x = _img(16 * 3 + 7, 16 * 5 + 15)
    with torch.no_grad():
        a = micro(x)
        b = micro(x[..., :48, :80].contiguous())
    assert a.seg_logits.shape[-2:] == (3, 5)
    torch.testing.assert_close(a.seg_logits, b.seg_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.cls_logits, b.cls_logits, rtol=1e-5, atol=1e-5)
    # the dropped border really is ignored: changing it does not change anything
    y = x.clone()
    y[..., 48:, :] = 100.0
    y[..., :, 80:] = -100.0
    with torch.no_grad():
        torch.testing.assert_close(micro(y).patch_tokens, a.patch_tokens, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 3, 15, 64), (1, 3, 64, 8), (3, 32, 32), (1, 1, 32, 32)])
def test_encode_rejects_bad_inputs(micro, shape):
    with pytest.raises(ValueError):
        micro(torch.zeros(shape))


@hsettings(max_examples=25)
@given(gh=st.integers(1, 20), gw=st.integers(1, 20), src=st.sampled_from([14, 7]))
def test_resize_pos_embed_equals_plain_interpolate(gh, gw, src):
    torch.manual_seed(gh * 31 + gw)
    d = 5
    pe = torch.randn(1, 1 + src * src, d, dtype=torch.float64)
    out = resize_pos_embed(pe, (gh, gw))
    assert out.shape == (1, 1 + gh * gw, d)
    assert torch.equal(out[:, 0], pe[:, 0])  # class-token position kept
    # plain reference: token (r, c) of the grid is row-major index 1 + r*src + c
    img = torch.empty(1, d, src, src, dtype=torch.float64)
    for r, c in itertools.product(range(src), range(src)):
        img[0, :, r, c] = pe[0, 1 + r * src + c]
    ref = F.interpolate(img, size=(gh, gw), mode="bicubic", align_corners=False)
    for r, c in itertools.product(range(gh), range(gw)):
        torch.testing.assert_close(out[0, 1 + r * gw + c], ref[0, :, r, c])


def test_resize_pos_embed_identity_at_native_grid_and_not_antialiased():
    torch.manual_seed(0)
    pe = torch.randn(1, 197, 8)
    assert torch.equal(resize_pos_embed(pe, (14, 14)), pe)
    # downsampling: bicubic without antialias (the authors'), which differs from timm's antialiased resample
    from timm.layers import resample_abs_pos_embed

    ours = resize_pos_embed(pe, (5, 5))
    timm_aa = resample_abs_pos_embed(pe, (5, 5), num_prefix_tokens=1)
    assert not torch.allclose(ours, timm_aa, atol=1e-3)


# --------------------------------------------------------------------------- pooling and CAMs

def _gmp_loop(x: np.ndarray) -> np.ndarray:
    b, d, h, w = x.shape
    out = np.full((b, d), -np.inf)
    for i, j, r, c in itertools.product(range(b), range(d), range(h), range(w)):
        out[i, j] = max(out[i, j], x[i, j, r, c])
    return out


def _hybrid_loop(x: np.ndarray, bins=(1, 2, 8)) -> np.ndarray:
    """(2*GMP + sum_i mean(avg_pool(kernel=(h//i, w//i), stride=kernel))) / 5, one window at a time.
    A kernel side of 0 (grid smaller than the bin) is taken as 1, the code's documented guard."""
    b, d, h, w = x.shape
    out = 2 * _gmp_loop(x)
    for i in bins:
        kh, kw = max(h // i, 1), max(w // i, 1)
        for n, ch in itertools.product(range(b), range(d)):
            windows = []
            for r0 in range(0, h - kh + 1, kh):  # no padding, floor mode: a partial last window is dropped
                for c0 in range(0, w - kw + 1, kw):
                    s = 0.0
                    for r, c in itertools.product(range(r0, r0 + kh), range(c0, c0 + kw)):
                        s += x[n, ch, r, c]
                    windows.append(s / (kh * kw))
            out[n, ch] += sum(windows) / len(windows)
    return out / 5


@hsettings(max_examples=30)
@given(h=st.integers(1, 19), w=st.integers(1, 19), seed=st.integers(0, 2**16))
def test_gmp_and_hybrid_pool_against_loops(h, w, seed):
    x = np.random.default_rng(seed).standard_normal((2, 3, h, w))
    t = torch.from_numpy(x)
    np.testing.assert_allclose(gmp(t).numpy()[..., 0, 0], _gmp_loop(x), rtol=0, atol=0)
    np.testing.assert_allclose(hybrid_pool(t).numpy()[..., 0, 0], _hybrid_loop(x), rtol=1e-12, atol=1e-12)


def test_hybrid_pool_drops_partial_window():
    # h = 11, bin 2 -> kernel 5, windows over rows 0..9: row 10 never enters the bin-2 term
    x = torch.zeros(1, 1, 11, 8, dtype=torch.float64)
    x[0, 0, 10, :] = 1.0  # only in the last row
    # GMP = 1; bin 1 (kernel 11x8): mean 8/88; bin 2 (5x4 windows, rows 0..9): 0; bin 8 (1x1): mean 8/88
    expected = (2 * 1 + 8 / 88 + 0 + 8 / 88) / 5
    assert hybrid_pool(x).item() == pytest.approx(expected, abs=1e-12)


def test_heads_pooling_in_the_model(micro):
    x = _img(80, 112, b=2, seed=3)
    with torch.no_grad():
        out = micro(x)
        hyb = micro(x, pooling="hybrid")
    tokens = out.patch_tokens.double().numpy()
    aux = out.aux_tokens.double().numpy()
    w = micro.classifier.weight.detach().double().numpy()[:, :, 0, 0]  # (F, D)
    wa = micro.aux_classifier.weight.detach().double().numpy()[:, :, 0, 0]
    np.testing.assert_allclose(out.cls_logits.numpy(), _gmp_loop(tokens) @ w.T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(hyb.cls_logits.numpy(), _hybrid_loop(tokens) @ w.T, rtol=1e-4, atol=1e-4)
    # aux head is GMP in both forwards
    np.testing.assert_allclose(out.aux_cls_logits.numpy(), _gmp_loop(aux) @ wa.T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(hyb.aux_cls_logits.numpy(), _gmp_loop(aux) @ wa.T, rtol=1e-4, atol=1e-4)
    assert not np.allclose(out.cls_logits.numpy(), hyb.cls_logits.numpy(), atol=1e-3)
    with pytest.raises(ValueError, match="pooling"):
        micro(x, pooling="avg")


@pytest.mark.parametrize("pooling", ["gmp", "hybrid"])
def test_classify_and_raw_cams_equal_the_full_forward(micro, pooling):
    """The fast step's lean BE view (classify) and its reused CAM maps (raw_cams) are the full forward's
    numbers, computed with the same ops: exactly equal."""
    x = _img(48, 64, b=3, seed=4)
    with torch.no_grad():
        full = micro(x, pooling=pooling)
        cam, aux = micro.cams(x, relu=False)
        raw_cam, raw_aux = micro.raw_cams(full.patch_tokens, full.aux_tokens)
        assert torch.equal(micro.classify(x, pooling=pooling), full.cls_logits)
    assert torch.equal(raw_cam, cam) and torch.equal(raw_aux, aux)
    with pytest.raises(ValueError, match="pooling"):
        micro.classify(x, pooling="avg")


@hsettings(max_examples=6)
@given(gh=st.integers(1, 7), gw=st.integers(1, 7))
def test_cams_equal_relu_matmul_of_patch_tokens(micro, gh, gw):
    x = _img(16 * gh, 16 * gw, b=2, seed=gh + 10 * gw)
    with torch.no_grad():
        out = micro(x)
        cam, aux = micro.cams(x)
        cam_raw, aux_raw = micro.cams(x, relu=False)

    def ref(tokens, weight):  # conv 1x1 = per-position matmul, then ReLU
        t = tokens.double().flatten(2)  # (B, D, hw)
        wm = weight.detach().double()[:, :, 0, 0]  # (F, D)
        raw = torch.einsum("fd,bdn->bfn", wm, t).reshape(t.shape[0], -1, gh, gw)
        return raw, raw.clamp_min(0)

    raw_ref, cam_ref = ref(out.patch_tokens, micro.classifier.weight)
    aux_raw_ref, aux_ref = ref(out.aux_tokens, micro.aux_classifier.weight)
    torch.testing.assert_close(cam.double(), cam_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(aux.double(), aux_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cam_raw.double(), raw_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(aux_raw.double(), aux_raw_ref, rtol=1e-4, atol=1e-4)
    assert (cam >= 0).all() and (aux >= 0).all()
    assert (cam_raw < 0).any()  # random weights: the relu really had something to clip


# --------------------------------------------------------------------------- optimisation

def test_param_groups_lr_multipliers(micro):
    groups = {g["name"]: g for g in micro.param_groups()}
    assert set(groups) == {"encoder", "encoder_norm", "classifiers", "decoder"}
    assert groups["encoder"]["lr_mult"] == 1.0 and groups["encoder_norm"]["lr_mult"] == 1.0
    assert groups["classifiers"]["lr_mult"] == 10.0 and groups["decoder"]["lr_mult"] == 10.0

    names = {id(p): n for n, p in micro.named_parameters()}
    members = {g: [names[id(p)] for p in groups[g]["params"]] for g in groups}
    flat = [n for ns in members.values() for n in ns]
    assert len(flat) == len(set(flat))  # no parameter in two groups
    # attn_proj never enters a loss; the position embedding is frozen, as in the authors' network
    expected = {n for n in names.values() if not n.startswith("attn_proj.") and n != "encoder.pos_embed"}
    assert set(flat) == expected
    assert not micro.encoder.pos_embed.requires_grad and micro.encoder.cls_token.requires_grad
    assert set(members["classifiers"]) == {"classifier.weight", "aux_classifier.weight"}
    assert set(members["decoder"]) == {f"decoder.conv{i}.weight" for i in (6, 7, 8)}
    assert all(n.startswith("encoder.") for n in members["encoder"] + members["encoder_norm"])
    assert "encoder.norm.weight" in members["encoder_norm"] and "encoder.blocks.0.norm1.bias" in members["encoder_norm"]
    assert "encoder.blocks.0.attn.qkv.weight" in members["encoder"] and "encoder.cls_token" in members["encoder"]
    assert all("norm" not in n for n in members["encoder"])
    # usable as an optimizer spec: base lr times multiplier
    opt = torch.optim.AdamW([{"params": g["params"], "lr": 6e-5 * g["lr_mult"]} for g in groups.values()])
    assert sorted({g["lr"] for g in opt.param_groups}) == pytest.approx([6e-5, 6e-4])


def test_head_lr_mult_reaches_the_optimizer(micro):
    """TrainConfig.head_lr_mult sets the classifiers' and decoder's lr (it was once ignored: fixed at 10x)."""
    import dataclasses

    from locbe.config import get_preset
    from locbe.training.optim import build_optimizer

    cfg = dataclasses.replace(get_preset("smoke"), lr=1e-3, head_lr_mult=3.0)
    lrs = {g["name"]: g["lr"] for g in build_optimizer(micro, cfg).param_groups}
    assert lrs == pytest.approx({"encoder": 1e-3, "encoder_norm": 1e-3, "classifiers": 3e-3, "decoder": 3e-3})


# --------------------------------------------------------------------------- construction errors

def test_unknown_backbone_lists_known():
    with pytest.raises(ValueError) as exc:
        build_model("vit_huge_patch14")
    msg = str(exc.value)
    assert "vit_huge_patch14" in msg
    for name in list_backbones():
        assert name in msg
    assert MICRO in list_backbones() and BASE in list_backbones()


@pytest.mark.parametrize("kwargs", [{"num_classes": 1}, {"aux_layer": 6}, {"aux_layer": -7}])
def test_bad_constructor_arguments(kwargs):
    with pytest.raises(ValueError):
        build_model(MICRO, **kwargs)


def test_missing_pretrained_file_named(tmp_path):
    path = tmp_path / "no_such_vit_b16.pth"
    with pytest.raises(FileNotFoundError, match="no_such_vit_b16.pth"):
        build_model(MICRO, pretrained=str(path))


def test_pretrained_file_of_wrong_format(tmp_path):
    torch.save([torch.zeros(3)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="list.pth"):
        build_model(MICRO, pretrained=str(tmp_path / "list.pth"))
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1000, 2048)},
               tmp_path / "resnet.pth")
    with pytest.raises(KeyError, match=r"resnet\.pth.*conv1\.weight"):
        build_model(MICRO, pretrained=str(tmp_path / "resnet.pth"))
    (tmp_path / "garbage.pth").write_bytes(b"this is not a pickle or a zip archive\n" * 4)
    with pytest.raises(ValueError, match="garbage.pth"):
        build_model(MICRO, pretrained=str(tmp_path / "garbage.pth"))
    # a ViT of another size: same key names, other shapes
    torch.manual_seed(0)
    other = LOCBENet(MICRO, num_classes=21)
    sd = {k: (torch.zeros(*v.shape[:-1], v.shape[-1] + 1) if k == "cls_token" else v)
          for k, v in other.encoder.state_dict().items()}
    torch.save(sd, tmp_path / "wide.pth")
    with pytest.raises(ValueError, match=r"wide\.pth.*cls_token"):
        build_model(MICRO, pretrained=str(tmp_path / "wide.pth"))


# --------------------------------------------------------------------------- load_pretrained_encoder

@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_load_pretrained_encoder_pth_and_safetensors(tmp_path, fmt):
    src = _micro(seed=11).encoder
    # a timm-compatible encoder state dict, with a different (e.g. ImageNet-21k) head that must be dropped
    sd = {k: v.detach().clone().contiguous() for k, v in src.state_dict().items()}
    sd["head.weight"], sd["head.bias"] = torch.randn(10, src.embed_dim), torch.randn(10)
    path = tmp_path / f"vit.{fmt}"
    if fmt == "pth":
        torch.save(sd, path)
    else:
        from safetensors.torch import save_file

        save_file(sd, str(path))

    dst = _micro(seed=12)
    head_before = dst.encoder.head.weight.detach().clone()
    cls_before = dst.classifier.weight.detach().clone()
    assert not torch.equal(dst.encoder.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    report = load_pretrained_encoder(dst, path)
    assert report.ok
    for k, v in src.state_dict().items():
        if k.startswith("head."):
            continue
        assert torch.equal(dst.encoder.state_dict()[k], v), k
    assert torch.equal(dst.encoder.head.weight, head_before)
    assert torch.equal(dst.classifier.weight, cls_before)  # only the encoder is touched
    # and through build_model(pretrained=...)
    torch.manual_seed(13)
    built = build_model(MICRO, pretrained=str(path))
    assert torch.equal(built.encoder.pos_embed, src.pos_embed)


def test_load_pretrained_encoder_prefixed_and_other_grid(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    # a plain timm ViT with the micro config stored at a 7x7 grid (112 px), saved with "module.encoder." keys
    torch.manual_seed(21)
    vit = VisionTransformer(img_size=112, patch_size=16, embed_dim=96, depth=6, num_heads=3, mlp_ratio=2.0,
                            qkv_bias=True, num_classes=1000)
    torch.save({"module.encoder." + k: v for k, v in vit.state_dict().items()}, tmp_path / "vit112.pth")
    dst = _micro(seed=22)
    load_pretrained_encoder(dst, tmp_path / "vit112.pth")
    assert dst.encoder.pos_embed.shape == (1, 197, 96)
    assert torch.equal(dst.encoder.pos_embed[:, 0], vit.pos_embed[:, 0])
    assert torch.equal(dst.encoder.blocks[5].mlp.fc2.weight, vit.blocks[5].mlp.fc2.weight)
    assert torch.equal(dst.encoder.head.weight, vit.head.weight)


def _to_jax_layout(vit) -> dict:
    """A timm ViT's weights written out in the original JAX checkpoint layout (`ViT-B_16.npz`), by hand:
    HWIO patch kernel, per-head q/k/v kernels (D, heads, head_dim), transposed dense kernels."""
    import numpy as np

    d, heads = vit.embed_dim, vit.blocks[0].attn.num_heads
    hd = d // heads
    a = lambda t: t.detach().numpy().astype(np.float32)
    out = {
        "embedding/kernel": a(vit.patch_embed.proj.weight.permute(2, 3, 1, 0)),
        "embedding/bias": a(vit.patch_embed.proj.bias),
        "cls": a(vit.cls_token),
        "Transformer/posembed_input/pos_embedding": a(vit.pos_embed),
        "Transformer/encoder_norm/scale": a(vit.norm.weight),
        "Transformer/encoder_norm/bias": a(vit.norm.bias),
        "head/kernel": a(vit.head.weight.t()),
        "head/bias": a(vit.head.bias),
    }
    for i, blk in enumerate(vit.blocks):
        p = f"Transformer/encoderblock_{i}/"
        out[p + "LayerNorm_0/scale"], out[p + "LayerNorm_0/bias"] = a(blk.norm1.weight), a(blk.norm1.bias)
        out[p + "LayerNorm_2/scale"], out[p + "LayerNorm_2/bias"] = a(blk.norm2.weight), a(blk.norm2.bias)
        qkv_w, qkv_b = blk.attn.qkv.weight.chunk(3, dim=0), blk.attn.qkv.bias.chunk(3, dim=0)
        for name, w, b in zip(("query", "key", "value"), qkv_w, qkv_b):
            out[p + f"MultiHeadDotProductAttention_1/{name}/kernel"] = a(w.t().reshape(d, heads, hd))
            out[p + f"MultiHeadDotProductAttention_1/{name}/bias"] = a(b.reshape(heads, hd))
        out[p + "MultiHeadDotProductAttention_1/out/kernel"] = a(blk.attn.proj.weight.t().reshape(heads, hd, d))
        out[p + "MultiHeadDotProductAttention_1/out/bias"] = a(blk.attn.proj.bias)
        for j, fc in enumerate((blk.mlp.fc1, blk.mlp.fc2)):
            out[p + f"MlpBlock_3/Dense_{j}/kernel"] = a(fc.weight.t())
            out[p + f"MlpBlock_3/Dense_{j}/bias"] = a(fc.bias)
    return out


def test_load_pretrained_encoder_jax_npz(tmp_path):
    """The original JAX `ViT-B_16.npz` layout (the authors' `jx_vit_base_p16_224` weights started as one)
    loads into the encoder tensor for tensor, and the network computes what the source ViT computes."""
    import numpy as np

    src = _micro(seed=31).encoder.eval()
    np.savez(tmp_path / "ViT-micro.npz", **_to_jax_layout(src))
    dst = _micro(seed=32)
    assert not torch.equal(dst.encoder.blocks[2].attn.qkv.weight, src.blocks[2].attn.qkv.weight)
    assert load_pretrained_encoder(dst, tmp_path / "ViT-micro.npz").ok
    for k, v in src.state_dict().items():
        torch.testing.assert_close(dst.encoder.state_dict()[k], v, rtol=0, atol=0, msg=k)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(dst.encoder.eval().forward_features(x), src.forward_features(x))


def test_load_pretrained_encoder_authors_file_layout(tmp_path):
    """The authors' `jx_vit_base_p16_224-80ecf9dd.pth` (timm `vit_base_patch16_224.orig_in21k_ft_in1k`) is a
    plain timm state dict with a 1000-way head: every key, the head included, loads."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(41)
    vit = VisionTransformer(img_size=224, patch_size=16, embed_dim=96, depth=6, num_heads=3, mlp_ratio=2.0,
                            qkv_bias=True, num_classes=1000)
    torch.save(vit.state_dict(), tmp_path / "jx_vit_micro_p16_224.pth")
    dst = _micro(seed=42)
    load_pretrained_encoder(dst, tmp_path / "jx_vit_micro_p16_224.pth")
    for k, v in vit.state_dict().items():
        assert torch.equal(dst.encoder.state_dict()[k], v), k
