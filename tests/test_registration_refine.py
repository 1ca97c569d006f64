"""Without landmarks: the same-field-of-view start is MI-refined only when that clearly helps."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_smsdl.evaluation import degrade
from napari_smsdl.registration import refine_same_field_of_view


def _shift_he(he: np.ndarray, d: int) -> np.ndarray:
    """The H&E content moved down by d and left by d pixels, white where nothing was."""
    out = np.full_like(he, 255)
    out[d:, : he.shape[1] - d] = he[: he.shape[0] - d, d:]
    return out


@pytest.fixture(scope="module")
def sample_lr():
    from napari_smsdl.sample import make_sample

    s = make_sample()
    lr, mask_lr = degrade(np.where(s.mask_hr, s.ground_truth, 0), s.mask_hr, s.factor)
    return s, np.where(mask_lr[None], lr, np.nan)


def test_aligned_he_keeps_the_start(sample_lr):
    s, lr = sample_lr
    decision = refine_same_field_of_view(lr, s.he_rgb, fixed_pixel_size_um=s.msi_pixel_size_um,
                                         moving_pixel_size_um=s.he_pixel_size_um)
    assert not decision.accepted
    assert "below the bar" in decision.reason
    assert decision.mi_refined_bits < decision.mi_start_bits + 0.1


def test_shifted_he_is_refined_back(sample_lr):
    s, lr = sample_lr
    d = int(round(s.msi_pixel_size_um / s.he_pixel_size_um))  # one MSI pixel down and one left: 1.41 px
    decision = refine_same_field_of_view(lr, _shift_he(s.he_rgb, d), fixed_pixel_size_um=s.msi_pixel_size_um,
                                         moving_pixel_size_um=s.he_pixel_size_um)
    assert decision.accepted, decision.reason
    assert decision.mi_refined_bits > 2 * decision.mi_start_bits
    assert abs(decision.mean_shift_msi_px - np.sqrt(2)) < 0.35  # it found the shift that was made
    # the refined transform sends an MSI point to where its tissue now lies in the H&E: one MSI pixel
    # (d H&E pixels, 40 µm) left and down of where the start sends it (the two fields have equal size)
    from napari_smsdl.registration import same_field_of_view_transform

    start = same_field_of_view_transform(lr.shape[1:], s.msi_pixel_size_um, s.he_rgb.shape[:2], s.he_pixel_size_um)
    point = (16 * s.msi_pixel_size_um, 16 * s.msi_pixel_size_um)
    moved = np.subtract(decision.transform.TransformPoint(point), start.TransformPoint(point))
    np.testing.assert_allclose(moved, [-d * s.he_pixel_size_um, d * s.he_pixel_size_um], atol=0.3 * s.msi_pixel_size_um)
    assert json.dumps(decision.to_dict())  # reportable as JSON


def test_too_few_pixels_are_not_judged(sample_lr):
    s, lr = sample_lr
    small = lr[:, :12, :12]
    decision = refine_same_field_of_view(small, s.he_rgb[: 12 * 16, : 12 * 16], fixed_pixel_size_um=s.msi_pixel_size_um,
                                         moving_pixel_size_um=s.he_pixel_size_um)
    assert not decision.accepted and "too few" in decision.reason


def test_benchmark_reports_the_decision(sample_lr, tmp_path):
    from skimage import io

    from napari_smsdl.cli import main

    s, _ = sample_lr
    d = int(round(s.msi_pixel_size_um / s.he_pixel_size_um))
    io.imsave(tmp_path / "he.png", _shift_he(s.he_rgb, d), check_contrast=False)
    np.save(tmp_path / "truth.npy", np.where(s.mask_hr, s.ground_truth, 0).astype(np.float32))
    argv = ["benchmark", "--he", str(tmp_path / "he.png"), "--msi", str(tmp_path / "truth.npy"), "--factor", "4",
            "--methods", "smsdl", "--fast", "--ssl-steps", "2", "--regression-steps", "10", "-o", str(tmp_path / "out")]
    assert main(argv) == 0
    reg = json.loads((tmp_path / "out" / "metrics.json").read_text())["settings"]["registration"]
    assert reg["refinement"] == "accepted"
    assert main([*argv[:-1], str(tmp_path / "out2"), "--no-refine"]) == 0
    reg = json.loads((tmp_path / "out2" / "metrics.json").read_text())["settings"]["registration"]
    assert reg["refinement"] == "not run"
    bicubic_only = [a if a != "smsdl" else "bicubic" for a in argv[:-1]] + [str(tmp_path / "out3")]
    assert main(bicubic_only) == 0  # bicubic never looks at the H&E: nothing to refine
    reg = json.loads((tmp_path / "out3" / "metrics.json").read_text())["settings"]["registration"]
    assert reg["refinement"] == "not run"


def test_a_failed_refinement_keeps_the_start(sample_lr):
    """A blank H&E gives the optimiser nothing to work on: the optional step must not abort the run."""
    s, lr = sample_lr
    blank = np.full_like(s.he_rgb, 255)
    decision = refine_same_field_of_view(lr, blank, fixed_pixel_size_um=s.msi_pixel_size_um,
                                         moving_pixel_size_um=s.he_pixel_size_um)
    assert not decision.accepted
    assert decision.transform is not None and ("failed" in decision.reason or "below the bar" in decision.reason)
