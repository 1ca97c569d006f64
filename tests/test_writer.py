"""The npe2 writer functions headless: what they take from a layer's state (no napari needed)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_smsdl._writer import channel_mz, channel_names, pixel_size_xy_um, write_imzml, write_ome_tiff
from napari_smsdl.errors import SmsdlError
from napari_smsdl.io import open_imzml


def test_names_and_mz_from_layer_metadata():
    attrs = {"metadata": {"channel_names": ["m/z 500.1000", "m/z 600.25"]}}
    assert channel_mz(attrs, 2) == [500.1, 600.25]
    assert channel_names(attrs, 2) == ["m/z 500.1000", "m/z 600.25"]
    assert channel_names(attrs, 3) is None  # names for another number of channels are not used
    assert channel_mz({"metadata": {"channel_names": ["ion 1", "ion 2"]}}, 2) is None
    mz_only = {"metadata": {"mz": [885.5499]}}
    assert channel_names(mz_only, 1) == ["m/z 885.5499"] and channel_mz(mz_only, 1) == [885.5499]
    assert pixel_size_xy_um({"scale": (1.0, 25.0, 10.0)}) == (10.0, 25.0)
    assert pixel_size_xy_um({"scale": (0.0, 0.0)}) is None


def test_single_channel_imzml_at_its_origin(tmp_path):
    image = np.arange(12, dtype=np.float32).reshape(3, 4) + 1
    attrs = {"name": "ion", "scale": (5.0, 5.0), "translate": (102.5, 52.5), "metadata": {"mz": [700.0]}}
    xml, ibd = write_imzml(str(tmp_path / "one.imzML"), image, attrs)
    ds = open_imzml(xml)
    assert ibd.endswith("one.ibd") and ds.shape == (3, 4) and ds.offset_rc_px == (20, 10)
    assert ds.pixel_size_um == 5.0
    np.testing.assert_allclose(ds.ion_images([700.0], "1ppm").data[0], image)


def test_rgb_and_no_scale_refused_with_the_file_named(tmp_path):
    rgb = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(SmsdlError, match="he.tif: an RGB layer"):
        write_ome_tiff(str(tmp_path / "he.tif"), rgb, {"rgb": True, "scale": (1.0, 1.0)})
    with pytest.raises(SmsdlError, match="not a pixel size"):
        write_imzml(str(tmp_path / "x.imzML"), np.ones((2, 2), np.float32), {"scale": (0.0, 0.0), "metadata": {"mz": [1.0]}})
    assert not list(tmp_path.iterdir())
