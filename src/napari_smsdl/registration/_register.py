"""``register``: landmark affine → optional MI affine → B-spline, with held-out errors and a guard."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass

import numpy as np

from ..errors import InputError, RegistrationError
from ._coords import GridSpec, super_resolution_grid
from ._features import FeatureImage, fixed_feature_image, moving_feature_image, normalise
from ._landmarks import LandmarkPairs, fit_landmark_affine, landmark_points_um
from ._params import Criterion, FixedFeature, MovingFeature, RegistrationParams
from ._quality import (
    checkerboard,
    error_stats,
    jacobian_determinant,
    landmark_errors_um,
    tissue_mask_from_rgb,
    warped_grid_lines_rc,
)
from ._resample import resample_moving_to_grid
from ._stages import compose, run_affine_mi, run_bspline, same_field_of_view_transform

log = logging.getLogger(__name__)

__all__ = ["RegistrationResult", "iter_register", "register"]

Progress = Callable[[str, int, int], None]

#: a single-channel MSI this large, with landmarks, uses the channel criterion too: the Mattes B-spline's
#: held-out refits took 137-168 s on a 134 x 260 image (issue 13). Without landmarks one channel is too
#: little for the sweep (the bladder TIC: ~100 px off), so that case stays on Mattes from the same field.
CHANNELS_FROM_PIXELS = 10_000

DIRECTION = (
    "MSI physical (x = col * msi_pixel_size_um, y = row * msi_pixel_size_um, origin at the centre of pixel (0, 0)) "
    "-> H&E physical (same convention with he_pixel_size_um)"
)


@dataclass(frozen=True, eq=False)
class RegistrationResult:
    """Everything one registration produced.

    Attributes
    ----------
    transform : SimpleITK.CompositeTransform
        MSI physical (x, y) µm → H&E physical (x, y) µm: ``affine ∘ bspline`` (B-spline applied first).
        This is the transform SimpleITK resamples the H&E with onto MSI grids.
    affine : SimpleITK.AffineTransform
        The affine part that was kept (landmark or field-of-view start, possibly MI-refined).
    bspline : SimpleITK.BSplineTransform or None
        The deformation in MSI physical space, ``None`` when not run or rejected by the guard.
    report : dict
        JSON-serialisable quality report (see :func:`register`).
    fixed_feature : (rows, cols) float32
        The MSI image registered, in [0, 1] (0 at non-acquired pixels).
    moving_feature_warped : (rows, cols) float32
        The registered H&E image resampled onto the MSI grid, in [0, 1].
    warped_he_rgb : (R, C, 3) uint8
        The H&E resampled onto ``display_grid`` (MSI grid × a display factor).
    checkerboard : (R, C) float32
        Tiles of the MSI image and of the warped H&E image on ``display_grid``.
    display_grid : GridSpec
        Grid of ``warped_he_rgb`` and ``checkerboard`` in MSI physical space (napari: ``scale`` =
        pixel size, ``translate`` = origin).
    jacobian : (rows, cols) float32
        Jacobian determinant of the B-spline deformation on the MSI grid (≤ 0: folded).
    tissue_mask : (rows, cols) bool
        MSI pixels that were acquired and show tissue in the warped H&E.
    misregistration : (rows, cols) float32 or None
        Local misregistration map: per tissue patch, the length (MSI px) of the residual shift that
        best aligns it under the final transform (NaN outside tissue patches; see the report's
        ``misregistration``); ``None`` when the MSI is too small for patches.
    grid_lines_rc : tuple of (n, 2) float arrays
        A regular MSI grid bent by the deformation, MSI (row, col) pixel coordinates.
    landmarks : LandmarkPairs or None
    params : RegistrationParams
    fixed_pixel_size_um, moving_pixel_size_um : float
    """

    transform: object
    affine: object
    bspline: object | None
    report: dict
    fixed_feature: np.ndarray
    moving_feature_warped: np.ndarray
    warped_he_rgb: np.ndarray
    checkerboard: np.ndarray
    display_grid: GridSpec
    jacobian: np.ndarray
    tissue_mask: np.ndarray
    grid_lines_rc: tuple
    landmarks: LandmarkPairs | None
    params: RegistrationParams
    fixed_pixel_size_um: float
    moving_pixel_size_um: float
    misregistration: np.ndarray | None = None

    @property
    def fixed_shape_rc(self) -> tuple[int, int]:
        return tuple(self.fixed_feature.shape)

    @property
    def residuals(self) -> list[dict]:
        """Per-landmark rows: indices, coordinates, held-out and fit errors, outlier flag."""
        return list(self.report.get("residuals", []))

    def resample_he(self, moving_rgb: np.ndarray, factor: int = 1, **kwargs) -> np.ndarray:
        """The H&E on the MSI grid (``factor=1``) or on the super-resolution grid (MSI pixel / factor).

        Shortcut for :func:`resample_moving_to_grid` with :func:`super_resolution_grid`; returns
        (rows·F, cols·F, 3) float32 in the input's value range.
        """
        grid = super_resolution_grid(self.fixed_shape_rc, self.fixed_pixel_size_um, factor)
        return resample_moving_to_grid(
            moving_rgb,
            self.moving_pixel_size_um,
            self.transform,
            grid_shape_rc=grid.shape_rc,
            grid_pixel_size_um=grid.pixel_size_um,
            grid_origin_um=grid.origin_rc_um,
            **kwargs,
        )


#: A landmark is flagged only when its held-out error is also above this many MSI pixels.
OUTLIER_FLOOR_MSI_PX = 0.5


def _check_inputs(fixed_msi, moving_he_rgb, p, q):
    for name, v in (("fixed_pixel_size_um", p), ("moving_pixel_size_um", q)):
        if v is None or not np.isfinite(v) or v <= 0:
            raise InputError(f"{name} must be a positive number of µm, got {v!r}")
    fixed = np.asarray(fixed_msi)
    if fixed.ndim not in (2, 3) or min(fixed.shape[-2:]) < 4:
        raise InputError(
            f"MSI must be (rows, cols) or (channels, rows, cols) with ≥ 4 pixels a side, got {fixed.shape}"
        )
    moving = np.asarray(moving_he_rgb)
    if moving.ndim != 3 or moving.shape[-1] not in (3, 4) or min(moving.shape[:2]) < 8:
        raise InputError(f"H&E must be (rows, cols, 3) RGB with ≥ 8 pixels a side, got shape {moving.shape}")
    return fixed, moving


def _check_landmarks_inside(landmarks: LandmarkPairs, fixed_shape, moving_shape):
    for name, pts, shape in (("H&E", landmarks.he_rc, moving_shape), ("MSI", landmarks.msi_rc, fixed_shape)):
        outside = (pts < -1).any(axis=1) | (pts[:, 0] > shape[0]) | (pts[:, 1] > shape[1])
        if outside.any():
            i = int(np.flatnonzero(outside)[0])
            raise RegistrationError(
                f"landmark {i} lies outside the {name} image: (row, col) = ({pts[i, 0]:.1f}, {pts[i, 1]:.1f}) "
                f"for an image of {shape[0]} x {shape[1]} pixels ({int(outside.sum())} such point(s))"
            )


def _make_folds(n: int, max_folds: int, seed: int) -> list[np.ndarray]:
    """Held-out index sets: one per landmark up to ``max_folds``, else ``max_folds`` random groups."""
    if n < 4:
        return []
    if n <= max_folds:
        return [np.array([i]) for i in range(n)]
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(g) for g in np.array_split(order, max_folds)]


def _mutual_information(a: np.ndarray, b: np.ndarray, mask: np.ndarray, bins: int) -> float:
    """Mutual information (bits) of two [0, 1] images over a mask, joint histogram with ``bins`` bins."""
    joint, _, _ = np.histogram2d(a[mask], b[mask], bins=bins, range=((0, 1), (0, 1)))
    pxy = joint / max(joint.sum(), 1)
    px, py = pxy.sum(axis=1, keepdims=True), pxy.sum(axis=0, keepdims=True)
    nz = pxy > 0
    return float((pxy[nz] * np.log2(pxy[nz] / (px @ py)[nz])).sum())


def _warp_feature(moving: FeatureImage, fixed: FeatureImage, transform) -> np.ndarray:
    import SimpleITK as sitk

    ref = fixed.to_sitk()
    out = sitk.Resample(moving.to_sitk(), ref, transform, sitk.sitkLinear, np.nan, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


class _Info:
    """A channel stage's info dict in the shape :func:`_stage_record` expects."""

    def __init__(self, data: dict):
        self.data = data

    def to_dict(self) -> dict:
        out = dict(self.data)
        # the keys every stage record of the Mattes path has, so readers need no special case
        score = (out.get("channel_score") or {}).get("after") or {}
        r2 = out.get("heldout_channel_r2") or {}
        out.setdefault("metric", score.get("cv_r2", r2.get("bspline")))
        out.setdefault("iterations", [])
        out.setdefault("stop_condition", "Levenberg-Marquardt: step below tolerance, no improvement or iteration limit")
        out.setdefault("seconds", 0.0)
        return out


def _check_stop(should_stop):
    if should_stop is not None and should_stop():
        from ..errors import Cancelled

        raise Cancelled("registration cancelled")


def _linear(affine):
    from ._channel_fit import LinearMap

    return LinearMap.from_sitk(affine)


def _confidence_value(confidence: dict, misreg: dict | None, landmark_sigma: float | None, image_kept: bool) -> float:
    """One number (MSI px).

    When the landmarks alone set the transform (every image stage rejected), the expected error of
    the landmark affine from its fit residuals; when the joint fit of landmarks and channels did (no
    B-spline), the RMS over the field of that fit's expected error. Otherwise the bootstrap spread of the global fit
    combined with the median local residual shift of the tissue patches (what the global transform
    leaves misaligned)."""
    if confidence.get("joint_fit_rms_msi_px") is not None:  # the joint fit of landmarks and channels alone
        return round(float(confidence["joint_fit_rms_msi_px"]), 4)
    if landmark_sigma is not None and not image_kept:
        return round(float(landmark_sigma), 4)
    boot = float(confidence["bootstrap_rms_msi_px"])
    local = 0.0 if misreg is None or misreg["stats"] is None else float(misreg["stats"]["median"])
    return round(float(np.hypot(boot, local)), 4)


class _Counter:
    def __init__(self, total: int):
        self.total, self.done = total, 0

    def step(self, stage: str) -> tuple[str, int, int]:
        self.done = min(self.total, self.done + 1)
        return (stage, self.done, self.total)


def register(
    fixed_msi: np.ndarray,
    moving_he_rgb: np.ndarray,
    *,
    fixed_pixel_size_um: float,
    moving_pixel_size_um: float,
    landmarks: LandmarkPairs | None = None,
    params: RegistrationParams = RegistrationParams(),
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> RegistrationResult:
    """Register the H&E (moving) onto the MSI (fixed): landmark affine, MI affine, B-spline.

    Parameters
    ----------
    fixed_msi : (rows, cols) or (channels, rows, cols) ndarray
        The MSI, e.g. its TIC image. NaN marks pixels that were not acquired (masked out). For a
        stack, ``params.fixed_feature`` chooses TIC, first principal component or one ion.
    moving_he_rgb : (rows, cols, 3) ndarray
        The H&E, uint8 or float RGB.
    fixed_pixel_size_um, moving_pixel_size_um : float
        Pixel sizes in µm. Pixel (row, col) of each image is centred at physical
        ``(x, y) = (col * size, row * size)``.
    landmarks : LandmarkPairs, optional
        At least 3 non-collinear pairs (4 for held-out errors). Without them the start is
        :func:`same_field_of_view_transform`.
    params : RegistrationParams
        Stages, schedules, features; see its docstring.
    progress : callable(stage: str, done: int, total: int), optional
        Called after each unit of work (one optimiser run, feature choice, quality maps).
    should_stop : callable() -> bool, optional
        Polled between and during optimiser iterations; when it returns True the run raises
        :class:`napari_smsdl.errors.Cancelled`.

    Returns
    -------
    RegistrationResult
        With ``transform`` (MSI physical → H&E physical) and ``report``, a dict holding:
        ``loo_error_um`` / ``loo_error_msi_px`` (``median``, ``p90``, ``max``, ``mean``, ``n``, in MSI
        µm / pixels; ``None`` with fewer than 4 landmarks), ``fit_error_um``, ``residuals`` (per
        landmark), ``outliers``, ``folds_in_tissue``, ``tissue_pixels``, ``jacobian``, ``stages``
        (name, ran, kept, reason, held-out error, optimiser iterations and stop condition),
        ``features``, ``messages``, ``params``, ``seconds``.

    Raises
    ------
    InputError
        Bad arrays or pixel sizes.
    RegistrationError
        Bad landmarks (fewer than 3, unequal counts, collinear, outside the images) or images that
        do not overlap under the start transform.
    Cancelled
        ``should_stop()`` returned True.

    Notes
    -----
    Held-out (leave-one-out) errors are honest for every stage: for each fold the landmark affine is
    refitted without the held-out landmark(s) and the image-driven stages are run again from it, so
    the held-out landmarks influence nothing that is scored on them. The guard compares the median
    held-out error of each image-driven stage with the stage before it and keeps the earlier one when
    the new stage is worse by more than ``params.guard_slack_msi_px``. Landmark errors are measured in
    MSI physical µm (the H&E-space miss mapped back through the transform's local Jacobian).
    """
    steps = iter_register(
        fixed_msi,
        moving_he_rgb,
        fixed_pixel_size_um=fixed_pixel_size_um,
        moving_pixel_size_um=moving_pixel_size_um,
        landmarks=landmarks,
        params=params,
        should_stop=should_stop,
    )
    while True:
        try:
            stage, done, total = next(steps)
        except StopIteration as finished:
            return finished.value
        if progress is not None:
            progress(stage, done, total)


def _stage_record(name: str, kept: bool, reason: str, held_out_errors_um, info) -> dict:
    """The report entry of a stage that ran: kept or not, why, held-out errors, optimiser facts."""
    return {
        "name": name,
        "ran": True,
        "kept": kept,
        "reason": reason,
        "loo_error_um": None if held_out_errors_um is None else error_stats(held_out_errors_um),
        **info.to_dict(),
    }


def iter_register(
    fixed_msi: np.ndarray,
    moving_he_rgb: np.ndarray,
    *,
    fixed_pixel_size_um: float,
    moving_pixel_size_um: float,
    landmarks: LandmarkPairs | None = None,
    params: RegistrationParams = RegistrationParams(),
    should_stop: Callable[[], bool] | None = None,
) -> Generator[tuple[str, int, int], None, RegistrationResult]:
    """:func:`register` as a generator: yields ``(stage, done, total)`` after each unit of work and
    returns the :class:`RegistrationResult` (``StopIteration.value``).

    For ``napari.qt.threading.thread_worker``: its ``yielded`` signal carries the progress, its
    ``returned`` signal the result. Arguments as :func:`register`.
    """
    import SimpleITK as sitk

    t_start = time.perf_counter()
    fixed_arr, moving_arr = _check_inputs(fixed_msi, moving_he_rgb, fixed_pixel_size_um, moving_pixel_size_um)
    p, q = float(fixed_pixel_size_um), float(moving_pixel_size_um)
    fixed_shape = tuple(int(v) for v in fixed_arr.shape[-2:])
    moving_shape = tuple(int(v) for v in moving_arr.shape[:2])
    messages: list[str] = []

    n_lm = 0
    if landmarks is not None:
        landmarks.validate()
        _check_landmarks_inside(landmarks, fixed_shape, moving_shape)
        n_lm = len(landmarks)
    folds = _make_folds(n_lm, params.max_folds, params.seed)
    image_stages = int(params.refine_affine) + int(params.bspline)
    prog = _Counter(3 + image_stages * (1 + len(folds)))
    n_acquired = int(np.isfinite(fixed_arr).all(axis=0).sum() if fixed_arr.ndim == 3 else np.isfinite(fixed_arr).sum())
    use_channels = params.criterion is Criterion.CHANNELS or (
        params.criterion is Criterion.AUTO
        and (
            (fixed_arr.ndim == 3 and fixed_arr.shape[0] >= 2 and n_acquired >= 400)
            or (n_acquired >= CHANNELS_FROM_PIXELS and landmarks is not None)
        )
    )

    old_threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    if params.threads:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(params.threads))
    try:
        # ---- stage 1: the start ------------------------------------------------------------------
        field_centre = ((fixed_shape[1] - 1) / 2 * p, (fixed_shape[0] - 1) / 2 * p)
        fixed_xy = moving_xy = np.zeros((0, 2))
        fold_affines: list = []
        if landmarks is not None:
            fixed_xy, moving_xy = landmark_points_um(landmarks, p, q)
            affine = fit_landmark_affine(fixed_xy, moving_xy, center_xy_um=field_centre)
            start_name = "landmark affine"
            for held in folds:
                train = np.setdiff1d(np.arange(n_lm), held)
                try:
                    fold_affines.append(
                        fit_landmark_affine(fixed_xy[train], moving_xy[train], center_xy_um=field_centre)
                    )
                except RegistrationError:
                    fold_affines.append(None)
                    messages.append(f"fold holding out {held.tolist()}: the other landmarks are collinear; skipped")
        else:
            affine = same_field_of_view_transform(fixed_shape, p, moving_shape, q, fit=params.fov_fit)
            start_name = "same field of view"
            messages.append("no landmarks: started from the same field of view; no held-out error")
        ctx = None
        sweep_info = None
        if use_channels:
            from ._channel_stages import ChannelContext

            he_scale = float(np.sqrt(abs(np.linalg.det(np.asarray(affine.GetMatrix(), float).reshape(2, 2)))))
            if landmarks is None:
                he_scale = 1.0  # the pixel sizes are physical: one MSI µm is one H&E µm
            ctx = ChannelContext(fixed_arr, moving_arr, p, q, he_scale, psf_sigma_msi_px=params.psf_sigma_msi_px)
            if landmarks is None and params.sweep:
                swept, sweep_info = ctx.sweep_affine(mirror=params.sweep_mirror)
                if swept is not None:
                    affine = swept
                    start_name = "rotation/scale sweep"
                    messages[-1] = (
                        "no landmarks: started from a rotation/scale sweep on the channel criterion; no held-out error"
                    )
        yield prog.step("start")
        if landmarks is not None and not folds:
            messages.append(f"{n_lm} landmarks: held-out errors need at least 4; the guard is off")
        det_a = float(np.linalg.det(np.asarray(affine.GetMatrix(), float).reshape(2, 2)))
        if abs(det_a) < 1e-12:
            raise RegistrationError("the start transform is degenerate (zero determinant)")
        he_per_msi = float(np.sqrt(abs(det_a)))  # H&E µm per MSI µm
        h_um = 0.5 * p

        def held_out_errors(fold_transforms) -> np.ndarray:
            errs = np.full(n_lm, np.nan)
            for held, tx in zip(folds, fold_transforms, strict=True):
                if tx is not None:
                    errs[held] = landmark_errors_um(tx, fixed_xy[held], moving_xy[held], h_um)
            return errs

        # ---- features ------------------------------------------------------------------------------
        m_kinds = (
            [MovingFeature.HAEMATOXYLIN, MovingFeature.INVERTED_GREY]
            if params.moving_feature is MovingFeature.AUTO
            else [params.moving_feature]
        )
        if fixed_arr.ndim == 2:
            f_kinds = [FixedFeature.TIC]
        elif params.fixed_feature is FixedFeature.AUTO:
            f_kinds = [FixedFeature.TIC, FixedFeature.PC1]
        else:
            f_kinds = [params.fixed_feature]
        target_um = params.moving_resolution_msi_px * p * he_per_msi
        blur_um = params.psf_sigma_msi_px * p * he_per_msi
        movings = {
            k: moving_feature_image(moving_arr, q, k, target_pixel_size_um=target_um, blur_sigma_um=blur_um)
            for k in m_kinds
        }
        fixeds = {k: fixed_feature_image(fixed_arr, p, k, channel=params.fixed_channel) for k in f_kinds}
        candidates = []
        if len(movings) * len(fixeds) > 1:
            start_tx = compose(affine)
            for fk, fimg in fixeds.items():
                for mk, mimg in movings.items():
                    warped = _warp_feature(mimg, fimg, start_tx)
                    valid = fimg.mask & np.isfinite(warped)
                    if valid.sum() < 16:
                        raise RegistrationError("the H&E and the MSI do not overlap under the start transform")
                    mi = _mutual_information(fimg.data, np.nan_to_num(warped), valid, 16)
                    candidates.append(
                        {"fixed": fimg.name, "moving": mk.value, "mutual_information_bits": mi, "_keys": (fk, mk)}
                    )
            best = max(candidates, key=lambda c: c["mutual_information_bits"])
            f_kind, m_kind = best["_keys"]
            for c in candidates:
                del c["_keys"]
        else:
            f_kind, m_kind = f_kinds[0], m_kinds[0]
        fixed, moving = fixeds[f_kind], movings[m_kind]
        yield prog.step("features")
        if should_stop is not None and should_stop():
            from ..errors import Cancelled

            raise Cancelled("registration cancelled")

        # ---- stages 2 and 3 with held-out errors and the guard ------------------------------------------
        stages = []
        prev_errs = held_out_errors(fold_affines) if folds else np.zeros(0)
        stages.append(
            {
                "name": start_name,
                "ran": True,
                "kept": True,
                "reason": "start",
                "loo_error_um": error_stats(prev_errs) if folds else None,
            }
        )
        cur_affine, cur_fold_affines = affine, list(fold_affines)
        bspline = None
        slack_um = (params.channel_guard_slack_msi_px if use_channels else params.guard_slack_msi_px) * p

        def guard(name: str, errs: np.ndarray, base: np.ndarray) -> tuple[bool, str]:
            if not params.guard:
                return True, "guard off"
            if not folds or not np.isfinite(errs).any():
                return True, "kept (no held-out landmarks to judge by)"
            new, old = float(np.nanmedian(errs)), float(np.nanmedian(base))
            if new > old + slack_um:
                msg = (
                    f"{name} made the held-out landmark error worse (median {new:.2f} µm vs {old:.2f} µm); "
                    "kept the previous stage"
                )
                messages.append(msg)
                log.info(msg)
                return False, msg
            return True, f"held-out median {new:.2f} µm vs {old:.2f} µm before"

        if params.refine_affine and ctx is not None and landmarks is not None and n_lm >= 4:
            # landmarks and the channel criterion fitted together, each weighted by its own uncertainty
            refined, cinfo = ctx.joint_landmark_fit(cur_affine, fixed_xy, moving_xy)
            info = _Info(cinfo)
            yield prog.step("affine refinement")
            fold_refined = []
            for held, fa in zip(folds, cur_fold_affines, strict=True):
                train = np.setdiff1d(np.arange(n_lm), held)
                ok = fa is not None and 2 * len(train) > 6
                fold_refined.append(
                    ctx.joint_landmark_fit(fa, fixed_xy[train], moving_xy[train], quick=True)[0] if ok else fa
                )
                yield prog.step("affine refinement (held-out folds)")
                _check_stop(should_stop)
            errs = held_out_errors(fold_refined) if folds else np.zeros(0)
            # the landmarks are inside the joint fit, so it needs no margin over them (an image-only stage
            # does): kept when the held-out landmark median is not worse
            new_med, old_med = float(np.nanmedian(errs)), float(np.nanmedian(prev_errs))
            keep = not params.guard or new_med <= old_med
            reason = f"held-out landmark median {new_med:.2f} µm vs {old_med:.2f} µm for the landmark affine"
            if not keep:
                messages.append(f"joint fit with the channels: {reason}; kept the landmark affine")
            sc = cinfo["channel_score"]
            r2_before, r2_after = sc["before"]["cv_r2"], sc["after"]["cv_r2"]
            if keep and not r2_after >= r2_before:
                keep = False
                reason = (f"the joint fit lowered the block-cross-validated channel R² ({r2_before:.4f} -> "
                          f"{r2_after:.4f}); kept the landmark affine")
            else:
                reason = f"{reason}; block-cross-validated channel R² {r2_before:.4f} -> {r2_after:.4f}"
            stages.append(_stage_record("affine refinement", keep, reason, errs if folds else None, info))
            if keep:
                cur_affine, cur_fold_affines, prev_errs = refined, fold_refined, errs
        elif params.refine_affine and ctx is not None:
            refined, cinfo = ctx.refine_affine(
                cur_affine, model=params.channel_model, coarse=landmarks is None,
                robust_passes=params.channel_robust_passes,
            )
            info = _Info(cinfo)
            yield prog.step("affine refinement")
            fold_refined = []
            for fa in cur_fold_affines:
                fold_refined.append(None if fa is None else ctx.refine_affine(fa, model=params.channel_model, quick=True)[0])
                yield prog.step("affine refinement (held-out folds)")
                _check_stop(should_stop)
            errs = held_out_errors(fold_refined) if folds else np.zeros(0)
            keep, reason = guard("affine refinement", errs, prev_errs)
            stages.append(_stage_record("affine refinement", keep, reason, errs if folds else None, info))
            if keep:
                cur_affine, cur_fold_affines, prev_errs = refined, fold_refined, errs
        elif params.refine_affine:
            refined, info = run_affine_mi(fixed, moving, cur_affine, params, p, should_stop=should_stop)
            yield prog.step("affine refinement")
            fold_refined = []
            for fa in cur_fold_affines:
                fold_refined.append(
                    None if fa is None else run_affine_mi(fixed, moving, fa, params, p, should_stop=should_stop)[0]
                )
                yield prog.step("affine refinement (held-out folds)")
            errs = held_out_errors(fold_refined) if folds else np.zeros(0)
            keep, reason = guard("affine refinement", errs, prev_errs)
            stages.append(_stage_record("affine refinement", keep, reason, errs if folds else None, info))
            if keep:
                cur_affine, cur_fold_affines, prev_errs = refined, fold_refined, errs
        else:
            stages.append({"name": "affine refinement", "ran": False, "kept": False, "reason": "not asked for"})

        if params.bspline and ctx is not None:
            bs, cinfo = ctx.fit_bspline(cur_affine, mesh_px=params.channel_mesh_msi_px)
            yield prog.step("B-spline")
            r2 = cinfo["heldout_channel_r2"]
            gain_ok = bs is not None and r2["bspline"] is not None and r2["bspline"] >= r2["affine"] + params.bspline_min_gain
            fold_tx = []
            if gain_ok:
                for fa in cur_fold_affines:
                    b = None if fa is None else ctx.fit_bspline(fa, mesh_px=params.channel_mesh_msi_px, heldout=False)[0]
                    fold_tx.append(None if fa is None else compose(fa, b))
                    yield prog.step("B-spline (held-out folds)")
                    _check_stop(should_stop)
            if bs is None:
                keep, reason = False, "too few tissue patches for a B-spline; the affine is kept"
            elif not gain_ok:
                keep = False
                reason = (
                    f"held-out channel R² {r2['affine']:.4f} (affine) -> {r2['bspline']} (B-spline): "
                    f"below the gain of {params.bspline_min_gain:g}; kept the affine"
                )
                messages.append(f"B-spline rejected: {reason}")
            else:
                errs = held_out_errors(fold_tx) if folds else np.zeros(0)
                keep, reason = guard("B-spline", errs, prev_errs)
                reason = f"held-out channel R² {r2['affine']:.4f} -> {r2['bspline']:.4f}; {reason}"
            stages.append(_stage_record("B-spline", keep, reason, errs if (folds and gain_ok and bs is not None) else None,
                                        _Info(cinfo)))
            if keep:
                bspline = bs
                if folds:
                    prev_errs = errs
        elif params.bspline:
            try:
                bs, info = run_bspline(fixed, moving, cur_affine, params, p, should_stop=should_stop)
                yield prog.step("B-spline")
                fold_tx = []
                for fa in cur_fold_affines:
                    b = None if fa is None else run_bspline(fixed, moving, fa, params, p, should_stop=should_stop)[0]
                    fold_tx.append(None if fa is None else compose(fa, b))
                    yield prog.step("B-spline (held-out folds)")
            except RegistrationError as exc:  # e.g. an MSI grid too small for a mesh: keep the affine
                stages.append({"name": "B-spline", "ran": True, "kept": False,
                               "reason": f"failed, the affine is kept: {exc}"})
                messages.append(f"B-spline failed and was dropped: {exc}")
            else:
                errs = held_out_errors(fold_tx) if folds else np.zeros(0)
                keep, reason = guard("B-spline", errs, prev_errs)
                stages.append(_stage_record("B-spline", keep, reason, errs if folds else None, info))
                if keep:
                    bspline, prev_errs = bs, errs
        else:
            stages.append({"name": "B-spline", "ran": False, "kept": False, "reason": "not asked for"})

        transform = compose(cur_affine, bspline)

        # ---- quality -----------------------------------------------------------------------------------
        msi_grid = GridSpec(fixed_shape, p)
        warped_msi_rgb = resample_moving_to_grid(
            moving_arr, q, transform, grid_shape_rc=fixed_shape, grid_pixel_size_um=p
        )
        he_white = 255.0 if moving_arr.dtype == np.uint8 else max(1.0, float(np.nanmax(moving_arr[..., :3])))
        tissue = fixed.mask & tissue_mask_from_rgb(warped_msi_rgb[..., :3] / he_white)
        jac = (
            jacobian_determinant(transform, cur_affine, msi_grid)
            if bspline is not None
            else np.ones(fixed_shape, np.float32)
        )
        folds_in_tissue = int(((jac <= 0) & tissue).sum())
        moving_warped = np.nan_to_num(_warp_feature(moving, fixed, transform), nan=0.0)

        factor = int(np.clip(round(p * he_per_msi / q), 1, 4))
        display = super_resolution_grid(fixed_shape, p, factor)
        warped_rgb = resample_moving_to_grid(
            moving_arr[..., :3],
            q,
            transform,
            grid_shape_rc=display.shape_rc,
            grid_pixel_size_um=display.pixel_size_um,
            grid_origin_um=display.origin_rc_um,
        )
        warped_u8 = np.clip(np.round(warped_rgb * (255.0 / he_white)), 0, 255).astype(np.uint8)
        warped_feat = moving_feature_image(warped_u8, display.pixel_size_um, m_kind).data
        fixed_up = np.repeat(np.repeat(fixed.data, factor, axis=0), factor, axis=1)
        tile = max(2, int(round(min(fixed_shape) / 8))) * factor
        board = checkerboard(fixed_up, normalise(warped_feat), tile).astype(np.float32)
        step = max(1, int(round(params.mesh_spacing_msi_px)))
        lines = tuple(warped_grid_lines_rc(bspline, fixed_shape, p, step))

        # landmark table
        residuals, outliers = [], []
        fit_errs = np.zeros(0)
        loo = error_stats(prev_errs) if folds else None
        if landmarks is not None:
            fit_errs = landmark_errors_um(transform, fixed_xy, moving_xy, h_um)
            med = float(np.nanmedian(prev_errs)) if folds and np.isfinite(prev_errs).any() else None
            for i in range(n_lm):
                e = float(prev_errs[i]) if folds and np.isfinite(prev_errs[i]) else None
                # relative to the others, and large enough to matter: half an MSI pixel, the size the
                # misregistration map flags (six exact landmarks have held-out errors of 1e-13 px)
                flag = bool(med is not None and e is not None and e > params.outlier_factor * med
                            and e > OUTLIER_FLOOR_MSI_PX * p)
                if flag:
                    outliers.append(i)
                residuals.append(
                    {
                        "index": i,
                        "he_row": float(landmarks.he_rc[i, 0]),
                        "he_col": float(landmarks.he_rc[i, 1]),
                        "msi_row": float(landmarks.msi_rc[i, 0]),
                        "msi_col": float(landmarks.msi_rc[i, 1]),
                        "loo_error_um": e,
                        "loo_error_msi_px": None if e is None else e / p,
                        "fit_error_um": float(fit_errs[i]),
                        "outlier": flag,
                    }
                )
            if outliers:
                messages.append(
                    f"landmark(s) {outliers} have a held-out error above {params.outlier_factor:g}x the median; "
                    "check them"
                )
        if folds_in_tissue:
            messages.append(f"the deformation folds {folds_in_tissue} MSI pixel(s) inside the tissue")
        misreg, confidence, channel_final = None, None, None
        if ctx is None and n_acquired >= 400:
            try:
                from ._channel_stages import ChannelContext

                ctx = ChannelContext(fixed_arr, moving_arr, p, q, he_per_msi, psf_sigma_msi_px=params.psf_sigma_msi_px)
            except (np.linalg.LinAlgError, ValueError) as exc:  # pragma: no cover - degenerate inputs
                messages.append(f"no misregistration map: {exc}")
        if ctx is not None:
            try:
                misreg = ctx.misregistration_map(cur_affine, bspline, tissue)
                joint_kept = stages[1].get("model") == "affine, joint with the landmarks" and stages[1]["kept"]
                if joint_kept and not stages[2]["kept"]:
                    # the joint fit of landmarks and channels set the transform: its own expected error
                    confidence = {"bootstrap_rms_msi_px": None, "n_boot": 0,
                                  "joint_fit_rms_msi_px": stages[1]["expected_rms_error_msi_px"]}
                elif landmarks is not None and n_lm > 3 and not any(st["kept"] for st in stages[1:]):
                    # the landmarks alone set the transform: its confidence comes from their fit (below)
                    confidence = {"bootstrap_rms_msi_px": None, "n_boot": 0}
                else:
                    robust_kept = stages[1]["kept"] and stages[1].get("robust") is not None
                    confidence = ctx.confidence(cur_affine, bspline, model=params.channel_model, seed=params.seed,
                                                patch_weights=ctx.robust_patch_weights if robust_kept else None)
                channel_final = ctx.score(_linear(cur_affine), None if bspline is None else ctx._disp(bspline))
            except (np.linalg.LinAlgError, ValueError) as exc:  # pragma: no cover - degenerate inputs
                messages.append(f"no misregistration map: {exc}")
                misreg = confidence = None
        # landmark click noise (per axis, MSI px) from the kept transform's fit residuals: 6 affine
        # parameters leave 2n - 6 degrees of freedom; the fitted affine's RMS error is σ·√(6/n)
        landmark_sigma = None
        if landmarks is not None and n_lm > 3:
            ssr = float((fit_errs**2).sum()) / p**2
            landmark_sigma = float(np.sqrt(ssr / (2 * n_lm - 6)) * np.sqrt(6.0 / n_lm))
        image_stage_kept = any(s["kept"] for s in stages[1:])
        if confidence is not None:
            confidence = {**confidence, "landmark_affine_rms_msi_px": None if landmark_sigma is None
                          else round(landmark_sigma, 4)}
        if misreg is not None and misreg["stats"] is not None and misreg["stats"]["flagged"]:
            st = misreg["stats"]
            messages.append(
                f"{st['flagged']} of {st['n_patches']} tissue patches are misregistered by more than 0.5 MSI px "
                "(see the misregistration map)"
            )
        yield prog.step("quality")
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(old_threads)

    import napari_smsdl

    kept = [s["name"] for s in stages if s["kept"]]
    seconds = time.perf_counter() - t_start
    report = {
        "direction": DIRECTION,
        "fixed": {"shape_rc": list(fixed_shape), "pixel_size_um": p, "feature": fixed.name},
        "moving": {
            "shape_rc": list(moving_shape),
            "pixel_size_um": q,
            "feature": m_kind.value,
            "registered_pixel_size_um": moving.pixel_size_um,
        },
        "feature_candidates": candidates,
        "n_landmarks": n_lm,
        "loo_scheme": None
        if not folds
        else ("leave-one-out" if all(len(f) == 1 for f in folds) else f"{len(folds)}-fold"),
        "loo_error_um": loo,
        "loo_error_msi_px": error_stats(prev_errs, p) if folds else None,
        "fit_error_um": error_stats(fit_errs) if n_lm else None,
        "residuals": residuals,
        "outliers": outliers,
        "folds_in_tissue": folds_in_tissue,
        "tissue_pixels": int(tissue.sum()),
        "jacobian": {
            "min": float(jac[tissue].min()) if tissue.any() else float(jac.min()),
            "max": float(jac[tissue].max()) if tissue.any() else float(jac.max()),
        },
        "stages": stages,
        "final": " + ".join(kept),
        "criterion": "channels" if use_channels else "mattes",
        "start_sweep": sweep_info,
        "channel_score": channel_final,
        "confidence_msi_px": None
        if confidence is None
        else _confidence_value(confidence, misreg, landmark_sigma, image_stage_kept),
        "confidence": confidence,
        "misregistration_msi_px": None
        if misreg is None or misreg["stats"] is None
        else {"median": misreg["stats"]["median"], "p90": misreg["stats"]["p90"]},
        "misregistration": None
        if misreg is None
        else {
            **(misreg["stats"] or {}),
            "patch_px": misreg["patch_px"],
            "flag_above_msi_px": 0.5,
            "patch_shift_rc_msi_px": misreg["patch_shift_rc_msi_px"].round(4).tolist(),
        },
        "messages": messages,
        "params": params.to_dict(),
        "simpleitk": sitk.Version.VersionString(),
        "napari_smsdl": napari_smsdl.__version__,
        "seconds": round(seconds, 3),
    }
    log.info("registration: %s in %.1f s; held-out error %s", report["final"], seconds, loo)
    return RegistrationResult(
        transform=transform,
        affine=cur_affine,
        bspline=bspline,
        report=report,
        fixed_feature=fixed.data,
        moving_feature_warped=moving_warped.astype(np.float32),
        warped_he_rgb=warped_u8,
        checkerboard=board,
        display_grid=display,
        jacobian=jac.astype(np.float32),
        tissue_mask=tissue,
        grid_lines_rc=lines,
        landmarks=landmarks,
        params=params,
        fixed_pixel_size_um=p,
        moving_pixel_size_um=q,
        misregistration=None if misreg is None else misreg["magnitude_msi_px"],
    )
