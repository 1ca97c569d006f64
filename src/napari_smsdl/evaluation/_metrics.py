"""Image-quality metrics of a super-resolved MSI stack against a ground truth, on tissue pixels.

Conventions (the same for every method, so that numbers compare):

* Both images of a channel are min–max normalised with the **truth's** minimum and maximum over
  the tissue pixels: ``x_n = (x - t_min) / (t_max - t_min)``. Nothing is clipped, so a prediction
  that overshoots the truth's range is penalised. When the truth is constant on tissue
  (``t_max == t_min``) the scale is 1 (only the offset is removed); R² and Pearson r are then NaN.
* RMSE, R², PSNR and Pearson r use the tissue pixels only.
* SSIM: :func:`skimage.metrics.structural_similarity` (``data_range=1``, default 7×7 uniform
  window, smaller odd window for images under 7 pixels) on the full normalised image **with the
  background set to 0 in both images**, returning the SSIM map; the score is the mean of that map
  over the tissue pixels that lie at least ``(win_size - 1) // 2`` pixels from the image border
  (the same border crop scikit-image applies to its own mean; all tissue pixels if none is that
  far in). With a mask that is all True this equals scikit-image's scalar SSIM exactly, and the
  trivially perfect background never inflates the score.
* PSNR = 20·log10(1 / RMSE) in dB (peak 1 on the normalised scale); ``inf`` when RMSE is 0.
* Per-stack ``mean`` is the mean over channels of the per-channel values, ignoring NaN channels.

All functions are pure NumPy/scikit-image (no torch); arrays are ``(channels, rows, cols)``.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import InputError

#: Metric names in the order they are reported.
METRICS: tuple[str, ...] = ("rmse", "ssim", "r2", "psnr", "pearson")

#: Whether a larger value is better, per metric.
HIGHER_IS_BETTER: dict[str, bool] = {
    "rmse": False,
    "ssim": True,
    "r2": True,
    "psnr": True,
    "pearson": True,
}


def _as_stack(a: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise InputError(f"{name} must have shape (channels, rows, cols) or (rows, cols), got {a.shape}")
    return a


def normalise_pair(
    truth_rc: np.ndarray, pred_rc: np.ndarray, mask_rc: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Min–max normalise one channel of truth and prediction with the truth's tissue range.

    Parameters
    ----------
    truth_rc, pred_rc : ndarray, shape (rows, cols)
        One channel, any intensity unit (the same for both).
    mask_rc : ndarray of bool, shape (rows, cols)
        Tissue pixels; the range is taken over these.

    Returns
    -------
    truth_n, pred_n : ndarray of float64, shape (rows, cols)
        ``(x - t_min) / (t_max - t_min)`` (scale 1 if the truth is constant on tissue), unclipped.
        Pixels outside the mask are set to 0 in both (they may have been NaN).
    """
    t = np.asarray(truth_rc, dtype=np.float64)
    p = np.asarray(pred_rc, dtype=np.float64)
    m = np.asarray(mask_rc, dtype=bool)
    t_min = float(t[m].min())
    t_max = float(t[m].max())
    scale = t_max - t_min if t_max > t_min else 1.0
    t_n = np.where(m, (t - t_min) / scale, 0.0)
    p_n = np.where(m, (p - t_min) / scale, 0.0)
    return t_n, p_n


def _ssim_on_tissue(t_n: np.ndarray, p_n: np.ndarray, m: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    win = min(7, *t_n.shape)
    if win % 2 == 0:
        win -= 1
    if win < 3:
        # scikit-image cannot compute SSIM on images thinner than 3 pixels.
        return float("nan")
    _, ssim_map = structural_similarity(t_n, p_n, data_range=1.0, win_size=win, full=True)
    pad = (win - 1) // 2
    inner = np.zeros_like(m)
    inner[pad : m.shape[0] - pad, pad : m.shape[1] - pad] = True
    sel = m & inner
    if not sel.any():
        sel = m
    return float(ssim_map[sel].mean())


def score_channel(truth_rc: np.ndarray, pred_rc: np.ndarray, mask_rc: np.ndarray) -> dict[str, float]:
    """All metrics for one channel; see the module docstring for the exact definitions.

    Parameters
    ----------
    truth_rc, pred_rc : ndarray, shape (rows, cols)
        Ground truth and prediction on the same grid and in the same intensity unit.
    mask_rc : ndarray of bool, shape (rows, cols)
        Tissue pixels (at least one).

    Returns
    -------
    dict
        ``{"rmse", "ssim", "r2", "psnr", "pearson"}`` → float (RMSE on the normalised scale,
        PSNR in dB).
    """
    m = np.asarray(mask_rc, dtype=bool)
    t_n, p_n = normalise_pair(truth_rc, pred_rc, m)
    t = t_n[m]
    p = p_n[m]
    err = p - t
    mse = float(np.mean(err**2))
    rmse = math.sqrt(mse)
    ss_res = float(np.sum(err**2))
    ss_tot = float(np.sum((t - t.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")
    psnr = 20.0 * math.log10(1.0 / rmse) if rmse > 0 else float("inf")
    t_c = t - t.mean()
    p_c = p - p.mean()
    denom = math.sqrt(float(np.sum(t_c**2)) * float(np.sum(p_c**2)))
    pearson = float(np.sum(t_c * p_c)) / denom if denom > 0 else float("nan")
    return {
        "rmse": rmse,
        "ssim": _ssim_on_tissue(t_n, p_n, m),
        "r2": r2,
        "psnr": psnr,
        "pearson": pearson,
    }


def score_stack(truth: np.ndarray, pred: np.ndarray, mask: np.ndarray) -> dict[str, dict]:
    """Score a super-resolved stack against the ground truth, per channel and averaged.

    Each channel of both images is min–max normalised with the truth's minimum and maximum over
    the tissue pixels (nothing clipped); RMSE, R² (= 1 − SS_res/SS_tot), PSNR (= 20·log10(1/RMSE))
    and Pearson r are computed on the tissue pixels; SSIM is scikit-image's
    ``structural_similarity(data_range=1)`` map of the full normalised image with the background set
    to 0 in both images, averaged over the tissue pixels (border crop as scikit-image). See the
    module docstring for the edge cases.

    Parameters
    ----------
    truth, pred : ndarray, shape (channels, rows, cols) (or (rows, cols) for one channel)
        Ground truth and prediction, same grid, same intensity unit. Values outside the mask are
        ignored (may be NaN); values inside must be finite.
    mask : ndarray of bool, shape (rows, cols)
        Tissue pixels.

    Returns
    -------
    dict
        ``{metric: {"mean": float, "per_channel": [float, ...]}}`` for metric in
        ``("rmse", "ssim", "r2", "psnr", "pearson")``; ``mean`` ignores NaN channels.

    Raises
    ------
    InputError
        Shapes disagree, the mask is empty, or a tissue pixel is not finite.
    """
    t = _as_stack(truth, "truth")
    p = _as_stack(pred, "prediction")
    m = np.asarray(mask, dtype=bool)
    if t.shape != p.shape:
        raise InputError(f"truth {t.shape} and prediction {p.shape} differ in shape")
    if m.shape != t.shape[1:]:
        raise InputError(f"mask {m.shape} does not match the image grid {t.shape[1:]}")
    if not m.any():
        raise InputError("the tissue mask is empty: nothing to score")
    for name, a in (("truth", t), ("prediction", p)):
        if not np.isfinite(a[:, m]).all():
            raise InputError(f"{name} has NaN or infinite values on tissue pixels")
    per = [score_channel(t[c], p[c], m) for c in range(t.shape[0])]
    out: dict[str, dict] = {}
    for name in METRICS:
        vals = [float(d[name]) for d in per]
        finite = [v for v in vals if not math.isnan(v)]
        mean = float(np.mean(finite)) if finite else float("nan")
        out[name] = {"mean": mean, "per_channel": vals}
    return out
