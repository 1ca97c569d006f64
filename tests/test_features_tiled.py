"""Whole-slide (tiled) features: the same numbers as the in-memory path, in bounded memory."""

from __future__ import annotations

import dataclasses
import tracemalloc

import numpy as np
import pytest

from napari_smsdl.features import LEVELS, FeatureParams, TilingParams, extract_features, extract_features_tiled
from napari_smsdl.io import HistologyImage, open_histology, write_pyramidal_tiff
from napari_smsdl.reconstruction import prepare_guide

# MSI 40 x 40 px of 40 µm, F = 4 -> SR 160 x 160 cells of 10 µm; H&E 1024 x 1024 px of 1.25 µm stretched
# over the same field (an affine map). max_cell_px = 4 -> 4 guide px per cell (2.5 µm): the H&E is
# read at pyramid level 1. Level images: cellular 1280 px (upsampled), regional 320 px and tissue
# 160 px (downsampled, anti-aliased), so each has 2 x 2 or more windows, some partial.
MSI_SHAPE, MSI_PX, F, MAX_CELL_PX, SR = (40, 40), 40.0, 4, 4, 160
PARAMS = FeatureParams(embed_dim=16, depth=1, num_heads=2, ssl_steps=0, shifts=2, tissue_tokens_msi_px=2)
# work tiles of 512 guide px: cellular 8 windows, regional 2, tissue 1 -> 2 x 2 tiles at every level
TILING = TilingParams(tile_cells=96, tile_guide_px=512, max_train_px=2048, keep_intermediate=True)
D = PARAMS.embed_dim


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    from napari_smsdl.sample import make_sample

    he = make_sample().he_rgb  # 512 x 512, mirrored into a 1024 x 1024 mosaic
    big = np.concatenate([np.concatenate([he, he[:, ::-1]], 1), np.concatenate([he[::-1], he[::-1, ::-1]], 1)], 0)
    path = tmp_path_factory.mktemp("slide") / "slide.ome.tif"
    write_pyramidal_tiff(path, big, pixel_size_um=1.25, n_levels=3, tile=128)
    return path


@pytest.fixture(scope="module")
def guide(slide):
    image = open_histology(slide)
    level = image.best_level(MSI_PX / F / MAX_CELL_PX)
    g, k = prepare_guide(image.read(level), he_pixel_size_um=image.level_pixel_size_um(level), msi_shape=MSI_SHAPE,
                         msi_pixel_size_um=MSI_PX, factor=F, max_cell_px=MAX_CELL_PX)
    return level, g, k


def _tiled(slide, out, params=PARAMS, tiling=TILING, **kw):
    return extract_features_tiled(slide, msi_shape=MSI_SHAPE, msi_pixel_size_um=MSI_PX, factor=F, out=out, params=params,
                                  tiling=tiling, max_cell_px=MAX_CELL_PX, device="cpu", **kw)


@pytest.fixture(scope="module")
def exact(slide, tmp_path_factory):
    out = tmp_path_factory.mktemp("exact") / "f.zarr"
    return _tiled(slide, out), out


def test_tiles_reproduce_the_in_memory_tokens(exact, guide):
    """Every token grid and feature equals an independent whole-image reference, and the guide in memory.

    The reference rescales the whole normalised guide with skimage and samples its token grids
    with scipy (:func:`_level_image`, :func:`_sample_tokens_at_cells` below). Equal up to float
    rounding: the tile's transform (slide transform + region offset) puts a guide pixel one float32
    ulp away now and then; with an identity scale the two are bit-identical.
    """
    import torch
    import zarr

    from napari_smsdl.features._vit import _dense_tokens, make_vit

    level, g, k = guide
    result, out = exact
    assert result.he_level == level == 1 and result.cell_px == k == 4
    assert result.shape == (3 * D + 3, SR, SR) and not result.from_cache
    root = zarr.open_group(str(out), mode="r")
    got = result.read()
    assert root["features"].chunks == (3 * D + 3, 96, 96)
    np.testing.assert_allclose(got[-3:], g.reshape(SR, k, SR, k, 3).mean(axis=(1, 3)).transpose(2, 0, 1), atol=1e-6)
    mean, std = (np.array(root.attrs[n], np.float32) for n in ("mean", "std"))
    np.testing.assert_allclose(mean, g.reshape(-1, 3).astype(np.float64).mean(0), atol=1e-6)
    torch.manual_seed(PARAMS.seed)
    vits = {lvl: make_vit(PARAMS).eval() for lvl in LEVELS}
    normed = (g - mean) / std
    for i, lvl in enumerate(LEVELS):
        image, cells_per_token = _level_image(normed, k, F, lvl, PARAMS)
        assert image.shape[0] > 128  # at least 2 x 2 windows, so tiles meet inside the image
        acc = 0
        for shift in (0, 4):
            tokens = _dense_tokens(vits[lvl], image, shift, "cpu")
            np.testing.assert_allclose(np.asarray(root[f"tokens_{lvl}_{shift}"]), tokens, atol=2e-4)
            acc = acc + _sample_tokens_at_cells(tokens, (SR, SR), cells_per_token, shift)
        np.testing.assert_allclose(got[i * D : (i + 1) * D], acc / 2, atol=2e-4)
    # the guide in memory goes through the same extractor as one tile: the same features
    in_memory = extract_features(g, sr_shape=(SR, SR), factor=F, params=PARAMS, device="cpu")
    np.testing.assert_allclose(in_memory.data, got, atol=2e-4)
    assert in_memory.names == result.names


def _level_image(guide, cell_px, factor, level, params):
    """Reference level image: the whole guide rescaled (skimage) so a token covers the level's footprint."""
    from skimage.transform import rescale

    from napari_smsdl.features import TOKEN_PX

    cells_per_token = {"cellular": 1.0, "regional": float(factor), "tissue": float(factor * params.tissue_tokens_msi_px)}[level]
    scale = TOKEN_PX / (cells_per_token * cell_px)
    if abs(scale - 1.0) < 1e-6:
        return guide, cells_per_token
    image = rescale(guide, scale, channel_axis=-1, anti_aliasing=scale < 1, order=1, preserve_range=True)
    return image.astype(np.float32), cells_per_token


def _sample_tokens_at_cells(tokens, sr_shape, cells_per_token, shift_px):
    """Reference sampling: scipy's bilinear map_coordinates of a token grid at every SR cell centre."""
    from scipy.ndimage import map_coordinates

    from napari_smsdl.features import TOKEN_PX

    rows, cols = sr_shape
    # cell centre in level-image pixels = (i + 0.5) * TOKEN_PX / cells_per_token, + shift; token t centred at (t + 0.5) * TOKEN_PX
    r = ((np.arange(rows) + 0.5) / cells_per_token * TOKEN_PX + shift_px) / TOKEN_PX - 0.5
    c = ((np.arange(cols) + 0.5) / cells_per_token * TOKEN_PX + shift_px) / TOKEN_PX - 0.5
    rr, cc = np.meshgrid(r, c, indexing="ij")
    return np.stack([map_coordinates(tokens[..., d], [rr, cc], order=1, mode="nearest") for d in range(tokens.shape[-1])])


def test_trained_features_match_extract_features(slide, guide, tmp_path):
    """SimMIM-trained end to end, a slide read region by region against its guide in memory."""
    _, g, _ = guide
    params = FeatureParams(embed_dim=16, depth=1, num_heads=2, ssl_steps=4, ssl_batch=4, shifts=1, tissue_tokens_msi_px=2)
    ref = extract_features(g, sr_shape=(SR, SR), factor=F, params=params)
    got = _tiled(slide, tmp_path / "t.zarr", params=params)
    for lvl in LEVELS:  # same training images, same seeds: the same losses
        np.testing.assert_allclose(got.ssl_losses[lvl], ref.ssl_losses[lvl], rtol=2e-2)
    data = got.read()
    for i in range(3):
        a, b = ref.data[i * D : (i + 1) * D].ravel(), data[i * D : (i + 1) * D].ravel()
        assert np.corrcoef(a, b)[0, 1] > 0.999
        assert np.abs(a - b).max() < 0.25 * np.abs(a).max()
    np.testing.assert_allclose(data[-3:], ref.data[-3:], atol=1e-6)
    again = _tiled(slide, tmp_path / "t.zarr", params=params)
    assert again.from_cache and again.seconds == 0.0
    np.testing.assert_array_equal(again.read(), data)


class _CountingLevel:
    """An array-like over a pyramid level that records the largest region read from it."""

    def __init__(self, arr):
        self.arr, self.shape, self.largest = arr, arr.shape, 0

    def __getitem__(self, key):
        out = np.asarray(self.arr[key])
        self.largest = max(self.largest, out.shape[0] * out.shape[1])
        return out


def _synthetic_slide(path, size: int):
    """A textured H&E-like mosaic, size x size px of 2.5 µm, three pyramid levels."""
    rng = np.random.default_rng(size)
    cells = rng.random((size // 16, size // 16, 3))
    rgb = np.kron(cells, np.ones((16, 16, 1))) * 120 + 100
    return write_pyramidal_tiff(path, rgb.astype(np.uint8), pixel_size_um=2.5, n_levels=3, tile=128)


def test_peak_memory_does_not_grow_with_the_slide(tmp_path):
    """4x the slide area: the largest H&E read and the numpy peak stay put while the work grows."""
    # tissue tokens of one MSI pixel: the widest ViT window (1.3 mm) is smaller than both slides
    params = FeatureParams(embed_dim=8, depth=1, num_heads=1, ssl_steps=0, shifts=1, tissue_tokens_msi_px=1)
    tiling = TilingParams(tile_cells=64, tile_guide_px=128, max_train_px=256)
    peaks, largest, tiles = [], [], []
    for size in (1024, 2048):
        image = open_histology(_synthetic_slide(tmp_path / f"s{size}.ome.tif", size))
        counting = tuple(_CountingLevel(level) for level in image.levels)
        image = HistologyImage(image.path, counting, image.pixel_size_um)
        msi = (size // 32, size // 32)  # 80 µm MSI pixels over the whole slide; F = 2 -> 40 µm SR cells
        calls = []
        tracemalloc.start()
        result = extract_features_tiled(image, msi_shape=msi, msi_pixel_size_um=80.0, factor=2, out=tmp_path / f"f{size}",
                                        params=params, tiling=tiling, max_cell_px=4, device="cpu",
                                        progress=lambda stage, done, total: calls.append(stage))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        largest.append(max(c.largest for c in counting))
        tiles.append(calls.count("tokens (cellular)"))
        assert result.shape == (3 * 8 + 3, msi[0] * 2, msi[1] * 2)
        assert np.isfinite(result.read()).all()
    assert tiles[1] == 4 * tiles[0]  # the work grows with the area...
    assert largest[1] <= largest[0] * 1.2  # ...the H&E regions read do not (tile size + halo)
    assert peaks[1] < 1.3 * peaks[0], peaks  # ...and neither does the numpy peak
    # SimMIM trains on a bounded crop (max_train_px) of the large level images, not on all of them
    image = open_histology(tmp_path / "s1024.ome.tif")
    counting = tuple(_CountingLevel(level) for level in image.levels)
    image = HistologyImage(image.path, counting, image.pixel_size_um)
    trained = extract_features_tiled(image, msi_shape=(32, 32), msi_pixel_size_um=80.0, factor=2, out=tmp_path / "ssl",
                                     params=dataclasses.replace(params, ssl_steps=2, ssl_batch=2), tiling=tiling,
                                     max_cell_px=4, device="cpu")
    assert set(trained.ssl_losses) == set(LEVELS)
    assert max(c.largest for c in counting) <= (tiling.max_train_px + 16) ** 2 < 512 * 512  # level 0: 1024²


def test_tissue_level_from_the_h_and_e_directly_is_close(slide, exact, tmp_path):
    """A level whose window exceeds tile_guide_px is resampled straight from the H&E: nearly the same."""
    exact_data = exact[0].read()
    direct = _tiled(slide, tmp_path / "b.zarr", tiling=TilingParams(tile_cells=96, tile_guide_px=256)).read()
    np.testing.assert_allclose(direct[: 2 * D], exact_data[: 2 * D], atol=1e-5)  # cellular, regional: exact path
    a, b = exact_data[2 * D : 3 * D].ravel(), direct[2 * D : 3 * D].ravel()
    assert not np.array_equal(a, b) and np.corrcoef(a, b)[0, 1] > 0.99


def test_registration_transform_reads_the_right_regions(slide, tmp_path):
    """A rotated, shifted affine (MSI µm -> level-0 H&E µm): the tiles' guide equals the whole-image guide."""
    import SimpleITK as sitk

    image = open_histology(slide)
    rot = sitk.Euler2DTransform((800.0, 800.0), np.deg2rad(7.0), (-60.0, 45.0))
    scale = sitk.ScaleTransform(2, (0.8, 0.8))  # the 1600 µm MSI field onto the 1280 µm slide
    transform = sitk.CompositeTransform(2)
    transform.AddTransform(rot)
    transform.AddTransform(scale)  # applied first
    params = FeatureParams(embed_dim=4, depth=1, num_heads=1, ssl_steps=0, shifts=1, tissue_tokens_msi_px=2)
    got = _tiled(slide, tmp_path / "r.zarr", params=params, transform=transform).read()[-3:]
    level = 1
    p_l = image.level_pixel_size_um(level)
    to_level = sitk.CompositeTransform(2)  # level-1 pixel (0, 0) sits at (p_l - p_0) / 2 in level-0 µm
    to_level.AddTransform(sitk.TranslationTransform(2, (-(p_l - 1.25) / 2,) * 2))
    to_level.AddTransform(transform)
    g, k = prepare_guide(image.read(level), he_pixel_size_um=p_l, msi_shape=MSI_SHAPE, msi_pixel_size_um=MSI_PX,
                         factor=F, transform=to_level, max_cell_px=MAX_CELL_PX)
    ref = g.reshape(SR, k, SR, k, 3).mean(axis=(1, 3)).transpose(2, 0, 1)
    assert (ref > 0.99).mean() > 0.02  # part of the field falls off the slide (white glass)
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_hipt_style_checkpoint_on_the_tiled_path(slide, guide, tmp_path, hipt_style_checkpoint):
    """A checkpoint with its own width (DINO/HIPT format) sets the store's feature count; tiled = in memory."""
    hipt_style_checkpoint(tmp_path / "vit256.pth", embed_dim=64, depth=1)
    params = dataclasses.replace(PARAMS, checkpoint=str(tmp_path / "vit256.pth"), shifts=1)
    got = _tiled(slide, tmp_path / "h.zarr", params=params)
    assert got.shape == (3 * 64 + 3, SR, SR) and got.ssl_losses == {}
    _, g, _ = guide
    ref = extract_features(g, sr_shape=(SR, SR), factor=F, params=params)
    data = got.read()
    a, b = ref.data[:64].ravel(), data[:64].ravel()
    assert np.corrcoef(a, b)[0, 1] > 0.999  # the same loaded encoder on the same pixels
