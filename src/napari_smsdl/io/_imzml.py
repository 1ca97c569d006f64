"""Mass spectrometry images from imzML: a validated, vectorised reader.

The XML is parsed once (through pyimzML's parser) into flat offset/length arrays; the ``.ibd`` is
then read in contiguous chunks of spectra with ``numpy.fromfile`` and every query (ion images for
any number of m/z windows, TIC, mean spectrum) is answered per chunk with vectorised searches: no
Python loop per pixel and a memory footprint bounded by the chunk size, not by the file size.

Coordinates: imzML positions are 1-based (x, y) on the instrument's stage grid; here they become
0-based ``rows = y - y_min`` and ``cols = x - x_min`` once, in :func:`open_imzml`: the grid is the
bounding box of the acquired positions, and where it starts on the instrument's grid is kept
(:attr:`ImzMLDataset.offset_rc_px`, :attr:`ImzMLDataset.origin_rc_um`), so layers placed there
line up with anything else in the instrument's coordinates. Images are (rows, cols); stacks
(channels, rows, cols). Pixels without a spectrum are NaN in every image.

Pixel sizes: x (IMS:1000046) and y (IMS:1000047) are both read. Steps that need square pixels
(super-resolution, registration) ask for :attr:`ImzMLDataset.pixel_size_um`, which raises an
:class:`~napari_smsdl.errors.ImzMLError` naming the file when they differ; the napari reader
shows such a file at its own scale per axis (:attr:`ImzMLDataset.pixel_size_xy_um`).

Regions: blocks of acquired positions separated by at least :data:`REGION_MIN_GAP_PX` empty
pixels are separate regions (:attr:`ImzMLDataset.regions`); :meth:`ImzMLDataset.region` opens one
as its own grid.
"""

from __future__ import annotations

import enum
import logging
import mmap
import os
import re
import uuid as uuid_mod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from ..errors import ImzMLError, InputError

#: Bytes of spectra read from the .ibd per chunk; bounds the memory of every query.
CHUNK_BYTES = 32 * 2**20

#: Acquired blocks at least this many empty pixels apart are separate regions (odd; nearer ones,
#: e.g. either side of a dropped scan line, are one).
REGION_MIN_GAP_PX = 3

logger = logging.getLogger(__name__)

#: Binary data types of the imzML standard (PSI-MS and imzML controlled vocabularies), by name.
#: pyimzML's parser knows only the 32/64-bit ones and leaves the others undetermined, so the
#: declared names are read here. Values are little-endian, as the standard requires.
IMZML_DTYPES = {
    "8-bit integer": np.dtype("<i1"),    # IMS:1100000
    "16-bit integer": np.dtype("<i2"),   # IMS:1100001
    "32-bit integer": np.dtype("<i4"),   # MS:1000519 / IMS:1000141
    "64-bit integer": np.dtype("<i8"),   # MS:1000522 / IMS:1000142
    "16-bit float": np.dtype("<f2"),     # MS:1000520
    "32-bit float": np.dtype("<f4"),     # MS:1000521
    "64-bit float": np.dtype("<f8"),     # MS:1000523
}
_BIT_TYPE = re.compile(r"\d+-bit\s+\w+", re.IGNORECASE)


_PYIMZML_CODES = {"f": "32-bit float", "d": "64-bit float", "i": "32-bit integer", "l": "64-bit integer"}


def _declared_dtype(parser, array: str, path: Path, pyimzml_code: str | None = None) -> np.dtype:
    """The binary data type that the imzML declares for ``array`` ("m/z array"/"intensity array").

    Read from the referenceable parameter group holding ``array`` (where imzML declares it);
    refused by name when it is not one of :data:`IMZML_DTYPES` or not declared at all.
    """
    declared = []
    for group in parser.metadata.referenceable_param_groups.values():
        names = list(getattr(group, "param_by_name", {}) or {})
        raw = [p[3] for p in getattr(group, "cv_params", ()) if len(p) > 3 and p[3]]
        if array not in names:
            continue
        declared += [n for n in [*names, *raw] if isinstance(n, str) and _BIT_TYPE.fullmatch(n.strip())]
    known = [IMZML_DTYPES[n.strip().lower()] for n in declared if n.strip().lower() in IMZML_DTYPES]
    if known:
        return known[0]
    if not declared and pyimzml_code in _PYIMZML_CODES:  # declared where pyimzML found it, not in a group
        return IMZML_DTYPES[_PYIMZML_CODES[pyimzml_code]]
    supported = ", ".join(IMZML_DTYPES)
    if declared:
        raise ImzMLError(f"{array} data type {declared[0]!r} is not supported (the imzML standard's types are "
                         f"{supported})", path)
    raise ImzMLError(f"no data type declared for the {array} (expected one of {supported})", path)


class Normalization(str, enum.Enum):
    """Per-pixel normalisation of ion images."""

    NONE = "none"
    TIC = "tic"  # divide by the pixel's total ion count (rescaled by the median TIC)
    RMS = "rms"  # divide by the root mean square of the pixel's spectrum (rescaled by the median)


@dataclass(frozen=True)
class MzWindow:
    """An m/z window ``[low, high]`` (inclusive) around a centre."""

    center: float
    low: float
    high: float

    @property
    def label(self) -> str:
        return f"m/z {self.center:.4f}"


def parse_tolerance(text: str | float) -> tuple[float, str]:
    """Parse ``"10ppm"``, ``"0.01da"`` (or a bare number, read as Da) into ``(value, unit)``."""
    if isinstance(text, (int, float)):
        return float(text), "da"
    match = re.fullmatch(r"\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)\s*(ppm|da|mda)?\s*", text.lower())
    if not match:
        raise InputError(f"cannot read tolerance {text!r}: expected e.g. '10ppm' or '0.01da'")
    value, unit = float(match.group(1)), match.group(2) or "da"
    if unit == "mda":
        value, unit = value / 1000.0, "da"
    if value <= 0:
        raise InputError(f"the m/z tolerance must be positive (a half-width), got {text!r}: e.g. 10ppm or 0.01da")
    return value, unit


def make_windows(mz: Sequence[float], tol: str | float = "10ppm") -> list[MzWindow]:
    """m/z windows around each centre, with a tolerance in ppm (``"10ppm"``) or Da (``"0.01da"``)."""
    value, unit = parse_tolerance(tol)
    windows = []
    for center in mz:
        half = center * value * 1e-6 if unit == "ppm" else value
        windows.append(MzWindow(float(center), float(center - half), float(center + half)))
    return windows


@dataclass(frozen=True)
class IonImages:
    """A stack of ion images ``data`` (channels, rows, cols), NaN where no spectrum was acquired."""

    data: np.ndarray
    windows: tuple[MzWindow, ...]
    pixel_size_um: float | None  # square pixels only: None when unknown or when x and y differ
    pixel_size_xy_um: tuple[float, float] | None = None  # (x, y) µm, also when they differ

    @property
    def mask(self) -> np.ndarray:
        """(rows, cols) bool, True where a spectrum was acquired."""
        return ~np.isnan(self.data[0]) if len(self.data) else np.zeros((0, 0), bool)

    @property
    def channel_names(self) -> list[str]:
        return [w.label for w in self.windows]


@dataclass(frozen=True)
class Spectrum:
    """A spectrum: m/z values and intensities (1-D, same length)."""

    mz: np.ndarray
    intensity: np.ndarray


@dataclass(frozen=True)
class _Chunk:
    """Data of a run of consecutive spectra: concatenated values with per-spectrum starts."""

    indices: np.ndarray  # spectrum indices in the chunk
    mz: np.ndarray | None  # concatenated m/z (processed) or None (continuous: use shared axis)
    intensity: np.ndarray  # concatenated intensities (processed) or (n, L) matrix (continuous)
    starts: np.ndarray  # start of each spectrum in the concatenation (processed), len n + 1


@dataclass(frozen=True)
class ImzMLRegion:
    """One block of acquired pixels of an imzML, disjoint from the others.

    ``bbox_rc_px`` is its bounding box ``(row, col, rows, cols)`` in the dataset's grid (0-based);
    ``n_spectra`` the number of spectra inside.
    """

    index: int
    bbox_rc_px: tuple[int, int, int, int]
    n_spectra: int


@dataclass
class ImzMLDataset:
    """An opened, validated imzML/ibd pair. Build it with :func:`open_imzml`.

    Attributes
    ----------
    rows, cols : np.ndarray
        0-based pixel position of each spectrum in the grid (``y - y_min``, ``x - x_min``).
    shape : tuple[int, int]
        (rows, cols) of the pixel grid: the bounding box of the acquired positions.
    offset_rc_px : tuple[int, int]
        Where the grid's pixel (0, 0) lies on the instrument's grid, 0-based (``y_min - 1``,
        ``x_min - 1``); (0, 0) for a file whose positions start at (1, 1).
    mode : str
        ``"continuous"`` (one shared m/z axis) or ``"processed"`` (an m/z array per spectrum).
    pixel_size_xy_um : tuple[float, float] or None
        (x, y) pixel size in µm from the imzML metadata (IMS:1000046, IMS:1000047; one of them
        stands for both when the other is missing), else the value given to :func:`open_imzml`
        for both, else None.
    """

    path: Path
    ibd_path: Path
    mode: str
    rows: np.ndarray
    cols: np.ndarray
    shape: tuple[int, int]
    pixel_size_xy_um: tuple[float, float] | None
    mz_dtype: np.dtype
    intensity_dtype: np.dtype
    mz_offsets: np.ndarray
    mz_lengths: np.ndarray
    intensity_offsets: np.ndarray
    intensity_lengths: np.ndarray
    offset_rc_px: tuple[int, int] = (0, 0)
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def n_spectra(self) -> int:
        return int(len(self.rows))

    # ------------------------------------------------------------------ geometry
    @property
    def is_square(self) -> bool:
        """True when the pixel size is unknown or the same along x and y."""
        size = self.pixel_size_xy_um
        return size is None or bool(np.isclose(size[0], size[1], rtol=1e-6, atol=0.0))

    @property
    def pixel_size_um(self) -> float | None:
        """The pixel size in µm of a file with square pixels (None when unknown).

        Raises
        ------
        ImzMLError
            When x and y differ: super-resolution and registration need square pixels.
        """
        if self.pixel_size_xy_um is None:
            return None
        if not self.is_square:
            sx, sy = self.pixel_size_xy_um
            raise ImzMLError(
                f"pixels are not square (x {sx:g} µm, y {sy:g} µm): super-resolution and registration "
                "need square pixels; resample the acquisition to one pixel size (napari shows it as it is)",
                self.path,
            )
        return float(self.pixel_size_xy_um[0])

    @property
    def pixel_size_rc_um(self) -> tuple[float, float]:
        """(row, col) = (y, x) pixel size in µm, (1, 1) when unknown: a napari layer's ``scale``."""
        if self.pixel_size_xy_um is None:
            return (1.0, 1.0)
        return (float(self.pixel_size_xy_um[1]), float(self.pixel_size_xy_um[0]))

    @property
    def origin_rc_um(self) -> tuple[float, float]:
        """Top-left corner of the grid on the instrument's grid, (row, col) in µm (in pixels when the size is unknown)."""
        size_r, size_c = self.pixel_size_rc_um
        return (self.offset_rc_px[0] * size_r, self.offset_rc_px[1] * size_c)

    @property
    def regions(self) -> tuple[ImzMLRegion, ...]:
        """The disjoint blocks of acquired pixels, in file order (one for an ordinary acquisition).

        Blocks at least :data:`REGION_MIN_GAP_PX` empty pixels apart along rows and columns are
        separate regions; nearer ones (a dropped scan line, a gap in the tissue) are one.
        """
        if "regions" not in self._cache:
            self._cache["regions"] = _regions(self.rows, self.cols, self._region_of_spectrum())
        return self._cache["regions"]

    def _region_of_spectrum(self) -> np.ndarray:
        if "region_of_spectrum" not in self._cache:
            self._cache["region_of_spectrum"] = _region_of_spectrum(self.rows, self.cols, self.shape)
        return self._cache["region_of_spectrum"]

    def region(self, index: int) -> ImzMLDataset:
        """Region ``index`` (see :attr:`regions`) as a dataset of its own, cropped to its bounding box.

        Its :attr:`offset_rc_px` is where it lies on the instrument's grid, so its layers line up
        with those of the whole file and of the other regions.
        """
        regions = self.regions
        if not 0 <= index < len(regions):
            raise ImzMLError(f"region {index} does not exist: the file has {len(regions)} (0..{len(regions) - 1})",
                             self.path)
        r0, c0, n_r, n_c = regions[index].bbox_rc_px
        keep = np.flatnonzero(self._region_of_spectrum() == index)
        return ImzMLDataset(
            path=self.path,
            ibd_path=self.ibd_path,
            mode=self.mode,
            rows=self.rows[keep] - r0,
            cols=self.cols[keep] - c0,
            shape=(n_r, n_c),
            pixel_size_xy_um=self.pixel_size_xy_um,
            mz_dtype=self.mz_dtype,
            intensity_dtype=self.intensity_dtype,
            mz_offsets=self.mz_offsets[keep],
            mz_lengths=self.mz_lengths[keep],
            intensity_offsets=self.intensity_offsets[keep],
            intensity_lengths=self.intensity_lengths[keep],
            offset_rc_px=(self.offset_rc_px[0] + r0, self.offset_rc_px[1] + c0),
        )

    @property
    def mask(self) -> np.ndarray:
        """(rows, cols) bool, True where a spectrum was acquired."""
        mask = np.zeros(self.shape, bool)
        mask[self.rows, self.cols] = True
        return mask

    # ------------------------------------------------------------------ raw access
    def spectrum(self, index: int) -> Spectrum:
        """One spectrum by index (0-based, in file order)."""
        if not 0 <= index < self.n_spectra:
            raise IndexError(f"spectrum {index} out of range 0..{self.n_spectra - 1}")
        mz = self._read(self.mz_offsets[index], self.mz_lengths[index], self.mz_dtype)
        intensity = self._read(
            self.intensity_offsets[index], self.intensity_lengths[index], self.intensity_dtype
        )
        return Spectrum(mz.astype(np.float64), intensity.astype(np.float64))

    def _read(self, offset: int, count: int, dtype: np.dtype) -> np.ndarray:
        return np.fromfile(self.ibd_path, dtype=dtype, count=int(count), offset=int(offset))

    @cached_property
    def shared_mz(self) -> np.ndarray | None:
        """The shared m/z axis of a continuous file (None for processed files)."""
        if self.mode != "continuous":
            return None
        return self._read(self.mz_offsets[0], self.mz_lengths[0], self.mz_dtype).astype(np.float64)

    def _chunks(self) -> Iterator[_Chunk]:
        """Yield consecutive spectra in chunks of about :data:`CHUNK_BYTES` of file."""
        isz_mz, isz_int = self.mz_dtype.itemsize, self.intensity_dtype.itemsize
        if self.mode == "continuous":
            starts_b = self.intensity_offsets
            ends_b = self.intensity_offsets + self.intensity_lengths * isz_int
        else:
            starts_b = np.minimum(self.mz_offsets, self.intensity_offsets)
            ends_b = np.maximum(
                self.mz_offsets + self.mz_lengths * isz_mz,
                self.intensity_offsets + self.intensity_lengths * isz_int,
            )
        n = self.n_spectra
        begin = 0
        # Each chunk is its own read-only memory map: no copy out of the page cache, and the map is
        # released as soon as the caller drops the chunk, so resident memory stays near CHUNK_BYTES.
        with open(self.ibd_path, "rb") as fh:
            while begin < n:
                # grow the chunk while the file span it covers stays under CHUNK_BYTES
                # (look ahead a bounded number of spectra so finding all chunks stays linear in n)
                ahead = slice(begin, min(n, begin + 65536))
                span = np.maximum.accumulate(ends_b[ahead]) - np.minimum.accumulate(starts_b[ahead])
                end = begin + max(1, int(np.searchsorted(span, CHUNK_BYTES, side="right")))
                lo = int(starts_b[begin:end].min())
                hi = int(ends_b[begin:end].max())
                base = lo - lo % mmap.ALLOCATIONGRANULARITY
                buf = np.frombuffer(mmap.mmap(fh.fileno(), hi - base, access=mmap.ACCESS_READ, offset=base), np.uint8)
                lo = base
                idx = np.arange(begin, end)
                if self.mode == "continuous":
                    ints = _gather(buf, self.intensity_offsets[idx] - lo, self.intensity_lengths[idx], self.intensity_dtype)
                    yield _Chunk(idx, None, ints.reshape(len(idx), -1), np.array([]))
                else:
                    lengths = self.mz_lengths[idx]
                    mz = _gather(buf, self.mz_offsets[idx] - lo, lengths, self.mz_dtype, keep_2d=True)
                    ints = _gather(buf, self.intensity_offsets[idx] - lo, lengths, self.intensity_dtype, keep_2d=True)
                    if mz.ndim != ints.ndim:
                        mz, ints = mz.reshape(-1), ints.reshape(-1)
                    starts = np.concatenate([[0], np.cumsum(lengths)])
                    yield _Chunk(idx, mz, ints, starts)
                begin = end

    # ------------------------------------------------------------------ per-spectrum stats
    def _spectrum_stats(self) -> dict[str, np.ndarray]:
        """TIC, RMS and m/z range of every spectrum, computed in one pass and cached."""
        if "stats" in self._cache:
            return self._cache["stats"]
        n = self.n_spectra
        tic, sumsq = np.zeros(n), np.zeros(n)
        mz_min, mz_max = np.full(n, np.inf), np.full(n, -np.inf)
        counts = self.intensity_lengths.astype(np.float64)
        for chunk in self._chunks():
            if chunk.mz is not None and chunk.mz.ndim == 2:
                chunk = _Chunk(chunk.indices, chunk.mz.reshape(-1), chunk.intensity.reshape(-1), chunk.starts)
            ints = chunk.intensity.astype(np.float64)
            if chunk.mz is None:
                tic[chunk.indices] = ints.sum(axis=1)
                sumsq[chunk.indices] = (ints**2).sum(axis=1)
                axis = self.shared_mz
                if len(axis):
                    mz_min[chunk.indices], mz_max[chunk.indices] = axis[0], axis[-1]
            else:
                nonempty = np.diff(chunk.starts) > 0
                starts = chunk.starts[:-1][nonempty]
                sel = chunk.indices[nonempty]
                tic[sel] = np.add.reduceat(ints, starts)
                sumsq[sel] = np.add.reduceat(ints**2, starts)
                # m/z arrays are sorted (imzML requires it), so first/last are min/max
                mz_min[sel] = chunk.mz[starts]
                mz_max[sel] = chunk.mz[chunk.starts[1:][nonempty] - 1]
        rms = np.sqrt(sumsq / np.maximum(counts, 1))
        stats = {"tic": tic, "rms": rms, "mz_min": mz_min, "mz_max": mz_max}
        self._cache["stats"] = stats
        return stats

    @property
    def mz_range(self) -> tuple[float, float]:
        """(min, max) m/z over all spectra."""
        stats = self._spectrum_stats()
        finite = np.isfinite(stats["mz_min"])
        if not finite.any():
            return (float("nan"), float("nan"))
        return float(stats["mz_min"][finite].min()), float(stats["mz_max"][finite].max())

    def _to_image(self, values: np.ndarray) -> np.ndarray:
        """Scatter per-spectrum values (n,) or (n, C) into (rows, cols) or (C, rows, cols), NaN elsewhere."""
        values = np.asarray(values)
        if values.ndim == 1:
            image = np.full(self.shape, np.nan, np.float32)
            image[self.rows, self.cols] = values
            return image
        stack = np.full((values.shape[1], *self.shape), np.nan, np.float32)
        stack[:, self.rows, self.cols] = values.T
        return stack

    def tic_image(self) -> np.ndarray:
        """Total ion count image (rows, cols), float32, NaN where no spectrum was acquired."""
        return self._to_image(self._spectrum_stats()["tic"])

    # ------------------------------------------------------------------ ion images
    def window_sums(self, windows: Sequence[MzWindow]) -> np.ndarray:
        """Sum of intensities of every spectrum inside every window: (n_spectra, n_windows)."""
        lo_mz = np.array([w.low for w in windows], np.float64)
        hi_mz = np.array([w.high for w in windows], np.float64)
        out = np.zeros((self.n_spectra, len(windows)), np.float64)
        if not len(windows):
            return out
        axis = self.shared_mz
        layers = _window_layers(lo_mz, hi_mz)
        # lookup table of ~2**20 bins over the windows' span: True where a bin touches a window
        # (two empty guard bins at each end: out-of-range m/z, clipped there, never count)
        t_lo, t_hi = float(lo_mz.min()), float(hi_mz.max())
        t_scale = (2**20 - 8) / max(t_hi - t_lo, 1e-9)
        t_lo -= 2.0 / t_scale
        table = np.zeros(2**20, bool)
        first_bin = np.floor((lo_mz - t_lo) * t_scale).astype(np.int64)
        last_bin = np.floor((hi_mz - t_lo) * t_scale).astype(np.int64)
        marks = np.zeros(2**20 + 1, np.int32)
        np.add.at(marks, np.clip(first_bin, 0, 2**20 - 1), 1)
        np.add.at(marks, np.clip(last_bin + 1, 0, 2**20), -1)
        table[:] = np.cumsum(marks[:-1]) > 0
        if axis is not None:
            first = np.searchsorted(axis, lo_mz, side="left")
            last = np.searchsorted(axis, hi_mz, side="right")
        for chunk in self._chunks():
            if chunk.mz is None:
                csum = np.zeros((len(chunk.indices), chunk.intensity.shape[1] + 1))
                np.cumsum(chunk.intensity, axis=1, out=csum[:, 1:])
                out[chunk.indices] = csum[:, last] - csum[:, first]
                continue
            # A coarse lookup table over m/z marks the bins that touch any window, so one cheap pass
            # finds the few candidate peaks; only those are searched exactly against the sorted
            # window edges of each non-overlapping layer (searchsorted(side="right") is odd exactly
            # inside [low, high]) and summed per spectrum with one bincount.
            n = len(chunk.indices)
            if not chunk.mz.size:
                continue
            cand = np.flatnonzero(table[np.clip(((chunk.mz - t_lo) * t_scale).astype(np.int64), 0, len(table) - 1)].ravel())
            if not len(cand):
                continue
            mz_c = chunk.mz.reshape(-1)[cand] if chunk.mz.ndim == 1 else chunk.mz[np.divmod(cand, chunk.mz.shape[1])]
            if chunk.mz.ndim == 2:
                owner_c = cand // chunk.mz.shape[1]
                int_c = chunk.intensity[owner_c, cand % chunk.mz.shape[1]]
            else:
                owner_c = np.searchsorted(chunk.starts, cand, side="right") - 1
                int_c = chunk.intensity[cand]
            int_c = int_c.astype(np.float64)
            for layer in layers:
                edges = np.empty(2 * len(layer))
                edges[0::2] = lo_mz[layer]
                edges[1::2] = np.nextafter(hi_mz[layer], np.inf)
                slot = np.searchsorted(edges, mz_c.astype(np.float64), side="right")
                inside = (slot & 1).astype(bool)
                if not inside.any():
                    continue
                window = layer[slot[inside] // 2]
                sums = np.bincount(owner_c[inside] * len(windows) + window, weights=int_c[inside], minlength=n * len(windows))
                out[chunk.indices] += sums.reshape(n, len(windows))
        return out

    def ion_images(
        self,
        mz: Sequence[float] | Sequence[MzWindow],
        tol: str | float = "10ppm",
        *,
        norm: Normalization | str = Normalization.NONE,
    ) -> IonImages:
        """Ion images for a list of m/z values (or windows): (channels, rows, cols) float32.

        Each pixel is the sum of the intensities inside the window; NaN where no spectrum exists.
        ``norm`` divides each pixel by its TIC or RMS, rescaled by the median over pixels so the
        values keep the order of magnitude of the raw intensities.
        """
        windows = [w if isinstance(w, MzWindow) else None for w in mz]
        if any(w is None for w in windows):
            windows = make_windows([float(m) for m in mz], tol)
        sums = self.window_sums(windows)
        empty = [w for w, col in zip(windows, np.asarray(sums).reshape(len(sums), -1).T) if not np.nansum(np.abs(col))]
        if empty:  # only then is the m/z range worth a pass over the spectra
            low, high = self.mz_range
            outside = [w for w in empty if w.high < low or w.low > high]
            if outside:
                raise InputError(
                    f"m/z {', '.join(f'{w.center:g}' for w in outside)} outside the file's m/z range "
                    f"{low:.4f}–{high:.4f}: the ion image would be all zero", self.path)
        norm = Normalization(norm)
        if norm is not Normalization.NONE:
            factor = self._spectrum_stats()["tic" if norm is Normalization.TIC else "rms"]
            positive = factor > 0
            scale = np.median(factor[positive]) if positive.any() else 1.0
            with np.errstate(divide="ignore", invalid="ignore"):
                sums = np.where(positive[:, None], sums / factor[:, None] * scale, 0.0)
        square = self.pixel_size_xy_um[0] if self.pixel_size_xy_um is not None and self.is_square else None
        return IonImages(self._to_image(sums), tuple(windows), square, self.pixel_size_xy_um)

    # ------------------------------------------------------------------ spectra summaries
    def mean_spectrum(self, *, bin_ppm: float = 5.0) -> Spectrum:
        """Mean spectrum over all pixels.

        Continuous files average on their own axis; processed files are binned on a log-spaced
        axis whose bin width is ``bin_ppm`` (each bin's m/z is its intensity-weighted centroid).
        """
        key = ("mean", bin_ppm)
        if key in self._cache:
            return self._cache[key]
        if self.mode == "continuous":
            total = np.zeros(len(self.shared_mz))
            for chunk in self._chunks():
                total += chunk.intensity.sum(axis=0, dtype=np.float64)
            result = Spectrum(self.shared_mz.copy(), total / max(self.n_spectra, 1))
        else:
            low, high = self.mz_range
            if not np.isfinite(low):
                return Spectrum(np.zeros(0), np.zeros(0))
            step = np.log1p(bin_ppm * 1e-6)
            n_bins = int(np.ceil((np.log(high) - np.log(low)) / step)) + 1
            weight = np.zeros(n_bins)
            weighted_mz = np.zeros(n_bins)
            for chunk in self._chunks():
                chunk = _Chunk(chunk.indices, chunk.mz.reshape(-1), chunk.intensity.reshape(-1), chunk.starts)
                bins = np.floor((np.log(chunk.mz) - np.log(low)) / step).astype(np.int64)
                ints = chunk.intensity.astype(np.float64)
                weight += np.bincount(bins, ints, minlength=n_bins)
                weighted_mz += np.bincount(bins, ints * chunk.mz, minlength=n_bins)
            centres = low * np.exp((np.arange(n_bins) + 0.5) * step)
            with np.errstate(invalid="ignore", divide="ignore"):
                mz = np.where(weight > 0, weighted_mz / weight, centres)
            result = Spectrum(mz, weight / max(self.n_spectra, 1))
        self._cache[key] = result
        return result

    def pick_peaks(self, n_peaks: int = 10, *, bin_ppm: float = 5.0, min_distance_ppm: float = 50.0) -> np.ndarray:
        """m/z of the ``n_peaks`` strongest peaks of the mean spectrum, sorted by m/z."""
        from scipy.signal import find_peaks

        spectrum = self.mean_spectrum(bin_ppm=bin_ppm)
        if len(spectrum.mz) < 3:
            return spectrum.mz[spectrum.intensity > 0][:n_peaks]
        # pad so that peaks at the first/last bin are found too
        padded = np.concatenate([[0.0], spectrum.intensity, [0.0]])
        distance = max(1, int(round(min_distance_ppm / bin_ppm))) if self.mode == "processed" else 1
        peaks, props = find_peaks(padded, height=0.0, distance=distance)
        peaks = peaks - 1
        keep = peaks[np.argsort(props["peak_heights"])[::-1][:n_peaks]]
        return np.sort(spectrum.mz[keep])


# ---------------------------------------------------------------------- low-level helpers
def _gather(buf, offsets: np.ndarray, lengths: np.ndarray, dtype: np.dtype, *, keep_2d: bool = False) -> np.ndarray:
    """Concatenate ``lengths[i]`` values of ``dtype`` starting at byte ``offsets[i]`` of ``buf``.

    No per-spectrum Python loop. Two paths:

    * equal lengths at a constant byte stride (most writers, continuous files): a zero-copy strided
      view, returned as (n, length) with ``keep_2d``, else flattened with one copy;
    * otherwise, per byte residue of the offsets (mixed float64/float32 files are not aligned),
      a run mask over the buffer marks the wanted elements and one boolean selection takes them.
    """
    dtype = np.dtype(dtype)
    isz = dtype.itemsize
    offsets = np.asarray(offsets, np.int64)
    lengths = np.asarray(lengths, np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.empty(0, dtype)
    n = len(offsets)
    if n == 1 or ((lengths == lengths[0]).all() and (np.diff(offsets) == offsets[1] - offsets[0]).all()
                  and offsets[1] - offsets[0] >= lengths[0] * isz):
        stride = int(offsets[1] - offsets[0]) if n > 1 else int(lengths[0] * isz)
        view = np.ndarray((n, int(lengths[0])), dtype=dtype, buffer=buf, offset=int(offsets[0]), strides=(stride, isz))
        return view if keep_2d else view.reshape(-1)  # one copy when the stride leaves gaps, none when it does not
    residues = offsets % isz
    in_file_order = (np.diff(offsets) >= lengths[:-1] * isz).all()
    if not in_file_order or (residues != residues[0]).any():
        return _gather_by_index(buf, offsets, lengths, dtype)  # rare layouts: explicit indices
    r = int(residues[0])
    view = np.frombuffer(buf, dtype=dtype, offset=r, count=(len(buf) - r) // isz)
    start = (offsets - r) // isz
    marks = np.zeros(len(view) + 1, np.int8)
    np.add.at(marks, start, 1)
    np.add.at(marks, start + lengths, -1)
    return view[np.cumsum(marks[:-1], dtype=np.int8).astype(bool)]


def _gather_by_index(buf: bytes, offsets: np.ndarray, lengths: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """General gather through explicit element indices (any alignment, any order)."""
    isz = dtype.itemsize
    out = np.empty(int(lengths.sum()), dtype)
    out_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    residues = offsets % isz
    for r in np.unique(residues):
        sel = residues == r
        view = np.frombuffer(buf, dtype=dtype, offset=int(r), count=(len(buf) - int(r)) // isz)
        lens = lengths[sel]
        ramp = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
        out[np.repeat(out_starts[sel], lens) + ramp] = view[np.repeat((offsets[sel] - r) // isz, lens) + ramp]
    return out


def _window_layers(lo: np.ndarray, hi: np.ndarray) -> list[np.ndarray]:
    """Split windows into groups whose windows do not overlap (greedy, by lower bound)."""
    layers: list[list[int]] = []
    ends: list[float] = []
    for w in np.argsort(lo, kind="stable"):
        for k, end in enumerate(ends):
            if lo[w] > end:
                layers[k].append(int(w))
                ends[k] = hi[w]
                break
        else:
            layers.append([int(w)])
            ends.append(hi[w])
    return [np.array(layer) for layer in layers]


def _region_of_spectrum(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Index of the region (see :attr:`ImzMLDataset.regions`) of every spectrum; regions in file order."""
    from scipy import ndimage

    mask = np.zeros(shape, bool)
    mask[rows, cols] = True
    # pixels fewer than REGION_MIN_GAP_PX (odd) empty pixels apart end up in one block once every
    # pixel is grown by (REGION_MIN_GAP_PX - 1) / 2 along rows, columns and diagonals
    grow = REGION_MIN_GAP_PX // 2
    joined = ndimage.binary_dilation(mask, np.ones((3, 3), bool), iterations=grow) if grow else mask
    labels, _ = ndimage.label(joined, np.ones((3, 3), bool))
    of_spectrum = labels[rows, cols]
    found, first_index = np.unique(of_spectrum, return_index=True)
    remap = np.zeros(int(labels.max()) + 1, np.int64)
    remap[found[np.argsort(first_index)]] = np.arange(len(found))  # numbered by first spectrum in the file
    return remap[of_spectrum]


def _regions(rows: np.ndarray, cols: np.ndarray, of_spectrum: np.ndarray) -> tuple[ImzMLRegion, ...]:
    """Bounding box and spectrum count of every region."""
    regions = []
    for k in range(int(of_spectrum.max()) + 1 if len(of_spectrum) else 0):
        sel = of_spectrum == k
        r, c = rows[sel], cols[sel]
        bbox = (int(r.min()), int(c.min()), int(r.max() - r.min() + 1), int(c.max() - c.min() + 1))
        regions.append(ImzMLRegion(k, bbox, int(sel.sum())))
    return tuple(regions)


def _find_ibd(path: Path) -> Path:
    for suffix in (".ibd", ".IBD", ".Ibd"):
        candidate = path.with_suffix(suffix)
        if candidate.exists():
            return candidate
    raise ImzMLError(f"binary file {path.with_suffix('.ibd').name} not found beside it", path)


def _param(group, name: str):
    try:
        return group.param_by_name.get(name)
    except AttributeError:
        return None


def open_imzml(path: str | os.PathLike, *, pixel_size_um: float | None = None,
               region: int | None = None) -> ImzMLDataset:
    """Open and validate an imzML file (continuous or processed) and index its ``.ibd``.

    Parameters
    ----------
    path : path-like
        The ``.imzML`` file; the ``.ibd`` must lie beside it with the same stem.
    pixel_size_um : float, optional
        Pixel size in µm (square), used when the file's metadata has none (IMS:1000046/1000047);
        the metadata wins otherwise.
    region : int, optional
        Open only this region (see :attr:`ImzMLDataset.regions`) as its own grid. By default the
        grid is the bounding box of every acquired position (all regions, in place); a file with
        several regions logs so.

    Notes
    -----
    The grid is cropped to the bounding box of the acquired positions; where it starts on the
    instrument's grid is :attr:`ImzMLDataset.offset_rc_px` (:attr:`ImzMLDataset.origin_rc_um`).

    Raises
    ------
    ImzMLError
        Naming the file and the problem: file missing or empty, malformed XML, missing or truncated
        ``.ibd``, UUID mismatch between the two, compressed binary data, coordinates out of range.
    """
    path = Path(path)
    if not path.exists():
        raise ImzMLError("file not found", path)
    if path.is_dir():
        raise ImzMLError("is a directory, expected an .imzML file", path)
    if path.stat().st_size == 0:
        raise ImzMLError("empty file", path)
    ibd_path = _find_ibd(path)
    ibd_size = ibd_path.stat().st_size
    if ibd_size < 16:
        raise ImzMLError(f"binary file {ibd_path.name} is truncated ({ibd_size} bytes, no UUID)", path)

    import warnings

    from pyimzml.ImzMLParser import ImzMLParser

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parser = ImzMLParser(str(path), ibd_file=None)
    except Exception as exc:  # lxml/ElementTree errors, pyimzML's own RuntimeErrors and KeyErrors
        kind = type(exc).__name__
        if "Syntax" in kind or "Parse" in kind:
            raise ImzMLError(f"malformed imzML XML ({' '.join(str(exc).split())})", path) from exc
        raise ImzMLError(f"not a readable imzML file ({kind}: {' '.join(str(exc).split())})", path) from exc

    if not parser.coordinates:
        raise ImzMLError("contains no spectra", path)
    meta = parser.metadata
    description = getattr(meta, "file_description", None)
    declared_uuid = _param(description, "universally unique identifier")
    if declared_uuid:
        try:
            expected = uuid_mod.UUID(str(declared_uuid).strip("{}")).bytes
        except ValueError as exc:
            raise ImzMLError(f"invalid UUID {declared_uuid!r} in the XML", path) from exc
        with open(ibd_path, "rb") as fh:
            actual = fh.read(16)
        if actual != expected:
            raise ImzMLError(
                f"UUID mismatch: the XML says {declared_uuid} but {ibd_path.name} starts with "
                f"{{{uuid_mod.UUID(bytes=actual)}}}; the two files do not belong together",
                path,
            )
    is_continuous = description is not None and "continuous" in description
    is_processed = description is not None and "processed" in description

    for group in meta.referenceable_param_groups.values():
        if "zlib compression" in group:
            raise ImzMLError("zlib-compressed binary data is not supported; export uncompressed", path)
    mz_dtype = _declared_dtype(parser, "m/z array", path, getattr(parser, "mzPrecision", None))
    int_dtype = _declared_dtype(parser, "intensity array", path, getattr(parser, "intensityPrecision", None))

    coords = np.asarray(parser.coordinates, dtype=np.int64)
    x, y = coords[:, 0], coords[:, 1]
    mz_off = np.asarray(parser.mzOffsets, np.int64)
    mz_len = np.asarray(parser.mzLengths, np.int64)
    int_off = np.asarray(parser.intensityOffsets, np.int64)
    int_len = np.asarray(parser.intensityLengths, np.int64)

    if (x < 1).any() or (y < 1).any():
        raise ImzMLError("coordinates out of range: imzML positions start at 1", path)
    max_x = parser.imzmldict.get("max count of pixels x")
    max_y = parser.imzmldict.get("max count of pixels y")
    if max_x and x.max() > max_x or max_y and y.max() > max_y:
        raise ImzMLError(
            f"coordinates out of range: position up to (x={x.max()}, y={y.max()}) but the scan "
            f"settings declare {max_x} x {max_y} pixels",
            path,
        )
    if len(np.unique(y * (x.max() + 1) + x)) != len(x):
        raise ImzMLError("two spectra share the same (x, y) position", path)
    if (mz_len != int_len).any():
        raise ImzMLError("m/z and intensity arrays of a spectrum differ in length", path)
    end = max(
        int((mz_off + mz_len * mz_dtype.itemsize).max()),
        int((int_off + int_len * int_dtype.itemsize).max()),
    )
    if (mz_off < 0).any() or (int_off < 0).any() or end > ibd_size:
        raise ImzMLError(
            f"binary file {ibd_path.name} is truncated: the XML needs {end} bytes, the file has {ibd_size}",
            path,
        )
    if is_continuous:
        mode = "continuous"
    elif is_processed:
        mode = "processed"
    else:  # not declared: infer from the offsets
        mode = "continuous" if (mz_off == mz_off[0]).all() else "processed"
    if mode == "continuous" and not ((mz_off == mz_off[0]).all() and (mz_len == mz_len[0]).all()):
        mode = "processed"  # declared continuous but does not share its m/z array: read it per spectrum

    size_xy = _pixel_size_xy(parser.imzmldict.get("pixel size x"), parser.imzmldict.get("pixel size y"), path)
    if size_xy is None and pixel_size_um:
        size_xy = (float(pixel_size_um), float(pixel_size_um))
    x0, y0 = int(x.min()), int(y.min())
    dataset = ImzMLDataset(
        path=path,
        ibd_path=ibd_path,
        mode=mode,
        rows=y - y0,
        cols=x - x0,
        shape=(int(y.max()) - y0 + 1, int(x.max()) - x0 + 1),
        pixel_size_xy_um=size_xy,
        mz_dtype=mz_dtype,
        intensity_dtype=int_dtype,
        mz_offsets=mz_off,
        mz_lengths=mz_len,
        intensity_offsets=int_off,
        intensity_lengths=int_len,
        offset_rc_px=(y0 - 1, x0 - 1),
    )
    if region is not None:
        return dataset.region(int(region))
    if len(dataset.regions) > 1:
        logger.info("%s holds %d regions, read as one %d x %d grid; open_imzml(..., region=k) opens one",
                    path, len(dataset.regions), *dataset.shape)
    return dataset


def _pixel_size_xy(size_x, size_y, path: Path) -> tuple[float, float] | None:
    """(x, y) pixel size in µm from the two cvParams; one stands for both when the other is missing."""
    values = []
    for name, value in (("x", size_x), ("y", size_y)):
        if value is None or value == "":
            values.append(None)
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ImzMLError(f"pixel size {name} is not a number: {value!r}", path) from None
        if not (np.isfinite(number) and number > 0):
            raise ImzMLError(f"pixel size {name} must be a positive number of µm, got {value!r}", path)
        values.append(number)
    sx, sy = values
    if sx is None and sy is None:
        return None
    return (sx if sx is not None else sy, sy if sy is not None else sx)


def write_imzml(
    path: str | os.PathLike,
    spectra: Callable[[], Iterator[tuple[int, int, np.ndarray, np.ndarray]]] | Sequence,
    *,
    mode: str = "processed",
    pixel_size_um: float | tuple[float, float] | None = None,
    mz_dtype=np.float64,
    intensity_dtype=np.float32,
    offset_rc_px: tuple[int, int] = (0, 0),
) -> Path:
    """Write an imzML/ibd pair with pyimzML's writer; atomically (temp names, then rename).

    ``spectra`` yields ``(row, col, mz, intensity)`` with 0-based row/col; position
    ``(x, y) = (col + 1 + offset_rc_px[1], row + 1 + offset_rc_px[0])``. The pixel size (µm; one
    number, or ``(x, y)`` when they differ), which pyimzML's writer does not record, is added to
    the scan settings (IMS:1000046/IMS:1000047).
    """
    from pyimzml.ImzMLWriter import ImzMLWriter

    path = Path(path).with_suffix(".imzML")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_stem = path.with_name(f".{path.stem}.tmp{os.getpid()}")
    items = spectra() if callable(spectra) else spectra
    with ImzMLWriter(str(tmp_stem), mode=mode, mz_dtype=mz_dtype, intensity_dtype=intensity_dtype) as writer:
        for row, col, mz, intensity in items:
            position = (int(col) + 1 + int(offset_rc_px[1]), int(row) + 1 + int(offset_rc_px[0]))
            writer.addSpectrum(np.asarray(mz), np.asarray(intensity), position)
    tmp_xml, tmp_ibd = tmp_stem.with_suffix(".imzML"), tmp_stem.with_suffix(".ibd")
    if pixel_size_um is not None:
        size_x, size_y = (pixel_size_um, pixel_size_um) if np.isscalar(pixel_size_um) else pixel_size_um
        text = tmp_xml.read_text()
        params = (
            f'<cvParam cvRef="IMS" accession="IMS:1000046" name="pixel size (x)" value="{float(size_x)!r}"/>\n'
            f'      <cvParam cvRef="IMS" accession="IMS:1000047" name="pixel size y" value="{float(size_y)!r}"/>\n'
            "    </scanSettings>"
        )
        text = text.replace("</scanSettings>", params, 1)
        tmp_xml.write_text(text)
    os.replace(tmp_ibd, path.with_suffix(".ibd"))
    os.replace(tmp_xml, path)
    return path
