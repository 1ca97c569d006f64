"""The napari workflow end to end, driven through the widgets on the built-in sample.

Train (fast preset, shrunk further, on a 16 × 16 crop of the sample so the suite stays short) → Compare (layers in µm, linked limits,
grid, differences, metrics against the sample's ground truth, pixel values, segments) → Export (read
back) → project saved, viewer closed, project reopened with identical layers; cancel mid-training.
"""

from __future__ import annotations

import csv
import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile

from napari_smsdl.features import FeatureParams
from napari_smsdl.io import tissue_mask
from napari_smsdl.project import LAYER_METADATA_KEY
from napari_smsdl.reconstruction import RegressionParams, Settings
from napari_smsdl.widgets.compare import GUIDE_NAME, LABELS_NAME, PREFIX, CompareWidget
from napari_smsdl.widgets.export import ExportWidget
from napari_smsdl.widgets.train import FeatureSource, TrainWidget

pytestmark = pytest.mark.gui

TINY = dataclasses.replace(
    Settings.preset("fast", factor=4),
    features=FeatureParams(embed_dim=32, depth=1, num_heads=2, ssl_steps=5, ssl_batch=4, shifts=1),
    regression=RegressionParams(hidden=32, steps=30, folds=2, pca_dims=8),
    cnn_iterations=3,
)
MSI = "sample MSI (40 µm)"
TRUTH = "sample ground truth (10 µm)"
TIMEOUT_MS = 120_000
R0, C0, N = 16, 8, 16  # the crop of the sample, in MSI pixels (40 µm): 16 × 16, two never acquired


def crop_sample_layers():
    """The sample's layers (as File ▸ Open Sample gives them) cropped to N × N MSI pixels, in place."""
    from napari_smsdl._sample_data import smsdl_sample

    layers = []
    for data, kwargs, kind in smsdl_sample():
        size = float(kwargs["scale"][-1])
        per_msi = 40.0 / size
        rows = slice(int(R0 * per_msi), int((R0 + N) * per_msi))
        cols = slice(int(C0 * per_msi), int((C0 + N) * per_msi))
        data = data[rows, cols] if kwargs.get("rgb") else data[..., rows, cols]
        translate = list(kwargs["translate"])
        translate[-2] += R0 * 40.0
        translate[-1] += C0 * 40.0
        layers.append((data, dict(kwargs, translate=tuple(translate)), kind))
    return layers


@pytest.fixture
def sample_viewer(make_napari_viewer):
    from napari.layers import Layer

    viewer = make_napari_viewer()
    for data, kwargs, kind in crop_sample_layers():
        viewer.add_layer(Layer.create(data, kwargs, kind))
    return viewer


def _wait(qtbot, widget, timeout=TIMEOUT_MS):
    qtbot.waitUntil(lambda: not widget.busy, timeout=timeout)


def _compare_data(viewer) -> dict:
    return {lay.name: np.asarray(lay.data) for lay in viewer.layers
            if lay.name.startswith(PREFIX) and lay.metadata.get("role") in ("comparison", "guide")}


def test_train_compare_export_and_reopen_the_project(sample_viewer, make_napari_viewer, qtbot, tmp_path):
    from napari_smsdl.evaluation import score_stack
    from napari_smsdl.io import open_imzml
    from napari_smsdl.sample import make_sample

    viewer = sample_viewer
    train, compare, export = TrainWidget(viewer), CompareWidget(viewer), ExportWidget(viewer)
    for w in (train, compare, export):
        qtbot.addWidget(w)
    assert train.he_layer.value.name == "sample H&E" and train.msi_layer.value.name == MSI
    assert train.channels.value == [0, 1, 2, 3, 4] and train.factor.value == 4  # from the sample's metadata
    assert compare.truth.value is viewer.layers[TRUTH]  # the sample's ground truth is found by its metadata

    # ---- Train: two channels, all four methods (the H&E-free control included), on a worker
    train.channels.value = [0, 4]
    worker = train.start(TINY, cache_dir=tmp_path / "cache")
    assert worker is not None and train.busy
    assert not train.start_button.enabled and train.cancel_button.enabled
    _wait(qtbot, train)
    assert train.last_error is None, train.last_error
    project = train.project
    assert set(project.sr) == {"smsdl", "bicubic", "backprojection", "cnn"}
    # SMSDL's uncertainty came back as a (hidden) layer on the SR grid; the status names the fallbacks
    assert project.uncertainty["smsdl"].shape == project.sr["smsdl"].shape
    spread = viewer.layers["uncertainty (SMSDL)"]
    assert spread is train.uncertainty_layer and not spread.visible and spread.metadata["role"] == "uncertainty"
    np.testing.assert_array_equal(spread.data, project.uncertainty["smsdl"])
    used = project.guidance["smsdl"]["used_histology"]
    assert len(used) == 2 and f"SMSDL used the H&E on {sum(used)} of 2 channels" in train.status.value
    for c, u in enumerate(used):
        assert (f"m/z {project.mz[c]:.4f}" in train.status.value.split("fell back")[-1]) == (not u)
    assert spread not in [v for _, v in train._msi_layers()]  # never offered as an MSI to train on
    assert all(s.shape == (2, 4 * N, 4 * N) for s in project.sr.values())
    assert project.mz == pytest.approx((734.5694, 885.5499)) and project.sr_pixel_size_um == 10.0
    assert len(train.plot.steps) >= 3  # the live loss curve got points while training ran
    assert train.start_button.enabled and not train.cancel_button.enabled

    # ---- Compare followed by itself and scored against the sample's ground truth
    shown = compare.project
    assert shown is not None and shown.sr is project.sr and shown.metrics is not None
    sample = make_sample()
    crop_hr = (slice(4 * R0, 4 * (R0 + N)), slice(4 * C0, 4 * (C0 + N)))
    truth = sample.ground_truth[:, crop_hr[0], crop_hr[1]]
    # scored where the truth layer says tissue (napari_smsdl.io.tissue_mask: the sample's one- and
    # two-pixel zero holes count as measured zeros, as they would in a real acquisition)
    expected = score_stack(truth[[0, 4]], project.sr["smsdl"], tissue_mask(truth[[0, 4]]))
    assert shown.metrics["smsdl"]["ssim"]["per_channel"] == pytest.approx(expected["ssim"]["per_channel"])
    assert compare.metrics_table.rowCount() == 4 * (2 + 1)  # 4 methods × (2 channels + mean)
    table = compare.metrics_table
    headers = [table.horizontalHeaderItem(j).text() for j in range(table.columnCount())]
    assert headers[-2:] == ["histology gain", "H&E used"]
    cells = [[table.item(i, j).text() for j in range(table.columnCount())] for i in range(table.rowCount())]
    gain = project.guidance["smsdl"]
    assert cells[0][:2] == ["SMSDL", "m/z 734.5694"]
    assert cells[0][-2:] == [f"{gain['gain'][0]:.3g} ± {gain['gain_std'][0]:.2g}",
                             "yes" if gain["used_histology"][0] else "no (control)"]
    assert cells[2][-1] == f"{sum(gain['used_histology'])}/2"  # SMSDL's mean row
    assert [r[0] for r in cells[6:9]] == ["BI + back-projection (H&E-free)"] * 3 and cells[6][-2:] == ["—", "—"]
    assert viewer.layers[MSI].metadata[LAYER_METADATA_KEY] is shown  # what Export will save
    row = compare.rows[0]
    assert [lay.name for lay in row] == [f"{PREFIX}{m} · m/z 734.5694" for m in
                                         ("LR", "ground truth", "SMSDL", "BI", "BI + back-projection (H&E-free)", "CNN")]
    smsdl = viewer.layers[f"{PREFIX}SMSDL · m/z 734.5694"]
    np.testing.assert_allclose(smsdl.scale[-2:], (10.0, 10.0))
    np.testing.assert_allclose(spread.scale[-2:], smsdl.scale[-2:])  # the uncertainty sits on the SMSDL grid
    np.testing.assert_allclose(spread.translate[-2:], smsdl.translate[-2:])
    assert spread not in [v for _, v in compare._truth_choices()]  # nor as a ground truth
    # SR pixel corners on the MSI's: the MSI (40 µm) starts at (640, 320) µm, its pixel centres 20 µm in
    np.testing.assert_allclose(smsdl.translate[-2:], (R0 * 40.0 + 5.0, C0 * 40.0 + 5.0))
    np.testing.assert_array_equal(smsdl.data, project.sr["smsdl"][0])
    np.testing.assert_allclose(viewer.layers[f"{PREFIX}LR · m/z 734.5694"].scale[-2:], (40.0, 40.0))
    guide = viewer.layers[GUIDE_NAME]
    k = guide.data.shape[0] / (4 * N)
    np.testing.assert_allclose(guide.scale[-2:], (10.0 / k, 10.0 / k))
    assert {lay.colormap.name for lay in row} == {"magma"}
    assert len({tuple(lay.contrast_limits) for lay in row}) == 1
    row[3].contrast_limits = (0.0, 123.0)  # linked: every method of the channel follows
    assert all(tuple(lay.contrast_limits) == (0.0, 123.0) for lay in row)
    assert tuple(compare.rows[1][0].contrast_limits) != (0.0, 123.0)  # another channel is independent

    # ---- grid view: one channel per tile row, one column per image, nothing else shown, labels on the canvas
    compare.set_grid(True, rows="channels")
    tiles = compare.tiles
    assert not viewer.canvas.grid.enabled and max(tiles) == (1, 5) and len(tiles) == 12
    assert [tiles[(0, j)].name for j in range(6)] == [lay.name for lay in compare.rows[0]]
    tiled = {lay.name for r in compare.rows.values() for lay in r} | {LABELS_NAME}
    assert {lay.name for lay in viewer.layers if lay.visible} == tiled
    text = list(viewer.layers[LABELS_NAME].features["label"])
    assert [t for t in text if t] == ["LR", "truth", "SMSDL", "BI", "H&E-free control", "CNN",  # short: they fit a tile
                                      "m/z 734.5694", "m/z 885.5499"]
    # then blanks: spare slots (the labels layer is sized at Show for the widest grid, difference
    # maps included, so a toggle renames in place) and the two anchors that make the camera fit the margins
    assert text[:8] == [t for t in text if t] and len(text) >= 10 and not any(text[8:])
    lr, smsdl0 = tiles[(0, 0)], tiles[(0, 2)]
    assert lr.translate[-2] == pytest.approx(R0 * 40.0 + 20.0)  # the first tile stays in place
    assert smsdl0.translate[-1] - smsdl.metadata["home_translate"][-1] == pytest.approx(2 * 640.0 * 1.12)
    # a click on a tile reads the pixel of that tile's own place
    hit = compare.inspect_pixel((840.0, 500.0 + 2 * 640.0 * 1.12))["hit"]
    assert hit.sr_rc == (20, 18)
    compare.set_grid(True, rows="methods")
    tiles = compare.tiles
    assert max(tiles) == (5, 1) and [tiles[(0, c)] for c in (0, 1)] == [compare.rows[0][0], compare.rows[1][0]]
    compare.set_grid(False)
    assert not compare.tiles and guide.visible and not viewer.layers[LABELS_NAME].visible
    np.testing.assert_allclose(smsdl.translate[-2:], (R0 * 40.0 + 5.0, C0 * 40.0 + 5.0))  # back home

    # ---- difference maps against the ground truth
    compare.reference.value = "truth"
    compare.differences.value = True
    diff = viewer.layers[f"{PREFIX}SMSDL − ground truth · m/z 885.5499"]
    inside = shown.mask_hr  # differences are shown on tissue only (the truth layer's, see above)
    np.testing.assert_array_equal(inside, tissue_mask(truth[[0, 4]]))
    np.testing.assert_allclose(diff.data[inside], (project.sr["smsdl"][1] - shown.truth[1])[inside], atol=1e-4)
    assert np.isnan(diff.data[~inside]).all()
    lo, hi = diff.contrast_limits
    assert lo == pytest.approx(-hi) and diff.colormap.name == "RdBu_r"

    # ---- clicking a pixel: values of every method and the LR pixel it came from
    assert compare._on_click in viewer.mouse_drag_callbacks
    compare._on_click(viewer, SimpleNamespace(type="mouse_press", position=(840.0, 500.0)))
    picked = compare.picked  # 200 µm below and 180 µm right of the crop's corner
    assert picked["hit"].sr_rc == (20, 18) and picked["hit"].lr_rc == (5, 4)
    assert picked["values"]["lr"][1] == pytest.approx(project.lr_msi[1, 5, 4])
    assert picked["values"]["cnn"][0] == pytest.approx(project.sr["cnn"][0, 20, 18])
    assert picked["values"]["truth"][1] == pytest.approx(sample.ground_truth[4, 4 * R0 + 20, 4 * C0 + 18])
    assert compare.pixel_table.rowCount() == 2 and "MSI pixel (row 5, col 4)" in compare.pixel_label.value

    # ---- segments of the SMSDL stack
    labels = compare.segment(3, method="smsdl")
    assert labels.data.max() == 3 and labels.data.shape == (4 * N, 4 * N)
    assert labels.data[~shown.mask_hr].max() == 0
    np.testing.assert_allclose(labels.scale[-2:], (10.0, 10.0))

    # ---- Export, read back
    export.export(tmp_path / "out")
    _wait(qtbot, export)
    assert export.last_error is None, export.last_error
    out = tmp_path / "out"
    with tifffile.TiffFile(out / "sr_smsdl.ome.tif") as tif:
        np.testing.assert_array_equal(tif.asarray(), project.sr["smsdl"])
        assert 'PhysicalSizeX="10.0"' in tif.ome_metadata
    ds = open_imzml(out / "sr_cnn.imzML")
    assert ds.pixel_size_um == pytest.approx(10.0) and ds.shape == (4 * N, 4 * N)
    np.testing.assert_allclose(ds.ion_images(list(project.mz), "5ppm").data, project.sr["cnn"], rtol=1e-6)
    with tifffile.TiffFile(out / "uncertainty_smsdl.ome.tif") as tif:
        np.testing.assert_array_equal(tif.asarray(), project.uncertainty["smsdl"])
        assert 'PhysicalSizeX="10.0"' in tif.ome_metadata
    assert (out / "sr_backprojection.ome.tif").exists() and (out / "guidance.csv").exists()
    with (out / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 * 3 and {r["method"] for r in rows} == set(project.sr)
    first = next(r for r in rows if r["method"] == "smsdl")
    assert float(first["ssim"]) == pytest.approx(expected["ssim"]["per_channel"][0])
    assert (out / "figure.png").stat().st_size > 10_000

    # ---- project: save, close the viewer, reopen in a new one with identical layers
    before = _compare_data(viewer)
    export.save_project(tmp_path / "project")
    _wait(qtbot, export)
    assert export.last_error is None, export.last_error
    assert viewer.layers[MSI].metadata[LAYER_METADATA_KEY].path == tmp_path / "project"
    viewer.close()

    viewer2 = make_napari_viewer()
    compare2, export2 = CompareWidget(viewer2), ExportWidget(viewer2)
    qtbot.addWidget(compare2)
    qtbot.addWidget(export2)
    export2.open_project(tmp_path / "project")
    _wait(qtbot, export2)
    assert export2.last_error is None, export2.last_error
    reopened = export2.opened
    for method in project.sr:
        np.testing.assert_array_equal(reopened.sr[method], project.sr[method])
    assert reopened.metrics["cnn"]["rmse"]["per_channel"] == pytest.approx(shown.metrics["cnn"]["rmse"]["per_channel"])
    assert reopened.settings == project.settings
    np.testing.assert_array_equal(reopened.uncertainty["smsdl"], project.uncertainty["smsdl"])
    assert reopened.guidance == project.guidance
    np.testing.assert_array_equal(viewer2.layers["uncertainty (SMSDL)"].data, project.uncertainty["smsdl"])
    after = _compare_data(viewer2)
    assert set(after) == set(before)
    for name, data in before.items():
        if name == GUIDE_NAME:  # stored as 8-bit RGB
            np.testing.assert_allclose(after[name] / 255.0, data, atol=1 / 255)
        else:
            np.testing.assert_array_equal(after[name], data)
    assert compare2.project is not None and compare2.metrics_table.rowCount() == 12  # Compare followed the reopen
    msi2 = viewer2.layers["project (MSI)"]
    np.testing.assert_allclose(msi2.scale[-2:], (40.0, 40.0))
    assert reopened.msi_origin_rc_um == pytest.approx((R0 * 40.0, C0 * 40.0))  # the crop's corner, recorded by Train
    np.testing.assert_allclose(msi2.translate[-2:], (R0 * 40.0 + 20.0, C0 * 40.0 + 20.0))  # back where it was
    np.testing.assert_array_equal(msi2.data, project.lr_msi, strict=False)


def test_cancel_mid_training_leaves_the_session_usable(sample_viewer, qtbot, tmp_path):
    viewer = sample_viewer
    train = TrainWidget(viewer)
    qtbot.addWidget(train)
    stages = []
    train.progressed.connect(lambda stage, done, total: stages.append(stage))
    endless = dataclasses.replace(TINY, features=dataclasses.replace(TINY.features, ssl_steps=100_000))
    train.start(endless, methods=["smsdl", "bicubic"], cache_dir=tmp_path / "cache")
    qtbot.waitUntil(lambda: sum(s.startswith("self-supervised training") for s in stages) >= 2, timeout=TIMEOUT_MS)
    assert any(s.startswith("self-supervised training") for s in stages)
    assert train.progress_bars  # a progress bar of the running stage is in napari's activity dock
    train.cancel()
    _wait(qtbot, train, timeout=15_000)
    assert train.last_error == "cancelled" and train.cancel_seconds < 5.0
    assert train.project is None and LAYER_METADATA_KEY not in viewer.layers[MSI].metadata
    assert not train.progress_bars and train.start_button.enabled and not train.cancel_button.enabled
    # the session is still usable: the next job runs to the end
    train.start(TINY, methods=["bicubic"])
    _wait(qtbot, train)
    assert train.last_error is None and set(train.project.sr) == {"bicubic"}


def test_errors_are_shown_with_their_cause(sample_viewer, qtbot, tmp_path):
    from napari.utils.notifications import notification_manager

    messages = []
    notification_manager.notification_ready.connect(lambda n: messages.append(str(n.message)))
    train, compare = TrainWidget(sample_viewer), CompareWidget(sample_viewer)
    qtbot.addWidget(train)
    qtbot.addWidget(compare)
    garbage = tmp_path / "weights.pt"
    garbage.write_bytes(b"not a torch file")
    settings = dataclasses.replace(TINY, features=dataclasses.replace(TINY.features, checkpoint=str(garbage)))
    assert train.start(settings, methods=["smsdl"], cache_dir=tmp_path / "cache") is not None
    _wait(qtbot, train)  # fails in the worker, when the checkpoint is read
    assert train.last_error.startswith(f"{garbage}: cannot read checkpoint")
    assert any(m.startswith(f"Training failed: {garbage}: cannot read checkpoint") for m in messages)
    assert train.start_button.enabled and not train.busy
    garbage.unlink()  # checked before any work starts
    assert train.start() is None and train.last_error == f"{garbage}: checkpoint file not found"
    train.feature_source.value = FeatureSource.SELF_SUPERVISED
    train.channels.value = []
    assert train.start() is None and "no channel selected" in train.last_error
    compare.show_results()
    assert "nothing to compare yet" in compare.last_error


def test_train_uses_the_accepted_registration(sample_viewer, qtbot):
    """What the Register widget leaves on the MSI layer is the transform Train reconstructs with."""
    import SimpleITK as sitk

    viewer = sample_viewer
    shift = sitk.TranslationTransform(2, (4.0, -2.0))  # MSI µm → H&E µm, as Register stores it
    report = {"final": "landmark affine", "residuals": [
        {"he_row": 10.0, "he_col": 12.0, "msi_row": 0.5, "msi_col": 0.6},
        {"he_row": 100.0, "he_col": 20.0, "msi_row": 6.0, "msi_col": 1.1},
        {"he_row": 40.0, "he_col": 200.0, "msi_row": 2.5, "msi_col": 12.4},
    ]}
    msi = viewer.layers[MSI]
    msi.metadata = {**msi.metadata, "smsdl_registration": {
        "transform": shift, "report": report, "he_layer": "sample H&E", "he_pixel_size_um": 2.5, "msi_pixel_size_um": 40.0,
    }}
    train = TrainWidget(viewer)
    qtbot.addWidget(train)
    assert train.use_registration.enabled and train.use_registration.value
    train.start(TINY, methods=["bicubic"])
    _wait(qtbot, train)
    project = train.project
    assert project.transform is shift and project.registration_report["final"] == "landmark affine"
    np.testing.assert_allclose(project.landmarks.he_rc[1], (100.0, 20.0))
    # a registration made for another H&E layer is refused, with the reason
    msi.metadata = {**msi.metadata, "smsdl_registration": {**msi.metadata["smsdl_registration"], "he_layer": "other"}}
    assert train.start() is None and "registration maps the MSI onto H&E layer 'other'" in train.last_error
    train.use_registration.value = False  # the layers' placement in the viewer is used instead
    train.start(methods=["bicubic"])
    _wait(qtbot, train)
    assert train.last_error is None and train.project.transform is not shift
