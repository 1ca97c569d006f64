"""Registration core: coordinate contract, landmarks, stages, quality report, save/load, resampling."""

from __future__ import annotations

import json

import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")

from napari_smsdl.errors import Cancelled, InputError, RegistrationError  # noqa: E402
from napari_smsdl.registration import (  # noqa: E402
    FixedFeature,
    FovFit,
    GridSpec,
    LandmarkPairs,
    MovingFeature,
    RegistrationParams,
    affine_to_napari_matrix,
    compose,
    fit_landmark_affine,
    fixed_feature_image,
    load_params,
    load_report,
    load_transform,
    rc_to_xy_um,
    read_landmarks_csv,
    register,
    resample_moving_to_grid,
    same_field_of_view_transform,
    save_registration,
    super_resolution_grid,
    write_landmarks_csv,
    xy_um_to_rc,
)
from napari_smsdl.registration._quality import jacobian_determinant  # noqa: E402
from napari_smsdl.registration._synthetic import make_synthetic_pair, warp_error_msi_px  # noqa: E402

P_MSI, P_HE = 8.0, 1.0


def _affine(matrix, translation, center=(0.0, 0.0)):
    tx = sitk.AffineTransform(2)
    tx.SetMatrix(np.asarray(matrix, float).ravel().tolist())
    tx.SetTranslation(tuple(float(v) for v in translation))
    tx.SetCenter(tuple(float(v) for v in center))
    return tx


@pytest.fixture(scope="module")
def he_rgb():
    from skimage import data

    return data.immunohistochemistry()  # (512, 512, 3) uint8, real histology


@pytest.fixture(scope="module")
def pair(he_rgb):
    """A 46 x 46 MSI-like image of the H&E under a known affine + 3-pixel smooth warp, 6 noisy landmarks."""
    return make_synthetic_pair(
        he_rgb, moving_pixel_size_um=P_HE, fixed_pixel_size_um=P_MSI, seed=1, deformation_msi_px=3
    )


@pytest.fixture(scope="module")
def result(pair):
    calls = []
    res = register(
        pair.fixed_msi,
        pair.moving_rgb,
        fixed_pixel_size_um=P_MSI,
        moving_pixel_size_um=P_HE,
        landmarks=pair.landmarks,
        params=RegistrationParams(threads=2),
        progress=lambda stage, done, total: calls.append((stage, done, total)),
    )
    return res, calls


# ---- coordinates ------------------------------------------------------------------------------------


def test_rc_xy_conversion_swaps_axes_and_scales():
    rc = np.array([[2.0, 5.0], [0.0, 0.0], [-0.5, 3.25]])
    xy = rc_to_xy_um(rc, 8.0)
    np.testing.assert_allclose(xy, [[40.0, 16.0], [0.0, 0.0], [26.0, -4.0]])
    np.testing.assert_allclose(xy_um_to_rc(xy, 8.0), rc)
    np.testing.assert_allclose(rc_to_xy_um([1.0, 2.0], 3.0), [6.0, 3.0])  # single point


def test_sitk_image_physical_convention_matches_rc_to_xy():
    img = sitk.Image(7, 5, sitk.sitkFloat32)  # 5 rows, 7 cols
    img.SetSpacing((2.5, 2.5))
    for r, c in [(0, 0), (4, 6), (2, 3)]:
        np.testing.assert_allclose(img.TransformIndexToPhysicalPoint((c, r)), rc_to_xy_um([r, c], 2.5))


def test_affine_to_napari_matrix_maps_pixels_like_the_transform():
    tx = _affine([[1.1, 0.2], [-0.1, 0.9]], (12.0, -7.0), center=(30.0, 20.0))
    m = affine_to_napari_matrix(tx, 8.0, 1.0)
    rng = np.random.default_rng(0)
    rc = rng.uniform(0, 40, (10, 2))
    expect = xy_um_to_rc(np.array([tx.TransformPoint(tuple(p)) for p in rc_to_xy_um(rc, 8.0)]), 1.0)
    got = (m @ np.c_[rc, np.ones(len(rc))].T).T[:, :2]
    np.testing.assert_allclose(got, expect, atol=1e-9)
    with pytest.raises(TypeError):
        affine_to_napari_matrix(sitk.BSplineTransform(2, 3), 1.0, 1.0)


def test_super_resolution_grid_covers_the_msi_area():
    grid = super_resolution_grid((10, 9), 8.0, 4)
    assert grid.shape_rc == (40, 36)
    assert grid.pixel_size_um == 2.0
    np.testing.assert_allclose(grid.origin_rc_um, (-3.0, -3.0))  # -p/2 + p/(2F)
    centres = grid.pixel_centres_xy_um()
    # the 4 x 4 sub-pixels of MSI pixel (r, c) average to its centre (c * 8, r * 8)
    block = centres[4:8, 8:12].reshape(-1, 2).mean(axis=0)
    np.testing.assert_allclose(block, [2 * 8.0, 1 * 8.0])
    assert super_resolution_grid((3, 3), 5.0, 1) == GridSpec((3, 3), 5.0, (0.0, 0.0))


def test_same_field_of_view_maps_field_corners():
    tx = same_field_of_view_transform((40, 36), 1.0, (815, 656), 40 / 815)
    # top-left corner of the MSI field (-0.5, -0.5) -> top-left of the H&E field
    q = 40 / 815
    np.testing.assert_allclose(tx.TransformPoint((-0.5, -0.5)), (-q / 2, -q / 2), atol=1e-9)
    np.testing.assert_allclose(tx.TransformPoint((35.5, 39.5)), (656 * q - q / 2, 815 * q - q / 2), atol=1e-9)
    iso = same_field_of_view_transform((10, 20), 2.0, (100, 100), 1.0, fit=FovFit.ISOTROPIC)
    m = np.asarray(iso.GetMatrix()).reshape(2, 2)
    assert m[0, 0] == pytest.approx(m[1, 1]) and m[0, 1] == 0
    # centres still match
    np.testing.assert_allclose(iso.TransformPoint((19 / 2 * 2, 9 / 2 * 2)), (49.5, 49.5), atol=1e-9)


# ---- the transform direction contract ----------------------------------------------------------------


def test_a_field_of_view_mismatch_is_named_with_both_extents():
    from napari_smsdl.registration._stages import field_of_view_mismatch

    assert field_of_view_mismatch((124, 244), 10.0, (496, 976), 2.5) is None  # the bladder pair: the same field
    assert field_of_view_mismatch((124, 244), 10.0, (500, 900), 2.5) is None  # within 20 %
    text = field_of_view_mismatch((60, 100), 10.0, (100, 150), 2.5)  # an H&E crop a quarter the size
    assert "250 x 375 µm" in text and "600 x 1000 µm" in text and "pixel sizes" in text
    assert field_of_view_mismatch((60, 100), 10.0, (240, 400), 100.0)  # a wrong H&E pixel size


def test_landmark_affine_maps_msi_physical_to_he_physical():
    known = _affine([[1.05, 0.08], [-0.06, 0.97]], (31.0, -12.0))
    msi_rc = np.array([[3.0, 4.0], [30.0, 5.0], [8.0, 35.0], [28.0, 30.0], [15.0, 18.0]])
    he_xy = np.array([known.TransformPoint(tuple(p)) for p in rc_to_xy_um(msi_rc, P_MSI)])
    pairs = LandmarkPairs(xy_um_to_rc(he_xy, P_HE), msi_rc)
    fitted = fit_landmark_affine(rc_to_xy_um(pairs.msi_rc, P_MSI), rc_to_xy_um(pairs.he_rc, P_HE))
    for p in [(0.0, 0.0), (100.0, 250.0), (-40.0, 13.0)]:
        np.testing.assert_allclose(fitted.TransformPoint(p), known.TransformPoint(p), atol=1e-6)


def test_resampling_direction_puts_he_feature_at_the_mapped_msi_pixel():
    # a bright H&E dot; the known affine says MSI pixel (row 6, col 3) sees it
    known = _affine([[0.9, 0.1], [-0.1, 1.1]], (5.0, 2.0))
    target_xy = np.array(known.TransformPoint(tuple(rc_to_xy_um([6, 3], P_MSI))))
    he = np.zeros((120, 120, 3), np.uint8)
    r, c = np.round(xy_um_to_rc(target_xy, P_HE)).astype(int)
    he[r - 2 : r + 3, c - 2 : c + 3] = 255
    out = resample_moving_to_grid(
        he, P_HE, known, grid_shape_rc=(12, 12), grid_pixel_size_um=P_MSI, antialias=False, fill_value=0
    )
    assert out.shape == (12, 12, 3) and out.dtype == np.float32
    assert np.unravel_index(np.argmax(out[..., 0]), (12, 12)) == (6, 3)


def test_composition_applies_bspline_first_then_affine():
    affine = _affine([[2.0, 0.0], [0.0, 0.5]], (10.0, -3.0))
    ref = sitk.Image(20, 20, sitk.sitkFloat32)
    bs = sitk.BSplineTransformInitializer(ref, [2, 2], 3)
    bs.SetParameters((np.random.default_rng(0).normal(0, 1.5, len(bs.GetParameters()))).tolist())
    total = compose(affine, bs)
    for p in [(3.0, 4.0), (12.5, 7.0)]:
        expect = affine.TransformPoint(bs.TransformPoint(p))
        np.testing.assert_allclose(total.TransformPoint(p), expect, atol=1e-9)
        assert not np.allclose(total.TransformPoint(p), bs.TransformPoint(affine.TransformPoint(p)))


# ---- landmarks -----------------------------------------------------------------------------------------


def test_landmarks_csv_round_trip(tmp_path):
    pairs = LandmarkPairs([[1.5, 2.25], [100.0, 3.0], [50.0, 80.0]], [[0.1, 0.2], [10.0, 0.3], [5.0, 8.0]])
    path = write_landmarks_csv(pairs, tmp_path / "pairs.csv")
    assert path.read_text().splitlines()[0] == "he_row,he_col,msi_row,msi_col"
    back = read_landmarks_csv(path)
    np.testing.assert_array_equal(back.he_rc, pairs.he_rc)
    np.testing.assert_array_equal(back.msi_rc, pairs.msi_rc)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("a,b,c,d\n1,2,3,4\n", "lacks column"),
        ("he_row,he_col,msi_row,msi_col\n1,2,3,x\n", "line 2"),
        ("he_row,he_col,msi_row,msi_col\n1,2,3,4\n5,6,7,8\n", "2 landmark pairs"),
        ("he_row,he_col,msi_row,msi_col\n0,0,0,0\n1,1,1,2\n2,2,2,5\n", "H&E landmarks are collinear"),
    ],
)
def test_bad_landmark_csv_names_file_and_problem(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises((InputError, RegistrationError)) as info:
        read_landmarks_csv(path)
    assert message in str(info.value) and "bad.csv" in str(info.value)


def test_landmark_validation_rules():
    with pytest.raises(RegistrationError, match="unequal landmark counts: 4 H&E points but 3 MSI"):
        LandmarkPairs.from_points(np.zeros((4, 2)), np.zeros((3, 2)))
    with pytest.raises(RegistrationError, match="at least 3"):
        LandmarkPairs.from_points([[0, 0], [1, 5]], [[0, 0], [1, 5]])
    with pytest.raises(RegistrationError, match="collinear"):
        LandmarkPairs.from_points([[0, 0], [5, 5], [9, 1]], [[0, 0], [1, 1], [2, 2]])
    ok = LandmarkPairs.from_points([[0, 0], [5, 5], [9, 1]], [[0, 0], [1, 1], [2, 0]])
    assert len(ok) == 3


def test_landmark_outside_image_is_refused(pair):
    bad = LandmarkPairs(pair.landmarks.he_rc, pair.landmarks.msi_rc + [[500.0, 0.0]] + np.zeros((6, 2)))
    with pytest.raises(RegistrationError, match="landmark 0 lies outside the MSI image"):
        register(pair.fixed_msi, pair.moving_rgb, fixed_pixel_size_um=P_MSI, moving_pixel_size_um=P_HE, landmarks=bad)


def test_bad_arrays_and_pixel_sizes(pair):
    with pytest.raises(InputError, match="fixed_pixel_size_um"):
        register(pair.fixed_msi, pair.moving_rgb, fixed_pixel_size_um=0, moving_pixel_size_um=1)
    with pytest.raises(InputError, match="H&E must be"):
        register(pair.fixed_msi, pair.moving_rgb[..., 0], fixed_pixel_size_um=8, moving_pixel_size_um=1)


# ---- the full registration ---------------------------------------------------------------------------------


def test_register_beats_landmark_affine_on_held_out_points(pair, result):
    res, _ = result
    err = warp_error_msi_px(res.transform, pair.true_transform, pair.eval_msi_rc, P_MSI)
    affine_only = fit_landmark_affine(
        rc_to_xy_um(pair.landmarks.msi_rc, P_MSI), rc_to_xy_um(pair.landmarks.he_rc, P_HE)
    )
    err_affine = warp_error_msi_px(affine_only, pair.true_transform, pair.eval_msi_rc, P_MSI)
    assert np.median(err) < 0.5, np.median(err)
    assert np.percentile(err, 90) < 1.0
    assert np.median(err) < 0.6 * np.median(err_affine)
    assert res.bspline is not None and res.report["final"].endswith("B-spline")


def test_report_contract(result, pair):
    res, _ = result
    rep = json.loads(json.dumps(res.report))  # JSON-serialisable as is
    assert set(rep["loo_error_um"]) >= {"median", "p90", "max"}
    assert rep["loo_scheme"] == "leave-one-out"
    assert rep["loo_error_um"]["median"] <= rep["loo_error_um"]["p90"] <= rep["loo_error_um"]["max"]
    np.testing.assert_allclose(rep["loo_error_msi_px"]["median"], rep["loo_error_um"]["median"] / P_MSI)
    assert rep["folds_in_tissue"] == 0
    assert rep["tissue_pixels"] > 0.9 * np.isfinite(pair.fixed_msi).sum()
    assert [s["name"] for s in rep["stages"]] == ["landmark affine", "affine refinement", "B-spline"]
    bs = rep["stages"][2]
    assert bs["ran"] and bs["stop_condition"] and len(bs["iterations"]) == 2 and all(i > 1 for i in bs["iterations"])
    assert len(rep["residuals"]) == 6
    row = rep["residuals"][0]
    assert set(row) >= {"he_row", "he_col", "msi_row", "msi_col", "loo_error_um", "fit_error_um", "outlier"}
    assert rep["seconds"] > 0


def test_result_arrays(result, pair):
    res, calls = result
    rows, cols = pair.fixed_msi.shape
    assert res.jacobian.shape == (rows, cols) and res.jacobian.min() > 0
    assert res.tissue_mask.shape == (rows, cols)
    f = res.display_grid.shape_rc[0] // rows
    assert res.warped_he_rgb.shape == (rows * f, cols * f, 3) and res.warped_he_rgb.dtype == np.uint8
    assert res.checkerboard.shape == (rows * f, cols * f)
    assert res.moving_feature_warped.shape == (rows, cols)
    assert len(res.grid_lines_rc) > 4 and all(line.shape[1] == 2 for line in res.grid_lines_rc)
    # the bent grid differs from the straight one by the deformation (a few pixels at most)
    shift = max(np.abs(line - np.round(line)).max() for line in res.grid_lines_rc[:3])
    assert 0 < shift < 6
    # progress: monotone, ends at total
    done = [d for _, d, _ in calls]
    assert done == sorted(done) and calls[-1][1] == calls[-1][2]


def test_registered_moving_correlates_with_msi_better_than_start(result, pair):
    res, _ = result
    # the MSI is a non-monotonic remap of stain: compare with mutual information
    from napari_smsdl.registration._register import _mutual_information

    mask = np.isfinite(pair.fixed_msi)
    start = resample_moving_to_grid(
        pair.moving_rgb, P_HE, compose(res.affine), grid_shape_rc=pair.fixed_msi.shape, grid_pixel_size_um=P_MSI
    )
    mi_final = _mutual_information(res.fixed_feature, res.moving_feature_warped, mask, 16)
    assert mi_final > 0.2
    assert start.shape == pair.fixed_msi.shape + (3,)


def test_save_and_load(result, tmp_path):
    res, _ = result
    written = save_registration(res, tmp_path / "out", images=True)
    tx = sitk.ReadTransform(str(written["transform"]))
    for p in [(10.0, 20.0), (300.0, 100.0)]:
        np.testing.assert_allclose(tx.TransformPoint(p), res.transform.TransformPoint(p), atol=1e-6)
    np.testing.assert_allclose(
        load_transform(tmp_path / "out").TransformPoint((5.0, 5.0)), res.transform.TransformPoint((5.0, 5.0))
    )
    assert load_report(tmp_path / "out")["folds_in_tissue"] == res.report["folds_in_tissue"]
    assert load_params(tmp_path / "out") == res.params
    back = read_landmarks_csv(written["landmarks"])
    np.testing.assert_allclose(back.he_rc, res.landmarks.he_rc)
    import tifffile

    assert tifffile.imread(written["warped_he"]).shape == res.warped_he_rgb.shape
    with pytest.raises(InputError, match="transform file not found"):
        load_transform(tmp_path / "nope.tfm")


def test_guard_keeps_the_affine_when_bspline_worsens_held_out_error(he_rgb):
    # exact landmarks on a pure affine; the MSI is noise, so the image stages can only wander
    rng = np.random.default_rng(3)
    pair = make_synthetic_pair(
        he_rgb[:256, :256], seed=2, deformation_msi_px=0.0, landmark_noise_um=0.0, fixed_pixel_size_um=8.0
    )
    noise = rng.normal(size=pair.fixed_msi.shape).astype(np.float32)
    params = RegistrationParams(
        mesh_spacing_msi_px=2, bspline_iterations=60, refine_affine=False, guard_slack_msi_px=0.0, threads=2
    )
    res = register(
        noise,
        pair.moving_rgb,
        fixed_pixel_size_um=8.0,
        moving_pixel_size_um=1.0,
        landmarks=pair.landmarks,
        params=params,
    )
    bs = res.report["stages"][2]
    assert bs["ran"] and not bs["kept"]
    assert res.bspline is None and res.report["final"] == "landmark affine"
    assert any("B-spline made the held-out landmark error worse" in m for m in res.report["messages"])
    assert res.report["loo_error_um"]["max"] < 0.5  # exact landmarks: the affine alone is exact


def test_no_landmarks_starts_from_same_field_of_view(he_rgb):
    # the MSI covers the whole H&E: a block-average of its haematoxylin density
    from skimage.color import rgb2hed

    he = he_rgb[:256, :192]
    hema = rgb2hed(he)[..., 0]
    msi = hema.reshape(32, 8, 24, 8).mean(axis=(1, 3)) ** 2  # monotonic remap, 32 x 24 MSI pixels
    res = register(
        msi, he, fixed_pixel_size_um=16.0, moving_pixel_size_um=2.0, params=RegistrationParams(bspline=False)
    )
    assert res.report["loo_error_um"] is None and res.report["n_landmarks"] == 0
    assert res.report["stages"][0]["name"] == "same field of view"
    truth = same_field_of_view_transform((32, 24), 16.0, (256, 192), 2.0)
    pts = rc_to_xy_um(np.array([[4.0, 4.0], [16.0, 12.0], [28.0, 20.0]]), 16.0)
    for p in pts:
        assert (
            np.linalg.norm(np.subtract(res.transform.TransformPoint(tuple(p)), truth.TransformPoint(tuple(p))))
            < 0.5 * 16
        )


def test_cancel_raises(pair):
    with pytest.raises(Cancelled):
        register(
            pair.fixed_msi,
            pair.moving_rgb,
            fixed_pixel_size_um=P_MSI,
            moving_pixel_size_um=P_HE,
            landmarks=pair.landmarks,
            should_stop=lambda: True,
        )


def test_three_landmarks_run_without_held_out_error(pair):
    three = pair.landmarks.subset(np.array([0, 1, 2]))
    res = register(
        pair.fixed_msi,
        pair.moving_rgb,
        fixed_pixel_size_um=P_MSI,
        moving_pixel_size_um=P_HE,
        landmarks=three,
        params=RegistrationParams(refine_affine=False, bspline=False),
    )
    assert res.report["loo_error_um"] is None
    assert res.report["fit_error_um"]["max"] < 1e-6  # 3 points fit an affine exactly
    assert any("at least 4" in m for m in res.report["messages"])



def test_outlier_landmarks_are_flagged_only_when_their_error_matters(pair):
    """Exact landmarks have held-out errors of rounding size: none is an outlier; one moved by 3 MSI px is
    (six landmarks under an affine leave the others' held-out errors large too, so it may not be alone)."""
    from napari_smsdl.registration import LandmarkPairs, fit_landmark_affine
    from napari_smsdl.registration._landmarks import landmark_points_um

    fixed_xy, moving_xy = landmark_points_um(pair.landmarks, P_MSI, P_HE)
    affine = fit_landmark_affine(fixed_xy, moving_xy)
    exact_he_rc = np.array([affine.TransformPoint(tuple(x)) for x in fixed_xy])[:, ::-1] / P_HE
    kwargs = dict(fixed_pixel_size_um=P_MSI, moving_pixel_size_um=P_HE,
                  params=RegistrationParams(refine_affine=False, bspline=False))
    exact = LandmarkPairs.from_points(exact_he_rc, pair.landmarks.msi_rc)
    res = register(pair.fixed_msi, pair.moving_rgb, landmarks=exact, **kwargs)
    assert res.report["loo_error_msi_px"]["max"] < 1e-6
    assert not any(r["outlier"] for r in res.report["residuals"])
    moved = exact_he_rc.copy()
    moved[4] += 3 * P_MSI / P_HE  # 3 MSI px on each axis, in H&E pixels
    res = register(pair.fixed_msi, pair.moving_rgb, landmarks=LandmarkPairs.from_points(moved, pair.landmarks.msi_rc),
                   **kwargs)
    flagged = [r["index"] for r in res.report["residuals"] if r["outlier"]]
    assert 4 in flagged and len(flagged) < 6

# ---- features, resampling, quality maps ---------------------------------------------------------------------


def test_fixed_features_of_a_stack():
    rng = np.random.default_rng(0)
    base = rng.random((20, 30)).astype(np.float32)
    stack = np.stack([base * 3, base * 2 + 1, rng.random((20, 30)).astype(np.float32) * 0.01])
    stack[:, 4, 5] = np.nan
    tic = fixed_feature_image(stack, 10.0, FixedFeature.TIC)
    pc1 = fixed_feature_image(stack, 10.0, FixedFeature.PC1)
    ion = fixed_feature_image(stack, 10.0, FixedFeature.ION, channel=1)
    assert not tic.mask[4, 5] and tic.mask.sum() == 599
    for img in (tic, pc1, ion):
        assert np.corrcoef(img.data[img.mask], base[img.mask])[0, 1] > 0.95
    with pytest.raises(InputError, match="channel 7 out of range"):
        fixed_feature_image(stack, 10.0, FixedFeature.ION, channel=7)


def test_auto_feature_picks_by_mutual_information(pair):
    res = register(
        pair.fixed_msi,
        pair.moving_rgb,
        fixed_pixel_size_um=P_MSI,
        moving_pixel_size_um=P_HE,
        params=RegistrationParams(moving_feature=MovingFeature.AUTO, refine_affine=False, bspline=False),
    )
    cands = res.report["feature_candidates"]
    assert {c["moving"] for c in cands} == {"haematoxylin", "inverted_grey"}
    best = max(cands, key=lambda c: c["mutual_information_bits"])
    assert res.report["moving"]["feature"] == best["moving"]


def test_resample_all_channels_onto_super_resolution_grid():
    # a linear ramp H&E: resampling is exact, and sub-pixel blocks average to the MSI-grid value
    rows, cols = np.mgrid[0:200, 0:200].astype(np.float32)
    he = np.stack([rows, cols, rows + cols], axis=-1)
    known = _affine([[1.0, 0.0], [0.0, 1.0]], (20.0, 30.0))  # MSI (x, y) + (20, 30) µm = H&E (x, y)
    msi = resample_moving_to_grid(he, 1.0, known, grid_shape_rc=(10, 12), grid_pixel_size_um=8.0, antialias=False)
    grid = super_resolution_grid((10, 12), 8.0, 4)
    sr = resample_moving_to_grid(
        he,
        1.0,
        known,
        grid_shape_rc=grid.shape_rc,
        grid_pixel_size_um=grid.pixel_size_um,
        grid_origin_um=grid.origin_rc_um,
        antialias=False,
    )
    assert sr.shape == (40, 48, 3)
    np.testing.assert_allclose(msi[2, 3], [2 * 8 + 30, 3 * 8 + 20, 2 * 8 + 30 + 3 * 8 + 20], atol=1e-3)
    np.testing.assert_allclose(sr.reshape(10, 4, 12, 4, 3).mean(axis=(1, 3)), msi, atol=1e-3)
    np.testing.assert_allclose(sr[0, 0], [30 - 3, 20 - 3, 50 - 6], atol=1e-3)  # origin -p/2 + p/(2F) = -3 µm
    # anti-aliasing keeps the mean of a ramp
    aa = resample_moving_to_grid(he, 1.0, known, grid_shape_rc=(10, 12), grid_pixel_size_um=8.0)
    np.testing.assert_allclose(aa[2:8, 2:10], msi[2:8, 2:10], atol=0.6)


def test_jacobian_counts_a_fold():
    ref = sitk.Image(40, 40, sitk.sitkFloat32)
    bs = sitk.BSplineTransformInitializer(ref, [4, 4], 3)
    params = np.zeros(len(bs.GetParameters()))
    n = 7  # control points per axis
    params[3 * n + 3] = 25.0  # push one x coefficient far right, its neighbour left: the grid folds
    params[3 * n + 4] = -25.0
    bs.SetParameters(params.tolist())
    affine = _affine(np.eye(2), (0.0, 0.0))
    jac = jacobian_determinant(compose(affine, bs), affine, GridSpec((40, 40), 1.0))
    assert (jac <= 0).sum() > 0
    smooth = jacobian_determinant(compose(affine), affine, GridSpec((40, 40), 1.0))
    np.testing.assert_allclose(smooth, 1.0, atol=1e-6)


def test_params_round_trip_and_validation():
    p = RegistrationParams(moving_feature="inverted_grey", shrink_msi_px=(4, 2, 1), smoothing_msi_px=(1, 0.5, 0))
    assert p.moving_feature is MovingFeature.INVERTED_GREY
    assert RegistrationParams.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    with pytest.raises(ValueError, match="same, non-zero number of levels"):
        RegistrationParams(shrink_msi_px=(2, 1), smoothing_msi_px=(0,))
