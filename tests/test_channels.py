"""Many channels: chunked SMSDL regression streamed to zarr equals train_regression chunk by chunk."""

from __future__ import annotations

import numpy as np
import pytest

from napari_smsdl.errors import InputError
from napari_smsdl.reconstruction import reconstruct_channels, standardise_features
from napari_smsdl.reconstruction._regression import RegressionParams, _standardise, train_regression

PARAMS = RegressionParams(hidden=32, steps=40, folds=3, pca_dims=6)


@pytest.fixture(scope="module")
def data():
    """A (7, 16, 16) MSI at F = 4 (5 sample channels + 2 scaled copies), 12 features per SR cell."""
    from napari_smsdl.evaluation import degrade
    from napari_smsdl.sample import make_sample

    s = make_sample()
    truth = s.ground_truth[:, :64, :64]
    lr, mask_lr = degrade(truth, s.mask_hr[:64, :64], 4)
    lr = np.concatenate([lr, 3 * lr[:1], 0.5 * lr[2:3]])
    rng = np.random.default_rng(1)
    features = np.concatenate([truth[:3] / truth[:3].max(), rng.normal(size=(9, 64, 64))]).astype(np.float32)
    return features, lr.astype(np.float32), mask_lr


def test_streamed_standardisation_matches_in_memory(data, tmp_path):
    import zarr

    features = data[0]
    on_disk = zarr.create_array(str(tmp_path / "f.zarr"), shape=features.shape, chunks=(12, 16, 64), dtype="float32")
    on_disk[:] = features
    for dims in (0, 6):
        ref = _standardise(features, dims)
        got = standardise_features(on_disk, dims, block_rows=16)
        assert got.shape == ref.shape and got.dtype == np.float32
        signs = np.sign((got * ref).sum(1))[:, None]  # principal components are defined up to sign
        np.testing.assert_allclose(got * signs, ref, atol=2e-4)
    np.testing.assert_array_equal(standardise_features(features, 6), _standardise(features, 6))


def test_one_chunk_equals_train_regression(data, tmp_path):
    features, lr, mask_lr = data
    result = train_regression(features, lr, 4, mask_lr=mask_lr, params=PARAMS)
    ref = result.sr
    stack = reconstruct_channels(features, lr, 4, tmp_path / "sr.zarr", mask_lr=mask_lr, chunk_channels=16,
                                 params=PARAMS, block_rows=24, device="cpu")
    got = stack.read()
    assert stack.shape == got.shape == (7, 64, 64) and stack.open().chunks == (1, 24, 64)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(ref.max()))
    np.testing.assert_allclose(stack.open_uncertainty()[:], result.uncertainty, rtol=1e-4, atol=1e-6)
    assert stack.guidance() == result.guidance.to_dict()


def test_chunks_stream_from_a_memmap_and_match_per_chunk_training(data, tmp_path):
    features, lr, mask_lr = data
    mm = np.lib.format.open_memmap(tmp_path / "lr.npy", mode="w+", dtype=np.float32, shape=lr.shape)
    mm[:] = lr
    mm.flush()
    lr_disk = np.load(tmp_path / "lr.npy", mmap_mode="r")
    stages = []
    stack = reconstruct_channels(features, lr_disk, 4, tmp_path / "sr.zarr", mask_lr=mask_lr, chunk_channels=3,
                                 params=PARAMS, channel_names=[f"m{i}" for i in range(7)], device="cpu",
                                 progress=lambda stage, done, total: stages.append(stage))
    assert stack.channel_names == tuple(f"m{i}" for i in range(7))
    assert sum(s == "SMSDL channel chunks" for s in stages) == 3  # 3 + 3 + 1 channels
    got = stack.read()
    for c0, c1 in ((0, 3), (3, 6), (6, 7)):  # every chunk is its own train_regression
        part = lr[c0:c1]
        ref = train_regression(features, part, 4, mask_lr=mask_lr, params=PARAMS).sr
        np.testing.assert_allclose(got[c0:c1], ref, rtol=1e-4, atol=1e-4 * float(ref.max()))
    # the default mask is found by streaming over the channels
    again = reconstruct_channels(features, lr_disk, 4, tmp_path / "sr2.zarr", chunk_channels=4, params=PARAMS, device="cpu")
    assert again.read().shape == (7, 64, 64)
    with pytest.raises(InputError, match="SR grid"):
        reconstruct_channels(features[:, :32], lr, 4, tmp_path / "bad.zarr", params=PARAMS)


def test_cnn_runs_on_the_chunked_path_and_one_chunk_equals_the_in_memory_cnn(tmp_path):
    """Every method is available on the many-channel path; a chunk holding all channels is the in-memory run."""
    from napari_smsdl.evaluation import degrade
    from napari_smsdl.reconstruction import Settings, reconstruct, reconstruct_many_channels
    from napari_smsdl.sample import make_sample

    s = make_sample()
    lr, mask_lr = degrade(s.ground_truth[:3, :32, :48], s.mask_hr[:32, :48], 4)
    he = s.he_rgb[:128, :192]
    settings = Settings.preset("fast", factor=4, cnn_iterations=3)
    first_two = reconstruct(lr[:2], he, he_pixel_size_um=2.5, msi_pixel_size_um=40.0, settings=settings,
                            methods=["cnn"], mask_lr=mask_lr).sr["cnn"]
    run = reconstruct_many_channels(lr, he, he_pixel_size_um=2.5, msi_pixel_size_um=40.0, out=tmp_path / "run",
                                    settings=settings, methods=["cnn", "backprojection"], mask_lr=mask_lr,
                                    chunk_channels=2)  # chunks of channels (0, 1) and (2,)
    got = run.sr["cnn"].read()
    assert got.shape == (3, 32, 48) and np.isfinite(got).all()
    np.testing.assert_allclose(got[:2], first_two, rtol=1e-5, atol=1e-6 * float(first_two.max()))
    assert run.sr["backprojection"].read().shape == (3, 32, 48)



def _untimed(choices):
    """The choices without their wall-clock timings (the scale-transfer check records its seconds)."""
    if isinstance(choices, dict):
        return {k: _untimed(v) for k, v in choices.items() if k != "seconds"}
    return choices


def test_one_chunk_loop_serves_both_paths(tmp_path):
    """reconstruct is the chunk loop with numpy sinks: SMSDL there is train_regression itself (bit for bit),
    and the many-channel path with one chunk writes the same stacks for every method into zarr."""
    from napari_smsdl.evaluation import degrade
    from napari_smsdl.reconstruction import Settings, reconstruct, reconstruct_many_channels
    from napari_smsdl.sample import make_sample

    s = make_sample()
    lr, mask_lr = degrade(s.ground_truth[:, :32, :32], s.mask_hr[:32, :32], 4)
    he = s.he_rgb[:128, :128]
    settings = Settings.preset("fast", factor=4, cnn_iterations=2, device="cpu",
                               regression=PARAMS)
    methods = ["smsdl", "bicubic", "backprojection", "cnn"]
    mem = reconstruct(lr, he, he_pixel_size_um=2.5, msi_pixel_size_um=40.0, settings=settings, methods=methods,
                      mask_lr=mask_lr, cache_dir=tmp_path / "cache")
    ref = train_regression(mem.features.data, lr, 4, mask_lr=mask_lr, params=PARAMS, device="cpu")
    np.testing.assert_array_equal(mem.sr["smsdl"], ref.sr)
    np.testing.assert_array_equal(mem.uncertainty["smsdl"], ref.uncertainty)
    np.testing.assert_array_equal(mem.sr["backprojection"], ref.control)
    assert _untimed(mem.choices["smsdl"]) == _untimed(ref.choices) and mem.loss_history["smsdl"] == ref.loss_history
    assert set(mem.seconds) == set(methods) and mem.choices["cnn"]["conservation"] == ref.choices["conservation"]["value"]
    run = reconstruct_many_channels(lr, he, he_pixel_size_um=2.5, msi_pixel_size_um=40.0, out=tmp_path / "run",
                                    settings=settings, methods=methods, mask_lr=mask_lr, chunk_channels=len(lr),
                                    cache_dir=tmp_path / "cache")
    assert run.features_from_cache and set(run.sr) == set(methods)
    for m in methods:
        np.testing.assert_array_equal(run.sr[m].read(), mem.sr[m])
    np.testing.assert_array_equal(run.sr["smsdl"].open_uncertainty()[:], mem.uncertainty["smsdl"])
    assert run.sr["smsdl"].guidance() == mem.guidance["smsdl"]
