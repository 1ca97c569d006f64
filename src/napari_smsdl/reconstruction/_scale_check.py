"""Scale transfer: a ground-truth-free test of the detail SMSDL puts *inside* an MSI pixel.

The held-out folds (:mod:`._heldout`) score predictions across a gap at the LR scale, so they say
how well a model interpolates between measured pixels, not whether the structure it draws within
a pixel is right. Scale transfer tests exactly that, on a real target: pool the measured LR image
once more, by k = 2 (LR → LLR, block means over tissue), pool the SR-grid features to the LR grid
by F, run the same SMSDL fit and the same H&E-free control LLR → LR, and score both against the
measured LR pixels, which neither method saw (they only saw their k × k means). That is an SR
task one scale up; per channel, the scale-transfer gain is 1 − MSE(SMSDL) / MSE(control).

Its uncertainty comes from the LLR fit's own spatially blocked folds: the gain is computed on the
LR pixels under each fold's LLR pixels, and the spread of those fold gains is its standard
deviation — the same statistic as the held-out gain's, so both are judged by one criterion.

The pooled image is k² = 4 times smaller, so the check needs a large enough LR image: the LLR tissue
must hold at least two fold tiles per fold (:func:`scale_check_size`, the condition under which
:func:`._heldout.blocked_folds` deals tiles rather than single pixels, so a fold's gain still
varies with the place it covers). Where it holds too few tiles for the main fit's folds, the
check runs with as many folds as it has pairs of tiles, down to :data:`MIN_CHECK_FOLDS`, and its
"clearly positive" threshold grows with the fewer degrees of freedom (:func:`standard_errors`:
the same one-sided confidence as two standard errors over the main fit's folds).

Where the LLR tissue holds too few tiles even for that, the check can run on single-pixel folds
(``check_pooling(..., per_pixel=True)``, at least :data:`MIN_CHECK_FOLDS` folds of two pixels). Its
gain is as valid: the ensemble's prediction is scored on LR pixels it never saw, only their means,
and the folds only split the scored pixels. Its fold spread is optimistic, though: interleaved
pixels do not replicate regions. The regression therefore uses it only for what the held-out pixels
cannot judge at all, the per-channel use and blend weight, and keeps the held-out choice of the
network input and the conservation.

The measurement is pooled by :data:`CHECK_POOLING` = 2, not by F (:func:`check_pooling`): the check
then tests detail inside 2 × 2 LR pixels rather than F × F, a weaker proxy for the SR task at F > 2,
but it scores F² / 4 times more pixels, and a decision per channel made on few pixels has little
power: it falls back wherever the gain is not large. It is also the task the uncertainty is calibrated on
(:mod:`._uncertainty`). Only where the LR pooled by 2 is too small even for single-pixel folds is
the check skipped, with the reason, and the held-out gain decides alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._heldout import FOLD_TILE
from .baselines.backprojection import block_mean


@dataclass(frozen=True)
class ScaleInputs:
    """The scale-transfer task: features on the LR grid, the LLR measurement and what is scored.

    ``features`` (D, h'·w') are the SR-grid features pooled to the (cropped) LR grid of shape
    (h', w') = (h // F · F, w // F · F); ``llr`` (C, h'/F, w'/F) the pooled measurement (0 off
    tissue); ``mask_llr`` its tissue pixels; ``lr`` (C, h', w') the measured LR pixels (the
    target) and ``score_lr`` (h', w') the LR tissue pixels under LLR tissue pixels.
    """

    features: np.ndarray
    llr: np.ndarray
    mask_llr: np.ndarray
    lr: np.ndarray
    score_lr: np.ndarray


#: The fewest folds the check runs with: two folds leave one degree of freedom for the spread of
#: the fold gains, which cannot say "clearly positive" with any useful confidence.
MIN_CHECK_FOLDS = 3
#: the pooling of the check: the smallest, with the most pixels to decide on (see the module notes)
CHECK_POOLING = 2
#: how the reason of a check on single-pixel folds begins (see :func:`check_pooling`)
PER_PIXEL_FOLDS = "per-pixel folds (too few tiles for blocked ones)"


def scale_check_folds(mask_lr: np.ndarray, factor: int, folds: int, tile: int = FOLD_TILE) -> tuple[int, str]:
    """(the number of folds the check runs with, 0 where the LR image is too small; a sentence saying why).

    ``folds`` (the main fit's) where the LLR tissue holds two tiles per fold, else as many folds
    as it holds pairs of tiles, if that is at least :data:`MIN_CHECK_FOLDS`.
    """
    mask_llr = _pool_mask(np.asarray(mask_lr, bool), factor)
    h, w = mask_llr.shape
    rr, cc = np.mgrid[0:h, 0:w]
    tiles = len(np.unique(((rr // tile) * (-(-w // tile)) + cc // tile)[mask_llr])) if mask_llr.any() else 0
    n, fewest = min(int(folds), tiles // 2), min(MIN_CHECK_FOLDS, int(folds))
    where = f"{int(mask_llr.sum())} tissue pixels in {tiles} tiles of {tile} x {tile}"
    if n < fewest:
        return 0, (f"the LR image pooled by {factor} has {where}; the scale-transfer check needs "
                   f"{2 * fewest} ({fewest} folds of 2), so the held-out gain decides alone")
    fewer = "" if n == folds else f", so {n} folds instead of {folds}"
    return n, f"LLR grid {h} x {w} with {where}{fewer}"


def check_pooling(mask_lr: np.ndarray, factor: int, folds: int, tile: int = FOLD_TILE,
                  per_pixel: bool = False) -> tuple[int, int, str]:
    """(the pooling k of the check, its folds, why): k = :data:`CHECK_POOLING` where the LR pooled by it
    is large enough for :data:`MIN_CHECK_FOLDS` folds, else (0, 0 and the reason).

    ``factor`` (F) only words the reason: the pooling is the same at every F (see the module notes).
    ``per_pixel``: where the pooled tissue holds too few tiles for blocked folds, deal single pixels
    to the folds instead (:data:`PER_PIXEL_FOLDS`; the reason says so).
    """
    k = min(CHECK_POOLING, int(factor))
    n, why = scale_check_folds(mask_lr, k, folds, tile)
    if not n and per_pixel:
        n, _ = scale_check_folds(mask_lr, k, folds, 1)
        if n:
            mask_llr = _pool_mask(np.asarray(mask_lr, bool), k)
            fewer = "" if n == folds else f", so {n} folds instead of {folds}"
            why = (f"{PER_PIXEL_FOLDS}: LLR grid {mask_llr.shape[0]} x {mask_llr.shape[1]} with "
                   f"{int(mask_llr.sum())} tissue pixels{fewer}")
    if n and k != factor:
        why = f"pooled by {k}, not by F = {factor} (the most pixels): {why}"
    return (k, n, why) if n else (0, 0, why)


def scale_check_size(mask_lr: np.ndarray, factor: int, folds: int, tile: int = FOLD_TILE) -> tuple[bool, str]:
    """(whether the LR image is large enough for the check at some pooling, a sentence saying why or why not)."""
    k, _, why = check_pooling(mask_lr, factor, folds, tile)
    return k > 0, why


def standard_errors(n_folds: int, reference_folds: int, reference_errors: float) -> float:
    """How many standard errors above zero a gain over ``n_folds`` folds must be to count as clearly
    positive: the Student-t quantile with the one-sided confidence that ``reference_errors`` standard
    errors have over ``reference_folds`` folds (n − 1 degrees of freedom each; equal at n = reference)."""
    from scipy.stats import t

    if n_folds == reference_folds:
        return float(reference_errors)
    level = t.cdf(reference_errors, df=reference_folds - 1)
    return float(t.ppf(level, df=n_folds - 1))


def _pool_mask(mask_lr: np.ndarray, factor: int) -> np.ndarray:
    """LLR tissue: pixels whose F × F block of LR pixels is at least half tissue (as the benchmark degrades)."""
    h, w = (mask_lr.shape[0] // factor) * factor, (mask_lr.shape[1] // factor) * factor
    counts = mask_lr[:h, :w].reshape(h // factor, factor, w // factor, factor).sum(axis=(1, 3))
    return counts >= factor * factor / 2


def pool_inputs(features: np.ndarray, lr: np.ndarray, mask_lr: np.ndarray, factor: int,
                pooling: int | None = None) -> ScaleInputs:
    """Pool the SR-grid features (D, h·F·w·F) by F to the LR grid and the LR measurement (C, h, w) once
    more by ``pooling`` (default F; the LR grid is cropped to a multiple of it).

    LLR pixels are means over their tissue LR pixels. The pooled features are recentred and scaled
    so the leading component has unit spread, as on the SR grid (pooling shrinks it), keeping the
    components' relative scale.
    """
    f = factor
    k = f if pooling is None else int(pooling)
    lr = np.nan_to_num(np.asarray(lr, np.float64))
    m = np.asarray(mask_lr, bool)
    rows, cols = lr.shape[1:]
    h, w = (rows // k) * k, (cols // k) * k
    feats = np.asarray(features, np.float32).reshape(-1, rows * f, cols * f)[:, : h * f, : w * f]
    pooled = block_mean(feats.astype(np.float64), f).reshape(feats.shape[0], -1)
    pooled -= pooled.mean(axis=1, keepdims=True)
    pooled /= pooled[0].std() + 1e-6
    llr, mask_llr, lr_c, score = pool_measurement(lr, m, k)
    return ScaleInputs(pooled.astype(np.float32), llr.astype(np.float32), mask_llr, lr_c.astype(np.float32), score)


def pool_measurement(lr: np.ndarray, mask_lr: np.ndarray, factor: int):
    """LR (C, h, w) float64 pooled by ``factor``: (LLR means over tissue, LLR tissue (:func:`_pool_mask`),
    the LR cropped to a multiple of the factor, the LR pixels scored: tissue under LLR tissue)."""
    f = factor
    n_ch, rows, cols = lr.shape
    h, w = (rows // f) * f, (cols // f) * f
    lr_c, m_c = lr[:, :h, :w], mask_lr[:h, :w]
    on = np.where(m_c[None], lr_c, 0.0).reshape(n_ch, h // f, f, w // f, f).sum(axis=(2, 4))
    counts = m_c.reshape(h // f, f, w // f, f).sum(axis=(1, 3))
    mask_llr = _pool_mask(mask_lr, f)
    llr = np.where(mask_llr[None], on / np.maximum(counts, 1), 0.0)  # LLR tissue has counts ≥ f²/2 > 0
    score = m_c & np.repeat(np.repeat(mask_llr, f, axis=0), f, axis=1)
    return llr, mask_llr, lr_c, score


def scale_gain(smsdl_lr: np.ndarray, control_lr: np.ndarray, inputs: ScaleInputs, folds_llr: np.ndarray,
               factor: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per channel: (mean gain over the LLR folds, its standard deviation, the per-fold gains (k, C)).

    A fold's gain is 1 − (squared error of SMSDL) / (squared error of the control), summed over
    the scored LR pixels under that fold's LLR pixels; 0 where the control is already exact.
    """
    f = factor
    err_s = (np.asarray(smsdl_lr, np.float64) - inputs.lr) ** 2
    err_c = (np.asarray(control_lr, np.float64) - inputs.lr) ** 2
    fold_lr = np.repeat(np.repeat(folds_llr, f, axis=0), f, axis=1)
    n_folds = int(folds_llr.max()) + 1
    gains = np.zeros((n_folds, err_s.shape[0]))
    for i in range(n_folds):
        sel = inputs.score_lr & (fold_lr == i)
        s, c = err_s[:, sel].sum(axis=1), err_c[:, sel].sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            gains[i] = np.where(c > 0, 1.0 - s / c, 0.0)
    return gains.mean(axis=0), gains.std(axis=0, ddof=1), gains


def blend_weight(smsdl_lr: np.ndarray, control_lr: np.ndarray, inputs: ScaleInputs, folds_llr: np.ndarray,
                 factor: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per channel: (mean over the LLR folds, standard deviation, per-fold values (k, C)) of the weight w
    that makes control + w · (SMSDL − control) closest to the measured LR pixels (least squares).

    SMSDL's detail over the control, d = SMSDL − control, is partly right and partly noise; the
    blend with the least squared error has w = Σ (y − control)·d / Σ d². Both are conserved, so
    every blend is too. w ≤ 0: the detail does not point towards the truth at all; 1: all of it does.
    """
    f = factor
    d = np.asarray(smsdl_lr, np.float64) - np.asarray(control_lr, np.float64)
    r = inputs.lr - np.asarray(control_lr, np.float64)
    fold_lr = np.repeat(np.repeat(folds_llr, f, axis=0), f, axis=1)
    n_folds = int(folds_llr.max()) + 1
    weights = np.zeros((n_folds, d.shape[0]))
    for i in range(n_folds):
        sel = inputs.score_lr & (fold_lr == i)
        dd = (d[:, sel] ** 2).sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            weights[i] = np.where(dd > 0, (r[:, sel] * d[:, sel]).sum(axis=1) / dd, 0.0)
    return weights.mean(axis=0), weights.std(axis=0, ddof=1), weights
