"""Writing results: float32 TIFF / OME-TIFF stacks with physical pixel size and channel names."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def write_tiff_stack(
    path: str | os.PathLike,
    stack: np.ndarray,
    *,
    channel_names: Sequence[str] | None = None,
    pixel_size_um: float | None = None,
) -> Path:
    """Write (channels, rows, cols) float32 as an OME-TIFF (atomically: temp file, then rename).

    The OME metadata carry the channel names and, when known, the physical pixel size in µm, so
    the stack opens at the right scale in napari, Fiji or QuPath.
    """
    import tifffile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stack = np.asarray(stack, dtype=np.float32)
    if stack.ndim == 2:
        stack = stack[None]
    metadata: dict = {"axes": "CYX"}
    if channel_names is not None:
        metadata["Channel"] = {"Name": [str(n) for n in channel_names]}
    if pixel_size_um:
        metadata.update(PhysicalSizeX=float(pixel_size_um), PhysicalSizeY=float(pixel_size_um),
                        PhysicalSizeXUnit="µm", PhysicalSizeYUnit="µm")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tifffile.imwrite(tmp, stack, ome=True, metadata=metadata, photometric="minisblack")
    os.replace(tmp, path)
    return path
