"""Landmark pairs (H&E ↔ MSI), their CSV form, checks, and the landmark affine (stage 1)."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError, RegistrationError
from ._coords import rc_to_xy_um

__all__ = ["CSV_HEADER", "LandmarkPairs", "fit_landmark_affine", "read_landmarks_csv", "write_landmarks_csv"]

CSV_HEADER = ("he_row", "he_col", "msi_row", "msi_col")
MIN_PAIRS = 3


@dataclass(frozen=True, eq=False)
class LandmarkPairs:
    """Matching points of the H&E (moving) and the MSI (fixed), paired by index.

    Attributes
    ----------
    he_rc : (N, 2) float ndarray
        H&E points as (row, col) in H&E pixel (data) coordinates.
    msi_rc : (N, 2) float ndarray
        MSI points as (row, col) in MSI pixel (data) coordinates; ``msi_rc[i]`` matches ``he_rc[i]``.
    """

    he_rc: np.ndarray
    msi_rc: np.ndarray

    def __post_init__(self):
        he = np.asarray(self.he_rc, dtype=float).reshape(-1, 2) if np.size(self.he_rc) else np.zeros((0, 2))
        msi = np.asarray(self.msi_rc, dtype=float).reshape(-1, 2) if np.size(self.msi_rc) else np.zeros((0, 2))
        object.__setattr__(self, "he_rc", he)
        object.__setattr__(self, "msi_rc", msi)

    def __len__(self) -> int:
        return int(min(len(self.he_rc), len(self.msi_rc)))

    @classmethod
    def from_points(cls, he_rc, msi_rc, *, source: str | Path | None = None) -> LandmarkPairs:
        """Build and :meth:`validate` pairs from two (N, 2) (row, col) arrays (e.g. napari Points data)."""
        pairs = cls(np.asarray(he_rc, float).reshape(-1, 2), np.asarray(msi_rc, float).reshape(-1, 2))
        he_n = len(np.asarray(he_rc).reshape(-1, 2))
        msi_n = len(np.asarray(msi_rc).reshape(-1, 2))
        if he_n != msi_n:
            raise RegistrationError(
                f"unequal landmark counts: {he_n} H&E points but {msi_n} MSI points; they are paired by index",
                source,
            )
        pairs.validate(source=source)
        return pairs

    def validate(self, *, source: str | Path | None = None, min_pairs: int = MIN_PAIRS) -> None:
        """Raise :class:`RegistrationError` unless there are ≥ ``min_pairs`` finite, non-collinear pairs."""
        if len(self.he_rc) != len(self.msi_rc):
            raise RegistrationError(
                f"unequal landmark counts: {len(self.he_rc)} H&E points but {len(self.msi_rc)} MSI points", source
            )
        n = len(self)
        if n < min_pairs:
            raise RegistrationError(
                f"{n} landmark pair{'s' if n != 1 else ''}; an affine needs at least {min_pairs} non-collinear pairs",
                source,
            )
        if not (np.isfinite(self.he_rc).all() and np.isfinite(self.msi_rc).all()):
            raise RegistrationError("landmarks contain NaN or infinite coordinates", source)
        for name, pts in (("H&E", self.he_rc), ("MSI", self.msi_rc)):
            _, first, counts = np.unique(np.round(np.asarray(pts, float), 6), axis=0, return_index=True,
                                         return_counts=True)
            if (counts > 1).any():  # a repeated point is one constraint counted twice, and skews the fit
                dup = sorted(int(i) + 1 for i in first[counts > 1])
                raise RegistrationError(
                    f"{name} landmark{'s' if len(dup) > 1 else ''} {', '.join(map(str, dup))} "
                    f"appear{'' if len(dup) > 1 else 's'} more than once (a duplicated pair); remove the copies",
                    source,
                )
            if _collinear(pts):
                raise RegistrationError(
                    f"the {name} landmarks are collinear (or coincide); an affine needs 3 points not on one line",
                    source,
                )

    def subset(self, keep: np.ndarray) -> LandmarkPairs:
        """The pairs selected by an index or boolean array."""
        return LandmarkPairs(self.he_rc[keep], self.msi_rc[keep])

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write ``he_row,he_col,msi_row,msi_col`` CSV; see :func:`write_landmarks_csv`."""
        return write_landmarks_csv(self, path)

    @classmethod
    def from_csv(cls, path: str | os.PathLike) -> LandmarkPairs:
        """Read a CSV; see :func:`read_landmarks_csv`."""
        return read_landmarks_csv(path)


def _collinear(points: np.ndarray, rel_tol: float = 1e-3) -> bool:
    """True when the points span less than a 2-D region (all on one line, or coincident)."""
    pts = np.asarray(points, float)
    if len(pts) < 3:
        return True
    centred = pts - pts.mean(axis=0)
    s = np.linalg.svd(centred, compute_uv=False)
    return bool(s[0] == 0 or s[1] <= rel_tol * s[0])


def write_landmarks_csv(pairs: LandmarkPairs, path: str | os.PathLike) -> Path:
    """Write landmark pairs as CSV with the header ``he_row,he_col,msi_row,msi_col``.

    Coordinates are pixel (data) coordinates of each image, one pair per line, full precision.
    """
    path = Path(path)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_HEADER)
        for he, msi in zip(pairs.he_rc, pairs.msi_rc, strict=True):
            writer.writerow([repr(float(v)) for v in (*he, *msi)])
    return path


def read_landmarks_csv(path: str | os.PathLike) -> LandmarkPairs:
    """Read landmark pairs from a CSV with the header ``he_row,he_col,msi_row,msi_col``.

    Columns may come in any order; extra columns are ignored; blank lines are skipped.

    Raises
    ------
    InputError
        Naming the file: missing or empty file, a missing column, a value that is not a number.
    RegistrationError
        Fewer than 3 pairs or collinear points (see :meth:`LandmarkPairs.validate`).
    """
    path = Path(path)
    if not path.exists():
        raise InputError("landmarks file not found", path)
    if path.is_dir():
        raise InputError("is a directory, expected a landmarks CSV", path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError("not a text CSV file", path) from exc
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise InputError(f"empty landmarks file; expected the header {','.join(CSV_HEADER)}", path)
    reader = csv.reader(lines)
    header = [h.strip().lower() for h in next(reader)]
    missing = [c for c in CSV_HEADER if c not in header]
    if missing:
        raise InputError(
            f"landmarks CSV lacks column(s) {', '.join(missing)}; expected the header {','.join(CSV_HEADER)}", path
        )
    idx = [header.index(c) for c in CSV_HEADER]
    rows = []
    for lineno, row in enumerate(reader, start=2):
        try:
            rows.append([float(row[i]) for i in idx])
        except (ValueError, IndexError) as exc:
            raise InputError(f"line {lineno}: expected 4 numbers ({','.join(CSV_HEADER)}), got {row}", path) from exc
    data = np.asarray(rows, float).reshape(-1, 4)
    pairs = LandmarkPairs(data[:, 0:2], data[:, 2:4])
    pairs.validate(source=path)
    return pairs


def landmark_points_um(
    pairs: LandmarkPairs, fixed_pixel_size_um: float, moving_pixel_size_um: float
) -> tuple[np.ndarray, np.ndarray]:
    """(fixed MSI (x, y) µm, moving H&E (x, y) µm) arrays of shape (N, 2)."""
    return rc_to_xy_um(pairs.msi_rc, fixed_pixel_size_um), rc_to_xy_um(pairs.he_rc, moving_pixel_size_um)


def fit_landmark_affine(fixed_xy_um: np.ndarray, moving_xy_um: np.ndarray, *, center_xy_um=None):
    """Least-squares affine mapping fixed (MSI) physical points to moving (H&E) physical points.

    Uses SimpleITK's ``LandmarkBasedTransformInitializer`` with an ``AffineTransform``, then
    re-expresses the result about ``center_xy_um`` (the same mapping; a centre inside the image
    conditions the later optimisation).

    Parameters
    ----------
    fixed_xy_um, moving_xy_um : (N, 2) ndarray
        Paired points in (x, y) µm, N ≥ 3 and not collinear.
    center_xy_um : (2,) array_like, optional
        Centre of rotation of the returned transform (default: the fixed points' mean).

    Returns
    -------
    SimpleITK.AffineTransform
        MSI physical → H&E physical.
    """
    import SimpleITK as sitk

    fixed = np.asarray(fixed_xy_um, float)
    moving = np.asarray(moving_xy_um, float)
    if len(fixed) < MIN_PAIRS or _collinear(fixed) or _collinear(moving):
        raise RegistrationError(f"cannot fit an affine to {len(fixed)} landmark pairs (need 3 non-collinear)")
    tx = sitk.LandmarkBasedTransformInitializer(
        sitk.AffineTransform(2), fixed.ravel().tolist(), moving.ravel().tolist()
    )
    affine = sitk.AffineTransform(tx)
    return recentre_affine(affine, fixed.mean(axis=0) if center_xy_um is None else center_xy_um)


def recentre_affine(affine, center_xy_um):
    """The same affine mapping expressed with centre of rotation ``center_xy_um``."""
    import SimpleITK as sitk

    a = sitk.AffineTransform(affine)
    m = np.asarray(a.GetMatrix(), float).reshape(2, 2)
    c_new = np.asarray(center_xy_um, float)
    y = np.asarray(a.TransformPoint(tuple(c_new.tolist())), float)
    out = sitk.AffineTransform(2)
    out.SetMatrix(m.ravel().tolist())
    out.SetCenter(tuple(c_new.tolist()))
    out.SetTranslation(tuple((y - c_new).tolist()))
    return out
