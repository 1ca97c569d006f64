"""The uncertainty map: parts weighted by a calibration one scale up, without a ground truth."""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr

from napari_smsdl.evaluation import degrade
from napari_smsdl.reconstruction import backprojection_upsample
from napari_smsdl.reconstruction._uncertainty import (
    PARTS,
    calibrate,
    histology_variation,
    structure_variance,
    uncertainty_map,
)


def _edges(size: int = 64) -> np.ndarray:
    """A piecewise-constant truth (a disk and a bar on a background): its SR error sits at the edges."""
    rr, cc = np.mgrid[0:size, 0:size]
    disk = (rr - 22.3) ** 2 + (cc - 25.1) ** 2 < 13.7**2
    bar = (rr > 40) & (rr < 51) & (cc > 9) & (cc < 57)
    return (1.0 + 3.0 * disk + 2.0 * bar).astype(np.float32)[None]


def test_the_calibrated_map_ranks_edge_pixels_above_flat_ones():
    truth = _edges()
    factor = 4
    mask_hr = np.ones(truth.shape[1:], bool)
    lr, mask_lr = degrade(truth, mask_hr, factor)
    sr = backprojection_upsample(lr, factor, mask_lr=mask_lr)
    spread = np.full_like(sr, 0.01)  # the same everywhere: it cannot rank anything
    unc, calib = uncertainty_map(sr, spread, lr, mask_lr, factor)
    assert unc.shape == sr.shape and unc.dtype == np.float32 and np.isfinite(unc).all()
    assert calib.weights.shape == (1, len(PARTS)) and (calib.weights >= 0).all()
    assert calib.factors == [2] and calib.pixels == 16 * 16
    assert calib.weights[0, PARTS.index("structure")] > 0  # the task one scale up errs at edges too
    err = np.abs(sr[0] - truth[0])
    rho = spearmanr(unc[0].ravel(), err.ravel())[0]
    assert rho > 0.3, rho  # 0.38; the noise model takes part of the edges for noise (a·intensity), hence not more
    edge = err > 0.5 * err.max()  # where the SR is badly wrong: next to the edges
    flat = err < 0.01  # far from them
    assert edge.sum() > 20 and flat.sum() > 500
    assert np.median(unc[0][edge]) > 1.5 * np.median(unc[0][flat])  # 1.35 vs 0.84
    # the weights carry over between scales: (F · |gradient|)² is the change across one input pixel,
    # the same for a ramp seen on a grid 1 or 3 times finer than its input pixels
    coarse = np.tile(0.7 * np.arange(8.0), (1, 8, 1))
    fine = np.tile(0.7 * np.arange(24.0) / 3, (1, 8, 1))
    np.testing.assert_allclose(structure_variance(coarse, 1)[0, 4, 4], 0.49)
    np.testing.assert_allclose(structure_variance(fine, 3)[0, 4, 12], 0.49)


def test_noise_gets_the_weight_on_a_channel_of_pure_counting_noise_and_structure_on_edges():
    """Two channels fitted together: edges, and Poisson counts with no structure (weights are per channel)."""
    rng = np.random.default_rng(0)
    lr = np.concatenate([degrade(_edges(), np.ones((64, 64), bool), 2)[0],
                         rng.poisson(20.0, size=(1, 32, 32)).astype(np.float32)])
    mask = np.ones((32, 32), bool)
    calib = calibrate(lr, mask)
    w = calib.weights
    noise, structure = PARTS.index("noise"), PARTS.index("structure")
    assert (w >= 0).all()
    # on the noise channel the noise part explains the control's error one scale up, the gradient of
    # interpolated noise does not; on the edge channel the gradient does
    assert w[1, noise] > 0.5 and w[1, structure] == 0.0
    assert w[0, structure] > 0
    np.testing.assert_array_equal(calibrate(lr, mask).weights, w)  # deterministic for a seed


def test_unit_weights_where_the_lr_is_too_small_for_a_task_one_scale_up():
    lr = np.random.default_rng(1).gamma(2.0, 1.0, size=(2, 5, 5)).astype(np.float32)
    calib = calibrate(lr, np.ones((5, 5), bool))  # pooled by 2: 2 x 2, no interior pixel
    assert calib.factors == [] and calib.pixels == 0
    np.testing.assert_array_equal(calib.weights, [[1.0, 1.0, 0.0, 0.0]] * 2)
    assert "too small" in calib.to_dict()["how"]


def test_the_histology_part_is_weighted_only_where_the_features_vary_with_the_ion():
    """Features whose edges are the ion's edges earn the histology part a weight; random features earn none."""
    truth, factor = _edges(), 4
    lr, mask_lr = degrade(truth, np.ones(truth.shape[1:], bool), factor)
    sr = backprojection_upsample(lr, factor, mask_lr=mask_lr)
    spread = np.full_like(sr, 0.01)
    hist = PARTS.index("histology structure")
    _, without = uncertainty_map(sr, spread, lr, mask_lr, factor)
    assert without.weights[0, hist] == 0.0  # no features: the part is left out
    aligned = np.stack([truth[0], -2.0 * truth[0]]).reshape(2, -1)
    _, calib = uncertainty_map(sr, spread, lr, mask_lr, factor, features=aligned)
    assert calib.weights[0, hist] > 0
    noise = np.random.default_rng(0).normal(size=(3, truth.shape[1] * truth.shape[2]))
    unc, calib = uncertainty_map(sr, spread, lr, mask_lr, factor, features=noise)
    assert calib.weights[0, hist] == 0.0
    np.testing.assert_array_equal(calib.weights, without.weights)


def test_histology_variation_is_relative_and_zero_inside_uniform_pixels():
    rng = np.random.default_rng(2)
    blocks = np.repeat(np.repeat(rng.normal(size=(3, 4, 5)), 3, 1), 3, 2)  # constant inside each 3 x 3 pixel
    mask = np.ones((12, 15), bool)
    np.testing.assert_array_equal(histology_variation(blocks, 3, mask), 0.0)
    varied = blocks + rng.normal(size=blocks.shape)
    v = histology_variation(varied, 3, mask)
    np.testing.assert_allclose(v.mean(), 1.0)
    np.testing.assert_allclose(histology_variation(7.0 * varied, 3, mask), v)  # the features' scale does not matter


def test_a_channel_whose_calibrated_map_would_be_flat_gets_the_unit_weights(monkeypatch):
    """All calibrated weight on a noise level that does not grow with the signal: the map would be one value
    over the tissue, ranking nothing; that channel gets the map before calibration (spread ⊕ noise) instead."""
    from napari_smsdl.reconstruction import _uncertainty

    rng = np.random.default_rng(0)
    lr = 5.0 + rng.normal(size=(2, 24, 24))  # white noise of constant variance: a = 0, a flat noise part
    mask = np.ones((24, 24), bool)
    assert _uncertainty.noise_variance_model(lr, mask)[0, 0] == 0  # channel 0: a flat noise part
    sr = backprojection_upsample(lr.astype(np.float32), 2, mask_lr=mask).astype(np.float64)
    spread = 0.1 + 0.05 * rng.random(sr.shape)
    real = calibrate(lr, mask)
    noise_only = real.weights.copy()
    noise_only[0] = [0.0, 1.0, 0.0, 0.0]  # channel 0: as if the task had found only the noise level
    monkeypatch.setattr(_uncertainty, "calibrate",
                        lambda *a, **k: _uncertainty.Calibration(noise_only, real.factors, real.pixels))
    unc, calib = uncertainty_map(sr, spread, lr, mask, 2)
    assert calib.flat == [0] and calib.to_dict()["unit_weights_where_flat"] == [0]
    np.testing.assert_array_equal(calib.weights[0], [1.0, 1.0, 0.0, 0.0])
    np.testing.assert_array_equal(calib.weights[1], noise_only[1])  # the other channel keeps its calibration
    assert np.ptp(unc[0]) > 0 and spearmanr(unc[0].ravel(), spread[0].ravel())[0] > 0.99  # ranks by the spread
