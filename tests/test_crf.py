"""The reusable lattice (``locbe::lattice_build`` / ``locbe::lattice_apply``) and the dense CRF on it.

- build once / apply many equals ``lattice_filter`` on the same image features, bitwise on the CPU;
- the d = 2 and d = 5 lattices against ``plain_lattice`` (Python loops, dict, float64; hypothesis);
- the ops pass ``torch.library.opcheck`` and the application's gradient is its transpose (gradcheck);
- the CRF's ``lattice`` backend agrees with pydensecrf (the oracle) on real photos at 500x375 / K=21 and
  640x480 / K=81 with network-like probabilities;
- CUDA twins (skipped without a GPU): the same lattice and CRF on the device equal the CPU's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from locbe.eval.crf import CRFParams, crf_labels_lattice, dense_crf, dense_crf_lattice
from locbe.lattice.op import Lattice, _filter, lattice_filter, ops
from locbe.lattice.reference import image_features, plain_lattice

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=[CUDA, pytest.mark.cuda])]


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


# ----------------------------------------------------------------------------- the lattice ops
@pytest.mark.parametrize("b, k", [(1, 3), (2, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("transpose", [False, True])
def test_build_once_apply_many_equals_lattice_filter(b, k, dtype, transpose):
    g = torch.Generator().manual_seed(b * 10 + k)
    image = torch.rand(b, 3, 19, 23, generator=g, dtype=torch.float64).mul(255).round().float()
    lattice = Lattice(image_features(image, 6.0, 12.0).to(dtype))
    for rep in range(3):  # one lattice, several value sets
        values = torch.rand(b, k, 19, 23, generator=g, dtype=dtype)
        want = _filter(image, values, 6.0, 12.0, transpose=transpose)
        got = lattice.apply(values, transpose=transpose)
        assert got.shape == values.shape and got.dtype == dtype
        assert torch.equal(got, want), (rep, (got - want).abs().max())
    assert lattice.points.shape == (b,) and bool((lattice.points > 0).all())


def test_apply_is_independent_of_the_channel_split_and_threads():
    """The CPU application splits an image's channels between threads: results do not depend on the split."""
    g = torch.Generator().manual_seed(5)
    image = torch.rand(1, 3, 30, 41, generator=g) * 255
    values = torch.rand(1, 7, 30, 41, generator=g)
    lattice = Lattice(image_features(image, 4.0, 9.0))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = lattice.apply(values)
        torch.set_num_threads(2)
        two = lattice.apply(values)
    finally:
        torch.set_num_threads(threads)
    per_channel = torch.cat([lattice.apply(values[:, c:c + 1]) for c in range(7)], dim=1)
    assert torch.equal(one, two) and torch.equal(one, per_channel)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d", [2, 5])
def test_pixel_major_values_give_the_same_result(d, device):
    """(B, N, K) memory passed as its (B, K, N) transpose: no copy, the output in the same layout, the values equal
    to the contiguous layout's (bitwise on the CPU: the same sums in the same order; CUDA's atomic splat adds in
    any order), out= included."""
    g = torch.Generator().manual_seed(d)
    lattice = Lattice((torch.rand(2, 300, d, generator=g) * 6).to(device))
    rows = torch.rand(2, 300, 7, generator=g).to(device)
    values = rows.transpose(1, 2)
    same = torch.equal if device == "cpu" else lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    want = lattice.apply(values.contiguous())
    for transpose in (False, True):
        got = lattice.apply(values, transpose=transpose)
        assert got.stride() == values.stride()
        assert same(got, lattice.apply(values.contiguous(), transpose=transpose))
    out = torch.empty_like(rows).transpose(1, 2)
    assert lattice.apply(values, out=out) is out and same(out, want)
    with pytest.raises(ValueError, match="layout"):
        lattice.apply(values, out=torch.empty(2, 7, 300, device=device))


@given(n=st.integers(1, 40), d=st.sampled_from([2, 5]), k=st.integers(1, 3), spread=st.floats(0.5, 8.0),
       transpose=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_lattice_equals_plain_reference(n, d, k, spread, transpose, seed):
    """Float32 elevation in the op, float64 in the reference: a point's simplex is the same except within rounding
    of a face, where the weight of the differing vertex is itself within rounding of 0; so the two agree to a few
    float32 ulps of the largest value (bound 1e-5 relative, measured <= 1e-6)."""
    g = torch.Generator().manual_seed(seed)
    f = torch.rand(1, n, d, generator=g, dtype=torch.float64) * spread
    f32 = f.float().double()  # the op rounds features to float32: give the reference the same point
    values = torch.randn(1, k, n, generator=g, dtype=torch.float64)
    got = Lattice(f32).apply(values, transpose=transpose)[0].numpy()
    want = plain_lattice(f32[0].numpy(), values[0].numpy(), transpose=transpose)
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


def test_plain_reference_is_a_gaussian_blur_shape():
    """The reference itself is not the op's code: on a 1-D row of pixels (d = 2, y = 0) it gives a symmetric,
    decreasing kernel whose own term is the largest, and W^T is the transpose of W."""
    n = 21
    f = np.stack([np.arange(n) / 2.0, np.zeros(n)], axis=1)
    w = plain_lattice(f, np.eye(n))  # column j = W e_j
    wt = plain_lattice(f, np.eye(n), transpose=True)
    np.testing.assert_allclose(wt, w.T, atol=1e-12)
    centre = w[:, n // 2]
    assert centre.argmax() == n // 2 and centre[n // 2] > 0
    assert np.all(np.diff(centre[n // 2:]) <= 1e-12) and np.all(np.diff(centre[:n // 2 + 1]) >= -1e-12)


def test_apply_gradient_is_its_transpose():
    g = torch.Generator().manual_seed(1)
    f = (torch.rand(2, 30, 2, generator=g, dtype=torch.float64) * 4)
    lattice = Lattice(f)
    values = torch.rand(2, 3, 30, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: lattice.apply(v), (values,))
    assert torch.autograd.gradgradcheck(lambda v: lattice.apply(v), (values,))


def test_opcheck_build_and_apply():
    ops()
    g = torch.Generator().manual_seed(2)
    for d in (2, 5):
        f = torch.rand(2, 40, d, generator=g) * 3
        torch.library.opcheck(torch.ops.locbe.lattice_build.default, (f,),
                              test_utils=("test_schema", "test_faketensor"))
        w, e, nb, off = torch.ops.locbe.lattice_build(f)
        for dtype in (torch.float32, torch.float64):
            values = torch.rand(2, 3, 40, generator=g, dtype=dtype, requires_grad=True)
            torch.library.opcheck(torch.ops.locbe.lattice_apply.default, (w.to(dtype), e, nb, off, values, False))
            rows = torch.rand(2, 40, 3, generator=g, dtype=dtype).transpose(1, 2)  # pixel-major
            torch.library.opcheck(torch.ops.locbe.lattice_apply.default, (w.to(dtype), e, nb, off, rows, True))
            out = torch.empty(2, 3, 40, dtype=dtype)
            torch.library.opcheck(torch.ops.locbe.lattice_apply_out.default,
                                  (w.to(dtype), e, nb, off, values.detach(), False, out))


def test_bad_inputs_raise_one_line():
    with pytest.raises(ValueError, match="feature dimension"):
        Lattice(torch.rand(1, 5, 3))
    with pytest.raises(ValueError, match="at most"):
        Lattice(torch.full((1, 4, 2), 5000.0))
    with pytest.raises(ValueError, match="finite"):
        Lattice(torch.tensor([[[float("nan"), 0.0]]]))
    lattice = Lattice(torch.rand(1, 6, 2))
    with pytest.raises(ValueError, match="pixels per channel"):
        lattice.apply(torch.rand(1, 2, 5))
    with pytest.raises((ValueError, RuntimeError), match="dtype"):
        lattice.apply(torch.rand(1, 2, 6, dtype=torch.float64))
    with pytest.raises((ValueError, RuntimeError), match="finite"):
        lattice.apply(torch.tensor([[[1.0, 2.0, float("inf"), 0.0, 0.0, 0.0]]]))


# ----------------------------------------------------------------------------- the CRF against pydensecrf
def photo(name: str, h: int, w: int) -> np.ndarray:
    """A scikit-image sample photo cropped (when large enough) or resized to h x w, uint8 RGB."""
    skdata = pytest.importorskip("skimage.data")
    im = getattr(skdata, name)()[..., :3]
    if im.shape[0] >= h and im.shape[1] >= w:
        return np.ascontiguousarray(im[:h, :w])
    from skimage.transform import resize

    return (resize(im, (h, w), order=1, anti_aliasing=True, preserve_range=True) + 0.5).astype(np.uint8)


def network_probs(k: int, h: int, w: int, seed: int, stride: int = 16, scale: float = 3.0) -> np.ndarray:
    """Softmax of low-resolution (stride 16) random logits upsampled bilinearly: smooth, confident in places and
    ambiguous along the boundaries between classes, as a segmentation network's output."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, k, -(-h // stride), -(-w // stride), generator=g) * scale
    up = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
    return torch.softmax(up, 1)[0].numpy()


CASES = [("astronaut", 375, 500, 21, 0), ("coffee", 375, 500, 21, 1), ("chelsea", 375, 500, 21, 2),
         ("rocket", 480, 640, 81, 3)]


@pytest.fixture(scope="module")
def agreement():
    """Both backends on every case, once: (case, pydensecrf probabilities, lattice probabilities)."""
    out = []
    for name, h, w, k, seed in CASES:
        image, probs = photo(name, h, w), network_probs(k, h, w, seed)
        ref = dense_crf(image, probs)
        got = dense_crf_lattice(torch.from_numpy(image)[None], torch.from_numpy(probs)[None])[0].numpy()
        out.append(((name, h, w, k, seed), ref, got))
    return out


def test_crf_labels_agree_with_pydensecrf(agreement):
    equal = total = 0
    for case, ref, got in agreement:
        same = (ref.argmax(0) == got.argmax(0))
        assert same.mean() >= 0.995, (case, same.mean())
        equal, total = equal + int(same.sum()), total + same.size
    assert equal / total >= 0.999, equal / total


def test_crf_probabilities_agree_with_pydensecrf(agreement):
    """pydensecrf sums in another order (SSE lanes, alpha folded into the slice weights, float32 features made by
    division) than the lattice (tiles, alpha after the sum, the same divisions): every step agrees to float32
    rounding (~1e-7 relative), and ten mean-field iterations amplify that only where a pixel's softmax is
    near a tie. Bound: 1e-3 absolute anywhere (measured <= 5e-5), 1e-6 mean absolute (measured <= 1e-8)."""
    for case, ref, got in agreement:
        diff = np.abs(ref - got)
        assert diff.max() <= 1e-3, (case, diff.max())
        assert diff.mean() <= 1e-6, (case, diff.mean())
        np.testing.assert_allclose(got.sum(0), 1.0, atol=1e-5)


def test_crf_is_not_the_identity_and_each_kernel_matters():
    """Guard against a CRF that agrees because it does nothing: on a photo the refined labels differ from the
    input's argmax, and dropping either kernel changes them (as it does pydensecrf's)."""
    image, probs = photo("astronaut", 64, 80), network_probs(5, 64, 80, seed=4, stride=8)
    im = torch.from_numpy(image)[None]
    pr = torch.from_numpy(probs)[None]
    full = dense_crf_lattice(im, pr)[0].numpy().argmax(0)
    assert (full != probs.argmax(0)).mean() > 0.01
    for params in (CRFParams(gauss_compat=0.0), CRFParams(bi_compat=0.0)):
        other = dense_crf_lattice(im, pr, params)[0].numpy().argmax(0)
        assert (other != full).any()
        assert (other == dense_crf(image, probs, params).argmax(0)).mean() >= 0.995


def test_crf_labels_lattice_keeps_order_and_batches_equal_sizes():
    jobs = [(photo("coffee", 40, 56), network_probs(4, 40, 56, s, stride=8)) for s in range(3)]
    jobs.insert(1, (photo("astronaut", 33, 47), network_probs(4, 33, 47, 9, stride=8)))
    labels = crf_labels_lattice(jobs, "cpu")
    for (image, probs), lab in zip(jobs, labels):
        want = dense_crf_lattice(torch.from_numpy(image)[None], torch.from_numpy(probs)[None])[0].argmax(0)
        assert lab.dtype == np.uint8 and np.array_equal(lab, want.numpy())


# ----------------------------------------------------------------------------- CUDA twins
@pytest.mark.parametrize("device", DEVICES)
def test_lattice_on_device_equals_cpu(device):
    g = torch.Generator().manual_seed(7)
    image = torch.rand(2, 3, 21, 26, generator=g) * 255
    values = torch.rand(2, 4, 21, 26, generator=g)
    for f in (image_features(image, 5.0, 10.0), torch.rand(2, 21 * 26, 2, generator=g) * 9):
        cpu = Lattice(f)
        dev = Lattice(f.to(device))
        assert dev.weights.device.type == device and torch.equal(dev.points.cpu(), cpu.points)
        for transpose in (False, True):
            torch.testing.assert_close(dev.apply(values.to(device).reshape(2, 4, -1), transpose).cpu(),
                                       cpu.apply(values.reshape(2, 4, -1), transpose), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lattice_filter(image.to(device), values.to(device), 5.0, 10.0).cpu(),
                               Lattice(image_features(image, 5.0, 10.0)).apply(values), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_crf_batch_on_device_equals_cpu(device):
    images = torch.from_numpy(np.stack([photo(n, 60, 72) for n in ("astronaut", "coffee")]))
    probs = torch.from_numpy(np.stack([network_probs(6, 60, 72, s, stride=8) for s in (0, 1)]))
    cpu = dense_crf_lattice(images, probs)
    dev = dense_crf_lattice(images.to(device), probs.to(device))
    assert dev.device.type == device
    torch.testing.assert_close(dev.cpu(), cpu, rtol=0, atol=1e-4)
    assert (dev.cpu().argmax(1) == cpu.argmax(1)).float().mean() >= 0.999
