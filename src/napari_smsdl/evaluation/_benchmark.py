"""The benchmark protocol: degrade a ground truth by F, reconstruct it back, score every method.

:func:`run_benchmark` takes a ground truth at native resolution, block-averages it by F
(:func:`degrade`), reconstructs it back with every method
(:func:`napari_smsdl.reconstruction.reconstruct`) and scores each against the ground truth
(:func:`napari_smsdl.evaluation.score_stack`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..io import tissue_mask
from ..reconstruction import Method, Reconstruction, Settings, check_factor, reconstruct
from ..reconstruction._pipeline import ProgressFn

log = logging.getLogger(__name__)


def uncertainty_rank_correlation(uncertainty, prediction, truth, mask) -> dict:
    """Spearman correlation of an uncertainty map with the absolute error, on tissue, per channel.

    An uncertainty map is worth showing only if it ranks where the errors are large. A map that is
    constant over the tissue ranks nothing: 0 (not left out of the mean, which would flatter the
    other channels); NaN only where the error itself is constant (nothing to rank).
    """
    from scipy.stats import spearmanr

    per = []
    for c in range(truth.shape[0]):
        err = np.abs(np.asarray(prediction[c], np.float64) - truth[c])[mask]
        u = np.asarray(uncertainty[c], np.float64)[mask]
        if not err.size or np.ptp(err) == 0:
            rho = float("nan")
        else:
            rho = spearmanr(u, err)[0] if np.ptp(u) > 0 else 0.0
        per.append(float(rho))
    finite = [v for v in per if np.isfinite(v)]
    return {"mean": float(np.mean(finite)) if finite else float("nan"), "per_channel": per}


@dataclass(frozen=True)
class BenchmarkResult:
    """Scores per method (``metrics``), the reconstructions, and the inputs that made them."""

    metrics: dict
    reconstruction: Reconstruction
    truth: np.ndarray
    mask_hr: np.ndarray
    lr: np.ndarray
    mask_lr: np.ndarray
    registration: dict | None = None  # the refinement decision when no transform was given


def degrade(truth: np.ndarray, mask_hr: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Block-average a native-resolution stack by F over tissue pixels → (LR stack, LR tissue mask).

    An LR pixel is tissue when at least half of its F × F block is tissue; non-tissue LR pixels are 0.
    """
    c, rows, cols = truth.shape
    t = np.where(mask_hr[None], np.nan_to_num(truth), 0.0).reshape(c, rows // factor, factor, cols // factor, factor)
    m = mask_hr.reshape(rows // factor, factor, cols // factor, factor)
    counts = m.sum(axis=(1, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        lr = np.where(counts > 0, t.sum(axis=(2, 4)) / counts, 0.0)
    mask_lr = counts >= (factor * factor) / 2
    return np.where(mask_lr[None], lr, 0.0).astype(np.float32), mask_lr


def run_benchmark(
    truth: np.ndarray,
    he_rgb: np.ndarray,
    *,
    factor: int,
    truth_pixel_size_um: float,
    he_pixel_size_um: float,
    settings: Settings | None = None,
    mask_hr: np.ndarray | None = None,
    transform=None,
    methods: Sequence[Method | str] = (Method.SMSDL, Method.BICUBIC, Method.BACKPROJECTION, Method.CNN),
    cache_dir=None,
    refine: bool = True,
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> BenchmarkResult:
    """The benchmark protocol: degrade the ground truth by F, reconstruct, score every method.

    ``truth`` is (C, H, W) at native resolution with NaN or 0 outside tissue; it is cropped to a
    multiple of F. ``transform`` maps truth-grid physical space to H&E physical space (None: the
    H&E covers the same field of view). The truth grid's pixel size is ``truth_pixel_size_um``, so
    the degraded MSI has pixel size ``F × truth_pixel_size_um``.

    Without a transform and with ``refine``, the same-field-of-view start is refined on mutual
    information between the degraded MSI and the H&E, and the refinement is kept only when it clearly
    helps (:func:`napari_smsdl.registration.refine_same_field_of_view`; the decision is in
    ``BenchmarkResult.registration``). Only the LR input is used for it, never the ground truth.
    """
    from ._metrics import score_stack

    factor = check_factor(factor)
    truth = np.asarray(truth, np.float32)
    if truth.ndim == 2:
        truth = truth[None]
    if truth.ndim != 3 or min(truth.shape[1:]) < 2 * factor:
        raise InputError(f"ground truth must be (channels, rows, cols) at least {2 * factor} pixels wide, got {truth.shape}")
    settings = dataclasses.replace(settings or Settings(), factor=factor)
    if mask_hr is None:
        mask_hr = tissue_mask(truth)
    rows, cols = (truth.shape[1] // factor) * factor, (truth.shape[2] // factor) * factor
    he = np.asarray(he_rgb)
    if (rows, cols) != truth.shape[1:]:
        if transform is None:  # keep the same-field-of-view correspondence after the crop
            he = he[: int(round(he.shape[0] * rows / truth.shape[1])), : int(round(he.shape[1] * cols / truth.shape[2]))]
        truth, mask_hr = truth[:, :rows, :cols], mask_hr[:rows, :cols]
    lr, mask_lr = degrade(truth, mask_hr, factor)
    msi_px = truth_pixel_size_um * factor
    decision = None
    methods = [Method(m) for m in methods]
    uses_he = Method.SMSDL in methods or Method.CNN in methods
    if transform is None and refine and uses_he:
        from ..registration import refine_same_field_of_view

        stage = progress or (lambda *_: None)
        stage("refining the same-field-of-view registration", 0, 1)
        refined = refine_same_field_of_view(
            np.where(mask_lr[None], lr, np.nan), he, fixed_pixel_size_um=msi_px, moving_pixel_size_um=he_pixel_size_um,
        )
        stage("refining the same-field-of-view registration", 1, 1)
        decision = refined.to_dict()
        log.info("registration: %s", refined.reason)
        lr_transform = refined.transform if refined.accepted else None  # already on the LR grid
    elif transform is not None:
        # the transform was given for the truth grid (pixel size s, origin at its pixel (0, 0) centre);
        # the LR grid's pixel (0, 0) centre is at ((F-1)/2)·s in that space
        import SimpleITK as sitk

        shift = sitk.TranslationTransform(2, [(factor - 1) / 2 * truth_pixel_size_um] * 2)
        composite = sitk.CompositeTransform(2)
        composite.AddTransform(transform)
        composite.AddTransform(shift)  # applied first
        lr_transform = composite
    else:
        lr_transform = None
    recon = reconstruct(
        lr, he, he_pixel_size_um=he_pixel_size_um, msi_pixel_size_um=msi_px, settings=settings, methods=methods,
        transform=lr_transform, mask_lr=mask_lr, cache_dir=cache_dir, progress=progress, should_stop=should_stop,
    )
    truth_clean = np.where(mask_hr[None], np.nan_to_num(truth), 0.0)
    metrics = {}
    for name, stack in recon.sr.items():
        scores = score_stack(truth_clean, stack, mask_hr)
        metrics[name] = {**scores, "seconds": float(recon.seconds[name])}
        if name in recon.guidance:
            metrics[name]["guidance"] = recon.guidance[name]
        if name in recon.choices:
            metrics[name]["choices"] = recon.choices[name]
        if name in recon.uncertainty:
            metrics[name]["uncertainty_spearman"] = uncertainty_rank_correlation(
                recon.uncertainty[name], stack, truth_clean, mask_hr)
    return BenchmarkResult(metrics, recon, truth_clean, mask_hr, lr, mask_lr, decision)
