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
``CHUNKED_ABOVE_CHANNELS`` channels. It and the in-memory
:func:`napari_smsdl.reconstruction.reconstruct` are one chunk loop, :func:`_run_chunks`: the guide and
features once (:func:`._pipeline._guide_and_features`), then every method (SMSDL, bicubic, the H&E-free
control, the CNN) chunk by chunk into a per-method sink — zarr stores here, numpy arrays (one chunk
of all channels) there.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import distributed as dd
from ..errors import Cancelled, InputError
from ..io import tissue_from
from ._pipeline import (
    Method,
    ProgressFn,
    Reconstruction,
    Settings,
    _guide_and_features,
    check_factor,
    check_inputs,
    run_cnn,
)
from ._regression import RegressionParams, _standardise, fit_guided, max_pca_dims


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
    settings = Settings(factor=int(factor), regression=params, device=device)
    names, mask_lr, block_rows = _check_chunked(lr_msi, int(factor), chunk_channels, channel_names, mask_lr,
                                                block_rows, features)
    sinks = _zarr_sinks({Method.SMSDL.value: Path(out)}, lr_msi.shape, int(factor), block_rows, names)
    run = _run_chunks(features, lr_msi, [Method.SMSDL], sinks, settings=settings, chunk_channels=chunk_channels,
                     mask_lr=mask_lr, block_rows=block_rows, progress=progress, should_stop=should_stop)
    _record_guidance(Path(out), run.records[Method.SMSDL.value], int(lr_msi.shape[0]))
    return _finish_sr_store(Path(out), sinks[Method.SMSDL.value]["sr"].shape, names, chunk_channels, start)


# ---------------------------------------------------------------------------------------------
# the one chunk loop behind reconstruct (numpy sinks) and reconstruct_many_channels (zarr sinks)


@dataclass
class ChunkRun:
    """What :func:`_run_chunks` did: per method, seconds and {first channel of a chunk: record}.

    An SMSDL record has ``guidance`` (:meth:`Guidance.to_dict`), ``choices`` and ``loss_history``;
    a CNN record ``choices`` (what it ran) and ``loss_history``. Only this rank's chunks.
    """

    seconds: dict
    records: dict


def _run_chunks(
    features,
    lr_msi,
    methods: Sequence,
    sinks: dict,
    *,
    settings: Settings,
    chunk_channels: int,
    mask_lr: np.ndarray,
    guide: np.ndarray | None = None,
    block_rows: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_loss: Callable[[int, float], None] | None = None,
) -> ChunkRun:
    """Every method on every chunk of ``chunk_channels`` channels, each written into its sink.

    ``sinks`` maps a method's value to {"sr": array} (SMSDL also "uncertainty"): numpy arrays for
    :func:`napari_smsdl.reconstruction.reconstruct`, zarr arrays for :func:`reconstruct_many_channels`,
    (C, rows·F, cols·F), written ``block_rows`` SR rows at a time. ``features`` (SMSDL) are
    standardised once; ``guide`` is the CNN's. Per chunk: SMSDL (:func:`fit_guided`), bicubic, the
    H&E-free control (SMSDL's own when it ran) and the CNN with SMSDL's conservation of that chunk.

    One chunk (all channels) is :func:`train_regression` itself, networks shared between torchrun
    ranks as there. With several chunks rank 0 chooses the PCA dimensions on the first, every chunk
    uses them, and the chunks are dealt round robin between ranks (each writes only its own).
    """
    from ._regression import _ddp_active
    from .baselines import bicubic_upsample
    from .baselines.backprojection import Conservation, conserve

    methods = [Method(m) for m in methods]
    factor = int(settings.factor)
    params = settings.regression
    n_ch, rows, cols = (int(s) for s in lr_msi.shape)
    sr_rows = rows * factor
    block_rows = sr_rows if block_rows is None else block_rows
    chunks = [(c0, min(c0 + chunk_channels, n_ch)) for c0 in range(0, n_ch, chunk_channels)]
    seconds = {m.value: 0.0 for m in methods}
    records: dict = {m.value: {} for m in (Method.SMSDL, Method.CNN) if m in methods}
    smsdl = Method.SMSDL in methods

    def fit(lr, **kw):
        kw = {"progress": progress, **kw}
        return fit_guided(x_feat, lr, factor, mask_lr=mask_lr, params=params, device=settings.device,
                          should_stop=should_stop, **kw)

    x_feat, first, pca_dims = None, None, None
    if smsdl:
        t0 = time.perf_counter()
        x_feat = standardise_features(features, max_pca_dims(params), block_rows)
        if len(chunks) == 1:  # train_regression: every rank trains the one chunk's networks together
            mine = chunks
        else:  # one feature space for all chunks: the leading components, their number chosen on the first
            if dd.is_main_process():
                first = fit(np.asarray(lr_msi[: chunks[0][1]], np.float32), progress=None,
                            stage=f"SMSDL channels 1-{chunks[0][1]} of {n_ch}")
            pca_dims = int(dd.broadcast_object(first.choices["pca_dims"]["value"] if first is not None else None))
            mine = dd.shard(chunks)
        seconds[Method.SMSDL.value] += time.perf_counter() - t0
    else:
        mine = chunks if len(chunks) == 1 else dd.shard(chunks)
    # one chunk runs on every rank (as reconstruct does): rank 0 alone writes a shared (zarr) sink
    shared = len(chunks) == 1 and not dd.is_main_process()
    for i, (c0, c1) in enumerate(mine):
        if should_stop is not None and should_stop():
            raise Cancelled("channel reconstruction cancelled")
        lr = np.asarray(lr_msi[c0:c1], np.float32)
        out: dict = {}
        t0 = time.perf_counter()
        bicubic = bicubic_upsample(np.nan_to_num(lr), factor, mask_lr=mask_lr)
        bicubic_seconds = time.perf_counter() - t0
        if Method.BICUBIC in methods:
            out[Method.BICUBIC.value], seconds[Method.BICUBIC.value] = {"sr": bicubic}, \
                seconds[Method.BICUBIC.value] + bicubic_seconds
        conservation = params.conservation if params.conservation != "auto" else "exact"
        control = None
        if smsdl:
            t0 = time.perf_counter()
            if len(chunks) == 1:
                result = fit(lr, on_loss=on_loss, distributed=_ddp_active())
            elif first is not None and c0 == 0:
                result, first = first, None
            else:
                result = fit(lr, stage=f"SMSDL channels {c0 + 1}-{c1} of {n_ch}", pca_dims=pca_dims)
            out[Method.SMSDL.value] = {"sr": result.sr, "uncertainty": result.uncertainty}
            records[Method.SMSDL.value][c0] = {"guidance": result.guidance.to_dict(), "choices": result.choices,
                                               "loss_history": result.loss_history}
            conservation = result.choices["conservation"]["value"]
            control = result.control  # the H&E-free control SMSDL fell back to: computed there already
            del result
            seconds[Method.SMSDL.value] += time.perf_counter() - t0
        if Method.BACKPROJECTION in methods:
            t0 = time.perf_counter()
            out[Method.BACKPROJECTION.value] = {"sr": control if control is not None
                                                else conserve(bicubic, lr, factor, mask_lr, Conservation.EXACT)}
            seconds[Method.BACKPROJECTION.value] += bicubic_seconds + time.perf_counter() - t0
        if Method.CNN in methods:
            t0 = time.perf_counter()
            cnn, ran, history = run_cnn(lr, guide, factor, mask_lr=mask_lr, bicubic=bicubic, settings=settings,
                                        conservation=conservation, progress=progress, should_stop=should_stop)
            out[Method.CNN.value] = {"sr": cnn}
            records[Method.CNN.value][c0] = {"choices": ran, "loss_history": history}
            seconds[Method.CNN.value] += time.perf_counter() - t0
        for method, arrays in out.items():  # block by block of SR rows: a zarr chunk is (1, block_rows, cols·F)
            for name, data in arrays.items():
                if shared and not isinstance(sinks[method][name], np.ndarray):
                    continue
                for r0 in range(0, sr_rows, block_rows):
                    sinks[method][name][c0:c1, r0 : r0 + block_rows] = data[:, r0 : r0 + block_rows]
        del out
        if progress is not None and len(chunks) > 1:
            progress("SMSDL channel chunks" if smsdl else "channel chunks", i + 1, len(mine))
        log.info("channels %d-%d of %d written", c0 + 1, c1, n_ch)
    return ChunkRun(seconds, records)


def reconstruct(
    lr_msi: np.ndarray,
    he_rgb: np.ndarray,
    *,
    he_pixel_size_um: float,
    msi_pixel_size_um: float,
    settings: Settings | None = None,
    methods: Sequence[Method | str] = ("smsdl", "bicubic", "cnn"),
    transform=None,
    mask_lr: np.ndarray | None = None,
    cache_dir=None,
    save_weights=None,
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_loss: Callable[[int, float], None] | None = None,
) -> Reconstruction:
    """Super-resolve a low-resolution MSI stack (C, h, w) with the chosen methods.

    NaN marks MSI pixels without a spectrum. ``mask_lr`` (h, w) selects the tissue pixels the
    networks train on (default: acquired pixels with any non-zero channel). This is
    :func:`reconstruct_many_channels`' chunk loop (:func:`_run_chunks`) with all channels in one chunk
    and numpy arrays as its sinks.
    """
    settings = settings or Settings()
    methods = [Method(m) for m in methods]
    lr, factor, mask_lr = check_inputs(lr_msi, he_rgb, settings, methods, mask_lr, transform)
    prep = _guide_and_features(he_rgb, lr.shape[1:], methods, he_pixel_size_um=he_pixel_size_um,
                              msi_pixel_size_um=msi_pixel_size_um, settings=settings, transform=transform,
                              cache_dir=cache_dir, save_weights=save_weights, progress=progress,
                              should_stop=should_stop)
    shape = (lr.shape[0], lr.shape[1] * factor, lr.shape[2] * factor)
    sinks = {m.value: {name: np.zeros(shape, np.float32) for name in
                       (("sr", "uncertainty") if m is Method.SMSDL else ("sr",))} for m in methods}
    run = _run_chunks(prep.features, lr, methods, sinks, settings=settings, chunk_channels=max(lr.shape[0], 1),
                     mask_lr=mask_lr, guide=prep.guide, progress=progress, should_stop=should_stop, on_loss=on_loss)
    records = {m: chunks[0] for m, chunks in run.records.items()}  # one chunk
    return Reconstruction(
        {m: sink["sr"] for m, sink in sinks.items()}, prep.seconds_for(run.seconds), prep.guide, prep.maps,
        {m: r["loss_history"] for m, r in records.items()}, settings,
        {m: sinks[m]["uncertainty"] for m in records if "uncertainty" in sinks[m]},
        {m: r["guidance"] for m, r in records.items() if "guidance" in r},
        {m: r["choices"] for m, r in records.items()},
    )


def _check_chunked(lr_msi, factor: int, chunk_channels: int, channel_names, mask_lr, block_rows, features=None):
    """The chunked path's refusals in one place: (channel names, tissue mask, SR rows per block)."""
    n_ch, rows, cols = (int(s) for s in lr_msi.shape)
    sr_rows, sr_cols = rows * factor, cols * factor
    if features is not None and tuple(features.shape[1:]) != (sr_rows, sr_cols):
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
    return names, mask_lr, min(max(factor, block_rows // factor * factor), sr_rows)


def _zarr_sinks(paths: dict, lr_shape, factor: int, block_rows: int, names) -> dict:
    """{method value: zarr group path} → the sinks of :func:`_run_chunks` (SMSDL also gets ``uncertainty``)."""
    shape = (int(lr_shape[0]), int(lr_shape[1]) * factor, int(lr_shape[2]) * factor)
    sinks = {}
    for method, path in paths.items():
        sinks[method] = {"sr": _create_sr_store(path, shape, block_rows, names, factor)}
        if method == "smsdl":
            sinks[method].update(_create_extra_stores(path, shape, block_rows))
    return sinks


# ---------------------------------------------------------------------------------------------
# the whole many-channel run: features once, then SMSDL (and bicubic) chunk by chunk


@dataclass(frozen=True)
class ManyChannelRun:
    """What :func:`reconstruct_many_channels` wrote: an SR stack on disk per method, and timings.

    ``sr`` maps each method asked for to its :class:`ChannelStack`; ``seconds`` has ``"features"``
    (guide + features) and each method's, as in :class:`napari_smsdl.reconstruction.Reconstruction`
    (SMSDL and the CNN include the guide and features).
    """

    sr: dict
    seconds: dict
    settings: Settings
    features_from_cache: bool
    tiled: bool


def _create_sr_store(out, shape, block_rows: int, names, factor: int):
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


def _create_extra_stores(out, shape, block_rows: int) -> dict:
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
    for key in ("weight", "held_out_veto"):
        if all(key in chunks[c0]["guidance"] for c0 in chunks):
            guidance[key] = []
    for c0 in sorted(chunks):
        for key in guidance:
            guidance[key] += chunks[c0]["guidance"][key]
    decided = {chunks[c0]["guidance"].get("decided_by") for c0 in chunks}
    if len(decided) == 1 and None not in decided:  # the same for every chunk (the tissue mask decides it)
        guidance["decided_by"] = decided.pop()
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

    The guide and H&E features are computed once (:func:`._pipeline._guide_and_features`: in memory
    for an H&E array, tile by tile into a zarr store in ``cache_dir`` for a lazy
    :class:`napari_smsdl.io.HistologyImage`), then :func:`_run_chunks` runs every method chunk by
    chunk into ``out/sr_<method>.zarr`` (SMSDL's group also holds ``uncertainty`` and the guidance).

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
        ``"smsdl"``, ``"bicubic"``, ``"backprojection"`` (the H&E-free control: SMSDL's own when it
        ran) and/or ``"cnn"`` (one network per chunk, with SMSDL's conservation of that chunk).
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
    start = time.perf_counter()
    settings = settings or Settings()
    methods = [Method(m) for m in methods]
    factor = check_factor(settings.factor)
    names, mask_lr, block_rows = _check_chunked(lr_msi, factor, chunk_channels, channel_names, mask_lr, None)
    out = Path(out)
    if dd.is_main_process():
        out.mkdir(parents=True, exist_ok=True)
    prep = _guide_and_features(he_rgb, tuple(lr_msi.shape[1:]), methods, he_pixel_size_um=he_pixel_size_um,
                              msi_pixel_size_um=msi_pixel_size_um, settings=settings, transform=transform,
                              cache_dir=cache_dir, save_weights=save_weights, progress=progress,
                              should_stop=should_stop, in_memory=False)
    paths = {m.value: out / f"sr_{m.value}.zarr" for m in methods}
    sinks = _zarr_sinks(paths, lr_msi.shape, factor, block_rows, names)
    run = _run_chunks(prep.features, lr_msi, methods, sinks, settings=settings, chunk_channels=chunk_channels,
                     mask_lr=mask_lr, guide=prep.guide, block_rows=block_rows, progress=progress,
                     should_stop=should_stop)
    if Method.SMSDL in methods:
        _record_guidance(paths[Method.SMSDL.value], run.records[Method.SMSDL.value], len(names))
    sr = {m: _finish_sr_store(path, sinks[m]["sr"].shape, names, chunk_channels, start) for m, path in paths.items()}
    seconds = {**prep.seconds_for(run.seconds), "features": prep.seconds}
    return ManyChannelRun(sr, seconds, settings, prep.from_cache, prep.tiled)
