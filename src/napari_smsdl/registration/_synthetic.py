"""Synthetic H&E ↔ MSI pairs with a known warp, for tests and the accuracy benchmark.

The MSI-like fixed image is built from a real histology image: stain densities are mixed, sampled
through a known transform (affine offset ∘ smooth B-spline deformation), blurred, block-averaged
to the MSI pixel and remapped non-monotonically so that plain correlation fails, then noised.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._coords import rc_to_xy_um, super_resolution_grid, xy_um_to_rc
from ._landmarks import LandmarkPairs

__all__ = ["SyntheticPair", "make_synthetic_pair", "warp_error_msi_px"]


@dataclass(frozen=True, eq=False)
class SyntheticPair:
    """A registration problem with its answer.

    Attributes
    ----------
    fixed_msi : (rows, cols) float32, NaN at a few non-acquired pixels
    moving_rgb : (rows, cols, 3) uint8, the H&E
    fixed_pixel_size_um, moving_pixel_size_um : float
    true_transform : SimpleITK.Transform, MSI physical → H&E physical
    landmarks : LandmarkPairs, noisy
    eval_msi_rc : (n, 2) float, MSI (row, col) points to score on (not the landmarks)
    """

    fixed_msi: np.ndarray
    moving_rgb: np.ndarray
    fixed_pixel_size_um: float
    moving_pixel_size_um: float
    true_transform: object
    landmarks: LandmarkPairs
    eval_msi_rc: np.ndarray


def _spread_points(rng, lo_rc, hi_rc, n, candidates=400):
    """n points spread out in a box (farthest-point sampling from random candidates)."""
    cand = rng.uniform(lo_rc, hi_rc, size=(candidates, 2))
    chosen = [cand[rng.integers(candidates)]]
    d = np.linalg.norm(cand - chosen[0], axis=1)
    for _ in range(n - 1):
        nxt = cand[int(np.argmax(d))]
        chosen.append(nxt)
        d = np.minimum(d, np.linalg.norm(cand - nxt, axis=1))
    return np.array(chosen)


def make_synthetic_pair(
    moving_rgb: np.ndarray,
    *,
    moving_pixel_size_um: float = 1.0,
    fixed_pixel_size_um: float = 8.0,
    seed: int = 0,
    deformation_msi_px: float = 1.5,
    rotation_deg: float = 6.0,
    scale_jitter: float = 0.06,
    shift_msi_px: float = 3.0,
    n_landmarks: int = 6,
    landmark_noise_um: float = 2.0,
    n_eval: int = 50,
    field_fraction: float = 0.72,
    noise: float = 0.03,
) -> SyntheticPair:
    """Build a synthetic MSI-like fixed image from an H&E with a random known warp.

    Parameters
    ----------
    moving_rgb : (rows, cols, 3) uint8
        A real histology image (the moving image, returned unchanged).
    moving_pixel_size_um, fixed_pixel_size_um : float
        Pixel sizes in µm of the H&E and of the MSI to simulate.
    seed : int
        Seeds every random choice.
    deformation_msi_px : float
        Largest displacement of the smooth deformation, in MSI pixels.
    rotation_deg, scale_jitter, shift_msi_px : float
        Ranges of the random affine offset (uniform in ±range).
    n_landmarks, landmark_noise_um :
        Landmark pairs placed on the true warp with Gaussian noise (sd, µm, on each image).
    n_eval : int
        Number of random MSI points to score on.
    field_fraction : float
        The MSI field's side as a fraction of the H&E's.
    noise : float
        Relative noise of the MSI.
    """
    import SimpleITK as sitk
    from scipy.ndimage import gaussian_filter
    from skimage.color import rgb2hed

    from ._features import background_mask, block_mean_rc, normalise

    rng = np.random.default_rng(seed)
    he = np.asarray(moving_rgb)[..., :3]
    q, p = float(moving_pixel_size_um), float(fixed_pixel_size_um)
    he_extent_xy = np.array([he.shape[1], he.shape[0]]) * q
    shape_rc = tuple(int(v) for v in np.floor(he_extent_xy[::-1] * field_fraction / p))

    # affine offset: MSI field centre -> H&E centre (+ shift), random rotation and anisotropic scale
    centre_msi = (np.array(shape_rc[::-1]) - 1) / 2 * p
    centre_he = (np.array([he.shape[1], he.shape[0]]) - 1) / 2 * q
    theta = np.deg2rad(rng.uniform(-rotation_deg, rotation_deg))
    scale = 1 + rng.uniform(-scale_jitter, scale_jitter, 2)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    affine = sitk.AffineTransform(2)
    affine.SetMatrix((rot @ np.diag(scale)).ravel().tolist())
    affine.SetCenter(tuple(centre_msi.tolist()))
    affine.SetTranslation(tuple((centre_he - centre_msi + rng.uniform(-shift_msi_px, shift_msi_px, 2) * p).tolist()))

    # smooth deformation in MSI space: cubic B-spline on a coarse mesh, largest displacement fixed
    ref = sitk.Image(shape_rc[1], shape_rc[0], sitk.sitkFloat32)
    ref.SetSpacing((p, p))
    ref.SetOrigin((-p / 2, -p / 2))  # domain = the MSI field's area
    bspline = sitk.BSplineTransformInitializer(ref, [3, 3], 3)
    coeffs = rng.normal(size=len(bspline.GetParameters()))
    bspline.SetParameters(coeffs.tolist())
    grid = super_resolution_grid(shape_rc, p, 2).pixel_centres_xy_um().reshape(-1, 2)
    disp = (
        np.array([bspline.TransformPoint(tuple(pt)) for pt in grid[:: max(1, len(grid) // 2000)]])
        - grid[:: max(1, len(grid) // 2000)]
    )
    coeffs *= deformation_msi_px * p / np.abs(disp).max()
    bspline.SetParameters(coeffs.tolist())
    true = sitk.CompositeTransform([affine, bspline])

    # MSI-like signal from stain densities, sampled through the true warp on a 4x finer grid
    he01 = he.astype(np.float32) / 255.0 if he.dtype == np.uint8 else he.astype(np.float32)
    hed = rgb2hed(np.clip(he01, 0, 1))
    tissue = ~background_mask(he01)
    h, e, d = (normalise(hed[..., i], tissue) for i in range(3))
    signal = np.where(tissue, 0.6 * h + 0.25 * e + 0.35 * d + 0.1, 0.0).astype(np.float32)
    src = sitk.GetImageFromArray(signal)
    src.SetSpacing((q, q))
    sub = 4
    fine = super_resolution_grid(shape_rc, p, sub)
    warped = sitk.GetArrayFromImage(
        sitk.Resample(src, fine.reference_image(), true, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    )
    warped = gaussian_filter(warped, 0.5 * sub)  # optical/laser spot blur of half an MSI pixel
    low = block_mean_rc(warped, sub)
    low = normalise(low)
    remapped = np.exp(-(((low - 0.45) / 0.25) ** 2)) + 0.35 * low  # non-monotonic
    msi = remapped * rng.normal(1.0, noise, low.shape) + rng.normal(0, noise * 0.5, low.shape)
    msi = msi.astype(np.float32)
    missing = rng.integers(0, [shape_rc[0], shape_rc[1]], size=(3, 2))
    msi[missing[:, 0], missing[:, 1]] = np.nan

    lo = np.array(shape_rc) * 0.1
    hi = np.array(shape_rc) * 0.9 - 1
    msi_rc = _spread_points(rng, lo, hi, n_landmarks)
    he_xy = np.array([true.TransformPoint(tuple(pt)) for pt in rc_to_xy_um(msi_rc, p)])
    he_rc = xy_um_to_rc(he_xy + rng.normal(0, landmark_noise_um, he_xy.shape), q)
    msi_noisy = msi_rc + rng.normal(0, landmark_noise_um / p, msi_rc.shape)
    eval_rc = rng.uniform(np.array(shape_rc) * 0.05, np.array(shape_rc) * 0.95 - 1, size=(n_eval, 2))
    return SyntheticPair(msi, he, p, q, true, LandmarkPairs(he_rc, msi_noisy), eval_rc)


def warp_error_msi_px(estimate, truth, points_msi_rc: np.ndarray, fixed_pixel_size_um: float) -> np.ndarray:
    """Distance between two MSI→H&E transforms at MSI points, in MSI pixels.

    The H&E-space difference is mapped back through the inverse of the true transform's local
    linear part (finite differences), so the error reads in MSI pixels whatever the scale.
    """
    p = float(fixed_pixel_size_um)
    pts = rc_to_xy_um(points_msi_rc, p)
    out = np.empty(len(pts))
    h = 0.25 * p
    for i, x in enumerate(pts):
        y_true = np.array(truth.TransformPoint(tuple(x)))
        y_est = np.array(estimate.TransformPoint(tuple(x)))
        jx = (np.array(truth.TransformPoint((x[0] + h, x[1]))) - y_true) / h
        jy = (np.array(truth.TransformPoint((x[0], x[1] + h))) - y_true) / h
        jac = np.column_stack([jx, jy])
        out[i] = np.linalg.norm(np.linalg.solve(jac, y_est - y_true)) / p
    return out
