"""The built-in sample: a real histology image with a simulated MSI that is *not* a function of its colour.

The H&E-like image is scikit-image's bundled immunohistochemistry image (512 × 512 RGB, shipped
with the library, no download). Its colour deconvolution (haematoxylin, DAB, residual stroma) gives
tissue compartments. The five ions are built the way real MSI behaves: some follow tissue classes
the stain shows, others follow things no pixel colour reveals, so that a guided method can only win
where the histology really carries the information.

======  ==========  =============================================================================
 chan    m/z         expected abundance (what explains it)
======  ==========  =============================================================================
 0       734.5694    nuclei compartment, its level modulated by a smooth random field (about 200 µm)
                     the colour does not show, plus a weak vertically graded stroma share
 1       760.5851    local *density* of nuclei (fraction of nuclear pixels within about 25 µm):
                     texture and context, not the colour of the pixel
 2       798.5410    stroma, but only in one region of the section (a smooth random zone with a
                     soft border): a class-specific ion present in part of its class only
 3       826.5723    a smooth random field independent of the H&E times a gradient across the
                     section (matrix / ion-suppression like); colour explains only the tissue mask
 4       885.5499    DAB compartment with a mild horizontal gradient: the ion the colour explains best
======  ==========  =============================================================================

Grids: the H&E at 2.5 µm (512 × 512), the ground truth at 10 µm (128 × 128), the MSI at 40 µm
(32 × 32), F = 4; all three cover the same 1280 µm field of view from the same corner.

Noise model (counting statistics, decided for what a benchmark needs). The expected abundance
``λ`` is expressed in ion counts per 40 µm spectrum (20 to about 740 on tissue; tissue means 60 to
230 depending on the ion; a floor keeps every tissue pixel above zero). Counts scale with the sampled
area, so a 10 µm spectrum expects ``λ / 16`` counts (about 1 to 46): 27 to 51 % relative noise per
10 µm pixel, the level of the real 10 µm bladder ion images in ``../shared``, and 9 to 14 % per
40 µm pixel. Each spectrum also has its own ionisation
yield (log-normal, 5 %, shared by all ions of that spectrum), so the noise is Poisson-like:
variance ``≈ μ + 0.0025 μ²``, growing with the mean.

* ``msi.imzML`` (``Sample.msi``) holds integer counts of independent 40 µm spectra,
  ``Poisson(yield · λ_40)``, with ``λ_40`` the block mean of ``λ``; off-tissue pixels are 0 and four
  tissue pixels were never acquired (NaN, no spectrum).
* ``ground_truth.npy`` (``Sample.ground_truth``) is a separate, noisy 10 µm acquisition of the same
  section: ``16 · Poisson(yield · λ / 16)``, i.e. counts on the imzML's scale (per 40 µm spectrum
  equivalent). The benchmark degrades it by block-averaging, and the block mean of 16 such pixels
  has the statistics of a real 40 µm spectrum, so the benchmark's low-resolution input is as noisy as
  the imzML, and the truth it scores against carries real pixel noise, like the real-data
  benchmarks (a perfect method does not reach zero error). The noise-free expectations are kept
  as ``Sample.truth_expected`` and ``Sample.msi_expected`` for tests and analysis; they are not
  written to files.

Everything is deterministic for the fixed seed.
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
    "PC 32:0 (nuclei, smooth hidden field)",
    "PC 34:1 (nuclei density)",
    "PC 34:1+K (stroma, one region only)",
    "PC 36:1+K (random field + gradient, not in the H&E)",
    "PI 38:4 (DAB compartment)",
)
TOLERANCE = "10ppm"
SEED = 20231125
#: Expected counts per 40 µm spectrum of each ion where its pattern is 1, and its floor on tissue.
PEAK_COUNTS = (700.0, 450.0, 800.0, 250.0, 650.0)
FLOOR_COUNTS = (40.0, 30.0, 20.0, 40.0, 30.0)
#: Relative per-spectrum ionisation-yield spread (log-normal sigma), shared by the ions of a spectrum.
YIELD_SIGMA = 0.05


@dataclass(frozen=True)
class Sample:
    """The sample in memory.

    Attributes
    ----------
    he_rgb : (512, 512, 3) uint8
    ground_truth : (5, 128, 128) float32, a noisy 10 µm acquisition on the imzML's count scale, 0 outside tissue
    msi : (5, 32, 32) float32, the measured low-resolution MSI (integer counts), NaN where not acquired
    mask_hr, mask_lr : bool tissue masks of the two grids
    truth_expected, msi_expected : the noise-free expectations of ``ground_truth`` and ``msi``
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
    truth_expected: np.ndarray | None = None
    msi_expected: np.ndarray | None = None


def _smooth(image: np.ndarray, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(image, sigma)


def block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """Block average of the last two axes by an integer factor (shape must divide)."""
    *lead, rows, cols = image.shape
    return image.reshape(*lead, rows // factor, factor, cols // factor, factor).mean(axis=(-3, -1))


def _random_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """A smooth random field in [0, 1] (white noise smoothed by a Gaussian of ``sigma`` pixels).

    Drawn on a 4× coarser grid and interpolated: the same field at a fraction of the cost.
    """
    from scipy.ndimage import zoom

    coarse = _smooth(rng.normal(size=(shape[0] // 4, shape[1] // 4)), sigma / 4)
    field = zoom(coarse, 4, order=1, grid_mode=True, mode="nearest")
    lo, hi = np.percentile(field, [2, 98])
    return np.clip((field - lo) / (hi - lo), 0, 1)


def _patterns(he: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The five ions' patterns in [0, 1] on the H&E grid, and the tissue mask there."""
    from skimage.color import rgb2hed

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
    shape = he.shape[:2]
    hidden = _random_field(rng, shape, 80.0)  # ~200 µm: a level the stain does not show
    density = norm(_smooth((nuclei > 0.5).astype(float), 10.0))  # nuclear fraction within ~25 µm
    zone = 1.0 / (1.0 + np.exp(-(_random_field(rng, shape, 100.0) - 0.5) / 0.04))  # soft region
    free = _random_field(rng, shape, 40.0)  # independent of the H&E
    patterns = np.stack(
        [
            nuclei * (0.25 + 0.75 * hidden) + 0.25 * (1 - rows) * stroma,
            density,
            stroma * zone,
            free * (0.3 + 0.7 * (0.6 * cols + 0.4 * rows)),
            stain * (0.7 + 0.3 * cols),
        ]
    )
    return np.clip(patterns, 0, None), tissue


def make_sample() -> Sample:
    """Build the sample deterministically (well under a second)."""
    from skimage import data

    he = data.immunohistochemistry()  # (512, 512, 3) uint8
    rng = np.random.default_rng(SEED)
    patterns, tissue = _patterns(he, rng)
    per_cell = 512 // (32 * FACTOR)
    mask_hr = block_mean(tissue.astype(float), per_cell) > 0.5
    peak = np.asarray(PEAK_COUNTS)[:, None, None]
    floor = np.asarray(FLOOR_COUNTS)[:, None, None]
    # expected counts per 40 µm spectrum, on the 10 µm grid; 0 off tissue
    expected = ((block_mean(patterns, per_cell) * peak + floor) * mask_hr).astype(np.float32)
    mask_lr = block_mean(mask_hr.astype(float), FACTOR) > 0.5
    expected_lr = (block_mean(expected, FACTOR) * mask_lr).astype(np.float32)
    area = FACTOR * FACTOR  # a 40 µm spectrum samples the area of 16 spectra of 10 µm

    def counts(lam, size):
        ionisation = rng.lognormal(-0.5 * YIELD_SIGMA**2, YIELD_SIGMA, size=size)  # per spectrum
        return rng.poisson(lam * ionisation).astype(np.float32)

    truth = area * counts(expected / area, expected.shape[1:])
    truth *= mask_hr
    msi = counts(expected_lr, expected_lr.shape[1:])
    msi[:, ~mask_lr] = 0.0
    missing = _missing_pixels(mask_lr, rng)
    msi[:, missing[:, 0], missing[:, 1]] = np.nan
    return Sample(
        he, truth.astype(np.float32), msi.astype(np.float32), mask_hr, mask_lr & np.isfinite(msi[0]),
        truth_expected=expected, msi_expected=expected_lr,
    )


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
        "noise": "msi.imzML: integer ion counts per 40 um spectrum, Poisson with a 5 % per-spectrum ionisation "
                 "yield; ground_truth.npy: an independent 10 um acquisition, 16 x Poisson counts (same scale, "
                 "16x fewer counts per pixel); see napari_smsdl.sample",
    }
    tmp = outdir / ".sample.json.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, outdir / "sample.json")
    return info
