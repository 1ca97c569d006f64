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
    """The facts ``smsdl info`` prints, as a dict (JSON-serialisable)."""
    from ..io import open_imzml

    ds = open_imzml(path)
    low, high = ds.mz_range
    info = {
        "file": str(ds.path),
        "shape": list(ds.shape),
        "n_spectra": ds.n_spectra,
        "mode": ds.mode,
        "mz_range": [None if math.isnan(low) else low, None if math.isnan(high) else high],
        "pixel_size_um": ds.pixel_size_um,
        "acquired_fraction": ds.n_spectra / float(ds.shape[0] * ds.shape[1]),
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
