"""The napari imzML reader and the layer builders (headless), plus one viewer.open test."""

from __future__ import annotations

import numpy as np
import pytest

from napari_smsdl._reader import (
    grid_placement,
    he_layer,
    imzml_layers,
    ion_stack_layer,
    napari_get_reader,
    read_imzml,
    robust_contrast_limits,
)
from napari_smsdl.errors import ImzMLError
from napari_smsdl.io import open_imzml, write_imzml


# ---------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("size", [0.25, 2.5, 10.0, 40.0])
def test_grid_placement_puts_pixel_corners_at_zero(size):
    placement = grid_placement(size, n_leading=1)
    assert placement["scale"] == (1.0, size, size)
    assert placement["translate"] == (0.0, size / 2, size / 2)
    # world position of the top-left corner of pixel (0, 0): centre - half a pixel
    corner = np.array(placement["translate"][1:]) - 0.5 * np.array(placement["scale"][1:])
    np.testing.assert_allclose(corner, 0.0)


def test_grids_of_different_pixel_sizes_share_their_extent():
    # 512 px at 2.5 µm, 32 px at 40 µm and 128 px at 10 µm all span [0, 1280] µm
    for n, size in [(512, 2.5), (32, 40.0), (128, 10.0)]:
        p = grid_placement(size)
        first_edge = p["translate"][0] - size / 2
        last_edge = p["translate"][0] + (n - 1) * size + size / 2
        assert (first_edge, last_edge) == (0.0, 1280.0)


def test_grid_placement_unknown_and_bad_sizes():
    assert grid_placement(None) == {"scale": (1.0, 1.0), "translate": (0.5, 0.5)}
    with pytest.raises(ValueError, match="positive"):
        grid_placement(-3.0)


def test_robust_contrast_limits_ignore_nan():
    data = np.array([[np.nan, 1.0], [2.0, 5.0]])
    low, high = robust_contrast_limits(data, percentile=100)
    assert (low, high) == (1.0, 5.0)
    assert robust_contrast_limits(np.full((2, 2), np.nan)) is None
    assert robust_contrast_limits(np.full((2, 2), 3.0)) == (3.0, 4.0)  # constant image: valid limits


def test_ion_stack_layer_names_channels():
    data = np.zeros((2, 4, 5), np.float32)
    layer_data, kwargs, layer_type = ion_stack_layer(data, ["m/z 1", "m/z 2"], 20.0, name="x", mz=[1.0, 2.0])
    assert layer_type == "image" and layer_data is data
    assert kwargs["metadata"]["channel_names"] == ["m/z 1", "m/z 2"]
    assert kwargs["metadata"]["mz"] == [1.0, 2.0]
    assert kwargs["axis_labels"][0] == "channel (m/z)"
    assert kwargs["scale"] == (1.0, 20.0, 20.0)
    with pytest.raises(ValueError, match="channel names"):
        ion_stack_layer(data, ["only one"], 20.0, name="x")
    with pytest.raises(ValueError, match="stack"):
        ion_stack_layer(data[0], ["a"], 20.0, name="x")


def test_he_layer_of_a_pyramid_is_lazy_multiscale(tmp_path):
    from napari_smsdl.io import open_histology, write_pyramidal_tiff

    rgb = np.random.default_rng(0).integers(0, 255, (256, 192, 3), dtype=np.uint8)
    path = write_pyramidal_tiff(tmp_path / "he.ome.tif", rgb, pixel_size_um=0.5, n_levels=3, tile=64)
    image = open_histology(path)
    data, kwargs, _ = he_layer(image, image.pixel_size_um, name="he")
    assert kwargs["multiscale"] is True and kwargs["rgb"] is True
    assert [tuple(level.shape) for level in data] == [(256, 192, 3), (128, 96, 3), (64, 48, 3)]
    assert not isinstance(data[0], np.ndarray)  # still the lazy zarr level
    assert kwargs["scale"] == (0.5, 0.5) and kwargs["translate"] == (0.25, 0.25)
    np.testing.assert_array_equal(np.asarray(data[0][:]), rgb)


# ---------------------------------------------------------------------------- reader probe
def test_get_reader_accepts_imzml_pairs(imzml_file):
    path, _, _ = imzml_file
    assert napari_get_reader(str(path)) is read_imzml
    assert napari_get_reader(path) is read_imzml
    assert napari_get_reader([str(path), str(path)]) is read_imzml


def test_get_reader_declines_without_raising(imzml_file, tmp_path):
    path, _, _ = imzml_file
    lonely = tmp_path / "lonely.imzML"
    lonely.write_text(path.read_text())  # valid XML but no .ibd beside it
    png = tmp_path / "image.png"
    png.write_bytes(b"\x89PNG")
    for candidate in [
        str(lonely),
        str(png),
        str(tmp_path),  # a directory
        str(tmp_path / "missing.imzML"),
        [str(path), str(png)],  # a list with one unreadable file
        [],
        12,
        None,
        "\0bad",
    ]:
        assert napari_get_reader(candidate) is None, candidate


# ---------------------------------------------------------------------------- reader output
def test_read_imzml_layers(imzml_file):
    path, mode, spectra = imzml_file
    layers = read_imzml(str(path))
    assert [kw["name"] for _, kw, _ in layers] == [f"{path.stem} TIC", f"{path.stem} peaks (10 m/z)"]
    (tic, tic_kw, tic_type), (stack, stack_kw, stack_type) = layers
    assert tic_type == stack_type == "image"
    # TIC: the per-pixel sum, NaN where no spectrum was acquired, scale = pixel size in µm
    expected = np.full((6, 8), np.nan)
    for row, col, _, intensity in spectra:
        expected[row, col] = intensity.sum()
    np.testing.assert_allclose(tic, expected, rtol=1e-5, equal_nan=True)
    assert np.isnan(tic[2, 3])
    assert tic_kw["scale"] == (20.0, 20.0) and tic_kw["translate"] == (10.0, 10.0)
    # peaks: a labelled (channels, rows, cols) stack on the same grid
    assert stack.shape == (10, 6, 8) and np.isnan(stack[:, 2, 3]).all()
    assert stack_kw["scale"] == (1.0, 20.0, 20.0) and stack_kw["translate"] == (0.0, 10.0, 10.0)
    mz = stack_kw["metadata"]["mz"]
    assert len(mz) == 10 and mz == sorted(mz)
    assert stack_kw["metadata"]["channel_names"] == [f"m/z {m:.4f}" for m in mz]
    assert stack_kw["metadata"]["source_path"] == str(path)
    low, high = stack_kw["contrast_limits"]
    assert np.isfinite(low) and high > low
    if mode == "processed":
        # the planted ion at m/z 500 is the strongest peak; its image is 100 + 10 row + col
        k = int(np.argmin(np.abs(np.array(mz) - 500.0)))
        assert abs(mz[k] - 500.0) < 500.0 * 5e-6
        rows, cols = np.mgrid[0:6, 0:8]
        planted = (100.0 + 10 * rows + cols).astype(float)
        planted[2, 3] = np.nan
        np.testing.assert_allclose(stack[k], planted, atol=10.0, equal_nan=True)  # + at most one noise peak


def test_imzml_layers_follow_options(imzml_file):
    path, _, _ = imzml_file
    layers = imzml_layers(open_imzml(path), n_peaks=3, tol="0.5da", norm="tic")
    stack, kw, _ = layers[1]
    assert stack.shape == (3, 6, 8)
    assert kw["metadata"]["tolerance"] == "0.5da" and kw["metadata"]["normalization"] == "tic"
    assert all(high - low == pytest.approx(1.0) for low, high in kw["metadata"]["windows"])


def test_read_imzml_without_pixel_size_uses_scale_one(tmp_path):
    spectra = [
        (r, c, np.array([100.0, 200.0]), np.array([1.0, 2.0 + r], np.float32)) for r in range(3) for c in range(4)
    ]
    path = write_imzml(tmp_path / "nosize.imzML", spectra, mode="processed")
    tic, kw, _ = read_imzml(path)[0]
    assert kw["scale"] == (1.0, 1.0) and kw["translate"] == (0.5, 0.5)
    np.testing.assert_allclose(tic[:, 0], [3.0, 4.0, 5.0])


def test_read_imzml_raises_naming_the_file(imzml_file):
    path, _, _ = imzml_file
    ibd = path.with_suffix(".ibd")
    ibd.write_bytes(ibd.read_bytes()[:100])  # truncated: the probe still says yes (cheap check)
    assert napari_get_reader(str(path)) is read_imzml
    with pytest.raises(ImzMLError, match="truncated") as info:
        read_imzml(str(path))
    assert path.name in str(info.value)


# ---------------------------------------------------------------------------- napari
@pytest.mark.gui
def test_viewer_open_imzml(make_napari_viewer, imzml_file):
    path, _, _ = imzml_file
    viewer = make_napari_viewer()
    layers = viewer.open(str(path), plugin="napari-smsdl")
    assert [layer.name for layer in layers] == [f"{path.stem} TIC", f"{path.stem} peaks (10 m/z)"]
    tic, peaks = viewer.layers[f"{path.stem} TIC"], viewer.layers[f"{path.stem} peaks (10 m/z)"]
    assert tic.data.shape == (6, 8) and peaks.data.shape == (10, 6, 8)
    np.testing.assert_allclose(tic.scale, [20.0, 20.0])
    np.testing.assert_allclose(peaks.scale, [1.0, 20.0, 20.0])
    np.testing.assert_allclose(peaks.translate, [0.0, 10.0, 10.0])
    # both layers cover the same 120 µm × 160 µm field in world coordinates
    for layer in (tic, peaks):
        world = layer.extent.world[:, -2:]
        np.testing.assert_allclose(world[1] - world[0] + 20.0, [120.0, 160.0])
    assert len(peaks.metadata["mz"]) == 10
