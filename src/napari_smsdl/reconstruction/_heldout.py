"""Held-out LR pixels: how SMSDL chooses its settings and judges the histology without a ground truth.

SMSDL only ever sees the low-resolution (LR) measurement, so that is what it is scored on: the LR
tissue pixels are split into spatially blocked folds (square tiles of LR pixels, tiles dealt to
folds by a seeded permutation), a model is trained on all folds but one, and its prediction,
pooled back to the LR grid (the forward model), is compared with the measured values of the
held-out fold. Tiles rather than single pixels, so a held-out pixel is predicted across a gap and
not read off its direct neighbours, which share its noise-free signal.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError

#: LR pixels per side of a held-out tile. 3 is the smallest tile with an interior pixel (one
#: whose direct neighbours are all held out too); the SR task itself never has gaps wider than
#: one LR pixel, so larger tiles would judge the methods on a harder problem than theirs.
FOLD_TILE = 3
#: Candidate PCA dimensions of the features; the held-out score picks one (nested components).
PCA_CANDIDATES = (4, 8, 16, 32, 64)


def blocked_folds(mask_lr: np.ndarray, n_folds: int, *, tile: int = FOLD_TILE, seed: int = 0) -> np.ndarray:
    """Assign every LR tissue pixel to one of ``n_folds`` spatially blocked folds.

    Parameters
    ----------
    mask_lr : ndarray of bool, shape (h, w)
        Tissue pixels.
    n_folds : int
        Number of folds (≥ 2).
    tile : int
        Tile side in LR pixels; tiles are dealt to folds in a seeded random order, so every fold
        covers the whole section. When the tissue holds fewer than two tiles per fold, single
        pixels are dealt instead (tiny inputs).
    seed : int
        Same seed, same folds.

    Returns
    -------
    ndarray of int, shape (h, w)
        The fold of each tissue pixel, −1 elsewhere. Every fold holds at least one pixel.
    """
    m = np.asarray(mask_lr, bool)
    if n_folds < 2:
        raise InputError(f"held-out folds must be at least 2, got {n_folds}")
    if m.sum() < 2 * n_folds:
        raise InputError(f"only {int(m.sum())} tissue pixels for {n_folds} held-out folds; use fewer folds")
    h, w = m.shape
    rr, cc = np.mgrid[0:h, 0:w]
    tiles_per_row = -(-w // tile)
    tile_id = (rr // tile) * tiles_per_row + cc // tile
    used = np.unique(tile_id[m])
    if len(used) < 2 * n_folds:
        tile_id, used = rr * w + cc, np.flatnonzero(m.ravel())
    order = np.random.default_rng(seed).permutation(len(used))
    fold_of = np.full(int(tile_id.max()) + 1, -1)
    fold_of[used[order]] = np.arange(len(used)) % n_folds
    return np.where(m, fold_of[tile_id], -1)


def held_out_mse(pooled: np.ndarray, target: np.ndarray, held_out: np.ndarray) -> np.ndarray:
    """Per-channel mean squared error of a pooled prediction (C, h, w) on the held-out pixels."""
    return ((pooled[:, held_out] - target[:, held_out]) ** 2).mean(axis=1)


def choose_pca_dims(
    features_std: np.ndarray,
    target: np.ndarray,
    folds: np.ndarray,
    factor: int,
    candidates: tuple[int, ...] = PCA_CANDIDATES,
) -> tuple[int, dict[int, float]]:
    """The number of leading principal components whose linear fit predicts held-out pixels best.

    A linear map of the features commutes with the forward model (the block mean), so a ridge fit
    of the pooled components to the LR values is exactly a linear SMSDL; its held-out error, summed
    over folds and averaged over channels, ranks the candidates at the cost of a few small solves.

    Parameters
    ----------
    features_std : ndarray, shape (D, h·F·w·F)
        Standardised principal components, leading first (see ``_standardise``).
    target : ndarray, shape (C, h, w)
        The scaled LR measurement.
    folds : ndarray of int, shape (h, w)
        From :func:`blocked_folds`.
    factor : int
        F.
    candidates : tuple of int
        Dimensions to try; those above D or above half the training pixels of a fold are skipped.

    Returns
    -------
    (int, dict)
        The chosen dimension and the held-out error of every candidate tried.
    """
    from .baselines.backprojection import block_mean

    n_ch, h, w = target.shape
    d_all = features_std.shape[0]
    pooled = block_mean(features_std.reshape(d_all, h * factor, w * factor), factor).reshape(d_all, -1).T
    y = target.reshape(n_ch, -1).T
    n_folds = int(folds.max()) + 1
    smallest_train = min(int(((folds >= 0) & (folds != i)).sum()) for i in range(n_folds))
    tried = [d for d in candidates if d <= d_all and d <= smallest_train // 2] or [min(candidates[0], d_all)]
    scores: dict[int, float] = {}
    flat = folds.ravel()
    for d in tried:
        err = 0.0
        for i in range(n_folds):
            tr, va = (flat >= 0) & (flat != i), flat == i
            a = np.c_[pooled[tr, :d], np.ones(tr.sum())]
            reg = 1e-3 * np.trace(a.T @ a) / a.shape[1]  # a whisper of ridge: only to keep the solve stable
            coef = np.linalg.solve(a.T @ a + reg * np.eye(a.shape[1]), a.T @ y[tr])
            pred = np.c_[pooled[va, :d], np.ones(va.sum())] @ coef
            err += float(((pred - y[va]) ** 2).mean())
        scores[d] = err / n_folds
    best = min(scores, key=lambda k: (scores[k], k))
    return best, scores
