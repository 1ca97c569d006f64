"""Per-pixel uncertainty of an SR ion image, without a ground truth: three parts, weights calibrated on the data.

The parts, each a variance on the grid of the SR image it describes (per channel):

* **model spread** S²: the variance of the held-out-fold models' SR predictions (each was trained
  without one fold of the LR pixels), i.e. how much the answer depends on which measurements the
  model saw;
* **measurement noise** N²: the variance a single SR pixel of that intensity has around its
  expected value. Ion counts are noisy pixel by pixel and the noise grows with the signal, so it is
  modelled as variance = a·intensity + b and fitted on the LR image itself: the residual of each
  LR pixel from its 3 × 3 neighbourhood mean measures the LR noise, and an LR pixel averages F² SR
  pixels, so the SR variance is F² times the LR one;
* **unresolved structure** G²: the squared change of the SR image across one measured pixel,
  (F · |central-difference gradient|)², computed from each pixel's four neighbours. With the
  block means conserved, the SR error lies *inside* the measured pixels, and it concentrates where
  the signal varies within a pixel (edges, texture): neither the spread nor the noise model sees it;
* **structure where the histology varies** G²·V: the structure part times the relative variation
  of the H&E features inside the measured pixel (each cell's squared distance, in the standardised
  feature space the network sees, from the mean of its pixel's cells, divided by its mean over the
  tissue). The SR image's gradient says the ion changes near here, the H&E says whether it changes
  *inside this pixel*, where the measurement cannot tell how. Without features it is left out
  (weight 0).

The map is sqrt(w_S·S² + w_N·N² + w_G·G² + w_V·G²·V), with per-channel weights w ≥ 0 **calibrated on a
super-resolution task one scale up, where the truth is known**: the measured LR image is pooled by
k = 2 (block means over tissue, as :mod:`._scale_check` pools), the H&E-free control (bicubic +
exact back-projection) super-resolves it back, and its squared error against the measured LR
pixels is fitted by non-negative least squares to the same three parts computed on that task: the
control's fold spread (blocked folds of the pooled pixels, the SR fit's number of folds and seed),
the LR noise model at the control's intensity (an output pixel of that task is an LR pixel), and
(k · |gradient|)² of the control. The parts are defined per output pixel and per input pixel, so
the weights carry over to the SR grid as they are, whatever F: a step edge of height h is spread by
an interpolant over one input pixel and errs by about h/2 next to it at any factor, and the change
across one input pixel is about h at any factor. k = 2 rather than F: it is the task with the most
pooled pixels (F² / 4 times more than pooling by F), it exists for every LR image with an interior
pooled tissue pixel (the cerebellum at F = 4, LR 10 × 9, pools to 5 × 4 by 2 but to 3 × 3 by 3
and 2 × 2 by 4), and it is the same task at every F. What carries over is assumed, not measured: the
structure one scale up is taken to look like the structure below the pixel (self-similarity), and
the control's error and fold spread to behave like SMSDL's (on a channel that fell back, SMSDL's
output *is* the control). Where no pooled pixel is interior, the unit weights (S² + N², the map
before calibration) are used, and so they are for a channel whose calibrated map would be constant
over the tissue (all its weight on parts that do not vary there, e.g. a noise level that does not
grow with the signal): the task found nothing that ranks the error, and a flat map would show the
user nothing; the unit weights at least rank by the fold spread (``Calibration.flat``). The held-out
LR residuals are not used as the target: they measure
an error *between* pixels (the pixel mean predicted across a gap), which the fold spread predicts
well, while with the block means conserved the SR error lies *within* the pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from ._scale_check import _pool_mask, pool_measurement
from .baselines.backprojection import block_mean
from .baselines.grid import upsample_mask

#: the parts of the uncertainty, in the order of the calibrated weights
PARTS = ("spread", "noise", "structure", "histology structure")
#: the weights where no task one scale up is possible: the map before calibration (spread ⊕ noise)
UNIT_WEIGHTS = (1.0, 1.0, 0.0, 0.0)
#: the pooling factor of the calibration task (see the module notes: the smallest, with the most pixels)
CALIBRATION_FACTOR = 2


def noise_variance_model(lr: np.ndarray, mask_lr: np.ndarray) -> np.ndarray:
    """Per-channel (a, b) of LR noise variance = a·mean + b, fitted by least squares, both ≥ 0.

    Returns an array of shape (C, 2).
    """
    from scipy.ndimage import uniform_filter

    lr = np.nan_to_num(np.asarray(lr, np.float64))
    m = np.asarray(mask_lr, bool)
    out = np.zeros((lr.shape[0], 2))
    if m.sum() < 9:
        return out
    weights = uniform_filter(m.astype(float), 3, mode="nearest")
    inner = m & (weights > 0.99)  # pixels whose whole 3 × 3 neighbourhood is tissue
    if inner.sum() < 9:
        inner = m
    for c in range(lr.shape[0]):
        local = uniform_filter(lr[c], 3, mode="nearest")
        res2 = (lr[c] - local)[inner] ** 2 * 9.0 / 8.0  # E[(x - mean of 9)²] = 8/9 σ² for white noise
        mu = np.maximum(local[inner], 0.0)
        a_mat = np.c_[mu, np.ones_like(mu)]
        coef, *_ = np.linalg.lstsq(a_mat, res2, rcond=None)
        if coef[0] < 0:  # no growth with the signal: a constant variance
            coef = np.array([0.0, res2.mean()])
        elif coef[1] < 0:
            coef = np.array([float(mu @ res2 / max(mu @ mu, 1e-12)), 0.0])
        out[c] = coef
    return out


def structure_variance(sr: np.ndarray, factor: int) -> np.ndarray:
    """(F · |central-difference gradient|)² of every pixel of (C, H, W): the change across one input pixel.

    Each pixel's value comes from its four neighbours only (edge pixels repeat their own value, a
    one-sided difference of half the step).
    """
    p = np.pad(np.asarray(sr, np.float64), ((0, 0), (1, 1), (1, 1)), mode="edge")
    gx = (p[:, 1:-1, 2:] - p[:, 1:-1, :-2]) / 2.0
    gy = (p[:, 2:, 1:-1] - p[:, :-2, 1:-1]) / 2.0
    return float(factor) ** 2 * (gx**2 + gy**2)


def histology_variation(features: np.ndarray, block: int, mask: np.ndarray) -> np.ndarray:
    """(H, W) relative variation of features (D, H, W) inside each ``block`` × ``block`` pixel.

    Each cell's squared distance from its block's mean feature vector, divided by the mean of that
    over ``mask`` (so the map is 1 on average over the tissue, whatever the features' scale); all
    zero where the features do not vary inside any block. H and W are multiples of ``block``.
    """
    d, h, w = features.shape
    m = np.asarray(mask, bool)
    out = np.zeros((h, w))
    total = 0.0  # the features' whole variance over the mask: what "no variation inside pixels" is relative to
    for f in features:  # one feature at a time: no (D, H, W) float64 copy
        f = np.asarray(f, np.float64)
        out += (f - np.repeat(np.repeat(block_mean(f, block), block, 0), block, 1)) ** 2
        total += float(f[m].var()) if m.any() else 0.0
    scale = out[m].mean() if m.any() else 0.0
    return out / scale if scale > 1e-9 * total else np.zeros_like(out)


def _parts(pred: np.ndarray, spread: np.ndarray, coef: np.ndarray, grid_factor: int, factor: int,
           variation: np.ndarray | None = None) -> np.ndarray:
    """(4, C, H, W): spread², noise² (per pixel of a grid ``grid_factor`` finer than the LR), structure²,
    structure² × the histology's variation inside the pixel (``variation``, (H, W); zero without it)."""
    noise = grid_factor**2 * (coef[:, 0, None, None] * np.maximum(pred, 0.0) + coef[:, 1, None, None])
    structure = structure_variance(pred, factor)
    hist = structure * variation[None] if variation is not None else np.zeros_like(structure)
    return np.stack([np.asarray(spread, np.float64) ** 2, noise, structure, hist])


@dataclass(frozen=True)
class Calibration:
    """Per-channel weights (C, 3) of the parts :data:`PARTS`, and how they were found."""

    weights: np.ndarray
    factors: list  # every k of a task one scale up; empty where none was possible (unit weights)
    pixels: int  # LR pixels scored by the calibration, all tasks together
    #: channels whose calibrated map was constant over the tissue: they get the unit weights instead
    flat: list = field(default_factory=list)

    def to_dict(self) -> dict:
        ks = ", ".join(str(k) for k in self.factors)
        return {"parts": list(PARTS), "weights": self.weights.tolist(), "pooling_factors": list(self.factors),
                "pixels": self.pixels, "unit_weights_where_flat": [int(c) for c in self.flat],
                "how": ("non-negative least squares of the H&E-free control's squared error one scale up "
                        f"(LR pooled by {ks} and super-resolved back, scored on the measured LR)")
                if self.factors else "unit weights: the LR image is too small for a task one scale up"}


def _has_interior(mask: np.ndarray) -> bool:
    p = np.pad(np.asarray(mask, bool), 1)
    return bool((p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]).any())


def calibration_factors(mask_lr: np.ndarray) -> list[int]:
    """[2] when the LR pooled by 2 has an interior tissue pixel (the control interpolates somewhere), else []."""
    m = np.asarray(mask_lr, bool)
    k = CALIBRATION_FACTOR
    return [k] if min(m.shape) >= 3 * k and _has_interior(_pool_mask(m, k)) else []


def _task(lr: np.ndarray, m: np.ndarray, k: int, coef: np.ndarray, folds: int, seed: int,
          features_lr: np.ndarray | None = None):
    """The control's parts (4, C, n) and squared error (C, n) on the LR pixels scored by the task pooled by k.

    ``features_lr`` (D, h, w): the features averaged over each LR pixel's cells, for the histology part.
    """
    from ._heldout import blocked_folds
    from .baselines import bicubic_upsample
    from .baselines.backprojection import Conservation, conserve

    llr, mask_llr, lr_c, score = pool_measurement(lr, m, k)
    control = conserve(bicubic_upsample(np.where(mask_llr[None], llr, np.nan), k, mask_lr=mask_llr), llr, k, mask_llr,
                       Conservation.EXACT).astype(np.float64)
    n_folds = max(2, min(folds, int(mask_llr.sum()) // 2))
    fold_of = blocked_folds(mask_llr, n_folds, seed=seed)
    preds = []
    for i in range(n_folds):
        train = mask_llr & (fold_of != i)
        bic = bicubic_upsample(np.where(train[None], llr, np.nan), k, mask_lr=train)
        preds.append(conserve(bic, llr, k, train, Conservation.EXACT))
    spread = np.std(preds, axis=0, ddof=1)
    variation = None
    if features_lr is not None:
        h, w = score.shape
        variation = histology_variation(np.asarray(features_lr)[:, :h, :w], k, score)
    # an output pixel of this task is an LR pixel: its noise is the LR noise model itself
    return _parts(control, spread, coef, 1, k, variation)[:, :, score], (control - lr_c)[:, score] ** 2


def calibrate(lr: np.ndarray, mask_lr: np.ndarray, coef: np.ndarray | None = None, *,
              folds: int = 5, seed: int = 0, features_lr: np.ndarray | None = None) -> Calibration:
    """Weights of the parts from the task one scale up (see the module notes); no ground truth used.

    The weights do not depend on F: the parts are defined so that they carry over between scales.

    ``coef`` is the LR noise model (:func:`noise_variance_model`); ``folds`` and ``seed`` set the
    blocked folds of the pooled pixels for the control's fold spread, as the SR fit's folds;
    ``features_lr`` (D, h, w), the features averaged over each LR pixel's cells, enables the
    histology part (without them its weight is 0).
    """
    from scipy.optimize import nnls

    lr = np.nan_to_num(np.asarray(lr, np.float64))
    m = np.asarray(mask_lr, bool)
    n_ch = lr.shape[0]
    if coef is None:
        coef = noise_variance_model(lr, m)
    unit = np.tile(UNIT_WEIGHTS, (n_ch, 1))
    ks = calibration_factors(m)
    if not ks:
        return Calibration(unit, [], 0)
    tasks = [_task(lr, m, k, coef, folds, seed, features_lr) for k in ks]
    parts = np.concatenate([t[0] for t in tasks], axis=2)
    target = np.concatenate([t[1] for t in tasks], axis=1)
    weights = unit.copy()
    for c in range(n_ch):
        a = parts[:, c].T
        norm = a.max(axis=0)
        norm[norm <= 0] = 1.0
        w, _ = nnls(a / norm, target[c])
        if np.any(w > 0):
            weights[c] = w / norm
    return Calibration(weights, ks, int(target.shape[1]))


def uncertainty_map(
    sr: np.ndarray,
    spread: np.ndarray,
    lr: np.ndarray,
    mask_lr: np.ndarray,
    factor: int,
    *,
    folds: int = 5,
    seed: int = 0,
    features: np.ndarray | None = None,
) -> tuple[np.ndarray, Calibration]:
    """Predictive standard deviation (C, h·F, w·F) of an SR stack, and the calibration of its parts.

    Parameters
    ----------
    sr : ndarray, shape (C, h·F, w·F)
        The SR stack (its intensities set the noise level, its gradient the structure part).
    spread : ndarray, same shape
        Standard deviation across the fold models.
    lr, mask_lr, factor
        The measurement, its tissue pixels and F, for the noise model and the calibration.
    folds, seed
        The blocked folds of the calibration's control (as the SR fit's).
    features : ndarray, shape (D, h·F·w·F) or (D, h·F, w·F), optional
        The standardised features the network saw, for the histology part (left out without them).
    """
    lr = np.nan_to_num(np.asarray(lr, np.float64))
    coef = noise_variance_model(lr, mask_lr)
    variation = features_lr = None
    if features is not None:
        rows, cols = np.shape(sr)[1:]
        grid = np.asarray(features).reshape(-1, rows, cols)
        variation = histology_variation(grid, factor, upsample_mask(mask_lr, factor))
        features_lr = np.stack([block_mean(np.asarray(f, np.float64)[None], factor)[0] for f in grid])
    calib = calibrate(lr, mask_lr, coef, folds=folds, seed=seed, features_lr=features_lr)
    tissue = upsample_mask(mask_lr, factor)
    out = np.empty(np.shape(sr), np.float32)
    weights, flat = calib.weights.copy(), []
    for c in range(out.shape[0]):  # one channel at a time: four SR-sized float64 parts, not 4·C
        parts = _parts(np.asarray(sr[c : c + 1], np.float64), spread[c : c + 1], coef[c : c + 1], factor, factor,
                       variation)
        out[c] = np.sqrt(np.tensordot(weights[c], parts[:, 0], axes=1))
        if tissue.any() and np.ptp(out[c][tissue]) == 0 and np.ptp(parts[:, 0][:, tissue], axis=1).any():
            # the calibration found nothing that ranks the error: the map before calibration (see the notes)
            weights[c], flat = UNIT_WEIGHTS, [*flat, c]
            out[c] = np.sqrt(np.tensordot(weights[c], parts[:, 0], axes=1))
    return out, (replace(calib, weights=weights, flat=flat) if flat else calib)
