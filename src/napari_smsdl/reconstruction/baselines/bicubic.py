"""Bicubic interpolation baseline (BI), pixel-centre aligned, NumPy only."""

from __future__ import annotations

import numpy as np

from ...errors import InputError
from .grid import _check_factor, fill_nearest_tissue, upsample_mask

#: Keys (1981) cubic-convolution parameter; −0.5 is MATLAB's ``imresize`` bicubic.
KEYS_A = -0.5


def _keys(x: np.ndarray, a: float = KEYS_A) -> np.ndarray:
    x = np.abs(x)
    w = np.zeros_like(x)
    near = x <= 1
    far = (x > 1) & (x < 2)
    w[near] = (a + 2) * x[near] ** 3 - (a + 3) * x[near] ** 2 + 1
    w[far] = a * x[far] ** 3 - 5 * a * x[far] ** 2 + 8 * a * x[far] - 4 * a
    return w


def cubic_matrix(n_in: int, factor: int) -> np.ndarray:
    """1-D bicubic upsampling operator, shape (n_in·F, n_in), rows summing to 1.

    SR sample p sits at LR coordinate ``(p + 0.5) / F − 0.5`` (pixel centres aligned: LR pixel i
    covers SR samples i·F … i·F + F − 1); the edges are extended by replication.
    """
    f = _check_factor(factor)
    n_out = n_in * f
    x = (np.arange(n_out) + 0.5) / f - 0.5
    i0 = np.floor(x).astype(int)
    mat = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    for k in range(-1, 3):
        idx = i0 + k
        w = _keys(x - idx)
        np.add.at(mat, (rows, np.clip(idx, 0, n_in - 1)), w)
    return mat


def bicubic_upsample(
    lr: np.ndarray,
    factor: int,
    *,
    mask_lr: np.ndarray | None = None,
    background: float | None = None,
) -> np.ndarray:
    """Bicubic (Keys a = −0.5) upsampling of an LR MSI stack by an integer factor.

    Pixel-centre aligned: LR pixel (i, j) covers exactly the SR block [i·F, (i+1)·F) ×
    [j·F, (j+1)·F), and the interpolant passes through the LR value at the block centre.
    Non-tissue LR pixels are first filled with the value of their nearest tissue pixel, so the
    background (0 or NaN) does not bleed into the tissue edge; negative results (cubic overshoot)
    are clipped to 0. Non-tissue SR pixels keep that extrapolation unless ``background`` is given.

    Parameters
    ----------
    lr : ndarray, shape (channels, h, w) or (h, w)
        LR intensities (any unit); NaN allowed outside tissue.
    factor : int
        F ≥ 1.
    mask_lr : ndarray of bool, shape (h, w), optional
        Tissue pixels of the LR grid; default: pixels finite in every channel.
    background : float or None
        Value written to SR pixels whose LR pixel is not tissue; ``None`` (default) keeps the
        nearest-tissue extrapolation. Keep the default when scoring: with the benchmark's
        majority rule for LR tissue, and with never-acquired pixels inside the tissue, some SR
        tissue pixels lie under non-tissue LR pixels (619 of 13794 on the built-in sample, where
        writing 0 there drops R² from 0.70 to 0.56).

    Returns
    -------
    ndarray of float32, shape (channels, h·F, w·F) (or (h·F, w·F) for a 2-D input)
        Same intensity unit as ``lr``.
    """
    f = _check_factor(factor)
    a = np.asarray(lr, dtype=np.float64)
    squeeze = a.ndim == 2
    if squeeze:
        a = a[None]
    if a.ndim != 3:
        raise InputError(f"the LR stack must have shape (channels, h, w), got {a.shape}")
    m = np.isfinite(a).all(axis=0) if mask_lr is None else np.asarray(mask_lr, dtype=bool)
    if m.shape != a.shape[1:]:
        raise InputError(f"mask_lr {m.shape} does not match the LR grid {a.shape[1:]}")
    if not m.any():
        raise InputError("the LR tissue mask is empty")
    if not np.isfinite(a[:, m]).all():
        raise InputError("the LR stack has NaN or infinite values on tissue pixels")
    filled = fill_nearest_tissue(a, m)
    wr = cubic_matrix(a.shape[1], f)
    wc = cubic_matrix(a.shape[2], f)
    sr = np.einsum("pi,cij,qj->cpq", wr, filled, wc, optimize=True)
    np.maximum(sr, 0.0, out=sr)
    if background is not None:
        sr[:, ~upsample_mask(m, f)] = background
    sr = sr.astype(np.float32)
    return sr[0] if squeeze else sr
