"""``smsdl info FILE.imzML [--json]``: describe an imzML file."""

from __future__ import annotations

import json
import math


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("info", help="describe an imzML file (grid, mode, m/z range, pixel size)")
    parser.add_argument("file", help="the .imzML file (its .ibd beside it)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--peaks", type=int, default=0, metavar="N", help="also list the N strongest peaks")
    parser.set_defaults(func=run)


def describe(path, *, n_peaks: int = 0) -> dict:
    """The facts ``smsdl info`` prints, as a dict (JSON-serialisable).

    Geometry as the instrument wrote it: ``shape`` is (rows, cols) of the bounding box of the
    acquired positions; ``origin`` the imzML position (x, y) of its top-left pixel (``[1, 1]``
    for a file that starts there) and ``origin_um`` the same corner in µm (x, y; null without a
    pixel size); ``pixel_size_um`` one number, or ``[x, y]`` when they differ; ``regions`` one
    entry per disjoint block of acquired pixels, each with its ``origin`` (x, y), ``shape`` and
    ``n_spectra``.
    """
    from ..io import open_imzml

    ds = open_imzml(path)
    low, high = ds.mz_range
    size_xy = ds.pixel_size_xy_um
    if size_xy is None:
        pixel_size = None
    elif ds.is_square:
        pixel_size = size_xy[0]
    else:
        pixel_size = [size_xy[0], size_xy[1]]
    row0, col0 = ds.offset_rc_px
    regions = []
    for region in ds.regions:
        r, c, n_r, n_c = region.bbox_rc_px
        regions.append({"origin": [col0 + c + 1, row0 + r + 1], "shape": [n_r, n_c], "n_spectra": region.n_spectra})
    info = {
        "file": str(ds.path),
        "shape": list(ds.shape),
        "origin": [col0 + 1, row0 + 1],
        "origin_um": None if size_xy is None else [col0 * size_xy[0], row0 * size_xy[1]],
        "n_spectra": ds.n_spectra,
        "mode": ds.mode,
        "mz_range": [None if math.isnan(low) else low, None if math.isnan(high) else high],
        "pixel_size_um": pixel_size,
        "acquired_fraction": ds.n_spectra / float(ds.shape[0] * ds.shape[1]),
        "regions": regions,
        "mz_dtype": ds.mz_dtype.name,
        "intensity_dtype": ds.intensity_dtype.name,
    }
    if n_peaks:
        info["peaks_mz"] = [float(m) for m in ds.pick_peaks(n_peaks)]
    return info


def run(args) -> int:
    info = describe(args.file, n_peaks=args.peaks)
    if args.json:
        print(json.dumps(info))
    else:
        for key, value in info.items():
            print(f"{key:>18}: {value}")
    return 0
