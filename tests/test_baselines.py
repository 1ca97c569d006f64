"""Bicubic and DeepFERE-style CNN baselines: small real runs (tiny images, few iterations)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from napari_smsdl.errors import InputError
from napari_smsdl.reconstruction.baselines import bicubic_upsample, block_average, fill_nearest_tissue, upsample_mask
from napari_smsdl.reconstruction.baselines.bicubic import cubic_matrix


def _smooth(h: int, w: int, c: int = 2) -> np.ndarray:
    r, q = np.mgrid[0:h, 0:w] / max(h, w)
    return np.stack([2 + np.sin(2 * r + k) * np.cos(1.5 * q - k) for k in range(c)])


# ----------------------------------------------------------------------------- grid helpers


def test_block_average_hand_computed_with_mask():
    sr = np.arange(16, dtype=float).reshape(4, 4)
    mask = np.ones((4, 4), bool)
    mask[0, 0] = False  # value 0 excluded from the first block
    mask[2:, 2:] = False  # last block has no tissue
    lr, mask_lr = block_average(sr, 2, mask)
    assert lr.shape == (2, 2)
    assert lr[0, 0] == pytest.approx((1 + 4 + 5) / 3)
    assert lr[0, 1] == pytest.approx((2 + 3 + 6 + 7) / 4)
    assert lr[1, 1] == 0.0
    assert mask_lr.tolist() == [[True, True], [True, False]]


def test_block_average_rejects_non_multiple():
    with pytest.raises(InputError):
        block_average(np.zeros((1, 5, 4)), 2)


def test_fill_nearest_tissue_and_upsample_mask():
    a = np.array([[[1.0, np.nan, 3.0]]])
    m = np.isfinite(a[0])
    out = fill_nearest_tissue(a, m)
    assert out[0, 0, 1] in (1.0, 3.0)
    assert upsample_mask(np.array([[True, False]]), 3).shape == (3, 6)
    assert upsample_mask(np.array([[True, False]]), 3)[:, :3].all()


# ----------------------------------------------------------------------------- bicubic


def test_cubic_matrix_rows_sum_to_one_and_interpolate_at_centres():
    for f in (1, 2, 3, 4):
        mat = cubic_matrix(7, f)
        assert mat.shape == (7 * f, 7)
        np.testing.assert_allclose(mat.sum(axis=1), 1.0, atol=1e-12)
    # odd F: the centre SR sample of each block sits exactly on the LR pixel centre
    mat = cubic_matrix(5, 3)
    np.testing.assert_allclose(mat[1::3], np.eye(5), atol=1e-12)


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_bicubic_shape_dtype_and_constant(factor):
    lr = np.full((3, 5, 4), 7.5)
    sr = bicubic_upsample(lr, factor)
    assert sr.shape == (3, 5 * factor, 4 * factor)
    assert sr.dtype == np.float32
    np.testing.assert_allclose(sr, 7.5, rtol=1e-6)


def test_bicubic_of_linear_ramp_is_exact_inside():
    # Keys cubic convolution reproduces linear functions exactly (away from the replicated edge).
    lr = np.tile(np.arange(8, dtype=float), (6, 1))[None] + 1
    sr = bicubic_upsample(lr, 4)
    x = (np.arange(32) + 0.5) / 4 - 0.5 + 1
    np.testing.assert_allclose(sr[0, 10, 8:24], x[8:24], atol=1e-6)


def test_block_average_of_bicubic_is_close_to_lr_for_smooth_images():
    lr = _smooth(12, 10)
    sr = bicubic_upsample(lr, 4)
    back, _ = block_average(sr, 4)
    # interior (the replicated border bends the interpolant slightly)
    err = np.abs(back - lr)[:, 1:-1, 1:-1].max()
    assert err < 0.01 * np.ptp(lr)


def test_bicubic_background_does_not_bleed_and_negatives_clipped():
    lr = np.full((1, 6, 6), 10.0)
    lr[0, :, 3:] = 0.0  # background zeros on the right half
    mask = np.zeros((6, 6), bool)
    mask[:, :3] = True
    sr = bicubic_upsample(lr, 4, mask_lr=mask, background=0.0)
    # tissue stays exactly 10 right up to its edge (the zeros do not pull it down)
    np.testing.assert_allclose(sr[0, :, :12], 10.0, rtol=1e-6)
    assert (sr[0, :, 12:] == 0).all()  # background written as asked
    # default: the nearest-tissue extrapolation is kept outside the LR tissue
    np.testing.assert_allclose(bicubic_upsample(lr, 4, mask_lr=mask), 10.0, rtol=1e-6)
    # without the mask the zeros bleed in (and cubic overshoot is clipped at 0)
    sr_nomask = bicubic_upsample(lr, 4)
    assert sr_nomask[0, :, 11].max() < 9.9
    assert sr_nomask.min() >= 0.0
    # NaN outside tissue is treated as background by default
    lr_nan = lr.copy()
    lr_nan[0, :, 3:] = np.nan
    np.testing.assert_allclose(bicubic_upsample(lr_nan, 4, background=0.0), sr)


def test_bicubic_keeps_extrapolation_when_asked():
    lr = np.full((1, 4, 4), 3.0)
    mask = np.zeros((4, 4), bool)
    mask[:2] = True
    sr = bicubic_upsample(lr, 2, mask_lr=mask, background=None)
    np.testing.assert_allclose(sr, 3.0)


def test_bicubic_rejects_bad_inputs():
    with pytest.raises(InputError):
        bicubic_upsample(np.zeros((2, 3, 3)), 0)
    with pytest.raises(InputError):
        bicubic_upsample(np.zeros((2, 3, 3)), 2, mask_lr=np.zeros((3, 3), bool))
    with pytest.raises(InputError):
        bicubic_upsample(np.zeros((2, 3, 3)), 2, mask_lr=np.ones((2, 2), bool))


# ----------------------------------------------------------------------------- DeepFERE-style CNN

torch = pytest.importorskip("torch")

from napari_smsdl.reconstruction.baselines.deepfere import (
    DeepFereConfig,
    DeepFereResult,
    Downsampler,
    ForwardModel,
    lanczos2_kernel_1d,
    structure_correlation_loss,
    train_deepfere,
)
from napari_smsdl.errors import Cancelled  # noqa: E402


def _tiny_pair(h: int = 8, w: int = 8, f: int = 2, seed: int = 0):
    """A 2-channel SR truth whose fine structure is visible in the RGB guide."""
    rng = np.random.default_rng(seed)
    hh, ww = h * f, w * f
    r, q = np.mgrid[0:hh, 0:ww] / max(hh, ww)
    blobs = (np.sin(9 * r) * np.cos(7 * q) + 1) / 2
    truth = np.stack([100 * (0.2 + blobs), 5 * (0.3 + r * (1 - blobs))])
    guide = np.stack([1 - 0.6 * blobs, 0.4 + 0.3 * r, 0.8 - 0.3 * blobs], axis=-1)
    guide = np.clip(guide + 0.01 * rng.standard_normal(guide.shape), 0, 1).astype(np.float32)
    lr, mask_lr = block_average(truth, f)
    return lr, guide, mask_lr, truth


# Narrow networks (the architecture is the published one, only the feature widths shrink) keep
# these tests at about a second each.
FAST = DeepFereConfig(iterations=25, warmup_iterations=5, width=16, mapping_width=16, lr=3e-3)


def test_lanczos_kernel_and_downsampler():
    for f in (1, 2, 3, 4):
        k = lanczos2_kernel_1d(f)
        assert k.sum() == pytest.approx(1.0)
        np.testing.assert_allclose(k, k[::-1])
        assert k.size == (4 * f if f % 2 == 0 else 4 * f - 1)
    np.testing.assert_allclose(lanczos2_kernel_1d(1), [0, 1, 0], atol=1e-12)
    for f in (2, 3, 4):
        for model in ForwardModel:
            d = Downsampler(f, 2, model)
            x = torch.full((1, 2, 6 * f, 5 * f), 3.0)
            y = d(x)
            assert tuple(y.shape) == (1, 2, 6, 5)
            torch.testing.assert_close(y, torch.full_like(y, 3.0))
    # block-centred: a ramp along x downsamples to the ramp at the block centres
    f = 4
    x = torch.arange(10 * f, dtype=torch.float32).repeat(1, 1, 10 * f, 1)
    y = Downsampler(f, 1, ForwardModel.LANCZOS2)(x)[0, 0, 5, 2:-2]
    torch.testing.assert_close(y, torch.arange(2, 8, dtype=torch.float32) * f + 1.5)


def test_structure_correlation_loss_zero_for_identical_structure():
    g = torch.rand(1, 3, 20, 20)
    tissue = torch.ones(1, 1, 20, 20)
    rows = torch.tensor([0, 2, 4])
    cols = torch.tensor([1, 3, 0])
    assert float(structure_correlation_loss(g, g, tissue, rows, cols, 16, False)) == pytest.approx(0, abs=1e-6)
    # scaled copy: only the normalised version is scale-free
    assert float(structure_correlation_loss(0.5 * g, g, tissue, rows, cols, 16, True)) == pytest.approx(0, abs=1e-5)
    assert float(structure_correlation_loss(0.5 * g, g, tissue, rows, cols, 16, False)) > 0.01


def test_cnn_shapes_units_and_not_constant():
    lr, guide, mask_lr, _ = _tiny_pair()
    res = train_deepfere(lr, guide, 2, mask_lr=mask_lr, config=FAST, device="cpu")
    assert isinstance(res, DeepFereResult)
    assert res.sr.shape == (2, 16, 16) and res.sr.dtype == np.float32
    assert res.mapping.shape == (2, 16, 16)
    assert np.isfinite(res.sr).all()
    assert res.seconds > 0 and res.device == "cpu"
    assert len(res.loss_history) == 30 and len(res.lr_loss_history) == 25
    # same intensity unit as the input, and real spatial contrast per channel
    for c in range(2):
        assert res.sr[c].mean() == pytest.approx(lr[c].mean(), rel=0.1)
        assert res.sr[c].std() > 0.5 * lr[c].std()
    assert max(res.diagnostics["saturated"]) < 0.05


def test_cnn_training_reduces_lr_consistency_loss():
    lr, guide, mask_lr, _ = _tiny_pair()
    cfg = replace(FAST, iterations=40)
    res = train_deepfere(lr, guide, 2, mask_lr=mask_lr, config=cfg, device="cpu")
    hist = res.lr_loss_history  # iteration 0 is the bicubic start (residual initialisation)
    assert min(hist[-5:]) < 0.7 * hist[0]
    # the returned SR pooled back over each F×F block reproduces the LR better than bicubic does
    back_cnn, _ = block_average(res.sr, 2)
    back_bi, _ = block_average(bicubic_upsample(lr, 2), 2)
    err_cnn = np.abs(back_cnn - lr).mean()
    err_bi = np.abs(back_bi - lr).mean()
    assert err_cnn < 0.8 * err_bi
    assert err_cnn / np.abs(lr).mean() < 0.02
    # the published training starts from a flat image and must also bring the loss down
    pub_cfg = replace(DeepFereConfig.published(iterations=60, warmup_iterations=5), width=16, mapping_width=16)
    pub = train_deepfere(lr, guide, 2, mask_lr=mask_lr, device="cpu", config=pub_cfg)
    assert min(pub.lr_loss_history[-5:]) < 0.8 * pub.lr_loss_history[0]


def test_cnn_seeds_reproduce():
    lr, guide, mask_lr, _ = _tiny_pair()
    a = train_deepfere(lr, guide, 2, mask_lr=mask_lr, config=FAST, seed=3, device="cpu")
    b = train_deepfere(lr, guide, 2, mask_lr=mask_lr, config=FAST, seed=3, device="cpu")
    c = train_deepfere(lr, guide, 2, mask_lr=mask_lr, config=FAST, seed=4, device="cpu")
    np.testing.assert_array_equal(a.sr, b.sr)
    assert a.loss_history == b.loss_history
    assert not np.array_equal(a.sr, c.sr)


def test_cnn_odd_sizes_mask_nan_progress_and_cancel():
    lr, guide, _, _ = _tiny_pair(7, 5, 3)  # SR 21×15: not a multiple of 32, odd factor
    lr = lr.copy()
    mask_lr = np.ones((7, 5), bool)
    mask_lr[0, 0] = False
    lr[:, 0, 0] = np.nan
    calls = []
    res = train_deepfere(lr, guide, 3, mask_lr=mask_lr, iterations=6,
                         config=replace(FAST, iterations=99, warmup_iterations=2),
                         progress=lambda s, i, n: calls.append((s, i, n)), device="cpu")
    assert res.sr.shape == (2, 21, 15)
    assert np.isfinite(res.sr).all() and (res.sr >= 0).all()
    # the missing LR pixel's block is filled from its neighbours, not left at 0
    assert (res.sr[:, :3, :3] > 0.3 * np.nanmean(lr, axis=(1, 2))[:, None, None]).all()
    zeroed = train_deepfere(lr, guide, 3, mask_lr=mask_lr, iterations=2, background=0.0,
                            config=replace(FAST, warmup_iterations=1), device="cpu")
    assert (zeroed.sr[:, :3, :3] == 0).all()
    assert calls and calls[-1] == ("cnn", 8, 8)
    with pytest.raises(Cancelled):
        train_deepfere(lr, guide, 3, mask_lr=mask_lr, config=FAST, should_stop=lambda: True, device="cpu")


def test_cnn_published_training_runs_and_rejects_bad_guide():
    lr, guide, mask_lr, _ = _tiny_pair()
    res = train_deepfere(lr, guide, 2, mask_lr=mask_lr, device="cpu",
                         config=replace(DeepFereConfig.published(5, 2), width=16, mapping_width=16))
    assert res.sr.shape == (2, 16, 16)
    with pytest.raises(InputError, match="guide"):
        train_deepfere(lr, guide[:-1], 2, config=FAST)


def test_cnn_divergence_is_rolled_back_not_returned():
    # An absurd learning rate makes the sigmoid output run off to saturation within a few steps.
    lr, guide, mask_lr, _ = _tiny_pair()
    wild = replace(FAST, lr=0.05, cosine_decay=False)
    res = train_deepfere(lr, guide, 2, mask_lr=mask_lr, config=wild, device="cpu")
    assert res.rollbacks  # divergence detected and undone
    assert max(res.diagnostics["saturated"]) < 0.5
    assert min(res.lr_loss_history) <= res.lr_loss_history[0]
    # without the guard the network dies (saturated sigmoid); the best-by-LR-loss output is kept
    dead = train_deepfere(lr, guide, 2, mask_lr=mask_lr, config=replace(wild, rollback=False), device="cpu")
    assert max(dead.diagnostics["saturated"]) > 0.9
    assert dead.best_iteration < wild.iterations
    for c in range(2):
        assert dead.sr[c].std() > 0.5 * lr[c].std()


# ----------------------------------------------------------------------------- SMSDL's guide and the budget


def _fine_guide(guide: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """The guide at k × k pixels per SR cell: each cell's colour plus sub-cell texture (zero mean)."""
    rng = np.random.default_rng(seed)
    fine = np.repeat(np.repeat(guide, k, axis=0), k, axis=1)
    tex = 0.1 * rng.standard_normal(fine.shape).astype(np.float32)
    hh, ww = guide.shape[:2]
    tex -= np.repeat(np.repeat(tex.reshape(hh, k, ww, k, 3).mean(axis=(1, 3)), k, 0), k, 1)
    return np.clip(fine + tex, 0, 1).astype(np.float32)


def test_cnn_takes_smsdls_fine_guide_deterministically():
    from napari_smsdl.reconstruction.baselines.deepfere import MappingHead

    lr, guide, mask_lr, _ = _tiny_pair()
    fine = _fine_guide(guide, 3)
    assert fine.shape == (48, 48, 3)
    a = train_deepfere(lr, fine, 2, mask_lr=mask_lr, config=FAST, seed=1, device="cpu")
    b = train_deepfere(lr, fine, 2, mask_lr=mask_lr, config=FAST, seed=1, device="cpu")
    assert a.guide_cell_px == 3
    assert a.sr.shape == (2, 16, 16) and a.mapping.shape == (2, 16, 16)
    assert np.isfinite(a.sr).all()
    np.testing.assert_array_equal(a.sr, b.sr)  # same seed, same output
    # the sub-cell pixels are used: the same cell means with other sub-cell texture give another output
    other = train_deepfere(lr, _fine_guide(guide, 3, seed=5), 2, mask_lr=mask_lr, config=FAST, seed=1,
                           device="cpu")
    assert not np.array_equal(a.sr, other.sr)
    # the old call (one guide pixel per SR cell) is k = 1
    old = train_deepfere(lr, guide, 2, mask_lr=mask_lr, config=FAST, seed=1, device="cpu")
    assert old.guide_cell_px == 1 and old.sr.shape == a.sr.shape
    # the head folds k × k × 3 pixels into 3·k² channels
    head = MappingHead(2, 8, cell_px=3)
    assert head.net[0].in_channels == 27
    with pytest.raises(InputError, match="guide"):
        train_deepfere(lr, fine[:, :-1], 2, config=FAST)


def test_cnn_time_budget_stops_training():
    lr, guide, mask_lr, _ = _tiny_pair()
    cfg = replace(FAST, iterations=10_000, warmup_iterations=10_000, time_budget_s=0.5, warmup_share=0.2)
    res = train_deepfere(lr, guide, 2, mask_lr=mask_lr, config=cfg, device="cpu")
    assert res.stopped_by == "time_budget"
    assert 0 < res.warmup_run < 10_000 and 0 < res.iterations_run < 10_000
    assert len(res.lr_loss_history) == res.iterations_run
    assert len(res.loss_history) == res.warmup_run + res.iterations_run
    # no budget: the iteration caps decide
    full = train_deepfere(lr, guide, 2, mask_lr=mask_lr, config=FAST, device="cpu")
    assert full.stopped_by == "iterations" and full.iterations_run == FAST.iterations
    # the presets carry a budget in seconds (the same on every device)
    from napari_smsdl.reconstruction.baselines.deepfere import PRESET_SECONDS, Preset

    for p in Preset:
        assert DeepFereConfig.preset(p).time_budget_s == PRESET_SECONDS[p] > 0


def test_cnn_heldout_fold_picks_the_iterate_and_stops_on_patience():
    lr, guide, mask_lr, _ = _tiny_pair(12, 12)
    cfg = replace(FAST, iterations=200, heldout_folds=4, patience=3, lr=0.05, cosine_decay=False)
    res = train_deepfere(lr, guide, 2, mask_lr=mask_lr, config=cfg, device="cpu")
    assert len(res.heldout_loss_history) == res.iterations_run
    assert res.stopped_by in ("patience", "iterations")
    if res.stopped_by == "patience":
        assert res.iterations_run < 200
    if res.best_iteration < res.iterations_run:
        assert res.heldout_loss_history[res.best_iteration] == min(res.heldout_loss_history)
    a = train_deepfere(lr, guide, 2, mask_lr=mask_lr, config=replace(cfg, patience=None, iterations=8),
                       device="cpu", seed=2)
    b = train_deepfere(lr, guide, 2, mask_lr=mask_lr, config=replace(cfg, patience=None, iterations=8),
                       device="cpu", seed=2)
    np.testing.assert_array_equal(a.sr, b.sr)
    assert a.heldout_loss_history == b.heldout_loss_history


def test_cnn_explicit_iterations_switch_the_budget_off():
    lr, guide, mask_lr, _ = _tiny_pair()
    cfg = replace(FAST, warmup_iterations=2, time_budget_s=1e-9)
    budgeted = train_deepfere(lr, guide, 2, mask_lr=mask_lr, config=cfg, device="cpu")
    assert budgeted.stopped_by == "time_budget" and budgeted.iterations_run == 1
    exact = train_deepfere(lr, guide, 2, mask_lr=mask_lr, config=cfg, iterations=7, device="cpu")
    assert exact.stopped_by == "iterations" and exact.iterations_run == 7 and exact.warmup_run == 2
