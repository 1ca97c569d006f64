"""Ion-image extraction speed and memory: napari-smsdl's chunked reader vs pyimzML's getionimage.

Generates a processed imzML of 200 x 200 pixels x 5,000 peaks (about 2.4 GB of .ibd), then, in the
same run, extracts ion images for 100 m/z windows with ``ImzMLDataset.ion_images`` (in a fresh
subprocess, so its peak RSS is its own) and with ``pyimzml.ImzMLParser.getionimage`` (one window at
a time, its only mode; timed on a subset of windows and scaled per window). Results go to
benchmarks/results/ion_images.json and docs/benchmarks/ion_images.md.

    python benchmarks/bench_ion_images.py [--size 200] [--peaks 5000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def generate(path: Path, size: int, n_peaks: int, seed: int = 0) -> None:
    from napari_smsdl.io import write_imzml

    rng = np.random.default_rng(seed)
    base = np.sort(rng.uniform(100.0, 1000.0, n_peaks))

    def spectra():
        for row in range(size):
            for col in range(size):
                mz = np.sort(base * (1 + rng.normal(0, 2e-6, n_peaks)))
                yield row, col, mz, rng.exponential(100.0, n_peaks).astype(np.float32)

    write_imzml(path, spectra, mode="processed", pixel_size_um=20.0)


def ours(path: str, centres: list[float]) -> dict:
    import resource

    from napari_smsdl.io import open_imzml

    t0 = time.perf_counter()
    ds = open_imzml(path)
    t_open = time.perf_counter() - t0
    t0 = time.perf_counter()
    images = ds.ion_images(centres, "10ppm")
    t_ion = time.perf_counter() - t0
    return {
        "open_seconds": t_open,
        "ion_seconds": t_ion,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "checksum": float(np.nansum(images.data[:5])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--peaks", type=int, default=5000)
    parser.add_argument("--windows", type=int, default=100)
    parser.add_argument("--reference-windows", type=int, default=3, help="windows timed with getionimage")
    parser.add_argument("--workdir", default=str(HERE / "work"))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(ours(args.child[0], json.loads(args.child[1]))))
        return

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"bench_{args.size}x{args.size}x{args.peaks}.imzML"
    if not path.exists():
        t0 = time.perf_counter()
        generate(path, args.size, args.peaks)
        print(f"generated {path} in {time.perf_counter() - t0:.0f} s")
    ibd_mb = path.with_suffix(".ibd").stat().st_size / 2**20
    rng = np.random.default_rng(1)
    centres = sorted(rng.uniform(150.0, 950.0, args.windows).tolist())

    child = subprocess.run(
        [sys.executable, __file__, "--child", str(path), json.dumps(centres)], capture_output=True, text=True, check=True
    )
    mine = json.loads(child.stdout.strip().splitlines()[-1])

    from pyimzml.ImzMLParser import ImzMLParser, getionimage

    t0 = time.perf_counter()
    parser_ = ImzMLParser(str(path))
    ref_open = time.perf_counter() - t0
    ref_times = []
    from napari_smsdl.io import open_imzml

    check = open_imzml(path)
    for mz in centres[: args.reference_windows]:
        tol = mz * 10e-6
        t0 = time.perf_counter()
        ref = getionimage(parser_, mz, tol=tol)
        ref_times.append(time.perf_counter() - t0)
        got = check.ion_images([mz], "10ppm").data[0]
        assert np.allclose(ref, np.nan_to_num(got), rtol=1e-4), "results differ from getionimage"
    per_window_ref = float(np.mean(ref_times))
    per_window_ours = mine["ion_seconds"] / len(centres)
    result = {
        "pixels": args.size * args.size,
        "peaks_per_spectrum": args.peaks,
        "ibd_mb": ibd_mb,
        "windows": len(centres),
        "ours_open_seconds": mine["open_seconds"],
        "ours_seconds_all_windows": mine["ion_seconds"],
        "ours_seconds_per_window": per_window_ours,
        "ours_peak_rss_mb": mine["peak_rss_mb"],
        "getionimage_parse_seconds": ref_open,
        "getionimage_seconds_per_window": per_window_ref,
        "getionimage_windows_timed": len(ref_times),
        "getionimage_seconds_all_windows_extrapolated": per_window_ref * len(centres),
        "speedup": per_window_ref / per_window_ours,
        "results_identical_to_getionimage": True,
        "cpu": os.cpu_count(),
    }
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "ion_images.json").write_text(json.dumps(result, indent=2))
    md = HERE.parent / "docs" / "benchmarks" / "ion_images.md"
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(
        "| reader | 100 windows (s) | per window (s) | peak RSS (MB) |\n|---|---|---|---|\n"
        f"| napari-smsdl `ion_images` (all windows in one pass) | {mine['ion_seconds']:.1f} | {per_window_ours:.3f} | {mine['peak_rss_mb']:.0f} |\n"
        f"| pyimzML `getionimage` ({len(ref_times)} windows timed, ×{len(centres) // len(ref_times)}) | "
        f"{per_window_ref * len(centres):.0f} (extrapolated) | {per_window_ref:.2f} | — |\n\n"
        f"{args.size} × {args.size} pixels × {args.peaks} peaks, processed imzML, .ibd {ibd_mb:.0f} MB; "
        f"speed-up **{result['speedup']:.0f}×**; peak RSS {mine['peak_rss_mb']:.0f} MB vs .ibd {ibd_mb:.0f} MB "
        f"(index build from the XML: {mine['open_seconds']:.1f} s, excluded from both).\n"
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
