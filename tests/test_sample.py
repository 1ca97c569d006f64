"""The built-in sample: deterministic, structured, and a real processed imzML."""

from __future__ import annotations

import json

import numpy as np

from napari_smsdl.io import open_imzml
from napari_smsdl.sample import block_mean, make_sample


def test_sample_is_deterministic_and_consistent():
    a, b = make_sample(), make_sample()
    np.testing.assert_array_equal(a.msi, b.msi)
    assert a.ground_truth.shape == (5, 128, 128) and a.msi.shape == (5, 32, 32)
    assert np.isnan(a.msi[0]).sum() == 4  # a few pixels never acquired
    # the MSI is the block average of the ground truth up to a few percent of counting noise
    clean = block_mean(a.ground_truth, 4)
    tissue = a.mask_lr
    rel = np.abs(a.msi[:, tissue] - clean[:, tissue]) / clean[:, tissue].mean(axis=1, keepdims=True)
    assert 0.005 < np.median(rel) < 0.1


def test_channels_follow_different_compartments():
    s = make_sample()
    flat = s.ground_truth[:, s.mask_hr]
    corr = np.corrcoef(flat)
    assert corr[1, 4] < 0.5 and corr[2, 4] < 0.5  # nuclei, stroma and DAB channels differ


def test_written_sample_files(sample_dir):
    info = json.loads((sample_dir / "sample.json").read_text())
    assert info["factor"] == 4 and len(info["mz"]) == 5
    assert (sample_dir / "he.png").exists()
    ds = open_imzml(sample_dir / "msi.imzML")
    assert ds.mode == "processed" and ds.shape == (32, 32) and ds.pixel_size_um == 40.0
    ion = ds.ion_images(info["mz"], info["tolerance"]).data
    np.testing.assert_allclose(ion, make_sample().msi, rtol=1e-5, equal_nan=True)
    truth = np.load(sample_dir / "ground_truth.npy")
    assert truth.shape == (5, 128, 128)
