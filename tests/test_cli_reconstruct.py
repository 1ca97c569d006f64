"""The `smsdl benchmark` and `smsdl reconstruct` contracts on small real inputs."""

from __future__ import annotations

import json
import re
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


def test_benchmark_contract(small_pair, tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["benchmark", "--he", str(small_pair / "he.png"), "--msi", str(small_pair / "truth.npy"),
            "--factor", "4", "--seed", "3", *QUICK, "-o", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    for method in ("smsdl", "bicubic", "backprojection", "cnn"):  # the H&E-free control is scored by default
        for metric in ("rmse", "ssim", "r2", "psnr", "pearson"):
            entry = metrics[method][metric]
            assert isinstance(entry["mean"], float) and len(entry["per_channel"]) == 5
            assert entry["mean"] == pytest.approx(np.mean(entry["per_channel"]))
        assert metrics[method]["seconds"] >= 0 and method in metrics["seconds"]
        stack = tifffile.imread(out / f"sr_{method}.ome.tif")
        assert stack.shape == (5, 32, 32) and stack.dtype == np.float32
    assert (out / "figure.png").stat().st_size > 10_000
    # SMSDL's uncertainty: same shape and pixel size as its SR stack
    with tifffile.TiffFile(out / "uncertainty_smsdl.ome.tif") as tif, tifffile.TiffFile(out / "sr_smsdl.ome.tif") as sr:
        spread = tif.asarray()
        assert spread.shape == sr.asarray().shape and spread.dtype == np.float32 and (spread >= 0).all()
        size = re.compile(r'PhysicalSizeX="([^"]+)"')
        assert size.findall(tif.ome_metadata) == size.findall(sr.ome_metadata) == ["1.0"]
    assert not (out / "uncertainty_bicubic.ome.tif").exists()
    guidance = metrics["smsdl"]["guidance"]
    assert all(len(guidance[k]) == 5 for k in ("gain", "gain_std", "used_histology"))
    assert "uncertainty_spearman" in metrics["smsdl"] and metrics["settings"]["force_histology"] is False
    names = metrics["settings"]["channels"]
    line = next(x for x in printed.splitlines() if x.startswith("SMSDL used the H&E on"))
    used = sum(guidance["used_histology"])
    assert f"on {used} of 5 channels" in line
    assert all(names[i] in line for i, u in enumerate(guidance["used_histology"]) if not u)
    assert "backprojection: RMSE" in printed


def test_benchmark_force_histology_and_method_choice(small_pair, tmp_path, capsys):
    out = tmp_path / "forced"
    argv = ["benchmark", "--he", str(small_pair / "he.png"), "--msi", str(small_pair / "truth.npy"),
            "--factor", "4", *QUICK, "--methods", "smsdl,backprojection", "--force-histology", "-o", str(out)]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["smsdl"]["guidance"]["used_histology"] == [True] * 5  # no channel falls back
    assert metrics["settings"]["force_histology"] is True
    assert {"smsdl", "backprojection"} <= set(metrics) and "bicubic" not in metrics and "cnn" not in metrics
    assert "on 5 of 5 channels; no channel fell back" in capsys.readouterr().out
    # the control reproduces the measured block means of the tissue pixels
    from napari_smsdl.evaluation import degrade

    truth = np.load(small_pair / "truth.npy")
    mask_hr = np.isfinite(truth).all(0) & (np.nan_to_num(truth) != 0).any(0)
    lr, mask_lr = degrade(truth, mask_hr, 4)
    control = tifffile.imread(out / "sr_backprojection.ome.tif")
    np.testing.assert_allclose(control.reshape(5, 8, 4, 8, 4).mean(axis=(2, 4))[:, mask_lr], lr[:, mask_lr],
                               rtol=1e-4, atol=1e-4)
    assert main([*argv[:-2], "--methods", "smsdl,nope", "-o", str(out)]) != 0
    assert "unknown method(s) nope" in capsys.readouterr().err


def test_force_histology_sets_no_fallback_in_the_settings():
    from napari_smsdl.cli import build_parser
    from napari_smsdl.commands._common import settings_from_args

    for command in ("benchmark", "reconstruct"):
        base = [command, "--he", "h.png", "--msi", "m.npy", "--factor", "2", "-o", "o"]
        assert settings_from_args(build_parser().parse_args(base)).regression.fallback is True
        forced = settings_from_args(build_parser().parse_args([*base, "--force-histology"]))
        assert forced.regression.fallback is False


def test_reconstruct_writes_sr_stack_with_mz_names(tmp_path, capsys):
    from napari_smsdl.sample import write_sample

    sample = tmp_path / "sample"
    write_sample(sample)
    out = tmp_path / "sr"
    argv = ["reconstruct", "--he", str(sample / "he.png"), "--msi", str(sample / "msi.imzML"), "--mz", "760.5851",
            "--mz", "885.5499", "--factor", "2", "--he-pixel-size", "2.5", "--baselines", "bicubic,backprojection", *QUICK,
            "-o", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
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
    # the H&E-free control, SMSDL's uncertainty and its per-channel guidance and held-out choices
    control = tifffile.imread(out / "sr_backprojection.ome.tif")
    assert control.shape == (2, 64, 64) and set(run["outputs"]) == {"smsdl", "bicubic", "backprojection"}
    with tifffile.TiffFile(out / "uncertainty_smsdl.ome.tif") as tif:
        assert tif.asarray().shape == (2, 64, 64) and 'PhysicalSizeX="20.0"' in tif.ome_metadata
    assert run["uncertainty"] == {"smsdl": str(out / "uncertainty_smsdl.ome.tif")}
    guidance = run["guidance"]["smsdl"]
    assert len(guidance["gain"]) == len(guidance["gain_std"]) == len(guidance["used_histology"]) == 2
    assert run["choices"]["smsdl"]["conservation"]["value"] in ("exact", "smooth", "none")
    line = next(x for x in printed.splitlines() if x.startswith("SMSDL used the H&E on"))
    assert all(run["channels"][i] in line for i, u in enumerate(guidance["used_histology"]) if not u)
    assert main([*argv[:-2], "--baselines", "bilinear", "-o", str(out)]) != 0
    assert "choose from bicubic, backprojection, cnn" in capsys.readouterr().err


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
