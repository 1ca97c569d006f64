"""LR ↔ SR grid helpers shared by the baselines and the benchmark (NumPy only).

LR pixel (i, j) covers exactly the SR block [i·F, (i+1)·F) × [j·F, (j+1)·F).
"""

from __future__ import annotations

import numpy as np

from ...errors import InputError


def _check_factor(factor: int) -> int:
    if int(factor) != factor or factor < 1:
        raise InputError(f"the factor must be a positive integer, got {factor!r}")
    return int(factor)


def block_average(
    sr: np.ndarray, factor: int, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Degrade an SR stack to the LR grid by averaging each F×F block over its tissue pixels.

    Parameters
    ----------
    sr : ndarray, shape (channels, H, W) or (H, W)
        Intensities on the SR grid; H and W must be multiples of ``factor`` (crop first).
    factor : int
        F ≥ 1.
    mask : ndarray of bool, shape (H, W), optional
        Tissue pixels of the SR grid; default: pixels finite in every channel.

    Returns
    -------
    lr : ndarray of float32, shape (channels, H/F, W/F)
        Mean over the tissue pixels of each block; 0 where a block has no tissue.
    mask_lr : ndarray of bool, shape (H/F, W/F)
        Blocks with at least one tissue pixel.
    """
    f = _check_factor(factor)
    a = np.asarray(sr, dtype=np.float64)
    squeeze = a.ndim == 2
    if squeeze:
        a = a[None]
    c, hh, ww = a.shape
    if hh % f or ww % f:
        raise InputError(f"SR shape {(hh, ww)} is not a multiple of the factor {f}")
    m = np.isfinite(a).all(axis=0) if mask is None else np.asarray(mask, dtype=bool)
    if m.shape != (hh, ww):
        raise InputError(f"mask {m.shape} does not match the SR grid {(hh, ww)}")
    h, w = hh // f, ww // f
    vals = np.where(m[None], a, 0.0).reshape(c, h, f, w, f).sum(axis=(2, 4))
    counts = m.reshape(h, f, w, f).sum(axis=(1, 3))
    mask_lr = counts > 0
    lr = np.where(mask_lr[None], vals / np.maximum(counts, 1)[None], 0.0).astype(np.float32)
    return (lr[0] if squeeze else lr), mask_lr


def upsample_mask(mask_lr: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upsampling of an LR mask to the SR grid, shape (h·F, w·F), bool."""
    f = _check_factor(factor)
    m = np.asarray(mask_lr, dtype=bool)
    return np.repeat(np.repeat(m, f, axis=0), f, axis=1)


def fill_nearest_tissue(stack: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Replace every non-tissue pixel of each channel by the value of its nearest tissue pixel.

    Parameters
    ----------
    stack : ndarray, shape (channels, rows, cols)
    mask : ndarray of bool, shape (rows, cols)
        Tissue pixels (at least one); their values must be finite.

    Returns
    -------
    ndarray of float64, same shape; tissue pixels unchanged.
    """
    from scipy.ndimage import distance_transform_edt

    a = np.asarray(stack, dtype=np.float64)
    m = np.asarray(mask, dtype=bool)
    if not m.any():
        raise InputError("the tissue mask is empty")
    if m.all():
        return a.copy()
    idx = distance_transform_edt(~m, return_distances=False, return_indices=True)
    return a[:, idx[0], idx[1]]
