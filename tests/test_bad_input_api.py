"""Bad input to the Python API: refused before any work, with the shape or value as given (no guessing)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_smsdl.errors import InputError
from napari_smsdl.evaluation import run_benchmark
from napari_smsdl.io import to_rgb_uint8
from napari_smsdl.reconstruction import Settings, check_factor, prepare_guide, reconstruct


@pytest.mark.parametrize("factor", [0, 1, 2.5, 17, "4x", None])
def test_factors_that_are_not_integers_from_2_to_16_are_refused(factor):
    with pytest.raises(InputError, match="factor must be an integer from 2 to 16"):
        check_factor(factor)
    assert check_factor(4) == 4 and check_factor(np.int64(2)) == 2 and check_factor(3.0) == 3


def test_benchmark_factor_zero_is_an_input_error_not_a_zero_division():
    with pytest.raises(InputError, match="factor"):
        run_benchmark(np.ones((1, 16, 16)), np.zeros((64, 64, 3), np.uint8), factor=0, truth_pixel_size_um=10.0,
                      he_pixel_size_um=2.5, methods=["bicubic"])


def test_histology_dtypes_follow_the_documented_rules():
    rgb8 = np.random.default_rng(0).integers(0, 256, size=(8, 9, 3)).astype(np.uint8)
    np.testing.assert_array_equal(to_rgb_uint8(rgb8), rgb8)
    np.testing.assert_array_equal(to_rgb_uint8(rgb8.astype(np.float64)), rgb8)  # float 0–255
    np.testing.assert_array_equal(to_rgb_uint8(rgb8 / 255.0), rgb8)  # float 0–1
    np.testing.assert_array_equal(to_rgb_uint8(rgb8.astype(np.uint16) * 257), rgb8)  # uint16 by its range
    np.testing.assert_array_equal(to_rgb_uint8(rgb8.tolist()), rgb8)  # a list
    np.testing.assert_array_equal(to_rgb_uint8(np.moveaxis(rgb8, -1, 0)), rgb8)  # (3, H, W)
    with pytest.raises(InputError, match=r"\[0, 1\] or \[0, 255\]"):
        to_rgb_uint8(rgb8 * 4.0)
    with pytest.raises(InputError, match="negative"):
        to_rgb_uint8(rgb8 - 10.0)
    with pytest.raises(InputError, match="1 × 1"):
        to_rgb_uint8(np.zeros((1, 1, 3), np.uint8), "tiny.png")


def test_float_255_guide_is_not_white():
    he = np.random.default_rng(1).integers(0, 256, size=(64, 64, 3)).astype(np.uint8)
    ref, _ = prepare_guide(he, he_pixel_size_um=2.5, msi_shape=(4, 4), msi_pixel_size_um=40.0, factor=4)
    got, _ = prepare_guide(he.astype(np.float32), he_pixel_size_um=2.5, msi_shape=(4, 4), msi_pixel_size_um=40.0, factor=4)
    np.testing.assert_allclose(got, ref, atol=1e-6)
    assert got.mean() < 0.9


def test_channels_last_msi_is_refused_with_how_to_fix_it():
    he = np.zeros((160, 320, 3), np.uint8)  # same field of view as a 20 × 40 MSI
    lr = np.random.default_rng(0).random((20, 40, 5)).astype(np.float32)
    with pytest.raises(InputError, match="channels-last") as err:
        reconstruct(lr, he, he_pixel_size_um=2.5, msi_pixel_size_um=20.0, settings=Settings(factor=4), methods=["bicubic"])
    assert "(20, 40, 5)" in str(err.value)
    out = reconstruct(np.moveaxis(lr, -1, 0), he, he_pixel_size_um=2.5, msi_pixel_size_um=20.0,
                      settings=Settings(factor=4), methods=["bicubic"])
    assert out.sr["bicubic"].shape == (5, 80, 160)


def test_a_pixel_nan_in_some_channels_is_named_before_it_is_dropped(caplog):
    he = np.zeros((160, 320, 3), np.uint8)
    lr = np.random.default_rng(0).random((3, 20, 40)).astype(np.float32) + 0.1
    lr[1, 4, 7] = np.nan  # one channel missing at one pixel: the whole spectrum there is left out
    lr[:, 10, 10] = np.nan  # no spectrum at all: the usual gap of an imzML, not worth a warning
    with caplog.at_level("WARNING", logger="napari_smsdl"):
        reconstruct(lr, he, he_pixel_size_um=2.5, msi_pixel_size_um=20.0, settings=Settings(factor=4),
                    methods=["bicubic"])
    warned = [r.getMessage() for r in caplog.records if "NaN in" in r.getMessage()]
    assert len(warned) == 1, warned
    assert "1 MSI pixels (e.g. row 4, column 7) are NaN in 1 of 3 channels (e.g. channel 1)" in warned[0]


def test_empty_or_tiny_msi_is_refused_before_training():
    he = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(InputError, match="no acquired pixel with a non-zero"):
        reconstruct(np.zeros((2, 8, 8), np.float32), he, he_pixel_size_um=2.5, msi_pixel_size_um=20.0)
    one = np.zeros((2, 8, 8), np.float32)
    one[:, 3, 3] = 1.0
    with pytest.raises(InputError, match="only 1 tissue pixels"):
        reconstruct(one, he, he_pixel_size_um=2.5, msi_pixel_size_um=20.0, settings=Settings(factor=4))


def test_a_duplicated_landmark_pair_is_refused_naming_it():
    from napari_smsdl.errors import RegistrationError
    from napari_smsdl.registration import LandmarkPairs

    he = np.array([[10.0, 10.0], [10.0, 200.0], [150.0, 40.0], [120.0, 180.0]])
    msi = he / 4.0
    LandmarkPairs(he, msi).validate()
    dup_he, dup_msi = np.vstack([he, he[2:3]]), np.vstack([msi, msi[2:3]])
    with pytest.raises(RegistrationError, match="H&E landmark 3 appears more than once"):
        LandmarkPairs(dup_he, dup_msi).validate(source="pairs.csv")
