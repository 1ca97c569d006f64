"""H&E (histology) images: PNG/JPEG/TIFF/OME-TIFF and pyramidal TIFF/SVS, read lazily.

A whole-slide image is never read into memory at once: :func:`open_histology` returns a
:class:`HistologyImage` whose levels are zarr arrays over the TIFF (tifffile's ``aszarr``), so a
caller reads the level and region it needs. Small formats (PNG, JPEG) are read eagerly.
Arrays are (rows, cols, 3) RGB; pixel sizes are in µm.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError

log = logging.getLogger(__name__)

_TIFF_SUFFIXES = {".tif", ".tiff", ".svs", ".ome.tif", ".ome.tiff", ".btf", ".ndpi", ".scn"}


@dataclass(frozen=True)
class HistologyImage:
    """A (possibly pyramidal) RGB histology image.

    Attributes
    ----------
    path : Path
    levels : list
        Array-likes (rows, cols, 3), level 0 = full resolution; each supports slicing.
    pixel_size_um : float or None
        Pixel size of level 0 in µm, from the file's metadata when present.
    """

    path: Path
    levels: tuple
    pixel_size_um: float | None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(int(s) for s in self.levels[0].shape[:2])

    def level_pixel_size_um(self, level: int) -> float | None:
        if self.pixel_size_um is None:
            return None
        return self.pixel_size_um * self.levels[0].shape[0] / self.levels[level].shape[0]

    def best_level(self, target_pixel_size_um: float) -> int:
        """The coarsest level whose pixel size is still at most ``target_pixel_size_um``."""
        best = 0
        for k in range(len(self.levels)):
            size = self.level_pixel_size_um(k)
            if size is not None and size <= target_pixel_size_um * 1.0001:
                best = k
        return best

    def read(self, level: int = 0, region_rc: tuple[slice, slice] | None = None) -> np.ndarray:
        """Read a level (or a region of it) into memory as uint8 RGB (rows, cols, 3).

        A whole level larger than the read budget (:func:`read_budget_bytes`) is refused with the
        numbers and what to do, instead of an allocation of tens of GiB or a ``MemoryError``.
        """
        arr = self.levels[level]
        if region_rc is None:
            rows, cols = (int(n) for n in arr.shape[:2])
            check_read_budget(rows * cols * 3, f"level {level} whole ({rows} × {cols} pixels)", self.path)
        data = np.asarray(arr[region_rc] if region_rc is not None else arr[:])
        return to_rgb_uint8(data, self.path)

    def read_reduced(self, target_pixel_size_um: float) -> tuple[np.ndarray, float]:
        """The image at about ``target_pixel_size_um`` (never coarser), bounded by the read budget.

        The coarsest pyramid level whose pixel is at most the target is read; when that level is
        still much finer (a file without a pyramid), every ``step``-th pixel of it is read, taken at
        the centre of each ``step`` × ``step`` block (``step`` = target / level pixel, rounded down),
        so a 100 000² scan needs only the pixels registration uses. Needs ``pixel_size_um``.

        Returns
        -------
        rgb : (rows, cols, 3) uint8
        scale : float
            Its size relative to level 0 (rows / level-0 rows, exactly ``1 / (level factor × step)``).
        """
        if self.pixel_size_um is None:
            raise InputError("no pixel size in the file's metadata; give it (e.g. --he-pixel-size)", self.path)
        level = self.best_level(target_pixel_size_um)
        arr = self.levels[level]
        level_scale = arr.shape[0] / self.levels[0].shape[0]
        step = max(1, int(target_pixel_size_um * 1.0001 // self.level_pixel_size_um(level)))
        if step == 1:
            return self.read(level), level_scale
        rows, cols = (int(n) for n in arr.shape[:2])
        first = (step - 1) // 2  # the centre of each block (for odd steps exactly)
        out_rows, out_cols = len(range(first, rows, step)), len(range(first, cols, step))
        check_read_budget(out_rows * out_cols * 3, f"every {step}th pixel of level {level} ({out_rows} × {out_cols})",
                          self.path)
        log.info("%s: reading every %dth pixel of level %d (%d x %d -> %d x %d): no pyramid level this coarse",
                 self.path, step, level, rows, cols, out_rows, out_cols)
        band = max(step, (64 * 2**20 // max(cols * 3, 1)) // step * step)  # bands of whole rows: bounded reads
        blocks = [np.asarray(arr[r0 + first : min(r0 + band, rows) : step, first::step]) for r0 in range(0, rows, band)]
        return to_rgb_uint8(np.concatenate([b for b in blocks if b.shape[0]]), self.path), level_scale / step


#: Environment variable: the most GiB an image read whole may take (default :data:`DEFAULT_READ_BUDGET_GIB`).
READ_BUDGET_ENV = "SMSDL_READ_BUDGET_GIB"
DEFAULT_READ_BUDGET_GIB = 4.0


def read_budget_bytes() -> int:
    """The read budget in bytes: ``$SMSDL_READ_BUDGET_GIB`` GiB, default 4 GiB."""
    try:
        gib = float(os.environ.get(READ_BUDGET_ENV, DEFAULT_READ_BUDGET_GIB))
    except ValueError:
        gib = DEFAULT_READ_BUDGET_GIB
    return int(gib * 2**30)


def check_read_budget(n_bytes: int, what: str, path) -> None:
    """Refuse, with the numbers and how to proceed, a read of ``n_bytes`` over the budget."""
    budget = read_budget_bytes()
    if n_bytes > budget:
        raise InputError(
            f"reading {what} needs {n_bytes / 2**30:.3g} GiB, more than the read budget of {budget / 2**30:.3g} GiB; "
            f"save it as a pyramidal tiled TIFF (e.g. vips tiffsave IN OUT.tif --tile --pyramid), use the tiled path "
            f"(--tiled), or raise {READ_BUDGET_ENV}", path)


def to_rgb_uint8(data, path: str | Path | None = None) -> np.ndarray:
    """Coerce a grey/RGB/RGBA image of any common type to (rows, cols, 3) uint8, by documented rules.

    * uint8: as it is; other integer types: as 8-bit when every value is ≤ 255, else by the range of
      their type (uint16: 0–65535);
    * floats: [0, 1] when every value is ≤ 1, [0, 255] when ≤ 255, anything else is refused;
    * negative or non-finite values, and anything not 2-D grey or 3/4-channel colour, are refused;
    * a channels-first (3 or 4, rows, cols) array is moved to channels-last (logged).

    Lists and other array-likes are accepted as ``np.asarray`` reads them.
    """
    data = np.asarray(data)
    if data.dtype == bool or not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)):
        raise InputError(f"expected an RGB histology image of integers or floats, got dtype {data.dtype}", path)
    if data.ndim == 3 and data.shape[0] in (3, 4) and data.shape[-1] not in (3, 4):
        log.info("histology image of shape %s read as channels-first", data.shape)
        data = np.moveaxis(data, 0, -1)  # channel-first TIFF
    if data.ndim == 2:
        data = np.repeat(data[..., None], 3, axis=-1)
    if data.ndim != 3 or data.shape[-1] not in (3, 4):
        raise InputError(f"expected an RGB histology image (rows, cols, 3), got an array of shape {data.shape}", path)
    if min(data.shape[:2]) < 2:
        raise InputError(f"the histology image is only {data.shape[0]} × {data.shape[1]} pixels", path)
    data = data[..., :3]
    if data.dtype == np.uint8:
        return np.ascontiguousarray(data)
    top_value = float(data.max())
    if not np.isfinite(data).all() or float(data.min()) < 0:
        raise InputError("the histology image has negative or non-finite values", path)
    if np.issubdtype(data.dtype, np.integer):
        top = 255.0 if top_value <= 255 else float(np.iinfo(data.dtype).max)
    elif top_value <= 1.0:
        top = 1.0
    elif top_value <= 255.0:
        top = 255.0
    else:
        raise InputError(f"a float histology image must hold values in [0, 1] or [0, 255]; its maximum is {top_value:g}", path)
    return np.clip(np.round(data.astype(np.float64) / top * 255.0), 0, 255).astype(np.uint8)


def _tiff_pixel_size_um(tif) -> float | None:
    """Pixel size from OME-XML (PhysicalSizeX), SVS (MPP) or the TIFF resolution tags."""
    import re

    if tif.is_ome and tif.ome_metadata:
        match = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata)
        unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', tif.ome_metadata)
        if match:
            value = float(match.group(1))
            factor = {"nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}.get(unit.group(1) if unit else "µm", 1.0)
            return value * factor
    page = tif.pages[0]
    description = page.description or ""
    match = re.search(r"MPP\s*=\s*([0-9.]+)", description)
    if match:
        return float(match.group(1))
    tags = page.tags
    if "XResolution" in tags and "ResolutionUnit" in tags:
        num, den = tags["XResolution"].value
        unit = tags["ResolutionUnit"].value
        if num and den and int(unit) in (2, 3):  # inch, centimetre
            per_unit = num / den
            return (25400.0 if int(unit) == 2 else 10000.0) / per_unit if per_unit > 1 else None
    return None


def open_histology(path: str | os.PathLike, *, pixel_size_um: float | None = None) -> HistologyImage:
    """Open an H&E image lazily; ``pixel_size_um`` is used when the metadata has none."""
    path = Path(path)
    if not path.exists():
        raise InputError("file not found", path)
    if path.stat().st_size == 0:
        raise InputError("empty file", path)
    name = path.name.lower()
    if any(name.endswith(s) for s in _TIFF_SUFFIXES):
        import tifffile
        import zarr

        try:
            tif = tifffile.TiffFile(path)
            series = tif.series[0]
            store = series.aszarr()
            group = zarr.open(store, mode="r")
        except Exception as exc:  # noqa: BLE001 - tifffile raises many types on corrupt files
            # the library's own text ("list index out of range") says nothing to a user: debug log only
            log.debug("tifffile could not open %s: %r", path, exc)
            raise InputError("cannot read TIFF: the file is damaged, truncated or not a TIFF "
                             "(--debug shows the reader's error)", path) from exc
        if hasattr(group, "shape"):  # a single level opens as an array
            levels = (group,)
        else:
            levels = tuple(group[str(k)] for k in range(len(series.levels)))
        size = _tiff_pixel_size_um(tif)
        return HistologyImage(path, levels, size if size else pixel_size_um)
    try:
        from skimage import io as skio

        data = skio.imread(path)
    except Exception as exc:  # noqa: BLE001 - imageio/SimpleITK/PIL each raise their own types
        log.debug("could not read %s: %r", path, exc)
        raise InputError(f"cannot read this image: the file is damaged, truncated or not a {path.suffix.upper()[1:] or 'known'} "
                         "image (readable: PNG, JPEG, BMP, TIFF, OME-TIFF, SVS; --debug shows the reader's error)",
                         path) from exc
    return HistologyImage(path, (to_rgb_uint8(data, path),), pixel_size_um)


def read_histology(path: str | os.PathLike, *, level: int = 0) -> np.ndarray:
    """Read an H&E image level into memory as (rows, cols, 3) uint8."""
    return open_histology(path).read(level)


def write_pyramidal_tiff(
    path: str | os.PathLike, rgb: np.ndarray, *, pixel_size_um: float, n_levels: int = 3, tile: int = 256
) -> Path:
    """Write an RGB image as a tiled, pyramidal OME-TIFF with its physical pixel size."""
    import tifffile
    from skimage.transform import downscale_local_mean

    path = Path(path)
    rgb = to_rgb_uint8(rgb, path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    meta = {"axes": "YXS", "PhysicalSizeX": pixel_size_um, "PhysicalSizeY": pixel_size_um,
            "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"}
    with tifffile.TiffWriter(tmp, ome=True, bigtiff=True) as tw:
        tw.write(rgb, subifds=n_levels - 1, tile=(tile, tile), photometric="rgb", metadata=meta)
        level = rgb
        for _ in range(n_levels - 1):
            level = downscale_local_mean(level, (2, 2, 1)).astype(np.uint8)
            tw.write(level, subfiletype=1, tile=(tile, tile), photometric="rgb")
    os.replace(tmp, path)
    return path
