"""Compare helpers: placement in µm, pixel look-ups, differences, limits, segments (headless)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_smsdl.errors import InputError
from napari_smsdl.evaluation import (
    channel_label,
    cluster_segments,
    difference_stacks,
    locate_pixel,
    metrics_rows,
    pixel_values,
    placement_transform,
    refined_placement,
    shared_limits,
    tissue_mask_sr,
)
from napari_smsdl.project import Project
from napari_smsdl.reconstruction import Reconstruction, Settings


@pytest.fixture
def project():
    rng = np.random.default_rng(0)
    lr = rng.uniform(1, 10, (2, 4, 3)).astype(np.float32)
    sr = {m: rng.uniform(0, 10, (2, 16, 12)).astype(np.float32) for m in ("smsdl", "bicubic")}
    recon = Reconstruction(sr, {}, np.zeros((32, 24, 3), np.float32), None, {}, Settings(factor=4))
    p = Project.from_reconstruction(recon, lr_msi=lr, channel_names=("a", "b"), msi_pixel_size_um=40.0,
                                    he_pixel_size_um=2.5, mz=(700.1, 800.2))
    return p.with_truth(rng.uniform(1, 10, (2, 16, 12)))


def test_sr_layers_share_pixel_corners_with_the_msi():
    place = refined_placement((40.0, 40.0), (20.0, 20.0), 4)
    assert place == {"scale": (10.0, 10.0), "translate": (5.0, 5.0)}
    # an MSI shifted in the viewer: the SR grid follows it
    place = refined_placement((1, 40.0, 40.0), (0, 120.0, -20.0), 8)
    np.testing.assert_allclose(place["translate"], (102.5, -37.5))


def test_placement_transform_matches_same_field_of_view():
    from napari_smsdl.registration import same_field_of_view_transform

    t = placement_transform(msi_scale_rc=(40, 40), msi_translate_rc=(20, 20), msi_pixel_size_um=40,
                            he_scale_rc=(2.5, 2.5), he_translate_rc=(1.25, 1.25), he_pixel_size_um=2.5)
    ref = same_field_of_view_transform((32, 32), 40.0, (512, 512), 2.5)
    for point in [(0.0, 0.0), (400.0, 120.0), (1240.0, 1240.0)]:
        np.testing.assert_allclose(t.TransformPoint(point), ref.TransformPoint(point), atol=1e-9)
    # the H&E moved 100 µm right in the viewer: MSI (0, 0) now lands 100 µm further left in the H&E
    moved = placement_transform(msi_scale_rc=(40, 40), msi_translate_rc=(20, 20), msi_pixel_size_um=40,
                                he_scale_rc=(2.5, 2.5), he_translate_rc=(1.25, 101.25), he_pixel_size_um=2.5)
    np.testing.assert_allclose(moved.TransformPoint((0.0, 0.0)), (18.75 - 100.0, 18.75))


def test_locate_pixel_and_values(project):
    kw = {"msi_scale_rc": (40.0, 40.0), "msi_translate_rc": (20.0, 20.0), "lr_shape_rc": (4, 3), "factor": 4}
    hit = locate_pixel((45.0, 119.0), **kw)  # µm: SR row 4, col 11 → MSI pixel (1, 2)
    assert hit.sr_rc == (4, 11) and hit.lr_rc == (1, 2)
    assert locate_pixel((-1.0, 10.0), **kw) is None and locate_pixel((10.0, 120.0), **kw) is None
    values = pixel_values(project, hit)
    assert values["lr"] == [pytest.approx(project.lr_msi[c, 1, 2]) for c in (0, 1)]
    assert values["smsdl"][1] == pytest.approx(project.sr["smsdl"][1, 4, 11])
    assert values["truth"][0] == pytest.approx(project.truth[0, 4, 11])
    assert list(pixel_values(project, hit, channels=[1])) == ["lr", "truth", "smsdl", "bicubic"]


def test_differences_and_limits(project):
    diffs = difference_stacks(project, "truth")
    np.testing.assert_allclose(diffs["bicubic"], project.sr["bicubic"] - project.truth)
    assert set(difference_stacks(project, "bicubic")) == {"smsdl"}
    with pytest.raises(InputError, match="not one of"):
        difference_stacks(project, "cnn")
    lo, hi = shared_limits([np.array([[0.0, 5.0], [10.0, np.nan]])], percentile=100)
    assert (lo, hi) == (0.0, 10.0)
    assert shared_limits([np.array([-3.0, 1.0, 2.0])], symmetric=True, percentile=100) == (-3.0, 3.0)
    assert tissue_mask_sr(project).shape == (16, 12)


def test_segments_find_planted_regions():
    rng = np.random.default_rng(1)
    labels_true = np.zeros((30, 30), int)
    labels_true[:, 10:20] = 1
    labels_true[:, 20:] = 2
    centres = np.array([[0.0, 5.0, 1.0], [5.0, 0.0, 1.0], [2.0, 2.0, 8.0]])
    stack = centres[labels_true].transpose(2, 0, 1) + rng.normal(0, 0.3, (3, 30, 30))
    mask = np.ones((30, 30), bool)
    mask[:3] = False
    seg = cluster_segments(stack, n_segments=3, mask=mask, seed=0)
    assert seg[~mask].max() == 0 and set(np.unique(seg[mask])) == {1, 2, 3}
    for k in range(3):  # each planted region is one segment
        assert len(np.unique(seg[mask & (labels_true == k)])) == 1
    np.testing.assert_array_equal(seg, cluster_segments(stack, n_segments=3, mask=mask, seed=0))
    with pytest.raises(InputError, match="from 2 to 32"):
        cluster_segments(stack, n_segments=1)


def test_metrics_rows_and_labels(project):
    rows = metrics_rows(project.metrics, project.channel_names, channels=[1])
    assert [r[:2] for r in rows] == [("SMSDL", "b"), ("SMSDL", "mean (all channels)"), ("BI", "b"), ("BI", "mean (all channels)")]
    assert rows[0][3] == project.metrics["smsdl"]["ssim"]["per_channel"][1]
    assert channel_label(1, project.channel_names, project.mz) == "m/z 800.2000"
    assert channel_label(0, project.channel_names) == "a"


def test_guide_level_and_level_transform():
    import SimpleITK as sitk

    from napari_smsdl.evaluation import he_level_for_guide, transform_to_level

    rows = [8000, 4000, 2000, 1000]  # level pixel sizes 0.5, 1, 2, 4 µm
    assert he_level_for_guide(rows, 0.5, sr_pixel_size_um=10.0, max_cell_px=4) == 2  # 2 µm <= 10/4
    assert he_level_for_guide(rows, 0.5, sr_pixel_size_um=2.0, max_cell_px=8) == 0
    t0 = sitk.TranslationTransform(2, (100.0, 50.0))
    t2 = transform_to_level(t0, level0_pixel_size_um=0.5, scale=0.25)
    # level-0 point at physical 100 µm is level-2 pixel (200 + 0.5) * 0.25 - 0.5 = 49.625 → 99.25 µm at 2 µm/px
    np.testing.assert_allclose(t2.TransformPoint((0.0, 0.0)), (99.25, 49.25))
    assert transform_to_level(t0, level0_pixel_size_um=0.5, scale=1.0) is t0


# ---------------------------------------------------------------------------- the H&E-free control and guidance
GUIDANCE = {"gain": [0.125, -0.0625, 0.5], "gain_std": [0.03125, 0.25, 0.0625], "used_histology": [True, False, True]}


def test_methods_are_ordered_and_labelled_with_the_control():
    from napari_smsdl.evaluation import method_label
    from napari_smsdl.evaluation._comparison import ordered_methods

    assert ordered_methods(["cnn", "backprojection", "other", "bicubic", "smsdl"]) == [
        "smsdl", "bicubic", "backprojection", "cnn", "other"]
    assert method_label("backprojection") == "BI + back-projection (H&E-free)"


def test_fallback_summary_names_the_channels_that_use_the_control():
    from napari_smsdl.evaluation._comparison import fallback_summary

    text = fallback_summary(GUIDANCE, ["a", "b", "c"], mz=(700.1, 800.2, 900.3))
    assert text == ("SMSDL used the H&E on 2 of 3 channels; fell back to the H&E-free control "
                    "(BI + back-projection) on: m/z 800.2000")
    every = {**GUIDANCE, "used_histology": [True] * 3}
    assert fallback_summary(every, ["a", "b", "c"]).endswith("no channel fell back to the H&E-free control")
    many = {"used_histology": [False] * 25}
    assert fallback_summary(many, [f"c{i}" for i in range(25)]).endswith("c19 and 5 more")
    assert fallback_summary(None, ["a"]) is None and fallback_summary({}, ["a"]) is None
    # a decision the scale-transfer check could not make is flagged; one it made is not
    mz = (700.1, 800.2, 900.3)
    weak = fallback_summary({**GUIDANCE, "decided_by": "held_out"}, ["a", "b", "c"], mz=mz)
    assert weak.startswith(text) and "held-out gain alone" in weak and "may still be worse than the control" in weak
    assert fallback_summary({**GUIDANCE, "decided_by": "scale_transfer"}, ["a", "b", "c"], mz=mz) == text
    small = fallback_summary({**GUIDANCE, "decided_by": "scale_transfer_per_pixel"}, ["a", "b", "c"], mz=mz)
    assert small.startswith(text) and "single-pixel folds" in small
    assert "held-out" not in fallback_summary({**GUIDANCE, "used_histology": [False] * 3, "decided_by": "held_out"},
                                              ["a", "b", "c"])  # every channel is the control: nothing to caution
    # a channel the held-out gain vetoed is counted among those that fell back; no veto, no sentence
    vetoed = fallback_summary({**GUIDANCE, "held_out_veto": [False, True, False]}, ["a", "b", "c"], mz=mz)
    assert vetoed.startswith(text) and "1 of them passed the scale-transfer check" in vetoed
    assert fallback_summary({**GUIDANCE, "held_out_veto": [False] * 3}, ["a", "b", "c"], mz=mz) == text


def test_guidance_cells_per_channel_and_summary():
    from napari_smsdl.evaluation._comparison import guidance_cells

    assert guidance_cells(GUIDANCE, 0) == ("0.125 ± 0.031", "yes")
    assert guidance_cells(GUIDANCE, 1) == ("-0.0625 ± 0.25", "no (control)")
    gain, used = guidance_cells(GUIDANCE, None)
    assert used == "2/3" and gain.startswith(f"{np.mean(GUIDANCE['gain']):.3g} ± ")
    assert guidance_cells(None, 0) == ("—", "—") and guidance_cells(GUIDANCE, 7) == ("—", "—")
    saved = {**GUIDANCE, "gain": [None, 0.5, 0.25]}  # a NaN gain comes back from JSON as null
    assert guidance_cells(saved, 0)[0] == "—" and guidance_cells(saved, 1)[0] == "0.5 ± 0.25"
    blended = {**GUIDANCE, "weight": [0.62, 0.0, 1.0]}
    assert guidance_cells(blended, 0)[1] == "yes (weight 0.62)" and guidance_cells(blended, 1)[1] == "no (control)"
    assert guidance_cells(blended, 2)[1] == "yes" and guidance_cells({**GUIDANCE, "weight": [None] * 3}, 0)[1] == "yes"
    vetoed = {**GUIDANCE, "held_out_veto": [False, True, False]}
    assert guidance_cells(vetoed, 1)[1] == "no (control: held-out veto)" and guidance_cells(vetoed, 0)[1] == "yes"


def test_figure_has_a_column_for_the_he_free_control(tmp_path):
    from napari_smsdl.evaluation import comparison_figure
    from napari_smsdl.evaluation._figures import figure_columns

    rng = np.random.default_rng(2)
    stacks = {m: rng.uniform(0, 1, (2, 16, 12)).astype(np.float32) for m in ("cnn", "backprojection", "smsdl", "bicubic")}
    truth = rng.uniform(0, 1, (2, 16, 12)).astype(np.float32)
    columns = figure_columns(stacks, truth=truth)
    titles = [t for t, _ in columns]
    assert titles[:5] == ["ground truth", "SMSDL", "BI", "BI + back-projection (H&E-free)", "CNN"]
    assert titles[5:] == ["|SMSDL - truth|", "|BI - truth|", "|BI + back-projection (H&E-free) - truth|", "|CNN - truth|"]
    control = dict(columns)["BI + back-projection (H&E-free)"]
    np.testing.assert_array_equal(control, stacks["backprojection"])
    np.testing.assert_allclose(dict(columns)["|BI + back-projection (H&E-free) - truth|"],
                               np.abs(stacks["backprojection"] - truth))
    from PIL import Image

    with_control = comparison_figure(tmp_path / "with.png", stacks, truth=truth)
    without = comparison_figure(tmp_path / "without.png", {m: stacks[m] for m in ("smsdl", "bicubic", "cnn")},
                                truth=truth)
    assert Image.open(with_control).size[0] > Image.open(without).size[0]  # one more column each side
