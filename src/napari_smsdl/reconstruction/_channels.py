"""Thousands of MSI channels: SMSDL regression over channel chunks, SR stacks streamed to a zarr store.

:func:`napari_smsdl.reconstruction.train_regression` holds every channel's target, bicubic input and
prediction (C × rows·F × cols·F floats, times the restarts) in memory. For an MSI with thousands
of channels :func:`reconstruct_channels` instead:

* standardises the SR-cell features once (streamed over spatial blocks when they live on disk,
  e.g. the ``features`` array of :func:`napari_smsdl.features.extract_features_tiled`);
* reads the MSI ``chunk_channels`` channels at a time (numpy memmap, zarr or any sliceable array);
* trains the same network as ``train_regression`` on each chunk (same loss, restarts, seeds);
* predicts block by block of SR rows and writes each block to the ``sr`` array of a zarr store,
  (C, rows·F, cols·F) float32, one channel per chunk (chunk (1, block, cols·F)).

Memory therefore grows with ``chunk_channels`` and the SR grid's features, not with C. A chunk
holding all channels gives ``train_regression``'s result (up to float rounding of the block-wise
prediction). Under torchrun the chunks are shared round robin between ranks (each rank trains its
own chunks in full — for many channels that is the better use of several GPUs than splitting one
small network's batches) and every rank writes only its own chunks.

:func:`reconstruct_many_channels` is the whole run that ``smsdl reconstruct`` uses above
``CHUNKED_ABOVE_CHANNELS`` channels: the H&E features once (in memory or tiled), then
:func:`reconstruct_channels` and, on request, the bicubic baseline chunk by chunk
(:func:`bicubic_channels`), each into its own zarr store.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .. import distributed as dd
from ..errors import Cancelled, InputError
from ..io import tissue_from
from ._regression import RegressionParams, _standardise, fit_guided, max_pca_dims

if TYPE_CHECKING:
    from ._pipeline import Settings

log = logging.getLogger(__name__)

#: ``smsdl reconstruct`` takes the chunked path for an MSI with more channels than this.
CHUNKED_ABOVE_CHANNELS = 64
#: Default channels per chunk of the chunked path.
DEFAULT_CHUNK_CHANNELS = 64



@dataclass(frozen=True)
class ChannelStack:
    """The SR stack written by :func:`reconstruct_channels`: array ``sr`` of the zarr group ``path``."""

    path: Path
    shape: tuple[int, int, int]
    channel_names: tuple[str, ...]
    chunk_channels: int
    seconds: float

    def open(self):
        """The zarr array (C, rows·F, cols·F), read only; slice it like numpy."""
        import zarr

        return zarr.open_array(str(self.path), path="sr", mode="r")

    def read(self, channels: slice | Sequence[int] = slice(None)) -> np.ndarray:
        """Channels of the SR stack as numpy (all by default)."""
        return np.asarray(self.open()[channels])

    def open_uncertainty(self):
        """The SMSDL store's predictive standard deviation (C, rows·F, cols·F), or None (baselines)."""
        import zarr

        group = zarr.open_group(str(self.path), mode="r")
        return group["uncertainty"] if "uncertainty" in group else None

    def guidance(self) -> dict | None:
        """Per-channel histology gain of an SMSDL store (``Guidance.to_dict``), or None."""
        import zarr

        return zarr.open_group(str(self.path), mode="r").attrs.get("guidance")


def standardise_features(features, pca_dims: int = 0, block_rows: int = 256) -> np.ndarray:
    """(D, rows, cols) features → (D', rows·cols) float32, as ``regression._standardise``.

    A numpy array goes through ``_standardise`` itself (identical numbers); anything else (a zarr
    array) is streamed in blocks of ``block_rows`` rows: per-feature mean and std, then the D × D
    covariance and its principal components, then the projection. The streamed result equals
    ``_standardise`` up to float rounding and the sign of each principal component.
    """
    if isinstance(features, np.ndarray):
        return _standardise(features, pca_dims)
    d, rows, cols = features.shape
    n = rows * cols
    blocks = [(r, min(r + block_rows, rows)) for r in range(0, rows, block_rows)]

    def block(r0, r1):
        return np.asarray(features[:, r0:r1, :], np.float64).reshape(d, -1)

    total, total_sq = np.zeros(d), np.zeros(d)
    shift = np.asarray(features[:, 0, 0], np.float64)  # shifted sums: no cancellation for large means
    for r0, r1 in blocks:
        f = block(r0, r1) - shift[:, None]
        total += f.sum(1)
        total_sq += (f**2).sum(1)
    mean = shift + total / n
    std = np.sqrt(np.maximum(total_sq / n - (total / n) ** 2, 0.0))

    def z(r0, r1):
        return (block(r0, r1) - mean[:, None]) / (std[:, None] + 1e-6)

    if not 0 < pca_dims < d:
        return np.concatenate([z(r0, r1) for r0, r1 in blocks], axis=1).astype(np.float32)
    cov = np.zeros((d, d))
    for r0, r1 in blocks:
        zz = z(r0, r1)
        cov += zz @ zz.T
    u, _, _ = np.linalg.svd(cov)
    proj = u[:, :pca_dims].T
    out = np.empty((pca_dims, n), np.float32)
    first, first_sq, start = 0.0, 0.0, 0
    for r0, r1 in blocks:
        p = proj @ z(r0, r1)
        out[:, start : start + p.shape[1]] = p
        first += p[0].sum()
        first_sq += (p[0] ** 2).sum()
        start += p.shape[1]
    comp0_std = np.sqrt(max(first_sq / n - (first / n) ** 2, 0.0))
    out /= np.float32(comp0_std + 1e-6)
    return out


def mask_from_stack(lr_msi, chunk: int = DEFAULT_CHUNK_CHANNELS) -> np.ndarray:
    """The tissue mask (:func:`napari_smsdl.io.tissue_mask`) of a stack read a chunk of channels at a time."""
    n_ch, rows, cols = lr_msi.shape
    acquired = np.ones((rows, cols), bool)
    nonzero = np.zeros((rows, cols), bool)
    for c0 in range(0, n_ch, chunk):
        part = np.asarray(lr_msi[c0 : c0 + chunk], np.float32)
        acquired &= np.isfinite(part).all(0)
        nonzero |= (np.nan_to_num(part) != 0).any(0)
    return tissue_from(acquired, nonzero)


def reconstruct_channels(
    features,
    lr_msi,
    factor: int,
    out: str | os.PathLike,
    *,
    mask_lr: np.ndarray | None = None,
    channel_names: Sequence[str] | None = None,
    chunk_channels: int = 64,
    params: RegressionParams = RegressionParams(),
    block_rows: int | None = None,
    device: str = "auto",
    progress: Callable[[str, int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> ChannelStack:
    """SMSDL regression of every channel, ``chunk_channels`` at a time, streamed into ``out/sr``.

    Parameters
    ----------
    features : (D, rows·F, cols·F) array-like
        Per-SR-cell features: numpy, or a zarr array such as ``TiledFeatures.open()``.
    lr_msi : (C, rows, cols) array-like
        The measured MSI (NaN = no spectrum): numpy, ``np.memmap`` or zarr; read chunk by chunk.
    factor : int
        F, SR cells per MSI pixel side.
    out : path
        The zarr group to write; its ``sr`` array is (C, rows·F, cols·F) float32 in the MSI's units.
    mask_lr : (rows, cols) bool, optional
        Tissue pixels to train on (default: acquired pixels with any non-zero channel, found by
        streaming over all channels once).
    channel_names : sequence of str, optional
        Stored in the store's attributes.
    chunk_channels : int
        Channels trained together (one network per chunk, shared trunk within it).
    params : RegressionParams
        As :func:`napari_smsdl.reconstruction.train_regression`.
    block_rows : int, optional
        SR rows predicted and written at a time (default: about 32 768 SR cells per block).

    Returns
    -------
    ChannelStack
    """
    start = time.perf_counter()
    n_ch, rows, cols = (int(s) for s in lr_msi.shape)
    factor = int(factor)
    sr_rows, sr_cols = rows * factor, cols * factor
    if tuple(features.shape[1:]) != (sr_rows, sr_cols):
        raise InputError(f"features {tuple(features.shape[1:])} do not match the SR grid {(sr_rows, sr_cols)}")
    if chunk_channels < 1:
        raise InputError(f"chunk_channels must be at least 1, got {chunk_channels}")
    names = tuple(channel_names) if channel_names is not None else tuple(f"channel {i}" for i in range(n_ch))
    if len(names) != n_ch:
        raise InputError(f"{len(names)} channel names for {n_ch} channels")
    mask_lr = mask_from_stack(lr_msi, chunk_channels) if mask_lr is None else np.asarray(mask_lr, bool)
    if mask_lr.shape != (rows, cols):
        raise InputError(f"mask {mask_lr.shape} does not match the MSI grid {(rows, cols)}")
    if block_rows is None:
        block_rows = 32768 // sr_cols
    # whole MSI pixels per block, no more than the grid (a larger zarr chunk is padding on disk)
    block_rows = min(max(factor, block_rows // factor * factor), sr_rows)

    out = Path(out)
    sr_arr = _create_sr_store(out, (n_ch, sr_rows, sr_cols), min(chunk_channels, n_ch), block_rows, names, factor)

    # one feature space for all chunks: the leading components, their number chosen on the first chunk
    x_feat = standardise_features(features, max_pca_dims(params), block_rows)
    chunks = [(c0, min(c0 + chunk_channels, n_ch)) for c0 in range(0, n_ch, chunk_channels)]
    first = fit_guided(x_feat, np.asarray(lr_msi[chunks[0][0]:chunks[0][1]], np.float32), factor, mask_lr=mask_lr,
                       params=params, device=device, should_stop=should_stop) if dd.is_main_process() else None
    pca_dims = int(dd.broadcast_object(first.choices["pca_dims"]["value"] if first is not None else None))
    extra = _create_extra_stores(out, (n_ch, sr_rows, sr_cols), min(chunk_channels, n_ch), block_rows, names)
    mine = dd.shard(chunks)
    gains: dict = {}
    for i, (c0, c1) in enumerate(mine):
        if should_stop is not None and should_stop():
            raise Cancelled("SMSDL channel reconstruction cancelled")
        lr = np.asarray(lr_msi[c0:c1], np.float32)
        stage = f"SMSDL channels {c0 + 1}-{c1} of {n_ch}"
        if first is not None and c0 == chunks[0][0]:
            fit = first
        else:
            fit = fit_guided(x_feat, lr, factor, mask_lr=mask_lr, params=params, device=device, progress=progress,
                             should_stop=should_stop, stage=stage, pca_dims=pca_dims)
        for r0 in range(0, sr_rows, block_rows):
            r1 = min(r0 + block_rows, sr_rows)
            sr_arr[c0:c1, r0:r1, :] = fit.sr[:, r0:r1]
            for name, arr in extra.items():
                arr[c0:c1, r0:r1, :] = getattr(fit, name)[:, r0:r1]
        gains[c0] = {"guidance": fit.guidance.to_dict(), "choices": fit.choices}
        del fit
        if progress is not None:
            progress("SMSDL channel chunks", i + 1, len(mine))
        log.info("channels %d-%d of %d written", c0 + 1, c1, n_ch)
    _record_guidance(out, gains, n_ch)
    return _finish_sr_store(out, (n_ch, sr_rows, sr_cols), names, chunk_channels, start)


# ---------------------------------------------------------------------------------------------
# the whole many-channel run: features once, then SMSDL (and bicubic) chunk by chunk


@dataclass(frozen=True)
class ManyChannelRun:
    """What :func:`reconstruct_many_channels` wrote: an SR stack on disk per method, and timings.

    ``sr`` maps ``"smsdl"`` (and ``"bicubic"`` when asked) to its :class:`ChannelStack`;
    ``seconds`` has ``"features"`` (guide + features), ``"smsdl"`` (features + regression, as in
    :class:`napari_smsdl.reconstruction.Reconstruction`) and ``"bicubic"``.
    """

    sr: dict
    seconds: dict
    settings: Settings
    features_from_cache: bool
    tiled: bool


def bicubic_channels(lr_msi, factor: int, out: str | os.PathLike, **kwargs) -> ChannelStack:
    """Bicubic baseline of every channel, ``chunk_channels`` at a time, into the zarr group ``out``.

    Same numbers as :func:`napari_smsdl.reconstruction.baselines.bicubic_upsample` on the whole stack (it works
    channel by channel); the ``sr`` array is laid out as :func:`reconstruct_channels` lays out its
    own. Under torchrun the chunks are shared round robin between ranks, like the SMSDL chunks:
    every rank must call it. Keywords as :func:`_chunk_by_chunk`.
    """
    from .baselines import bicubic_upsample

    return _chunk_by_chunk(lambda lr, mask: bicubic_upsample(np.nan_to_num(lr), factor, mask_lr=mask),
                           lr_msi, factor, out, what="bicubic channel upsampling", **kwargs)


def backprojection_channels(lr_msi, factor: int, out: str | os.PathLike, **kwargs) -> ChannelStack:
    """The H&E-free control of every channel, ``chunk_channels`` at a time, into the zarr group ``out``.

    Same numbers as :func:`napari_smsdl.reconstruction.baselines.backprojection_upsample` (bicubic,
    then exact back-projection to the block means of ``mask_lr``) on the whole stack: both steps work
    channel by channel. Laid out and shared between torchrun ranks like :func:`bicubic_channels`.
    """
    from .baselines import backprojection_upsample

    return _chunk_by_chunk(lambda lr, mask: backprojection_upsample(lr, factor, mask_lr=mask),
                           lr_msi, factor, out, what="H&E-free control", **kwargs)


def _chunk_by_chunk(
    method: Callable[[np.ndarray, np.ndarray], np.ndarray],
    lr_msi,
    factor: int,
    out: str | os.PathLike,
    *,
    what: str,
    mask_lr: np.ndarray | None = None,
    channel_names: Sequence[str] | None = None,
    chunk_channels: int = DEFAULT_CHUNK_CHANNELS,
    should_stop: Callable[[], bool] | None = None,
) -> ChannelStack:
    """``method(lr chunk, mask)`` on every chunk of channels (this rank's share), into ``out/sr``."""
    start = time.perf_counter()
    n_ch, rows, cols = (int(s) for s in lr_msi.shape)
    names = tuple(channel_names) if channel_names is not None else tuple(f"channel {i}" for i in range(n_ch))
    mask_lr = mask_from_stack(lr_msi, chunk_channels) if mask_lr is None else np.asarray(mask_lr, bool)
    chunks = [(c0, min(c0 + chunk_channels, n_ch)) for c0 in range(0, n_ch, chunk_channels)]
    sr_arr = _create_sr_store(out, (n_ch, rows * factor, cols * factor), min(chunk_channels, n_ch),
                              rows * factor, names, factor)
    for c0, c1 in dd.shard(chunks):
        if should_stop is not None and should_stop():
            raise Cancelled(f"{what} cancelled")
        sr_arr[c0:c1] = np.asarray(method(np.asarray(lr_msi[c0:c1], np.float32), mask_lr), np.float32)
    return _finish_sr_store(out, (n_ch, rows * factor, cols * factor), names, chunk_channels, start)

def cnn_channels(
    lr_msi,
    guide: np.ndarray,
    out: str | os.PathLike,
    *,
    settings: Settings,
    mask_lr: np.ndarray | None = None,
    channel_names: Sequence[str] | None = None,
    chunk_channels: int = DEFAULT_CHUNK_CHANNELS,
    progress: Callable[[str, int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> ChannelStack:
    """The CNN baseline, one network per chunk of ``chunk_channels`` channels, into the zarr group ``out``.

    Each chunk is :func:`napari_smsdl.reconstruction.run_cnn` (the in-memory path's CNN) on those
    channels; chunks are shared between torchrun ranks like :func:`bicubic_channels`. The
    conservation is the regression's when it is fixed, else exact (the chunked SMSDL chooses per
    chunk; the CNN gets the control's).
    """
    from ._pipeline import run_cnn
    from .baselines import bicubic_upsample

    start = time.perf_counter()
    factor = int(settings.factor)
    n_ch, rows, cols = (int(s) for s in lr_msi.shape)
    names = tuple(channel_names) if channel_names is not None else tuple(f"channel {i}" for i in range(n_ch))
    mask_lr = mask_from_stack(lr_msi, chunk_channels) if mask_lr is None else np.asarray(mask_lr, bool)
    conservation = settings.regression.conservation if settings.regression.conservation != "auto" else "exact"
    chunks = [(c0, min(c0 + chunk_channels, n_ch)) for c0 in range(0, n_ch, chunk_channels)]
    sr_arr = _create_sr_store(out, (n_ch, rows * factor, cols * factor), min(chunk_channels, n_ch),
                              rows * factor, names, factor)
    mine = dd.shard(chunks)
    for i, (c0, c1) in enumerate(mine):
        if should_stop is not None and should_stop():
            raise Cancelled("CNN channel reconstruction cancelled")
        lr = np.asarray(lr_msi[c0:c1], np.float32)
        bicubic = bicubic_upsample(np.nan_to_num(lr), factor, mask_lr=mask_lr)
        sr_arr[c0:c1], _, _ = run_cnn(lr, guide, factor, mask_lr=mask_lr, bicubic=bicubic, settings=settings,
                                      conservation=conservation, should_stop=should_stop)
        if progress is not None:
            progress("CNN channel chunks", i + 1, len(mine))
    return _finish_sr_store(out, (n_ch, rows * factor, cols * factor), names, chunk_channels, start)


def _create_sr_store(out, shape, chunk_channels: int, block_rows: int, names, factor: int):
    """Rank 0 creates the zarr group ``out`` with an empty ``sr`` array; every rank opens it."""
    import zarr

    if dd.is_main_process():
        root = zarr.open_group(str(out), mode="w")
        # one channel per chunk: a viewer showing one channel reads only that channel (a chunk of 64
        # channels made each channel read 64 times the data); the writers still fill 64 at a time
        root.create_array("sr", shape=shape, chunks=(1, block_rows, shape[2]), dtype="float32",
                          compressors=None, fill_value=0.0)
        root.attrs.update({"complete": False, "channel_names": list(names), "factor": factor,
                           "axes": "channel, row, col (SR grid)"})
    dd.barrier()
    return zarr.open_array(str(out), path="sr", mode="r+")


def _create_extra_stores(out, shape, chunk_channels: int, block_rows: int, names) -> dict:
    """The SMSDL group's ``uncertainty`` array, laid out as ``sr``: {attribute of the fit: array}."""
    import zarr

    if dd.is_main_process():
        root = zarr.open_group(str(out), mode="r+")
        root.create_array("uncertainty", shape=shape, chunks=(1, block_rows, shape[2]), dtype="float32",
                          compressors=None, fill_value=0.0)
    dd.barrier()
    return {"uncertainty": zarr.open_array(str(out), path="uncertainty", mode="r+")}


def _record_guidance(out, per_chunk: dict, n_ch: int) -> None:
    """Every rank's chunks' guidance, merged in channel order into the store's attributes."""
    import zarr

    merged = dd.gather_objects(per_chunk)
    if not dd.is_main_process():
        return
    chunks = {int(k): v for part in merged for k, v in part.items()}
    guidance = {"gain": [], "gain_std": [], "used_histology": []}
    # the scale-transfer gain exists for every chunk or none (it depends on the tissue mask only)
    if all("scale_gain" in chunks[c0]["guidance"] for c0 in chunks):
        guidance.update(scale_gain=[], scale_gain_std=[])
    for c0 in sorted(chunks):
        for key in guidance:
            guidance[key] += chunks[c0]["guidance"][key]
    if len(guidance["gain"]) != n_ch:
        raise RuntimeError(f"guidance for {len(guidance['gain'])} of {n_ch} channels")
    zarr.open_group(str(out), mode="r+").attrs.update(
        {"guidance": guidance, "choices": [chunks[c0]["choices"] for c0 in sorted(chunks)]})


def _finish_sr_store(out, shape, names, chunk_channels: int, start: float) -> ChannelStack:
    import zarr

    dd.barrier()
    seconds = time.perf_counter() - start
    if dd.is_main_process():
        zarr.open_group(str(out), mode="r+").attrs.update({"complete": True, "seconds": seconds})
    dd.barrier()
    return ChannelStack(Path(out), tuple(shape), tuple(names), chunk_channels, seconds)


def reconstruct_many_channels(
    lr_msi,
    he_rgb,
    *,
    he_pixel_size_um: float,
    msi_pixel_size_um: float,
    out: str | os.PathLike,
    settings: Settings | None = None,
    methods: Sequence[str] = ("smsdl",),
    transform=None,
    mask_lr: np.ndarray | None = None,
    channel_names: Sequence[str] | None = None,
    chunk_channels: int = DEFAULT_CHUNK_CHANNELS,
    cache_dir: str | os.PathLike | None = None,
    save_weights: str | os.PathLike | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> ManyChannelRun:
    """:func:`napari_smsdl.reconstruction.reconstruct` for thousands of channels: SR stacks streamed to zarr.

    The H&E features are computed once — in memory (:func:`napari_smsdl.reconstruction.prepare_guide`
    then :func:`napari_smsdl.features.extract_features`) for an H&E array, tile by tile into a zarr
    store in ``cache_dir`` (:func:`napari_smsdl.features.extract_features_tiled`) for a lazy
    :class:`napari_smsdl.io.HistologyImage` — and every chunk of channels is then trained and
    predicted by :func:`reconstruct_channels` into ``out/sr_smsdl.zarr`` (bicubic, on request, into
    ``out/sr_bicubic.zarr`` by :func:`bicubic_channels`).

    Parameters
    ----------
    lr_msi : (C, rows, cols) array-like
        The MSI (NaN = no spectrum): numpy, memmap or zarr; read ``chunk_channels`` at a time.
    he_rgb : (H, W, 3) array or HistologyImage
        The H&E, as for :func:`napari_smsdl.reconstruction.reconstruct`.
    he_pixel_size_um, msi_pixel_size_um : float
        Pixel sizes in µm.
    out : path
        Folder for the zarr stores.
    settings : napari_smsdl.reconstruction.Settings
        Factor, feature and regression parameters, device (default ``Settings()``).
    methods : sequence of str
        ``"smsdl"``, ``"bicubic"``, ``"backprojection"`` (the H&E-free control,
        :func:`backprojection_channels`, into ``out/sr_backprojection.zarr``) and/or ``"cnn"`` (one
        network per chunk of channels, :func:`cnn_channels`, into ``out/sr_cnn.zarr``).
    transform, mask_lr, cache_dir, save_weights, progress, should_stop
        As :func:`napari_smsdl.reconstruction.reconstruct`.
    channel_names : sequence of str, optional
        Stored in the stores' attributes.
    chunk_channels : int
        Channels per chunk (one regression network per chunk).

    Notes
    -----
    Under torchrun every rank must call this with the same arguments. In-memory features are
    computed by rank 0 alone (it alone reads and writes the feature cache and ``save_weights``)
    and broadcast; tiled features and the chunks of channels are shared between the ranks; all
    ranks must see ``out`` and ``cache_dir`` on a common file system.
    """
    from ..features import extract_features
    from ..io import HistologyImage
    from ._pipeline import Method, Settings, check_factor, prepare_guide, tiled_feature_store

    settings = settings or Settings()
    methods = [Method(m) for m in methods]
    n_ch, rows, cols = (int(s) for s in lr_msi.shape)
    factor = check_factor(settings.factor)
    if chunk_channels < 1:
        raise InputError(f"chunk_channels must be at least 1, got {chunk_channels}")
    out = Path(out)
    if dd.is_main_process():
        out.mkdir(parents=True, exist_ok=True)
    names = tuple(channel_names) if channel_names is not None else tuple(f"channel {i}" for i in range(n_ch))
    mask_lr = mask_from_stack(lr_msi, chunk_channels) if mask_lr is None else np.asarray(mask_lr, bool)
    sr, seconds = {}, {}
    from_cache, tiled = False, isinstance(he_rgb, HistologyImage)
    if Method.BICUBIC in methods:
        t0 = time.perf_counter()
        sr[Method.BICUBIC.value] = bicubic_channels(lr_msi, factor, out / "sr_bicubic.zarr", mask_lr=mask_lr,
                                                    channel_names=names, chunk_channels=chunk_channels,
                                                    should_stop=should_stop)
        seconds[Method.BICUBIC.value] = time.perf_counter() - t0
    if Method.BACKPROJECTION in methods:
        t0 = time.perf_counter()
        sr[Method.BACKPROJECTION.value] = backprojection_channels(
            lr_msi, factor, out / "sr_backprojection.zarr", mask_lr=mask_lr, channel_names=names,
            chunk_channels=chunk_channels, should_stop=should_stop)
        seconds[Method.BACKPROJECTION.value] = time.perf_counter() - t0
    guide = None
    if Method.CNN in methods and not tiled:  # the guide on every rank: each trains its own CNN chunks
        guide, _ = prepare_guide(he_rgb, he_pixel_size_um=he_pixel_size_um, msi_shape=(rows, cols),
                                 msi_pixel_size_um=msi_pixel_size_um, factor=factor, transform=transform,
                                 max_cell_px=settings.max_cell_px)
    features = None
    if Method.SMSDL in methods or (Method.CNN in methods and tiled):
        t0 = time.perf_counter()
        if tiled:
            store = tiled_feature_store(he_rgb, (rows, cols), msi_pixel_size_um, he_pixel_size_um, transform, settings,
                                        cache_dir, save_weights, progress, should_stop)
            features, from_cache = store.open(), store.from_cache  # streamed, never whole in memory
            if Method.CNN in methods:  # whole slide: each SR cell's mean colour (the last 3 features)
                guide = np.clip(np.asarray(features[-3:], np.float32).transpose(1, 2, 0), 0, 1)
        else:
            data = None
            if dd.is_main_process():
                if guide is None:
                    guide, _ = prepare_guide(
                        he_rgb, he_pixel_size_um=he_pixel_size_um, msi_shape=(rows, cols),
                        msi_pixel_size_um=msi_pixel_size_um, factor=factor, transform=transform,
                        max_cell_px=settings.max_cell_px,
                    )
                maps = extract_features(
                    guide, sr_shape=(rows * factor, cols * factor), factor=factor, params=settings.features,
                    cache_dir=cache_dir, device=settings.device, save_weights=save_weights, progress=progress,
                    should_stop=should_stop, distributed=False,  # rank 0 alone; the others wait below
                )
                data, from_cache = maps.data, maps.from_cache
            features = dd.broadcast_array(data)  # the other ranks wait here while rank 0 computes
            from_cache = bool(dd.broadcast_object(from_cache))
        seconds["features"] = time.perf_counter() - t0
    if Method.SMSDL in methods:
        t0 = time.perf_counter()
        stack = reconstruct_channels(
            features, lr_msi, factor, out / "sr_smsdl.zarr", mask_lr=mask_lr, channel_names=names,
            chunk_channels=chunk_channels, params=settings.regression, device=settings.device, progress=progress,
            should_stop=should_stop,
        )
        sr[Method.SMSDL.value] = stack
        seconds[Method.SMSDL.value] = time.perf_counter() - t0 + seconds.get("features", 0.0)
    if Method.CNN in methods:
        t0 = time.perf_counter()
        sr[Method.CNN.value] = cnn_channels(lr_msi, guide, out / "sr_cnn.zarr", settings=settings, mask_lr=mask_lr,
                                            channel_names=names, chunk_channels=chunk_channels, progress=progress,
                                            should_stop=should_stop)
        seconds[Method.CNN.value] = time.perf_counter() - t0
    return ManyChannelRun(sr, seconds, settings, from_cache, tiled)
