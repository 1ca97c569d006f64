"""Metrics against values computed by hand on small arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from napari_smsdl.errors import InputError
from napari_smsdl.evaluation import METRICS, normalise_pair, score_channel, score_stack

# truth 0..8 on a 3×3 grid, prediction = truth + 1 everywhere. Normalised by the truth's range
# (0, 8): the error is 1/8 on every pixel.
T = np.arange(9, dtype=float).reshape(3, 3)
P = T + 1.0
FULL = np.ones((3, 3), dtype=bool)


def test_hand_computed_offset_case():
    s = score_channel(T, P, FULL)
    assert s["rmse"] == pytest.approx(1 / 8)
    assert s["psnr"] == pytest.approx(20 * math.log10(8))  # 18.0618 dB
    # SS_res = 9·(1/8)² = 9/64; SS_tot = Σ(k − 4)²/64 = 60/64 → R² = 1 − 9/60 = 0.85
    assert s["r2"] == pytest.approx(0.85)
    assert s["pearson"] == pytest.approx(1.0)
    # SSIM with a 3×3 window: one interior pixel whose window is the whole image.
    # μx = 0.5, μy = 0.625, σx² = σy² = σxy = 7.5/64 (sample variance, N − 1 = 8),
    # C1 = 0.01², C2 = 0.03² → (2μxμy + C1)/(μx² + μy² + C1) (the σ terms cancel)
    expected = (2 * 0.5 * 0.625 + 1e-4) / (0.25 + 0.390625 + 1e-4)
    assert s["ssim"] == pytest.approx(expected, rel=1e-9)
    assert s["ssim"] == pytest.approx(0.975614, abs=1e-6)


def test_perfect_prediction():
    s = score_channel(T * 3 + 5, T * 3 + 5, FULL)
    assert s["rmse"] == 0.0
    assert s["psnr"] == math.inf
    assert s["r2"] == pytest.approx(1.0)
    assert s["pearson"] == pytest.approx(1.0)
    assert s["ssim"] == pytest.approx(1.0)


def test_hand_computed_r2_and_pearson_non_trivial():
    t = np.array([[0.0, 2.0, 4.0], [6.0, 8.0, 0.0], [0.0, 0.0, 0.0]])
    p = np.array([[1.0, 2.0, 3.0], [7.0, 7.0, 5.0], [0.0, 0.0, 0.0]])
    m = np.zeros((3, 3), bool)
    m[0, :] = True
    m[1, :2] = True  # tissue values t = 0,2,4,6,8 ; p = 1,2,3,7,7 ; range 0..8
    s = score_channel(t, p, m)
    err = np.array([1, 0, -1, 1, -1]) / 8
    assert s["rmse"] == pytest.approx(math.sqrt(np.mean(err**2)))  # sqrt(4/5)/8
    assert s["rmse"] == pytest.approx(math.sqrt(0.8) / 8)
    # SS_res = 4/64; SS_tot = (16+4+0+4+16)/64 = 40/64 → R² = 0.9
    assert s["r2"] == pytest.approx(0.9)
    # Pearson: t − 4 = (−4,−2,0,2,4); p − 4 = (−3,−2,−1,3,3); Σ = 12+4+0+6+12 = 34;
    # Σt² = 40, Σp² = 9+4+1+9+9 = 32 → r = 34 / sqrt(1280)
    assert s["pearson"] == pytest.approx(34 / math.sqrt(40 * 32))


def test_normalisation_uses_truth_tissue_range_and_ignores_background():
    t = np.array([[np.nan, 10.0, 20.0], [30.0, 40.0, 50.0], [60.0, 70.0, 1e6]])
    m = np.isfinite(t) & (t < 1e5)
    t_n, p_n = normalise_pair(t, t * 2, m)
    assert t_n[m].min() == pytest.approx(0.0) and t_n[m].max() == pytest.approx(1.0)
    # prediction = 2 × truth is not clipped: 140 → (140 − 10)/60
    assert p_n[2, 1] == pytest.approx(130 / 60)
    assert t_n[0, 0] == 0.0 and p_n[2, 2] == 0.0  # background set to 0 in both
    # the huge value outside the mask changes nothing
    s1 = score_channel(t, t + 6.0, m)
    t2 = t.copy()
    t2[2, 2] = -5.0
    s2 = score_channel(t2, t2 + 6.0, m)
    assert s1 == pytest.approx(s2)
    assert s1["rmse"] == pytest.approx(0.1)


def test_ssim_full_mask_equals_skimage_and_mask_ignores_background():
    rng = np.random.default_rng(0)
    t = rng.random((12, 10))
    p = t + 0.4 * rng.standard_normal((12, 10))
    s = score_channel(t, p, np.ones_like(t, bool))
    t_n, p_n = normalise_pair(t, p, np.ones_like(t, bool))
    assert s["ssim"] == pytest.approx(structural_similarity(t_n, p_n, data_range=1.0))
    # Adding a background region where both are equal (0) must not raise the tissue SSIM above
    # what the tissue alone gives by more than the edge windows allow; with a perfect-background
    # whole-image SSIM it would rise a lot.
    big_t = np.zeros((24, 20))
    big_p = np.zeros((24, 20))
    big_t[:12, :10] = t
    big_p[:12, :10] = p
    mask = np.zeros((24, 20), bool)
    mask[:12, :10] = True
    s_masked = score_channel(big_t, big_p, mask)["ssim"]
    bt_n, bp_n = normalise_pair(big_t, big_p, mask)
    whole = structural_similarity(bt_n, bp_n, data_range=1.0)
    assert whole > s_masked + 0.15


def test_score_stack_structure_and_mean():
    truth = np.stack([T, 2 * T])
    pred = np.stack([P, 2 * T])  # channel 1 perfect
    out = score_stack(truth, pred, FULL)
    assert set(out) == set(METRICS)
    for k in METRICS:
        assert set(out[k]) == {"mean", "per_channel"}
        assert len(out[k]["per_channel"]) == 2
        assert all(isinstance(v, float) for v in out[k]["per_channel"])
    assert out["rmse"]["per_channel"] == pytest.approx([0.125, 0.0])
    assert out["rmse"]["mean"] == pytest.approx(0.0625)
    assert out["r2"]["mean"] == pytest.approx((0.85 + 1.0) / 2)


def test_constant_truth_gives_nan_r2_ignored_in_mean():
    truth = np.stack([np.full((3, 3), 4.0), T])
    pred = np.stack([np.full((3, 3), 5.0), T])
    out = score_stack(truth, pred, FULL)
    assert math.isnan(out["r2"]["per_channel"][0])
    assert out["r2"]["mean"] == pytest.approx(1.0)  # only the finite channel
    assert out["rmse"]["per_channel"][0] == pytest.approx(1.0)  # scale 1: offset removed only


def test_errors():
    with pytest.raises(InputError):
        score_stack(np.zeros((2, 3, 3)), np.zeros((1, 3, 3)), FULL)
    with pytest.raises(InputError):
        score_stack(np.zeros((1, 3, 3)), np.zeros((1, 3, 3)), np.zeros((3, 3), bool))
    with pytest.raises(InputError):
        score_stack(np.zeros((1, 3, 3)), np.zeros((1, 3, 3)), np.ones((2, 2), bool))
    bad = np.zeros((1, 3, 3))
    bad[0, 1, 1] = np.nan
    with pytest.raises(InputError, match="prediction"):
        score_stack(np.zeros((1, 3, 3)), bad, FULL)


def test_uncertainty_rank_correlation_scores_a_constant_map_as_ranking_nothing():
    """A flat uncertainty map ranks no error: 0, counted in the mean (not left out); NaN only without errors."""
    from napari_smsdl.evaluation._benchmark import uncertainty_rank_correlation

    rng = np.random.default_rng(0)
    truth = rng.random((2, 8, 8))
    pred = truth + rng.normal(scale=0.1, size=truth.shape)
    mask = np.ones((8, 8), bool)
    ranked = np.abs(pred - truth)  # the error itself: a perfect ranking
    unc = np.stack([ranked[0], np.full((8, 8), 0.3)])
    out = uncertainty_rank_correlation(unc, pred, truth, mask)
    assert out["per_channel"][0] == pytest.approx(1.0) and out["per_channel"][1] == 0.0
    assert out["mean"] == pytest.approx(0.5)
    exact = uncertainty_rank_correlation(unc, truth, truth, mask)  # no error anywhere: nothing to rank
    assert np.isnan(exact["per_channel"]).all() and np.isnan(exact["mean"])
