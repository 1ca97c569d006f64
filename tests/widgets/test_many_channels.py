"""Many channels in the napari widgets (issue 7): an 80-channel MSI takes the chunked path.

Train streams SMSDL and BI to zarr, Compare shows lazy
(channels, rows, cols) layers backed by those arrays and scores a few channels, Export writes the
OME-TIFF page by page and refuses imzML, the project saves and reopens lazily.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tifffile

from napari_smsdl.evaluation import channel_limits, tissue_mask_sr
from napari_smsdl.project import LAZY_SCORED_CHANNELS, load_project
from napari_smsdl.reconstruction import CHUNKED_ABOVE_CHANNELS
from napari_smsdl.widgets.compare import PREFIX, CompareWidget
from napari_smsdl.widgets.export import ExportWidget
from napari_smsdl.widgets.train import TrainWidget

from .test_train_compare import TINY, crop_sample_layers

pytestmark = pytest.mark.gui

N_CHANNELS = 80  # above CHUNKED_ABOVE_CHANNELS (64): two chunks, of 64 and 16 channels
MANY = "many-channel MSI"
MANY_TRUTH = "many-channel ground truth"
TIMEOUT_MS = 120_000
# block means conserved: pooled over each MSI pixel's F × F cells, every SR channel is its own LR channel
SETTINGS = dataclasses.replace(TINY, regression=dataclasses.replace(TINY.regression, conservation="exact"))


@pytest.fixture
def many_viewer(make_napari_viewer):
    """The cropped sample's H&E, its MSI and ground truth widened to 80 channels (scaled copies)."""
    from napari.layers import Layer

    assert N_CHANNELS > CHUNKED_ABOVE_CHANNELS
    viewer = make_napari_viewer()
    layers = {kwargs["name"]: (data, kwargs, kind) for data, kwargs, kind in crop_sample_layers()}
    he = layers["sample H&E"]
    viewer.add_layer(Layer.create(*he))
    names = [f"channel {k}" for k in range(N_CHANNELS)]
    gain = np.repeat(1.0 + 0.25 * np.arange(N_CHANNELS // 5), 5)[:, None, None].astype(np.float32)
    for source, name, kind in (("sample MSI (40 µm)", MANY, "measured"), ("sample ground truth (10 µm)", MANY_TRUTH,
                                                                           "ground_truth")):
        data, kwargs, layer_kind = layers[source]
        stack = np.tile(np.asarray(data, np.float32), (N_CHANNELS // 5, 1, 1)) * gain
        metadata = {**kwargs["metadata"], "channel_names": names, "mz": None, "kind": kind}
        kwargs = {**kwargs, "name": name, "metadata": metadata}
        kwargs.pop("contrast_limits", None)
        viewer.add_layer(Layer.create(stack, kwargs, layer_kind))
    return viewer


def _wait(qtbot, widget):
    qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT_MS)


def test_many_channels_train_compare_export_and_reopen(many_viewer, make_napari_viewer, qtbot, tmp_path):
    import zarr

    viewer = many_viewer
    train, compare, export = TrainWidget(viewer), CompareWidget(viewer), ExportWidget(viewer)
    for w in (train, compare, export):
        qtbot.addWidget(w)
    train.set_layers(he="sample H&E", msi=MANY)
    assert train.channels.value == list(range(N_CHANNELS))

    # ---- Train: the chunked path, on a worker, with progress
    stages = []
    train.progressed.connect(lambda stage, done, total: stages.append(stage))
    worker = train.start(SETTINGS, methods=("smsdl", "bicubic", "backprojection"), cache_dir=tmp_path / "cache")
    assert worker is not None and train.busy and "chunk by chunk" in train.status.value
    _wait(qtbot, train)
    assert train.last_error is None, train.last_error
    project = train.project
    assert project.lazy and list(project.sr) == ["smsdl", "bicubic", "backprojection"]
    # the H&E-free control streamed too; SMSDL's uncertainty is a lazy layer; guidance for every channel
    assert isinstance(project.sr["backprojection"], zarr.Array) and (train.run_dir / "sr_backprojection.zarr").is_dir()
    spread = train.uncertainty_layer
    assert spread is not None and spread.data is project.uncertainty["smsdl"] and isinstance(spread.data, zarr.Array)
    assert spread.data.shape == (N_CHANNELS, 64, 64) and tuple(spread.scale) == (1.0, 10.0, 10.0)
    assert len(project.guidance["smsdl"]["used_histology"]) == N_CHANNELS and "SMSDL used the H&E on" in train.status.value
    assert "SMSDL channel chunks" in stages and any(s.startswith("SMSDL channels 65-80 of 80") for s in stages)
    smsdl = project.sr["smsdl"]
    assert isinstance(smsdl, zarr.Array) and smsdl.shape == (N_CHANNELS, 64, 64)
    assert (train.run_dir / "sr_smsdl.zarr").is_dir() and "stay on disk" in train.status.value
    # pooled back over each MSI pixel's 4 × 4 cells, each SR channel gives its own measured channel
    lr = project.lr_msi
    mask = np.isfinite(lr).all(0) & (np.nan_to_num(lr) != 0).any(0)
    for c in (0, 42, 79):
        pooled = np.asarray(smsdl[c]).reshape(16, 4, 16, 4).mean(axis=(1, 3))
        rel = np.median(np.abs(pooled[mask] - lr[c][mask]) / lr[c][mask])  # a few blocks hit the ratio clip
        assert rel < 0.01, (c, rel)  # a channel in another slot would be off by >= 5 % (its gain differs)

    # ---- Compare followed by itself: lazy stack layers, limits from the channel shown, a few channels scored
    assert compare.project is not None and compare.project.sr is project.sr
    row = compare.rows[0]
    by_method = {lay.metadata["method"]: lay for lay in row}
    assert set(by_method) == {"lr", "truth", "smsdl", "bicubic", "backprojection"}
    np.testing.assert_allclose(by_method["smsdl"].translate, spread.translate)
    assert by_method["smsdl"].data is smsdl and by_method["bicubic"].data is project.sr["bicubic"]
    assert tuple(by_method["smsdl"].scale) == (1.0, 10.0, 10.0) and by_method["lr"].data.shape == (N_CHANNELS, 16, 16)
    assert "not loaded whole" in compare.status.value
    scored = compare.project.metrics["smsdl"]
    assert scored["scored_channels"] == list(range(LAZY_SCORED_CHANNELS))
    assert np.isfinite(scored["ssim"]["per_channel"][0]) and np.isnan(scored["ssim"]["per_channel"][70])
    assert compare.metrics_table.rowCount() == 3 * (LAZY_SCORED_CHANNELS + 1)
    truth = viewer.layers[MANY_TRUTH].data
    sr_mask = tissue_mask_sr(compare.project)
    viewer.dims.set_point(0, 70.0)  # the slider moves to channel 70: its own contrast limits
    assert tuple(by_method["smsdl"].contrast_limits) == pytest.approx(channel_limits(truth, 70, mask=sr_mask))
    assert tuple(by_method["bicubic"].contrast_limits) == tuple(by_method["smsdl"].contrast_limits)
    picked = compare.inspect_pixel((16 * 40.0 + 25.0, 8 * 40.0 + 25.0))  # SR cell (2, 2) of the crop
    assert picked["channels"][0] == 70 and picked["values"]["smsdl"][0] == pytest.approx(float(smsdl[70, 2, 2]))
    assert compare.reference.value == "truth"  # a ground truth is chosen: the maps reference it by default
    compare.reference.value = "bicubic"
    compare.differences.value = True  # lazy difference stacks, read one channel when shown
    diff = next(lay for lay in compare.rows[0] if lay.metadata["role"] == "difference")
    expected = np.where(sr_mask, np.asarray(smsdl[70]) - np.asarray(project.sr["bicubic"][70]), np.nan)
    np.testing.assert_allclose(np.asarray(diff.data[70]), expected, rtol=1e-6, atol=1e-6)
    assert compare.segment(3) is not None and compare.last_error is None

    # ---- Export: OME-TIFF page by page, imzML refused with a message
    export.export(tmp_path / "out", formats=("imzml",))
    _wait(qtbot, export)
    assert "imzML export is not available for 80 channels" in export.last_error
    assert not export.imzml.enabled
    export.export(tmp_path / "out", formats=("ome-tiff", "csv", "png"))
    _wait(qtbot, export)
    assert export.last_error is None or "imzML" in export.last_error
    written = tifffile.imread(tmp_path / "out" / "sr_smsdl.ome.tif")
    np.testing.assert_array_equal(written, np.asarray(smsdl[:]))
    assert (tmp_path / "out" / "figure.png").is_file() and (tmp_path / "out" / "metrics.csv").is_file()
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out" / "uncertainty_smsdl.ome.tif"),
                                  np.asarray(project.uncertainty["smsdl"][:]))

    # ---- the project saves (page by page) and reopens lazily, in a new viewer
    export.save_project(tmp_path / "proj")
    _wait(qtbot, export)
    saved = viewer.layers[MANY].metadata["smsdl_project"]
    assert saved.path == tmp_path / "proj" and saved.lazy and saved.weights_path.is_file()  # the ViT weights too
    back = load_project(tmp_path / "proj")
    assert back.lazy and isinstance(back.sr["smsdl"], zarr.Array) and back.sr["smsdl"].chunks[0] == 1
    np.testing.assert_array_equal(np.asarray(back.sr["bicubic"][79]), np.asarray(project.sr["bicubic"][79]))
    assert isinstance(back.uncertainty["smsdl"], zarr.Array) and back.guidance == project.guidance
    viewer2 = make_napari_viewer()
    export2 = ExportWidget(viewer2)
    qtbot.addWidget(export2)
    export2.open_project(tmp_path / "proj")
    _wait(qtbot, export2)
    assert export2.last_error is None, export2.last_error
    reopened = export2.opened
    assert reopened.lazy and reopened.metrics["smsdl"]["scored_channels"] == list(range(LAZY_SCORED_CHANNELS))
    layer = next(lay for lay in viewer2.layers if lay.name.startswith(PREFIX) and lay.metadata.get("method") == "smsdl")
    assert isinstance(layer.data, zarr.Array) and layer.data.shape == (N_CHANNELS, 64, 64)
    np.testing.assert_array_equal(np.asarray(layer.data[42]), np.asarray(smsdl[42]))
    truth_layer = next(lay for lay in viewer2.layers if lay.metadata.get("kind") == "ground_truth")
    assert isinstance(truth_layer.data, zarr.Array) and len(truth_layer.metadata["channel_names"]) == N_CHANNELS


def test_cancel_on_the_many_channel_path(many_viewer, qtbot, tmp_path):
    train = TrainWidget(many_viewer)
    qtbot.addWidget(train)
    train.set_layers(he="sample H&E", msi=MANY)
    stages = []
    train.progressed.connect(lambda stage, done, total: stages.append(stage))
    assert train.start(SETTINGS, methods=("smsdl", "bicubic"), cache_dir=tmp_path / "cache") is not None
    qtbot.waitUntil(lambda: bool(stages), timeout=TIMEOUT_MS)  # running: cancel once it reports progress
    train.cancel()
    _wait(qtbot, train)
    assert train.last_error == "cancelled" and train.project is None
    assert train.cancel_seconds is not None and train.cancel_seconds < 10
    assert train.start_button.enabled and "Cancelled" in train.status.value


class _CountingStack:
    """A lazy (C, rows, cols) array that records which channels were read."""

    def __init__(self, data):
        self._data, self.read = data, set()
        self.shape, self.dtype, self.ndim = data.shape, data.dtype, data.ndim

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        first = key[0]
        chans = range(*first.indices(self.shape[0])) if isinstance(first, slice) else np.atleast_1d(first).tolist()
        self.read.update(int(c) for c in chans)
        return self._data[key]

    def __array__(self, dtype=None, copy=None):
        raise AssertionError("the whole lazy stack was read")


def test_lazy_layers_read_only_the_channels_shown(make_napari_viewer):
    from napari_smsdl.project import Project
    from napari_smsdl.reconstruction import Settings
    from napari_smsdl.widgets.compare import add_comparison_layers, arrange

    n = 300
    rng = np.random.default_rng(0)
    stacks = {m: _CountingStack(rng.uniform(0, 10, (n, 32, 24)).astype(np.float32)) for m in ("smsdl", "bicubic")}
    project = Project(lr_msi=rng.uniform(1, 10, (n, 8, 6)).astype(np.float32),
                      channel_names=tuple(f"c{k}" for k in range(n)), msi_pixel_size_um=40.0, he_pixel_size_um=2.5,
                      settings=Settings.preset("fast", factor=4), sr=stacks)
    viewer = make_napari_viewer()
    msi = viewer.add_image(project.lr_msi, scale=(1, 40, 40), translate=(0, 20, 20), name="msi")
    rows = add_comparison_layers(viewer, project, msi, channels=[5], differences="bicubic")
    assert [lay.data.shape for lay in rows[5]][-1] == (n, 32, 24)
    tiles = arrange(viewer, rows, grid=True, grid_by="channels")  # grid view: one tile per stack layer
    assert list(tiles) == [(0, 0), (0, 1), (0, 2), (0, 3)] and [tiles[k] for k in tiles] == rows[5]
    viewer.dims.set_point(0, 200.0)
    np.asarray(rows[5][-1].data[200])  # the difference map of the channel shown
    read = stacks["smsdl"].read | stacks["bicubic"].read
    assert {5, 200} <= read and len(read) <= 4, sorted(read)


def test_thousands_of_channels_are_selected_in_one_pass(make_napari_viewer, qtbot):
    import time

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((32, 32, 3), np.uint8), rgb=True, name="he")
    viewer.add_image(np.ones((2000, 4, 4), np.float32), name="msi",
                     metadata={"channel_names": [f"channel {k}" for k in range(2000)]})
    start = time.perf_counter()
    train = TrainWidget(viewer)  # magicgui's Select.value = [...] took 9 s for 2000 channels
    qtbot.addWidget(train)
    assert time.perf_counter() - start < 5.0
    assert train.channels.value == list(range(2000))
    from napari_smsdl.widgets._layers import set_selection

    seen = []
    train.channels.changed.connect(seen.append)
    set_selection(train.channels, [1999, 3])
    assert train.channels.value == [3, 1999] and seen == [[3, 1999]]
