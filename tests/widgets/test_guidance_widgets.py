"""Train, Compare and Export show what the core says about the histology, per channel (no training).

A project made by hand (two channels of the sample's crop, the H&E-free control among the methods,
the second channel fallen back to the control) is handed to the widgets as a finished run would be.
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_smsdl.project import LAYER_METADATA_KEY, Project
from napari_smsdl.reconstruction import Reconstruction, Settings
from napari_smsdl.widgets.compare import PREFIX, CompareWidget
from napari_smsdl.widgets.export import ExportWidget
from napari_smsdl.widgets.train import TrainWidget

from .test_train_compare import MSI, N, crop_sample_layers

pytestmark = pytest.mark.gui

GUIDANCE = {"gain": [0.125, -0.0625], "gain_std": [0.03125, 0.25], "used_histology": [True, False]}


@pytest.fixture
def viewer(make_napari_viewer):
    from napari.layers import Layer

    from napari_smsdl.widgets.train import preload_torch

    preload_torch()  # as Train.start does: a later torch/timm import in this process must not load triton
    viewer = make_napari_viewer()
    for data, kwargs, kind in crop_sample_layers():
        viewer.add_layer(Layer.create(data, kwargs, kind))
    return viewer


def _project(viewer) -> Project:
    msi = viewer.layers[MSI]
    names = list(msi.metadata["channel_names"])
    rng = np.random.default_rng(0)
    lr = np.asarray(msi.data, np.float32)[[0, 4]]
    sr = {m: rng.uniform(0, 10, (2, 4 * N, 4 * N)).astype(np.float32) for m in ("smsdl", "bicubic", "backprojection", "cnn")}
    guide = rng.uniform(0, 1, (8 * N, 8 * N, 3)).astype(np.float32)
    recon = Reconstruction(sr, {"smsdl": 1.0, "bicubic": 0.1, "backprojection": 0.2, "cnn": 2.0}, guide, None, {},
                           Settings.preset("fast", factor=4),
                           uncertainty={"smsdl": rng.uniform(0, 1, (2, 4 * N, 4 * N)).astype(np.float32)},
                           guidance={"smsdl": GUIDANCE}, choices={"smsdl": {"folds": 3}})
    return Project.from_reconstruction(recon, lr_msi=lr, channel_names=[names[0], names[4]], msi_pixel_size_um=40.0,
                                       he_pixel_size_um=2.5, mz=[msi.metadata["mz"][0], msi.metadata["mz"][4]])


def test_train_names_the_fallbacks_and_adds_the_uncertainty_layer(viewer, qtbot, tmp_path):
    train, compare, export = TrainWidget(viewer), CompareWidget(viewer), ExportWidget(viewer)
    for w in (train, compare, export):
        qtbot.addWidget(w)
    project = _project(viewer)
    train._on_done(project)  # what a finished job hands the widget
    assert ("SMSDL used the H&E on 1 of 2 channels; fell back to the H&E-free control (BI + back-projection) on: "
            "m/z 885.5499") in train.status.value
    layer = viewer.layers["uncertainty (SMSDL)"]
    np.testing.assert_array_equal(layer.data, project.uncertainty["smsdl"])
    smsdl = viewer.layers[f"{PREFIX}SMSDL · m/z 734.5694"]  # Compare followed the run
    np.testing.assert_allclose(layer.scale[-2:], smsdl.scale[-2:])
    np.testing.assert_allclose(layer.translate[-2:], smsdl.translate[-2:])
    assert layer.metadata["channel_names"] == list(project.channel_names)
    assert viewer.layers[MSI].metadata[LAYER_METADATA_KEY] is compare.project

    # a second run replaces the layer instead of stacking another one
    train._on_done(_project(viewer))
    assert [lay.name for lay in viewer.layers].count("uncertainty (SMSDL)") == 1

    # Compare without a ground truth: the histology gain per channel is still there to read
    compare.show_results(truth=None)
    table = compare.metrics_table
    cells = [[table.item(i, j).text() for j in range(table.columnCount())] for i in range(table.rowCount())]
    assert cells == [
        ["SMSDL", "m/z 734.5694", "—", "—", "—", "—", "0.125 ± 0.031", "yes"],
        ["SMSDL", "m/z 885.5499", "—", "—", "—", "—", "-0.0625 ± 0.25", "no (control)"],
        ["SMSDL", "all channels", "—", "—", "—", "—", f"{np.mean(GUIDANCE['gain']):.3g} ± {np.std(GUIDANCE['gain']):.2g}",
         "1/2"],
    ]
    labels = [lay.metadata["method"] for lay in compare.rows[0]]
    assert labels == ["lr", "smsdl", "bicubic", "backprojection", "cnn"]
    # grid view with the sample's ground truth: 6 columns (LR, truth, 4 methods), either way round
    compare.show_results(truth="sample ground truth (10 µm)")
    for rows, corner in (("channels", (1, 5)), ("methods", (5, 1))):
        compare.set_grid(True, rows=rows)
        tiles = compare.tiles
        assert max(tiles) == corner and len(tiles) == 12 and compare.last_error is None
        expected = {(i, j) if rows == "channels" else (j, i): lay
                    for i, row in enumerate(compare.rows.values()) for j, lay in enumerate(row)}
        assert tiles == expected
    compare.set_grid(False)
    compare.show_results(truth=None)
    compare.reference.value = "backprojection"  # what the histology changed, against the control
    compare.differences.value = True
    diff = viewer.layers[f"{PREFIX}SMSDL − BI + back-projection (H&E-free) · m/z 734.5694"]
    inside = np.isfinite(diff.data)
    np.testing.assert_allclose(diff.data[inside], (project.sr["smsdl"][0] - project.sr["backprojection"][0])[inside])

    # Export writes the uncertainty with the rest
    export.export(tmp_path / "out", formats=("ome-tiff",))
    qtbot.waitUntil(lambda: not export.busy, timeout=30_000)
    assert export.last_error is None, export.last_error
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out" / "uncertainty_smsdl.ome.tif"),
                                  project.uncertainty["smsdl"])
    assert (tmp_path / "out" / "sr_backprojection.ome.tif").exists()
