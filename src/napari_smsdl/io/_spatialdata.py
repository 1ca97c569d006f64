"""SpatialData (``.zarr``): every image of a reconstruction in one µm coordinate system, and back.

:func:`write_spatialdata` writes one store: the H&E (a multiscale image), the measured MSI, every SR
stack and uncertainty map (images whose channel names are the m/z labels) and an AnnData table of
SR pixels × channels. All elements map to the coordinate system ``"global"``, in µm, whose origin
is the top-left corner of the MSI grid (SpatialData puts pixel corners at integer intrinsic
coordinates, so an MSI pixel ``(r, c)`` covers ``[r·p, (r+1)·p)`` µm and the F×F SR pixels inside
it cover the same square). The MSI and SR images get a :class:`Scale`, the H&E the affine its
registration gives (computed by the caller, see :func:`napari_smsdl.project.export_spatialdata`).

:func:`read_spatialdata_msi` reads an MSI back from such a store, or from any SpatialData store
holding an image with m/z channel names or a table of m/z variables with ``obsm["spatial"]``
coordinates (as imzML converters write them).

``spatialdata`` and ``anndata`` are the optional extra ``napari-smsdl[spatialdata]``; they are
imported when one of these functions runs.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._files import jsonable
from ..errors import InputError
from ._ion_stack import IonStack

#: Name of the µm coordinate system every element maps to.
COORDINATE_SYSTEM = "global"
#: Element names in a written store.
HE_ELEMENT = "he"
MSI_ELEMENT = "msi"
TABLE_ELEMENT = "table"
#: Key of the store-level attributes napari-smsdl writes (pixel sizes, registration, methods).
ATTRS_KEY = "napari_smsdl"
#: The SR-pixel table is left out above this many values (pixels × channels, float32: 1 GiB).
TABLE_MAX_VALUES = 1 << 28
#: Coordinate systems tried first, in this order, when reading a pixel size.
_UM_SYSTEMS = ("global", "um", "micrometer", "micron", "microns")

# "m/z 885.5499", "mz_885.55", "885.5499": a prefix or a decimal point; bare integers ("0", "1": what
# spatialdata names channels by default) are not taken for m/z
_MZ_PREFIXED = re.compile(r"^\s*m/?z\s*[_:= ]?\s*([0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?)\s*$", re.IGNORECASE)
_MZ_DECIMAL = re.compile(r"^\s*([0-9]+\.[0-9]+)\s*$")

EXTRA_HINT = "install the optional extra: pip install 'napari-smsdl[spatialdata]'"


def _import_spatialdata():
    """``(spatialdata, anndata)``, or an InputError naming the extra."""
    try:
        import anndata
        import spatialdata
    except ImportError as exc:
        raise InputError(f"SpatialData support needs the packages spatialdata and anndata ({exc.name} is "
                         f"missing): {EXTRA_HINT}") from exc
    return spatialdata, anndata


def sr_element(method: str) -> str:
    return f"sr_{method}"


def uncertainty_element(method: str) -> str:
    return f"uncertainty_{method}"


def mz_from_name(name: str) -> float | None:
    """The m/z of a channel name such as ``"m/z 885.5499"``, ``"885.55"`` or ``"mz_885.55"``; else None."""
    match = _MZ_PREFIXED.match(str(name)) or _MZ_DECIMAL.match(str(name))
    return float(match.group(1)) if match else None


def _as_dask_cyx(stack):
    """A (C, rows, cols) array-like (numpy, zarr, memmap) as a float32 dask array, one channel a chunk."""
    import dask.array as da

    if isinstance(stack, np.ndarray):
        return da.from_array(np.asarray(stack, np.float32), chunks=(1, *stack.shape[1:]))
    arr = da.from_array(stack, chunks=(1, *tuple(stack.shape)[1:]))
    return arr.astype(np.float32)


def _pyramid_factors(rows: int, cols: int, smallest: int = 256) -> list[int]:
    """Scale factors of 2 until the shorter side is under ``smallest`` pixels; at least one, so that
    even a small H&E is a multiscale image as viewers expect."""
    factors, r, c = [2], rows // 2, cols // 2
    while min(r, c) // 2 >= smallest:
        factors.append(2)
        r, c = r // 2, c // 2
    return factors


@dataclass(frozen=True)
class SpatialDataMsi:
    """An MSI read from a SpatialData store: the ion images, their m/z and where they came from."""

    stack: IonStack
    mz: tuple[float, ...] | None
    element: str


def write_spatialdata(
    path: str | os.PathLike,
    *,
    msi: np.ndarray,
    channel_names: Sequence[str],
    msi_pixel_size_um: float,
    factor: int,
    sr: Mapping[str, object] | None = None,
    uncertainty: Mapping[str, object] | None = None,
    mz: Sequence[float] | None = None,
    he=None,
    he_to_um_yx: np.ndarray | None = None,
    table_method: str | None = "smsdl",
    attrs: Mapping | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a reconstruction as one SpatialData ``.zarr``.

    Parameters
    ----------
    path : path-like
        The store to create (a folder ending in ``.zarr``).
    msi : (C, h, w) array-like
        The measured MSI (NaN where not acquired); element ``"msi"``.
    channel_names : sequence of str
        One per channel; the images' channel coordinates and the table's ``var_names``.
    msi_pixel_size_um : float
        MSI pixel size p; the SR pixel size is p / ``factor``.
    factor : int
        Super-resolution factor F: every SR stack is (C, h·F, w·F).
    sr, uncertainty : mapping of str to (C, h·F, w·F) array-like
        Method → SR stack (elements ``"sr_<method>"``) and predictive std (``"uncertainty_<method>"``).
        Zarr arrays and memmaps are read channel by channel while writing.
    mz : sequence of float, optional
        One m/z per channel (``table.var["mz"]``).
    he : (rows, cols, 3) uint8 array, or a :class:`napari_smsdl.io.HistologyImage`, optional
        The H&E, written as a multiscale image ``"he"`` (channels r, g, b).
    he_to_um_yx : (3, 3) array, optional
        Homogeneous affine from H&E intrinsic (row, col) coordinates (pixel corners at integers) to
        ``"global"`` µm (y, x). Required with ``he``.
    table_method : str or None
        The method whose SR pixels make the AnnData table ``"table"`` (pixels finite in every channel ×
        channels; ``obs`` has ``row``, ``col`` and ``instance_id = row·W + col``, ``obsm["spatial"]`` the
        pixel centres (x, y) in µm, ``var`` the m/z); it annotates the image ``"sr_<method>"``. None, or
        more than ``TABLE_MAX_VALUES`` values, leaves the table out (said in the attributes).
    attrs : mapping, optional
        JSON-able facts stored under ``sdata.attrs["napari_smsdl"]`` (with the pixel sizes written here).
    overwrite : bool
        Replace an existing store at ``path``.

    Returns
    -------
    Path
        ``path``.
    """
    sd, ad = _import_spatialdata()
    from spatialdata.models import Image2DModel, TableModel
    from spatialdata.transformations import Affine, Scale

    out = Path(path)
    if out.exists() and not overwrite:
        raise InputError("already exists; choose another path or overwrite it", out)
    names = [str(n) for n in channel_names]
    n_channels = len(names)
    msi_shape = tuple(int(s) for s in msi.shape)
    if len(msi_shape) != 3 or msi_shape[0] != n_channels:
        raise InputError(f"MSI of shape {msi_shape} does not match {n_channels} channel names")
    if mz is not None and len(mz) != n_channels:
        raise InputError(f"{len(mz)} m/z values for {n_channels} channels")
    p = float(msi_pixel_size_um)
    if not (math.isfinite(p) and p > 0):
        raise InputError(f"the MSI pixel size must be a positive number of µm, got {msi_pixel_size_um!r}")
    g = p / int(factor)
    sr_shape = (n_channels, msi_shape[1] * int(factor), msi_shape[2] * int(factor))
    cs = COORDINATE_SYSTEM

    def ion_image(stack, pixel_um: float, what: str):
        shape = tuple(int(s) for s in stack.shape)
        if what != MSI_ELEMENT and shape != sr_shape:
            raise InputError(f"{what} has shape {shape}, expected the SR grid {sr_shape}")
        return Image2DModel.parse(_as_dask_cyx(stack), dims=("c", "y", "x"), c_coords=names,
                                  transformations={cs: Scale([pixel_um, pixel_um], axes=("y", "x"))})

    images = {MSI_ELEMENT: ion_image(msi, p, MSI_ELEMENT)}
    for method, stack in (sr or {}).items():
        images[sr_element(method)] = ion_image(stack, g, sr_element(method))
    for method, stack in (uncertainty or {}).items():
        images[uncertainty_element(method)] = ion_image(stack, g, uncertainty_element(method))
    if he is not None:
        if he_to_um_yx is None:
            raise InputError("the H&E needs its transform to µm (he_to_um_yx)")
        images[HE_ELEMENT] = _he_image(he, np.asarray(he_to_um_yx, float), Image2DModel, Affine)

    facts = dict(attrs or {})
    facts.update({
        "coordinate_system": cs, "units": "micrometer",
        "origin": "top-left corner of the MSI grid (MSI pixel (0, 0) centre at (p/2, p/2))",
        "msi_pixel_size_um": p, "sr_pixel_size_um": g, "factor": int(factor),
        "channel_names": names, "mz": None if mz is None else [float(m) for m in mz],
        "methods": sorted(sr or {}),
    })
    tables = {}
    if table_method is not None and table_method in (sr or {}):
        values = n_channels * sr_shape[1] * sr_shape[2]
        if values > TABLE_MAX_VALUES:
            facts["table"] = (f"left out: {values} values (SR pixels x channels) is over {TABLE_MAX_VALUES}; "
                              f"read the image {sr_element(table_method)} instead")
        else:
            tables[TABLE_ELEMENT] = TableModel.parse(
                _pixel_table(ad, sr[table_method], names, mz, g, region=sr_element(table_method)),
                region=sr_element(table_method), region_key="region", instance_key="instance_id")
            facts["table"] = f"SR pixels of {sr_element(table_method)} x channels"
    sdata = sd.SpatialData(images=images, tables=tables)
    sdata.attrs[ATTRS_KEY] = jsonable(facts, other=str)  # attrs must always serialise
    _write_whole(sdata, out)
    return out


def _write_whole(sdata, out: Path) -> None:
    """Write the store beside ``out`` and rename it into place: a failed write leaves no half store,
    and an old store at ``out`` stays whole until the new one is complete."""
    import shutil

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    try:
        sdata.write(stage)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if out.exists():
        os.replace(out, old)
    os.replace(stage, out)
    shutil.rmtree(old, ignore_errors=True)


def _he_image(he, he_to_um_yx: np.ndarray, Image2DModel, Affine):
    """The H&E as a multiscale (c, y, x) uint8 image mapped to µm by ``he_to_um_yx``."""
    import dask.array as da

    level0 = he.levels[0] if hasattr(he, "levels") else None
    if level0 is not None and level0.dtype == np.uint8 and len(level0.shape) == 3 and level0.shape[-1] in (3, 4):
        # a HistologyImage of 8-bit colour (whole slides): level 0 read lazily, tile by tile
        arr = da.from_array(level0, chunks=(min(4096, level0.shape[0]), min(4096, level0.shape[1]), -1))[..., :3]
    elif level0 is not None:  # grey or not 8-bit: the dtype rules decide on the whole image, not per tile
        arr = da.from_array(he.read(0), chunks=(4096, 4096, 3))
    else:
        from ._histology import to_rgb_uint8

        arr = da.from_array(to_rgb_uint8(he), chunks=(4096, 4096, 3))
    rows, cols = int(arr.shape[0]), int(arr.shape[1])
    affine = Affine(he_to_um_yx, input_axes=("y", "x"), output_axes=("y", "x"))
    return Image2DModel.parse(arr.transpose(2, 0, 1), dims=("c", "y", "x"), c_coords=["r", "g", "b"],
                              scale_factors=_pyramid_factors(rows, cols),
                              transformations={COORDINATE_SYSTEM: affine}, chunks=(3, 1024, 1024))


def _pixel_table(ad, stack, names, mz, sr_pixel_um: float, *, region: str):
    """AnnData of the SR pixels finite in every channel × channels (read channel by channel)."""
    import pandas as pd

    n_channels, rows, cols = (int(s) for s in stack.shape)
    flat = np.empty((rows * cols, n_channels), np.float32)
    for c in range(n_channels):
        flat[:, c] = np.asarray(stack[c], np.float32).ravel()
    keep = np.flatnonzero(np.isfinite(flat).all(axis=1))
    r, c = np.divmod(keep, cols)
    obs = pd.DataFrame({
        "instance_id": keep.astype(np.int64),
        "row": r.astype(np.int64), "col": c.astype(np.int64),
        "region": pd.Categorical([region] * len(keep)),
    }, index=[str(i) for i in keep])
    var = pd.DataFrame(index=list(names))
    if mz is not None:
        var["mz"] = np.asarray(mz, float)
    table = ad.AnnData(X=flat[keep], obs=obs, var=var)
    # pixel centres in the µm coordinate system, (x, y) as scanpy and squidpy expect
    table.obsm["spatial"] = np.stack([(c + 0.5) * sr_pixel_um, (r + 0.5) * sr_pixel_um], axis=1)
    return table


# ---------------------------------------------------------------------------- reading an MSI
def is_spatialdata(path: str | os.PathLike) -> bool:
    """True for a folder that looks like a SpatialData store (or an element inside one)."""
    p = Path(path)
    return _split_element(p)[0] is not None


def _split_element(path: Path) -> tuple[Path | None, tuple[str, str] | None]:
    """``(store, (kind, name))`` for ``STORE.zarr/images/NAME`` or ``.../tables/NAME``; ``(store, None)``
    for the store itself; ``(None, None)`` when ``path`` is neither."""
    parts = path.parts
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].lower().endswith(".zarr"):
            store = Path(*parts[: i + 1])
            rest = parts[i + 1:]
            if not store.is_dir():
                return None, None
            if not rest:
                return store, None
            if len(rest) == 2 and rest[0] in ("images", "tables"):
                return store, (rest[0], rest[1])
            return None, None
    return None, None


def read_spatialdata_msi(
    path: str | os.PathLike,
    *,
    mz: Sequence[float] = (),
    tol: str = "10ppm",
    pixel_size_um: float | None = None,
) -> SpatialDataMsi:
    """Read an MSI (C, rows, cols) from a SpatialData store.

    ``path`` is the store (``X.zarr``) or one element in it (``X.zarr/images/NAME``,
    ``X.zarr/tables/NAME``). In a store, the element is an image whose channel names are all m/z
    values (``"msi"`` first, as :func:`write_spatialdata` names it), else a table whose variables
    are m/z values (``var["mz"]`` or numeric ``var_names``) with pixel coordinates in
    ``obsm["spatial"]`` (x, y). Several candidates and no ``"msi"`` image: an error lists them.

    Parameters
    ----------
    mz : sequence of float
        Keep only these m/z: each channel is the sum of the channels within ``tol`` of it (an
        InputError names an m/z with none). Empty: every channel.
    tol : str
        Window half-width (``"10ppm"``, ``"0.01da"``), as for imzML.
    pixel_size_um : float, optional
        Overrides the pixel size read from the store: an image's scale to its µm coordinate system
        (``"global"`` first; None when it has only the default identity), or a table's smallest
        coordinate spacing.
    """
    store, element = _split_element(Path(path))
    if store is None:
        raise InputError("not a SpatialData store (a folder ending in .zarr, or .zarr/images/NAME, "
                         ".zarr/tables/NAME)", path)
    sd, _ = _import_spatialdata()
    try:
        sdata = sd.read_zarr(store)
    except Exception as exc:  # noqa: BLE001 - zarr/ome-zarr raise many types on a broken store
        raise InputError(f"cannot read this SpatialData store ({' '.join(str(exc).split())})", store) from exc
    if element is None:
        element = _pick_element(sdata, store)
    kind, name = element
    if kind == "images":
        if name not in sdata.images:
            raise InputError(f"no image {name!r} in the store (images: {sorted(sdata.images)})", store)
        data, names, px = _image_channels(sdata.images[name], store, name)
    else:
        if name not in sdata.tables:
            raise InputError(f"no table {name!r} in the store (tables: {sorted(sdata.tables)})", store)
        data, names, px = _table_channels(sdata.tables[name], store, name)
    mzs = [mz_from_name(n) for n in names]
    if kind == "tables" and "mz" in getattr(sdata.tables[name], "var", {}):
        mzs = [float(v) for v in sdata.tables[name].var["mz"]]
    channel_mz = tuple(mzs) if all(m is not None for m in mzs) else None
    if mz:
        data, names, channel_mz = _select_mz(data, names, channel_mz, list(mz), tol, store, name)
    stack = IonStack(np.ascontiguousarray(data, np.float32), tuple(names),
                     pixel_size_um if pixel_size_um is not None else px)
    return SpatialDataMsi(stack, channel_mz, f"{kind}/{name}")


def _pick_element(sdata, store: Path) -> tuple[str, str]:
    images = [n for n, img in sdata.images.items()
              if (names := _channel_names(img)) and all(mz_from_name(x) is not None for x in names)]
    if MSI_ELEMENT in images:
        return "images", MSI_ELEMENT
    tables = [n for n, t in sdata.tables.items() if "spatial" in t.obsm
              and ("mz" in t.var or all(mz_from_name(v) is not None for v in t.var_names))]
    candidates = [("images", n) for n in images] + [("tables", n) for n in tables]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise InputError("no image with m/z channel names and no table of m/z with obsm['spatial'] "
                         f"(images: {sorted(sdata.images)}, tables: {sorted(sdata.tables)})", store)
    listed = ", ".join(f"{store}/{k}/{n}" for k, n in candidates)
    raise InputError(f"several MSI candidates; give one of {listed}", store)


def _scale0(element):
    """The full-resolution DataArray of an image element (a DataTree's first scale)."""
    import xarray as xr

    if isinstance(element, xr.DataArray):
        return element
    first = "scale0" if "scale0" in element.children else sorted(element.children)[0]
    return next(iter(element[first].ds.data_vars.values()))


def _channel_names(element) -> list[str]:
    arr = _scale0(element)
    if "c" not in arr.coords:
        return []
    return [str(v) for v in arr.coords["c"].values]


def _pixel_size_from_transform(element) -> float | None:
    from spatialdata.transformations import get_transformation

    systems = get_transformation(element, get_all=True) or {}
    order = [s for s in _UM_SYSTEMS if s in systems] + [s for s in systems if s not in _UM_SYSTEMS]
    for system in order:
        m = np.asarray(systems[system].to_affine_matrix(input_axes=("y", "x"), output_axes=("y", "x")), float)
        if np.allclose(m, np.eye(3)):  # the default identity: pixels, not µm
            continue
        sy, sx = np.hypot(m[0, 0], m[1, 0]), np.hypot(m[0, 1], m[1, 1])
        if not np.isclose(sy, sx, rtol=1e-6):
            raise InputError(f"pixels of {sy:g} x {sx:g} (y x) in coordinate system {system!r}: only square "
                             "pixels are supported")
        return float(sx)
    return None


def _image_channels(element, store: Path, name: str):
    arr = _scale0(element)
    dims = tuple(arr.dims)
    if dims != ("c", "y", "x"):
        raise InputError(f"image {name!r} has dims {dims}; expected (c, y, x)", store)
    names = _channel_names(element)
    return np.asarray(arr.data, np.float32), names, _pixel_size_from_transform(element)


def _table_channels(table, store: Path, name: str):
    """A table of pixels × channels with ``obsm["spatial"]`` (x, y) onto a grid (NaN where no pixel)."""
    if "spatial" not in table.obsm:
        raise InputError(f"table {name!r} has no obsm['spatial'] pixel coordinates", store)
    xy = np.asarray(table.obsm["spatial"], float)[:, :2]
    if len(xy) == 0:
        raise InputError(f"table {name!r} has no pixels", store)
    px = _grid_spacing(xy, store, name)
    origin = xy.min(axis=0)
    cr = np.rint((xy - origin) / px).astype(np.int64)
    if np.abs((xy - origin) / px - cr).max() > 0.01:
        raise InputError(f"table {name!r}: pixel coordinates are not on a regular grid of {px:g}", store)
    cols, rows = (int(v) + 1 for v in cr.max(axis=0))
    x = table.X
    x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
    data = np.full((x.shape[1], rows, cols), np.nan, np.float32)
    data[:, cr[:, 1], cr[:, 0]] = np.asarray(x, np.float32).T
    return data, [str(v) for v in table.var_names], px


def _grid_spacing(xy: np.ndarray, store: Path, name: str) -> float:
    steps = []
    for axis in range(2):
        d = np.diff(np.unique(xy[:, axis]))
        d = d[d > 1e-9]
        if len(d):
            steps.append(float(d.min()))
    if not steps:
        raise InputError(f"table {name!r}: a single pixel, no grid", store)
    return min(steps)


def _select_mz(data, names, channel_mz, wanted: list[float], tol: str, store: Path, name: str):
    """Channels summed within ``tol`` of each wanted m/z."""
    from ._imzml import make_windows

    if channel_mz is None:
        raise InputError(f"--mz given but the channels of {name!r} are not m/z values ({names[:3]}...)", store)
    centres = np.asarray(channel_mz, float)
    out, labels = [], []
    for window in make_windows(wanted, tol):
        inside = np.flatnonzero((centres >= window.low) & (centres <= window.high))
        if not len(inside):
            raise InputError(f"no channel of {name!r} within {window.label} ({window.low:.4f}-{window.high:.4f}); "
                             f"its m/z range is {centres.min():.4f}-{centres.max():.4f}", store)
        out.append(data[inside].sum(axis=0))  # NaN (a pixel not acquired) stays NaN
        labels.append(window.label)
    return np.stack(out).astype(np.float32), labels, tuple(float(m) for m in wanted)
