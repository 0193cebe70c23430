"""The lattice filter as a custom op: gradients (hypothesis), torch.library.opcheck, torch.compile, the rloss
golden trace, CUDA against the CPU kernel, and a non-editable install used from another directory.

References are plain: the serial lattice (one channel at a time, std::map, float64 accumulation) and the
explicit N x N matrix of the operator built from it column by column.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from locbe.data.classes import denormalize
from locbe.lattice import lattice_filter
from locbe.lattice.op import _filter, ops
from locbe.lattice.reference import serial_lattice_filter
from locbe.method.regloss import RegularizedLoss

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "rloss_operator.pt"
# `tox -e hypothesis` (HYPOTHESIS_PROFILE=nightly) runs every property with 10x the examples
SCALE = 10 if os.environ.get("HYPOTHESIS_PROFILE") == "nightly" else 1
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]


def rel_l2(a, b) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.fixture(scope="module", autouse=True)
def op_library():
    return ops()


shapes = st.fixed_dictionaries({
    "b": st.integers(1, 2), "k": st.integers(1, 3), "h": st.integers(1, 6), "w": st.integers(1, 6),
    "sigma_xy": st.floats(0.5, 50.0), "sigma_rgb": st.floats(2.0, 80.0), "seed": st.integers(0, 2**31 - 1),
    "layout": st.sampled_from(["contiguous", "channels_last", "strided"]),
})


def draw_inputs(p, dtype=torch.float64):
    g = torch.Generator().manual_seed(p["seed"])
    image = torch.rand(p["b"], 3, p["h"], p["w"], generator=g, dtype=torch.float64) * 255
    values = torch.randn(p["b"], p["k"], p["h"], p["w"], generator=g, dtype=torch.float64).to(dtype)
    if p["layout"] == "channels_last":
        values = values.to(memory_format=torch.channels_last)
        image = image.to(memory_format=torch.channels_last)
    elif p["layout"] == "strided":  # a non-contiguous view: every other channel of a wider tensor
        values = torch.stack([values, torch.full_like(values, float("nan"))], dim=2).flatten(1, 2)[:, ::2]
        assert not values.is_contiguous() or p["k"] == 1
    return image, values


def operator_matrix(image, sigma_xy, sigma_rgb, transpose=False):
    """W (or W^T) of one image as an explicit (N, N) float64 matrix, column j = serial reference applied to e_j."""
    _, _, h, w = image.shape
    n = h * w
    basis = torch.eye(n, dtype=torch.float64).reshape(n, 1, h, w)
    cols = serial_lattice_filter(image.expand(n, -1, -1, -1).contiguous(), basis, sigma_xy, sigma_rgb,
                                 transpose=transpose)
    return cols.reshape(n, n).T  # row i of the result = output pixel i


# ---------------------------------------------------------------------------- gradients
@settings(max_examples=15 * SCALE)
@given(p=shapes)
def test_gradcheck_and_gradgradcheck_float64(p):
    image, values = draw_inputs(p)
    values.requires_grad_(True)
    fn = lambda v: lattice_filter(image, v, p["sigma_xy"], p["sigma_rgb"])
    assert torch.autograd.gradcheck(fn, (values,), fast_mode=values.numel() > 40)
    # double backward: the VJP of W is W^T, itself the op (with its own VJP W)
    assert torch.autograd.gradgradcheck(fn, (values,), fast_mode=True)


@settings(max_examples=30 * SCALE)
@given(p=shapes, dtype=st.sampled_from([torch.float32, torch.float64]), atomic=st.booleans())
def test_vjp_equals_serial_reference_transpose(p, dtype, atomic):
    """The op's VJP (autograd) equals W^T g by the serial reference; float32 within accumulation error."""
    image, values = draw_inputs(p, dtype)
    values.requires_grad_(True)
    g = torch.randn(values.shape, generator=torch.Generator().manual_seed(p["seed"] + 1), dtype=dtype)
    out = _filter(image, values, p["sigma_xy"], p["sigma_rgb"], atomic_splat=atomic)
    (vjp,) = torch.autograd.grad(out, values, g)
    ref = serial_lattice_filter(image, g, p["sigma_xy"], p["sigma_rgb"], transpose=True)
    assert vjp.dtype == dtype and vjp.shape == values.shape
    # float32 kernel vs float64 reference: both round features to float32 alike, only the accumulation differs
    assert rel_l2(vjp, ref) <= (1e-5 if dtype == torch.float32 else 1e-12)


def gated_reference(images, logits, crop, pseudo, weight=1e-7, sigma_xy=100.0, sigma_rgb=15.0, s=0.5):
    """regloss.md steps 1-5 with the explicit float64 matrix W: the value, and the surrogate gradient by autograd
    through softmax and the downscale of the objective -(2 w / B) sum S' * stop_grad(G * W S')."""
    logits = logits.detach().double().requires_grad_(True)
    probs = torch.softmax(logits, 1)
    img = F.interpolate(images.double(), scale_factor=s, mode="nearest")
    small = F.interpolate(probs, scale_factor=s, mode="bilinear", align_corners=False)
    r = F.interpolate(crop[:, None].double(), scale_factor=s, mode="nearest")[:, 0]
    lab = F.interpolate(pseudo[:, None].double(), scale_factor=s, mode="nearest")[:, 0]
    b, k, h, w = small.shape
    gate = (r - small.detach().max(1).values)
    gate = torch.where(lab == 255, torch.ones_like(gate), gate).clamp_min(0)[:, None]
    s_masked = small * r[:, None]
    ws = torch.stack([(operator_matrix(img[i:i + 1], sigma_xy * s, sigma_rgb)
                       @ s_masked[i].detach().reshape(k, h * w).T).T.reshape(k, h, w) for i in range(b)])
    a = gate * ws
    value = weight * -(s_masked.detach() * a).sum() / b
    (-(2 * weight / b) * (s_masked * a).sum()).backward()
    return value, logits.grad


@settings(max_examples=10 * SCALE)
@given(b=st.integers(1, 2), k=st.integers(1, 4), h2=st.integers(1, 5), w2=st.integers(1, 5),
       seed=st.integers(0, 2**31 - 1), unlabelled=st.floats(0.0, 1.0))
def test_gated_loss_gradient_equals_autograd_through_dense_reference(b, k, h2, w2, seed, unlabelled):
    g = torch.Generator().manual_seed(seed)
    h, w = 2 * h2, 2 * w2
    images = torch.rand(b, 3, h, w, generator=g) * 255
    logits = torch.randn(b, k, h, w, generator=g) * 3
    crop = (torch.rand(b, h, w, generator=g) < 0.8).float()
    pseudo = torch.randint(0, k, (b, h, w), generator=g)
    pseudo[torch.rand(b, h, w, generator=g) < unlabelled] = 255
    lg = logits.clone().requires_grad_(True)
    loss = RegularizedLoss()(images, torch.softmax(lg, 1), crop, pseudo)
    loss.backward()
    value, grad = gated_reference(images, logits, crop, pseudo)
    # float32 softmax/interpolation/filter against float64 throughout: 1e-4 relative (the filter alone is 1e-7)
    assert loss.item() == pytest.approx(value.item(), rel=1e-4, abs=1e-12)
    if grad.norm() > 0:
        assert rel_l2(lg.grad, grad) < 1e-4
    else:
        assert float(lg.grad.abs().max()) == 0.0


# ---------------------------------------------------------------------------- golden (rloss, the authors' code)
@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN, weights_only=True)


@pytest.mark.parametrize("case", ["K21_rgb15_xy50", "K8_rgb15_xy25", "K4_rgb5_xy10", "K3_rgb30_xy80"])
def test_filter_equals_rloss_golden(golden, case):
    c = golden["operator"][case]
    out = lattice_filter(golden["image_255"], c["values"], c["sigma_xy"], c["sigma_rgb"])
    assert rel_l2(out, c["filtered"]) <= 1e-5  # measured 1.8e-7 .. 5.8e-7 (float32 sums in another order)


def test_gated_loss_equals_authors_golden(golden):
    """The authors' get_energy_loss(DenseEnergyLoss(1e-7, 15, 100, 0.5)) as locbe's step calls the loss: the
    de-normalised image times 255, softmax(logits), the img_box mask and the pseudo label."""
    from locbe.method.cam import box_mask

    g = golden["gated_loss"]
    img = g["image_normalised"]
    logits = g["logits"].clone().requires_grad_(True)
    crop = box_mask(g["img_box"], img.shape[-2:]).float()
    loss_fn = RegularizedLoss(weight=g["weight"], sigma_rgb=g["sigma_rgb"], sigma_xy=g["sigma_xy"],
                              scale_factor=g["scale_factor"])
    loss = loss_fn(denormalize(img) * 255.0, torch.softmax(logits, 1), crop, g["pseudo_label"].long())
    loss.backward()
    assert loss.item() == pytest.approx(g["loss"], rel=1e-5)  # measured 1.7e-7
    assert rel_l2(logits.grad, g["grad_logits"]) <= 1e-5  # measured 1.9e-6


# ---------------------------------------------------------------------------- custom op contract
def opcheck_samples():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        for b, k, h, w in ((1, 1, 1, 1), (2, 3, 5, 7), (1, 4, 8, 3)):
            image = torch.rand(b, 3, h, w, generator=g) * 255
            values = torch.rand(b, k, h, w, generator=g, dtype=dtype)
            yield image, values.requires_grad_(True), (5.0, 20.0, False, False)
            yield image, values.to(memory_format=torch.channels_last).detach().requires_grad_(True), \
                (10.0, 15.0, True, False)


@pytest.mark.parametrize("sample", list(opcheck_samples()), ids=lambda s: f"{tuple(s[1].shape)}-{s[1].dtype}")
def test_opcheck(sample):
    image, values, args = sample
    torch.library.opcheck(torch.ops.locbe.lattice_filter.default, (image, values, *args))


def test_torch_compile_loss_module_full_graph():
    """The whole loss (interpolations, gate, the op, the surrogate) in one graph (fullgraph=True raises on any
    graph break); value and gradient equal eager. aot_eager runs the fake kernel and the registered autograd."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    b, k, h, w = 2, 5, 24, 20
    images = torch.rand(b, 3, h, w, generator=g) * 255
    logits = torch.randn(b, k, h, w, generator=g)
    crop = torch.ones(b, h, w)
    crop[1, :4] = 0
    pseudo = torch.randint(0, k, (b, h, w), generator=g)
    pseudo[:, :, : w // 2] = 255

    def run(loss_fn):
        lg = logits.clone().requires_grad_(True)
        loss = loss_fn(images, torch.softmax(lg, 1), crop, pseudo)
        loss.backward()
        return loss.detach(), lg.grad

    eager_loss, eager_grad = run(RegularizedLoss())
    compiled = torch.compile(RegularizedLoss(), fullgraph=True, backend="aot_eager")
    loss, grad = run(compiled)
    assert loss.item() == pytest.approx(eager_loss.item(), rel=1e-6)
    assert rel_l2(grad, eager_grad) < 1e-6
    explained = torch._dynamo.explain(RegularizedLoss())(images, torch.softmax(logits, 1), crop, pseudo)
    assert explained.graph_break_count == 0
    assert any("locbe.lattice_filter" in str(node.target) for gm in explained.graphs for node in gm.graph.nodes)


# ---------------------------------------------------------------------------- CUDA and its CPU twin
@pytest.mark.parametrize("device", DEVICES)
def test_forward_backward_match_cpu_kernel_and_repeat_bitwise(device):
    """On CUDA: forward and backward equal the CPU kernel; in deterministic mode bitwise repeatable. On the CPU
    (the twin) the same checks run against the CPU kernel in its other schedule (a single-image batch)."""
    g = torch.Generator().manual_seed(2)
    image = torch.rand(2, 3, 33, 29, generator=g) * 255
    values = torch.rand(2, 21, 33, 29, generator=g)
    cot = torch.randn(2, 21, 33, 29, generator=g)
    ref_out = torch.cat([lattice_filter(image[i:i + 1], values[i:i + 1], 20.0, 15.0) for i in range(2)])
    ref_grad = torch.cat([serial_lattice_filter(image[i:i + 1], cot[i:i + 1], 20.0, 15.0, transpose=True)
                          for i in range(2)])
    runs = []
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(2):
            v = values.to(device, copy=True).requires_grad_(True)
            out = lattice_filter(image.to(device), v, 20.0, 15.0)
            out.backward(cot.to(device))
            runs.append((out.detach().cpu().clone(), v.grad.cpu().clone()))
    finally:
        torch.use_deterministic_algorithms(before)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert rel_l2(runs[0][0], ref_out) <= 1e-5
    assert rel_l2(runs[0][1], ref_grad) <= 1e-5


# ---------------------------------------------------------------------------- installable anywhere
def test_first_use_build_is_keyed_by_sources(tmp_path, monkeypatch):
    """The cache folder name hashes the sources: an edited source gets a new folder, not a rebuild over the old."""
    from locbe.lattice import build

    src = tmp_path / "cuda"
    shutil.copytree(build.source_dir(), src)
    monkeypatch.setenv("LOCBE_CUDA_SRC", str(src))
    key = build.build_key(False)
    assert build.build_key(True) != key
    (src / "lattice_kernels.h").write_text((src / "lattice_kernels.h").read_text() + "\n// edited\n")
    assert build.build_key(False) != key


def test_a_second_copy_of_the_sources_reuses_the_build_without_recompiling(tmp_path):
    """Same sources at another path (another checkout, an installed copy) = same key = the same library file,
    not a rebuild: ninja's build file names the staged copy in the cache folder, never the caller's path.
    (Compiling from the caller's path made two checkouts rebuild the shared library in turn, minutes each.)"""
    from locbe.lattice import build

    copy = tmp_path / "other_checkout_cuda"
    shutil.copytree(build.source_dir(), copy)
    env = {k: v for k, v in os.environ.items() if k != "LOCBE_CUDA_SRC"}
    code = ("from locbe.lattice import build; build.load_extension(False); lib = build.library_path(False); "
            "print(lib, lib.stat().st_mtime_ns)")

    def load(extra):
        run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, **extra}, capture_output=True,
                             text=True)
        assert run.returncode == 0, run.stdout + run.stderr
        return run.stdout.split()[-2:], run.stderr

    (lib, built), _ = load({})  # builds here only when this cache has not got the library yet
    (lib_b, mtime_b), stderr = load({"LOCBE_CUDA_SRC": str(copy)})
    assert lib_b == lib and mtime_b == built, "the library was rebuilt for a second copy of the same sources"
    assert "compiling" not in stderr
    assert (Path(lib).parent / "src" / "lattice_cpu.cpp").read_bytes() == (copy / "lattice_cpu.cpp").read_bytes()


@pytest.mark.slow
def test_non_editable_install_runs_the_op_from_another_directory(tmp_path):
    """`pip install .` (not editable) of the tracked tree into its own directory, then the op from an unrelated cwd.

    pip builds the wheel the way a user's `pip install .` does: in an isolated build environment holding only
    pyproject's build requirements (setuptools; no torch), so nothing of the interpreter's own setuptools/wheel
    is relied on. The install goes to a `--target` directory that is put first on PYTHONPATH, which hides the
    editable checkout this suite runs from (its finder comes after the path entries).
    The op is built from the sources the wheel carries (locbe/lattice/csrc); their hash equals the checkout's,
    so the cache key, and hence this session's cached build, is shared (a fresh machine compiles once)."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    clone = tmp_path / "clone"
    for rel in files:
        if (ROOT / rel).is_file():
            (clone / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, clone / rel)
    target = tmp_path / "site"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LOCBE_CUDA_SRC")}
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                          str(clone)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    shutil.rmtree(clone)  # nothing of the checkout is left to find
    from locbe.lattice.build import build_key

    code = ("import torch, locbe; from locbe.lattice import lattice_filter; from locbe.lattice import build; "
            "out = lattice_filter(torch.rand(1, 3, 6, 5) * 255, torch.ones(1, 2, 6, 5)); "
            "print(locbe.__file__); print(build.source_dir()); print(build.build_key(False)); "
            "print(float(out.sum()) > 0)")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**env, "PYTHONPATH": str(target)},
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    where, src, key, ok = run.stdout.split()[-4:]
    assert where.startswith(str(target)) and src.startswith(str(target)) and src.endswith("csrc")
    assert key == build_key(False) and ok == "True"


def test_training_checks_the_op_before_step_zero(monkeypatch):
    """A run that will use the reg loss builds/loads and runs the op when the loss is built (before step 0)."""
    import locbe.lattice
    from locbe.config import get_preset
    from locbe.train import build_reg_loss

    cfg = get_preset("smoke")
    assert cfg.use_reg and any("reg" in p.weights for p in cfg.phases)
    assert isinstance(build_reg_loss(cfg, torch.device("cpu")), RegularizedLoss)

    def broken():
        raise RuntimeError("op library cannot be built")

    monkeypatch.setattr(locbe.lattice, "ensure_loaded", broken)
    with pytest.raises(RuntimeError, match="cannot be built"):
        build_reg_loss(cfg, torch.device("cpu"))
