"""Coordinates: napari (row, col) pixel indices ↔ SimpleITK (x, y) physical µm, and grids.

Conventions (the contract of :mod:`napari_smsdl.registration`):

* An image with pixel size ``p`` µm lives in a physical space where the centre of pixel
  ``(row, col)`` is at ``x = col * p``, ``y = row * p`` (µm). The origin is the centre of pixel
  (0, 0) and the direction matrix is the identity. This is what SimpleITK gives an array with
  ``SetSpacing((p, p))`` and the default origin.
* napari points, shapes and layer data are ``(row, col)`` (or ``(y, x)``) in data coordinates;
  SimpleITK points are ``(x, y)`` in physical µm. :func:`rc_to_xy_um` and :func:`xy_um_to_rc`
  are the only places where the axes are swapped.
* A finer grid with pixel size ``g`` covering the same area as a grid with pixel size ``p``
  (the super-resolution grid, ``g = p / F``) has its pixel (0, 0) centre at ``-p/2 + g/2``
  in each axis: see :func:`super_resolution_grid`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "GridSpec",
    "affine_to_napari_matrix",
    "rc_to_xy_um",
    "super_resolution_grid",
    "xy_um_to_rc",
]


def rc_to_xy_um(points_rc: np.ndarray, pixel_size_um: float) -> np.ndarray:
    """Convert napari ``(row, col)`` data coordinates to SimpleITK ``(x, y)`` physical µm.

    Parameters
    ----------
    points_rc : (N, 2) or (2,) array_like
        Points as (row, col) in pixel units of an image whose pixel (0, 0) centre is at the origin.
    pixel_size_um : float
        Pixel size of that image in µm (square pixels).

    Returns
    -------
    (N, 2) or (2,) ndarray of float64
        The same points as (x, y) in µm: ``x = col * pixel_size_um``, ``y = row * pixel_size_um``.
    """
    pts = np.asarray(points_rc, dtype=float)
    return pts[..., ::-1] * float(pixel_size_um)


def xy_um_to_rc(points_xy_um: np.ndarray, pixel_size_um: float) -> np.ndarray:
    """Inverse of :func:`rc_to_xy_um`: physical ``(x, y)`` µm to ``(row, col)`` pixel units."""
    pts = np.asarray(points_xy_um, dtype=float)
    return pts[..., ::-1] / float(pixel_size_um)


@dataclass(frozen=True)
class GridSpec:
    """A regular pixel grid placed in a physical space (µm).

    Attributes
    ----------
    shape_rc : (int, int)
        Number of rows and columns.
    pixel_size_um : float
        Pixel size in µm.
    origin_rc_um : (float, float)
        Physical position (y, x) in µm of the centre of pixel (0, 0), given in (row, col) axis order,
        i.e. ``(y0, x0)``. napari's layer ``translate`` for a layer with ``scale = (p, p)``.
    """

    shape_rc: tuple[int, int]
    pixel_size_um: float
    origin_rc_um: tuple[float, float] = (0.0, 0.0)

    @property
    def origin_xy_um(self) -> tuple[float, float]:
        """Origin in SimpleITK (x, y) order."""
        return (float(self.origin_rc_um[1]), float(self.origin_rc_um[0]))

    def reference_image(self):
        """An empty SimpleITK image carrying this grid (size, spacing, origin)."""
        import SimpleITK as sitk

        ref = sitk.Image(int(self.shape_rc[1]), int(self.shape_rc[0]), sitk.sitkUInt8)
        ref.SetSpacing((float(self.pixel_size_um),) * 2)
        ref.SetOrigin(self.origin_xy_um)
        return ref

    def pixel_centres_xy_um(self) -> np.ndarray:
        """(rows, cols, 2) physical (x, y) µm of every pixel centre."""
        rows, cols = self.shape_rc
        y = self.origin_rc_um[0] + np.arange(rows) * self.pixel_size_um
        x = self.origin_rc_um[1] + np.arange(cols) * self.pixel_size_um
        xx, yy = np.meshgrid(x, y)
        return np.stack([xx, yy], axis=-1)


def super_resolution_grid(msi_shape_rc: tuple[int, int], msi_pixel_size_um: float, factor: int) -> GridSpec:
    """The grid that splits every MSI pixel into ``factor × factor`` sub-pixels.

    It covers exactly the area of the MSI grid: shape ``(rows·F, cols·F)``, pixel size ``p / F``,
    and its pixel (0, 0) centre at ``-p/2 + p/(2F)`` µm on both axes of MSI physical space.
    ``factor = 1`` gives the MSI grid itself.
    """
    factor = int(factor)
    if factor < 1:
        raise ValueError(f"factor must be a positive integer, got {factor}")
    p = float(msi_pixel_size_um)
    g = p / factor
    off = -p / 2 + g / 2
    return GridSpec((int(msi_shape_rc[0]) * factor, int(msi_shape_rc[1]) * factor), g, (off, off))


def affine_to_napari_matrix(transform, from_pixel_size_um: float, to_pixel_size_um: float) -> np.ndarray:
    """3×3 homogeneous (row, col) matrix of a 2-D SimpleITK affine-like transform in pixel units.

    ``transform`` maps physical (x, y) µm of image A (pixel size ``from_pixel_size_um``) to physical
    (x, y) µm of image B (pixel size ``to_pixel_size_um``). The result ``M`` maps A's (row, col, 1)
    to B's (row, col, 1): ``rc_B = M @ [r_A, c_A, 1]``. Its inverse scaled by B's pixel size is the
    napari ``affine`` that places B's pixels over A (see the widget).

    Raises
    ------
    TypeError
        When the transform is not linear (e.g. a B-spline).
    """
    import SimpleITK as sitk

    if not transform.IsLinear():
        raise TypeError(f"{transform.GetName()} is not linear; it has no matrix")
    # probe the transform: columns of the matrix from three points
    p = float(from_pixel_size_um)
    q = float(to_pixel_size_um)
    tx = sitk.Transform(transform)
    o = np.array(tx.TransformPoint((0.0, 0.0)))
    ex = np.array(tx.TransformPoint((1.0, 0.0))) - o
    ey = np.array(tx.TransformPoint((0.0, 1.0))) - o
    m_xy = np.column_stack([ex, ey])  # physical xy -> xy
    swap = np.array([[0.0, 1.0], [1.0, 0.0]])
    m_rc = swap @ m_xy @ swap * (p / q)
    out = np.eye(3)
    out[:2, :2] = m_rc
    out[:2, 2] = o[::-1] / q
    return out
