"""SMSDL-Net: real (tiny) ViT training and regression runs on a crop of the built-in sample."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from napari_smsdl.errors import Cancelled, InputError
from napari_smsdl.evaluation import degrade
from napari_smsdl.features import FeatureParams, extract_features
from napari_smsdl.reconstruction import (
    RegressionParams,
    Settings,
    block_mean,
    reconstruct,
    train_regression,
)

TINY_FEATURES = FeatureParams(embed_dim=32, depth=1, num_heads=2, ssl_steps=8, ssl_batch=4, shifts=1)
TINY_REGRESSION = RegressionParams(hidden=64, steps=150, folds=3, pca_dims=16)


@pytest.fixture(scope="module")
def crop():
    """A 256 x 256 H&E crop; LR 16 x 16 (40 µm), ground truth 64 x 64 (10 µm), F = 4."""
    from napari_smsdl.sample import make_sample

    s = make_sample()
    truth = s.ground_truth[:, :64, :64]
    mask_hr = s.mask_hr[:64, :64]
    lr, mask_lr = degrade(truth, mask_hr, 4)
    return s.he_rgb[:256, :256], truth, mask_hr, lr, mask_lr


@pytest.fixture(scope="module")
def features(crop, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    fm = extract_features(crop[0], sr_shape=(64, 64), factor=4, params=TINY_FEATURES, cache_dir=cache)
    return fm, cache


def test_features_shape_training_and_cache_hit(crop, features):
    fm, cache = features
    assert fm.data.shape == (3 * 32 + 3, 64, 64) and not fm.from_cache
    assert np.isfinite(fm.data).all()
    for level in ("cellular", "regional", "tissue"):
        first, last = fm.ssl_losses[level]
        assert last < first  # self-supervised training made progress
    again = extract_features(crop[0], sr_shape=(64, 64), factor=4, params=TINY_FEATURES, cache_dir=cache)
    assert again.from_cache
    np.testing.assert_array_equal(again.data, fm.data)
    other = dataclasses.replace(TINY_FEATURES, seed=1, ssl_steps=0)
    assert not extract_features(crop[0], sr_shape=(64, 64), factor=4, params=other, cache_dir=cache).from_cache


def test_simmim_masks_square_blocks_of_tokens():
    """The published SimMIM masking: a fixed share of the window in 2 x 2-token blocks, fresh per sample."""
    import torch

    from napari_smsdl.features._vit import WINDOW_TOKENS, block_mask

    mask = block_mask(4, 0.6, 2, torch.Generator().manual_seed(0)).reshape(4, WINDOW_TOKENS, WINDOW_TOKENS)
    blocks = mask[:, ::2, ::2]
    assert torch.equal(mask, blocks.repeat_interleave(2, 1).repeat_interleave(2, 2))  # whole blocks only
    assert (blocks.reshape(4, -1).sum(1) == round(0.6 * 64)).all()  # the same count in every sample
    assert not torch.equal(mask[0], mask[1])
    again = block_mask(4, 0.6, 2, torch.Generator().manual_seed(0)).reshape(4, WINDOW_TOKENS, WINDOW_TOKENS)
    assert torch.equal(mask, again)  # seeded
    single = block_mask(2, 0.5, 1, torch.Generator().manual_seed(0))  # the default: tokens one by one
    assert torch.equal(single, torch.rand(2, WINDOW_TOKENS**2, generator=torch.Generator().manual_seed(0)) < 0.5)


def test_cellular_features_follow_the_image(crop, features):
    """Cells with different H&E have different features: no constant or patch-grid output."""
    fm, _ = features
    cellular = fm.data[:32]
    assert cellular.std(axis=(1, 2)).mean() > 1e-3
    # no 8-pixel periodic artefact: neighbouring cells differ no more across token borders than inside
    diffs = np.abs(np.diff(cellular, axis=2)).mean(axis=(0, 1))
    assert diffs.max() < 5 * np.median(diffs)


def test_checkpoint_replaces_training(crop, tmp_path):
    weights = tmp_path / "vit.pt"
    fm = extract_features(crop[0], sr_shape=(64, 64), factor=4, params=TINY_FEATURES, save_weights=weights)
    loaded = extract_features(
        crop[0], sr_shape=(64, 64), factor=4, params=dataclasses.replace(TINY_FEATURES, checkpoint=str(weights))
    )
    assert loaded.ssl_losses == {}  # no training happened
    np.testing.assert_allclose(loaded.data, fm.data, atol=1e-4)
    # the file carries the architecture: other preset sizes on the command line do not change it
    from napari_smsdl.features import build_vits

    other = dataclasses.replace(TINY_FEATURES, embed_dim=48, depth=3, num_heads=4, checkpoint=str(weights))
    vit = build_vits(other, "cpu")["cellular"]
    assert (vit.embed_dim, len(vit.blocks), vit.blocks[0].attn.num_heads) == (32, 1, 2)


def test_hipt_style_checkpoint_sets_the_architecture(crop, tmp_path, hipt_style_checkpoint):
    import torch

    from napari_smsdl.features import build_vits

    source = hipt_style_checkpoint(tmp_path / "vit256_small_dino.pth")
    params = dataclasses.replace(TINY_FEATURES, checkpoint=str(tmp_path / "vit256_small_dino.pth"))
    vits = build_vits(params, "cpu")
    vit = vits["cellular"]
    assert vit.embed_dim == 128 and len(vit.blocks) == 1 and vit.num_prefix_tokens == 1  # read off the file
    assert vit.blocks[0].attn.num_heads == 2  # 64 dimensions per head, as DINO/HIPT ViTs have
    # the encoder's blocks compute what the source's compute (weights and heads both right)
    tokens = torch.randn(2, 17, 128)
    with torch.no_grad():
        np.testing.assert_allclose(vit.blocks[0](tokens).numpy(), source.blocks[0](tokens).numpy(), atol=1e-5)
    assert tuple(vit.patch_embed.proj.weight.shape) == (128, 3, 8, 8)  # 16-px kernel resized to our 8-px tokens
    fm = extract_features(crop[0], sr_shape=(64, 64), factor=4, params=params)
    assert fm.data.shape == (3 * 128 + 3, 64, 64) and np.isfinite(fm.data).all()
    assert fm.ssl_losses == {}  # loaded, not trained
    assert fm.data[:128].std(axis=(1, 2)).mean() > 1e-3  # the cellular tokens follow the image


def test_checkpoint_that_is_not_a_vit_is_refused(tmp_path):
    import torch

    from napari_smsdl.features import build_vits

    torch.save({"conv.weight": torch.zeros(4, 3, 3, 3)}, tmp_path / "resnet.pt")
    with pytest.raises(InputError, match="patch embedding") as err:
        build_vits(dataclasses.replace(TINY_FEATURES, checkpoint=str(tmp_path / "resnet.pt")), "cpu")
    assert "resnet.pt" in str(err.value)


def test_forward_model_consistency(crop, features):
    _, truth, mask_hr, lr, mask_lr = crop
    fm, _ = features
    loose = train_regression(fm.data, lr, 4, mask_lr=mask_lr, params=dataclasses.replace(TINY_REGRESSION, conservation="none"))
    rel = np.abs(block_mean(loose.guided, 4) - lr)[:, mask_lr].mean() / lr[:, mask_lr].mean()
    assert rel < 0.15  # the network alone, pooled back over each MSI pixel, reproduces the MSI
    exact = train_regression(fm.data, lr, 4, mask_lr=mask_lr, params=dataclasses.replace(TINY_REGRESSION, conservation="exact"))
    for stack in (exact.sr, exact.guided, exact.control):
        np.testing.assert_allclose(block_mean(stack, 4)[:, mask_lr], lr[:, mask_lr], rtol=1e-4, atol=1e-6)
        assert (stack >= 0).all()
    assert exact.uncertainty.shape == exact.sr.shape and (exact.uncertainty > 0).all()
    assert exact.choices["conservation"] == {"value": "exact", "how": "given", "held_out_mse": exact.choices["conservation"]["held_out_mse"]}
    assert len(exact.choices["steps"]["best_per_fold"]) == 3


def _too_small_for_the_scale_check(mask_lr: np.ndarray) -> np.ndarray:
    """The tissue of the LR's top-left 8 x 8 pixels: pooled by 2 (or more) too few tiles for 3 check folds."""
    small = np.zeros_like(mask_lr)
    small[:8, :8] = mask_lr[:8, :8]
    return small


def test_settings_are_chosen_on_held_out_pixels(crop, features):
    _, _, _, lr, mask_lr = crop
    fm, _ = features
    mask_lr = _too_small_for_the_scale_check(mask_lr)
    params = dataclasses.replace(TINY_REGRESSION, pca_dims=0, conservation="auto", steps=60)
    result = train_regression(fm.data, lr, 4, mask_lr=mask_lr, params=params)
    dims = result.choices["pca_dims"]
    assert dims["how"] == "held-out linear fit" and str(dims["value"]) in dims["held_out_mse"]
    assert dims["held_out_mse"][str(dims["value"])] == min(dims["held_out_mse"].values())
    assert set(result.choices["conservation"]["held_out_mse"]) == {"exact", "smooth", "none"}
    # the network input: this crop is too small for the scale-transfer check, so both inputs are trained on
    # the same folds and the lower held-out error (exact conservation) is kept
    inp = result.choices["network_input"]
    scores = inp["held_out_mse"]
    assert inp["how"].startswith("held-out error") and len(scores) == 6
    assert scores[f"{inp['value']}, exact"] == min(scores["bicubic, exact"], scores["features, exact"])
    assert result.choices["conservation"]["held_out_mse"]["exact"] == scores[f"{inp['value']}, exact"]
    with pytest.raises(InputError, match="network_input"):
        RegressionParams(network_input="pixels")
    g = result.guidance.to_dict()
    assert len(g["gain"]) == len(g["gain_std"]) == len(g["used_histology"]) == lr.shape[0]


def test_smsdl_beats_bicubic_where_he_carries_the_signal(crop, features):
    from napari_smsdl.evaluation import score_stack
    from napari_smsdl.reconstruction.baselines import bicubic_upsample

    _, truth, mask_hr, lr, mask_lr = crop
    fm, _ = features
    bicubic = bicubic_upsample(lr, 4, mask_lr=mask_lr)
    smsdl = train_regression(fm.data, lr, 4, mask_lr=mask_lr, params=dataclasses.replace(TINY_REGRESSION, fallback=False)).sr
    s_smsdl = score_stack(truth, smsdl, mask_hr)
    s_bi = score_stack(truth, bicubic, mask_hr)
    assert s_smsdl["ssim"]["mean"] > s_bi["ssim"]["mean"] + 0.05
    assert s_smsdl["rmse"]["mean"] < s_bi["rmse"]["mean"]
    assert s_smsdl["r2"]["mean"] > s_bi["r2"]["mean"]


def test_seeded_runs_reproduce(crop, features):
    _, _, _, lr, mask_lr = crop
    fm, _ = features
    params = dataclasses.replace(TINY_REGRESSION, steps=30)
    a = train_regression(fm.data, lr, 4, mask_lr=mask_lr, params=params).sr
    b = train_regression(fm.data, lr, 4, mask_lr=mask_lr, params=params).sr
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_cancel_stops_training(crop, features):
    _, _, _, lr, mask_lr = crop
    fm, _ = features
    with pytest.raises(Cancelled):
        train_regression(fm.data, lr, 4, mask_lr=mask_lr, params=TINY_REGRESSION, should_stop=lambda: True)
    with pytest.raises(Cancelled):
        extract_features(crop[0], sr_shape=(64, 64), factor=4, params=TINY_FEATURES, should_stop=lambda: True)


def test_reconstruct_pipeline_grids_and_methods(crop):
    he, truth, mask_hr, lr, mask_lr = crop
    settings = Settings(factor=4, features=TINY_FEATURES, regression=TINY_REGRESSION, max_cell_px=4)
    stages = []
    result = reconstruct(
        lr, he, he_pixel_size_um=2.5, msi_pixel_size_um=40.0, settings=settings, methods=["smsdl", "bicubic"],
        mask_lr=mask_lr, progress=lambda stage, done, total: stages.append(stage),
    )
    assert set(result.sr) == {"smsdl", "bicubic"}
    assert result.sr["smsdl"].shape == (5, 64, 64) and result.guide_rgb.shape == (256, 256, 3)
    # same field of view, 2.5 µm H&E pixels, 10 µm SR cells of 4 x 4 guide pixels: the guide is the H&E
    np.testing.assert_allclose(result.guide_rgb, he / 255.0, atol=0.02)
    assert any("self-supervised" in s for s in stages) and any("regression" in s for s in stages)


def test_the_regression_progress_never_runs_backwards(crop, features):
    """Both network inputs are tried on a tiny LR: the last report keeps the total the fold networks counted to."""
    _, _, _, lr, mask_lr = crop
    fm, _ = features
    mask_lr = _too_small_for_the_scale_check(mask_lr)
    reports = []
    params = dataclasses.replace(TINY_REGRESSION, steps=50, patience=50, network_input="auto")
    result = train_regression(fm.data, lr, 4, mask_lr=mask_lr, params=params,
                              progress=lambda stage, done, total: reports.append((stage, done, total)))
    assert len(result.choices["network_input"]["held_out_mse"]) == 6  # both inputs x three conservation modes
    regression = [(done, total) for stage, done, total in reports if "regression" in stage]
    totals = {total for _, total in regression}
    assert len(totals) == 1, totals
    done = [d for d, _ in regression]
    assert done == sorted(done) and done[-1] == regression[-1][1]
