"""The Register widget, driven with make_napari_viewer + qtbot on a synthetic pair with a known warp."""

from __future__ import annotations

import numpy as np
import pytest

from napari_smsdl.errors import RegistrationError
from napari_smsdl.registration import write_landmarks_csv
from napari_smsdl.registration._synthetic import make_synthetic_pair, warp_error_msi_px
from napari_smsdl.widgets.register import HE_POINTS, METADATA_KEY, MSI_POINTS, PREFIX, RegisterWidget

pytestmark = pytest.mark.gui

TIMEOUT_MS = 60_000
P_MSI, P_HE = 8.0, 1.0


@pytest.fixture(scope="module")
def pair():
    from skimage import data

    he = data.immunohistochemistry()[64:448, 64:448]
    return make_synthetic_pair(he, moving_pixel_size_um=P_HE, fixed_pixel_size_um=P_MSI, seed=5, deformation_msi_px=2.0)


@pytest.fixture
def widget(make_napari_viewer, qtbot, pair):
    viewer = make_napari_viewer()
    # the Load widget's convention: scale = pixel size, translate = half a pixel (field corner at 0 µm)
    viewer.add_image(pair.moving_rgb, name="he (H&E)", rgb=True, scale=(P_HE, P_HE), translate=(P_HE / 2, P_HE / 2))
    viewer.add_image(pair.fixed_msi, name="msi (MSI)", scale=(P_MSI, P_MSI), translate=(P_MSI / 2, P_MSI / 2))
    w = RegisterWidget(viewer)
    qtbot.addWidget(w)
    return w


def _wait(qtbot, w):
    qtbot.waitUntil(lambda: not w.busy, timeout=TIMEOUT_MS)


def test_layers_and_pixel_sizes_are_picked_up(widget):
    assert widget.he_layer.value.name == "he (H&E)" and widget.msi_layer.value.name == "msi (MSI)"
    assert widget.he_pixel_size.value == P_HE and widget.msi_pixel_size.value == P_MSI
    assert not widget.msi_feature.enabled  # a single-channel MSI has no feature choice
    assert widget.run_button.enabled and not widget.cancel_button.enabled and not widget.accept_button.enabled


def test_landmark_layers_are_numbered_and_paired(widget, pair):
    he_pts, msi_pts = widget.add_landmark_layers()
    assert he_pts.name == HE_POINTS and msi_pts.name == MSI_POINTS
    np.testing.assert_allclose(he_pts.scale, [P_HE, P_HE])
    np.testing.assert_allclose(msi_pts.scale, [P_MSI, P_MSI])
    he_pts.add(pair.landmarks.he_rc[:3])
    assert list(he_pts.features["label"]) == [1, 2, 3]
    assert list(he_pts.text.values) == ["1", "2", "3"]
    msi_pts.add(pair.landmarks.msi_rc[:2])
    with pytest.raises(RegistrationError, match="unequal landmark counts: 3 H&E points but 2 MSI points"):
        widget.landmarks()
    msi_pts.add(pair.landmarks.msi_rc[2:3])
    lm = widget.landmarks()
    np.testing.assert_allclose(lm.he_rc, pair.landmarks.he_rc[:3])


def test_side_by_side_and_overlaid(widget):
    he = widget.he_layer.value
    widget.add_landmark_layers()  # arranges side by side (the default)
    msi_right = widget.msi_layer.value.extent.world[1, -1] + P_MSI / 2
    he_left = he.extent.world[0, -1] - P_HE / 2
    assert he_left > msi_right
    np.testing.assert_allclose(widget.viewer.layers[HE_POINTS].translate, he.translate)
    widget.side_by_side.value = False
    np.testing.assert_allclose(he.translate, [P_HE / 2, P_HE / 2])
    np.testing.assert_allclose(widget.viewer.layers[HE_POINTS].translate, he.translate)


def test_run_shows_layers_table_and_accept_save_revert(widget, qtbot, pair, tmp_path):
    path = write_landmarks_csv(pair.landmarks, tmp_path / "pairs.csv")
    assert len(widget.load_landmarks(path)) == 6
    worker = widget.run()
    assert worker is not None and widget.busy and not widget.run_button.enabled and widget.cancel_button.enabled
    _wait(qtbot, widget)
    assert widget.last_error is None, widget.last_error
    res = widget.result
    err = warp_error_msi_px(res.transform, pair.true_transform, pair.eval_msi_rc, P_MSI)
    assert np.median(err) < 0.5
    names = [layer.name for layer in widget.viewer.layers]
    for suffix in ("warped H&E", "checkerboard", "Jacobian", "deformation grid"):
        assert PREFIX + suffix in names
    warped = widget.viewer.layers[PREFIX + "warped H&E"]
    msi = widget.msi_layer.value
    # the warped H&E covers exactly the MSI field in world µm
    g = warped.scale[0]
    np.testing.assert_allclose(warped.extent.world[0] - g / 2, msi.extent.world[0] - P_MSI / 2, atol=1e-6)
    np.testing.assert_allclose(warped.extent.world[1] + g / 2, msi.extent.world[1] + P_MSI / 2, atol=1e-6)
    assert warped.opacity == pytest.approx(0.6)
    widget.opacity.value = 0.3
    assert warped.opacity == pytest.approx(0.3)
    grid = widget.viewer.layers[PREFIX + "deformation grid"]
    assert grid.nshapes == len(res.grid_lines_rc) and set(grid.shape_type) == {"path"}
    jac = widget.viewer.layers[PREFIX + "Jacobian"]
    assert jac.data.shape == pair.fixed_msi.shape and jac.data.min() > 0
    # residual table
    assert widget.table.rowCount() == 6
    loo = [float(widget.table.item(i, 5).text()) for i in range(6)]
    np.testing.assert_allclose(loo, [r["loo_error_msi_px"] for r in res.residuals], atol=0.006)
    assert "held-out error median" in widget.status.value
    # confidence, misregistration map and each stage's decision
    rep = res.report
    assert rep["confidence_msi_px"] is not None and f"Confidence {rep['confidence_msi_px']:.2f}" in widget.status.value
    mis = widget.viewer.layers[PREFIX + "misregistration"]
    assert mis.data.shape == pair.fixed_msi.shape and mis.metadata["unit"] == "MSI px"
    np.testing.assert_allclose(mis.scale, msi.scale)
    lines = widget.stages_label.value.splitlines()
    assert [ln.split(":")[0] for ln in lines] == [s["name"] for s in rep["stages"]]
    assert all(("kept" in ln) or ("rejected" in ln) or ("not run" in ln) for ln in lines)
    # accept: stored for the next steps
    assert widget.accept_button.enabled
    widget.accept()
    stored = msi.metadata[METADATA_KEY]
    assert stored["transform"] is res.transform and stored["report"]["folds_in_tissue"] == 0
    assert not widget.accept_button.enabled
    written = widget.save(tmp_path / "out")
    assert (tmp_path / "out" / "transform.tfm").exists() and "report" in written
    widget.revert()
    assert widget.result is None and widget.accepted is None and METADATA_KEY not in msi.metadata
    assert not any(layer.name.startswith(PREFIX) for layer in widget.viewer.layers)


def test_no_landmarks_runs_synchronously(widget, monkeypatch):
    monkeypatch.setenv("SMSDL_NOTHREADS", "1")
    widget.bspline.value = False
    assert widget.run() is None  # synchronous
    assert widget.last_error is None and not widget.busy
    assert widget.result.report["stages"][0]["name"] == "same field of view"
    assert widget.table.rowCount() == 0 and "no held-out error" in widget.status.value
    assert "B-spline: not run" in widget.stages_label.value


def test_errors_are_shown_not_raised(widget, pair, tmp_path):
    he_pts, msi_pts = widget.add_landmark_layers()
    he_pts.data = pair.landmarks.he_rc[:4]
    msi_pts.data = pair.landmarks.msi_rc[:3]
    assert widget.run() is None
    assert "unequal landmark counts" in widget.last_error and not widget.busy
    bad = tmp_path / "bad.csv"
    bad.write_text("x,y\n1,2\n")
    assert widget.load_landmarks(bad) is None and "lacks column" in widget.last_error
    assert widget.save(tmp_path / "o") is None and "run a registration first" in widget.last_error


def test_cancel(widget, qtbot, pair):
    he_pts, msi_pts = widget.add_landmark_layers()
    he_pts.data, msi_pts.data = pair.landmarks.he_rc, pair.landmarks.msi_rc
    assert widget.run() is not None
    widget.cancel()
    _wait(qtbot, widget)
    assert widget.last_error == "cancelled" and widget.result is None
    assert widget.run_button.enabled
