"""A many-channel similarity: how well the histology predicts the ion images through the forward model.

The MSI measures, in every pixel, the mean over the laser spot of some function of the tissue; the
histology shows that tissue. So a correct transform is one under which features of the histology
(optical density of each colour, their products, a texture measure, the background flag), averaged
over each MSI pixel's footprint, predict the ion images well by a linear (ridge) regression. The
criterion is the cross-validated fraction of ion variance explained (R²), pooled over the leading
principal components of the standardised ion stack, so that many channels, not one, drive the fit.

Everything here is NumPy/SciPy: the features are precomputed once on a reduced histology grid with
the pixel footprint (a box of one MSI pixel ⊗ the spot blur, approximated by a Gaussian) applied, and
a transform is scored by sampling them at the mapped MSI pixel centres (bilinear), which is fast
enough (milliseconds) for Gauss–Newton fits, sweeps, bootstraps and per-patch shifts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._features import _as_rgb_float, background_mask, block_mean_rc

__all__ = ["ChannelTargets", "OpticalFeatures", "channel_targets", "optical_features"]

#: cross-validation blocks (MSI px): neighbouring pixels share noise and misfit, blocks keep folds apart
CV_BLOCK_PX = 16
RIDGE = 1e-3


@dataclass(frozen=True, eq=False)
class ChannelTargets:
    """The fixed side: leading principal-component images of the standardised ion stack.

    Attributes
    ----------
    images : (K, rows, cols) float64
        PC scores (unwhitened: a component weighs by its variance), 0 outside ``mask``.
    mask : (rows, cols) bool
        Acquired pixels (finite in every channel).
    pixel_size_um : float
    explained : (K,) float
        Fraction of the standardised stack's variance in each component.
    n_channels : int
    """

    images: np.ndarray
    mask: np.ndarray
    pixel_size_um: float
    explained: np.ndarray
    n_channels: int

    @property
    def shape_rc(self) -> tuple[int, int]:
        return tuple(self.mask.shape)

    def smoothed(self, sigma_px: float) -> np.ndarray:
        """(K, rows, cols) images blurred by a normalised (mask-aware) Gaussian of ``sigma_px`` MSI px."""
        if sigma_px <= 0:
            return self.images
        from scipy.ndimage import gaussian_filter

        m = self.mask.astype(float)
        norm = gaussian_filter(m, sigma_px, mode="constant")
        out = np.stack([gaussian_filter(im * m, sigma_px, mode="constant") for im in self.images])
        return np.where(self.mask, out / np.maximum(norm, 1e-6), 0.0)


def channel_targets(stack: np.ndarray, pixel_size_um: float, *, n_components: int = 6) -> ChannelTargets:
    """Principal components of a (channels, rows, cols) ion stack (or one (rows, cols) image).

    Every channel is standardised over the acquired pixels (NaN: not acquired) before the PCA, so
    that bright and faint ions count alike; the ``n_components`` leading scores are kept.
    """
    arr = np.asarray(stack, np.float64)
    if arr.ndim == 2:
        arr = arr[None]
    mask = np.isfinite(arr).all(axis=0)
    values = arr[:, mask].T  # (n, C)
    values = values - values.mean(axis=0)
    sd = values.std(axis=0)
    values = values / np.where(sd > 0, sd, 1.0)
    # eigenvectors of the small covariance (einsum: no BLAS, so the bits do not depend on its threads)
    evals, evecs = np.linalg.eigh(np.einsum("ni,nj->ij", values, values))
    order = np.argsort(evals)[::-1]
    s = np.sqrt(np.clip(evals[order], 0, None))
    vt = evecs[:, order].T
    k = int(min(n_components, len(s)))
    # a deterministic sign: the largest loading of each component is positive
    signs = np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(axis=1)])
    vt = vt * np.where(signs == 0, 1.0, signs)[:, None]
    scores = np.einsum("nc,kc->nk", values, vt[:k])
    images = np.zeros((k,) + mask.shape)
    images[:, mask] = scores.T
    explained = (s**2 / max(float((s**2).sum()), 1e-12))[:k]
    return ChannelTargets(images, mask, float(pixel_size_um), explained, int(arr.shape[0]))


@dataclass(frozen=True, eq=False)
class OpticalFeatures:
    """The moving side: histology features on a reduced grid, each blurred to the MSI pixel footprint.

    Attributes
    ----------
    images : (F, rows, cols) float32
        Standardised features (zero mean, unit variance over the image).
    pixel_size_um : float
        Pixel size of the reduced grid in H&E µm.
    origin_xy_um : (float, float)
        H&E physical position of the centre of reduced pixel (0, 0).
    footprint_px : float
        Gaussian sigma (reduced px) of the MSI footprint already applied.
    names : tuple of str
    """

    images: np.ndarray
    pixel_size_um: float
    origin_xy_um: tuple[float, float]
    footprint_px: float
    names: tuple

    def smoothed(self, sigma_msi_px: float, he_per_msi_px: float) -> np.ndarray:
        """Features blurred further by ``sigma_msi_px`` MSI px (``he_per_msi_px`` reduced px per MSI px)."""
        if sigma_msi_px <= 0:
            return self.images
        from scipy.ndimage import gaussian_filter

        s = sigma_msi_px * he_per_msi_px
        return np.stack([gaussian_filter(im, s, mode="nearest") for im in self.images]).astype(np.float32)

    def sample(
        self, images: np.ndarray, points_xy_um: np.ndarray, margin_px: float = 0.0, gradients: np.ndarray | None = None
    ):
        """Bilinear samples (n, F) of pixel-major ``images`` (rows, cols, F) at H&E physical points (n, 2),
        and an inside mask (n,).

        A point is inside when it lies at least ``margin_px`` reduced pixels within the image (where
        blurring did not reach past the edge)."""
        pts = np.asarray(points_xy_um, float)
        col = (pts[:, 0] - self.origin_xy_um[0]) / self.pixel_size_um
        row = (pts[:, 1] - self.origin_xy_um[1]) / self.pixel_size_um
        rows, cols = images.shape[:2]
        m = float(margin_px)
        inside = (row >= m) & (row <= rows - 1 - m) & (col >= m) & (col <= cols - 1 - m)
        r, c = np.clip(row, 0, rows - 1), np.clip(col, 0, cols - 1)
        if gradients is not None:
            out, grads = bilinear(images, r, c, gradients)
            return out, inside, grads
        out = bilinear(images, r, c)
        return out, inside


def pixel_major(images: np.ndarray) -> np.ndarray:
    """(rows, cols, F) C-contiguous copy of (F, rows, cols) images: one pixel's features side by side."""
    return np.ascontiguousarray(np.moveaxis(images, 0, -1))


def bilinear(images: np.ndarray, row: np.ndarray, col: np.ndarray, *more: np.ndarray):
    """(n, F) bilinear samples of (rows, cols, F) pixel-major images at in-range fractional (row, col).

    Further arrays of the same grid in ``more`` are sampled with the same weights (a tuple is then
    returned)."""
    rows, cols = images.shape[:2]
    r0 = np.minimum(np.floor(row).astype(np.intp), rows - 2) if rows > 1 else np.zeros(len(row), np.intp)
    c0 = np.minimum(np.floor(col).astype(np.intp), cols - 2) if cols > 1 else np.zeros(len(col), np.intp)
    fr = (row - r0).astype(np.float32)[:, None]
    fc = (col - c0).astype(np.float32)[:, None]
    i00 = r0 * cols + c0
    outs = []
    for arr in (images, *more):
        # np.take and the a + (b - a)·f form: 2.5x faster than fancy indexing with four weights (fewer
        # temporaries); this gather is most of a registration's time
        flat = arr.reshape(rows * cols, -1)
        a, b = np.take(flat, i00, axis=0), np.take(flat, i00 + 1, axis=0)
        top = a + (b - a) * fc
        a, b = np.take(flat, i00 + cols, axis=0), np.take(flat, i00 + cols + 1, axis=0)
        bottom = a + (b - a) * fc
        outs.append((top + (bottom - top) * fr).astype(np.float64))
    return outs[0] if not more else tuple(outs)


def optical_features(
    moving_rgb: np.ndarray,
    moving_pixel_size_um: float,
    *,
    msi_pixel_size_he_um: float,
    psf_sigma_msi_px: float = 0.35,
    sub_pixels: int = 3,
) -> OpticalFeatures:
    """Histology features for :class:`ChannelCriterion`, on a grid of about ``sub_pixels`` per MSI pixel.

    Parameters
    ----------
    moving_rgb : (rows, cols, 3) ndarray
        The H&E (or any stain), uint8 or float RGB.
    moving_pixel_size_um : float
        Its pixel size in µm.
    msi_pixel_size_he_um : float
        One MSI pixel expressed in H&E µm (MSI pixel size × H&E µm per MSI µm).
    psf_sigma_msi_px : float
        Laser-spot blur beyond the pixel box, in MSI px.
    sub_pixels : int
        Reduced grid pixels per MSI pixel (per axis).

    Notes
    -----
    Features per reduced pixel: optical density ``-log(rgb)`` of each channel, their 6 products, the
    local contrast of the grey image and the background flag (glass or black). They are block-averaged
    to the reduced grid, then blurred by a Gaussian with the variance of a one-MSI-pixel box plus the
    spot blur (the block-mean forward model), and standardised.
    """
    from scipy.ndimage import gaussian_filter

    rgb = _as_rgb_float(moving_rgb)
    q = float(moving_pixel_size_um)
    k = max(1, int(np.floor(msi_pixel_size_he_um / sub_pixels / q)))
    k = min(k, max(1, min(rgb.shape[:2]) // 16))
    od = -np.log(np.clip(rgb, 1.0 / 255.0, 1.0))
    grey = rgb.mean(axis=-1)
    contrast = np.hypot(*np.gradient(gaussian_filter(grey, 0.5 * k if k > 1 else 0.7)))
    bg = background_mask(rgb).astype(np.float32)
    chans = [od[..., 0], od[..., 1], od[..., 2]]
    names = ["od_r", "od_g", "od_b"]
    for i in range(3):
        for j in range(i, 3):
            chans.append(od[..., i] * od[..., j])
            names.append(f"od_{'rgb'[i]}{'rgb'[j]}")
    chans += [contrast, bg]
    names += ["contrast", "background"]
    stack = np.stack(chans, axis=-1).astype(np.float32)
    reduced = block_mean_rc(stack, k)
    size = k * q
    per_msi = msi_pixel_size_he_um / size
    footprint = float(np.sqrt(1.0 / 12.0 + psf_sigma_msi_px**2) * per_msi)
    images = np.stack([gaussian_filter(reduced[..., c], footprint, mode="nearest") for c in range(reduced.shape[-1])])
    mean = images.reshape(len(images), -1).mean(axis=1)
    sd = images.reshape(len(images), -1).std(axis=1)
    images = ((images - mean[:, None, None]) / np.where(sd > 0, sd, 1.0)[:, None, None]).astype(np.float32)
    off = (k - 1) / 2 * q
    return OpticalFeatures(images, size, (off, off), footprint, tuple(names))


def block_folds(shape_rc: tuple[int, int], block_px: int = CV_BLOCK_PX) -> np.ndarray:
    """(rows, cols) int: 0/1 checkerboard of ``block_px`` blocks (the two cross-validation folds)."""
    r = (np.arange(shape_rc[0]) // block_px)[:, None]
    c = (np.arange(shape_rc[1]) // block_px)[None, :]
    return ((r + c) % 2).astype(np.int8)


def ridge_fit(x: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None, ridge: float = RIDGE) -> np.ndarray:
    """Coefficients (F + 1, K) of ``y ≈ [1, x] @ beta`` (ridge on the non-constant terms)."""
    design = np.hstack([np.ones((len(x), 1)), x])
    w = np.ones(len(x)) if weights is None else weights
    gram = np.einsum("ni,nj->ij", design, design * w[:, None])  # einsum: BLAS-thread independent
    reg = ridge * max(float(np.trace(gram)) / len(gram), 1e-12) * np.eye(len(gram))
    reg[0, 0] = 0.0
    return np.linalg.solve(gram + reg, np.einsum("ni,nk->ik", design, y * w[:, None]))


def predict(x: np.ndarray, beta: np.ndarray) -> np.ndarray:
    return beta[0] + np.einsum("nf,fk->nk", x, beta[1:])


def cv_r2(x: np.ndarray, y: np.ndarray, folds: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Two-fold cross-validated R² pooled over the columns of ``y`` (fit on one fold, score the other)."""
    w = np.ones(len(x)) if weights is None else weights
    sse = sst = 0.0
    for f in (0, 1):
        train, test = folds != f, folds == f
        if train.sum() < x.shape[1] + 2 or not test.any():
            return float("nan")
        beta = ridge_fit(x[train], y[train], w[train])
        res = y[test] - predict(x[test], beta)
        mean = np.average(y[train], axis=0, weights=w[train])
        sse += float((w[test][:, None] * res**2).sum())
        sst += float((w[test][:, None] * (y[test] - mean) ** 2).sum())
    return 1.0 - sse / max(sst, 1e-12)
