"""The npe2 writers through napari's File → Save Layers path (``viewer.layers.save``), read back."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_smsdl._reader import ion_stack_layer, read_imzml
from napari_smsdl.errors import SmsdlError
from napari_smsdl.io import open_imzml, write_imzml

pytestmark = pytest.mark.gui

MZ = [760.585, 885.5499, 901.0]


def _stack(channels=3, rows=5, cols=7):
    rng = np.random.default_rng(0)
    data = rng.uniform(1.0, 50.0, (channels, rows, cols)).astype(np.float32)
    data[:, 0, 0] = np.nan  # not acquired
    return data


def _add_ion_stack(viewer, data, pixel_size_um=2.5, name="SR (SMSDL)"):
    stack, kwargs, _ = ion_stack_layer(data, [f"m/z {m:.4f}" for m in MZ], pixel_size_um, name=name, mz=MZ)
    return viewer.add_image(stack, **kwargs)


def _ome(path):
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome
        ome = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]
        return tif.asarray(), ome


def test_ion_stack_to_ome_tiff(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    data = _stack()
    layer = _add_ion_stack(viewer, data)
    written = viewer.layers.save(str(tmp_path / "sr.ome.tif"), selected=False, plugin="napari-smsdl")
    assert written == [str(tmp_path / "sr.ome.tif")]
    pixels, ome = _ome(written[0])
    np.testing.assert_array_equal(pixels, data)  # NaN kept where nothing was acquired
    assert ome["PhysicalSizeX"] == ome["PhysicalSizeY"] == 2.5
    assert ome["PhysicalSizeXUnit"] == "µm"
    assert [c["Name"] for c in ome["Channel"]] == layer.metadata["channel_names"] == [f"m/z {m:.4f}" for m in MZ]
    # and the project's own reader takes it back with names and pixel size
    from napari_smsdl.io import read_ion_stack

    back = read_ion_stack(written[0])
    assert back.pixel_size_um == 2.5 and list(back.channel_names) == layer.metadata["channel_names"]


def test_single_image_with_anisotropic_scale_to_ome_tiff(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    image = np.arange(20, dtype=np.float32).reshape(4, 5)
    viewer.add_image(image, name="TIC", scale=(25.0, 10.0))
    import napari

    written = napari.save_layers(str(tmp_path / "tic.tif"), [viewer.layers["TIC"]], plugin="napari-smsdl")
    pixels, ome = _ome(written[0])
    np.testing.assert_array_equal(pixels, image)
    assert ome["PhysicalSizeX"] == 10.0 and ome["PhysicalSizeY"] == 25.0


def test_ion_stack_to_continuous_imzml(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    data = _stack()
    _add_ion_stack(viewer, data, pixel_size_um=2.5)
    written = viewer.layers.save(str(tmp_path / "sr.imzML"), selected=False, plugin="napari-smsdl")
    assert written == [str(tmp_path / "sr.imzML"), str(tmp_path / "sr.ibd")]
    ds = open_imzml(written[0])
    assert ds.mode == "continuous" and ds.shape == (5, 7) and ds.pixel_size_um == 2.5
    assert ds.n_spectra == 5 * 7 - 1 and not ds.mask[0, 0]  # the all-NaN pixel has no spectrum
    np.testing.assert_allclose(ds.shared_mz, MZ)
    images = ds.ion_images(MZ, "1ppm").data
    np.testing.assert_allclose(images, data, rtol=1e-6, equal_nan=True)


def test_offset_imzml_layer_saved_and_read_back_in_place(make_napari_viewer, tmp_path):
    """A reader layer of an acquisition far from (1, 1) is saved at its instrument position."""
    axis = np.array(MZ)
    spectra = [(r, c, axis, np.array([r, c, 1.0 + r * c], np.float32)) for r in range(3) for c in range(4)]
    source = write_imzml(tmp_path / "offset.imzML", spectra, mode="continuous", pixel_size_um=(10.0, 20.0),
                         offset_rc_px=(40, 30))
    viewer = make_napari_viewer()
    layers = viewer.open(str(source), plugin="napari-smsdl")
    peaks = layers[1]
    np.testing.assert_allclose(peaks.scale, [1.0, 20.0, 10.0])
    viewer.layers.selection = {peaks}
    written = viewer.layers.save(str(tmp_path / "again.imzML"), selected=True, plugin="napari-smsdl")
    ds = open_imzml(written[0])
    assert ds.offset_rc_px == (40, 30) and ds.pixel_size_xy_um == (10.0, 20.0) and ds.shape == (3, 4)
    np.testing.assert_allclose(ds.ion_images(peaks.metadata["mz"], "1ppm").data, peaks.data, rtol=1e-6)
    _, kwargs, _ = read_imzml(written[0])[1]
    np.testing.assert_allclose(kwargs["translate"], peaks.translate)


def test_imzml_needs_mz_per_channel(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    layer = viewer.add_image(_stack(), name="no m/z", scale=(1.0, 2.0, 2.0))
    import napari

    with pytest.raises(SmsdlError, match="x.imzML: imzML needs one m/z per channel"):
        napari.save_layers(str(tmp_path / "x.imzML"), [layer], plugin="napari-smsdl")
    assert not (tmp_path / "x.imzML").exists()
    # OME-TIFF still takes it, without channel names
    written = napari.save_layers(str(tmp_path / "x.ome.tif"), [layer], plugin="napari-smsdl")
    _, ome = _ome(written[0])
    assert ome["PhysicalSizeX"] == 2.0 and "Name" not in ome["Channel"][0]
