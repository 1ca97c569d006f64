"""Unaligned test cases made from an aligned real optical/ion pair by warping the optical image.

The optical image of an aligned pair (MSI physical → optical physical is ``y = x + offset``) is
resampled through a known transform ``S`` (a rotation, an isotropic scale and a shift, after a mild
smooth warp) onto a new grid, which may crop it. Registering the warped image back from the ion
images keeps the real modality gap, and the answer is known: an estimate ``E`` (MSI physical →
warped physical) is right where ``S(E(x)) = x + offset``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._coords import rc_to_xy_um, xy_um_to_rc
from ._landmarks import LandmarkPairs

__all__ = ["WarpedCase", "warp_aligned_pair"]


@dataclass(frozen=True, eq=False)
class WarpedCase:
    """A warped optical image, its pixel size, the known answer and noisy landmarks.

    Attributes
    ----------
    moving_rgb : (rows, cols, 3) uint8
    moving_pixel_size_um : float
    warp : SimpleITK.Transform
        ``S``: warped physical → original optical physical.
    offset_um : float
        Original alignment: MSI physical ``x`` ↔ optical physical ``x + offset_um`` (both axes).
    landmarks : LandmarkPairs
    description : dict
    """

    moving_rgb: np.ndarray
    moving_pixel_size_um: float
    warp: object
    offset_um: float
    fixed_pixel_size_um: float
    landmarks: LandmarkPairs
    description: dict

    def errors_msi_px(self, estimate, points_msi_rc: np.ndarray) -> np.ndarray:
        """|S(E(x)) − (x + offset)| in MSI px at MSI (row, col) points (the optical has the MSI's µm)."""
        p = self.fixed_pixel_size_um
        xy = rc_to_xy_um(points_msi_rc, p)
        got = np.array([self.warp.TransformPoint(estimate.TransformPoint(tuple(x))) for x in xy])
        return np.linalg.norm(got - (xy + self.offset_um), axis=1) / p


def _invert_point(transform, y, x0, iterations=20):
    x = np.array(x0, float)
    for _ in range(iterations):
        fx = np.array(transform.TransformPoint(tuple(x)))
        h = 0.5
        j = np.column_stack(
            [
                (np.array(transform.TransformPoint((x[0] + h, x[1]))) - fx) / h,
                (np.array(transform.TransformPoint((x[0], x[1] + h))) - fx) / h,
            ]
        )
        step = np.linalg.solve(j, np.asarray(y) - fx)
        x = x + step
        if np.abs(step).max() < 1e-6:
            break
    return x


def warp_aligned_pair(
    optical_rgb: np.ndarray,
    optical_pixel_size_um: float,
    msi_shape_rc: tuple[int, int],
    msi_pixel_size_um: float,
    *,
    offset_um: float,
    rotation_deg: float = 0.0,
    scale: float = 1.0,
    shift_msi_px: tuple[float, float] = (0.0, 0.0),
    warp_msi_px: float = 0.0,
    crop: tuple[float, float, float, float] = (0.0, 1.0, 0.0, 1.0),
    pixel_size_um: float | None = None,
    margin_msi_px: float = 6.0,
    n_landmarks: int = 6,
    landmark_noise_px: float = 1.0,
    seed: int = 0,
    landmark_points_rc: np.ndarray | None = None,
) -> WarpedCase:
    """Warp an aligned optical image by a known transform (see the module docstring).

    Parameters
    ----------
    optical_rgb : (rows, cols, 3) uint8
        The optical image, aligned with the MSI (``x_optical = x_msi + offset_um`` in µm).
    optical_pixel_size_um, msi_pixel_size_um : float
    msi_shape_rc : (int, int)
    rotation_deg, scale : float
        The warped image shows the tissue rotated by this angle and magnified by this factor.
    shift_msi_px : (float, float)
        A further shift (x, y) of the tissue, MSI px.
    warp_msi_px : float
        Largest displacement of a smooth random warp (cubic B-spline, 3 × 3 mesh), MSI px.
    crop : (r0, r1, c0, c1)
        Fractions of the warped field kept (rows r0…r1, columns c0…c1).
    pixel_size_um : float, optional
        Pixel size of the warped image (default: the optical's).
    margin_msi_px : float
        Blank slide kept around the tissue field before cropping.
    n_landmarks, landmark_noise_px : landmarks spread over the MSI field, optical-side click noise
        (standard deviation, warped-image pixels, per axis).
    seed : int
    """
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    q0 = float(optical_pixel_size_um)
    q = float(pixel_size_um or q0)
    p = float(msi_pixel_size_um)
    rows0, cols0 = optical_rgb.shape[:2]
    centre_o = np.array([(cols0 - 1) / 2 * q0, (rows0 - 1) / 2 * q0])
    # the warped field: the optical field rotated and scaled, plus a margin
    half = np.array([cols0, rows0]) * q0 / 2 * scale + margin_msi_px * p
    th = np.deg2rad(rotation_deg)
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    ext = np.abs(rot) @ half
    n_cols, n_rows = (np.ceil(2 * ext / q)).astype(int)
    centre_w = np.array([(n_cols - 1) / 2 * q, (n_rows - 1) / 2 * q])
    # S: warped physical u -> optical physical: u' = u + d(u); y = c_o + δ + R(-θ)(u' - c_w) / s
    aff = sitk.AffineTransform(2)
    aff.SetMatrix((rot.T / scale).ravel().tolist())
    aff.SetCenter(tuple(centre_w.tolist()))
    aff.SetTranslation(tuple((centre_o - centre_w - np.asarray(shift_msi_px, float) * p).tolist()))
    parts = [aff]
    if warp_msi_px > 0:
        ref = sitk.Image(int(n_cols), int(n_rows), sitk.sitkFloat32)
        ref.SetSpacing((q, q))
        bs = sitk.BSplineTransformInitializer(ref, [3, 3], 3)
        coeffs = rng.normal(size=len(bs.GetParameters()))
        bs.SetParameters(coeffs.tolist())
        probe = np.stack(np.meshgrid(np.linspace(0, n_cols - 1, 30) * q, np.linspace(0, n_rows - 1, 30) * q), -1)
        probe = probe.reshape(-1, 2)
        disp = np.array([bs.TransformPoint(tuple(u)) for u in probe]) - probe
        coeffs *= warp_msi_px * p / max(np.abs(np.linalg.norm(disp, axis=1)).max(), 1e-9)
        bs.SetParameters(coeffs.tolist())
        parts.append(bs)
    warp = sitk.CompositeTransform(parts)
    r0, r1, c0, c1 = crop
    i0, i1 = int(round(r0 * n_rows)), int(round(r1 * n_rows))
    j0, j1 = int(round(c0 * n_cols)), int(round(c1 * n_cols))
    # the cropped grid keeps physical coordinates relative to its own pixel (0, 0): shift S accordingly
    crop_shift = np.array([j0 * q, i0 * q])
    shifted = sitk.CompositeTransform([warp, sitk.TranslationTransform(2, tuple(crop_shift.tolist()))])
    src = sitk.GetImageFromArray(np.asarray(optical_rgb)[..., :3].astype(np.float32), isVector=True)
    src.SetSpacing((q0, q0))
    ref = sitk.Image(int(j1 - j0), int(i1 - i0), sitk.sitkUInt8)
    ref.SetSpacing((q, q))
    # antialias when the warped pixel is coarser
    if q > q0 * 1.2:
        src = sitk.SmoothingRecursiveGaussian(src, 0.5 * (q - q0))
    out = sitk.Resample(src, ref, shifted, sitk.sitkLinear, 250.0, sitk.sitkVectorFloat32)
    rgb = np.clip(np.round(sitk.GetArrayFromImage(out)), 0, 255).astype(np.uint8)
    # landmarks: spread over the MSI field, inside the cropped image
    msi_rows, msi_cols = msi_shape_rc
    if landmark_points_rc is None:
        cand = rng.uniform([0.1 * msi_rows, 0.1 * msi_cols], [0.9 * msi_rows, 0.9 * msi_cols], size=(400, 2))
    else:
        cand = np.asarray(landmark_points_rc, float)
    he_pts, msi_pts = [], []
    for rc in cand:
        y = rc_to_xy_um(rc, p) + offset_um
        u = _invert_point(shifted, y, y)
        u_rc = xy_um_to_rc(u, q)
        if 2 <= u_rc[0] <= rgb.shape[0] - 3 and 2 <= u_rc[1] <= rgb.shape[1] - 3:
            he_pts.append(u_rc)
            msi_pts.append(rc)
    he_pts, msi_pts = np.array(he_pts), np.array(msi_pts)
    if len(msi_pts) > n_landmarks and landmark_points_rc is None:
        chosen = [0]
        d = np.linalg.norm(msi_pts - msi_pts[0], axis=1)
        for _ in range(n_landmarks - 1):
            nxt = int(np.argmax(d))
            chosen.append(nxt)
            d = np.minimum(d, np.linalg.norm(msi_pts - msi_pts[nxt], axis=1))
        he_pts, msi_pts = he_pts[chosen], msi_pts[chosen]
    he_noisy = he_pts + rng.normal(0, landmark_noise_px, he_pts.shape)
    description = {
        "rotation_deg": rotation_deg,
        "scale": scale,
        "shift_msi_px": list(map(float, shift_msi_px)),
        "warp_msi_px": warp_msi_px,
        "crop": list(crop),
        "pixel_size_um": q,
        "shape_rc": list(rgb.shape[:2]),
    }
    return WarpedCase(rgb, q, shifted, float(offset_um), p, LandmarkPairs(he_noisy, msi_pts), description)
