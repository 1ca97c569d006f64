"""Conventions of the channel criterion, checked where the truth is exact: ion images made from the
optical image through the exact MSI footprint (MSI pixel (r, c) = mean of optical rows 4r…4r+3, columns
4c…4c+3, then the spot blur). A pixel-centre/corner slip anywhere in the forward model, the sampling or
the resampling would move the criterion's optimum by 0.375–0.5 MSI px; here it must stay at the truth."""

from __future__ import annotations

import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")

from napari_smsdl.registration import (
    RegistrationParams,
    fit_landmark_affine,
    rc_to_xy_um,
    register,
)
from napari_smsdl.registration._channel_fit import LinearMap
from napari_smsdl.registration._channel_stages import ChannelContext

P_MSI, P_OPT, OFFSET = 10.0, 2.5, 3.75  # MSI pixel centre (0, 0) ↔ optical physical (3.75, 3.75) µm


@pytest.fixture(scope="module")
def exact_pair():
    from scipy.ndimage import gaussian_filter
    from skimage import data

    optical = data.immunohistochemistry()[:448, :480]
    rgb = optical.astype(float) / 255.0
    od = -np.log(np.clip(rgb, 1 / 255, 1))
    feats = [od[..., 0], od[..., 1], od[..., 2], od[..., 0] * od[..., 2], (rgb.mean(-1) > 0.85).astype(float)]
    rows, cols = optical.shape[0] // 4, optical.shape[1] // 4
    boxes = np.stack([f[: 4 * rows, : 4 * cols].reshape(rows, 4, cols, 4).mean(axis=(1, 3)) for f in feats])
    rng = np.random.default_rng(0)
    ions = []
    for _ in range(12):
        im = gaussian_filter(np.tensordot(rng.normal(size=len(feats)), boxes, 1), 0.35)
        im = (im - im.mean()) / im.std()
        ions.append(im + 0.3 * rng.normal(size=im.shape))
    return optical, np.array(ions, np.float32)


def _field_error_px(ctx, lin, truth):
    pts = ctx.problem.xy
    return np.linalg.norm(lin.apply(pts) - truth.apply(pts), axis=1) / P_MSI


@pytest.mark.parametrize("model", ["translation", "similarity", "affine"])
def test_criterion_optimum_is_the_exact_alignment(exact_pair, model):
    optical, ions = exact_pair
    ctx = ChannelContext(ions, optical, P_MSI, P_OPT, 1.0)
    truth = LinearMap(np.eye(2), np.array([OFFSET, OFFSET]))
    # started half a pixel off (the size of a centre/corner slip), it must come back to the truth
    start = LinearMap(np.eye(2), truth.offset + np.array([0.5, 0.375]) * P_MSI)
    lin = ctx.problem.fit_affine(start, model=model, levels=(1.0, 0.5), max_iter=30)
    err = _field_error_px(ctx, lin, truth)
    assert err.max() < 0.05, (model, float(err.max()))


def test_joint_fit_beats_the_landmark_affine_where_the_channels_are_right(exact_pair):
    from napari_smsdl.registration._warped import warp_aligned_pair

    optical, ions = exact_pair
    case = warp_aligned_pair(optical, P_OPT, ions.shape[1:], P_MSI, offset_um=OFFSET, rotation_deg=4.0, scale=1.03,
                             shift_msi_px=(2.0, -1.0), pixel_size_um=3.0, landmark_noise_px=1.5, seed=2)
    lm = case.landmarks
    la = fit_landmark_affine(rc_to_xy_um(lm.msi_rc, P_MSI), rc_to_xy_um(lm.he_rc, case.moving_pixel_size_um))
    res = register(ions, case.moving_rgb, fixed_pixel_size_um=P_MSI, moving_pixel_size_um=case.moving_pixel_size_um,
                   landmarks=lm, params=RegistrationParams(bspline=False))
    pts = np.argwhere(np.ones(ions.shape[1:], bool))[::7].astype(float)
    e_la, e = case.errors_msi_px(la, pts), case.errors_msi_px(res.transform, pts)
    stage = res.report["stages"][1]
    assert stage["name"] == "affine refinement" and stage["kept"], stage["reason"]
    assert stage["model"] == "affine, joint with the landmarks"
    assert np.median(e) < 0.1 < np.median(e_la), (float(np.median(e)), float(np.median(e_la)))


def test_robust_refinement_follows_the_bulk_when_one_band_is_displaced(exact_pair):
    # the top quarter of the MSI rows acquired 3 px to the side (a shifted or torn strip): the reweighted
    # fit keeps the rest at the truth, where the plain least-squares fit bends rotation and shift towards it
    optical, ions = exact_pair
    band = ions.shape[1] // 4
    moved = ions.copy()
    moved[:, :band] = np.roll(ions[:, :band], 3, axis=2)
    ctx = ChannelContext(moved, optical, P_MSI, P_OPT, 1.0)
    truth = LinearMap(np.eye(2), np.array([OFFSET, OFFSET]))
    start = LinearMap(np.eye(2), truth.offset + np.array([0.5, 0.375]) * P_MSI).to_sitk(ctx.centre_xy)
    bulk = ctx.problem.rows >= band + 2
    errors, infos = {}, {}
    for passes in (0, 2):
        tx, infos[passes] = ctx.refine_affine(start, model="similarity", robust_passes=passes)
        err = _field_error_px(ctx, LinearMap.from_sitk(tx), truth)
        errors[passes] = float(np.median(err[bulk]))
    assert infos[0]["robust"] is None and len(infos[2]["robust"]["passes"]) == 2
    assert infos[2]["robust"]["passes"][-1]["patches_below_half_weight"] >= 8  # the band's 16 patches, about
    assert errors[2] < 0.1 and errors[2] < 0.5 * errors[0], errors
