"""The built-in sample: deterministic, honest (not a function of colour), noisy like real counts, a real imzML."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_smsdl.io import open_imzml
from napari_smsdl.sample import YIELD_SIGMA, block_mean, make_sample


@pytest.fixture(scope="module")
def sample():
    return make_sample()


def _colour_r2(sample, channel: np.ndarray, k: int = 20) -> float:
    """R² of the best pixel-wise function of the H&E colour: leave-one-out kNN regression on RGB.

    Each truth pixel (10 µm) sees the mean RGB of its 4 × 4 H&E pixels; the prediction is the mean
    of the channel over the k tissue pixels of nearest colour (the pixel itself left out).
    """
    from scipy.spatial import cKDTree

    mask = sample.mask_hr
    rgb = block_mean(np.moveaxis(sample.he_rgb.astype(float), -1, 0), 4)[:, mask].T / 255.0
    _, idx = cKDTree(rgb).query(rgb, k=k + 1)
    y = channel[mask].astype(float)
    pred = y[idx[:, 1:]].mean(axis=1)
    return 1.0 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum()


def test_sample_is_deterministic_and_consistent(sample):
    b = make_sample()
    np.testing.assert_array_equal(sample.msi, b.msi)
    np.testing.assert_array_equal(sample.ground_truth, b.ground_truth)
    np.testing.assert_array_equal(sample.truth_expected, b.truth_expected)
    assert sample.ground_truth.shape == (5, 128, 128) and sample.msi.shape == (5, 32, 32)
    assert sample.ground_truth.dtype == sample.msi.dtype == np.float32
    assert np.isnan(sample.msi[0]).sum() == 4  # a few pixels never acquired
    # the tissue mask is what the benchmark reads from the truth: nonzero in some channel
    np.testing.assert_array_equal(sample.mask_hr, (sample.ground_truth != 0).any(0))
    assert (sample.ground_truth[:, ~sample.mask_hr] == 0).all()
    # the MSI is an independent acquisition of the same section: close to the truth's block mean
    # up to the counting noise of both
    clean = block_mean(sample.ground_truth, 4)
    tissue = sample.mask_lr
    rel = np.abs(sample.msi[:, tissue] - clean[:, tissue]) / clean[:, tissue].mean(axis=1, keepdims=True)
    assert 0.01 < np.median(rel) < 0.3
    assert not np.allclose(sample.msi[:, tissue], clean[:, tissue])  # not the same noise realisation


def test_channels_follow_different_compartments(sample):
    flat = sample.truth_expected[:, sample.mask_hr]
    corr = np.corrcoef(flat)
    assert corr[1, 4] < 0.5 and corr[2, 4] < 0.5 and corr[3, 4] < 0.5


def test_truth_is_not_a_pixelwise_function_of_colour(sample):
    """An ion the colour does not explain (and one it does, so the check can tell them apart)."""
    for truth in (sample.truth_expected, sample.ground_truth):  # noise-free, and as written
        assert _colour_r2(sample, truth[3]) < 0.5  # random field x gradient, independent of the H&E
        assert _colour_r2(sample, truth[2]) < 0.6  # stroma in one region only
    assert _colour_r2(sample, sample.truth_expected[4]) > 0.8  # the DAB ion follows the stain


def test_counting_noise_is_poisson_like(sample, sample_dir):
    """On the imzML's intensities: integer counts whose variance grows with the mean (Poisson + yield)."""
    info = json.loads((sample_dir / "sample.json").read_text())
    ion = open_imzml(sample_dir / "msi.imzML").ion_images(info["mz"], info["tolerance"]).data
    tissue = sample.mask_lr
    counts, mean = ion[:, tissue].ravel(), sample.msi_expected[:, tissue].ravel()
    assert np.isfinite(counts).all() and np.array_equal(counts, np.round(counts))
    edges = np.quantile(mean, np.linspace(0, 1, 7))
    bins = np.clip(np.searchsorted(edges, mean, side="right") - 1, 0, 5)
    mu = np.array([mean[bins == b].mean() for b in range(6)])
    var = np.array([(counts - mean)[bins == b].var() for b in range(6)])
    assert np.all(np.diff(mu) > 0) and np.all(np.diff(var) > 0)  # variance grows with the mean
    ratio = var / (mu + YIELD_SIGMA**2 * mu**2)
    assert np.all((ratio > 0.7) & (ratio < 1.4)), ratio
    # the 10 µm truth: 16 x counts of a spectrum with 1/16 of the expected counts (much noisier per pixel)
    m = sample.mask_hr
    resid = (sample.ground_truth - sample.truth_expected)[:, m]
    per_pixel = resid.var() / (16 * sample.truth_expected[:, m]).mean()
    assert 0.8 < per_pixel < 1.3
    rel = np.abs(resid).mean(1) / sample.truth_expected[:, m].mean(1)
    assert np.all((rel > 0.1) & (rel < 0.6))  # 10-60 % per pixel, like real 10 µm ion images


def test_written_sample_files(sample_dir, sample):
    info = json.loads((sample_dir / "sample.json").read_text())
    assert info["factor"] == 4 and len(info["mz"]) == 5
    assert (sample_dir / "he.png").exists()
    ds = open_imzml(sample_dir / "msi.imzML")
    assert ds.mode == "processed" and ds.shape == (32, 32) and ds.pixel_size_um == 40.0
    ion = ds.ion_images(info["mz"], info["tolerance"]).data
    np.testing.assert_allclose(ion, sample.msi, rtol=1e-5, equal_nan=True)
    truth = np.load(sample_dir / "ground_truth.npy")
    assert truth.shape == (5, 128, 128)
    np.testing.assert_array_equal(truth, sample.ground_truth)
