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
def grid_placement(pixel_size_um: float | None, *, n_leading: int = 0) -> dict[str, tuple[float, ...]]:
    """napari ``scale`` and ``translate`` for a pixel grid whose top-left corner is at 0 µm.

    Parameters
    ----------
    pixel_size_um : float or None
        Pixel size in µm (square pixels); None means unknown and gives a scale of 1.
    n_leading : int
        Number of leading non-spatial axes (e.g. 1 for a (channels, rows, cols) stack); they get
        scale 1 and translate 0.

    Returns
    -------
    dict
        ``{"scale": (..., s, s), "translate": (..., s/2, s/2)}``: the centre of pixel (0, 0) sits
        at half a pixel from the origin, so grids of different pixel sizes share corners.
    """
    size = float(pixel_size_um) if pixel_size_um else 1.0
    if not np.isfinite(size) or size <= 0:
        raise ValueError(f"pixel size must be a positive number of µm, got {pixel_size_um!r}")
    return {
        "scale": (1.0,) * n_leading + (size, size),
        "translate": (0.0,) * n_leading + (size / 2, size / 2),
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
) -> LayerDataTuple:
    """A single-channel image layer (rows, cols) in µm; contrast limits ignore NaN pixels."""
    kwargs = {"name": name, "colormap": colormap, "metadata": dict(metadata or {})}
    kwargs["metadata"].setdefault("pixel_size_um", pixel_size_um)
    kwargs.update(grid_placement(pixel_size_um))
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
) -> LayerDataTuple:
    """An image-stack layer (channels, rows, cols) with its channels named in the metadata.

    The metadata holds ``channel_names`` (one per channel, e.g. ``"m/z 885.5499"``), ``mz`` (the
    window centres, when the channels are m/z) and ``pixel_size_um``; the channel axis is labelled
    ``"channel (m/z)"`` so napari's slider says what it moves through.
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
    kwargs.update(grid_placement(pixel_size_um, n_leading=1))
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

    Returns
    -------
    list of LayerDataTuple
        ``[TIC (rows, cols), peaks (n_peaks, rows, cols)]`` with NaN where no spectrum was acquired;
        scale = the pixel size in µm (1 when unknown). The peak stack is left out when the mean
        spectrum has no peak.
    """
    stem = dataset.path.stem
    size = dataset.pixel_size_um
    common = {"source_path": str(dataset.path), "role": "fixed"}
    layers = [image_layer(dataset.tic_image(), size, name=f"{stem} TIC", metadata=common)]
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

    Raises :class:`~napari_smsdl.errors.ImzMLError` naming the file when one cannot be read.
    """
    paths = _as_paths(path) or []
    layers: list[LayerDataTuple] = []
    for p in paths:
        layers.extend(imzml_layers(open_imzml(p)))
    return layers
