"""The three registration stages on SimpleITK images (no landmarks, no reporting here)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..errors import Cancelled, RegistrationError
from ._coords import GridSpec
from ._features import FeatureImage
from ._landmarks import recentre_affine
from ._params import FovFit, RegistrationParams

log = logging.getLogger(__name__)

__all__ = ["StageInfo", "run_affine_mi", "run_bspline", "same_field_of_view_transform"]

MIN_LEVEL_PX = 12
MAX_ALL_SAMPLES = 40_000


@dataclass
class StageInfo:
    """What one optimiser run did (kept in the report)."""

    metric: float | None = None
    iterations: list[int] = field(default_factory=list)
    stop_condition: str = ""
    seconds: float = 0.0
    mesh_size: list[int] | None = None

    def to_dict(self) -> dict:
        return {
            "metric": None if self.metric is None else float(self.metric),
            "iterations": list(self.iterations),
            "stop_condition": self.stop_condition,
            "seconds": round(self.seconds, 3),
            **({"mesh_size": self.mesh_size} if self.mesh_size is not None else {}),
        }


#: Without landmarks or a transform the H&E is stretched onto the MSI field; a stretch by more than
#: this share on either axis means the two images do not show the same field at the pixel sizes
#: given (a wrong pixel size, or an H&E crop larger or smaller than the MSI raster), so the user is
#: warned. A warning threshold only: nothing computed depends on it.
FIELD_MISMATCH_WARN = 0.2


def field_of_view_mismatch(
    fixed_shape_rc: tuple[int, int],
    fixed_pixel_size_um: float,
    moving_shape_rc: tuple[int, int],
    moving_pixel_size_um: float,
) -> str | None:
    """A sentence when the H&E's physical extent differs from the MSI field's by more than
    :data:`FIELD_MISMATCH_WARN` on an axis (None when they agree)."""
    f_ext = np.array([fixed_shape_rc[0], fixed_shape_rc[1]], float) * float(fixed_pixel_size_um)
    m_ext = np.array([moving_shape_rc[0], moving_shape_rc[1]], float) * float(moving_pixel_size_um)
    scale = m_ext / f_ext
    if np.all(np.abs(scale - 1.0) <= FIELD_MISMATCH_WARN):
        return None
    return (f"the H&E covers {m_ext[0]:.0f} x {m_ext[1]:.0f} µm (rows x cols) at {float(moving_pixel_size_um):g} µm/px "
            f"but the MSI field {f_ext[0]:.0f} x {f_ext[1]:.0f} µm at {float(fixed_pixel_size_um):g} µm/px; without "
            f"landmarks or a transform the H&E is stretched {scale[0]:.2f} x {scale[1]:.2f} onto the MSI field: check "
            "the pixel sizes, crop the H&E to the MSI raster, or register it first (smsdl register)")


def same_field_of_view_transform(
    fixed_shape_rc: tuple[int, int],
    fixed_pixel_size_um: float,
    moving_shape_rc: tuple[int, int],
    moving_pixel_size_um: float,
    *,
    fit: FovFit = FovFit.STRETCH,
):
    """The no-landmark start: the MSI field mapped onto the H&E field, centres matched, scaled to fit.

    The field of an image is the area its pixels cover: from ``-p/2`` to ``(n - 1/2) p`` on each axis.

    Parameters
    ----------
    fixed_shape_rc, moving_shape_rc : (int, int)
        (rows, cols) of the MSI and of the H&E.
    fixed_pixel_size_um, moving_pixel_size_um : float
        Their pixel sizes in µm.
    fit : FovFit
        ``STRETCH`` scales each axis to fit; ``ISOTROPIC`` uses the mean of the two scales.

    Returns
    -------
    SimpleITK.AffineTransform
        MSI physical (x, y) µm → H&E physical (x, y) µm, centred on the MSI field's centre.
    """
    import SimpleITK as sitk

    p, q = float(fixed_pixel_size_um), float(moving_pixel_size_um)
    f_ext = np.array([fixed_shape_rc[1], fixed_shape_rc[0]], float) * p  # (x, y) extent
    m_ext = np.array([moving_shape_rc[1], moving_shape_rc[0]], float) * q
    scale = m_ext / f_ext
    if FovFit(fit) is FovFit.ISOTROPIC:
        scale = np.full(2, float(np.sqrt(scale[0] * scale[1])))
    f_centre = f_ext / 2 - p / 2
    m_centre = m_ext / 2 - q / 2
    tx = sitk.AffineTransform(2)
    tx.SetMatrix((float(scale[0]), 0.0, 0.0, float(scale[1])))
    tx.SetCenter(tuple(f_centre.tolist()))
    tx.SetTranslation(tuple((m_centre - f_centre).tolist()))
    return tx


def _schedule(fixed: FeatureImage, params: RegistrationParams, msi_pixel_size_um: float):
    """Shrink factors (integers) and smoothing sigmas (µm) per level, clipped to keep ≥ 12 px."""
    rows, cols = fixed.data.shape
    shrinks, sigmas = [], []
    for s_px, sigma_px in zip(params.shrink_msi_px, params.smoothing_msi_px, strict=True):
        s = max(1, int(round(s_px * msi_pixel_size_um / fixed.pixel_size_um)))
        while s > 1 and min(rows, cols) / s < MIN_LEVEL_PX:
            s -= 1
        shrinks.append(s)
        sigmas.append(float(sigma_px) * msi_pixel_size_um)
    return shrinks, sigmas


def _method(fixed: FeatureImage, params: RegistrationParams, msi_pixel_size_um: float):
    import SimpleITK as sitk

    reg = sitk.ImageRegistrationMethod()
    n = int(fixed.mask.sum()) if fixed.mask is not None else fixed.data.size
    bins = params.histogram_bins or int(np.clip(np.sqrt(n) / 2, 12, 32))
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=bins)
    pct = params.sampling_percentage
    if pct is None and n > MAX_ALL_SAMPLES:
        pct = MAX_ALL_SAMPLES / n
    if pct is not None and pct < 1.0:
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(float(pct), int(params.seed))
    else:
        reg.SetMetricSamplingStrategy(reg.NONE)
    mask = fixed.mask_to_sitk()
    if mask is not None and not fixed.mask.all():
        reg.SetMetricFixedMask(mask)
    reg.SetInterpolator(sitk.sitkLinear)
    # ITK accumulates the metric and (for the B-spline) its derivative per work unit in an order that
    # depends on the thread pool: one thread makes every run bit-identical whatever the thread count
    reg.SetNumberOfThreads(1)
    shrinks, sigmas = _schedule(fixed, params, msi_pixel_size_um)
    reg.SetShrinkFactorsPerLevel(shrinks)
    reg.SetSmoothingSigmasPerLevel(sigmas)
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return reg


def _watch(reg, info: StageInfo, should_stop: Callable[[], bool] | None):
    """Record iterations per level and poll ``should_stop`` at every optimiser iteration."""
    import SimpleITK as sitk

    state = {"last": 0, "levels": 0}

    def on_iteration():
        state["last"] = int(reg.GetOptimizerIteration())
        if should_stop is not None and should_stop():
            reg.StopRegistration()

    def on_level():
        if state["levels"]:
            info.iterations.append(state["last"] + 1)
        state["levels"] += 1
        state["last"] = -1

    reg.AddCommand(sitk.sitkIterationEvent, on_iteration)
    reg.AddCommand(sitk.sitkMultiResolutionIterationEvent, on_level)
    return state


def _execute(reg, fixed_img, moving_img, info, state, should_stop, stage):
    import SimpleITK as sitk

    t0 = time.perf_counter()
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # the metric's threads too: bit-identical runs
    try:
        reg.Execute(fixed_img, moving_img)
    except RuntimeError as exc:  # ITK exceptions (e.g. too few samples inside the moving image)
        msg = " ".join(str(exc).split())
        if "samples" in msg.lower() or "overlap" in msg.lower():
            raise RegistrationError(
                f"{stage}: the images barely overlap under the current transform (check landmarks/pixel sizes)"
            ) from exc
        raise RegistrationError(f"{stage} failed: {msg[-300:]}") from exc
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    info.iterations.append(state["last"] + 1)
    info.seconds = time.perf_counter() - t0
    info.stop_condition = reg.GetOptimizerStopConditionDescription()
    info.metric = float(reg.GetMetricValue())
    if should_stop is not None and should_stop():
        raise Cancelled(f"registration cancelled during {stage}")
    log.info(
        "%s: metric %.4f, iterations per level %s, stop: %s", stage, info.metric, info.iterations, info.stop_condition
    )


def run_affine_mi(
    fixed: FeatureImage,
    moving: FeatureImage,
    affine,
    params: RegistrationParams,
    msi_pixel_size_um: float,
    *,
    should_stop: Callable[[], bool] | None = None,
):
    """Stage 2: refine an affine (MSI physical → H&E physical) on Mattes mutual information.

    Returns ``(affine, StageInfo)``; the input transform is not modified.
    """
    import SimpleITK as sitk

    rows, cols = fixed.data.shape
    centre = ((cols - 1) / 2 * fixed.pixel_size_um, (rows - 1) / 2 * fixed.pixel_size_um)
    start = recentre_affine(affine, centre)
    reg = _method(fixed, params, msi_pixel_size_um)
    reg.SetOptimizerAsGradientDescent(
        learningRate=1.0,
        numberOfIterations=int(params.affine_iterations),
        convergenceMinimumValue=1e-6,
        convergenceWindowSize=10,
        estimateLearningRate=reg.EachIteration,
        maximumStepSizeInPhysicalUnits=0.25 * msi_pixel_size_um,
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetInitialTransform(start, inPlace=True)
    info = StageInfo()
    state = _watch(reg, info, should_stop)
    _execute(reg, fixed.to_sitk(), moving.to_sitk(), info, state, should_stop, "affine refinement")
    return sitk.AffineTransform(start), info


def bspline_mesh_size(shape_rc: tuple[int, int], mesh_spacing_msi_px: float, n_levels: int) -> list[int]:
    """Coarsest-level mesh size (x, y) such that after ``n_levels - 1`` doublings the spacing is the target."""
    coarse = mesh_spacing_msi_px * 2 ** (n_levels - 1)
    return [max(1, int(round(shape_rc[1] / coarse))), max(1, int(round(shape_rc[0] / coarse)))]


def run_bspline(
    fixed: FeatureImage,
    moving: FeatureImage,
    affine,
    params: RegistrationParams,
    msi_pixel_size_um: float,
    *,
    should_stop: Callable[[], bool] | None = None,
):
    """Stage 3: a cubic B-spline in MSI physical space under the affine, on Mattes MI with LBFGS2.

    The moving transform is ``affine ∘ bspline`` (SimpleITK composes the moving initial transform after
    the optimised one). The mesh starts coarse and is doubled at each level so that its final
    control-point spacing is ``params.mesh_spacing_msi_px`` MSI pixels.

    Returns ``(bspline, StageInfo)``.
    """
    import SimpleITK as sitk

    fixed_img = fixed.to_sitk()
    shrinks, _ = _schedule(fixed, params, msi_pixel_size_um)
    n_levels = len(shrinks)
    rows, cols = fixed.data.shape
    mesh = bspline_mesh_size(
        (rows, cols), params.mesh_spacing_msi_px * msi_pixel_size_um / fixed.pixel_size_um, n_levels
    )
    tx = sitk.BSplineTransformInitializer(fixed_img, mesh, 3)
    reg = _method(fixed, params, msi_pixel_size_um)
    reg.SetOptimizerAsLBFGS2(
        solutionAccuracy=1e-7,
        numberOfIterations=int(params.bspline_iterations),
        deltaConvergenceTolerance=1e-6,
    )
    reg.SetMovingInitialTransform(affine)
    reg.SetInitialTransformAsBSpline(tx, inPlace=True, scaleFactors=[2**i for i in range(n_levels)])
    info = StageInfo(mesh_size=[m * 2 ** (n_levels - 1) for m in mesh])
    state = _watch(reg, info, should_stop)
    _execute(reg, fixed_img, moving.to_sitk(), info, state, should_stop, "B-spline")
    return sitk.BSplineTransform(tx), info


def compose(affine, bspline=None):
    """The MSI physical → H&E physical transform ``affine ∘ bspline`` as a SimpleITK composite.

    SimpleITK applies a composite's transforms from the last added to the first: the B-spline
    (in MSI space) first, then the affine.
    """
    import SimpleITK as sitk

    parts = [sitk.AffineTransform(affine)]
    if bspline is not None:
        parts.append(sitk.BSplineTransform(bspline))
    return sitk.CompositeTransform(parts)


def mapped_points_xy_um(transform, grid: GridSpec) -> np.ndarray:
    """(rows, cols, 2) physical (x, y) images of a grid's pixel centres under ``transform`` (vectorised)."""
    import SimpleITK as sitk

    ref = grid.reference_image()
    disp = sitk.TransformToDisplacementField(
        transform, sitk.sitkVectorFloat64, ref.GetSize(), ref.GetOrigin(), ref.GetSpacing(), ref.GetDirection()
    )
    return grid.pixel_centres_xy_um() + sitk.GetArrayFromImage(disp)
