"""The H&E-free control, the held-out folds and the per-channel fallback (no ground truth used)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from napari_smsdl.errors import InputError
from napari_smsdl.reconstruction import (
    RegressionParams,
    backprojection_upsample,
    block_mean,
    blocked_folds,
    conserve,
    train_regression,
)


def test_backprojection_reproduces_the_block_means():
    rng = np.random.default_rng(0)
    lr = rng.gamma(2.0, 1.0, size=(3, 12, 17)).astype(np.float32)
    mask = np.ones((12, 17), bool)
    mask[:2, :3] = False  # off tissue: not conserved, may be anything finite
    lr[:, ~mask] = np.nan
    sr = backprojection_upsample(lr, 4, mask_lr=mask)
    assert sr.shape == (3, 48, 68) and (sr >= 0).all()
    np.testing.assert_allclose(block_mean(sr, 4)[:, mask], lr[:, mask], rtol=1e-4, atol=1e-6)
    smooth = conserve(sr * 0 + 1.0, lr, 4, mask, "smooth")  # a few iterations: closer, not exact
    before = np.abs(1.0 - lr[:, mask]).mean()
    assert np.abs(block_mean(smooth, 4)[:, mask] - lr[:, mask]).mean() < 0.5 * before
    np.testing.assert_array_equal(conserve(sr, lr, 4, mask, "none"), sr)
    with pytest.raises(ValueError):
        conserve(sr, lr, 4, mask, "exactly")


def test_held_out_folds_are_blocked_deterministic_and_cover_the_tissue():
    mask = np.zeros((30, 40), bool)
    mask[3:27, 2:38] = True
    a = blocked_folds(mask, 5, seed=3)
    np.testing.assert_array_equal(a, blocked_folds(mask, 5, seed=3))  # same seed, same folds
    assert not np.array_equal(a, blocked_folds(mask, 5, seed=4))
    assert set(np.unique(a[mask])) == set(range(5)) and (a[~mask] == -1).all()
    # tiles of 3 × 3 LR pixels: every aligned tile lies in one fold
    tiles = a[3:27, 3:36].reshape(8, 3, 11, 3).transpose(0, 2, 1, 3).reshape(88, 9)
    assert (tiles == tiles[:, :1]).all()
    counts = np.bincount(a[mask])
    assert counts.min() > 0.5 * counts.max()  # the folds are of similar size
    with pytest.raises(InputError, match="tissue pixels"):
        blocked_folds(np.eye(3, dtype=bool), 5)


def test_fallback_triggers_on_noise_and_not_on_a_channel_the_features_explain():
    """A channel that is a function of the features gains from them; pure noise does not."""
    rng = np.random.default_rng(0)
    factor, rows, cols = 4, 24, 24
    fields = np.stack([gaussian_filter(rng.normal(size=(rows * factor, cols * factor)), 1.5) for _ in range(6)])
    fields /= fields.std(axis=(1, 2), keepdims=True)
    explained = np.log1p(np.exp(2.0 * fields[0] + fields[1]))
    lr_explained = block_mean(explained, factor)
    lr_noise = rng.gamma(4.0, 0.25, size=(rows, cols))
    lr = np.stack([lr_explained, lr_noise]).astype(np.float32)
    params = RegressionParams(hidden=32, steps=300, patience=100, folds=5, pca_dims=6, seed=0)
    result = train_regression(fields.astype(np.float32), lr, factor, mask_lr=np.ones((rows, cols), bool), params=params)
    g = result.guidance
    assert g.used_histology == [True, False], g.to_dict()
    assert g.gain[0] > 0.2 and g.gain[1] < g.gain[0]
    # the scale-transfer check runs pooled by 2, not by F = 4 (12 x 12 LLR pixels, 16 tiles: 5 folds), and decides
    check = result.choices["scale_transfer"]
    assert check["available"] and check["pooling"] == 2 and check["folds"] == 5
    assert check["clearly_positive"] == [True, False]
    assert g.held_out_veto == [False, False]  # the held-out gain does not contradict the check
    assert result.choices["conservation"]["how"] == check["conservation"]["how"]
    assert result.guidance.fell_back == [1]
    np.testing.assert_array_equal(result.sr[1], result.control[1])  # the fallback is the control itself
    np.testing.assert_array_equal(result.sr[0], result.guided[0])
    forced = train_regression(fields.astype(np.float32), lr, factor, mask_lr=np.ones((rows, cols), bool),
                              params=RegressionParams(hidden=32, steps=300, patience=100, folds=5, pca_dims=6,
                                                      fallback=False))
    assert forced.guidance.used_histology == [True, True]
    np.testing.assert_array_equal(forced.sr, forced.guided)


def test_a_channel_never_detected_stays_zero_even_when_the_histology_is_forced():
    """An all-zero ion has nothing for the H&E to explain: it is the control (zero), used nowhere, gain 0."""
    fields, lr = _explained_and_noise(2, 12, 12)
    lr = np.stack([lr[0], np.zeros_like(lr[0])])
    for fallback in (True, False):
        params = RegressionParams(hidden=16, steps=100, patience=50, folds=3, pca_dims=4, seed=0, fallback=fallback)
        result = train_regression(fields, lr, 2, mask_lr=np.ones((12, 12), bool), params=params)
        g = result.guidance
        assert g.used_histology[1] is False and g.gain[1] == 0.0 and g.weight[1] == 0.0, g.to_dict()
        assert not np.any(result.sr[1]) and result.choices["constant_channels"] == 1
        # 6 x 6 LLR pixels pooled by 2, too few tiles for blocked folds: held-out pixels choose the conservation
        # (exact or none only) and the input; the check runs on single-pixel folds for the per-channel decision
        check = result.choices["scale_transfer"]
        assert check["available"] and check["per_pixel_folds"] and check["conservation"]["how"] == "given"
        assert "exact or none" in result.choices["conservation"]["how"]
        assert result.choices["network_input"]["how"].startswith("held-out error")
        assert g.to_dict()["decided_by"] == ("scale_transfer_per_pixel" if fallback else "forced")
        assert result.sr[0].std() > 0  # the detected ion is reconstructed as before


def test_a_small_image_is_decided_on_single_pixel_folds_and_a_tiny_one_by_the_held_out_gain():
    """LR 12 x 12 at F = 2 (LLR 6 x 6: 4 tiles, too few to block): the check on single-pixel folds uses the
    explained channel and drops the noise; LR 4 x 4 (LLR 2 x 2) is too small for any check."""
    fields, lr = _explained_and_noise(2, 12, 12)
    params = RegressionParams(hidden=16, steps=100, patience=50, folds=3, pca_dims=4, seed=0)
    result = train_regression(fields, lr, 2, mask_lr=np.ones((12, 12), bool), params=params)
    g = result.guidance.to_dict()
    assert g["decided_by"] == "scale_transfer_per_pixel" and g["used_histology"] == [True, False], g
    assert g["scale_gain"][0] > 0.1 and g["weight"][1] == 0.0
    assert "per-pixel folds" in result.choices["scale_transfer"]["how"]
    tiny = train_regression(fields[:, :8, :8], lr[:, :4, :4], 2, mask_lr=np.ones((4, 4), bool), params=params)
    assert not tiny.choices["scale_transfer"]["available"] and tiny.guidance.to_dict()["decided_by"] == "held_out"


def _explained_and_noise(factor: int, rows: int, cols: int, seed: int = 0):
    """Smooth feature fields on the SR grid, an LR channel they explain and one of pure noise."""
    rng = np.random.default_rng(seed)
    fields = np.stack([gaussian_filter(rng.normal(size=(rows * factor, cols * factor)), 1.5) for _ in range(6)])
    fields /= fields.std(axis=(1, 2), keepdims=True)
    explained = block_mean(np.log1p(np.exp(2.0 * fields[0] + fields[1])), factor)
    noise = rng.gamma(4.0, 0.25, size=(rows, cols))
    return fields.astype(np.float32), np.stack([explained, noise]).astype(np.float32)


def test_scale_transfer_pools_once_more_and_says_when_the_image_is_too_small():
    from napari_smsdl.reconstruction._scale_check import pool_inputs, scale_check_size

    fields, lr = _explained_and_noise(2, 12, 13)
    mask = np.ones((12, 13), bool)
    mask[0, 0] = False  # one LR pixel off tissue: its LLR pixel is the mean of the other three
    inputs = pool_inputs(fields.reshape(6, -1), lr, mask, 2)
    assert inputs.llr.shape == (2, 6, 6) and inputs.lr.shape == (2, 12, 12)  # cropped to a multiple of F
    np.testing.assert_allclose(inputs.llr[:, 1:, 1:], block_mean(lr[:, :12, :12], 2)[:, 1:, 1:], rtol=1e-6)
    np.testing.assert_allclose(inputs.llr[:, 0, 0], lr[:, [0, 1, 1], [1, 0, 1]].mean(1), rtol=1e-6)
    assert not inputs.score_lr[0, 0] and inputs.score_lr.sum() == 143
    assert inputs.features.shape == (6, 144) and abs(inputs.features[0].std() - 1) < 1e-3
    ok, why = scale_check_size(mask, 2, folds=5)  # 6 x 6 LLR pixels: 4 tiles of 3 x 3, 10 needed
    assert not ok and "held-out gain decides alone" in why
    assert scale_check_size(np.ones((30, 30), bool), 2, folds=5)[0]  # 15 x 15: 25 tiles


def test_scale_check_runs_with_fewer_folds_on_a_small_image_and_asks_more_of_them():
    from scipy.stats import t

    from napari_smsdl.reconstruction._scale_check import scale_check_folds, standard_errors

    n, why = scale_check_folds(np.ones((32, 32), bool), 4, folds=5)  # 8 x 8 LLR pixels: 9 tiles of 3 x 3
    assert n == 4 and "4 folds instead of 5" in why
    assert scale_check_folds(np.ones((62, 122), bool), 2, folds=5)[0] == 5
    n, why = scale_check_folds(np.ones((15, 25), bool), 4, folds=5)  # 3 x 6 LLR pixels: 2 tiles
    assert n == 0 and "held-out gain decides alone" in why
    assert standard_errors(5, 5, 2.0) == 2.0
    for n in (3, 4):  # fewer folds, a higher bar with the same one-sided confidence
        k = standard_errors(n, 5, 2.0)
        assert k > 2.0 and abs(t.cdf(k, df=n - 1) - t.cdf(2.0, df=4)) < 1e-9
    assert standard_errors(3, 5, 2.0) > standard_errors(4, 5, 2.0)


def test_blend_weight_is_the_least_squares_share_of_the_detail():
    """Measured = control + 0.5 · detail, per fold: w = 0.5; a detail orthogonal to the truth gets w = 0."""
    from napari_smsdl.reconstruction._scale_check import ScaleInputs, blend_weight

    rng = np.random.default_rng(0)
    control = rng.normal(size=(2, 12, 12))
    detail = rng.normal(size=(2, 12, 12))
    measured = control.copy()
    measured[0] += 0.5 * detail[0]
    folds_llr = np.arange(36).reshape(6, 6) % 3
    inputs = ScaleInputs(np.zeros((1, 144), np.float32), np.zeros((2, 6, 6), np.float32), np.ones((6, 6), bool),
                         measured, np.ones((12, 12), bool))
    w, w_std, per_fold = blend_weight(control + detail, control, inputs, folds_llr, 2)
    assert per_fold.shape == (3, 2)
    np.testing.assert_allclose(w[0], 0.5, atol=1e-12)
    assert w_std[0] < 1e-12 and w[1] == 0.0  # channel 1: the measurement is the control, the detail adds nothing


def test_scale_transfer_gain_is_deterministic_and_separates_explained_from_noise():
    """LR 30 x 30, F = 2: the LLR → LR fit sees within-pixel detail the features explain, not noise."""
    fields, lr = _explained_and_noise(2, 30, 30)
    params = RegressionParams(hidden=32, steps=300, patience=100, folds=5, pca_dims=6, seed=0)
    mask = np.ones((30, 30), bool)
    a = train_regression(fields, lr, 2, mask_lr=mask, params=params)
    b = train_regression(fields, lr, 2, mask_lr=mask, params=params)
    ga, gb = a.guidance.to_dict(), b.guidance.to_dict()
    assert ga == gb  # same seed, same gains and decisions
    for key in ("network_input", "conservation", "pca_dims", "steps"):
        assert a.choices[key] == b.choices[key], key
    assert a.choices["scale_transfer"]["available"]
    # the network input is chosen one scale up: both inputs fitted LLR -> LR, the larger mean gain kept,
    # and only that one trained on the LR (three conservation modes, one input)
    inp = a.choices["network_input"]
    assert inp["how"].startswith("scale-transfer") and inp["scale_gain"][inp["value"]] == max(inp["scale_gain"].values())
    assert set(inp["held_out_mse"]) == {f"{inp['value']}, {m}" for m in ("exact", "smooth", "none")}
    assert set(ga) == {"gain", "gain_std", "used_histology", "scale_gain", "scale_gain_std", "weight", "decided_by",
                       "held_out_veto"}
    assert ga["decided_by"] == "scale_transfer"
    # the conservation is chosen one scale up too, where every LLR mean is known as every LR mean is
    cons, check_cons = a.choices["conservation"], a.choices["scale_transfer"]["conservation"]
    assert cons["value"] == check_cons["value"] and cons["how"] == check_cons["how"]
    assert set(check_cons["gain_by_mode"]) == {"exact", "smooth", "none"}
    assert ga["scale_gain"][0] > 0.2 and a.extra["scale_clearly_positive"] == [True, False]
    assert ga["used_histology"] == [True, False] and a.guidance.fell_back == [1]
    # the explained channel keeps most of SMSDL's detail, the noise channel none of it
    assert 0.5 < ga["weight"][0] <= 1.0 and ga["weight"][1] == 0.0
    np.testing.assert_array_equal(a.sr[1], a.control[1])
    np.testing.assert_allclose(a.sr[0], a.control[0] + ga["weight"][0] * (a.guided[0] - a.control[0]), atol=1e-5)
    other = train_regression(fields, lr, 2, mask_lr=mask, params=dataclasses.replace(params, seed=1))
    assert other.guidance.to_dict()["scale_gain"] != ga["scale_gain"]  # the seed drives the folds and networks


def test_fallback_on_the_sample_uses_the_colour_explained_ion_and_not_noise():
    """Real input: a crop of the built-in sample at F = 2 (LR 32 x 32, the scale-transfer check runs),
    each SR cell's mean H&E colour as features; its DAB-compartment ion is explained by the colour,
    a channel of pure counting noise is not."""
    from napari_smsdl.evaluation import degrade
    from napari_smsdl.sample import make_sample

    s = make_sample()
    dab = [i for i, n in enumerate(s.channel_names) if "DAB" in n][0]
    lr, mask_lr = degrade(s.ground_truth[dab : dab + 1, :64, :64], s.mask_hr[:64, :64], 2)
    colour = block_mean(s.he_rgb[:256, :256].astype(np.float32).transpose(2, 0, 1) / 255, 4)  # (3, 64, 64)
    noise = np.where(mask_lr, np.random.default_rng(0).gamma(4.0, 0.25, size=mask_lr.shape), 0)
    params = RegressionParams(hidden=32, steps=300, patience=100, folds=5, pca_dims=3, seed=0)
    result = train_regression(colour, np.stack([lr[0], noise]).astype(np.float32), 2, mask_lr=mask_lr, params=params)
    g = result.guidance.to_dict()
    assert result.choices["scale_transfer"]["available"], result.choices["scale_transfer"]
    assert g["used_histology"] == [True, False], g
    assert g["scale_gain"][0] > 0.3 and g["scale_gain"][1] < g["scale_gain"][0]


def test_the_check_pools_by_2_at_every_factor_and_is_skipped_where_that_is_too_small():
    from napari_smsdl.reconstruction._scale_check import check_pooling, pool_inputs

    k, n, why = check_pooling(np.ones((32, 32), bool), 4, folds=5)  # by 2: 16 x 16, 36 tiles (by 4 it would run too)
    assert (k, n) == (2, 5) and "pooled by 2, not by F = 4" in why
    k, n, why = check_pooling(np.ones((32, 32), bool), 2, folds=5)
    assert (k, n) == (2, 5) and "not by F" not in why
    k, n, why = check_pooling(np.ones((15, 25), bool), 4, folds=5)  # by 2: 7 x 12, 12 tiles (by 4: 3 x 6, 2 tiles)
    assert (k, n) == (2, 5)
    k, n, why = check_pooling(np.ones((8, 8), bool), 4, folds=5)  # by 2: 4 x 4, 4 tiles: too few for 3 folds
    assert (k, n) == (0, 0) and "pooled by 2" in why and "held-out gain decides alone" in why
    # ... but 16 pixels: enough for 5 folds of single pixels, when the caller accepts those
    k, n, why = check_pooling(np.ones((8, 8), bool), 4, folds=5, per_pixel=True)
    assert (k, n) == (2, 5) and "per-pixel folds" in why and "16 tissue pixels" in why
    k, n, why = check_pooling(np.ones((5, 5), bool), 2, folds=5, per_pixel=True)  # 2 x 2: 4 pixels, 6 needed
    assert (k, n) == (0, 0) and "held-out gain decides alone" in why
    fields, lr = _explained_and_noise(4, 15, 25)
    inputs = pool_inputs(fields.reshape(6, -1), lr, np.ones((15, 25), bool), 4, 3)
    # the features go to the LR grid (by F), the measurement once more by 3, both cropped to a multiple of 3
    assert inputs.features.shape == (6, 15 * 24) and inputs.llr.shape == (2, 5, 8) and inputs.lr.shape == (2, 15, 24)
    np.testing.assert_allclose(inputs.llr, block_mean(lr[:, :15, :24], 3), rtol=1e-6)


def test_a_clearly_negative_held_out_gain_vetoes_the_scale_transfer_check():
    """The check passes channels 0 and 1; the held-out gain is clearly negative on 1: it falls back. Where
    the LR image is too small for the check, the held-out gain alone decides."""
    from napari_smsdl.reconstruction._regression import _decide

    held_out_clear = np.array([False, False, True])
    against = np.array([False, True, False])
    assert _decide(held_out_clear, [True, True, False], against).tolist() == [True, False, False]
    assert _decide(held_out_clear, [True, True, False]).tolist() == [True, True, False]
    assert _decide(held_out_clear, None, against).tolist() == [False, False, True]
