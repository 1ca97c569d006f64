"""Per-pixel uncertainty of an SR ion image, without a ground truth.

Two parts, added in quadrature:

* **model spread**: the standard deviation of the held-out-fold models' SR predictions (each was
  trained without one fold of the LR pixels), i.e. how much the answer depends on which
  measurements the model saw;
* **measurement noise**: the spread a single SR pixel of that intensity has around its expected
  value. Ion counts are noisy pixel by pixel and the noise grows with the signal, so it is
  modelled as variance = a·intensity + b and fitted on the LR image itself: the residual of
  each LR pixel from its 3 × 3 neighbourhood mean measures the LR noise, and an LR pixel averages
  F² SR pixels, so the SR variance is F² times the LR one. Real structure inside a 3 × 3
  neighbourhood counts as noise here, which makes the estimate err on the cautious side.
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
) -> np.ndarray:
    """Predictive standard deviation (C, h·F, w·F) of an SR stack: model spread ⊕ measurement noise.

    Parameters
    ----------
    sr : ndarray, shape (C, h·F, w·F)
        The SR stack (its intensities set the noise level).
    spread : ndarray, same shape
        Standard deviation across the fold models.
    lr, mask_lr, factor
        The measurement, its tissue pixels and F, for the noise model.
    """
    coef = noise_variance_model(lr, mask_lr)
    noise_var = factor**2 * (coef[:, 0, None, None] * np.maximum(sr, 0.0) + coef[:, 1, None, None])
    return np.sqrt(np.asarray(spread, np.float64) ** 2 + noise_var).astype(np.float32)
