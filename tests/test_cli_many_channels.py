"""`smsdl reconstruct` with many channels: chunked SMSDL streamed to zarr, page-wise OME-TIFF, torchrun.

Inputs are small and real: an (80, 16, 16) ion stack mixed from the built-in sample's five ground
truth channels (degraded by F = 2), its 128 × 128 H&E crop, and the sample's imzML.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from napari_smsdl.cli import main

QUICK = ["--fast", "--ssl-steps", "3", "--regression-steps", "20"]
N_CHANNELS = 80  # above the automatic threshold (64): two chunks of the default 64
ENV = {**os.environ, "SMSDL_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """Folder with he.png (128 × 128) and lr.npy (80, 16, 16) + lr.npy.json channel names."""
    from skimage import io as skio

    from napari_smsdl.evaluation import degrade
    from napari_smsdl.sample import make_sample

    s = make_sample()
    lr5, mask = degrade(s.ground_truth[:, :32, :32], s.mask_hr[:32, :32], 2)
    weights = np.random.default_rng(0).uniform(0.0, 1.0, (N_CHANNELS, 5))
    weights[:5] = np.eye(5)  # the sample's own channels first
    lr = np.einsum("kc,chw->khw", weights, lr5).astype(np.float32)
    lr[:, ~mask] = 0.0
    folder = tmp_path_factory.mktemp("many")
    skio.imsave(folder / "he.png", s.he_rgb[:128, :128], check_contrast=False)
    np.save(folder / "lr.npy", lr)
    (folder / "lr.npy.json").write_text(json.dumps({"channel_names": [f"ion {i}" for i in range(N_CHANNELS)]}))
    return folder


def _argv(many, out, *extra):
    return ["reconstruct", "--he", str(many / "he.png"), "--msi", str(many / "lr.npy"), "--factor", "2",
            "--msi-pixel-size", "10", *QUICK, *extra, "-o", str(out)]


def test_chunked_reconstruct_streams_to_zarr_and_equals_the_api(many, tmp_path, capsys):
    import zarr

    from napari_smsdl.cli import build_parser
    from napari_smsdl.commands._common import settings_from_args
    from napari_smsdl.reconstruction import reconstruct_many_channels
    from napari_smsdl.reconstruction.baselines import backprojection_upsample, bicubic_upsample

    out = tmp_path / "out"
    argv = _argv(many, out, "--baselines", "bicubic,backprojection", "--project", str(tmp_path / "project"))
    assert main(argv) == 0  # 80 channels: chunked automatically, chunks of 64
    printed = capsys.readouterr().out
    run = json.loads((out / "run.json").read_text())
    for key in ("inputs", "channels", "mz", "factor", "msi_pixel_size_um", "sr_pixel_size_um", "he_pixel_size_um",
                "outputs", "seconds", "peak_memory_mb", "settings", "he_tiled"):  # the run.json contract
        assert key in run, key
    assert run["chunk_channels"] == 64 and run["sr_pixel_size_um"] == 5.0 and run["world_size"] == 1
    assert run["zarr"]["smsdl"] == str(out / "sr_smsdl.zarr") and run["channels"][7] == "ion 7"
    assert {"smsdl", "bicubic", "features", "total"} <= set(run["seconds"])

    lr = np.load(many / "lr.npy")
    with tifffile.TiffFile(out / "sr_smsdl.ome.tif") as tif:
        sr = tif.asarray()
        ome = tif.ome_metadata
    assert sr.shape == (N_CHANNELS, 32, 32) and sr.dtype == np.float32 and np.isfinite(sr).all()
    assert re.findall(r'<Channel [^>]*Name="([^"]*)"', ome) == [f"ion {i}" for i in range(N_CHANNELS)]
    assert 'PhysicalSizeX="5.0"' in ome and 'PhysicalSizeY="5.0"' in ome
    stored = zarr.open_array(str(out / "sr_smsdl.zarr"), path="sr", mode="r")
    assert stored.chunks[0] == 1 and stored.chunks[1] <= 32  # one channel per chunk; no padding past the grid
    np.testing.assert_array_equal(stored[:], sr)  # the OME-TIFF is the zarr store, page by page

    # the forward model: each F x F block of the SR stack averages back to its measured MSI pixel
    mask = (lr != 0).any(0)
    pooled = sr.reshape(N_CHANNELS, 16, 2, 16, 2).mean(axis=(2, 4))
    close = np.isclose(pooled[:, mask], lr[:, mask], rtol=1e-4, atol=1e-6 * float(lr.max()))
    assert close.mean() > 0.99, close.mean()  # the rest: blocks whose rescale ratio was clipped to [0.25, 4]
    assert np.corrcoef(pooled[:, mask].ravel(), lr[:, mask].ravel())[0, 1] > 0.99

    # bicubic streamed chunk by chunk = bicubic of the whole stack
    bicubic = tifffile.imread(out / "sr_bicubic.ome.tif")
    np.testing.assert_allclose(bicubic, bicubic_upsample(lr, 2, mask_lr=mask), rtol=1e-6, atol=1e-6)
    assert (out / "figure.png").stat().st_size > 5_000
    # the H&E-free control streamed chunk by chunk = the control of the whole stack
    control = tifffile.imread(out / "sr_backprojection.ome.tif")
    np.testing.assert_allclose(control, backprojection_upsample(lr, 2, mask_lr=mask), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(control.reshape(N_CHANNELS, 16, 2, 16, 2).mean(axis=(2, 4))[:, mask], lr[:, mask],
                               rtol=1e-4, atol=1e-4)
    # SMSDL's uncertainty (from the SMSDL store) and per-channel guidance, for every channel
    with tifffile.TiffFile(out / "uncertainty_smsdl.ome.tif") as tif:
        spread = tif.asarray()
        assert 'PhysicalSizeX="5.0"' in tif.ome_metadata
    assert spread.shape == sr.shape and spread.dtype == np.float32 and (spread >= 0).all()
    np.testing.assert_array_equal(spread, zarr.open_array(str(out / "sr_smsdl.zarr"), path="uncertainty", mode="r")[:])
    assert run["uncertainty"] == {"smsdl": str(out / "uncertainty_smsdl.ome.tif")}
    guidance = run["guidance"]["smsdl"]
    assert all(len(guidance[k]) == N_CHANNELS for k in ("gain", "gain_std", "used_histology", "weight"))
    assert len(run["choices"]["smsdl"]) == 2  # one record per chunk of 64
    fell = [run["channels"][i] for i, u in enumerate(guidance["used_histology"]) if not u]
    line = next(x for x in printed.splitlines() if x.startswith("SMSDL used the H&E on"))
    assert f"on {N_CHANNELS - len(fell)} of {N_CHANNELS} channels" in line
    assert all(name in line for name in fell[:20])

    # the Python API with the same settings (features from the run's cache) gives the same stack
    settings = settings_from_args(build_parser().parse_args(argv))
    from skimage import io as skio

    api = reconstruct_many_channels(
        lr, skio.imread(many / "he.png"), he_pixel_size_um=run["he_pixel_size_um"], msi_pixel_size_um=10.0,
        out=tmp_path / "api", settings=settings, cache_dir=out / "cache", chunk_channels=64,
    )
    assert api.features_from_cache and set(api.sr) == {"smsdl"}
    np.testing.assert_allclose(api.sr["smsdl"].read(), sr, rtol=1e-5, atol=1e-6 * float(sr.max()))

    # --project saved a lazy project; reopening it writes the same stacks without computing
    again = tmp_path / "again"
    assert run["project"] == str(tmp_path / "project")
    assert main(["reconstruct", "--project", str(tmp_path / "project"), "-o", str(again)]) == 0
    for name in ("smsdl", "bicubic", "backprojection"):
        np.testing.assert_array_equal(tifffile.imread(again / f"sr_{name}.ome.tif"),
                                      tifffile.imread(out / f"sr_{name}.ome.tif"))
    np.testing.assert_array_equal(tifffile.imread(again / "uncertainty_smsdl.ome.tif"), spread)
    rerun = json.loads((again / "run.json").read_text())
    assert rerun["channels"][79] == "ion 79" and rerun["guidance"] == run["guidance"]


def test_chunked_path_runs_every_method_and_forced_chunks_with_a_whole_slide(many, sample_dir, tmp_path):
    # 80 channels (two chunks of 64 + 16) with the CNN too: every method runs on the chunked path
    out = tmp_path / "all"
    assert main(_argv(many, out, "--baselines", "bicubic,cnn", "--cnn-iterations", "1")) == 0
    for name in ("smsdl", "bicubic", "cnn"):
        assert tifffile.imread(out / f"sr_{name}.ome.tif").shape == (N_CHANNELS, 32, 32)
    assert np.isfinite(tifffile.imread(out / "sr_cnn.ome.tif")).all()

    # --chunk-channels forces the chunked path below the threshold; here with a whole-slide H&E
    # (tiled features read from their zarr store) and the imzML's ion images streamed to zarr
    from skimage import io as skio

    from napari_smsdl.io import write_pyramidal_tiff

    slide = write_pyramidal_tiff(tmp_path / "he.ome.tif", skio.imread(sample_dir / "he.png"), pixel_size_um=2.5,
                                 n_levels=2)
    out = tmp_path / "forced"
    argv = ["reconstruct", "--he", str(slide), "--msi", str(sample_dir / "msi.imzML"), "--mz", "760.5851", "--mz",
            "885.5499", "--mz", "734.5694", "--factor", "2", "--tiled", "--chunk-channels", "2", *QUICK, "-o", str(out)]
    assert main(argv) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["chunk_channels"] == 2 and run["msi_store"] == str(out / "msi_lr.zarr") and run["he_tiled"] is True
    assert list((out / "cache").glob("features-tiled-*.zarr"))
    with tifffile.TiffFile(out / "sr_smsdl.ome.tif") as tif:
        sr = tif.asarray()
        assert sr.shape == (3, 64, 64) and np.isfinite(sr).all() and 'Name="m/z 885.5499"' in tif.ome_metadata


@pytest.mark.parametrize("norm", ["none", "tic"])
def test_imzml_ion_images_stream_to_zarr_in_passes(sample_dir, tmp_path, monkeypatch, norm):
    """The chunked reader: several passes over the file give the in-memory ion images exactly."""
    import argparse

    from napari_smsdl.commands import _common

    args = argparse.Namespace(mz=[], peaks=40, tol="10ppm", norm=norm, shape=None, msi_pixel_size=None)
    ref = _common.load_msi(str(sample_dir / "msi.imzML"), args)
    assert not ref.lazy and ref.data.shape[0] == 40
    ds_bytes = 1020 * 16 + 32 * 32 * 4  # per channel, as _stream_ion_images counts it
    monkeypatch.setattr(_common, "MSI_PASS_BYTES", 16 * ds_bytes)  # 16 channels per pass: 3 passes
    lazy = _common.load_msi(str(sample_dir / "msi.imzML"), args, lazy_above=32, store=tmp_path / "lr.zarr",
                            chunk_channels=8)
    assert lazy.lazy and lazy.store == str(tmp_path / "lr.zarr") and lazy.data.chunks == (8, 32, 32)
    assert lazy.channel_names == ref.channel_names and lazy.mz == ref.mz
    np.testing.assert_array_equal(lazy.data[:], ref.data)  # NaN where no spectrum, in both
    # a 3-D .npy above the threshold is memory-mapped, not read
    np.save(tmp_path / "s.npy", ref.data)
    mm = _common.load_msi(str(tmp_path / "s.npy"), args, lazy_above=32)
    assert mm.lazy and isinstance(mm.data, np.memmap) and mm.channel_names[3] == "channel 3"


def test_page_wise_tiff_from_zarr_equals_in_memory_write(tmp_path, monkeypatch):
    import zarr

    from napari_smsdl.io import _export as export

    rng = np.random.default_rng(2)
    stack = rng.uniform(0, 100, (11, 9, 13)).astype(np.float32)
    stack[3, 0, 0] = np.nan
    arr = zarr.create_array(str(tmp_path / "s.zarr"), shape=stack.shape, chunks=(4, 5, 13), dtype="float32")
    arr[:] = stack
    monkeypatch.setattr(export, "PAGE_READ_BYTES", 3 * 9 * 13 * 4)  # 3 channels per read: not the chunk's 4
    names = [f"c{i}" for i in range(11)]
    a = export.write_tiff_stack(tmp_path / "mem.ome.tif", stack, channel_names=names, pixel_size_um=2.5)
    b = export.write_tiff_stack(tmp_path / "lazy.ome.tif", arr, channel_names=names, pixel_size_um=2.5)
    with tifffile.TiffFile(a) as ta, tifffile.TiffFile(b) as tb:
        np.testing.assert_array_equal(tb.asarray(), ta.asarray())
        assert len(tb.pages) == 11 and tb.series[0].axes == "CYX"
        strip = lambda text: re.sub(r'UUID="[^"]*"', "", text)  # noqa: E731 - a fresh UUID per file
        assert strip(tb.ome_metadata) == strip(ta.ome_metadata) and 'Name="c10"' in tb.ome_metadata
    np.testing.assert_array_equal(tifffile.imread(b), stack)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lazy.ome.tif", "mem.ome.tif", "s.zarr"]  # no temp files

    class Failing:  # a reader that breaks mid-stack leaves no file and no temporary behind
        shape, dtype = stack.shape, stack.dtype

        def __getitem__(self, key):
            raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        export.write_tiff_stack(tmp_path / "broken.ome.tif", Failing())
    assert not list(tmp_path.glob("*broken*"))


def _torchrun(argv, cwd, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "napari_smsdl",
           *argv]
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_torchrun_reconstruct_matches_one_process(many, tmp_path):
    """`torchrun --nproc_per_node=2 -m napari_smsdl reconstruct` (gloo, CPU) on the chunked path, rank 0 writes.

    80 channels, chunks of 40 (one per rank): rank 0's features broadcast, each rank trains its own
    chunk with the seeds one process uses: the same stack to float rounding. (The in-memory path
    under torchrun, DDP regression through the CLI, is `test_distributed.test_two_ranks_match_one_process`.)
    """
    chunked = _argv(many, tmp_path / "two", "--chunk-channels", "40", "--baselines", "bicubic", "--device", "cpu")
    proc = _torchrun(chunked, tmp_path)
    assert proc.stdout.count("wrote ") == 1  # rank 0 alone prints
    assert main([*chunked[:-1], str(tmp_path / "one")]) == 0
    one, two = (json.loads((tmp_path / d / "run.json").read_text()) for d in ("one", "two"))
    assert two["world_size"] == 2 and one["world_size"] == 1 and two["chunk_channels"] == 40
    files = {"run.json", "figure.png", "figure.pdf", "sr_smsdl.ome.tif", "sr_bicubic.ome.tif", "sr_smsdl.zarr",
             "sr_bicubic.zarr", "uncertainty_smsdl.ome.tif", "cache", "vit_weights.pt"}
    assert set(os.listdir(tmp_path / "two")) == set(os.listdir(tmp_path / "one")) == files
    for name in ("sr_smsdl", "sr_bicubic", "uncertainty_smsdl"):
        a, b = (tifffile.imread(tmp_path / d / f"{name}.ome.tif") for d in ("one", "two"))
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * float(a.max()))
    # every rank's chunk's guidance, merged in channel order by rank 0; the fallback line printed once
    assert len(two["guidance"]["smsdl"]["used_histology"]) == N_CHANNELS
    assert two["guidance"]["smsdl"]["used_histology"] == one["guidance"]["smsdl"]["used_histology"]
    assert proc.stdout.count("SMSDL used the H&E on") == 1


def test_channels_last_npy_is_read_channels_first_on_the_lazy_branch(tmp_path):
    """A (rows, cols, 3) export (UMAP, RGB) is 3 channels, on the memory-mapped branch as in memory."""
    import argparse

    from napari_smsdl.commands._common import load_msi

    hwc = np.random.default_rng(1).random((80, 72, 3)).astype(np.float32)
    np.save(tmp_path / "hwc.npy", hwc)
    args = argparse.Namespace(shape=None)
    lazy = load_msi(str(tmp_path / "hwc.npy"), args, lazy_above=0)
    whole = load_msi(str(tmp_path / "hwc.npy"), args)
    assert np.asarray(lazy.data).shape == whole.data.shape == (3, 80, 72)
    np.testing.assert_array_equal(np.asarray(lazy.data), np.moveaxis(hwc, -1, 0))


def test_tiff_stack_of_many_channels_is_read_page_by_page(tmp_path):
    """A (C, rows, cols) OME-TIFF of many channels stays on disk (zarr over its pages), names and pixel size kept."""
    import argparse

    import zarr

    from napari_smsdl.commands._common import load_msi
    from napari_smsdl.io import read_ion_stack, write_tiff_stack

    stack = np.random.default_rng(2).random((70, 12, 10)).astype(np.float32)
    names = [f"m/z {500 + i:.1f}" for i in range(70)]
    write_tiff_stack(tmp_path / "ions.ome.tif", stack, channel_names=names, pixel_size_um=20.0)
    args = argparse.Namespace(shape=None)
    lazy = load_msi(str(tmp_path / "ions.ome.tif"), args, lazy_above=64)
    assert lazy.lazy and isinstance(lazy.data, zarr.Array) and lazy.data.shape == (70, 12, 10)
    assert lazy.channel_names == tuple(names) and lazy.pixel_size_um == 20.0
    whole = read_ion_stack(tmp_path / "ions.ome.tif")
    np.testing.assert_array_equal(np.asarray(lazy.data[:]), whole.data)
    few = load_msi(str(tmp_path / "ions.ome.tif"), args, lazy_above=100)  # below the threshold: in memory
    assert not few.lazy and isinstance(few.data, np.ndarray)
