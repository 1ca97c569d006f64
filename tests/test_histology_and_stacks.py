"""H&E loading (PNG, pyramidal OME-TIFF, lazily) and non-imzML ion-image stacks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_smsdl.errors import InputError
from napari_smsdl.io import open_histology, read_histology, read_ion_stack, write_pyramidal_tiff


@pytest.fixture
def rgb():
    from skimage import data

    return data.immunohistochemistry()[:300, :400]


def test_png_round_trip(tmp_path, rgb):
    from skimage import io as skio

    skio.imsave(tmp_path / "he.png", rgb, check_contrast=False)
    image = open_histology(tmp_path / "he.png", pixel_size_um=0.5)
    assert image.shape == (300, 400) and image.pixel_size_um == 0.5
    np.testing.assert_array_equal(image.read(), rgb)


def test_pyramidal_ome_tiff_is_lazy_and_has_pixel_size(tmp_path, rgb):
    path = write_pyramidal_tiff(tmp_path / "slide.ome.tif", rgb, pixel_size_um=0.25, n_levels=3, tile=64)
    image = open_histology(path)
    assert image.pixel_size_um == pytest.approx(0.25)
    assert [lvl.shape[:2] for lvl in image.levels] == [(300, 400), (150, 200), (75, 100)]
    assert not isinstance(image.levels[0], np.ndarray)  # a zarr view over the file, not loaded
    np.testing.assert_array_equal(image.read(0, (slice(10, 20), slice(30, 50))), rgb[10:20, 30:50])
    assert image.best_level(1.0) == 2 and image.best_level(0.3) == 0
    assert image.level_pixel_size_um(1) == pytest.approx(0.5)


def test_bad_histology(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_histology(tmp_path / "missing.png")
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"not a tiff at all")
    with pytest.raises(InputError, match="bad.tif") as info:
        read_histology(bad)
    assert "cannot read TIFF" in str(info.value)


def test_ion_stack_formats(tmp_path):
    from napari_smsdl.io import write_tiff_stack

    stack = np.random.default_rng(0).uniform(1, 2, (3, 10, 12)).astype(np.float32)
    stack[:, 0, 0] = 0
    np.save(tmp_path / "maps.npy", stack)
    (tmp_path / "maps.npy.json").write_text(json.dumps({"channel_names": ["Fe", "Cu", "Zn"]}))
    from_npy = read_ion_stack(tmp_path / "maps.npy")
    assert from_npy.channel_names == ("Fe", "Cu", "Zn")
    assert not from_npy.mask[0, 0] and from_npy.mask.sum() == 119

    write_tiff_stack(tmp_path / "maps.ome.tif", stack, channel_names=["a", "b", "c"], pixel_size_um=5.0)
    from_tif = read_ion_stack(tmp_path / "maps.ome.tif")
    np.testing.assert_array_equal(from_tif.data, stack)
    assert from_tif.channel_names == ("a", "b", "c") and from_tif.pixel_size_um == 5.0

    np.savetxt(tmp_path / "one.csv", stack[0], delimiter=",")
    assert read_ion_stack(tmp_path / "one.csv").data.shape == (1, 10, 12)
    table = stack.transpose(1, 2, 0).reshape(-1, 3)
    np.savetxt(tmp_path / "table.txt", table)
    np.testing.assert_allclose(read_ion_stack(tmp_path / "table.txt", shape_rc=(10, 12)).data, stack, rtol=1e-6)
    with pytest.raises(InputError, match="expected rows\\*cols"):
        read_ion_stack(tmp_path / "table.txt", shape_rc=(9, 12))
    with pytest.raises(InputError, match="unsupported"):
        (tmp_path / "x.xyz").write_text("1")
        read_ion_stack(tmp_path / "x.xyz")


def test_real_umap_table_reads_as_stack(real_pair):
    from conftest import REAL_PAIR

    stack = read_ion_stack(REAL_PAIR / "mouse_brain_umap.txt", shape_rc=(40, 36))
    assert stack.data.shape == (3, 40, 36)
    assert 0.3 < stack.mask.mean() < 1.0  # background pixels are 0
