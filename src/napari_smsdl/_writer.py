"""npe2 writers: an image layer (an ion stack, an SR stack) to OME-TIFF or to a continuous imzML.

napari calls a single-layer writer as ``writer(path, data, attributes)``, where ``attributes`` is
the layer's state (``scale``, ``translate``, ``metadata``, ``rgb``, ...). The layer's last two axes
are (rows, cols); its ``scale`` there is the pixel size in µm, (y, x). Channels are the leading
axis of a (channels, rows, cols) layer; their names come from the layer's metadata as the reader
and the project write it: ``channel_names`` (e.g. ``"m/z 885.5499"``) and ``mz`` (window centres).

Both writers call the library's own (atomic) file writers, :func:`napari_smsdl.io.write_tiff_stack`
and :func:`napari_smsdl.io.write_sr_imzml`. Nothing here imports Qt or napari.

A layer a writer cannot write raises :class:`~napari_smsdl.errors.SmsdlError` naming the file and
the reason, not an :class:`~napari_smsdl.errors.InputError`: napari's ``save_layers`` takes a
``ValueError`` (which ``InputError`` is) for "no writer found" and only warns that the plugin is
not a valid writer, so the reason would be lost.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError, SmsdlError

_MZ_NAME = re.compile(r"^\s*m/z\s*([0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)\s*$")


def _stack(path: str, data: Any, attributes: dict) -> Any:
    """The layer's data as (channels, rows, cols) or (rows, cols); level 0 of a multiscale layer."""
    if attributes.get("rgb"):
        raise InputError("an RGB layer (an H&E) is not an ion stack: save it with napari's own TIFF writer", path)
    if attributes.get("multiscale") or isinstance(data, (list, tuple)):
        data = data[0]
    if len(data.shape) not in (2, 3):
        raise InputError(f"expected a (rows, cols) image or a (channels, rows, cols) stack, got shape {tuple(data.shape)}",
                         path)
    return data


def pixel_size_xy_um(attributes: dict) -> tuple[float, float] | None:
    """(x, y) pixel size in µm of a layer: its ``scale`` along (cols, rows); None when not positive."""
    scale = attributes.get("scale")
    if scale is None or len(scale) < 2:
        return None
    size_y, size_x = float(scale[-2]), float(scale[-1])
    if not (np.isfinite(size_x) and np.isfinite(size_y) and size_x > 0 and size_y > 0):
        return None
    return size_x, size_y


def channel_names(attributes: dict, n_channels: int) -> list[str] | None:
    """Channel names from the layer's metadata (``channel_names``, else ``mz``); None when absent."""
    meta = attributes.get("metadata") or {}
    names = meta.get("channel_names")
    if names is not None and len(names) == n_channels:
        return [str(n) for n in names]
    mz = meta.get("mz")
    if mz is not None and len(mz) == n_channels:
        return [f"m/z {float(m):.4f}" for m in mz]
    return None


def channel_mz(attributes: dict, n_channels: int) -> list[float] | None:
    """One m/z per channel from the layer's metadata (``mz``, else names like ``"m/z 885.5499"``)."""
    meta = attributes.get("metadata") or {}
    mz = meta.get("mz")
    if mz is not None and len(mz) == n_channels:
        return [float(m) for m in mz]
    names = meta.get("channel_names")
    if names is not None and len(names) == n_channels:
        matches = [_MZ_NAME.match(str(n)) for n in names]
        if all(matches):
            return [float(m.group(1)) for m in matches]
    return None


def _offset_rc_px(attributes: dict, size_xy: tuple[float, float]) -> tuple[int, int]:
    """Where the grid starts in whole pixels (from ``translate``: corner = translate - pixel / 2); 0 otherwise."""
    translate = attributes.get("translate")
    if translate is None or len(translate) < 2:
        return (0, 0)
    offset = []
    for t, size in zip(translate[-2:], (size_xy[1], size_xy[0]), strict=True):
        pixels = (float(t) - size / 2) / size
        offset.append(int(round(pixels)) if abs(pixels - round(pixels)) < 1e-6 and round(pixels) >= 0 else 0)
    return offset[0], offset[1]


def _reported(write):
    """Re-raise an :class:`InputError` of ``write`` as an :class:`SmsdlError` (see the module notes)."""
    import functools

    @functools.wraps(write)
    def wrapper(path: str, data: Any, attributes: dict) -> list[str]:
        try:
            return write(path, data, attributes)
        except InputError as exc:
            raise SmsdlError(exc.problem, exc.path) from exc

    return wrapper


@_reported
def write_ome_tiff(path: str, data: Any, attributes: dict) -> list[str]:
    """npe2 writer: an image layer to a float32 OME-TIFF with its pixel size (µm) and channel names.

    A (channels, rows, cols) layer is written channel by channel (a lazy one is never held
    whole); ``PhysicalSizeX``/``PhysicalSizeY`` come from the layer's ``scale``, the channel names
    from its metadata (``channel_names`` or ``mz``; none are written otherwise).
    """
    from .io import write_tiff_stack

    stack = _stack(path, data, attributes)
    n_channels = stack.shape[0] if len(stack.shape) == 3 else 1
    size = pixel_size_xy_um(attributes)
    out = write_tiff_stack(path, stack, channel_names=channel_names(attributes, n_channels), pixel_size_um=size)
    return [str(out)]


@_reported
def write_imzml(path: str, data: Any, attributes: dict) -> list[str]:
    """npe2 writer: an image layer to a *continuous* imzML/ibd pair, one spectrum per pixel.

    The m/z axis holds one value per channel, from the layer's metadata (``mz``, or channel names
    ``"m/z ..."``); the pixel size (x, y) comes from its ``scale``, and a grid placed at a whole
    number of pixels from 0 (a reader layer of an offset acquisition) keeps its position. Pixels
    that are NaN in every channel get no spectrum.

    Raises
    ------
    SmsdlError
        When the layer has no m/z per channel (imzML needs one) or no pixel size.
    """
    from .io import write_sr_imzml

    stack = _stack(path, data, attributes)
    stack = np.asarray(stack, dtype=np.float32)
    if stack.ndim == 2:
        stack = stack[None]
    mz = channel_mz(attributes, stack.shape[0])
    if mz is None:
        raise InputError(
            f"imzML needs one m/z per channel and layer {attributes.get('name', '')!r} has none in its metadata "
            "('mz' or channel names 'm/z ...'); save it as OME-TIFF instead", path)
    size = pixel_size_xy_um(attributes)
    if size is None:
        raise InputError(f"the layer's scale {attributes.get('scale')!r} is not a pixel size in µm", path)
    out = write_sr_imzml(path, stack, mz, size if size[0] != size[1] else size[0],
                         offset_rc_px=_offset_rc_px(attributes, size))
    return [str(out), str(Path(out).with_suffix(".ibd"))]


__all__: Sequence[str] = ("write_imzml", "write_ome_tiff")
