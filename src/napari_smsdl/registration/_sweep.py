"""A landmark-free start: sweep rotation, scale and flip; find the shift of each by masked FFT correlation.

For every candidate (rotation, isotropic scale, mirror) the histology features are resampled onto an
extended, coarse copy of the MSI grid that covers the whole histology, and every shift is scored at
once: with the features whitened, ``Σ_j w_j Σ_k NCC_jk(shift)²`` over ion components ``j`` (weighted
by their variance) and features ``k`` approximates the R² of a linear prediction of the ion images
from the histology. Normalised cross-correlations are computed on the overlap only (Padfield's
masked NCC), so a histology that covers part of the MSI field, or more, is handled; shifts whose
overlap is below ``min_overlap`` of the acquired MSI pixels are not considered.

Reference: D. Padfield, "Masked object registration in the Fourier domain", IEEE TIP 21 (2012).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._channel_fit import LinearMap
from ._channels import ChannelTargets, OpticalFeatures
from ._features import block_mean_rc

__all__ = ["SweepCandidate", "sweep_start"]


@dataclass(frozen=True)
class SweepCandidate:
    rotation_deg: float
    scale: float
    mirrored: bool
    score: float
    overlap: float
    linear: LinearMap

    def to_dict(self) -> dict:
        return {
            "rotation_deg": self.rotation_deg,
            "scale": self.scale,
            "mirrored": self.mirrored,
            "score": round(float(self.score), 6),
            "overlap": round(float(self.overlap), 4),
        }


def _whiten(values: np.ndarray, n_keep: int) -> np.ndarray:
    """(n, F) → (n, F') zero-mean, identity-covariance leading components (at most ``n_keep``)."""
    v = values - values.mean(axis=0)
    cov = np.einsum("ni,nj->ij", v, v) / max(len(v) - 1, 1)
    evals, evecs = np.linalg.eigh(cov)
    keep = evals > 1e-3 * evals.max()
    keep &= np.arange(len(evals)) >= len(evals) - n_keep
    return v @ (evecs[:, keep] / np.sqrt(evals[keep]))


def _xcorr(fa: np.ndarray, b: np.ndarray, shape) -> np.ndarray:
    """Σ_x a(x) b(x + t) for all t, from ``fa = conj(rfft2(a))`` (zero-padded to ``shape``)."""
    return np.fft.irfft2(fa * np.fft.rfft2(b, shape), shape)


def sweep_start(
    targets: ChannelTargets,
    features: OpticalFeatures,
    *,
    he_per_msi: float,
    he_centre_xy_um: np.ndarray,
    rotations_deg=tuple(np.arange(-12.0, 12.1, 3.0)),
    scales=(0.95, 1.0, 1.05),
    mirror: bool = True,
    coarse_px: int | None = None,
    n_components: int = 3,
    n_features: int = 6,
    min_overlap: float = 0.4,
) -> list[SweepCandidate]:
    """Score every candidate start; returns them best first (one per rotation/scale/mirror).

    Parameters
    ----------
    targets, features : the two sides (see :mod:`._channels`).
    he_per_msi : float
        H&E µm per MSI µm from the pixel sizes (1 when both are in true µm).
    he_centre_xy_um : (2,) array
        H&E physical centre: rotations and scales turn about it.
    rotations_deg, scales : sequences
        The grid swept (degrees, relative isotropic scale).
    mirror : bool
        Also try the mirrored histology (a slide scanned face down).
    coarse_px : int, optional
        MSI pixels per coarse pixel (default: 1–3, keeping ≥ 40 coarse pixels across the MSI's short
        side; a 34-pixel field at 3 px per coarse pixel left 11 and the sweep chose wrong shifts).
    min_overlap : float
        Smallest overlap, as a fraction of the acquired MSI pixels, a shift may have.
    """
    from scipy.ndimage import map_coordinates

    p = targets.pixel_size_um
    if coarse_px is None:
        coarse_px = int(np.clip(min(targets.shape_rc) // 40, 1, 3))
    k = max(1, int(coarse_px))
    pc = p * k  # coarse pixel µm
    # fixed side: coarse PCs, blurred like the features
    mask = block_mean_rc(targets.mask.astype(float), k) > 0.5
    y_imgs = [block_mean_rc(im, k) for im in targets.smoothed(float(k))[:n_components]]
    w = targets.explained[:n_components] / targets.explained[:n_components].sum()
    fr, fc = mask.shape
    fixed_centre = np.array([(targets.shape_rc[1] - 1) / 2 * p, (targets.shape_rc[0] - 1) / 2 * p])
    # moving side: features blurred to the coarse pixel
    per_msi = p * he_per_msi / features.pixel_size_um
    blurred = features.smoothed(float(k), per_msi)
    he_rows, he_cols = blurred.shape[1:]
    corners = np.array([[0, 0], [he_cols - 1, 0], [0, he_rows - 1], [he_cols - 1, he_rows - 1]], float)
    corners_xy = corners * features.pixel_size_um + np.asarray(features.origin_xy_um)

    out = []
    n_fixed = float(mask.sum())
    for mirrored in (False, True) if mirror else (False,):
        for s in scales:
            for rot in rotations_deg:
                th = np.deg2rad(rot)
                r = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
                flip = np.diag([-1.0, 1.0]) if mirrored else np.eye(2)
                m = he_per_msi * s * r @ flip
                minv = np.linalg.inv(m)
                # coarse MSI-space grid covering the whole histology under this candidate
                pts = (corners_xy - he_centre_xy_um) @ minv.T + fixed_centre
                lo = np.floor(pts.min(axis=0) / pc) - 1
                hi = np.ceil(pts.max(axis=0) / pc) + 1
                ncol, nrow = int(hi[0] - lo[0] + 1), int(hi[1] - lo[1] + 1)
                gx, gy = np.meshgrid((lo[0] + np.arange(ncol)) * pc, (lo[1] + np.arange(nrow)) * pc)
                xy = np.column_stack([gx.ravel(), gy.ravel()])
                he_xy = (xy - fixed_centre) @ m.T + he_centre_xy_um
                col = (he_xy[:, 0] - features.origin_xy_um[0]) / features.pixel_size_um
                row = (he_xy[:, 1] - features.origin_xy_um[1]) / features.pixel_size_um
                inside = (row >= 0) & (row <= he_rows - 1) & (col >= 0) & (col <= he_cols - 1)
                if inside.sum() < 16:
                    continue
                vals = np.column_stack(
                    [map_coordinates(im, [row[inside], col[inside]], order=1) for im in blurred]
                )
                white = _whiten(vals, n_features)
                mm = inside.reshape(nrow, ncol).astype(float)
                feats = []
                for j in range(white.shape[1]):
                    img = np.zeros(nrow * ncol)
                    img[inside] = white[:, j]
                    feats.append(img.reshape(nrow, ncol))
                shape = (fr + nrow, fc + ncol)
                fm = np.conj(np.fft.rfft2(mask.astype(float), shape))
                overlap = _xcorr(fm, mm, shape)
                ok = overlap >= min_overlap * n_fixed
                if not ok.any():
                    continue
                o = np.maximum(overlap, 1.0)
                ffs = [np.conj(np.fft.rfft2(np.where(mask, yi, 0.0), shape)) for yi in y_imgs]
                ffs2 = [np.conj(np.fft.rfft2(np.where(mask, yi, 0.0) ** 2, shape)) for yi in y_imgs]
                sy = [_xcorr(f, mm, shape) for f in ffs]
                syy = [_xcorr(f, mm, shape) for f in ffs2]
                score = np.zeros(shape)
                for g in feats:
                    sg = _xcorr(fm, g, shape)
                    sgg = _xcorr(fm, g**2, shape)
                    vg = np.maximum(sgg - sg**2 / o, 1e-9)
                    for j, f in enumerate(ffs):
                        sfg = _xcorr(f, g, shape)
                        vy = np.maximum(syy[j] - sy[j] ** 2 / o, 1e-9)
                        ncc = (sfg - sy[j] * sg / o) / np.sqrt(vy * vg)
                        score += w[j] * np.clip(ncc, -1, 1) ** 2
                # small overlaps correlate by chance: weigh the score by the overlap fraction
                score = np.where(ok, score * np.minimum(overlap / n_fixed, 1.0), -np.inf)
                best = np.unravel_index(int(np.argmax(score)), shape)
                # shift t (coarse px): fixed pixel (r, c) ↔ extended pixel (r + t_r, c + t_c), cyclic
                t_r = best[0] if best[0] < nrow else best[0] - shape[0]
                t_c = best[1] if best[1] < ncol else best[1] - shape[1]
                # extended pixel (i, j) sits at MSI µm (lo + (j, i)) * pc; fixed coarse pixel (r, c) at
                # MSI µm ((c, r) + 0.5) * pc - p/2; the candidate map: x_fixed ↦ x_ext = x_fixed + d
                d = (lo + np.array([t_c, t_r])) * pc - ((k - 1) / 2) * p
                offset = he_centre_xy_um + m @ (d - fixed_centre)
                out.append(
                    SweepCandidate(
                        float(rot), float(s), bool(mirrored), float(score[best]),
                        float(overlap[best] / n_fixed), LinearMap(m, offset),
                    )
                )
    out.sort(key=lambda c: -c.score)
    return out
