"""Thousands of MSI channels: SMSDL regression over channel chunks, SR stacks streamed to a zarr store.

:func:`napari_smsdl.regression.train_regression` holds every channel's target, bicubic input and
prediction (C × rows·F × cols·F floats, times the restarts) in memory. For an MSI with thousands
of channels :func:`reconstruct_channels` instead:

* standardises the SR-cell features once (streamed over spatial blocks when they live on disk,
  e.g. the ``features`` array of :func:`napari_smsdl.features_tiled.extract_features_tiled`);
* reads the MSI ``chunk_channels`` channels at a time (numpy memmap, zarr or any sliceable array);
* trains the same network as ``train_regression`` on each chunk (same loss, restarts, seeds);
* predicts block by block of SR rows and writes each block to the ``sr`` array of a zarr store,
  (C, rows·F, cols·F) float32, chunked (chunk_channels, block, cols·F).

Memory therefore grows with ``chunk_channels`` and the SR grid's features, not with C. A chunk
holding all channels gives ``train_regression``'s result (up to float rounding of the block-wise
prediction). Under torchrun the chunks are shared round robin between ranks (each rank trains its
own chunks in full — for many channels that is the better use of several GPUs than splitting one
small network's batches) and every rank writes only its own chunks.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import distributed as dd
from .errors import Cancelled, InputError
from .regression import (
    RegressionParams,
    _design_matrix,
    _fit,
    _standardise,
    _targets,
    conserve_block_means,
    effective_pca_dims,
)
from .torch_setup import get_device

log = logging.getLogger(__name__)


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


def _mask_from_stack(lr_msi, chunk: int) -> np.ndarray:
    """Acquired pixels (finite in every channel) with any non-zero channel, streamed over channels."""
    n_ch, rows, cols = lr_msi.shape
    acquired = np.ones((rows, cols), bool)
    nonzero = np.zeros((rows, cols), bool)
    for c0 in range(0, n_ch, chunk):
        part = np.asarray(lr_msi[c0 : c0 + chunk], np.float32)
        acquired &= np.isfinite(part).all(0)
        nonzero |= (np.nan_to_num(part) != 0).any(0)
    return acquired & nonzero


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
        As :func:`napari_smsdl.regression.train_regression`.
    block_rows : int, optional
        SR rows predicted and written at a time (default: about 32 768 SR cells per block).

    Returns
    -------
    ChannelStack
    """
    import torch
    import zarr

    from .baselines import bicubic_upsample

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
    mask_lr = _mask_from_stack(lr_msi, chunk_channels) if mask_lr is None else np.asarray(mask_lr, bool)
    if mask_lr.shape != (rows, cols):
        raise InputError(f"mask {mask_lr.shape} does not match the MSI grid {(rows, cols)}")
    if block_rows is None:
        block_rows = 32768 // sr_cols
    block_rows = max(factor, block_rows // factor * factor)  # whole MSI pixels per block

    out = Path(out)
    if dd.is_main_process():
        root = zarr.open_group(str(out), mode="w")
        root.create_array("sr", shape=(n_ch, sr_rows, sr_cols), chunks=(min(chunk_channels, n_ch), block_rows, sr_cols),
                          dtype="float32", compressors=None, fill_value=0.0)
        root.attrs.update({"complete": False, "channel_names": list(names), "factor": factor,
                           "axes": "channel, row, col (SR grid)"})
    dd.barrier()
    sr_arr = zarr.open_array(str(out), path="sr", mode="r+")

    # one PCA for all chunks, capped by the pixels of the common tissue mask (see effective_pca_dims)
    x_feat = standardise_features(features, effective_pca_dims(params, int(mask_lr.sum())), block_rows)
    dev = get_device(device)
    chunks = [(c0, min(c0 + chunk_channels, n_ch)) for c0 in range(0, n_ch, chunk_channels)]
    mine = dd.shard(chunks)
    for i, (c0, c1) in enumerate(mine):
        if should_stop is not None and should_stop():
            raise Cancelled("SMSDL channel reconstruction cancelled")
        lr = np.asarray(lr_msi[c0:c1], np.float32)
        chunk_mask, scale, target = _targets(lr, mask_lr)
        bicubic = bicubic_upsample(np.nan_to_num(lr), factor, mask_lr=chunk_mask) if params.use_bicubic_input else None
        x = torch.from_numpy(_design_matrix(x_feat, bicubic, scale, params)).to(dev)
        del bicubic
        stage = f"SMSDL channels {c0 + 1}-{c1} of {n_ch}"
        nets, _ = _fit(x, target, chunk_mask, factor, params, dev, progress=progress, should_stop=should_stop,
                       stage=stage, distributed=False)
        for r0 in range(0, sr_rows, block_rows):
            r1 = min(r0 + block_rows, sr_rows)
            xb = x[r0 * sr_cols : r1 * sr_cols]
            with torch.no_grad():
                preds = [torch.nn.functional.softplus(net(xb)).T.reshape(c1 - c0, r1 - r0, sr_cols).cpu().numpy()
                         for net in nets]
            block = np.median(np.stack(preds), axis=0) * scale[:, None, None]
            if params.conserve_mean:
                m0, m1 = r0 // factor, r1 // factor
                block = conserve_block_means(block, lr[:, m0:m1], factor, chunk_mask[m0:m1])
            sr_arr[c0:c1, r0:r1, :] = block.astype(np.float32)
        del x, nets
        if progress is not None:
            progress("SMSDL channel chunks", i + 1, len(mine))
        log.info("channels %d-%d of %d written", c0 + 1, c1, n_ch)
    dd.barrier()
    seconds = time.perf_counter() - start
    if dd.is_main_process():
        zarr.open_group(str(out), mode="r+").attrs.update({"complete": True, "seconds": seconds})
    dd.barrier()
    return ChannelStack(out, (n_ch, sr_rows, sr_cols), names, chunk_channels, seconds)
