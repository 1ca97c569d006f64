"""A B-spline that cannot run (tiny MSI grid) is dropped with a message; the affine is kept."""

from __future__ import annotations

import numpy as np

from napari_smsdl.evaluation import degrade
from napari_smsdl.registration import register


def test_tiny_real_msi_grid_keeps_the_affine_and_says_why(real_pair):
    he, truth = real_pair
    mask = (truth != 0).any(0)
    lr, mask_lr = degrade(truth, mask, 4)  # 10 x 9 pixels: the B-spline metric finds no overlap
    fixed = np.where(mask_lr[None], lr, np.nan)
    result = register(fixed, he, fixed_pixel_size_um=4.0, moving_pixel_size_um=40.0 / he.shape[0])
    bspline = [st for st in result.report["stages"] if st["name"] == "B-spline"][0]
    assert not bspline["kept"] and bspline["reason"].startswith("failed, the affine is kept")
    assert result.bspline is None
    assert any("B-spline failed" in m for m in result.report["messages"])
    # the kept transform still maps the MSI field onto the H&E field
    centre = result.transform.TransformPoint((4.0 * 4, 4.0 * 4.5))
    assert 0 < centre[0] < 36 * 1.0 + 5 and 0 < centre[1] < 45
