"""The lattice filter as a PyTorch custom op (the engine's Python side; the loss that uses it is
locbe/method/regloss.py).

``locbe::lattice_filter`` is defined in C++ (``TORCH_LIBRARY`` in cuda/lattice_cpu.cpp, CPU and CUDA kernels).
This module adds what torch.library wants from Python: a fake (meta) kernel, so that torch.compile and
FakeTensor tracing know the output without running it, and the autograd formula (``register_autograd``):
the VJP of W is W^T, the same op with the axis blurs in reverse order, so double backward works too.
"""

from __future__ import annotations

import math

import torch

from locbe.lattice.build import load_extension
from locbe.lattice.checks import MAX_FEATURE, check_inputs

OP = "locbe::lattice_filter"
BUILD_OP = "locbe::lattice_build"
APPLY_OP = "locbe::lattice_apply"
APPLY_OUT_OP = "locbe::lattice_apply_out"
DIMS = (2, 5)  # the feature dimensions compiled (cuda/lattice_filter.h LOCBE_DISPATCH_DIM)
_registered = False


def _fake(image, values, sigma_xy, sigma_rgb, reverse=False, atomic_splat=False):
    torch._check(image.dim() == 4 and image.shape[1] == 3, lambda: "image must be (B, 3, H, W)")
    torch._check(values.dim() == 4, lambda: "values must be (B, K, H, W)")
    torch._check(values.dtype in (torch.float32, torch.float64), lambda: "values must be float32 or float64")
    return values.new_empty(values.shape)  # the kernel returns a contiguous tensor of values' dtype


def _setup_context(ctx, inputs, output):
    image, _, sigma_xy, sigma_rgb, reverse, atomic_splat = inputs
    ctx.save_for_backward(image)
    ctx.args = (sigma_xy, sigma_rgb, not reverse, atomic_splat)


def _backward(ctx, grad):
    (image,) = ctx.saved_tensors
    # W^T grad: each axis blur is symmetric, their product is not (they do not commute), so the transpose
    # blurs the axes in reverse order. Not differentiable in the image (the lattice is piecewise constant in it).
    return None, torch.ops.locbe.lattice_filter(image, grad, *ctx.args), None, None, None, None


def _fake_build(features):
    torch._check(features.dim() == 3, lambda: "features must be (B, N, D)")
    torch._check(features.dtype in (torch.float32, torch.float64), lambda: "features must be float32 or float64")
    b, n, d = features.shape
    m = torch.library.get_ctx().new_dynamic_size()  # the lattice's size depends on the data
    return (features.new_empty((b, n, d + 1)), features.new_empty((b, n, d + 1), dtype=torch.int32),
            features.new_empty((m,), dtype=torch.int32), features.new_empty((b + 1,), dtype=torch.int64))


def _pixel_major(t) -> bool:
    """(B, K, N) values whose memory is (B, N, K): the op takes them as they are (cuda/lattice_filter.h)."""
    return t.dim() == 3 and t.shape[1] > 1 and t.stride() == (t.shape[1] * t.shape[2], 1, t.shape[1])


def _fake_apply(weights, entries, neighbours, offsets, values, reverse=False):
    torch._check(values.dtype == weights.dtype, lambda: "values must have the lattice weights' dtype")
    if _pixel_major(values):  # the output has the values' layout
        return torch.empty_strided(values.shape, values.stride(), dtype=values.dtype, device=values.device)
    return values.new_empty(values.shape)


def _fake_apply_out(weights, entries, neighbours, offsets, values, reverse, out):
    torch._check(values.dtype == weights.dtype, lambda: "values must have the lattice weights' dtype")
    torch._check(out.shape == values.shape and out.dtype == values.dtype, lambda: "out must match the values")
    return None


def _apply_setup_context(ctx, inputs, output):
    weights, entries, neighbours, offsets, _, reverse = inputs
    ctx.save_for_backward(weights, entries, neighbours, offsets)
    ctx.reverse = reverse


def _apply_backward(ctx, grad):
    # the VJP of W is W^T: the same lattice with the axis blurs in reverse order (see _backward)
    return (None, None, None, None, torch.ops.locbe.lattice_apply(*ctx.saved_tensors, grad, not ctx.reverse), None)


def ops():
    """``torch.ops.locbe`` with the op library loaded (built on first use) and its Python parts registered."""
    global _registered
    namespace = load_extension()
    if not _registered:
        torch.library.register_fake(OP)(_fake)
        torch.library.register_autograd(OP, _backward, setup_context=_setup_context)
        torch.library.register_fake(BUILD_OP)(_fake_build)
        torch.library.register_fake(APPLY_OP)(_fake_apply)
        torch.library.register_fake(APPLY_OUT_OP)(_fake_apply_out)
        torch.library.register_autograd(APPLY_OP, _apply_backward, setup_context=_apply_setup_context)
        _registered = True
    return namespace


def _filter(image_255, values, sigma_xy, sigma_rgb, transpose: bool = False, atomic_splat: bool = False):
    """The op without input checks. ``transpose`` gives W^T; ``atomic_splat`` forces the atomic scatter splat
    (CUDA's default) on the CPU too. Honours torch.use_deterministic_algorithms (ordered splat)."""
    return ops().lattice_filter(image_255, values, float(sigma_xy), float(sigma_rgb), transpose, atomic_splat)


def lattice_filter(image_255: torch.Tensor, values: torch.Tensor, sigma_xy: float = 50.0,
                   sigma_rgb: float = 15.0) -> torch.Tensor:
    """W S for all K channels at once (permutohedral lattice), differentiable in ``values``."""
    check_inputs(image_255, values, sigma_xy, sigma_rgb)
    return _filter(image_255, values, sigma_xy, sigma_rgb)


class Lattice:
    """A batch of permutohedral lattices built once from features and applied many times (``locbe::lattice_build``
    and ``locbe::lattice_apply``). Every tensor lives on the features' device; ``apply`` is differentiable in the
    values (its VJP is ``apply(..., transpose=True)``).

    ``features``: (B, N, D) with D in ``DIMS``, float32 or float64 (the weights take that dtype; the elevation is
    float32 arithmetic either way), already divided by the kernel's standard deviations. ``apply(values)`` takes
    (B, K, ...) with N pixels per channel and returns W values (the lattice's Gaussian filter, the pixel's own term
    kept, alpha = 1 / (1 + 2^-D)); ``transpose=True`` returns W^T values.
    """

    def __init__(self, features: torch.Tensor):
        if not torch.is_tensor(features) or features.dim() != 3:
            raise ValueError(f"features must be a (B, N, D) tensor, got {getattr(features, 'shape', type(features))}")
        if features.shape[2] not in DIMS:
            raise ValueError(f"feature dimension must be one of {DIMS}, got {features.shape[2]}")
        if features.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"features must be float32 or float64, got {features.dtype}")
        if not torch.compiler.is_compiling() and features.numel():
            largest = float(features.detach().abs().amax())
            if not largest <= MAX_FEATURE:  # also NaN
                raise ValueError(f"features must be finite and at most {MAX_FEATURE} in absolute value, got "
                                 f"{largest}: divide them by larger standard deviations")
        self.batch, self.pixels, self.dim = features.shape
        self.weights, self.entries, self.neighbours, self.offsets = ops().lattice_build(features)

    @property
    def points(self) -> torch.Tensor:
        """(B,) lattice points per image."""
        return self.offsets.diff()

    def apply(self, values: torch.Tensor, transpose: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
        """W values (W^T with ``transpose``); with ``out`` (a tensor of the values' shape, dtype and layout, not the
        values) the result is written there (no allocation: the CRF reuses its buffers; not differentiable).
        Values are (B, K, ...) contiguous, or pixel-major: a (B, N, K) tensor transposed to (B, K, N), taken
        without a copy (its output is pixel-major too)."""
        if values.dim() < 2 or values.shape[0] != self.batch or math.prod(values.shape[2:]) != self.pixels:
            raise ValueError(f"values must be (B={self.batch}, K, ...) with {self.pixels} pixels per channel, got "
                             f"{tuple(values.shape)}")
        if out is None:
            return ops().lattice_apply(self.weights, self.entries, self.neighbours, self.offsets, values, transpose)
        ops().lattice_apply_out(self.weights, self.entries, self.neighbours, self.offsets, values, transpose, out)
        return out

    def scale_pixels_(self, scale: torch.Tensor) -> Lattice:
        """Multiplies pixel i's splat and slice weights by ``scale[b, i]`` (a (B, N) or (B, 1, N) tensor), in place:
        ``apply`` then computes diag(s) W diag(s) values, e.g. the dense CRF's symmetric normalisation
        (s = 1 / sqrt(W 1)) without two extra passes over the values per application."""
        self.weights.mul_(scale.reshape(self.batch, self.pixels, 1).to(self.weights.dtype))
        return self

