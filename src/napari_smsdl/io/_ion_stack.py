"""Ion-image stacks that do not come as imzML: LA-ICP-MS element maps, exported MSI images.

Reads TIFF stacks, ``.npy`` arrays and CSV/TXT matrices into ``(channels, rows, cols)`` float32
with channel names and a tissue mask (:mod:`napari_smsdl.io._tissue`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError


@dataclass(frozen=True)
class IonStack:
    """Ion images ``data`` (channels, rows, cols) float32; NaN marks pixels without data."""

    data: np.ndarray
    channel_names: tuple[str, ...]
    pixel_size_um: float | None = None

    @property
    def mask(self) -> np.ndarray:
        """(rows, cols) bool tissue pixels (:func:`napari_smsdl.io.tissue_mask`)."""
        from ._tissue import tissue_mask

        return tissue_mask(self.data)


def _as_stack(data: np.ndarray, path: Path) -> np.ndarray:
    data = np.asarray(data, dtype=np.float32)
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise InputError(f"expected (rows, cols) or (channels, rows, cols), got shape {data.shape}", path)
    if data.shape[-1] in (3, 4) and data.shape[0] > 4:  # (rows, cols, channels) from image writers
        data = np.moveaxis(data, -1, 0)
    if min(data.shape[1:]) < 2:
        raise InputError(f"image too small: shape {data.shape}", path)
    return data


def ome_names_and_pixel_size(tif) -> tuple[list[str] | None, float | None]:
    """Channel names and physical pixel size (µm) from an open ``tifffile.TiffFile``'s OME metadata."""
    if not (tif.is_ome and tif.ome_metadata):
        return None, None
    import re

    names = re.findall(r'<Channel [^>]*Name="([^"]*)"', tif.ome_metadata) or None
    match = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata)
    return names, float(match.group(1)) if match else None


def read_ion_stack(
    path: str | os.PathLike,
    *,
    channel_names: list[str] | None = None,
    shape_rc: tuple[int, int] | None = None,
    pixel_size_um: float | None = None,
) -> IonStack:
    """Read an ion-image stack from TIFF, ``.npy``, or a CSV/TXT matrix.

    A CSV/TXT file is either one image (rows × cols matrix) or, with ``shape_rc``, a table of
    ``rows*cols`` lines × channels in row-major pixel order (as UMAP/PCA exports are). Channel names
    come from ``channel_names``, else from a ``<file>.json`` sidecar ``{"channel_names": [...]}``,
    else from the TIFF page names, else ``"channel 0"``, ...
    """
    path = Path(path)
    if not path.exists():
        raise InputError("file not found", path)
    if path.stat().st_size == 0:
        raise InputError("empty file", path)
    suffix = "".join(path.suffixes[-2:]).lower() if path.name.lower().endswith(".ome.tif") else path.suffix.lower()
    names: list[str] | None = None
    try:
        if suffix == ".npy":
            data = np.load(path, allow_pickle=False)
        elif suffix in (".tif", ".tiff", ".ome.tif"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                data = tif.asarray()
                names, size = ome_names_and_pixel_size(tif)
                pixel_size_um = size if pixel_size_um is None else pixel_size_um
        elif suffix in (".csv", ".txt", ".tsv"):
            delimiter = "," if suffix == ".csv" else None
            data = np.loadtxt(path, delimiter=delimiter, ndmin=2)
            if shape_rc is not None:
                rows, cols = shape_rc
                if data.shape[0] != rows * cols:
                    raise InputError(
                        f"table has {data.shape[0]} lines, expected rows*cols = {rows * cols}", path
                    )
                data = data.reshape(rows, cols, -1).transpose(2, 0, 1)
        elif suffix in (".png", ".jpg", ".jpeg"):
            from skimage import io as skio

            data = skio.imread(path)
            if data.ndim == 3:
                data = data[..., :3].mean(axis=-1) if data.shape[-1] in (3, 4) else data
        else:
            raise InputError(f"unsupported ion-image format {path.suffix!r} (use .imzML, .tif, .npy, .csv, .txt)", path)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - numpy/tifffile raise many types on corrupt files
        raise InputError(f"cannot read ion images ({' '.join(str(exc).split())})", path) from exc
    data = _as_stack(data, path)
    sidecar = sidecar_path(path)
    if channel_names is None and sidecar is not None:
        channel_names = json.loads(sidecar.read_text()).get("channel_names")
    names = list(channel_names) if channel_names is not None else names
    if names is None or len(names) != len(data):
        names = [f"channel {k}" for k in range(len(data))]
    return IonStack(data, tuple(names), pixel_size_um)


def read_channel_names(path: str | os.PathLike, n_channels: int | None = None) -> list[str]:
    """Channel names from a text file, one per line (blank lines ignored), e.g. ``m/z 885.5499``.

    With ``n_channels`` the file must name exactly that many channels (else an :class:`InputError`
    naming the file and both counts).
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputError("channel-names file not found", path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the channel names ({exc})", path) from None
    names = [ln.strip() for ln in lines if ln.strip()]
    if n_channels is not None and len(names) != n_channels:
        raise InputError(f"names {len(names)} channels, but the MSI has {n_channels} (one name per line)", path)
    return names


def sidecar_path(path: str | os.PathLike) -> Path | None:
    """The JSON beside a stack that names its channels: ``<file>.npy.json`` or ``<file>.json``, if present."""
    path = Path(path)
    for candidate in (path.with_suffix(path.suffix + ".json"), path.with_suffix(".json")):
        if candidate.is_file():
            return candidate
    return None
