"""Writing results, every file atomically (temp file, then rename).

* :func:`write_tiff_stack`: float32 OME-TIFF stacks with physical pixel size and channel names;
* :func:`write_sr_imzml`: an SR stack as a continuous imzML at the SR pixel size;
* :func:`write_metrics_csv`: per-method, per-channel scores as CSV;
* :func:`write_guidance_csv`: per channel, how much the histology helped SMSDL and whether it was used.

:func:`napari_smsdl.project.export_results` writes all of them (and the comparison figure) for a project.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def write_tiff_stack(
    path: str | os.PathLike,
    stack,
    *,
    channel_names: Sequence[str] | None = None,
    pixel_size_um: float | tuple[float, float] | None = None,
) -> Path:
    """Write (channels, rows, cols) float32 as an OME-TIFF (atomically: temp file, then rename).

    The OME metadata carry the channel names and, when known, the physical pixel size in µm (one
    number, or ``(x, y)`` when they differ), so the stack opens at the right scale in napari,
    Fiji or QuPath.

    ``stack`` is a numpy array, or any (channels, rows, cols) array-like with ``shape`` and
    ``__getitem__`` (a zarr array, a memmap, :meth:`napari_smsdl.reconstruction._channels.ChannelStack.open`): that
    is streamed to the file one channel (TIFF page) at a time and never held whole. It is read a few
    channels at a time — one chunk along the channel axis of a chunked array, so every chunk is read
    once, but at most ``PAGE_READ_BYTES`` (256 MB) and at least one channel. Both give the same file
    (pixels and OME metadata). A stack over 4 GB is written as BigTIFF.
    """
    import tifffile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lazy = (not isinstance(stack, np.ndarray) and hasattr(stack, "shape") and hasattr(stack, "__getitem__")
            and len(stack.shape) == 3)  # a lazy single image is read whole
    if lazy:
        shape = tuple(int(s) for s in stack.shape)
    else:
        stack = np.asarray(stack, dtype=np.float32)
        if stack.ndim == 2:
            stack = stack[None]
        shape = stack.shape
    metadata: dict = {"axes": "CYX"}
    if channel_names is not None:
        metadata["Channel"] = {"Name": [str(n) for n in channel_names]}
    if pixel_size_um is not None and not np.isscalar(pixel_size_um):
        size_x, size_y = (float(v) for v in pixel_size_um)
        metadata.update(PhysicalSizeX=size_x, PhysicalSizeY=size_y, PhysicalSizeXUnit="µm", PhysicalSizeYUnit="µm")
    elif pixel_size_um:
        metadata.update(PhysicalSizeX=float(pixel_size_um), PhysicalSizeY=float(pixel_size_um),
                        PhysicalSizeXUnit="µm", PhysicalSizeYUnit="µm")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        if lazy:  # tifffile cannot size an iterator: choose BigTIFF as it does for arrays
            bigtiff = int(np.prod(shape)) * 4 > 2**32 - 2**25
            tifffile.imwrite(tmp, data=_pages(stack, shape), shape=shape, dtype=np.float32, bigtiff=bigtiff, ome=True,
                             metadata=metadata, photometric="minisblack")
        else:
            tifffile.imwrite(tmp, stack, ome=True, metadata=metadata, photometric="minisblack")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return path


#: Bytes of channels read at a time when a lazy stack is written page by page.
PAGE_READ_BYTES = 256 * 2**20


def _pages(stack, shape: tuple[int, int, int]):
    """(rows, cols) float32 pages of a lazy (channels, rows, cols) stack, a few channels per read."""
    page_bytes = max(1, shape[1] * shape[2] * 4)
    chunks = getattr(stack, "chunks", None)
    first = chunks[0] if chunks else 1  # an int (zarr), or the block sizes along the axis (dask)
    along = int(max(first)) if isinstance(first, tuple) and first else int(first) if isinstance(first, (int, np.integer)) else 1
    group = max(1, min(along, PAGE_READ_BYTES // page_bytes))
    for c0 in range(0, shape[0], group):
        block = np.asarray(stack[c0 : min(c0 + group, shape[0])], dtype=np.float32)
        for page in block:
            yield np.ascontiguousarray(page)


def write_sr_imzml(
    path: str | os.PathLike,
    stack: np.ndarray,
    mz: Sequence[float],
    pixel_size_um: float | tuple[float, float],
    *,
    offset_rc_px: tuple[int, int] = (0, 0),
) -> Path:
    """Write a super-resolved stack (channels, rows, cols) as a *continuous* imzML/ibd pair.

    Every SR pixel becomes one spectrum on a shared m/z axis holding one value per channel, so
    the file opens in any imzML viewer (and :func:`napari_smsdl.io.open_imzml`) as an image at
    the SR pixel size, recorded in the scan settings. Pixels that are NaN in every channel are left
    out (no spectrum); other NaNs are written as 0.

    Parameters
    ----------
    path : path-like
        The ``.imzML`` file; the ``.ibd`` is written beside it (both atomically).
    stack : (channels, rows, cols) array
        Intensities in the MSI's units.
    mz : sequence of float
        One m/z per channel; they must be distinct. The axis is written in increasing order.
    pixel_size_um : float or (float, float)
        The SR pixel size in µm (MSI pixel size / F); ``(x, y)`` when they differ.
    offset_rc_px : (int, int)
        Where the grid starts on the instrument's grid (0-based rows, cols); positions are
        ``(col + 1 + offset, row + 1 + offset)``.

    Returns
    -------
    Path of the ``.imzML`` written.
    """
    from ..errors import InputError
    from ._imzml import write_imzml

    stack = np.asarray(stack, dtype=np.float32)
    if stack.ndim == 2:
        stack = stack[None]
    if stack.ndim != 3:
        raise InputError(f"an SR stack must be (channels, rows, cols), got shape {stack.shape}", path)
    mz_arr = np.asarray(mz, dtype=np.float64)
    if mz_arr.shape != (stack.shape[0],):
        raise InputError(f"{mz_arr.size} m/z values for {stack.shape[0]} channels: imzML needs one m/z per channel", path)
    if not np.all(np.isfinite(mz_arr)) or (mz_arr <= 0).any() or len(np.unique(mz_arr)) != len(mz_arr):
        raise InputError(f"m/z values must be distinct positive numbers, got {mz_arr.tolist()}", path)
    sizes = (pixel_size_um,) if np.isscalar(pixel_size_um) or pixel_size_um is None else tuple(pixel_size_um)
    if not all(s and np.isfinite(s) and s > 0 for s in sizes) or len(sizes) not in (1, 2):
        raise InputError(f"pixel size must be a positive number of µm, got {pixel_size_um!r}", path)
    size = float(sizes[0]) if len(sizes) == 1 else (float(sizes[0]), float(sizes[1]))
    order = np.argsort(mz_arr)
    axis = mz_arr[order]
    ordered = stack[order]
    acquired = np.isfinite(ordered).any(axis=0)
    values = np.nan_to_num(ordered, nan=0.0)

    def spectra():
        for row, col in zip(*np.nonzero(acquired), strict=True):
            yield int(row), int(col), axis, values[:, row, col]

    return write_imzml(path, spectra, mode="continuous", pixel_size_um=size, offset_rc_px=offset_rc_px)


#: Metric columns of the metrics CSV, in order.
CSV_METRICS = ("rmse", "ssim", "r2", "psnr", "pearson")


def write_metrics_csv(
    path: str | os.PathLike,
    metrics: dict,
    *,
    channel_names: Sequence[str] | None = None,
) -> Path:
    """Write per-method, per-channel scores as CSV (atomically).

    Parameters
    ----------
    metrics : dict
        ``method -> metric -> {"mean": float, "per_channel": [float, ...]}`` as returned per method
        by :func:`napari_smsdl.evaluation.score_stack` (extra keys such as ``"seconds"`` are ignored).
    channel_names : sequence of str, optional
        One name per channel (default ``channel 0``, ``channel 1``, ...).

    Notes
    -----
    Columns: ``method,channel,rmse,ssim,r2,psnr,pearson``; one row per method and channel, then
    one row per method with channel ``mean``. Numbers are written with full precision (``repr``);
    a metric missing for a method is left empty.
    """
    rows = []
    for method, scores in metrics.items():
        if not isinstance(scores, dict):
            continue
        present = [m for m in CSV_METRICS if isinstance(scores.get(m), dict)]
        if not present:
            continue
        n_ch = len(scores[present[0]]["per_channel"])
        names = list(channel_names) if channel_names is not None else [f"channel {c}" for c in range(n_ch)]
        if len(names) != n_ch:
            raise ValueError(f"{len(names)} channel names for {n_ch} channels of method {method!r}")
        for c in range(n_ch):
            rows.append([method, names[c], *(_num(scores, m, c) for m in CSV_METRICS)])
        rows.append([method, "mean", *(_num(scores, m, None) for m in CSV_METRICS)])
    return _write_csv_atomic(path, ["method", "channel", *CSV_METRICS], rows)


def _write_csv_atomic(path: str | os.PathLike, header: list, rows: list) -> Path:
    """Write a header and rows as CSV to a temporary file beside ``path``, then rename it into place."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(buffer.getvalue(), encoding="utf-8")
    os.replace(tmp, path)
    return path


def _num(scores: dict, metric: str, channel: int | None) -> str:
    entry = scores.get(metric)
    if not isinstance(entry, dict):
        return ""
    value = entry["mean"] if channel is None else entry["per_channel"][channel]
    return repr(float(value))


def write_guidance_csv(
    path: str | os.PathLike,
    guidance: dict,
    *,
    channel_names: Sequence[str] | None = None,
) -> Path:
    """Write the per-channel histology gain of each method as CSV (atomically).

    Parameters
    ----------
    guidance : dict
        ``method -> {"gain": [...], "gain_std": [...], "used_histology": [...]}`` (one entry per
        channel, :meth:`napari_smsdl.reconstruction.Guidance.to_dict`).
    channel_names : sequence of str, optional
        One name per channel (default ``channel 0``, ``channel 1``, ...).

    Notes
    -----
    Columns: ``method,channel,histology_gain,histology_gain_std,used_histology``; the gain is
    1 − held-out MSE with the histology / held-out MSE without it (mean over folds, ± its std over
    folds); ``used_histology`` is ``false`` where the output is the H&E-free control.
    """
    rows = []
    for method, entry in guidance.items():
        if not isinstance(entry, dict) or "gain" not in entry:
            continue
        gain = list(entry["gain"])
        std = list(entry.get("gain_std") or [None] * len(gain))
        used = list(entry.get("used_histology") or [None] * len(gain))
        names = list(channel_names) if channel_names is not None else [f"channel {c}" for c in range(len(gain))]
        if len(names) != len(gain):
            raise ValueError(f"{len(names)} channel names for {len(gain)} channels of method {method!r}")
        for c in range(len(gain)):
            rows.append([method, names[c], _maybe(gain[c]), _maybe(std[c]),
                         "" if used[c] is None else str(bool(used[c])).lower()])
    return _write_csv_atomic(path, ["method", "channel", "histology_gain", "histology_gain_std", "used_histology"], rows)


def _maybe(value) -> str:
    return "" if value is None else repr(float(value))
