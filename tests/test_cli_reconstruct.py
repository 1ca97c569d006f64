"""The `smsdl benchmark` and `smsdl reconstruct` contracts on small real inputs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from napari_smsdl.cli import main

QUICK = ["--fast", "--ssl-steps", "3", "--regression-steps", "20", "--cnn-iterations", "5"]


@pytest.fixture(scope="module")
def small_pair(tmp_path_factory):
    """A 160 x 160 H&E crop and a (5, 32, 32) ground truth covering the same field of view."""
    from skimage import io as skio

    from napari_smsdl.sample import make_sample

    s = make_sample()
    folder = tmp_path_factory.mktemp("pair")
    skio.imsave(folder / "he.png", s.he_rgb[:128, :128], check_contrast=False)
    truth = np.where(s.mask_hr, s.ground_truth, np.nan)[:, :32, :32]
    np.save(folder / "truth.npy", truth)
    return folder


def test_benchmark_contract(small_pair, tmp_path):
    out = tmp_path / "bench"
    argv = ["benchmark", "--he", str(small_pair / "he.png"), "--msi", str(small_pair / "truth.npy"),
            "--factor", "4", "--seed", "3", *QUICK, "-o", str(out)]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for method in ("smsdl", "bicubic", "cnn"):
        for metric in ("rmse", "ssim", "r2", "psnr", "pearson"):
            entry = metrics[method][metric]
            assert isinstance(entry["mean"], float) and len(entry["per_channel"]) == 5
            assert entry["mean"] == pytest.approx(np.mean(entry["per_channel"]))
        assert metrics[method]["seconds"] >= 0 and method in metrics["seconds"]
        stack = tifffile.imread(out / f"sr_{method}.ome.tif")
        assert stack.shape == (5, 32, 32) and stack.dtype == np.float32
    assert (out / "figure.png").stat().st_size > 10_000


def test_reconstruct_writes_sr_stack_with_mz_names(tmp_path):
    from napari_smsdl.sample import write_sample

    sample = tmp_path / "sample"
    write_sample(sample)
    out = tmp_path / "sr"
    argv = ["reconstruct", "--he", str(sample / "he.png"), "--msi", str(sample / "msi.imzML"), "--mz", "760.5851",
            "--mz", "885.5499", "--factor", "2", "--he-pixel-size", "2.5", "--baselines", "bicubic", *QUICK, "-o", str(out)]
    assert main(argv) == 0
    with tifffile.TiffFile(out / "sr_smsdl.ome.tif") as tif:
        stack = tif.asarray()
        ome = tif.ome_metadata
    assert stack.shape == (2, 64, 64)
    assert 'Name="m/z 760.5851"' in ome and 'PhysicalSizeX="20.0"' in ome
    assert (out / "sr_bicubic.ome.tif").exists() and (out / "figure.png").exists()
    run = json.loads((out / "run.json").read_text())
    assert run["sr_pixel_size_um"] == 20.0 and run["msi_pixel_size_um"] == 40.0
    # two channels: the in-memory path (nothing streamed to zarr), one process
    assert run["chunk_channels"] is None and run["world_size"] == 1 and not list(out.glob("*.zarr"))


@pytest.mark.parametrize("case", ["truth too small", "missing H&E"])
def test_benchmark_bad_input_is_one_line(small_pair, tmp_path, case):
    bad = tmp_path / "truth.npy"
    np.save(bad, np.ones((3, 5, 5)))
    he = small_pair / "he.png" if case == "truth too small" else tmp_path / "none.png"
    proc = subprocess.run(
        [sys.executable, "-m", "napari_smsdl", "benchmark", "--he", str(he), "--msi", str(bad),
         "--factor", "4", "-o", str(tmp_path / "o")], capture_output=True, text=True,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert ("truth.npy" in proc.stderr and "too small" in proc.stderr) if case == "truth too small" else (
        "none.png" in proc.stderr and "not found" in proc.stderr)


def test_reconstruct_tiled_whole_slide_path(tmp_path):
    """--tiled reads a pyramidal OME-TIFF lazily and computes the features tile by tile."""
    from napari_smsdl.io import write_pyramidal_tiff
    from napari_smsdl.sample import write_sample

    sample = tmp_path / "sample"
    write_sample(sample)
    from skimage import io as skio

    slide = write_pyramidal_tiff(tmp_path / "he.ome.tif", skio.imread(sample / "he.png"), pixel_size_um=2.5, n_levels=2)
    out = tmp_path / "sr"
    argv = ["reconstruct", "--he", str(slide), "--msi", str(sample / "msi.imzML"), "--mz", "760.5851", "--mz", "885.5499",
            "--factor", "2", "--tiled", "--baselines", "bicubic,cnn", *QUICK, "-o", str(out)]
    assert main(argv) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["he_tiled"] is True and run["he_pixel_size_um"] == 2.5
    for method in ("smsdl", "bicubic", "cnn"):
        stack = tifffile.imread(out / f"sr_{method}.ome.tif")
        assert stack.shape == (2, 64, 64) and np.isfinite(stack).all()
    assert list((out / "cache").glob("features-tiled-*.zarr"))
