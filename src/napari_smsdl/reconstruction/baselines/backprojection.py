"""The H&E-free control: bicubic interpolation + iterative back-projection to the block means.

Iterative back-projection (IBP; Irani & Peleg, 1991) corrects an SR estimate until the mean of
every F × F block equals the measured MSI pixel: the LR residual (measured − pooled estimate) is
upsampled with the bicubic kernel and added, a few dozen times. Its smooth kernel spreads each
correction over the neighbourhood, so no block edges are imprinted. A final blockwise step makes
the means exact where the bicubic iteration converges slowly (the checkerboard mode of the LR
grid), and a positive rescale keeps intensities non-negative without breaking them.

The same step is the **conservation** every guided method gets (:func:`conserve`): SMSDL, the CNN
and this control differ only in the SR image they start from, so a difference in their scores is
the histology's, not the conservation's.
"""

from __future__ import annotations

import enum

import numpy as np

from ...errors import InputError
from .bicubic import bicubic_upsample, cubic_matrix
from .grid import _check_factor


class Conservation(str, enum.Enum):
    """How an SR estimate is made consistent with the measured block means."""

    EXACT = "exact"  # back-projection to convergence + an exact blockwise step: means reproduced
    SMOOTH = "smooth"  # a few back-projection iterations: closer, never exact, no block steps
    NONE = "none"  # the estimate as it is


#: Back-projection iterations of the exact and the smooth mode. The error of the bicubic IBP falls
#: by a constant factor per iteration except for the LR checkerboard mode, which the final exact
#: step removes; 30 iterations leave a residual below float32 resolution for the other modes.
EXACT_ITERATIONS = 30
SMOOTH_ITERATIONS = 3


def block_mean(stack, factor: int):
    """Mean over F × F blocks of the last two axes (numpy or torch)."""
    *lead, rows, cols = stack.shape
    return stack.reshape(*lead, rows // factor, factor, cols // factor, factor).mean(axis=(-3, -1))


def _upsample_residual(res: np.ndarray, factor: int) -> np.ndarray:
    """Signed bicubic upsampling of an LR residual (no clipping, no tissue fill)."""
    wr = cubic_matrix(res.shape[1], factor)
    wc = cubic_matrix(res.shape[2], factor)
    return np.einsum("pi,cij,qj->cpq", wr, res, wc, optimize=True)


def conserve(
    sr: np.ndarray,
    lr: np.ndarray,
    factor: int,
    mask_lr: np.ndarray,
    mode: Conservation | str = Conservation.EXACT,
) -> np.ndarray:
    """Make an SR stack consistent with the measured LR stack on the pixels of ``mask_lr``.

    Parameters
    ----------
    sr : ndarray, shape (channels, h·F, w·F)
        The SR estimate, in the MSI's intensity unit.
    lr : ndarray, shape (channels, h, w)
        The measurement; only pixels in ``mask_lr`` are used (others may be NaN).
    factor : int
        F.
    mask_lr : ndarray of bool, shape (h, w)
        The LR pixels whose block means are conserved (tissue, or the training pixels of a fold).
    mode : Conservation or str
        ``"exact"``, ``"smooth"`` or ``"none"``.

    Returns
    -------
    ndarray of float32, same shape as ``sr``, non-negative when ``sr`` and ``lr`` are. With
    ``"exact"``, every block of ``mask_lr`` has the measured mean to float32 rounding.
    """
    mode = Conservation(mode)
    f = _check_factor(factor)
    x = np.asarray(sr, np.float64).copy()
    lr = np.asarray(lr, np.float64)
    m = np.asarray(mask_lr, bool)
    if x.shape[-2:] != (lr.shape[-2] * f, lr.shape[-1] * f):
        raise InputError(f"SR grid {x.shape[-2:]} is not the LR grid {lr.shape[-2:]} refined {f} times")
    if mode is Conservation.NONE or not m.any():
        return x.astype(np.float32)
    target = np.where(m[None], np.nan_to_num(lr), 0.0)
    iterations = EXACT_ITERATIONS if mode is Conservation.EXACT else SMOOTH_ITERATIONS
    for _ in range(iterations):
        x += _upsample_residual(np.where(m[None], target - block_mean(x, f), 0.0), f)
    if mode is Conservation.EXACT:
        step = np.where(m[None], target - block_mean(x, f), 0.0)
        x += np.repeat(np.repeat(step, f, axis=1), f, axis=2)
        negative = (x < 0).reshape(*x.shape[:-2], lr.shape[-2], f, lr.shape[-1], f).any(axis=(-3, -1))
        if negative.any():  # clip, then rescale those blocks (all values ≥ 0) back to their mean
            np.maximum(x, 0.0, out=x)
            pooled = block_mean(x, f)
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(negative & m[None] & (pooled > 0), target / pooled, 1.0)
            x *= np.repeat(np.repeat(ratio, f, axis=1), f, axis=2)
    else:
        np.maximum(x, 0.0, out=x)
    return x.astype(np.float32)


def backprojection_upsample(
    lr: np.ndarray,
    factor: int,
    *,
    mask_lr: np.ndarray | None = None,
    mode: Conservation | str = Conservation.EXACT,
) -> np.ndarray:
    """The H&E-free control: :func:`bicubic_upsample`, then :func:`conserve` to the block means.

    Parameters
    ----------
    lr : ndarray, shape (channels, h, w) or (h, w)
        LR intensities; NaN allowed outside tissue.
    factor : int
        F.
    mask_lr : ndarray of bool, shape (h, w), optional
        Tissue pixels (default: pixels finite in every channel). Bicubic fills the others from
        their nearest tissue pixel; only these blocks are conserved.
    mode : Conservation or str
        The conservation (default exact).

    Returns
    -------
    ndarray of float32, shape (channels, h·F, w·F) (or (h·F, w·F) for a 2-D input)
    """
    a = np.asarray(lr, np.float32)
    squeeze = a.ndim == 2
    if squeeze:
        a = a[None]
    m = np.isfinite(a).all(axis=0) if mask_lr is None else np.asarray(mask_lr, bool)
    sr = conserve(bicubic_upsample(np.nan_to_num(a), factor, mask_lr=m), a, factor, m, mode)
    return sr[0] if squeeze else sr
