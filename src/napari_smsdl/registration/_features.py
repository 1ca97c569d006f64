"""Single-channel images to register: H&E (moving) and MSI (fixed) candidates."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ._params import FixedFeature, MovingFeature

__all__ = ["fixed_feature_image", "moving_feature_image", "normalise"]


def normalise(image: np.ndarray, mask: np.ndarray | None = None, pct: tuple[float, float] = (0.5, 99.5)) -> np.ndarray:
    """Scale to [0, 1] between two percentiles of the finite (and masked-in) values; float32."""
    image = np.asarray(image, dtype=np.float32)
    valid = np.isfinite(image) if mask is None else (mask & np.isfinite(image))
    if not valid.any():
        return np.zeros_like(image)
    lo, hi = np.percentile(image[valid], pct)
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((image - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _as_rgb_float(rgb: np.ndarray) -> np.ndarray:
    """(rows, cols, 3) float32 in [0, 1] from uint8/uint16/float input (a 4th alpha channel is dropped)."""
    arr = np.asarray(rgb)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise InputError(f"H&E must be (rows, cols, 3) RGB, got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0
    arr = arr.astype(np.float32)
    top = float(np.nanmax(arr)) if arr.size else 1.0
    return arr / 255.0 if top > 1.0 else arr


def block_mean_rc(image: np.ndarray, k: int, *, pad: bool = False) -> np.ndarray:
    """Mean over ``k × k`` blocks of the first two axes.

    Edge pixels that do not fill a block are dropped, or with ``pad=True`` the last partial blocks are
    completed by repeating the edge.
    """
    if k <= 1:
        return image
    if pad and (image.shape[0] % k or image.shape[1] % k):
        extra = ((0, -image.shape[0] % k), (0, -image.shape[1] % k)) + ((0, 0),) * (image.ndim - 2)
        image = np.pad(image, extra, mode="edge")
    rows, cols = (image.shape[0] // k) * k, (image.shape[1] // k) * k
    trimmed = image[:rows, :cols]
    shape = (rows // k, k, cols // k, k) + image.shape[2:]
    return trimmed.reshape(shape).mean(axis=(1, 3))


@dataclass(frozen=True)
class FeatureImage:
    """A single-channel image on a grid: ``data`` (rows, cols) float32 in [0, 1] and its placement."""

    data: np.ndarray
    pixel_size_um: float
    origin_xy_um: tuple[float, float]
    mask: np.ndarray | None
    name: str

    def to_sitk(self):
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(np.ascontiguousarray(self.data, dtype=np.float32))
        img.SetSpacing((float(self.pixel_size_um),) * 2)
        img.SetOrigin(tuple(float(v) for v in self.origin_xy_um))
        return img

    def mask_to_sitk(self):
        import SimpleITK as sitk

        if self.mask is None:
            return None
        m = sitk.GetImageFromArray(self.mask.astype(np.uint8))
        m.SetSpacing((float(self.pixel_size_um),) * 2)
        m.SetOrigin(tuple(float(v) for v in self.origin_xy_um))
        return m


def he_rgb_reduced(moving_rgb: np.ndarray, moving_pixel_size_um: float, target_pixel_size_um: float):
    """Block-average the H&E to about ``target_pixel_size_um``: (rgb float [0,1], pixel size, origin_xy)."""
    rgb = _as_rgb_float(moving_rgb)
    k = max(1, int(np.floor(target_pixel_size_um / moving_pixel_size_um)))
    k = min(k, max(1, min(rgb.shape[:2]) // 16))
    reduced = block_mean_rc(rgb, k)
    off = (k - 1) / 2 * moving_pixel_size_um
    return reduced, k * moving_pixel_size_um, (off, off)


def moving_feature_image(
    moving_rgb: np.ndarray,
    moving_pixel_size_um: float,
    kind: MovingFeature,
    *,
    target_pixel_size_um: float | None = None,
    blur_sigma_um: float = 0.0,
) -> FeatureImage:
    """H&E feature: haematoxylin density or inverted grey, reduced and blurred, in [0, 1].

    Parameters
    ----------
    moving_rgb : (rows, cols, 3) ndarray
        H&E in RGB, uint8 or float.
    moving_pixel_size_um : float
        H&E pixel size in µm.
    kind : MovingFeature
        ``HAEMATOXYLIN`` or ``INVERTED_GREY`` (not ``AUTO``).
    target_pixel_size_um : float, optional
        Block-average down to about this pixel size first (default: keep the H&E resolution).
    blur_sigma_um : float
        Gaussian sigma in µm applied after reduction.
    """
    from scipy.ndimage import gaussian_filter

    kind = MovingFeature(kind)
    target = moving_pixel_size_um if target_pixel_size_um is None else target_pixel_size_um
    rgb, size_um, origin = he_rgb_reduced(moving_rgb, moving_pixel_size_um, target)
    feat = he_feature(rgb, kind)
    if blur_sigma_um > 0:
        feat = gaussian_filter(feat, blur_sigma_um / size_um, mode="nearest")
    return FeatureImage(normalise(feat), size_um, origin, None, kind.value)


def background_mask(
    rgb01: np.ndarray, *, white: float = 0.88, black: float = 0.06, grey_sat: float = 0.08
) -> np.ndarray:
    """Slide background in an RGB image in [0, 1]: bright and unsaturated (glass) or near black (masked exports)."""
    rgb = np.nan_to_num(np.asarray(rgb01, np.float32), nan=1.0)
    hi, lo = rgb.max(axis=-1), rgb.min(axis=-1)
    return ((rgb.mean(axis=-1) > white) & (hi - lo < grey_sat)) | (hi < black)


def he_feature(rgb01: np.ndarray, kind: MovingFeature) -> np.ndarray:
    """Single-channel H&E feature of an RGB image in [0, 1], background (glass or black) set to 0.

    ``HAEMATOXYLIN``: haematoxylin density of scikit-image's ``rgb2hed`` (Ruifrok & Johnston colour
    deconvolution); ``INVERTED_GREY``: 1 − luminance (Rec. 709 weights).
    """
    kind = MovingFeature(kind)
    rgb = np.clip(np.asarray(rgb01, np.float32), 0, 1)
    if kind is MovingFeature.HAEMATOXYLIN:
        from skimage.color import rgb2hed

        feat = np.clip(rgb2hed(rgb)[..., 0], 0, None).astype(np.float32)
    elif kind is MovingFeature.INVERTED_GREY:
        feat = 1.0 - (0.2125 * rgb[..., 0] + 0.7154 * rgb[..., 1] + 0.0721 * rgb[..., 2])
    else:
        raise ValueError(f"not a concrete H&E feature: {kind}")
    bg = background_mask(rgb)
    if bg.any() and not bg.all():
        feat = np.where(bg, np.min(feat[~bg]), feat)
    return feat.astype(np.float32)


def fixed_feature_image(
    fixed_msi: np.ndarray, fixed_pixel_size_um: float, kind: FixedFeature, *, channel: int = 0
) -> FeatureImage:
    """MSI feature in [0, 1]: the image itself (2-D input) or TIC / PC1 / one ion of a stack.

    Parameters
    ----------
    fixed_msi : (rows, cols) or (channels, rows, cols) ndarray
        The MSI; NaN marks pixels that were not acquired (they are masked out of the metric).
    fixed_pixel_size_um : float
        MSI pixel size in µm.
    kind : FixedFeature
        Ignored for 2-D input; ``TIC``, ``PC1`` or ``ION`` (with ``channel``) for a stack.
    """
    arr = np.asarray(fixed_msi, dtype=np.float32)
    kind = FixedFeature(kind)
    if arr.ndim == 2:
        image, name = arr, "msi"
    elif arr.ndim == 3:
        finite = np.isfinite(arr).all(axis=0)
        if kind is FixedFeature.TIC:
            image, name = np.where(finite, np.nansum(arr, axis=0), np.nan), "tic"
        elif kind is FixedFeature.ION:
            if not 0 <= channel < arr.shape[0]:
                raise InputError(f"MSI channel {channel} out of range (the stack has {arr.shape[0]} channels)")
            image, name = arr[channel], f"ion {channel}"
        elif kind is FixedFeature.PC1:
            image, name = _first_pc(arr, finite), "pc1"
        else:
            raise ValueError(f"not a concrete MSI feature: {kind}")
    else:
        raise InputError(f"MSI must be (rows, cols) or (channels, rows, cols), got shape {arr.shape}")
    mask = np.isfinite(image)
    if mask.sum() < 16:
        raise InputError(f"MSI has only {int(mask.sum())} finite pixels; cannot register")
    data = normalise(image, mask)
    data = np.where(mask, data, 0.0).astype(np.float32)
    return FeatureImage(data, float(fixed_pixel_size_um), (0.0, 0.0), mask, name)


def _first_pc(stack: np.ndarray, finite: np.ndarray) -> np.ndarray:
    values = stack[:, finite].T.astype(np.float64)  # (pixels, channels)
    values -= values.mean(axis=0)
    sd = values.std(axis=0)
    values /= np.where(sd > 0, sd, 1.0)
    _, _, vt = np.linalg.svd(values, full_matrices=False)
    score = values @ vt[0]
    tic = stack[:, finite].sum(axis=0)
    if np.corrcoef(score, tic)[0, 1] < 0:
        score = -score
    out = np.full(stack.shape[1:], np.nan, np.float32)
    out[finite] = score
    return out
