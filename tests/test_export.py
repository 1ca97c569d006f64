"""Exports read back: OME-TIFF, continuous imzML at the SR pixel size (pyimzML and our reader), CSV."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import tifffile

from napari_smsdl.errors import InputError
from napari_smsdl.io import write_metrics_csv, write_sr_imzml, write_tiff_stack

MZ = (885.5499, 734.5694, 760.5851)  # deliberately not sorted


@pytest.fixture
def sr_stack():
    rng = np.random.default_rng(1)
    stack = rng.uniform(0, 1000, size=(3, 12, 10)).astype(np.float32)
    stack[:, 0, 0] = np.nan  # a pixel with no spectrum
    stack[1, 5, 5] = 0.0
    return stack


def test_ome_tiff_round_trip_with_names_and_pixel_size(tmp_path, sr_stack):
    path = write_tiff_stack(tmp_path / "sr.ome.tif", sr_stack, channel_names=["a", "b", "c"], pixel_size_um=2.5)
    with tifffile.TiffFile(path) as tif:
        back = tif.asarray()
        ome = tif.ome_metadata
    np.testing.assert_array_equal(back, sr_stack)
    assert 'Name="b"' in ome and 'PhysicalSizeX="2.5"' in ome
    assert not list(tmp_path.glob(".*tmp*"))


def test_sr_imzml_reads_back_with_pyimzml(tmp_path, sr_stack):
    from pyimzml.ImzMLParser import ImzMLParser

    path = write_sr_imzml(tmp_path / "sr.imzML", sr_stack, MZ, pixel_size_um=2.5)
    assert path.suffix == ".imzML" and path.with_suffix(".ibd").exists()
    parser = ImzMLParser(str(path))
    assert len(parser.coordinates) == 12 * 10 - 1  # the all-NaN pixel has no spectrum
    order = np.argsort(MZ)
    for index, (x, y, _) in enumerate(parser.coordinates):
        mz, intensity = parser.getspectrum(index)
        np.testing.assert_allclose(mz, np.asarray(MZ)[order])
        np.testing.assert_array_equal(intensity, sr_stack[order, y - 1, x - 1])
    text = path.read_text()
    assert "continuous" in text and 'accession="IMS:1000046" name="pixel size (x)" value="2.5"' in text


def test_sr_imzml_reads_back_with_our_reader(tmp_path, sr_stack):
    from napari_smsdl._reader import read_imzml
    from napari_smsdl.io import open_imzml

    path = write_sr_imzml(tmp_path / "sr.imzML", sr_stack, MZ, pixel_size_um=2.5)
    ds = open_imzml(path)
    assert ds.mode == "continuous" and ds.pixel_size_um == pytest.approx(2.5) and ds.shape == (12, 10)
    images = ds.ion_images(list(MZ), "10ppm").data
    expected = sr_stack.copy()
    expected[:, 0, 0] = np.nan
    np.testing.assert_allclose(images, expected, rtol=1e-6)
    layers = read_imzml(path)  # the napari reader: TIC + peaks, placed at 2.5 µm
    assert layers[0][1]["scale"] == (2.5, 2.5)


def test_sr_imzml_rejects_bad_mz(tmp_path, sr_stack):
    with pytest.raises(InputError, match="one m/z per channel"):
        write_sr_imzml(tmp_path / "a.imzML", sr_stack, MZ[:2], pixel_size_um=2.5)
    with pytest.raises(InputError, match="distinct"):
        write_sr_imzml(tmp_path / "a.imzML", sr_stack, (700.0, 700.0, 800.0), pixel_size_um=2.5)
    with pytest.raises(InputError, match="pixel size"):
        write_sr_imzml(tmp_path / "a.imzML", sr_stack, MZ, pixel_size_um=0)
    assert not list(tmp_path.iterdir())


def test_metrics_csv_rows_and_values(tmp_path):
    from napari_smsdl.evaluation import score_stack

    rng = np.random.default_rng(0)
    truth = rng.uniform(0, 1, (2, 16, 16))
    mask = np.ones((16, 16), bool)
    metrics = {
        "smsdl": {**score_stack(truth, truth + rng.normal(0, 0.05, truth.shape), mask), "seconds": 1.5},
        "bicubic": score_stack(truth, truth + rng.normal(0, 0.2, truth.shape), mask),
    }
    path = write_metrics_csv(tmp_path / "metrics.csv", metrics, channel_names=["m/z 1", "m/z 2"])
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["method"] for r in rows] == ["smsdl"] * 3 + ["bicubic"] * 3
    assert [r["channel"] for r in rows[:3]] == ["m/z 1", "m/z 2", "mean"]
    assert float(rows[1]["ssim"]) == metrics["smsdl"]["ssim"]["per_channel"][1]
    assert float(rows[5]["rmse"]) == metrics["bicubic"]["rmse"]["mean"]
    assert float(rows[2]["rmse"]) < float(rows[5]["rmse"])  # less noise, lower error
    with pytest.raises(ValueError, match="channel names"):
        write_metrics_csv(tmp_path / "bad.csv", metrics, channel_names=["only one"])


def test_guidance_csv_and_uncertainty_export(tmp_path):
    """Export writes SMSDL's uncertainty beside its SR stack and the per-channel histology gain as CSV."""
    from napari_smsdl.project import Project, export_results
    from napari_smsdl.reconstruction import Reconstruction, Settings

    rng = np.random.default_rng(3)
    sr = {m: rng.uniform(0, 10, (2, 8, 8)).astype(np.float32) for m in ("smsdl", "bicubic", "backprojection")}
    spread = rng.uniform(0, 1, (2, 8, 8)).astype(np.float32)
    guidance = {"gain": [0.25, -0.125], "gain_std": [0.0625, 0.5], "used_histology": [True, False]}
    recon = Reconstruction(sr, {}, np.zeros((16, 16, 3), np.float32), None, {}, Settings(factor=4),
                           uncertainty={"smsdl": spread}, guidance={"smsdl": guidance})
    project = Project.from_reconstruction(recon, lr_msi=rng.uniform(1, 10, (2, 2, 2)), channel_names=("m/z 1", "m/z 2"),
                                          msi_pixel_size_um=40.0, he_pixel_size_um=2.5)
    project = project.with_truth(rng.uniform(1, 10, (2, 8, 8)))
    written = export_results(project, tmp_path / "out", formats=("ome-tiff", "csv"))
    assert {"smsdl.ome.tif", "backprojection.ome.tif", "uncertainty_smsdl.ome.tif", "guidance.csv"} <= set(written)
    with tifffile.TiffFile(tmp_path / "out" / "uncertainty_smsdl.ome.tif") as tif:
        np.testing.assert_array_equal(tif.asarray(), spread)
        assert 'PhysicalSizeX="10.0"' in tif.ome_metadata and 'Name="m/z 2"' in tif.ome_metadata
    with (tmp_path / "out" / "guidance.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["method"], r["channel"], r["used_histology"]) for r in rows] == [
        ("smsdl", "m/z 1", "true"), ("smsdl", "m/z 2", "false")]
    assert float(rows[1]["histology_gain"]) == -0.125 and float(rows[0]["histology_gain_std"]) == 0.0625
    with (tmp_path / "out" / "metrics.csv").open() as fh:
        assert {r["method"] for r in csv.DictReader(fh)} == {"smsdl", "bicubic", "backprojection"}
