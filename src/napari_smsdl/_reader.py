"""napari reader for imzML, and the plain functions that turn our data into layer data tuples.

Every layer is placed in one physical space in µm whose origin is the **top-left corner** of the
images: a pixel of size ``s`` µm with index ``(row, col)`` has its centre at
``((row + 0.5) * s, (col + 0.5) * s)``. In napari terms: ``scale = (s, s)`` and
``translate = (s/2, s/2)`` (see :func:`grid_placement`). So an H&E at 2.5 µm and an MSI at 40 µm
covering the same field of view overlay exactly. Stacks are (channels, rows, cols) and get a
leading scale of 1 and translate of 0 on the channel axis.

Nothing here imports Qt or napari; the functions are testable headless.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .io import HistologyImage, ImzMLDataset, Normalization, open_imzml

logger = logging.getLogger(__name__)

#: napari's ``(data, kwargs, layer_type)`` tuple.
LayerDataTuple = tuple[Any, dict, str]

#: Number of peaks of the mean spectrum the reader shows as ion images.
DEFAULT_N_PEAKS = 10
#: m/z window of those ion images.
DEFAULT_TOLERANCE = "10ppm"

_IBD_SUFFIXES = (".ibd", ".IBD", ".Ibd")


# ---------------------------------------------------------------------------- geometry
def grid_placement(
    pixel_size_um: float | tuple[float, float] | None,
    *,
    n_leading: int = 0,
    origin_rc_um: tuple[float, float] = (0.0, 0.0),
) -> dict[str, tuple[float, ...]]:
    """napari ``scale`` and ``translate`` for a pixel grid whose top-left corner is at ``origin_rc_um``.

    Parameters
    ----------
    pixel_size_um : float, (float, float) or None
        Pixel size in µm: one number for square pixels, or ``(row, col)`` = (y, x) sizes when they
        differ; None means unknown and gives a scale of 1.
    n_leading : int
        Number of leading non-spatial axes (e.g. 1 for a (channels, rows, cols) stack); they get
        scale 1 and translate 0.
    origin_rc_um : (float, float)
        Top-left corner of the grid, (row, col) in µm (0, 0 by default; an imzML acquisition that
        does not start at position (1, 1) has its own, :attr:`ImzMLDataset.origin_rc_um`).

    Returns
    -------
    dict
        ``{"scale": (..., s_r, s_c), "translate": (..., o_r + s_r/2, o_c + s_c/2)}``: the centre of
        pixel (0, 0) sits at half a pixel from the origin, so grids of different pixel sizes share corners.
    """
    sizes = pixel_size_um if isinstance(pixel_size_um, (tuple, list)) else (pixel_size_um, pixel_size_um)
    size_rc = []
    for size in sizes:
        size = float(size) if size else 1.0
        if not np.isfinite(size) or size <= 0:
            raise ValueError(f"pixel size must be a positive number of µm, got {pixel_size_um!r}")
        size_rc.append(size)
    return {
        "scale": (1.0,) * n_leading + tuple(size_rc),
        "translate": (0.0,) * n_leading
        + (float(origin_rc_um[0]) + size_rc[0] / 2, float(origin_rc_um[1]) + size_rc[1] / 2),
    }


def robust_contrast_limits(data: np.ndarray, percentile: float = 99.5) -> tuple[float, float] | None:
    """(low, high) contrast limits from the finite values: ``[min, percentile]``; None if none.

    napari's own estimate does not ignore NaN (non-acquired pixels), hence this helper.
    """
    finite = np.asarray(data)[np.isfinite(data)]
    if finite.size == 0:
        return None
    low = float(finite.min())
    high = float(np.percentile(finite, percentile))
    if not high > low:
        high = float(finite.max())
    if not high > low:
        high = low + 1.0
    return low, high


# ---------------------------------------------------------------------------- layer builders
def he_layer(
    image: HistologyImage | np.ndarray,
    pixel_size_um: float | None,
    *,
    name: str = "H&E",
    metadata: dict | None = None,
) -> LayerDataTuple:
    """An RGB image layer for an H&E, in µm.

    ``image`` is a (rows, cols, 3) uint8 array or a :class:`HistologyImage`; a pyramidal one is
    passed to napari as a lazy multiscale list of its levels (nothing is read here).
    """
    multiscale = False
    if isinstance(image, HistologyImage):
        levels = list(image.levels)
        lazy_ok = all(len(lv.shape) == 3 and lv.shape[-1] in (3, 4) and np.dtype(lv.dtype) == np.uint8 for lv in levels)
        if len(levels) > 1 and lazy_ok:
            data, multiscale = levels, True
        else:
            data = image.read(0)
        source = str(image.path)
    else:
        data, source = np.asarray(image), None
    meta = {"role": "moving", "pixel_size_um": pixel_size_um, "source_path": source}
    meta.update(metadata or {})
    kwargs = {"name": name, "rgb": True, "multiscale": multiscale, "metadata": meta}
    kwargs.update(grid_placement(pixel_size_um))
    return data, kwargs, "image"


def image_layer(
    image_rc: np.ndarray,
    pixel_size_um: float | None,
    *,
    name: str,
    colormap: str = "viridis",
    metadata: dict | None = None,
    origin_rc_um: tuple[float, float] = (0.0, 0.0),
) -> LayerDataTuple:
    """A single-channel image layer (rows, cols) in µm; contrast limits ignore NaN pixels.

    ``pixel_size_um`` and ``origin_rc_um`` as in :func:`grid_placement`.
    """
    kwargs = {"name": name, "colormap": colormap, "metadata": dict(metadata or {})}
    kwargs["metadata"].setdefault("pixel_size_um", pixel_size_um)
    kwargs.update(grid_placement(pixel_size_um, origin_rc_um=origin_rc_um))
    limits = robust_contrast_limits(image_rc)
    if limits is not None:
        kwargs["contrast_limits"] = limits
    return image_rc, kwargs, "image"


def ion_stack_layer(
    data_crc: np.ndarray,
    channel_names: Sequence[str],
    pixel_size_um: float | None,
    *,
    name: str,
    mz: Sequence[float] | None = None,
    colormap: str = "magma",
    metadata: dict | None = None,
    origin_rc_um: tuple[float, float] = (0.0, 0.0),
) -> LayerDataTuple:
    """An image-stack layer (channels, rows, cols) with its channels named in the metadata.

    The metadata holds ``channel_names`` (one per channel, e.g. ``"m/z 885.5499"``), ``mz`` (the
    window centres, when the channels are m/z) and ``pixel_size_um``; the channel axis is labelled
    ``"channel (m/z)"`` so napari's slider says what it moves through. ``pixel_size_um`` and
    ``origin_rc_um`` as in :func:`grid_placement`.
    """
    data_crc = np.asarray(data_crc)
    if data_crc.ndim != 3:
        raise ValueError(f"expected a (channels, rows, cols) stack, got shape {data_crc.shape}")
    if len(channel_names) != len(data_crc):
        raise ValueError(f"{len(channel_names)} channel names for {len(data_crc)} channels")
    meta = {
        "role": "fixed",
        "pixel_size_um": pixel_size_um,
        "channel_names": [str(n) for n in channel_names],
        "mz": None if mz is None else [float(m) for m in mz],
    }
    meta.update(metadata or {})
    kwargs = {
        "name": name,
        "colormap": colormap,
        "metadata": meta,
        "axis_labels": ("channel (m/z)" if mz is not None else "channel", "y", "x"),
    }
    kwargs.update(grid_placement(pixel_size_um, n_leading=1, origin_rc_um=origin_rc_um))
    limits = robust_contrast_limits(data_crc)
    if limits is not None:
        kwargs["contrast_limits"] = limits
    return data_crc, kwargs, "image"


def imzml_layers(
    dataset: ImzMLDataset,
    *,
    n_peaks: int = DEFAULT_N_PEAKS,
    tol: str | float = DEFAULT_TOLERANCE,
    norm: Normalization | str = Normalization.NONE,
    name: str | None = None,
) -> list[LayerDataTuple]:
    """Layers for an opened imzML: its TIC image and the ion images of its strongest peaks.

    Parameters
    ----------
    dataset : ImzMLDataset
    n_peaks : int
        Number of peaks of the mean spectrum to show (:meth:`ImzMLDataset.pick_peaks`).
    tol : str or float
        m/z window around each peak, ``"10ppm"`` or ``"0.01da"``.
    norm : Normalization
        Per-pixel normalisation of the ion images.
    name : str, optional
        Start of the layer names (default: the file's stem).

    Returns
    -------
    list of LayerDataTuple
        ``[TIC (rows, cols), peaks (n_peaks, rows, cols)]`` with NaN where no spectrum was acquired;
        scale = the pixel size in µm per axis (1 when unknown), translate = the grid's origin on
        the instrument's grid (:attr:`ImzMLDataset.origin_rc_um`) plus half a pixel. The peak
        stack is left out when the mean spectrum has no peak.
    """
    stem = dataset.path.stem if name is None else name
    # square pixels: one size; x and y different: each axis at its own scale, and no single
    # "pixel_size_um" in the metadata (steps that need one refuse such a layer)
    if dataset.pixel_size_xy_um is None:
        size = square = None
    elif dataset.is_square:
        size = square = dataset.pixel_size_xy_um[0]
    else:
        size, square = dataset.pixel_size_rc_um, None
    common = {
        "source_path": str(dataset.path),
        "role": "fixed",
        "pixel_size_um": square,
        "pixel_size_xy_um": dataset.pixel_size_xy_um,
        "offset_rc_px": tuple(dataset.offset_rc_px),
    }
    place = {"origin_rc_um": dataset.origin_rc_um}
    layers = [image_layer(dataset.tic_image(), size, name=f"{stem} TIC", metadata=common, **place)]
    peaks = dataset.pick_peaks(n_peaks)
    if len(peaks):
        images = dataset.ion_images(peaks, tol, norm=norm)
        meta = dict(
            common,
            tolerance=str(tol),
            normalization=Normalization(norm).value,
            windows=[(w.low, w.high) for w in images.windows],
        )
        layers.append(
            ion_stack_layer(
                images.data,
                images.channel_names,
                size,
                name=f"{stem} peaks ({len(peaks)} m/z)",
                mz=[w.center for w in images.windows],
                metadata=meta,
                **place,
            )
        )
    return layers


# ---------------------------------------------------------------------------- npe2 reader
def _as_paths(path: Any) -> list[Path] | None:
    if isinstance(path, (str, os.PathLike)):
        return [Path(path)]
    if isinstance(path, (list, tuple)) and path and all(isinstance(p, (str, os.PathLike)) for p in path):
        return [Path(p) for p in path]
    return None


def _is_imzml_pair(path: Path) -> bool:
    """Cheap check: an existing ``*.imzML`` file with an ``.ibd`` beside it (nothing is parsed)."""
    if path.suffix.lower() != ".imzml" or not path.is_file():
        return False
    return any(path.with_suffix(s).is_file() for s in _IBD_SUFFIXES)


def napari_get_reader(path: Any) -> Callable[[Any], list[LayerDataTuple]] | None:
    """npe2 ``get_reader``: :func:`read_imzml` for imzML files with their ``.ibd``, else None.

    Only the suffix and the presence of the ``.ibd`` are checked; it never raises.
    """
    try:
        paths = _as_paths(path)
        if not paths or not all(_is_imzml_pair(p) for p in paths):
            return None
    except Exception:  # noqa: BLE001 - a reader probe must never raise (odd paths, permissions)
        logger.debug("napari-smsdl cannot read %r", path, exc_info=True)
        return None
    return read_imzml


def read_imzml(path: str | os.PathLike | Sequence[str | os.PathLike]) -> list[LayerDataTuple]:
    """Read one or more imzML files into layers (see :func:`imzml_layers`).

    A file with several regions (:attr:`ImzMLDataset.regions`) gives layers per region, each on
    its own grid placed where the instrument acquired it (``"<stem> region k TIC"``, ...).
    Raises :class:`~napari_smsdl.errors.ImzMLError` naming the file when one cannot be read.
    """
    paths = _as_paths(path) or []
    layers: list[LayerDataTuple] = []
    for p in paths:
        dataset = open_imzml(p)
        regions = dataset.regions
        if len(regions) == 1:
            layers.extend(imzml_layers(dataset))
            continue
        for region in regions:
            part = dataset.region(region.index)
            region_layers = imzml_layers(part, name=f"{dataset.path.stem} region {region.index}")
            for _, kwargs, _ in region_layers:
                kwargs["metadata"]["region"] = region.index
            layers.extend(region_layers)
    return layers
