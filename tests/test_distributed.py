"""Real 2-process gloo jobs under torchrun (CPU): the same results as one process, rank 0 writes.

Every test starts ``python -m torch.distributed.run --standalone --nproc_per_node=2`` (what the
``torchrun`` script runs) with ``SMSDL_NUM_THREADS=1``, one core per rank on the 2-core CI box.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tifffile

from napari_smsdl import distributed as dd

QUICK = ["--fast", "--ssl-steps", "3", "--regression-steps", "20", "--cnn-iterations", "5"]
ENV = {**os.environ, "SMSDL_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


def _torchrun(args, cwd, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_sharding_helpers_without_a_process_group():
    assert not dd.is_initialized() and dd.get_rank() == 0 and dd.get_world_size() == 1 and dd.is_main_process()
    assert dd.shard(list(range(7)), 1, 3) == [1, 4] and dd.shard(list(range(7))) == list(range(7))
    parts = [dd.shard_range(10, r, 3) for r in range(3)]
    assert parts == [slice(0, 4), slice(4, 7), slice(7, 10)]
    np.testing.assert_array_equal(dd.all_reduce_sum([1.0, 2.0]), [1.0, 2.0])
    assert dd.broadcast_object({"a": 1}) == {"a": 1} and not dd.any_rank(False)
    assert dd.init_distributed("cpu") == dd.DistEnv()  # no torchrun environment: nothing to join


WORKER = textwrap.dedent(
    """
    import json, os, runpy, sys
    import numpy as np
    import torch.distributed as dist
    from napari_smsdl import distributed as dd
    from napari_smsdl.reconstruction import reconstruct_channels
    from napari_smsdl.features import FeatureParams, TilingParams, extract_features_tiled
    from napari_smsdl.reconstruction import RegressionParams, train_regression

    out, reg, feat, bench = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
    rank = int(os.environ["RANK"])
    # 1. the library under a process group of our own (a file store, so torchrun's store stays
    #    fresh for the CLI in step 2, which joins its own group as `-m napari_smsdl` does)
    dist.init_process_group("gloo", init_method="file://" + os.path.join(out, "store"), rank=rank, world_size=2)
    assert dd.is_distributed() and dd.get_rank() == rank
    d = np.load(os.path.join(out, "inputs.npz"))
    r = train_regression(d["features"], d["lr"], 4, mask_lr=d["mask"], params=RegressionParams(**reg), device="cpu")
    np.save(os.path.join(out, f"sr_rank{rank}.npy"), r.sr)
    np.save(os.path.join(out, f"hist_rank{rank}.npy"), np.array(r.loss_history))
    tf = extract_features_tiled(os.path.join(out, "slide.ome.tif"), msi_shape=(12, 12), msi_pixel_size_um=40.0, factor=4,
                                out=os.path.join(out, "tiled.zarr"), params=FeatureParams(**feat),
                                tiling=TilingParams(tile_cells=16, tile_guide_px=128), max_cell_px=4, device="cpu")
    json.dump(tf.ssl_losses, open(os.path.join(out, f"ssl_rank{rank}.json"), "w"))
    # in-memory features: rank 0 computes them alone, the other rank waits and receives them
    from napari_smsdl.features import extract_features
    guide = np.load(os.path.join(out, "guide.npy"))
    fm = extract_features(guide, sr_shape=(12 * 4, 12 * 4), factor=4,
                          params=FeatureParams(**{**feat, "ssl_steps": 6, "ssl_batch": 4}), device="cpu")
    np.save(os.path.join(out, f"mem_rank{rank}.npy"), fm.data)
    json.dump(fm.ssl_losses, open(os.path.join(out, f"mem_ssl_rank{rank}.json"), "w"))
    reconstruct_channels(d["features"], d["lr"], 4, os.path.join(out, "channels.zarr"), mask_lr=d["mask"],
                         chunk_channels=2, params=RegressionParams(**reg), device="cpu")
    dist.destroy_process_group()
    # 2. exactly `torchrun ... -m napari_smsdl benchmark ...`
    sys.argv = ["napari_smsdl", *bench]
    try:
        runpy.run_module("napari_smsdl", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        assert exc.code == 0, exc.code
    assert not dd.is_initialized()
    """
)


@pytest.fixture(scope="module")
def small_pair(tmp_path_factory):
    """A 128 x 128 H&E crop and a (5, 32, 32) ground truth covering the same field of view."""
    from skimage import io as skio

    from napari_smsdl.sample import make_sample

    s = make_sample()
    folder = tmp_path_factory.mktemp("pair")
    skio.imsave(folder / "he.png", s.he_rgb[:128, :128], check_contrast=False)
    np.save(folder / "truth.npy", np.where(s.mask_hr, s.ground_truth, np.nan)[:, :32, :32])
    return folder


def test_two_ranks_match_one_process(small_pair, tmp_path):
    """One 2-rank gloo job: DDP regression, tiled features, channel chunks and the benchmark CLI.

    * regression: identical SR on both ranks (rank 0's weights), close to one process;
    * tiled features (tiles and ViT levels shared between ranks) and channel chunks: the same
      numbers as one process;
    * ``torchrun --nproc_per_node=2 -m napari_smsdl benchmark``: the same files as ``smsdl
      benchmark``, written once, with SMSDL scores within tolerance and bicubic identical.
    """
    import dataclasses

    import zarr

    from napari_smsdl.cli import main
    from napari_smsdl.evaluation import degrade
    from napari_smsdl.features import FeatureParams, TilingParams, extract_features_tiled
    from napari_smsdl.io import write_pyramidal_tiff
    from napari_smsdl.reconstruction import RegressionParams, reconstruct_channels, train_regression
    from napari_smsdl.sample import make_sample

    s = make_sample()
    truth = s.ground_truth[:, :48, :48]
    lr, mask = degrade(truth, s.mask_hr[:48, :48], 4)
    rng = np.random.default_rng(0)
    features = np.concatenate([truth[:3] / truth[:3].max(), rng.normal(size=(5, 48, 48))]).astype(np.float32)
    np.savez(tmp_path / "inputs.npz", features=features, lr=lr, mask=mask)
    write_pyramidal_tiff(tmp_path / "slide.ome.tif", s.he_rgb[:192, :192], pixel_size_um=2.5, n_levels=2, tile=64)
    guide = (s.he_rgb[:192, :192].astype(np.float32) / 255.0)  # 48 x 48 SR cells of 4 x 4 px
    np.save(tmp_path / "guide.npy", guide)
    reg = RegressionParams(hidden=32, steps=40, folds=3, pca_dims=6, batch_pixels=64)
    feat = FeatureParams(embed_dim=8, depth=1, num_heads=1, ssl_steps=3, ssl_batch=2, shifts=1, tissue_tokens_msi_px=1)
    bench = ["benchmark", "--he", str(small_pair / "he.png"), "--msi", str(small_pair / "truth.npy"), "--factor", "4",
             "--seed", "3", *QUICK, "--methods", "smsdl,bicubic", "--device", "cpu"]
    (tmp_path / "worker.py").write_text(WORKER)
    proc = _torchrun(["worker.py", str(tmp_path), json.dumps(dataclasses.asdict(reg)), json.dumps(dataclasses.asdict(feat)),
                      json.dumps([*bench, "-o", str(tmp_path / "two")])], cwd=tmp_path)

    # regression (DDP)
    sr0, sr1 = np.load(tmp_path / "sr_rank0.npy"), np.load(tmp_path / "sr_rank1.npy")
    np.testing.assert_array_equal(sr0, sr1)  # rank 0's final weights on every rank
    np.testing.assert_array_equal(np.load(tmp_path / "hist_rank0.npy"), np.load(tmp_path / "hist_rank1.npy"))
    single = train_regression(features, lr, 4, mask_lr=mask, params=reg, device="cpu").sr
    # each rank draws batch/2 pixels of its own shard per step: other minibatches, same model and
    # steps, so the SR stacks agree to a few percent of the signal's spread
    tissue = np.repeat(np.repeat(mask, 4, 0), 4, 1)
    diff = np.sqrt(np.mean((sr0 - single)[:, tissue] ** 2)) / np.std(single[:, tissue])
    assert diff < 0.1, diff
    assert np.corrcoef(sr0[:, tissue].ravel(), single[:, tissue].ravel())[0, 1] > 0.99

    # tiled features: regional level trained on rank 1, tiles split between the ranks
    ref = extract_features_tiled(tmp_path / "slide.ome.tif", msi_shape=(12, 12), msi_pixel_size_um=40.0, factor=4,
                                 out=tmp_path / "single.zarr", params=feat,
                                 tiling=TilingParams(tile_cells=16, tile_guide_px=128), max_cell_px=4, device="cpu")
    ssl0, ssl1 = (json.loads((tmp_path / f"ssl_rank{r}.json").read_text()) for r in (0, 1))
    assert ssl0 == ssl1 and set(ssl0) == {"cellular", "regional", "tissue"}
    for level, losses in ref.ssl_losses.items():  # the same RNG stream as one process
        np.testing.assert_allclose(ssl0[level], losses, rtol=1e-5)
    got = np.asarray(zarr.open_array(str(tmp_path / "tiled.zarr"), path="features", mode="r")[:])
    np.testing.assert_allclose(got, ref.read(), atol=1e-4)

    # in-memory features: rank 0 computes alone and sends them, so both ranks hold one process's features
    mem0, mem1 = np.load(tmp_path / "mem_rank0.npy"), np.load(tmp_path / "mem_rank1.npy")
    np.testing.assert_array_equal(mem0, mem1)
    mem_ssl0, mem_ssl1 = (json.loads((tmp_path / f"mem_ssl_rank{r}.json").read_text()) for r in (0, 1))
    assert mem_ssl0 == mem_ssl1 and set(mem_ssl0) == {"cellular", "regional", "tissue"}
    from napari_smsdl.features import extract_features

    alone = extract_features(guide, sr_shape=(48, 48), factor=4,
                             params=dataclasses.replace(feat, ssl_steps=6, ssl_batch=4), device="cpu")
    for level, losses in alone.ssl_losses.items():  # the same crops in the same order as one process
        np.testing.assert_allclose(mem_ssl0[level], losses, rtol=1e-5)
    np.testing.assert_allclose(mem0, alone.data, atol=1e-4)

    # channel chunks: rank 0 trains chunks 1 and 3, rank 1 chunk 2
    chunks = reconstruct_channels(features, lr, 4, tmp_path / "one_channels.zarr", mask_lr=mask, chunk_channels=2,
                                  params=reg, device="cpu").read()
    two = np.asarray(zarr.open_array(str(tmp_path / "channels.zarr"), path="sr", mode="r")[:])
    np.testing.assert_allclose(two, chunks, rtol=1e-5, atol=1e-5 * float(chunks.max()))

    # the benchmark command
    assert main([*bench, "-o", str(tmp_path / "one")]) == 0
    assert proc.stdout.count("wrote ") == 1  # rank 0 alone prints
    one, two = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert two["settings"]["world_size"] == 2 and one["settings"]["world_size"] == 1
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one"))
    assert two["bicubic"]["rmse"] == one["bicubic"]["rmse"]  # not distributed: identical
    # SMSDL (tolerance): RMSE within 10 %, SSIM within 0.05, SR stacks correlated > 0.98
    assert abs(two["smsdl"]["rmse"]["mean"] - one["smsdl"]["rmse"]["mean"]) < 0.1 * one["smsdl"]["rmse"]["mean"]
    assert abs(two["smsdl"]["ssim"]["mean"] - one["smsdl"]["ssim"]["mean"]) < 0.05
    a, b = (tifffile.imread(tmp_path / d / "sr_smsdl.ome.tif") for d in ("one", "two"))
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.98


def test_torchrun_refuses_commands_that_are_not_distributed(monkeypatch, tmp_path, capsys):
    from napari_smsdl.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["info", str(tmp_path / "missing.imzML")]) == 2
    assert "does not run in several processes" in capsys.readouterr().err
    assert not dd.is_initialized()


def test_torchrun_project_lock_refusal_stops_every_rank(sample_dir, tmp_path):
    """A --project another process is writing: rank 0's refusal reaches rank 1 too (rank 1 used to
    go on alone and fail with gloo's 'Connection closed by peer' once rank 0 had gone), and no
    output or staging folder is left."""
    from napari_smsdl.project._store import project_lock

    argv = ["-m", "napari_smsdl", "reconstruct", "--he", str(sample_dir / "he.png"), "--msi",
            str(sample_dir / "msi.imzML"), "--mz", "760.5851", "--factor", "2", "--he-pixel-size", "2.5",
            *QUICK, "--device", "cpu", "--project", str(tmp_path / "project"), "-o", str(tmp_path / "out")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *argv]
    with project_lock(tmp_path / "project"):  # this process is "the other writer"
        proc = subprocess.run(cmd, cwd=tmp_path, env={**ENV, "SMSDL_LOCK_TIMEOUT": "1"}, capture_output=True,
                              text=True, timeout=240)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "smsdl reconstruct: error:" in line]
    for rank in (0, 1):  # each rank's one error line is the lock's message
        assert any(f"[rank {rank}] smsdl reconstruct: error:" in e and "being written by" in e for e in errors), \
            proc.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["project"]
