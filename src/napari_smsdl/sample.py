"""The built-in sample: a real histology image with a simulated MSI that follows its structure.

The H&E-like image is scikit-image's bundled immunohistochemistry image (512 × 512 RGB, shipped
with the library, no download). Its colour deconvolution (haematoxylin, DAB, residual stroma) gives
tissue compartments; five ion channels are tied to different compartments, with smooth gradients.
The ground truth lives on the super-resolution grid (128 × 128, 10 µm); the MSI is its block
average by F = 4 (32 × 32, 40 µm) with Poisson-like counting noise, a few pixels never acquired,
written as a real *processed* imzML with a jittered m/z per peak and random noise peaks.
Everything is deterministic (fixed seed).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Physical layout of the sample.
HE_PIXEL_SIZE_UM = 2.5
MSI_PIXEL_SIZE_UM = 40.0
FACTOR = 4
SAMPLE_MZ = (734.5694, 760.5851, 798.5410, 826.5723, 885.5499)
SAMPLE_NAMES = (
    "PC 32:0 (nuclei + vertical gradient)",
    "PC 34:1 (nuclei)",
    "PC 34:1+K (stroma)",
    "PC 36:1+K (horizontal gradient)",
    "PI 38:4 (DAB compartment)",
)
TOLERANCE = "10ppm"
SEED = 20231125


@dataclass(frozen=True)
class Sample:
    """The sample in memory.

    Attributes
    ----------
    he_rgb : (512, 512, 3) uint8
    ground_truth : (5, 128, 128) float32, 0 outside tissue
    msi : (5, 32, 32) float32, the measured low-resolution MSI, NaN where not acquired
    mask_hr, mask_lr : bool tissue masks of the two grids
    """

    he_rgb: np.ndarray
    ground_truth: np.ndarray
    msi: np.ndarray
    mask_hr: np.ndarray
    mask_lr: np.ndarray
    mz: tuple[float, ...] = SAMPLE_MZ
    channel_names: tuple[str, ...] = SAMPLE_NAMES
    he_pixel_size_um: float = HE_PIXEL_SIZE_UM
    msi_pixel_size_um: float = MSI_PIXEL_SIZE_UM
    factor: int = FACTOR


def _smooth(image: np.ndarray, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(image, sigma)


def block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """Block average of the last two axes by an integer factor (shape must divide)."""
    *lead, rows, cols = image.shape
    return image.reshape(*lead, rows // factor, factor, cols // factor, factor).mean(axis=(-3, -1))


def make_sample() -> Sample:
    """Build the sample deterministically (about 0.2 s)."""
    from skimage import data
    from skimage.color import rgb2hed

    he = data.immunohistochemistry()  # (512, 512, 3) uint8
    hed = rgb2hed(he)
    hema = np.clip(hed[..., 0], 0, None)
    dab = np.clip(hed[..., 2], 0, None)
    grey = he.mean(axis=-1) / 255.0
    tissue = _smooth((grey < 0.86).astype(float), 4) > 0.5

    def norm(x):
        lo, hi = np.percentile(x[tissue], [1, 99])
        return np.clip((x - lo) / (hi - lo + 1e-12), 0, 1)

    nuclei = norm(_smooth(hema, 1.5))
    stain = norm(_smooth(dab, 1.5))
    stroma = np.clip(1.0 - nuclei - stain, 0, 1) * norm(_smooth(1.0 - grey, 1.5))
    rows, cols = np.mgrid[0:512, 0:512] / 511.0
    grad_h = 0.2 + 0.8 * cols
    grad_v = 0.3 + 0.7 * (1 - rows)
    channels = np.stack(
        [
            0.6 * nuclei + 0.4 * grad_v * stroma,
            nuclei,
            stroma,
            grad_h * (0.5 + 0.5 * _smooth(stroma + stain, 4)),
            stain,
        ]
    )
    scale = np.array([1500.0, 3000.0, 2000.0, 1200.0, 2500.0])[:, None, None]
    channels = (channels * scale + 0.05 * scale) * tissue  # a floor so tissue is never exactly 0
    per_cell = 512 // (32 * FACTOR)
    truth = block_mean(channels, per_cell).astype(np.float32)  # (5, 128, 128)
    mask_hr = block_mean(tissue.astype(float), per_cell) > 0.5
    truth *= mask_hr
    msi_clean = block_mean(truth, FACTOR)
    mask_lr = block_mean(mask_hr.astype(float), FACTOR) > 0.5
    rng = np.random.default_rng(SEED)
    gain = 0.2  # counts per intensity unit: Poisson noise of a few percent
    msi = rng.poisson(np.clip(msi_clean, 0, None) * gain).astype(np.float32) / gain
    msi *= rng.normal(1.0, 0.03, size=msi.shape[1:]).astype(np.float32)  # per-pixel ionisation yield
    msi[:, ~mask_lr] = 0.0
    missing = _missing_pixels(mask_lr, rng)
    msi[:, missing[:, 0], missing[:, 1]] = np.nan
    return Sample(he, truth, msi.astype(np.float32), mask_hr, mask_lr & np.isfinite(msi[0]))


def _missing_pixels(mask_lr: np.ndarray, rng: np.random.Generator, n: int = 4) -> np.ndarray:
    inside = np.argwhere(mask_lr)
    return inside[rng.choice(len(inside), size=n, replace=False)]


def _spectra(sample: Sample, rng: np.random.Generator):
    """Processed spectra: one jittered peak per channel plus random low noise peaks."""
    mz = np.asarray(sample.mz)
    msi = sample.msi
    for row in range(msi.shape[1]):
        for col in range(msi.shape[2]):
            values = msi[:, row, col]
            if np.isnan(values).any():
                continue  # never acquired: no spectrum at all
            peaks = mz * (1 + rng.normal(0, 1.5e-6, len(mz)))  # ~1.5 ppm mass error
            noise_mz = rng.uniform(700, 900, 30)
            far = np.min(np.abs(noise_mz[:, None] - mz[None]) / mz[None], axis=1) > 50e-6
            noise_mz = noise_mz[far]
            noise_int = rng.exponential(15.0, len(noise_mz))
            all_mz = np.concatenate([peaks, noise_mz])
            all_int = np.concatenate([values, noise_int])
            order = np.argsort(all_mz)
            yield row, col, all_mz[order], all_int[order].astype(np.float32)


def write_sample(outdir: str | os.PathLike) -> dict:
    """Write the sample as files and return its description (also written as ``sample.json``).

    Files: ``he.png``, ``msi.imzML`` + ``msi.ibd`` (processed, low resolution), ``ground_truth.npy``
    (channels, rows, cols) on the high-resolution grid, ``sample.json``.
    """
    from skimage import io as skio

    from .io import write_imzml

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    sample = make_sample()
    skio.imsave(outdir / "he.png", sample.he_rgb, check_contrast=False)
    rng = np.random.default_rng(SEED + 1)
    write_imzml(outdir / "msi.imzML", _spectra(sample, rng), mode="processed", pixel_size_um=sample.msi_pixel_size_um)
    np.save(outdir / "ground_truth.npy", sample.ground_truth)
    info = {
        "he_file": "he.png",
        "msi_file": "msi.imzML",
        "ground_truth_file": "ground_truth.npy",
        "he_pixel_size_um": sample.he_pixel_size_um,
        "msi_pixel_size_um": sample.msi_pixel_size_um,
        "ground_truth_pixel_size_um": sample.msi_pixel_size_um / sample.factor,
        "factor": sample.factor,
        "mz": list(sample.mz),
        "channel_names": list(sample.channel_names),
        "tolerance": TOLERANCE,
        "msi_shape": list(sample.msi.shape[1:]),
        "ground_truth_shape": list(sample.ground_truth.shape),
        "registration": "the H&E covers exactly the MSI field of view (same field of view start)",
    }
    tmp = outdir / ".sample.json.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, outdir / "sample.json")
    return info
