"""Dense CRF post-processing: what pydensecrf's DenseCRF2D computes (shared/spec/crf.md), by two backends.

- ``lattice`` (the default): locbe's permutohedral lattice (``locbe.lattice.Lattice``), one lattice per kernel and
  image built once and applied 1 + 10 times, float32, on the device the tensors are on (a batch of equally sized
  images at a time; on the CPU in-process with torch's threads).
- ``pydensecrf``: pydensecrf itself (installed from the ``pydensecrf2`` distribution), one image per process; the
  oracle of the lattice backend's tests (tests/test_crf.py) and one flag away (``--crf-backend pydensecrf``).

Parameters of the evaluation protocol (method.md): 10 iterations, Gaussian sxy=1 compat=1,
bilateral sxy=121 srgb=5 compat=4, unary = -log(softmax probabilities).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from locbe.runtime.progress import progress_bar

BACKENDS = ("lattice", "pydensecrf")
DEFAULT_BACKEND = "lattice"


@dataclass(frozen=True)
class CRFParams:
    n_iter: int = 10
    gauss_sxy: float = 1.0
    gauss_compat: float = 1.0
    bi_sxy: float = 121.0
    bi_srgb: float = 5.0
    bi_compat: float = 4.0


def dense_crf(image: np.ndarray, probs: np.ndarray, params: CRFParams = CRFParams()) -> np.ndarray:
    """``image`` (H, W, 3) uint8, ``probs`` (C, H, W) summing to 1 over C -> refined probs (C, H, W)."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    c, h, w = probs.shape
    if image.shape[:2] != (h, w) or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (H, W, 3) matching probs {(h, w)}, got {image.dtype} {image.shape}")
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs.astype(np.float32))))
    d.addPairwiseGaussian(sxy=params.gauss_sxy, compat=params.gauss_compat)
    # pydensecrf takes a writable buffer only: a read-only image (np.asarray of a PIL image) is copied
    rgb = np.require(image, requirements=["C_CONTIGUOUS", "WRITEABLE"])
    d.addPairwiseBilateral(sxy=params.bi_sxy, srgb=params.bi_srgb, rgbim=rgb, compat=params.bi_compat)
    return np.asarray(d.inference(params.n_iter), dtype=np.float32).reshape(c, h, w)


def _pixel_features(images, sxy: float, srgb: float | None):
    """(B, N, 2) or (B, N, 5) float32 features of (B, H, W, 3) uint8 images, as DenseCRF2D makes them: column / sxy,
    row / sxy (and r, g, b / srgb), each a float32 division."""
    import torch

    b, h, w, _ = images.shape
    dev = images.device
    s_xy = torch.tensor(sxy, dtype=torch.float32, device=dev)
    ys, xs = torch.meshgrid(torch.arange(h, device=dev, dtype=torch.float32),
                            torch.arange(w, device=dev, dtype=torch.float32), indexing="ij")
    pos = torch.stack([xs.reshape(-1) / s_xy, ys.reshape(-1) / s_xy], dim=-1).unsqueeze(0).expand(b, -1, -1)
    if srgb is None:
        return pos.contiguous()
    rgb = images.reshape(b, h * w, 3).to(torch.float32) / torch.tensor(srgb, dtype=torch.float32, device=dev)
    return torch.cat([pos, rgb], dim=-1).contiguous()


def dense_crf_lattice(images, probs, params: CRFParams = CRFParams()):
    """The dense CRF on locbe's lattice for a batch of equally sized images: ``images`` (B, H, W, 3) uint8 and
    ``probs`` (B, C, H, W) float (summing to 1 over C), torch tensors on one device -> refined probabilities
    (B, C, H, W) float32 on that device (a view of pixel-major memory: ``.contiguous()`` where that matters).
    Each step is the one of shared/spec/crf.md; the two lattices (xy and
    xy-rgb) are built once and applied 1 (normalisation) + ``n_iter`` times each."""
    import torch

    from locbe.lattice import Lattice

    if images.dim() != 4 or images.shape[-1] != 3 or images.dtype != torch.uint8:
        raise ValueError(f"images must be (B, H, W, 3) uint8, got {images.dtype} {tuple(images.shape)}")
    b, c, h, w = probs.shape
    if images.shape[:3] != (b, h, w) or images.device != probs.device:
        raise ValueError(f"images {tuple(images.shape)} on {images.device} do not match probs {tuple(probs.shape)} "
                         f"on {probs.device}")
    n = h * w
    # pixel-major (B, N, C) buffers, as pydensecrf holds Q: the lattice takes their (B, C, N) transposes without a
    # copy (rows of C channels per pixel, no transposition in splat and slice) and the softmax runs over the
    # contiguous last dimension
    q = probs.to(torch.float32).reshape(b, c, n).transpose(1, 2).contiguous()
    neg_unary = torch.log(q.clamp(1e-5, 1.0))  # -U: U = -log(clip(P, 1e-5, 1)), pydensecrf.utils.unary_from_softmax
    specs = [(sxy, srgb, float(weight)) for sxy, srgb, weight in ((params.gauss_sxy, None, params.gauss_compat),
                                                                  (params.bi_sxy, params.bi_srgb, params.bi_compat))
             if weight != 0]  # pydensecrf filters and multiplies by 0: the same energy (no NaN/inf here)

    def build(spec):
        sxy, srgb, weight = spec
        lattice = Lattice(_pixel_features(images, sxy, srgb))
        ones = torch.ones(b, 1, n, dtype=torch.float32, device=probs.device)
        # NORMALIZE_SYMMETRIC: F(Q) = s * L(s * Q), s = 1 / sqrt(L(1) + 1e-20); s is folded into the lattice's
        # splat and slice weights, so that each application computes F directly
        lattice.scale_pixels_(torch.rsqrt(lattice.apply(ones) + 1e-20))
        return lattice, weight, torch.empty_like(q)

    if probs.device.type == "cpu" and len(specs) > 1 and torch.get_num_threads() > 1:
        # a lattice is built by one thread per image: the two kernels' builds side by side (the op releases the GIL)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(specs)) as pool:
            kernels = list(pool.map(build, specs))
    else:
        kernels = [build(spec) for spec in specs]
    # softmax over classes (max subtracted, as pydensecrf's expAndNormalize), into q's buffer: no allocation per
    # iteration (a 640x480 image with 81 classes is 100 MB per tensor)
    q = torch.softmax(neg_unary, dim=2)
    energy = torch.empty_like(q)
    for _ in range(params.n_iter):
        energy.copy_(neg_unary)
        for lattice, weight, out in kernels:  # Potts: the message is -weight x F(Q), subtracted from -U
            lattice.apply(q.transpose(1, 2), out=out.transpose(1, 2))
            energy.add_(out, alpha=weight)
        torch.ops.aten._softmax.out(energy, 2, False, out=q)
    return q.transpose(1, 2).reshape(b, c, h, w)  # a (B, C, H, W) view of the pixel-major result


def crf_labels_lattice(jobs, device, params: CRFParams = CRFParams(), max_batch: int = 8):
    """CRF label maps (uint8 numpy) for ``(image (H, W, 3) uint8, probs (C, H, W))`` pairs, in input order, on
    ``device``: equally sized images go through in batches of up to ``max_batch`` (on the CPU: one at a time)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        max_batch = 1
    out: list = [None] * len(jobs)
    groups: dict[tuple, list[int]] = {}
    for j, (image, probs) in enumerate(jobs):
        groups.setdefault((tuple(image.shape), tuple(probs.shape)), []).append(j)
    for idx in groups.values():
        for s in range(0, len(idx), max_batch):
            part = idx[s:s + max_batch]
            images = torch.stack([torch.as_tensor(np.asarray(jobs[j][0])) for j in part]).to(device)
            probs = torch.stack([torch.as_tensor(jobs[j][1]) for j in part]).to(device)
            labels = dense_crf_lattice(images, probs, params).argmax(1).to(torch.uint8).cpu().numpy()
            for j, lab in zip(part, labels):
                out[j] = lab
    return out


def crf_job(args):
    """``(image, probs, params)`` -> CRF label map (uint8); a top-level function, so process pools can run it."""
    image, probs, params = args
    return dense_crf(image, probs, params).argmax(0).astype(np.uint8)


_crf_job = crf_job


def crf_labels_parallel(jobs, workers: int, params: CRFParams = CRFParams(), progress: bool = True):
    """Yield CRF label maps for (image, probs) pairs, ``workers`` processes, in input order."""
    from multiprocessing import get_context

    jobs = [(im, p, params) for im, p in jobs]
    bar = progress_bar(total=len(jobs), desc="dense CRF", unit="img", disable=not progress)
    if workers <= 1:
        for j in jobs:
            yield _crf_job(j)
            bar.update(1)
    else:
        with get_context("spawn").Pool(workers) as pool:
            for out in pool.imap(_crf_job, jobs, chunksize=1):
                yield out
                bar.update(1)
    bar.close()
