"""Argument helpers shared by the reconstruction commands."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MsiInput:
    """An MSI stack (C, rows, cols) with NaN where not acquired, its names and pixel size.

    ``data`` is a numpy array, or — when :func:`load_msi` streamed it (``lazy``) — a zarr array or
    a read-only ``.npy`` memmap, read channel chunk by channel chunk.
    """

    data: np.ndarray
    channel_names: tuple[str, ...]
    pixel_size_um: float | None
    mz: tuple[float, ...] | None = None
    lazy: bool = False
    store: str | None = None
    origin_rc_um: tuple[float, float] = (0.0, 0.0)  # the grid's top-left corner on the instrument (imzML)


def add_msi_channel_args(parser) -> None:
    parser.add_argument("--mz", type=float, action="append", default=[], help="m/z channel (repeatable; imzML input)")
    parser.add_argument("--peaks", type=int, default=5, help="with imzML and no --mz: the N strongest peaks (default 5)")
    parser.add_argument("--tol", default="10ppm", type=_tolerance, help="m/z window half-width, e.g. 10ppm or 0.01da")
    parser.add_argument("--norm", choices=["none", "tic", "rms"], default="none", help="per-pixel normalisation")
    parser.add_argument("--shape", default=None, help="ROWSxCOLS, for a CSV/TXT table of pixels × channels")
    parser.add_argument("--channel-names", default=None, metavar="FILE",
                        help="a text file naming the MSI channels, one per line (e.g. 'm/z 885.5499'), for a .npy/"
                        ".tif/.csv stack; default: <file>.json {\"channel_names\": [...]} beside the stack, else 'channel i'")
    add_region_arg(parser)


def add_region_arg(parser) -> None:
    parser.add_argument("--region", type=int, default=None, metavar="K",
                        help="imzML with several acquired regions: use region K alone, on its own grid "
                        "(`smsdl info FILE --json` lists them, from 0; default: all, in place)")


def check_region(path, region: int | None) -> None:
    """--region is for imzML files (before any work)."""
    if region is not None and Path(path).suffix.lower() != ".imzml":
        raise InputError("--region selects a region of an imzML file; this MSI is not one", path)


def _tolerance(text: str) -> str:
    """argparse type of --tol: checked when the command line is read, kept as the text given."""
    import argparse

    from ..io import parse_tolerance

    try:
        parse_tolerance(text)
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return text


#: Memory for the ion images of one pass over an imzML when they are streamed to zarr (bytes).
MSI_PASS_BYTES = 1 << 30


def load_msi(path: str, args, *, lazy_above: int | None = None, store: str | Path | None = None,
             chunk_channels: int = 64) -> MsiInput:
    """:func:`_load_msi`, with the channels named by ``--channel-names FILE`` when given."""
    msi = _load_msi(path, args, lazy_above=lazy_above, store=store, chunk_channels=chunk_channels)
    names_file = getattr(args, "channel_names", None)
    if names_file:
        import dataclasses

        from ..io._ion_stack import read_channel_names

        msi = dataclasses.replace(msi, channel_names=tuple(read_channel_names(names_file, msi.data.shape[0])))
    return msi


def _load_msi(path: str, args, *, lazy_above: int | None = None, store: str | Path | None = None,
              chunk_channels: int = 64) -> MsiInput:
    """Read an imzML (ion images of --mz or the strongest peaks), an ion stack (.npy/.tif/.csv/.txt) or a
    SpatialData store (``X.zarr``, or ``X.zarr/images/NAME``, ``X.zarr/tables/NAME``: every channel, or
    those within --tol of each --mz; see :func:`napari_smsdl.io.read_spatialdata_msi`).

    With ``lazy_above`` and more channels than that, the stack is not built in memory: an imzML's
    ion images are computed a group of channels per pass over the file (as many as fit in
    ``MSI_PASS_BYTES``; the same numbers as one pass) and written to the zarr array ``store``
    (C, rows, cols) float32, chunked ``chunk_channels`` channels; a 3-D ``.npy`` is opened as a
    read-only memmap. Other formats are read whole. Under torchrun rank 0 writes the store and the
    other ranks open it.
    """
    p = Path(path)
    check_region(p, getattr(args, "region", None))
    from ..io import is_spatialdata

    if is_spatialdata(p):  # a SpatialData store: an image of m/z channels or a pixels x m/z table
        from ..io import read_spatialdata_msi

        got = read_spatialdata_msi(p, mz=list(getattr(args, "mz", []) or []), tol=getattr(args, "tol", "10ppm"),
                                   pixel_size_um=getattr(args, "msi_pixel_size", None))
        log.info("read the MSI %s from %s: %d channels of %d x %d", got.element, p, *got.stack.data.shape)
        return MsiInput(got.stack.data, got.stack.channel_names, got.stack.pixel_size_um, got.mz)
    if p.suffix.lower() == ".imzml":
        from ..io import make_windows, open_imzml

        ds = open_imzml(p, pixel_size_um=getattr(args, "msi_pixel_size", None), region=getattr(args, "region", None))
        mz = list(args.mz) or [float(m) for m in ds.pick_peaks(args.peaks)]
        if lazy_above is not None and len(mz) > lazy_above and store is not None:
            windows = make_windows(mz, args.tol)
            data = _stream_ion_images(ds, windows, args.norm, Path(store), chunk_channels)
            return MsiInput(data, tuple(w.label for w in windows), ds.pixel_size_um, tuple(mz), lazy=True,
                            store=str(store), origin_rc_um=ds.origin_rc_um)
        images = ds.ion_images(mz, args.tol, norm=args.norm)
        return MsiInput(images.data, tuple(images.channel_names), ds.pixel_size_um, tuple(mz),
                        origin_rc_um=ds.origin_rc_um)
    from ..io import read_ion_stack

    if lazy_above is not None and p.suffix.lower() == ".npy" and p.is_file():
        try:
            mm = np.load(p, mmap_mode="r", allow_pickle=False)
        except Exception:  # noqa: BLE001 - read_ion_stack below reports a corrupt file
            mm = None
        if mm is not None and mm.ndim == 3 and mm.shape[-1] in (3, 4) and mm.shape[0] > 4:
            mm = None  # (rows, cols, 3|4) from image writers: read_ion_stack puts the channels first
        if mm is not None and mm.ndim == 3 and mm.shape[0] > lazy_above and min(mm.shape[1:]) >= 2:
            names = _sidecar_names(p, mm.shape[0])
            return MsiInput(mm, names, None, lazy=True)
    if lazy_above is not None and p.suffix.lower() in (".tif", ".tiff") and p.is_file():
        lazy = _lazy_tiff_stack(p, lazy_above)
        if lazy is not None:
            return lazy
    shape = None
    if getattr(args, "shape", None):
        try:
            shape = tuple(int(v) for v in args.shape.lower().split("x"))
        except ValueError as exc:
            raise InputError(f"--shape must look like 40x36, got {args.shape!r}") from exc
    stack = read_ion_stack(p, shape_rc=shape)
    data = stack.data.copy()
    return MsiInput(data, stack.channel_names, stack.pixel_size_um)


def _lazy_tiff_stack(path: Path, lazy_above: int) -> MsiInput | None:
    """A (C, rows, cols) TIFF stack of more than ``lazy_above`` channels, read page by page; else None."""
    import tifffile

    from ..io import ome_names_and_pixel_size
    from ..project import open_lazy_tiff

    try:
        with tifffile.TiffFile(path) as tif:
            shape = tuple(tif.series[0].shape)
            names, pixel_size_um = ome_names_and_pixel_size(tif)
    except Exception:  # noqa: BLE001 - read_ion_stack reports a corrupt file
        return None
    if len(shape) != 3 or shape[0] <= lazy_above or shape[-1] in (3, 4) or min(shape[1:]) < 2:
        return None  # small, 2-D, or (rows, cols, 3|4): read whole, as read_ion_stack does
    data = open_lazy_tiff(path, shape[0])
    sidecar = _sidecar_names(path, shape[0])  # a sidecar wins over the OME names, as in read_ion_stack
    if path.with_suffix(path.suffix + ".json").exists() or names is None or len(names) != shape[0]:
        names = sidecar
    return MsiInput(data, tuple(names), pixel_size_um, lazy=True)


def _sidecar_names(path: Path, n_channels: int) -> tuple[str, ...]:
    """Channel names from ``<file>.json`` ``{"channel_names": [...]}`` (as read_ion_stack), else "channel i"."""
    import json

    from ..io._ion_stack import sidecar_path

    sidecar = sidecar_path(path)
    if sidecar is not None:
        names = json.loads(sidecar.read_text()).get("channel_names")
        if names is not None and len(names) == n_channels:
            return tuple(str(n) for n in names)
    return tuple(f"channel {i}" for i in range(n_channels))


def _stream_ion_images(ds, windows, norm: str, store: Path, chunk_channels: int):
    """Ion images of ``windows`` into the zarr array ``store``, a group of channels per pass over ``ds``."""
    import zarr

    from .. import distributed as dd

    rows, cols = ds.shape
    if dd.is_main_process():
        # window sums (float64, twice with a normalisation) and the float32 images per channel
        per_channel = ds.n_spectra * 16 + rows * cols * 4
        group = max(chunk_channels, MSI_PASS_BYTES // max(per_channel, 1) // chunk_channels * chunk_channels)
        arr = zarr.create_array(str(store), shape=(len(windows), rows, cols), chunks=(chunk_channels, rows, cols),
                                dtype="float32", compressors=None, fill_value=float("nan"), overwrite=True)
        for c0 in range(0, len(windows), group):
            arr[c0 : c0 + group] = ds.ion_images(windows[c0 : c0 + group], norm=norm).data
    dd.barrier()
    return zarr.open_array(str(store), mode="r")


#: H&E images larger than this (pixels at full resolution) are processed tile by tile.
TILED_ABOVE_PIXELS = 64e6


def load_he(path: str, *, pixel_size_um: float | None, tiled: bool | None = False):
    """The H&E in memory, or (``tiled=True``, or ``None`` and a whole slide) the lazy image itself."""
    from ..io import open_histology

    image = open_histology(path, pixel_size_um=pixel_size_um)
    if tiled is None:
        tiled = image.shape[0] * image.shape[1] > TILED_ABOVE_PIXELS
    if tiled:
        return image, image.pixel_size_um
    return image.read(0), image.pixel_size_um


def add_method_args(parser) -> None:
    parser.add_argument("--factor", type=int, required=True, help="super-resolution factor F (2-16)")
    parser.add_argument("--fast", action="store_true", help="the fast preset (tests, demos: under 2 minutes)")
    parser.add_argument("--transform", default=None, help="transform.tfm from `smsdl register` (MSI µm → H&E µm)")
    parser.add_argument("--he-pixel-size", type=float, default=None, help="H&E pixel size in µm")
    parser.add_argument("--msi-pixel-size", type=float, default=None, help="MSI pixel size in µm")
    parser.add_argument("--seed", type=int, default=0, help="seed for every random part (default 0)")
    parser.add_argument("--cnn-iterations", type=int, default=None, help="CNN iterations (default: the preset's)")
    parser.add_argument("--ssl-steps", type=int, default=None, help="self-supervised ViT steps per level (default: the preset's)")
    parser.add_argument("--regression-steps", type=int, default=None, help="SMSDL regression steps (default: the preset's)")
    parser.add_argument("--checkpoint", default=None, help="local ViT weights to use instead of self-supervised training")
    parser.add_argument("--cache-dir", default=None, help="feature cache folder (default OUTDIR/cache)")
    parser.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda")
    parser.add_argument(
        "--force-histology", action="store_true",
        help="use the H&E on every channel (default: a channel outputs the H&E-free control, bicubic + "
        "back-projection, unless the histology's gain is clearly positive: the scale-transfer gain where the "
        "LR image is large enough for that check, the held-out gain otherwise; the run says which)",
    )


def settings_from_args(args):
    import dataclasses

    from ..reconstruction import Settings

    settings = Settings.preset("fast" if args.fast else "default", factor=args.factor, seed=args.seed, device=args.device)
    if args.cnn_iterations:
        settings = dataclasses.replace(settings, cnn_iterations=args.cnn_iterations)
    if args.ssl_steps is not None:
        settings = dataclasses.replace(settings, features=dataclasses.replace(settings.features, ssl_steps=args.ssl_steps))
    if args.regression_steps is not None:
        settings = dataclasses.replace(
            settings, regression=dataclasses.replace(settings.regression, steps=args.regression_steps)
        )
    if args.checkpoint:
        settings = dataclasses.replace(settings, features=dataclasses.replace(settings.features, checkpoint=args.checkpoint))
    if getattr(args, "force_histology", False):
        settings = dataclasses.replace(settings, regression=dataclasses.replace(settings.regression, fallback=False))
    return settings


def load_transform_arg(path: str | None):
    if not path:
        return None
    from ..registration import load_transform

    return load_transform(path)


def add_output_args(parser, *, what: str = "output folder") -> None:
    """``-o OUTDIR`` and ``--overwrite``: an output folder is written as a unit (see ``_outputs.output_folder``)."""
    parser.add_argument("-o", "--output", required=True, help=f"{what} (written whole at the end; "
                        "refused when it already holds a run, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a previous run in the output folder (the old one stays whole until the "
                        "new one is complete)")
