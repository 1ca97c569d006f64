"""Quality measures of a registration: landmark errors, Jacobian determinant, checkerboard, grid."""

from __future__ import annotations

import numpy as np

from ._coords import GridSpec, rc_to_xy_um, xy_um_to_rc
from ._stages import mapped_points_xy_um

__all__ = [
    "checkerboard",
    "error_stats",
    "jacobian_determinant",
    "landmark_errors_um",
    "tissue_mask_from_rgb",
    "warped_grid_lines_rc",
]


def local_jacobians(transform, points_xy_um: np.ndarray, h_um: float) -> np.ndarray:
    """(N, 2, 2) Jacobians of ``transform`` at points (central differences with step ``h_um``)."""
    out = np.empty((len(points_xy_um), 2, 2))
    for i, x in enumerate(np.asarray(points_xy_um, float)):
        cols = []
        for d in ((h_um, 0.0), (0.0, h_um)):
            a = np.array(transform.TransformPoint((x[0] + d[0], x[1] + d[1])))
            b = np.array(transform.TransformPoint((x[0] - d[0], x[1] - d[1])))
            cols.append((a - b) / (2 * h_um))
        out[i] = np.column_stack(cols)
    return out


def landmark_errors_um(transform, fixed_xy_um: np.ndarray, moving_xy_um: np.ndarray, h_um: float) -> np.ndarray:
    """Landmark errors in MSI (fixed) physical µm.

    The miss ``transform(fixed) - moving`` lies in H&E space; it is brought back to MSI space through
    the inverse of the transform's local Jacobian, so errors read in MSI µm whatever the scale.
    """
    fixed = np.asarray(fixed_xy_um, float).reshape(-1, 2)
    moving = np.asarray(moving_xy_um, float).reshape(-1, 2)
    if not len(fixed):
        return np.zeros(0)
    mapped = np.array([transform.TransformPoint(tuple(x)) for x in fixed])
    jac = local_jacobians(transform, fixed, h_um)
    diff = np.linalg.solve(jac, (mapped - moving)[..., None])[..., 0]
    return np.linalg.norm(diff, axis=1)


def error_stats(errors: np.ndarray, scale: float = 1.0) -> dict | None:
    """``{median, p90, max, mean, n}`` of finite errors divided by ``scale``; ``None`` when there are none."""
    e = np.asarray(errors, float)
    e = e[np.isfinite(e)] / scale
    if not len(e):
        return None
    return {
        "median": float(np.median(e)),
        "p90": float(np.percentile(e, 90)),
        "max": float(e.max()),
        "mean": float(e.mean()),
        "n": int(len(e)),
    }


def jacobian_determinant(transform, affine, grid: GridSpec) -> np.ndarray:
    """Jacobian determinant of the deformation on top of the affine, sampled on ``grid``.

    ``det(dT/dx) / det(A)`` for ``T = A ∘ B``: 1 where the B-spline neither stretches nor squeezes,
    below 1 where it compresses, ≤ 0 where it folds. (rows, cols) float32.
    """
    mapped = mapped_points_xy_um(transform, grid)  # (rows, cols, 2) xy
    h = grid.pixel_size_um
    if min(grid.shape_rc) < 2:
        return np.ones(grid.shape_rc, np.float32)
    dx_dcol = np.gradient(mapped[..., 0], h, axis=1)
    dx_drow = np.gradient(mapped[..., 0], h, axis=0)
    dy_dcol = np.gradient(mapped[..., 1], h, axis=1)
    dy_drow = np.gradient(mapped[..., 1], h, axis=0)
    det = dx_dcol * dy_drow - dx_drow * dy_dcol
    det_a = float(np.linalg.det(np.asarray(affine.GetMatrix(), float).reshape(2, 2)))
    return (det / det_a).astype(np.float32)


def tissue_mask_from_rgb(rgb01: np.ndarray) -> np.ndarray:
    """Tissue in an RGB image in [0, 1]: neither glass (bright, unsaturated) nor black background."""
    from ._features import background_mask

    return ~background_mask(rgb01)


def checkerboard(a: np.ndarray, b: np.ndarray, tile_px: int) -> np.ndarray:
    """Alternate square tiles of two same-shape images (``a`` where (i // t + j // t) is even)."""
    rows, cols = a.shape[:2]
    r = (np.arange(rows) // tile_px)[:, None]
    c = (np.arange(cols) // tile_px)[None, :]
    pick_a = ((r + c) % 2) == 0
    if a.ndim == 3:
        pick_a = pick_a[..., None]
    return np.where(pick_a, a, b)


def warped_grid_lines_rc(bspline, shape_rc: tuple[int, int], pixel_size_um: float, step_px: int) -> list[np.ndarray]:
    """Lines of a regular MSI grid bent by the B-spline (the deformation on top of the affine).

    Returns a list of (n, 2) arrays of MSI (row, col) pixel coordinates, one per line (napari Shapes
    ``path``). Without a B-spline the lines stay straight.
    """
    rows, cols = shape_rc
    lines = []
    r_vals = np.arange(0, rows, step_px, dtype=float)
    c_vals = np.arange(0, cols, step_px, dtype=float)
    dense_r = np.linspace(-0.5, rows - 0.5, 4 * rows + 1)
    dense_c = np.linspace(-0.5, cols - 0.5, 4 * cols + 1)
    for r in r_vals:
        lines.append(np.column_stack([np.full_like(dense_c, r), dense_c]))
    for c in c_vals:
        lines.append(np.column_stack([dense_r, np.full_like(dense_r, c)]))
    if bspline is None:
        return lines
    out = []
    for line in lines:
        xy = rc_to_xy_um(line, pixel_size_um)
        moved = np.array([bspline.TransformPoint(tuple(p)) for p in xy])
        out.append(xy_um_to_rc(moved, pixel_size_um))
    return out
