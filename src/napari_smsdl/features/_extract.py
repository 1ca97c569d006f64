"""Multi-level ViT features of every SR cell, tile by tile, for a whole slide or a guide in memory.

One extractor serves both: :func:`extract_features_tiled` reads a whole slide lazily and writes a
chunked zarr store (:class:`TiledFeatures`); :func:`extract_features` takes the registered H&E
already resampled onto the SR grid (the *guide*) and runs the same passes on it as one tile, into an
in-memory zarr store (:class:`FeatureMaps`, cached as ``features-<hash>.npz``). The passes:

1. **Pyramid level** (slides). The guide has pixel size ``g = SR pixel / k`` (k from
   :func:`napari_smsdl.features.choose_cell_px`); the H&E is read at the coarsest pyramid level
   whose pixel is still at most ``g`` (:meth:`HistologyImage.best_level`), one region at a time.
2. **Colour statistics** of the guide (mean and standard deviation per channel, which
   normalise the ViT input) from guide tiles on a regular lattice (all tiles when there are at most
   ``TilingParams.stats_tiles``).
3. **Self-supervised training** (SimMIM, :mod:`napari_smsdl.features._vit`) per ViT level on the
   whole level image when it is small, else on one region of it centred on the tissue.
4. **Tokens.** Each level image (the guide rescaled so a token covers the level's footprint, as
   skimage's ``rescale`` would) is cut into work tiles of whole ViT windows (16 × 16 tokens); a
   tile's level image is computed from a guide region with a halo wide enough for the anti-aliasing
   filter and the interpolation, so its windows see exactly what they would see in the whole level
   image. Token grids go to temporary zarr arrays.
5. **Sampling.** Output tiles of the SR grid sample the token grids at cell centres (bilinear, with a
   one-token halo), average the shifted passes, append the cell's mean colour and are written to
   the ``features`` array, (n_features, rows, cols) float32, chunked by output tile.

Tiles change nothing but memory: with the same weights, a slide's store equals the features of its
guide in memory (up to float rounding) for affine transforms when the guide is made from the same
pyramid level. Levels whose ViT window covers more than ``TilingParams.tile_guide_px`` guide pixels
(wide tissue context at large F·k, slides only) are instead resampled straight from the H&E onto
their own grid — approximately the same image, without ever building the huge guide region. Peak
memory depends on the tile sizes (:class:`TilingParams`), not on the slide size.

Under torchrun (:mod:`napari_smsdl.distributed`) a slide's tiles of every pass are shared round
robin between ranks (each writes its own zarr chunks), the statistics are summed over ranks, the
three ViT levels are trained on ranks 0, 1, 2 (mod N) and their weights broadcast; a guide in memory
is computed by rank 0 alone and sent to the others.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import distributed as dd
from ..errors import Cancelled, InputError
from ..io import HistologyImage, open_histology
from ..torch_setup import get_device
from ._vit import (
    LEVELS,
    TOKEN_PX,
    WINDOW_TOKENS,
    FeatureParams,
    FeatureMaps,
    _dense_tokens,
    _simmim_train,
    build_vits,
    feature_dim,
    save_vits,
)

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]
WINDOW_PX = TOKEN_PX * WINDOW_TOKENS  # level-image pixels per ViT window side
STORE_VERSION = 2  # 2: checkpoints set the ViT architecture


@dataclass(frozen=True)
class TilingParams:
    """Tile sizes (they set peak memory and nothing else).

    Attributes
    ----------
    tile_cells : int
        Output tile side in SR cells (also the zarr chunk of ``features``).
    tile_guide_px : int
        Work tiles of a ViT level span at most this many guide pixels per side (at least one
        window). A level whose single window spans more is resampled straight from the H&E.
    max_train_px : int
        Side, in level-image pixels, of the region each ViT level is trained on when its level
        image is larger (for levels made from guide regions, also at most ``2 × tile_guide_px``
        guide pixels).
    stats_tiles : int
        Guide tiles (``tile_guide_px`` square) sampled for the colour statistics.
    max_read_px : int
        Side of the largest H&E region read at once; larger requests are split (this bounds
        memory even when the pyramid has too few levels for a coarse ViT level).
    keep_intermediate : bool
        Keep the token grids and the colour array in the store (for inspection).
    """

    tile_cells: int = 256
    tile_guide_px: int = 512
    max_train_px: int = 1024
    stats_tiles: int = 32
    max_read_px: int = 1536
    keep_intermediate: bool = False


@dataclass(frozen=True)
class TiledFeatures:
    """A feature store: ``features`` (n_features, rows, cols) float32 in the zarr group at ``path``."""

    path: Path
    names: tuple[str, ...]
    shape: tuple[int, int, int]
    he_level: int
    cell_px: int
    ssl_losses: dict
    seconds: float
    from_cache: bool = False

    def open(self):
        """The zarr array (read only), sliceable like numpy: ``open()[:, r0:r1, c0:c1]``."""
        import zarr

        return zarr.open_array(str(self.path), path="features", mode="r")

    def read(self, region_rc: tuple[slice, slice] | None = None) -> np.ndarray:
        """Features of a region of the SR grid (all of it by default) as a numpy array."""
        arr = self.open()
        return np.asarray(arr[(slice(None), *region_rc)] if region_rc is not None else arr[:])


@dataclass(frozen=True)
class _Grid:
    """A pixel grid in MSI physical space: ``px`` µm, centre of pixel (0, 0) at ``origin_rc`` µm."""

    shape: tuple[int, int]
    px: float
    origin_rc: tuple[float, float]


class _Slide:
    """The H&E, its transform into MSI space, and region resampling onto grids of MSI space."""

    def __init__(self, image: HistologyImage, transform, msi_shape, msi_pixel_size_um: float, max_read_px: int = 1536):
        from ..registration import same_field_of_view_transform

        self.max_read_px = int(max_read_px)  # H&E region side read at once (larger grid regions are split)

        if image.pixel_size_um is None:
            raise InputError("the H&E pixel size is unknown: pass he_pixel_size_um", image.path)
        self.image = image
        self.p0 = float(image.pixel_size_um)
        if transform is None:
            transform = same_field_of_view_transform(msi_shape, msi_pixel_size_um, image.shape, self.p0)
        self.transform = transform

    def level_px(self, level: int) -> float:
        return float(self.image.level_pixel_size_um(level))

    def level_offset(self, level: int) -> float:
        """Level-0 µm of the centre of pixel (0, 0) of a pyramid level (block means shift it)."""
        return (self.level_px(level) - self.p0) / 2.0

    def resample(self, grid: _Grid, rows: tuple[int, int], cols: tuple[int, int], level: int) -> np.ndarray:
        """The H&E (pyramid ``level``) resampled onto ``grid[rows, cols]``: (r, c, 3) float32 in [0, 1].

        Reads only the H&E region the grid region maps to, with a halo for the anti-aliasing
        filter, aligned to its block-mean blocks, so the result equals resampling the whole level
        (:func:`napari_smsdl.registration.resample_moving_to_grid`) onto the whole grid. A grid
        region whose H&E region is wider than ``max_read_px`` is split into blocks (each with its
        own halo), so one call never reads more than about ``max_read_px²`` H&E pixels, whatever
        the pyramid's depth.
        """
        import SimpleITK as sitk

        from ..registration import resample_moving_to_grid
        from ..registration._coords import GridSpec
        from ..registration._resample import _local_scale

        (a, b), (c, d) = rows, cols
        shape = (b - a, d - c)
        origin = (grid.origin_rc[0] + a * grid.px, grid.origin_rc[1] + c * grid.px)
        p_l, off = self.level_px(level), self.level_offset(level)
        ratio = _local_scale(self.transform, GridSpec(shape, grid.px, origin)) * grid.px / p_l
        kb = int(ratio // 2)
        kb = kb if kb >= 2 else 1
        sigma = max(0.0, (ratio / kb - 1.0) / 2.0)
        halo = kb * (int(4 * sigma + 0.5) + 2) + 3
        # where the region's outline lands in the pyramid level (9 x 9 lattice of grid points)
        rr = np.linspace(a - 1, b, 9)
        cc = np.linspace(c - 1, d, 9)
        pts = [
            self.transform.TransformPoint((grid.origin_rc[1] + j * grid.px, grid.origin_rc[0] + i * grid.px))
            for i in rr for j in cc
        ]
        xy = (np.asarray(pts) - off) / p_l
        n_rows, n_cols = (int(s) for s in self.image.levels[level].shape[:2])
        r0 = max(0, (math.floor(xy[:, 1].min()) - halo) // kb * kb)
        c0 = max(0, (math.floor(xy[:, 0].min()) - halo) // kb * kb)
        r1 = min(n_rows, -(-(math.ceil(xy[:, 1].max()) + halo + 1) // kb) * kb)
        c1 = min(n_cols, -(-(math.ceil(xy[:, 0].max()) + halo + 1) // kb) * kb)
        if r0 >= r1 or c0 >= c1:  # entirely off the slide: glass is white
            return np.ones(shape + (3,), np.float32)
        n_r = -(-(r1 - r0) // self.max_read_px) if b - a > 1 else 1
        n_c = -(-(c1 - c0) // self.max_read_px) if d - c > 1 else 1
        if n_r > 1 or n_c > 1:
            r_edges = np.linspace(a, b, min(n_r, b - a) + 1).round().astype(int)
            c_edges = np.linspace(c, d, min(n_c, d - c) + 1).round().astype(int)
            return np.concatenate([
                np.concatenate([self.resample(grid, (int(ra), int(rb)), (int(ca), int(cb)), level)
                                for ca, cb in zip(c_edges[:-1], c_edges[1:])], axis=1)
                for ra, rb in zip(r_edges[:-1], r_edges[1:])
            ], axis=0)
        region = self.image.read(level, (slice(r0, r1), slice(c0, c1)))  # uint8: resampled in 0-255, then scaled
        local = sitk.CompositeTransform(2)
        local.AddTransform(sitk.TranslationTransform(2, (-(c0 * p_l + off), -(r0 * p_l + off))))
        local.AddTransform(self.transform)  # applied first: MSI µm -> H&E µm, then into the region
        out = resample_moving_to_grid(
            region, p_l, local, grid_shape_rc=shape, grid_pixel_size_um=grid.px, grid_origin_um=origin, antialias=True
        )
        out = np.asarray(out, np.float32)
        out *= np.float32(1 / 255.0)
        return np.clip(out, 0, 1, out=out)


@dataclass(frozen=True)
class _Level:
    """One ViT level: its level image (global size, scale from the guide) and how tiles are made."""

    name: str
    cells_per_token: float
    scale: float  # level image px per guide px (skimage ``rescale`` factor)
    shape: tuple[int, int]  # global level image (rows, cols)
    rho: tuple[float, float]  # guide px per level px per axis (= input / output shape)
    exact: bool  # level tiles from guide regions (exact) or straight from the H&E
    tile_windows: int


class _GuideArray:
    """A guide already on the fine grid, in memory (what :func:`extract_features` is given): regions are slices."""

    def __init__(self, guide: np.ndarray, sr_shape: tuple[int, int]):
        self.guide = guide
        self.k = guide.shape[0] // sr_shape[0]


class _Extractor:
    """Level images, colour statistics and training regions of one source (a slide or a guide array)."""

    def __init__(self, source: _Slide | _GuideArray, sr_shape, factor, params, tiling, dev, *, msi_pixel_size_um=1.0,
                 max_cell_px=8):
        from ._vit import choose_cell_px

        self.params, self.tiling, self.dev = params, tiling, dev
        self.slide = source if isinstance(source, _Slide) else None
        self.array = None if self.slide is not None else source.guide
        self.factor = int(factor)
        self.sr_shape = (int(sr_shape[0]), int(sr_shape[1]))
        if self.slide is not None:
            sr_px = msi_pixel_size_um / self.factor
            self.k = choose_cell_px(source.p0, sr_px, max_cell_px)
            g = sr_px / self.k
            origin = -msi_pixel_size_um / 2 + g / 2
            self.he_level = source.image.best_level(g)
        else:  # guide pixels are the unit: the grid never leaves this array
            self.k, g, origin, self.he_level = source.k, 1.0, 0.0, 0
        self.guide = _Grid((self.sr_shape[0] * self.k, self.sr_shape[1] * self.k), g, (origin, origin))
        self.levels = {name: self._level(name) for name in LEVELS}
        self.mean = self.std = None

    def _level(self, name: str) -> _Level:
        cpt = {"cellular": 1.0, "regional": float(self.factor),
               "tissue": float(self.factor * self.params.tissue_tokens_msi_px)}[name]
        scale = TOKEN_PX / (cpt * self.k)
        rows, cols = self.guide.shape
        if abs(scale - 1.0) < 1e-6:
            shape, rho = (rows, cols), (1.0, 1.0)
        else:
            shape = (max(1, round(rows * scale)), max(1, round(cols * scale)))
            rho = (rows / shape[0], cols / shape[1])
        window_guide_px = WINDOW_PX * max(rho)
        # a guide array has no H&E to resample a level from directly: its levels are always made from it
        exact = window_guide_px <= self.tiling.tile_guide_px or self.array is not None
        n = max(1, int(self.tiling.tile_guide_px // window_guide_px)) if exact else max(1, self.tiling.tile_guide_px // WINDOW_PX)
        return _Level(name, cpt, scale, shape, rho, exact, n)

    # ---------------------------------------------------------------- level images

    def guide_region(self, rows, cols) -> np.ndarray:
        if self.array is not None:
            return self.array[rows[0] : rows[1], cols[0] : cols[1]]
        return self.slide.resample(self.guide, rows, cols, self.he_level)

    def level_region(self, lv: _Level, rows, cols, keep_guide: dict | None = None) -> np.ndarray:
        """Normalised level image ``[rows, cols]`` (level px, unshifted): (r, c, 3) float32.

        With ``keep_guide`` (a dict), the guide region used (unnormalised) and its guide-pixel
        spans are stored in it under ``"guide"`` and ``"spans"`` (exact path only).
        """
        from scipy.ndimage import gaussian_filter

        (a, b), (c, d) = rows, cols
        if not lv.exact:
            px = self.guide.px * lv.rho[0]
            grid = _Grid(lv.shape, px, tuple(o + (0.5 * r - 0.5) * self.guide.px for o, r in zip(self.guide.origin_rc, lv.rho)))
            image = self.slide.resample(grid, rows, cols, self.slide.image.best_level(px))
            return ((image - self.mean) / self.std).astype(np.float32)
        if abs(lv.scale - 1.0) < 1e-6:
            guide = self.guide_region(rows, cols)
            if keep_guide is not None:
                keep_guide.update(guide=guide, spans=(rows, cols))
            return ((guide - self.mean) / self.std).astype(np.float32)
        sigma = [max(0.0, (r - 1) / 2) if lv.scale < 1 else 0.0 for r in lv.rho]
        rad = [int(4 * s + 0.5) if s > 0 else 0 for s in sigma]
        spans = []
        for (lo, hi), r, h, n in zip(((a, b), (c, d)), lv.rho, rad, self.guide.shape):
            u_lo, u_hi = (lo + 0.5) * r - 0.5, (hi - 0.5) * r - 0.5
            spans.append((max(0, math.floor(u_lo) - h - 2), min(n, math.ceil(u_hi) + h + 3)))
        guide = self.guide_region(spans[0], spans[1])
        if keep_guide is not None:
            keep_guide.update(guide=guide, spans=tuple(spans))
        normed = ((guide - self.mean) / self.std).astype(np.float32)
        if lv.scale < 1 and max(sigma) > 0:
            normed = gaussian_filter(normed, (sigma[0], sigma[1], 0.0), mode="mirror")
        ur = (np.arange(a, b) + 0.5) * lv.rho[0] - 0.5 - spans[0][0]
        uc = (np.arange(c, d) + 0.5) * lv.rho[1] - 0.5 - spans[1][0]
        # skimage's rescale (scipy zoom, grid mode, linear, "mirror" edges), done separably
        return _bilinear(normed, _linear_taps(ur, normed.shape[0], "mirror"), _linear_taps(uc, normed.shape[1], "mirror"))

    def shifted_region(self, lv: _Level, shift: int, rows, cols, keep_guide: dict | None = None) -> np.ndarray:
        """Rows/cols of the level image shifted by ``shift`` px (reflect-padded at the top/left)."""
        (a, b), (c, d) = rows, cols
        ra, ca = max(0, a - shift), max(0, c - shift)
        image = self.level_region(lv, (ra, b - shift), (ca, d - shift), keep_guide)
        pad_r, pad_c = ra - (a - shift), ca - (c - shift)
        if pad_r or pad_c:
            image = np.pad(image, ((pad_r, 0), (pad_c, 0), (0, 0)), mode="reflect")
        return image

    # ---------------------------------------------------------------- passes

    def colour_stats(self, progress, should_stop) -> None:
        """Mean and std per channel of the guide from a lattice of guide tiles (all if few)."""
        t = self.tiling.tile_guide_px
        tiles = [(r, c) for r in range(0, self.guide.shape[0], t) for c in range(0, self.guide.shape[1], t)]
        if len(tiles) > self.tiling.stats_tiles:
            pick = np.unique(np.linspace(0, len(tiles) - 1, self.tiling.stats_tiles).round().astype(int))
            tiles = [tiles[i] for i in pick]
        acc = np.zeros(7)  # n, sum (3), sum of squares about 0.5 (3)
        for i, (r, c) in enumerate(dd.shard(tiles)):
            _check(should_stop)
            g = self.guide_region((r, min(r + t, self.guide.shape[0])), (c, min(c + t, self.guide.shape[1])))
            flat = g.reshape(-1, 3).astype(np.float64) - 0.5
            acc += np.concatenate([[len(flat)], flat.sum(0), (flat**2).sum(0)])
            if progress is not None:
                progress("colour statistics", i + 1, -(-len(tiles) // dd.get_world_size()))
        acc = dd.all_reduce_sum(acc)
        n = acc[0]
        mean = acc[1:4] / n
        var = np.maximum(acc[4:7] / n - mean**2, 0.0)
        self.mean = (mean + 0.5).astype(np.float32)
        self.std = (np.sqrt(var) + 1e-3).astype(np.float32)

    def train_region(self, lv: _Level) -> tuple[tuple[int, int], tuple[int, int]]:
        """The level-image region to train on: all of it when small, else around the tissue centroid."""
        side = self.tiling.max_train_px
        if lv.exact:
            side = min(side, max(WINDOW_PX, int(2 * self.tiling.tile_guide_px / max(lv.rho))))
        rows, cols = lv.shape
        if rows <= side and cols <= side:
            return (0, rows), (0, cols)
        cy, cx = self.tissue_centroid()  # fraction of the grid
        r0 = int(np.clip(round(cy * rows - side / 2), 0, max(0, rows - side)))
        c0 = int(np.clip(round(cx * cols - side / 2), 0, max(0, cols - side)))
        return (r0, min(rows, r0 + side)), (c0, min(cols, c0 + side))

    def tissue_centroid(self) -> tuple[float, float]:
        """Darkness-weighted centroid of the H&E over the SR grid, as fractions of the grid (rows, cols)."""
        if getattr(self, "_centroid", None) is None and self.array is not None:
            self._centroid = _darkness_centroid(self.array.mean(-1))
        if getattr(self, "_centroid", None) is None:
            rows, cols = self.sr_shape[0] // self.factor, self.sr_shape[1] // self.factor
            step = max(1, int(math.ceil(max(rows, cols) / 256)))  # at most 256 x 256 samples
            grid = _Grid((-(-rows // step), -(-cols // step)), self.guide.px * self.k * self.factor * step,
                         tuple(o - self.guide.px / 2 + self.guide.px * self.k * self.factor * step / 2
                               for o in self.guide.origin_rc))
            level = self.slide.image.best_level(grid.px)
            # blocks of about tile_guide_px H&E pixels: bounded reads, whatever the pyramid's depth
            step_px = max(1, int(self.tiling.tile_guide_px * self.slide.level_px(level) / grid.px))
            bright = np.zeros(grid.shape, np.float32)
            for r in range(0, grid.shape[0], step_px):
                for c in range(0, grid.shape[1], step_px):
                    rows_, cols_ = (r, min(r + step_px, grid.shape[0])), (c, min(c + step_px, grid.shape[1]))
                    bright[slice(*rows_), slice(*cols_)] = self.slide.resample(grid, rows_, cols_, level).mean(-1)
            self._centroid = _darkness_centroid(bright)
        return self._centroid

    def level_tiles(self, lv: _Level, shift: int) -> list[tuple[int, int, int, int]]:
        """Work tiles of the shifted level image: (r0, r1, c0, c1) in level px, whole windows."""
        rows, cols = lv.shape[0] + shift, lv.shape[1] + shift
        step = lv.tile_windows * WINDOW_PX
        return [(r, min(r + step, rows), c, min(c + step, cols)) for r in range(0, rows, step) for c in range(0, cols, step)]


def _darkness_centroid(brightness: np.ndarray) -> tuple[float, float]:
    """Centroid of the darkness (stained tissue) of a grey image in [0, 1], as fractions (rows, cols)."""
    dark = np.clip(1.0 - brightness - 0.1, 0, None)
    total = dark.sum()
    if total <= 0:
        return 0.5, 0.5
    rr, cc = np.mgrid[: dark.shape[0], : dark.shape[1]]
    return (float(((rr + 0.5) * dark).sum() / total / dark.shape[0]),
            float(((cc + 0.5) * dark).sum() / total / dark.shape[1]))


def _check(should_stop) -> None:
    if should_stop is not None and should_stop():
        raise Cancelled("feature extraction cancelled")


def _store_key(slide: _Slide, msi_shape, msi_pixel_size_um, factor, params: FeatureParams, tiling, max_cell_px) -> dict:
    st = os.stat(slide.image.path)
    return {
        "v": STORE_VERSION,
        "he": [str(Path(slide.image.path).resolve()), st.st_size, st.st_mtime_ns, slide.p0],
        "transform": _transform_signature(slide.transform),
        "msi": [list(msi_shape), msi_pixel_size_um],
        "F": factor,
        "max_cell_px": max_cell_px,
        "params": params.cache_key(),
        "tiling": {k: v for k, v in dataclasses.asdict(tiling).items() if k != "keep_intermediate"},
    }


def _transform_signature(transform) -> list:
    """Name and parameters of a SimpleITK transform, composites expanded (for the store's key)."""
    import SimpleITK as sitk

    if transform.GetName() == "CompositeTransform":
        composite = sitk.CompositeTransform(transform)
        return [_transform_signature(composite.GetNthTransform(i)) for i in range(composite.GetNumberOfTransforms())]
    return [transform.GetName(), [float(v) for v in transform.GetParameters()],
            [float(v) for v in transform.GetFixedParameters()]]


def extract_features_tiled(
    histology: HistologyImage | str | os.PathLike,
    *,
    msi_shape: tuple[int, int],
    msi_pixel_size_um: float,
    factor: int,
    out: str | os.PathLike,
    transform=None,
    he_pixel_size_um: float | None = None,
    params: FeatureParams = FeatureParams(),
    tiling: TilingParams = TilingParams(),
    max_cell_px: int = 8,
    device: str = "auto",
    save_weights: str | os.PathLike | None = None,
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TiledFeatures:
    """Multi-level ViT features of every SR cell of a whole slide, tile by tile, into a zarr store.

    Parameters
    ----------
    histology : HistologyImage or path
        The H&E, opened lazily (:func:`napari_smsdl.io.open_histology`); a pyramidal TIFF is
        read at the level chosen from the SR pixel size, one region at a time.
    msi_shape : (rows, cols)
        The MSI grid; the SR grid is (rows·F, cols·F).
    msi_pixel_size_um : float
        MSI pixel size in µm.
    factor : int
        F, SR cells per MSI pixel side.
    out : path
        The zarr group to write (a folder). An existing store made from the same slide, transform
        and settings is reused (``from_cache=True``).
    transform : SimpleITK.Transform, optional
        MSI physical µm → H&E level-0 physical µm (``smsdl register``'s transform); None means the
        H&E covers exactly the MSI field of view.
    he_pixel_size_um : float, optional
        Level-0 H&E pixel size when the file does not say.
    params, max_cell_px, device, save_weights, progress, should_stop
        As :func:`extract_features` and :class:`napari_smsdl.reconstruction.Settings`.
    tiling : TilingParams
        Tile sizes; they bound peak memory.

    Returns
    -------
    TiledFeatures
        The store's ``features`` array is (n_features, rows·F, cols·F) float32, chunked
        (n_features, tile_cells, tile_cells); names as :func:`extract_features`.
    """
    start = time.perf_counter()
    image = histology if isinstance(histology, HistologyImage) else open_histology(histology, pixel_size_um=he_pixel_size_um)
    if image.pixel_size_um is None and he_pixel_size_um is not None:
        image = dataclasses.replace(image, pixel_size_um=float(he_pixel_size_um))
    if not 1 <= int(factor) <= 32:
        raise InputError(f"factor must be an integer from 1 to 32, got {factor}")
    slide = _Slide(image, transform, msi_shape, msi_pixel_size_um, tiling.max_read_px)
    sr_shape = (int(msi_shape[0]) * int(factor), int(msi_shape[1]) * int(factor))
    ex = _Extractor(slide, sr_shape, factor, params, tiling, get_device(device), msi_pixel_size_um=msi_pixel_size_um,
                    max_cell_px=max_cell_px)
    out = Path(out)
    key_json = json.dumps(_store_key(slide, msi_shape, msi_pixel_size_um, factor, params, tiling, max_cell_px),
                          sort_keys=True)
    names = feature_names(params)
    cached = _open_complete(out, key_json) if dd.is_main_process() else None
    cached = dd.broadcast_object(cached)
    if cached is not None:
        return TiledFeatures(out, tuple(cached["names"]), (len(names), *sr_shape), cached["he_level"], cached["cell_px"],
                             cached["ssl_losses"], 0.0, from_cache=True)
    if dd.is_main_process() and out.exists():
        shutil.rmtree(out)
    ssl_losses = _extract_into(str(out), ex, key_json, names, start, save_weights, progress, should_stop)
    return TiledFeatures(out, names, (len(names), *sr_shape), ex.he_level, ex.k, ssl_losses, time.perf_counter() - start)


def feature_names(params: FeatureParams) -> tuple[str, ...]:
    """``<level>_<d>`` for every token feature of every level, then the cell's mean colour."""
    dim = feature_dim(params)  # the checkpoint's width when one is given
    return tuple(f"{lv}_{d}" for lv in LEVELS for d in range(dim)) + ("mean_red", "mean_green", "mean_blue")


def _extract_into(store, ex: _Extractor, key_json: str, names: tuple[str, ...], start: float, save_weights,
                  progress, should_stop) -> dict:
    """The passes of the module notes, into a new zarr group at ``store`` (a path or a zarr store).

    Every rank of a torchrun job calls this (rank 0 creates the group); returns the SimMIM losses.
    """
    import torch
    import zarr

    params, dev = ex.params, ex.dev
    dim = (len(names) - 3) // len(LEVELS)  # token features per level
    rows, cols = ex.sr_shape
    shifts = [round(TOKEN_PX * s / params.shifts) for s in range(params.shifts)]
    t_cells = ex.tiling.tile_cells
    if dd.is_main_process():
        root = zarr.open_group(store, mode="w")
        root.attrs.update({"complete": False, "key": key_json})
        root.create_array("features", shape=(len(names), rows, cols), chunks=(len(names), t_cells, t_cells),
                          dtype="float32", compressors=None, fill_value=0.0)
        c_cells = ex.levels["cellular"].tile_windows * WINDOW_TOKENS  # cellular tokens are cells
        root.create_array("colour", shape=(3, rows, cols), chunks=(3, c_cells, c_cells), dtype="float32",
                          compressors=None, fill_value=0.0)
        for name, lv in ex.levels.items():
            for shift in shifts:
                h = -(-(lv.shape[0] + shift) // TOKEN_PX)
                w = -(-(lv.shape[1] + shift) // TOKEN_PX)
                n = lv.tile_windows * WINDOW_TOKENS
                root.create_array(f"tokens_{name}_{shift}", shape=(h, w, dim), chunks=(n, n, dim),
                                  dtype="float32", compressors=None, fill_value=0.0)
    dd.barrier()
    if not dd.is_main_process():
        root = zarr.open_group(store, mode="r+")
    log.info("features: SR grid %s, %d guide px per cell, H&E pyramid level %d, %s", ex.sr_shape, ex.k,
             ex.he_level, {n: ("exact" if lv.exact else "direct", lv.shape) for n, lv in ex.levels.items()})

    steps = len(LEVELS) + 1  # the overall stage: one step per level's tokens, one for the sampling
    if progress is not None:  # opened first, so the passes below nest inside it
        progress("feature extraction", 0, steps)
    ex.colour_stats(progress, should_stop)

    # ViTs: seeded initialisation, then trained (or loaded from the checkpoint)
    vits = build_vits(params, dev)
    ssl_losses = {}
    if not params.checkpoint and params.ssl_steps > 0:
        world, rank = dd.get_world_size(), dd.get_rank()
        for i, level in enumerate(LEVELS):
            lv = ex.levels[level]
            if i % world == rank:
                region = ex.train_region(lv)
                train_image = ex.level_region(lv, *region)
                losses = _simmim_train(vits[level], train_image, params, level, dev, progress, should_stop)
                ssl_losses[level] = [losses[0], float(np.mean(losses[-10:]))]
                del train_image
            else:  # keep the global RNG in step with the ranks that train (the SimMIM head draws from it)
                torch.nn.Linear(params.embed_dim, TOKEN_PX * TOKEN_PX * 3)
        if world > 1:
            for i, level in enumerate(LEVELS):
                dd.broadcast_module(vits[level], src=i % world)
            merged = {}
            for part in dd.gather_objects(ssl_losses):
                merged.update(part)
            ssl_losses = {level: merged[level] for level in LEVELS if level in merged}
    for vit in vits.values():
        vit.eval()

    # tokens per level and shift; the cellular pass at shift 0 also stores the cells' mean colour
    colour_arr = root["colour"]
    for level in LEVELS:
        lv = ex.levels[level]
        for shift in shifts:
            arr = root[f"tokens_{level}_{shift}"]
            mine = dd.shard(ex.level_tiles(lv, shift))
            for i, (r0, r1, c0, c1) in enumerate(mine):
                _check(should_stop)
                kept: dict = {}
                region = ex.shifted_region(lv, shift, (r0, r1), (c0, c1), kept)
                tokens = _dense_tokens(vits[level], region, 0, dev)
                t0r, t0c = r0 // TOKEN_PX, c0 // TOKEN_PX
                arr[t0r : t0r + tokens.shape[0], t0c : t0c + tokens.shape[1], :] = tokens
                if level == "cellular" and shift == 0:
                    _write_colour(ex, colour_arr, r0 // TOKEN_PX, min(r1 // TOKEN_PX, rows), c0 // TOKEN_PX,
                                  min(c1 // TOKEN_PX, cols), kept)
                del kept, region
                if progress is not None:
                    progress(f"tokens ({level})", i + 1, len(mine))
        if progress is not None:
            progress("feature extraction", LEVELS.index(level) + 1, steps)
    dd.barrier()

    # sample every output tile at the SR cell centres
    out_arr = root["features"]
    tok = {(level, s): root[f"tokens_{level}_{s}"] for level in LEVELS for s in shifts}
    tiles = [(r, min(r + t_cells, rows), c, min(c + t_cells, cols)) for r in range(0, rows, t_cells) for c in range(0, cols, t_cells)]
    mine = dd.shard(tiles)
    for i, (r0, r1, c0, c1) in enumerate(mine):
        _check(should_stop)
        blocks = []
        for level in LEVELS:
            lv = ex.levels[level]
            acc = None
            for shift in shifts:
                sampled = _sample_region(tok[(level, shift)], (r0, r1), (c0, c1), lv.cells_per_token, shift)
                acc = sampled if acc is None else acc + sampled
            blocks.append(acc / len(shifts))
        blocks.append(np.asarray(colour_arr[:, r0:r1, c0:c1]))
        out_arr[:, r0:r1, c0:c1] = np.concatenate(blocks).astype(np.float32)
        if progress is not None:
            progress("sampling features", i + 1, len(mine))
    if progress is not None:
        progress("feature extraction", steps, steps)
    dd.barrier()

    if dd.is_main_process():
        if save_weights:
            save_vits(vits, save_weights)
        if not ex.tiling.keep_intermediate:
            for name in list(root.array_keys()):
                if name != "features":
                    del root[name]
        root.attrs.update({
            "complete": True, "names": list(names), "he_level": ex.he_level, "cell_px": ex.k,
            "ssl_losses": ssl_losses, "seconds": time.perf_counter() - start, "mean": ex.mean.tolist(),
            "std": ex.std.tolist(), "axes": "feature, row, col (SR grid)", "world_size": dd.get_world_size(),
        })
    dd.barrier()
    return ssl_losses


def extract_features(
    guide_rgb: np.ndarray,
    *,
    sr_shape: tuple[int, int],
    factor: int,
    params: FeatureParams = FeatureParams(),
    cache_dir: str | os.PathLike | None = None,
    device: str = "auto",
    save_weights: str | os.PathLike | None = None,
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
    distributed: bool | None = None,
) -> FeatureMaps:
    """Multi-level ViT features for every cell of the SR grid, from a registered guide in memory.

    The same passes as :func:`extract_features_tiled` (the guide is sliced instead of read from a
    slide; tiles as large as the image, so it is one tile), written to an in-memory zarr store.

    Parameters
    ----------
    guide_rgb : (rows * k, cols * k, 3) array
        The registered H&E resampled onto the SR grid refined ``k`` times (k ≥ 1 integer), so each
        SR cell sees its own k × k patch. uint8 or float in [0, 1].
    sr_shape : (rows, cols)
        The SR grid.
    factor : int
        MSI pixel / SR cell (F).
    cache_dir : path, optional
        Where features are cached (``features-<hash>.npz``); a second call with the same image
        and parameters loads them instead of training.
    save_weights : path, optional
        Where to save the trained ViT weights ({level: state_dict}, a torch file).
    distributed : bool, optional
        Under torchrun (default: when a process group of N > 1 is active) every rank must call this
        with the same image: rank 0 computes (or reads the cache) alone and sends the result to the
        others, so N ranks give one process's features. ``False``: this process computes alone,
        whatever the group (a caller that runs this on one rank only).

    Returns
    -------
    FeatureMaps with ``data`` (n_features, rows, cols).
    """
    import zarr

    distributed = dd.is_distributed() if distributed is None else bool(distributed)
    if distributed:
        result = None
        if dd.is_main_process():
            result = extract_features(guide_rgb, sr_shape=sr_shape, factor=factor, params=params, cache_dir=cache_dir,
                                      device=device, save_weights=save_weights, progress=progress,
                                      should_stop=should_stop, distributed=False)
        meta = dd.broadcast_object(None if result is None else dataclasses.replace(result, data=None))
        return dataclasses.replace(meta, data=dd.broadcast_array(None if result is None else result.data))

    start = time.perf_counter()
    guide = np.asarray(guide_rgb)
    guide = guide.astype(np.float32) / 255.0 if guide.dtype == np.uint8 else guide.astype(np.float32)
    rows, cols = sr_shape
    if guide.ndim != 3 or guide.shape[0] % rows or guide.shape[1] % cols or guide.shape[0] // rows != guide.shape[1] // cols:
        raise InputError(f"guide image {guide.shape} is not an integer refinement of the SR grid {sr_shape}")
    key = hashlib.sha256(np.ascontiguousarray(guide).tobytes())
    key.update(json.dumps({"sr": list(sr_shape), "F": factor, **params.cache_key(), "v": 4}, sort_keys=True).encode())
    cache_file = Path(cache_dir) / f"features-{key.hexdigest()[:24]}.npz" if cache_dir else None
    if cache_file is not None and cache_file.exists():
        with np.load(cache_file, allow_pickle=False) as npz:
            log.info("features loaded from cache %s", cache_file)
            return FeatureMaps(npz["data"], tuple(npz["names"]), json.loads(str(npz["ssl_losses"])), 0.0, from_cache=True)

    source = _GuideArray(guide, sr_shape)
    # tiles as large as the image: every level is one tile and trains on its whole level image
    widest = max(1.0, factor * params.tissue_tokens_msi_px * source.k / TOKEN_PX)  # guide px per level px
    side = 2 * max(guide.shape[:2]) + 2 * int(math.ceil(WINDOW_PX * widest))
    tiling = TilingParams(tile_cells=max(rows, cols), tile_guide_px=side, max_train_px=1 << 30, stats_tiles=1 << 30)
    names = feature_names(params)
    with dd.alone():  # one process, whatever the group: the other ranks wait for it (see above)
        ex = _Extractor(source, sr_shape, factor, params, tiling, get_device(device))
        root_store = zarr.storage.MemoryStore()
        ssl_losses = _extract_into(root_store, ex, "", names, start, save_weights, progress, should_stop)
        data = np.asarray(zarr.open_array(root_store, path="features", mode="r")[:])
    result = FeatureMaps(data, names, ssl_losses, time.perf_counter() - start)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(cache_file.stem + ".tmp.npz")
        np.savez(tmp, data=data, names=np.array(names), ssl_losses=json.dumps(ssl_losses))
        os.replace(tmp, cache_file)
    return result


def _open_complete(out: Path, key_json: str) -> dict | None:
    """The attributes of a finished store made with the same key, else None."""
    import zarr

    if not (out / "zarr.json").exists():
        return None
    try:
        attrs = dict(zarr.open_group(str(out), mode="r").attrs)
    except Exception:  # noqa: BLE001 - a broken store is simply rebuilt
        return None
    if attrs.get("complete") and attrs.get("key") == key_json:
        return attrs
    return None


def _write_colour(ex: _Extractor, arr, r0: int, r1: int, c0: int, c1: int, kept: dict | None = None) -> None:
    """Mean guide colour of SR cells [r0, r1) x [c0, c1) into the colour array (3, rows, cols).

    Uses the guide region ``kept`` by the cellular token pass when it covers the cells.
    """
    if r0 >= r1 or c0 >= c1:
        return
    k = ex.k
    g_rows, g_cols = (r0 * k, r1 * k), (c0 * k, c1 * k)
    if kept and kept["spans"][0][0] <= g_rows[0] and kept["spans"][0][1] >= g_rows[1] and \
            kept["spans"][1][0] <= g_cols[0] and kept["spans"][1][1] >= g_cols[1]:
        (s_r, _), (s_c, _) = kept["spans"]
        guide = kept["guide"][g_rows[0] - s_r : g_rows[1] - s_r, g_cols[0] - s_c : g_cols[1] - s_c]
    else:
        guide = ex.guide_region(g_rows, g_cols)
    colour = guide.reshape(r1 - r0, k, c1 - c0, k, 3).mean(axis=(1, 3)).transpose(2, 0, 1)
    arr[:, r0:r1, c0:c1] = colour.astype(np.float32)


def _linear_taps(u: np.ndarray, n: int, mode: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Linear interpolation at coordinates ``u`` on ``n`` samples: (i0, i1, w0, w1).

    Out-of-range neighbours follow scipy.ndimage's ``"nearest"`` (clamp) or ``"mirror"``
    (reflect about the edge sample) modes.
    """
    i0 = np.floor(u).astype(np.int64)
    w1 = (u - i0).astype(np.float64)
    i1 = i0 + 1

    def fix(i):
        if n == 1:
            return np.zeros_like(i)
        if mode == "nearest":
            return np.clip(i, 0, n - 1)
        period = 2 * (n - 1)  # mirror: ... 2 1 | 0 1 2 ... n-1 | n-2 ...
        i = np.abs(i) % period
        return np.where(i > n - 1, period - i, i)

    return fix(i0), fix(i1), 1.0 - w1, w1


def _bilinear(data: np.ndarray, rows, cols) -> np.ndarray:
    """Separable linear interpolation of ``data`` (R, C, ...) at row taps × column taps: float32."""
    r0, r1, wr0, wr1 = rows
    c0, c1, wc0, wc1 = cols
    extra = (None,) * (data.ndim - 2)
    wr0, wr1 = wr0.astype(np.float32)[(slice(None), None, *extra)], wr1.astype(np.float32)[(slice(None), None, *extra)]
    wc0, wc1 = wc0.astype(np.float32)[(None, slice(None), *extra)], wc1.astype(np.float32)[(None, slice(None), *extra)]
    half = data[r0] * wr0 + data[r1] * wr1  # (n_rows, C, ...)
    return (half[:, c0] * wc0 + half[:, c1] * wc1).astype(np.float32, copy=False)


def _sample_region(tokens_arr, rows, cols, cells_per_token: float, shift_px: int) -> np.ndarray:
    """Bilinear samples of a token grid at the centres of SR cells ``rows × cols``: (D, r, c).

    Token ``t`` is centred at level pixel ``(t + 0.5) · TOKEN_PX``; neighbours beyond the grid clamp
    to its edge (scipy.ndimage's ``"nearest"``). Read from a token window with a one-token halo and
    interpolated separably.
    """
    h, w = tokens_arr.shape[:2]
    r = ((np.arange(*rows) + 0.5) / cells_per_token * TOKEN_PX + shift_px) / TOKEN_PX - 0.5
    c = ((np.arange(*cols) + 0.5) / cells_per_token * TOKEN_PX + shift_px) / TOKEN_PX - 0.5
    t_r0 = int(np.clip(math.floor(r.min()), 0, h - 1))
    t_r1 = int(np.clip(math.floor(r.max()) + 2, t_r0 + 1, h))
    t_c0 = int(np.clip(math.floor(c.min()), 0, w - 1))
    t_c1 = int(np.clip(math.floor(c.max()) + 2, t_c0 + 1, w))
    window = np.asarray(tokens_arr[t_r0:t_r1, t_c0:t_c1, :], np.float32)
    # coordinates below the window clamp to its first token only when it is the grid's first token
    # (t_r0 = 0); elsewhere the halo keeps every neighbour inside the window
    out = _bilinear(window, _linear_taps(r - t_r0, window.shape[0], "nearest"),
                    _linear_taps(c - t_c0, window.shape[1], "nearest"))
    return np.ascontiguousarray(out.transpose(2, 0, 1))
