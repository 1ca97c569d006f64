"""Many-channel registration: determinism (bit-identical files), the channel criterion, the sweep,
the misregistration map and confidence, and (with ../shared) a warped real optical/ion pair."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")

from napari_smsdl.registration import RegistrationParams, register, save_registration  # noqa: E402
from napari_smsdl.registration._synthetic import make_synthetic_pair  # noqa: E402

P_MSI, P_HE = 8.0, 1.0
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mouse-bladder-dev"


@pytest.fixture(scope="module")
def stack_pair():
    """A synthetic pair whose MSI is a 4-channel stack (different remaps of the same tissue signal)."""
    from skimage import data

    he = data.immunohistochemistry()[:384, :384]
    pair = make_synthetic_pair(he, moving_pixel_size_um=P_HE, fixed_pixel_size_um=P_MSI, seed=3, deformation_msi_px=1.0)
    base = np.nan_to_num(pair.fixed_msi, nan=np.nanmean(pair.fixed_msi))
    rng = np.random.default_rng(0)
    chans = [base, base**2, np.sqrt(np.abs(base)), 1.0 - base]
    stack = np.stack([c + rng.normal(0, 0.02, c.shape) for c in chans]).astype(np.float32)
    return pair, stack


def _strip_timings(obj):
    if isinstance(obj, dict):
        return {k: _strip_timings(v) for k, v in obj.items() if k != "seconds"}
    if isinstance(obj, list):
        return [_strip_timings(v) for v in obj]
    return obj


@pytest.mark.parametrize("landmarks", [True, False])
def test_same_inputs_give_bit_identical_files_whatever_the_threads(stack_pair, tmp_path, landmarks):
    pair, stack = stack_pair
    outs = []
    for i, threads in enumerate((1, 2)):
        res = register(
            stack,
            pair.moving_rgb,
            fixed_pixel_size_um=P_MSI,
            moving_pixel_size_um=P_HE,
            landmarks=pair.landmarks if landmarks else None,
            params=RegistrationParams(threads=threads, sweep_mirror=False),
        )
        save_registration(res, tmp_path / str(i))
        outs.append(tmp_path / str(i))
    a, b = outs
    assert (a / "transform.tfm").read_bytes() == (b / "transform.tfm").read_bytes()
    ra = _strip_timings(json.loads((a / "report.json").read_text()))
    rb = _strip_timings(json.loads((b / "report.json").read_text()))
    ra["params"].pop("threads"), rb["params"].pop("threads")
    assert ra == rb
    assert (a / "misregistration.npy").exists() == (b / "misregistration.npy").exists()
    if (a / "misregistration.npy").exists():
        assert np.array_equal(np.load(a / "misregistration.npy"), np.load(b / "misregistration.npy"), equal_nan=True)


def test_mattes_path_is_deterministic_too(stack_pair):
    pair, _ = stack_pair
    runs = [
        register(
            pair.fixed_msi,
            pair.moving_rgb,
            fixed_pixel_size_um=P_MSI,
            moving_pixel_size_um=P_HE,
            landmarks=pair.landmarks,
            params=RegistrationParams(threads=t, bspline_iterations=5),
        ).transform
        for t in (1, 2)
    ]
    assert runs[0].GetParameters() == runs[1].GetParameters()
    assert runs[0].GetNthTransform(0).GetParameters() == runs[1].GetNthTransform(0).GetParameters()


def test_channel_criterion_report_and_accuracy(stack_pair):
    from napari_smsdl.registration._synthetic import warp_error_msi_px

    pair, stack = stack_pair
    res = register(
        stack,
        pair.moving_rgb,
        fixed_pixel_size_um=P_MSI,
        moving_pixel_size_um=P_HE,
        landmarks=pair.landmarks,
        params=RegistrationParams(sweep_mirror=False),
    )
    rep = res.report
    assert rep["criterion"] == "channels"
    assert [s["name"] for s in rep["stages"]] == ["landmark affine", "affine refinement", "B-spline"]
    ref = rep["stages"][1]
    assert ref["criterion"] == "channel regression"
    assert ref["channel_score"]["after"]["cv_r2"] >= ref["channel_score"]["before"]["cv_r2"] - 1e-6
    assert "heldout_channel_r2" in rep["stages"][2]
    assert rep["confidence_msi_px"] is not None and rep["confidence_msi_px"] > 0
    assert set(rep["misregistration_msi_px"]) == {"median", "p90"}
    assert res.misregistration.shape == stack.shape[1:]
    err = warp_error_msi_px(res.transform, pair.true_transform, pair.eval_msi_rc, P_MSI)
    assert np.median(err) < 1.0


def test_sweep_finds_a_rotated_start_without_landmarks(stack_pair):
    # a 34 x 34 MSI field inside a larger H&E, rotated and scaled: the sweep must find where it lies
    from napari_smsdl.registration._synthetic import warp_error_msi_px

    pair, stack = stack_pair
    res = register(
        stack,
        pair.moving_rgb,
        fixed_pixel_size_um=P_MSI,
        moving_pixel_size_um=P_HE,
        params=RegistrationParams(bspline=False, sweep_mirror=False),
    )
    rep = res.report
    assert rep["stages"][0]["name"] == "rotation/scale sweep"
    sweep = rep["start_sweep"]
    assert sweep["n_candidates"] > 10 and len(sweep["refined"]) == 3
    assert sweep["chosen"] in [{k: r[k] for k in sweep["chosen"]} for r in sweep["refined"]]
    assert rep["loo_error_um"] is None
    err = warp_error_msi_px(res.transform, pair.true_transform, pair.eval_msi_rc, P_MSI)
    assert np.median(err) < 1.0


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/data/mouse-bladder-dev is absent")
def test_warped_real_pair_registers_back_from_the_ion_images():
    from skimage import io

    from napari_smsdl.registration._warped import warp_aligned_pair

    ions = np.load(SHARED / "ions.npy")
    optical = io.imread(SHARED / "optical.png")[..., :3]
    case = warp_aligned_pair(
        optical, 2.5, ions.shape[1:], 10.0, offset_um=3.75, rotation_deg=5.0, scale=1.03,
        shift_msi_px=(3.0, -2.0), crop=(0.0, 1.0, 0.08, 1.0), pixel_size_um=3.0,
    )
    res = register(
        ions, case.moving_rgb, fixed_pixel_size_um=10.0, moving_pixel_size_um=case.moving_pixel_size_um,
        params=RegistrationParams(bspline=False, sweep_mirror=False),
    )
    pts = np.argwhere(np.ones(ions.shape[1:], bool))[::53].astype(float)
    err = case.errors_msi_px(res.transform, pts)
    assert np.median(err) < 1.0 and np.percentile(err, 90) < 2.0
    assert res.report["folds_in_tissue"] == 0


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/data/mouse-bladder-dev is absent")
def test_large_single_channel_msi_with_landmarks_uses_the_channel_stages():
    from skimage import io

    from napari_smsdl.registration._warped import warp_aligned_pair

    ions = np.load(SHARED / "ions.npy")
    optical = io.imread(SHARED / "optical.png")[..., :3]
    case = warp_aligned_pair(optical, 2.5, ions.shape[1:], 10.0, offset_um=3.75, rotation_deg=-4.0, scale=0.97,
                             shift_msi_px=(2.0, 3.0), pixel_size_um=3.0, seed=1)
    res = register(ions.sum(axis=0), case.moving_rgb, fixed_pixel_size_um=10.0,
                   moving_pixel_size_um=case.moving_pixel_size_um, landmarks=case.landmarks)
    rep = res.report
    assert rep["criterion"] == "channels" and rep["loo_scheme"] == "leave-one-out"
    pts = np.argwhere(np.ones(ions.shape[1:], bool))[::53].astype(float)
    assert np.median(case.errors_msi_px(res.transform, pts)) < 0.6
    assert 0 < rep["confidence_msi_px"] < 1.0
