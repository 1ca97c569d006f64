"""The tissue mask: a scattered zero pixel is a measurement, a zero region is background."""

from __future__ import annotations

import numpy as np
import pytest

from napari_smsdl.errors import InputError
from napari_smsdl.evaluation import degrade
from napari_smsdl.io import tissue_mask
from napari_smsdl.reconstruction._channels import mask_from_stack


def _speckled(seed: int = 0) -> np.ndarray:
    """One noisy ion image: signal everywhere, 15 % of the pixels zero at random, a 5 x 6 zero hole."""
    rng = np.random.default_rng(seed)
    ion = rng.uniform(0.2, 1.0, (24, 32)).astype(np.float32)
    ion[rng.random(ion.shape) < 0.15] = 0.0
    ion[8:13, 10:16] = 0.0
    return ion


def _isolated_zeros(ion: np.ndarray) -> np.ndarray:
    """Zero pixels off the image edge whose four neighbours are all non-zero."""
    z = np.pad(ion == 0, 1, constant_values=True)
    alone = z[1:-1, 1:-1] & ~z[:-2, 1:-1] & ~z[2:, 1:-1] & ~z[1:-1, :-2] & ~z[1:-1, 2:]
    alone[[0, -1], :] = alone[:, [0, -1]] = False
    return alone


def test_scattered_zero_pixels_are_tissue_and_a_zero_region_is_not():
    ion = _speckled()
    mask = tissue_mask(ion)
    assert not mask[8:13, 10:16].any()  # the hole: a region wider than a pixel
    alone = _isolated_zeros(ion)
    assert alone.sum() > 40 and mask[alone].all()  # isolated zero pixels stay measurements


def test_a_frame_and_nan_pixels_are_background():
    stack = np.ones((2, 10, 12), np.float32)
    stack[:, 0, :] = 0.0  # a one-pixel frame along the top edge
    stack[:, :, -1] = 0.0
    stack[1, 5, 5] = np.nan  # not acquired
    stack[0, 7, 3] = 0.0  # zero in one channel only: tissue
    mask = tissue_mask(stack)
    assert not mask[0].any() and not mask[:, -1].any() and not mask[5, 5]
    assert mask[1:, :-1].sum() == 9 * 11 - 1


def test_degraded_block_means_keep_the_zero_measurements():
    ion = _speckled(1)
    mask = tissue_mask(ion)
    lr, mask_lr = degrade(ion[None], mask, 4)
    full = ion.reshape(6, 4, 8, 4).mean(axis=(1, 3))
    whole = mask.reshape(6, 4, 8, 4).all(axis=(1, 3))  # blocks whose every pixel is tissue, zeros included
    assert whole.sum() > 20
    np.testing.assert_allclose(lr[0][whole], full[whole], rtol=1e-6)  # zeros counted, not skipped
    biased, _ = degrade(ion[None], ion != 0, 4)  # the old rule: every zero pixel background
    assert (biased[0][whole] > full[whole] + 1e-3).sum() > 10


def test_the_streamed_mask_equals_the_whole_stack_rule():
    stack = np.stack([_speckled(s) for s in range(5)])
    stack[:, :3, :] = 0.0
    stack[2, 20, 20] = np.nan
    np.testing.assert_array_equal(mask_from_stack(stack, chunk=2), tissue_mask(stack))


def test_an_all_zero_msi_is_refused_even_when_too_small_for_a_region():
    from napari_smsdl.reconstruction import reconstruct

    with pytest.raises(InputError, match="non-zero"):
        reconstruct(np.zeros((1, 1, 3), np.float32), np.zeros((8, 24, 3), np.uint8), he_pixel_size_um=1.0,
                    msi_pixel_size_um=8.0, methods=["bicubic"])
