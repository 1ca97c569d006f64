"""Per-pixel uncertainty of an SR ion image, without a ground truth.

Up to three parts, added in quadrature:

* **model spread**: the standard deviation of the held-out-fold models' SR predictions (each was
  trained without one fold of the LR pixels), i.e. how much the answer depends on which
  measurements the model saw;
* **measurement noise**: the spread a single SR pixel of that intensity has around its expected
  value. Ion counts are noisy pixel by pixel and the noise grows with the signal, so it is
  modelled as variance = a·intensity + b and fitted on the LR image itself: the residual of
  each LR pixel from its 3 × 3 neighbourhood mean measures the LR noise, and an LR pixel averages
  F² SR pixels, so the SR variance is F² times the LR one. Real structure inside a 3 × 3
  neighbourhood counts as noise here, which makes the estimate err on the cautious side.
* **within-pixel error one scale up**, where the scale-transfer check ran (:mod:`._scale_check`):
  |prediction − measured| of the same method fitted LLR → LR, on the LR grid, upsampled bicubically.
  It is the only part that sees where the detail drawn inside a pixel went wrong; the other two
  see only which data the model saw and how noisy the measurement is.
"""

from __future__ import annotations

import numpy as np


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


def uncertainty_map(
    sr: np.ndarray,
    spread: np.ndarray,
    lr: np.ndarray,
    mask_lr: np.ndarray,
    factor: int,
    detail: np.ndarray | None = None,
) -> np.ndarray:
    """Predictive standard deviation (C, h·F, w·F) of an SR stack: model spread ⊕ measurement noise (⊕ detail).

    Parameters
    ----------
    sr : ndarray, shape (C, h·F, w·F)
        The SR stack (its intensities set the noise level).
    spread : ndarray, same shape
        Standard deviation across the fold models.
    lr, mask_lr, factor
        The measurement, its tissue pixels and F, for the noise model.
    detail : ndarray, same shape, optional
        The scale-transfer residual on the SR grid (:func:`detail_on_sr_grid`).
    """
    coef = noise_variance_model(lr, mask_lr)
    noise_var = factor**2 * (coef[:, 0, None, None] * np.maximum(sr, 0.0) + coef[:, 1, None, None])
    var = np.asarray(spread, np.float64) ** 2 + noise_var
    if detail is not None:
        var += np.asarray(detail, np.float64) ** 2
    return np.sqrt(var).astype(np.float32)


def detail_on_sr_grid(residual: np.ndarray, scored: np.ndarray, lr_shape: tuple[int, int], factor: int) -> np.ndarray:
    """The scale-transfer residual (C, h', w') on the (cropped) LR grid → (C, h·F, w·F) on the SR grid.

    LR pixels that were not scored (off tissue, or cut by the crop to a multiple of F) take their
    nearest scored pixel's value, as bicubic upsampling fills non-tissue pixels.
    """
    from .baselines import bicubic_upsample

    n_ch, (rows, cols) = residual.shape[0], lr_shape
    full = np.full((n_ch, rows, cols), np.nan)
    full[:, : residual.shape[1], : residual.shape[2]] = np.where(scored[None], residual, np.nan)
    on = np.zeros((rows, cols), bool)
    on[: scored.shape[0], : scored.shape[1]] = scored
    return np.maximum(bicubic_upsample(full, factor, mask_lr=on), 0.0)
