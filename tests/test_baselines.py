"""Bicubic and DeepFERE-style CNN baselines: small real runs (tiny images, few iterations)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_smsdl.baselines import bicubic_upsample, block_average, fill_nearest_tissue, upsample_mask
from napari_smsdl.baselines.bicubic import cubic_matrix
from napari_smsdl.errors import InputError


def _smooth(h: int, w: int, c: int = 2) -> np.ndarray:
    r, q = np.mgrid[0:h, 0:w] / max(h, w)
    return np.stack([2 + np.sin(2 * r + k) * np.cos(1.5 * q - k) for k in range(c)])


# ----------------------------------------------------------------------------- grid helpers


def test_block_average_hand_computed_with_mask():
    sr = np.arange(16, dtype=float).reshape(4, 4)
    mask = np.ones((4, 4), bool)
    mask[0, 0] = False  # value 0 excluded from the first block
    mask[2:, 2:] = False  # last block has no tissue
    lr, mask_lr = block_average(sr, 2, mask)
    assert lr.shape == (2, 2)
    assert lr[0, 0] == pytest.approx((1 + 4 + 5) / 3)
    assert lr[0, 1] == pytest.approx((2 + 3 + 6 + 7) / 4)
    assert lr[1, 1] == 0.0
    assert mask_lr.tolist() == [[True, True], [True, False]]


def test_block_average_rejects_non_multiple():
    with pytest.raises(InputError):
        block_average(np.zeros((1, 5, 4)), 2)


def test_fill_nearest_tissue_and_upsample_mask():
    a = np.array([[[1.0, np.nan, 3.0]]])
    m = np.isfinite(a[0])
    out = fill_nearest_tissue(a, m)
    assert out[0, 0, 1] in (1.0, 3.0)
    assert upsample_mask(np.array([[True, False]]), 3).shape == (3, 6)
    assert upsample_mask(np.array([[True, False]]), 3)[:, :3].all()


# ----------------------------------------------------------------------------- bicubic


def test_cubic_matrix_rows_sum_to_one_and_interpolate_at_centres():
    for f in (1, 2, 3, 4):
        mat = cubic_matrix(7, f)
        assert mat.shape == (7 * f, 7)
        np.testing.assert_allclose(mat.sum(axis=1), 1.0, atol=1e-12)
    # odd F: the centre SR sample of each block sits exactly on the LR pixel centre
    mat = cubic_matrix(5, 3)
    np.testing.assert_allclose(mat[1::3], np.eye(5), atol=1e-12)


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_bicubic_shape_dtype_and_constant(factor):
    lr = np.full((3, 5, 4), 7.5)
    sr = bicubic_upsample(lr, factor)
    assert sr.shape == (3, 5 * factor, 4 * factor)
    assert sr.dtype == np.float32
    np.testing.assert_allclose(sr, 7.5, rtol=1e-6)


def test_bicubic_of_linear_ramp_is_exact_inside():
    # Keys cubic convolution reproduces linear functions exactly (away from the replicated edge).
    lr = np.tile(np.arange(8, dtype=float), (6, 1))[None] + 1
    sr = bicubic_upsample(lr, 4)
    x = (np.arange(32) + 0.5) / 4 - 0.5 + 1
    np.testing.assert_allclose(sr[0, 10, 8:24], x[8:24], atol=1e-6)


def test_block_average_of_bicubic_is_close_to_lr_for_smooth_images():
    lr = _smooth(12, 10)
    sr = bicubic_upsample(lr, 4)
    back, _ = block_average(sr, 4)
    # interior (the replicated border bends the interpolant slightly)
    err = np.abs(back - lr)[:, 1:-1, 1:-1].max()
    assert err < 0.01 * np.ptp(lr)


def test_bicubic_background_does_not_bleed_and_negatives_clipped():
    lr = np.full((1, 6, 6), 10.0)
    lr[0, :, 3:] = 0.0  # background zeros on the right half
    mask = np.zeros((6, 6), bool)
    mask[:, :3] = True
    sr = bicubic_upsample(lr, 4, mask_lr=mask)
    # tissue stays exactly 10 right up to its edge (the zeros do not pull it down)
    np.testing.assert_allclose(sr[0, :, :12], 10.0, rtol=1e-6)
    assert (sr[0, :, 12:] == 0).all()  # background written as 0
    # without the mask the zeros bleed in (and cubic overshoot is clipped at 0)
    sr_nomask = bicubic_upsample(lr, 4)
    assert sr_nomask[0, :, 11].max() < 9.9
    assert sr_nomask.min() >= 0.0
    # NaN outside tissue is treated as background by default
    lr_nan = lr.copy()
    lr_nan[0, :, 3:] = np.nan
    np.testing.assert_allclose(bicubic_upsample(lr_nan, 4), sr)


def test_bicubic_keeps_extrapolation_when_asked():
    lr = np.full((1, 4, 4), 3.0)
    mask = np.zeros((4, 4), bool)
    mask[:2] = True
    sr = bicubic_upsample(lr, 2, mask_lr=mask, background=None)
    np.testing.assert_allclose(sr, 3.0)


def test_bicubic_rejects_bad_inputs():
    with pytest.raises(InputError):
        bicubic_upsample(np.zeros((2, 3, 3)), 0)
    with pytest.raises(InputError):
        bicubic_upsample(np.zeros((2, 3, 3)), 2, mask_lr=np.zeros((3, 3), bool))
    with pytest.raises(InputError):
        bicubic_upsample(np.zeros((2, 3, 3)), 2, mask_lr=np.ones((2, 2), bool))
