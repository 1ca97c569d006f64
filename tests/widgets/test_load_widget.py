"""The Load widget, driven on the built-in sample written to disk (make_napari_viewer + qtbot)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_smsdl.io import open_imzml
from napari_smsdl.sample import SAMPLE_MZ, make_sample
from napari_smsdl.widgets.load import ChannelSource, LoadWidget, parse_mz_list

pytestmark = pytest.mark.gui

TIMEOUT_MS = 20_000


@pytest.fixture
def widget(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    w = LoadWidget(viewer)
    qtbot.addWidget(w)
    return w


def _wait(qtbot, w):
    qtbot.waitUntil(lambda: not w.busy, timeout=TIMEOUT_MS)


def test_parse_mz_list():
    assert parse_mz_list(" 760.585, 885.55;901 ") == [760.585, 885.55, 901.0]
    for bad in ["", "abc", "-3", "nan"]:
        with pytest.raises(ValueError):
            parse_mz_list(bad)


def test_load_pick_peaks_and_add_layers(widget, qtbot, sample_dir):
    viewer = widget.viewer
    worker = widget.load(he_path=sample_dir / "he.png", msi_path=sample_dir / "msi.imzML", he_pixel_size_um=2.5)
    assert worker is not None and widget.busy and not widget.add_button.enabled
    _wait(qtbot, widget)
    assert widget.last_error is None, widget.last_error
    # pixel sizes: the one given is kept, the MSI one comes from the imzML metadata
    assert widget.he_pixel_size.value == 2.5 and widget.msi_pixel_size.value == 40.0
    # the 5 simulated ions are among the 10 picked peaks, all offered and selected
    picked = np.asarray(widget.channels.value)
    assert len(picked) == 10 and len(widget.channels.choices) == 10
    for mz in SAMPLE_MZ:
        assert np.min(np.abs(picked - mz)) / mz < 5e-6
    assert widget.plot.axes.lines, "the mean spectrum is drawn"

    widget.n_peaks.value = 5  # re-picks from the cached mean spectrum
    np.testing.assert_allclose(widget.channels.value, SAMPLE_MZ, rtol=5e-6)

    widget.add_layers()
    _wait(qtbot, widget)
    assert [layer.name for layer in viewer.layers] == ["he (H&E)", "msi (MSI)"]
    he, msi = viewer.layers["he (H&E)"], viewer.layers["msi (MSI)"]
    assert he.rgb and he.data.shape == (512, 512, 3)
    np.testing.assert_allclose(he.scale, [2.5, 2.5])
    np.testing.assert_allclose(he.translate, [1.25, 1.25])
    assert msi.data.shape == (5, 32, 32)
    np.testing.assert_allclose(msi.scale, [1.0, 40.0, 40.0])
    np.testing.assert_allclose(msi.translate, [0.0, 20.0, 20.0])
    np.testing.assert_allclose(msi.data, make_sample().msi, rtol=1e-4, equal_nan=True)
    # same physical field of view: [0, 1280] µm on both axes
    for layer, size in [(he, 2.5), (msi, 40.0)]:
        world = layer.extent.world[:, -2:]
        np.testing.assert_allclose([world[0] - size / 2, world[1] + size / 2], [[0, 0], [1280, 1280]])


def test_typed_mz_tolerance_and_normalisation(widget, qtbot, sample_dir):
    widget.load(msi_path=sample_dir / "msi.imzML")
    _wait(qtbot, widget)
    widget.add_layers(mz=[SAMPLE_MZ[1], SAMPLE_MZ[4]], tol="5ppm", norm="tic")
    _wait(qtbot, widget)
    assert widget.source.value is ChannelSource.TYPED and widget.last_error is None
    assert [layer.name for layer in widget.viewer.layers] == ["msi (MSI)"]
    layer = widget.viewer.layers["msi (MSI)"]
    expected = open_imzml(sample_dir / "msi.imzML").ion_images([SAMPLE_MZ[1], SAMPLE_MZ[4]], "5ppm", norm="tic")
    np.testing.assert_allclose(layer.data, expected.data, rtol=1e-6, equal_nan=True)
    assert layer.metadata["normalization"] == "tic" and layer.metadata["tolerance"] == "5ppm"
    assert layer.metadata["channel_names"] == expected.channel_names

    # adding again replaces the layer instead of stacking duplicates
    widget.add_layers(mz=[SAMPLE_MZ[0]])
    _wait(qtbot, widget)
    assert len(widget.viewer.layers) == 1 and widget.viewer.layers["msi (MSI)"].data.shape == (1, 32, 32)


def test_ion_stack_file(widget, qtbot, sample_dir):
    widget.load(msi_path=sample_dir / "ground_truth.npy", msi_pixel_size_um=10.0)
    _wait(qtbot, widget)
    assert widget.channels.choices == (0, 1, 2, 3, 4) and not widget.typed_mz.enabled
    widget.add_layers(channels=[0, 4])
    _wait(qtbot, widget)
    layer = widget.viewer.layers["ground_truth (MSI)"]
    truth = np.load(sample_dir / "ground_truth.npy")
    np.testing.assert_array_equal(layer.data, truth[[0, 4]])
    np.testing.assert_allclose(layer.scale, [1.0, 10.0, 10.0])
    assert layer.metadata["channel_names"] == ["channel 0", "channel 4"]


def test_errors_are_reported_not_raised(widget, qtbot, sample_dir, tmp_path):
    widget.add_layers()  # nothing opened yet
    assert "open the files first" in widget.last_error
    broken = tmp_path / "broken.imzML"
    broken.write_bytes((sample_dir / "msi.imzML").read_bytes())
    broken.with_suffix(".ibd").write_bytes((sample_dir / "msi.ibd").read_bytes()[:1000])
    widget.load(msi_path=broken)
    _wait(qtbot, widget)
    assert "broken.imzML" in widget.last_error and "truncated" in widget.last_error
    assert widget.opened is None and len(widget.viewer.layers) == 0
    assert widget.open_button.enabled  # usable again after the failure

    widget.load(msi_path=sample_dir / "msi.imzML")
    assert widget.load() is None and "busy" in widget.last_error  # one job at a time
    _wait(qtbot, widget)
    widget.add_layers(mz=None, tol="ten ppm")
    assert "tolerance" in widget.last_error and len(widget.viewer.layers) == 0


def test_load_widget_from_the_manifest(make_napari_viewer):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-smsdl", "Load")
    assert isinstance(widget, LoadWidget)
    widget.viewer.add_image(np.zeros((2, 2)), name="probe")  # napari hands plugins a viewer proxy
    assert viewer.layers.index("probe") == 0


def test_synchronous_mode(widget, sample_dir, monkeypatch):
    monkeypatch.setenv("SMSDL_NOTHREADS", "1")
    assert widget.load(msi_path=sample_dir / "msi.imzML") is None  # no worker: done on return
    assert not widget.busy and widget.msi_pixel_size.value == 40.0
    widget.add_layers(mz=[SAMPLE_MZ[2]], tol="0.01da")
    assert widget.viewer.layers["msi (MSI)"].data.shape == (1, 32, 32)


@pytest.mark.gui
def test_set_selection_refuses_values_that_are_not_choices(qtbot):
    """Selecting thousands of channels in one pass must not quietly select fewer than asked."""
    from magicgui.widgets import Select

    from napari_smsdl.errors import InputError
    from napari_smsdl.widgets._layers import set_selection

    select = Select(choices=[("a", 0), ("b", 1), ("c", 2)], label="channels")
    set_selection(select, [0, 2])
    assert select.value == [0, 2]
    with pytest.raises(InputError, match=r"\[7\]"):
        set_selection(select, [1, 7])
