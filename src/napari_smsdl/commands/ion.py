"""``smsdl ion FILE.imzML --mz M [--mz M ...] --tol 10ppm -o out.tif``: ion images as a TIFF stack."""

from __future__ import annotations

from pathlib import Path


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("ion", help="extract ion images for m/z windows into a float32 TIFF stack")
    parser.add_argument("file", help="the .imzML file")
    parser.add_argument("--mz", type=float, action="append", default=[], help="window centre (repeatable)")
    parser.add_argument("--peaks", type=int, default=0, metavar="N", help="use the N strongest peaks of the mean spectrum")
    parser.add_argument("--tol", default="10ppm", help="half-width: '10ppm' or '0.01da' (default 10ppm)")
    parser.add_argument("--norm", choices=["none", "tic", "rms"], default="none", help="per-pixel normalisation")
    parser.add_argument("-o", "--output", required=True, help="output TIFF (channels, rows, cols) float32")
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..errors import InputError
    from ..io import open_imzml, write_tiff_stack

    ds = open_imzml(args.file)
    mz = list(args.mz)
    if args.peaks:
        mz += [float(m) for m in ds.pick_peaks(args.peaks)]
    if not mz:
        raise InputError("give at least one --mz value (or --peaks N)", args.file)
    images = ds.ion_images(mz, args.tol, norm=args.norm)
    out = write_tiff_stack(
        Path(args.output), images.data, channel_names=images.channel_names, pixel_size_um=images.pixel_size_um
    )
    print(f"wrote {out} ({len(mz)} channels, {images.data.shape[1]} x {images.data.shape[2]} pixels)")
    return 0
