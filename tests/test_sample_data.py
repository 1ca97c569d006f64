"""The sample-data contribution: three layers that overlay in µm."""

from __future__ import annotations

import numpy as np
import pytest

from napari_smsdl._sample_data import smsdl_sample


def _span_um(shape_rc, scale, translate):
    """(first edge, last edge) in µm of each spatial axis of a grid placed by scale/translate."""
    scale, translate = np.asarray(scale[-2:]), np.asarray(translate[-2:])
    first = translate - scale / 2
    last = translate + (np.asarray(shape_rc) - 1) * scale + scale / 2
    return first, last


def test_sample_layers_share_the_field_of_view():
    layers = smsdl_sample()
    assert [kw["name"] for _, kw, _ in layers] == [
        "sample H&E",
        "sample MSI (40 µm)",
        "sample ground truth (10 µm)",
    ]
    (he, he_kw, _), (msi, msi_kw, _), (gt, gt_kw, _) = layers
    assert he.shape == (512, 512, 3) and he_kw["rgb"] is True
    assert msi.shape == (5, 32, 32) and np.isnan(msi).any()  # non-acquired pixels stay NaN
    assert gt.shape == (5, 128, 128) and gt_kw["visible"] is False
    assert he_kw["scale"] == (2.5, 2.5)
    assert msi_kw["scale"] == (1.0, 40.0, 40.0) and gt_kw["scale"] == (1.0, 10.0, 10.0)
    for data, kw in [(he[..., 0], he_kw), (msi[0], msi_kw), (gt[0], gt_kw)]:
        first, last = _span_um(data.shape, kw["scale"], kw["translate"])
        np.testing.assert_allclose(first, [0.0, 0.0])
        np.testing.assert_allclose(last, [1280.0, 1280.0])
    assert msi_kw["metadata"]["mz"] == gt_kw["metadata"]["mz"] and len(msi_kw["metadata"]["mz"]) == 5


@pytest.mark.gui
def test_open_sample_in_viewer(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-smsdl", "smsdl_sample")
    he = viewer.layers["sample H&E"]
    msi = viewer.layers["sample MSI (40 µm)"]
    gt = viewer.layers["sample ground truth (10 µm)"]
    # the pixel-centre extents differ by half a pixel of each grid; the physical edges coincide
    for layer, size in [(he, 2.5), (msi, 40.0), (gt, 10.0)]:
        world = layer.extent.world[:, -2:]
        np.testing.assert_allclose(world[0] - size / 2, [0.0, 0.0])
        np.testing.assert_allclose(world[1] + size / 2, [1280.0, 1280.0])
    # the MSI pixel (5, 7) centre and the 4 × 4 ground-truth block under it are at the same place
    centre_msi = msi.data_to_world([0, 5, 7])[-2:]
    block = [gt.data_to_world([0, 5 * 4 + i, 7 * 4 + j])[-2:] for i in range(4) for j in range(4)]
    np.testing.assert_allclose(np.mean(block, axis=0), centre_msi)
