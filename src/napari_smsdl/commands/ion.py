"""``smsdl ion FILE.imzML --mz M [--mz M ...] --tol 10ppm -o out.tif``: ion images as a TIFF stack.

``-o`` is a file, or an existing folder (then ``<FILE stem>_ions.ome.tif`` inside it). An existing
file is replaced only with ``--overwrite``; where it goes and the tolerance are checked before the
imzML is read.
"""

from __future__ import annotations

from pathlib import Path


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("ion", help="extract ion images for m/z windows into a float32 TIFF stack")
    parser.add_argument("file", help="the .imzML file")
    parser.add_argument("--mz", type=float, action="append", default=[], help="window centre (repeatable)")
    parser.add_argument("--peaks", type=int, default=0, metavar="N", help="use the N strongest peaks of the mean spectrum")
    parser.add_argument("--tol", default="10ppm", help="half-width: '10ppm' or '0.01da' (default 10ppm)")
    parser.add_argument("--norm", choices=["none", "tic", "rms"], default="none", help="per-pixel normalisation")
    parser.add_argument("-o", "--output", required=True,
                        help="output TIFF (channels, rows, cols) float32, or a folder to write FILE_ions.ome.tif into")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    from ._common import add_region_arg

    add_region_arg(parser)
    parser.set_defaults(func=run)


def output_file(output: str | Path, imzml: str | Path, *, overwrite: bool) -> Path:
    """The TIFF that ``-o`` names (a file, or ``<imzML stem>_ions.ome.tif`` in a folder), checked writable."""
    from .._outputs import check_writable_file
    from ..errors import InputError

    target = Path(output).expanduser()
    if target.is_dir():
        target = target / f"{Path(imzml).stem}_ions.ome.tif"
    if target.exists() and not overwrite:
        raise InputError("-o: the file already exists; give --overwrite to replace it, or another file name", target)
    return check_writable_file(target, option="-o")


def run(args) -> int:
    from ..errors import InputError
    from ..io import open_imzml, parse_tolerance, write_tiff_stack

    parse_tolerance(args.tol)  # a bad --tol is refused before the file is read
    if args.peaks < 0:
        raise InputError(f"--peaks must be a positive number of peaks, got {args.peaks}")
    target = output_file(args.output, args.file, overwrite=args.overwrite)
    ds = open_imzml(args.file, region=args.region)
    mz = list(args.mz)
    if args.peaks:
        mz += [float(m) for m in ds.pick_peaks(args.peaks)]
    if not mz:
        raise InputError("give at least one --mz value (or --peaks N)", args.file)
    images = ds.ion_images(mz, args.tol, norm=args.norm)
    # (x, y) when the pixels are not square, so the OME-TIFF keeps both sizes instead of none
    size = images.pixel_size_um if images.pixel_size_um is not None else images.pixel_size_xy_um
    out = write_tiff_stack(target, images.data, channel_names=images.channel_names, pixel_size_um=size)
    print(f"wrote {out} ({len(mz)} channels, {images.data.shape[1]} x {images.data.shape[2]} pixels)")
    return 0
