"""Dense CRF post-processing with pydensecrf (installed from the ``pydensecrf2`` distribution).

Parameters of the evaluation protocol (method.md): 10 iterations, Gaussian sxy=1 compat=1,
bilateral sxy=121 srgb=5 compat=4, unary = -log(softmax probabilities).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from locbe.runtime.progress import progress_bar


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
