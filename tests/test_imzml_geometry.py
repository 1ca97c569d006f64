"""imzML geometry as instruments write it: offset origins, x ≠ y pixel sizes, several regions.

Every file is written by pyimzML's own writer (``pyimzml.ImzMLWriter``) at absolute instrument
positions; the pixel sizes, which that writer does not record, are added to its scan settings as
IMS:1000046 / IMS:1000047 cvParams, as instruments write them.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from napari_smsdl._reader import read_imzml
from napari_smsdl.cli import main
from napari_smsdl.errors import ImzMLError, InputError
from napari_smsdl.io import open_imzml

AXIS = np.array([500.0, 550.0, 600.0, 650.0, 700.0])
PEAKS = [500.0, 600.0, 700.0]


def _planted(x: int, y: int) -> np.ndarray:
    """Intensities on AXIS of the spectrum at imzML position (x, y): x, y, 1000 + 10 y + x at the peaks."""
    return np.array([x, 0.0, y, 0.0, 1000.0 + 10 * y + x], np.float32)


def _write(path, positions_xy, *, size_xy=None, mode="continuous"):
    """An imzML written by pyimzML's writer at the given 1-based (x, y) positions, in that order."""
    from pyimzml.ImzMLWriter import ImzMLWriter

    with ImzMLWriter(str(path.with_suffix("")), mode=mode) as writer:
        for x, y in positions_xy:
            writer.addSpectrum(AXIS, _planted(x, y), (int(x), int(y)))
    if size_xy is not None:
        text = path.read_text()
        params = (
            f'<cvParam cvRef="IMS" accession="IMS:1000046" name="pixel size (x)" value="{size_xy[0]}"/>\n'
            f'<cvParam cvRef="IMS" accession="IMS:1000047" name="pixel size y" value="{size_xy[1]}"/>\n'
            "</scanSettings>"
        )
        path.write_text(text.replace("</scanSettings>", params, 1))
    return path


def _block(x0, y0, n_x, n_y):
    return [(x, y) for y in range(y0, y0 + n_y) for x in range(x0, x0 + n_x)]


# ---------------------------------------------------------------------------- offset origin
@pytest.mark.parametrize("mode", ["continuous", "processed"])
def test_offset_acquisition_is_cropped_and_keeps_its_origin(tmp_path, mode):
    path = _write(tmp_path / "offset.imzML", _block(101, 51, 8, 6), size_xy=(20, 20), mode=mode)
    ds = open_imzml(path)
    assert ds.shape == (6, 8)  # not (56, 108): the bounding box
    assert ds.offset_rc_px == (50, 100)
    assert ds.origin_rc_um == (1000.0, 2000.0)
    assert ds.pixel_size_um == 20.0
    images = ds.ion_images(PEAKS, "0.01da").data
    rows, cols = np.mgrid[0:6, 0:8]
    x, y = cols + 101, rows + 51
    np.testing.assert_array_equal(images[0], x)
    np.testing.assert_array_equal(images[1], y)
    np.testing.assert_array_equal(images[2], 1000.0 + 10 * y + x)
    # the layers sit where the instrument acquired them: corner at (1000, 2000) µm
    (tic, tic_kw, _), (stack, stack_kw, _) = read_imzml(path)
    assert tic.shape == (6, 8) and stack.shape == (3, 6, 8)
    assert tic_kw["scale"] == (20.0, 20.0) and tic_kw["translate"] == (1010.0, 2010.0)
    assert stack_kw["scale"] == (1.0, 20.0, 20.0) and stack_kw["translate"] == (0.0, 1010.0, 2010.0)
    assert stack_kw["metadata"]["offset_rc_px"] == (50, 100)
    # the CLI's reader keeps the origin too (a project saved from it is reopened there)
    import argparse

    from napari_smsdl.commands._common import load_msi

    args = argparse.Namespace(mz=list(PEAKS), peaks=5, tol="0.01da", norm="none", shape=None, msi_pixel_size=None)
    assert load_msi(str(path), args).origin_rc_um == (1000.0, 2000.0)


def test_offset_without_pixel_size_is_placed_in_pixels(tmp_path):
    path = _write(tmp_path / "nosize.imzML", _block(11, 4, 3, 2))
    ds = open_imzml(path)
    assert ds.shape == (2, 3) and ds.pixel_size_xy_um is None and ds.pixel_size_um is None
    tic_kw = read_imzml(path)[0][1]
    assert tic_kw["scale"] == (1.0, 1.0) and tic_kw["translate"] == (3.5, 10.5)


def test_pixel_size_given_when_the_file_has_none(tmp_path):
    path = _write(tmp_path / "nosize.imzML", _block(1, 1, 3, 2))
    assert open_imzml(path, pixel_size_um=15.0).pixel_size_xy_um == (15.0, 15.0)
    sized = _write(tmp_path / "sized.imzML", _block(1, 1, 3, 2), size_xy=(7.5, 7.5))
    assert open_imzml(sized, pixel_size_um=15.0).pixel_size_um == 7.5  # the metadata wins


# ---------------------------------------------------------------------------- anisotropic
def test_anisotropic_pixels_each_axis_at_its_scale(tmp_path):
    path = _write(tmp_path / "aniso.imzML", _block(1, 1, 8, 6), size_xy=(10, 25))
    ds = open_imzml(path)
    assert ds.pixel_size_xy_um == (10.0, 25.0) and ds.pixel_size_rc_um == (25.0, 10.0)
    assert not ds.is_square
    (tic, tic_kw, _), (_, stack_kw, _) = read_imzml(path)
    assert tic_kw["scale"] == (25.0, 10.0) and tic_kw["translate"] == (12.5, 5.0)
    assert stack_kw["scale"] == (1.0, 25.0, 10.0)
    assert stack_kw["metadata"]["pixel_size_um"] is None
    assert stack_kw["metadata"]["pixel_size_xy_um"] == (10.0, 25.0)
    images = ds.ion_images([500.0], "0.01da")
    assert images.pixel_size_um is None and images.pixel_size_xy_um == (10.0, 25.0)


def test_anisotropic_pixels_refused_where_square_pixels_are_needed(tmp_path):
    path = _write(tmp_path / "aniso.imzML", _block(1, 1, 8, 6), size_xy=(10, 25))
    with pytest.raises(ImzMLError, match=r"not square \(x 10 µm, y 25 µm\).*super-resolution") as info:
        open_imzml(path).pixel_size_um  # noqa: B018 - the property is the check
    assert info.value.path == path
    # the pipeline's MSI loader (reconstruct, many-channels) asks for it, so it refuses the file
    from napari_smsdl.commands._common import load_msi

    args = argparse.Namespace(mz=[500.0], peaks=0, tol="0.01da", norm="none", msi_pixel_size=None)
    with pytest.raises(ImzMLError, match="aniso.imzML.*not square"):
        load_msi(str(path), args)


def test_one_pixel_size_stands_for_both(tmp_path):
    path = _write(tmp_path / "one.imzML", _block(1, 1, 3, 2))
    text = path.read_text().replace(
        "</scanSettings>", '<cvParam cvRef="IMS" accession="IMS:1000047" name="pixel size y" value="12"/>\n</scanSettings>'
    )
    path.write_text(text)
    assert open_imzml(path).pixel_size_xy_um == (12.0, 12.0)


# ---------------------------------------------------------------------------- regions
def _two_regions(tmp_path):
    # region 0: x 1..4, y 1..3 (12 spectra); region 1: x 21..25, y 11..14 (20), written after it
    return _write(tmp_path / "regions.imzML", _block(1, 1, 4, 3) + _block(21, 11, 5, 4), size_xy=(20, 20))


def test_disjoint_blocks_are_regions(tmp_path):
    ds = open_imzml(_two_regions(tmp_path))
    assert ds.shape == (14, 25)  # the whole file: both regions in place
    assert [r.bbox_rc_px for r in ds.regions] == [(0, 0, 3, 4), (10, 20, 4, 5)]
    assert [r.n_spectra for r in ds.regions] == [12, 20]
    second = ds.region(1)
    assert second.shape == (4, 5) and second.offset_rc_px == (10, 20) and second.n_spectra == 20
    assert second.origin_rc_um == (200.0, 400.0)
    image = second.ion_images([700.0], "0.01da").data[0]
    rows, cols = np.mgrid[0:4, 0:5]
    np.testing.assert_array_equal(image, 1000.0 + 10 * (rows + 11) + (cols + 21))
    assert open_imzml(ds.path, region=0).shape == (3, 4)
    with pytest.raises(ImzMLError, match="region 2 does not exist: the file has 2"):
        open_imzml(ds.path, region=2)


def test_reader_opens_each_region_on_its_own_grid(tmp_path):
    path = _two_regions(tmp_path)
    layers = read_imzml(path)
    names = [kw["name"] for _, kw, _ in layers]
    assert names == ["regions region 0 TIC", "regions region 0 peaks (3 m/z)",
                     "regions region 1 TIC", "regions region 1 peaks (3 m/z)"]
    (tic0, kw0, _), _, (tic1, kw1, _), (stack1, kws1, _) = layers
    assert tic0.shape == (3, 4) and tic1.shape == (4, 5) and stack1.shape == (3, 4, 5)
    assert kw0["translate"] == (10.0, 10.0) and kw1["translate"] == (210.0, 410.0)
    assert kws1["metadata"]["region"] == 1
    assert not np.isnan(tic1).any()


def test_a_dropped_scan_line_is_not_a_region(tmp_path):
    positions = [p for p in _block(1, 1, 6, 7) if p[1] != 4]  # row y = 4 never acquired
    ds = open_imzml(_write(tmp_path / "dropped.imzML", positions))
    assert len(ds.regions) == 1 and ds.shape == (7, 6)
    positions = [p for p in _block(1, 1, 6, 9) if p[1] not in (4, 5, 6)]  # three empty lines: two regions
    assert len(open_imzml(_write(tmp_path / "split.imzML", positions)).regions) == 2


# ---------------------------------------------------------------------------- smsdl info
def test_info_json_reports_geometry(tmp_path, capsys):
    path = _write(tmp_path / "aniso.imzML", _block(101, 51, 8, 6), size_xy=(10, 25))
    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["shape"] == [6, 8] and info["origin"] == [101, 51] and info["origin_um"] == [1000.0, 1250.0]
    assert info["pixel_size_um"] == [10.0, 25.0]
    assert info["regions"] == [{"origin": [101, 51], "shape": [6, 8], "n_spectra": 48}]
    assert info["acquired_fraction"] == 1.0

    assert main(["info", str(_two_regions(tmp_path)), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["pixel_size_um"] == 20.0 and info["origin"] == [1, 1]
    assert info["regions"] == [
        {"origin": [1, 1], "shape": [3, 4], "n_spectra": 12},
        {"origin": [21, 11], "shape": [4, 5], "n_spectra": 20},
    ]


def test_region_option_of_the_commands_reads_one_region(tmp_path, capsys):
    """Issue 15 leftover: `--region K` on the commands that read an MSI (ion, reconstruct, benchmark)."""
    import tifffile

    path = _two_regions(tmp_path)
    assert main(["ion", str(path), "--mz", "700", "--tol", "0.01da", "--region", "1", "-o", str(tmp_path / "r1.tif")]) == 0
    image = tifffile.imread(tmp_path / "r1.tif")
    rows, cols = np.mgrid[0:4, 0:5]
    np.testing.assert_array_equal(image, 1000.0 + 10 * (rows + 11) + (cols + 21))
    assert main(["ion", str(path), "--mz", "700", "--region", "5", "-o", str(tmp_path / "r5.tif")]) == 2
    assert "region 5 does not exist: the file has 2" in capsys.readouterr().err
    # the MSI-reading helper of reconstruct/benchmark: the region's grid, and refused on a non-imzML input
    from napari_smsdl.commands._common import add_msi_channel_args, load_msi

    parser = argparse.ArgumentParser()
    add_msi_channel_args(parser)
    msi = load_msi(str(path), parser.parse_args(["--mz", "700", "--tol", "0.01da", "--region", "0"]))
    assert msi.data.shape == (1, 3, 4)
    np.save(tmp_path / "stack.npy", np.ones((2, 4, 4), np.float32))
    with pytest.raises(InputError, match="--region selects a region of an imzML file"):
        load_msi(str(tmp_path / "stack.npy"), parser.parse_args(["--region", "0"]))
    from napari_smsdl.commands.register import load_msi_image

    tic, size = load_msi_image(path, region=1)  # `smsdl register --region 1`: that region's TIC
    assert tic.shape == (4, 5) and size == 20.0


def test_ion_command_keeps_both_pixel_sizes_of_an_anisotropic_file(tmp_path):
    """`smsdl ion` on x ≠ y pixels writes an OME-TIFF with PhysicalSizeX 10 and PhysicalSizeY 25 (it had none)."""
    import tifffile

    path = _write(tmp_path / "aniso.imzML", _block(1, 1, 8, 6), size_xy=(10, 25))
    out = tmp_path / "ions.ome.tif"
    assert main(["ion", str(path), "--mz", "500", "--tol", "0.01da", "-o", str(out)]) == 0
    with tifffile.TiffFile(out) as tif:
        xml = tif.ome_metadata
        assert tif.asarray().shape == (6, 8)  # one channel
    assert 'PhysicalSizeX="10.0"' in xml and 'PhysicalSizeY="25.0"' in xml
