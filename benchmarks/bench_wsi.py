"""Whole-slide feature extraction in bounded memory: a generated H&E, tiled ViT features, peak RSS.

A synthetic H&E-like whole slide (0.5 µm pixels, JPEG-tiled pyramidal OME-TIFF, 3 levels) is written
tile by tile, so generating it takes bounded memory too. Its MSI is a grid of 50 µm pixels over the
slide; F = 4 gives 12.5 µm SR cells and 8 guide pixels per cell (1.5625 µm; the H&E is read at
pyramid level 1, 1 µm). :func:`napari_smsdl.features.extract_features_tiled` then computes the
fast-preset features into a zarr store in a child process (or ``--procs 2`` ranks under torchrun,
gloo, one thread each), which reports its peak resident memory (``ru_maxrss``) and its time.

    python benchmarks/bench_wsi.py --size 20000              # the 20k x 20k slide
    python benchmarks/bench_wsi.py --size 8000 --procs 2     # quick check, 2 ranks
    python benchmarks/bench_wsi.py --size 4000 --in-memory   # also the in-memory path, for contrast

Results are merged into benchmarks/results/wsi.json (one entry per size/procs/mode) and the table
docs/benchmarks/wsi.md is rewritten from it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "wsi.json"
DOC = HERE.parent / "docs" / "benchmarks" / "wsi.md"
HE_PX_UM = 0.5
MSI_PX_UM = 50.0
FACTOR = 4
TILE = 512
ATLAS = 2048


# ------------------------------------------------------------------------------------------ slide


def _atlas(seed: int = 0) -> np.ndarray:
    """A 2048 x 2048 H&E-like texture at 0.5 µm: pink fibrous stroma, purple nuclei, pale lumina."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    n = ATLAS
    fibres = gaussian_filter(rng.normal(size=(n, n)), (1.5, 12), mode="wrap")
    fibres = (fibres - fibres.mean()) / fibres.std()
    density = gaussian_filter(rng.normal(size=(n, n)), 60, mode="wrap")
    density = (density - density.mean()) / density.std()
    centres = rng.random((n, n)) < 0.0009 * np.exp(0.8 * density)  # nuclei, denser in cellular regions
    nuclei = gaussian_filter(centres.astype(np.float32), 4.0, mode="wrap") * (2 * np.pi * 4.0**2)  # peak 1
    nuclei = np.clip(nuclei * 1.6, 0, 1)  # solid cores about 10 px (5 µm) with soft rims
    lumen = gaussian_filter(rng.normal(size=(n, n)), 25, mode="wrap")
    lumen = np.clip((lumen / lumen.std() - 1.8) * 2, 0, 1)
    stroma = np.stack([235 + 8 * fibres, 150 + 18 * fibres, 190 + 10 * fibres], -1)
    nucleus = np.array([95.0, 60.0, 140.0])
    rgb = stroma * (1 - nuclei[..., None]) + nucleus * nuclei[..., None]
    rgb = rgb * (1 - lumen[..., None]) + np.array([245.0, 235.0, 240.0]) * lumen[..., None]
    return np.clip(rgb, 0, 255).astype(np.float32)


def _tissue_field(size_px: int, seed: int = 1) -> np.ndarray:
    """A smooth 129 x 129 field over the slide; tissue where it is positive (about two thirds of it)."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    field = gaussian_filter(rng.normal(size=(129, 129)), 9, mode="reflect")
    field = field / field.std() + 0.6
    yy, xx = np.mgrid[-1:1:129j, -1:1:129j]
    return field - 2.0 * np.clip(np.hypot(yy, xx) - 0.8, 0, None)  # glass around the section


def write_slide(path: Path, size: int, levels: int = 3, compression: str = "jpeg") -> Path:
    """Write the size x size synthetic slide (JPEG tiles, OME pyramid) tile by tile.

    ``compression="zlib"`` needs no imagecodecs (for machines without it); the pixels are the same
    before JPEG's loss, so the timings compare.
    """
    import tifffile

    atlas = _atlas()
    field = _tissue_field(size)
    tmp = path.with_name(path.name + ".tmp")
    meta = {"axes": "YXS", "PhysicalSizeX": HE_PX_UM, "PhysicalSizeY": HE_PX_UM,
            "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"}
    opts = dict(tile=(TILE, TILE), photometric="rgb", compression=compression)
    if compression == "jpeg":
        opts["compressionargs"] = {"level": 90}
    with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tw:
        for level in range(levels):
            shape = (-(-size // 2**level), -(-size // 2**level))
            level_atlas = atlas if level == 0 else _downscale(atlas, 2**level)
            kw = {"subifds": levels - 1, "metadata": meta} if level == 0 else {"subfiletype": 1}
            tw.write(_tiles(shape, level_atlas, field), shape=shape + (3,), dtype=np.uint8, **opts, **kw)
    os.replace(tmp, path)
    return path


def _downscale(atlas: np.ndarray, k: int) -> np.ndarray:
    return atlas.reshape(ATLAS // k, k, ATLAS // k, k, 3).mean(axis=(1, 3))


def _tiles(shape, small_atlas: np.ndarray, field: np.ndarray):
    """Tiles of one pyramid level in row-major order, TILE x TILE x 3 uint8 (edges padded).

    Level L reads the atlas block-averaged by 2^L (the same texture, coarser), mirrored so the
    repeats are seamless, and fades to glass where the tissue field is negative.
    """
    from scipy.ndimage import map_coordinates

    n = small_atlas.shape[0]
    white = np.array([246.0, 244.0, 246.0], np.float32)
    rows, cols = shape
    for r0 in range(0, rows, TILE):
        for c0 in range(0, cols, TILE):
            rr = np.arange(r0, r0 + TILE) % (2 * n)
            cc = np.arange(c0, c0 + TILE) % (2 * n)
            rr = np.where(rr < n, rr, 2 * n - 1 - rr)
            cc = np.where(cc < n, cc, 2 * n - 1 - cc)
            tex = small_atlas[rr[:, None], cc[None, :]]
            fy = (np.arange(r0, r0 + TILE) + 0.5) / rows * 128
            fx = (np.arange(c0, c0 + TILE) + 0.5) / cols * 128
            yy, xx = np.meshgrid(fy, fx, indexing="ij")
            m = np.clip(map_coordinates(field, [yy, xx], order=1, mode="nearest") * 6, 0, 1)[..., None]
            yield (white + (tex - white) * m).astype(np.uint8)


# ------------------------------------------------------------------------------------------ child


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child(args) -> None:
    """Run the extraction (one rank of a torchrun job, or alone) and write this rank's report."""
    import dataclasses

    import torch  # noqa: F401 - imported before the baseline RSS is taken
    import timm  # noqa: F401
    import SimpleITK  # noqa: F401
    import zarr  # noqa: F401

    from napari_smsdl import distributed as dd
    from napari_smsdl.features import FAST_FEATURES, TilingParams, extract_features_tiled
    from napari_smsdl.io import open_histology

    with dd.distributed_session(args.device) as env:
        baseline = _rss_mb()
        image = open_histology(args.slide)
        size_um = image.shape[0] * HE_PX_UM
        msi = (int(size_um // MSI_PX_UM), int(image.shape[1] * HE_PX_UM // MSI_PX_UM))
        stages, last = {}, [time.perf_counter(), None]

        def progress(stage, done, total):
            now = time.perf_counter()
            if last[1] is not None:
                stages[last[1]] = stages.get(last[1], 0.0) + now - last[0]
            last[:] = [now, stage]

        params = dataclasses.replace(FAST_FEATURES, ssl_steps=args.ssl_steps)
        t0 = time.perf_counter()
        result = extract_features_tiled(image, msi_shape=msi, msi_pixel_size_um=MSI_PX_UM, factor=FACTOR, out=args.store,
                                        params=params, tiling=TilingParams(), device=args.device, progress=progress)
        seconds = time.perf_counter() - t0
        progress("end", 0, 0)
        sample = result.open()[:, : min(64, result.shape[1]), : min(64, result.shape[2])]
        report = {
            "rank": env.rank, "world_size": env.world_size, "seconds": seconds, "peak_rss_mb": _rss_mb(),
            "rss_after_imports_mb": baseline, "stages_s": {k: round(v, 2) for k, v in stages.items()},
            "he_shape": list(image.shape), "he_level": result.he_level, "cell_px": result.cell_px,
            "msi_shape": list(msi), "sr_shape": list(result.shape[1:]), "n_features": result.shape[0],
            "finite": bool(np.isfinite(np.asarray(sample)).all()), "threads": int(os.environ.get("SMSDL_NUM_THREADS", "1")),
        }
        Path(args.report).with_suffix(f".rank{env.rank}.json").write_text(json.dumps(report))


def child_in_memory(args) -> None:
    """The in-memory path on the same slide (level 0 read whole, guide, extract_features)."""
    import dataclasses

    import SimpleITK  # noqa: F401 - the same modules as the tiled child before the baseline RSS
    import timm  # noqa: F401
    import torch  # noqa: F401
    import zarr  # noqa: F401

    from napari_smsdl.features import FAST_FEATURES, extract_features
    from napari_smsdl.io import open_histology
    from napari_smsdl.reconstruction import prepare_guide

    baseline = _rss_mb()
    image = open_histology(args.slide)
    msi = (int(image.shape[0] * HE_PX_UM // MSI_PX_UM), int(image.shape[1] * HE_PX_UM // MSI_PX_UM))
    t0 = time.perf_counter()
    level = image.best_level(MSI_PX_UM / FACTOR / 8)
    he = image.read(level)
    guide, k = prepare_guide(he, he_pixel_size_um=image.level_pixel_size_um(level), msi_shape=msi,
                             msi_pixel_size_um=MSI_PX_UM, factor=FACTOR)
    del he
    params = dataclasses.replace(FAST_FEATURES, ssl_steps=args.ssl_steps)
    fm = extract_features(guide, sr_shape=(msi[0] * FACTOR, msi[1] * FACTOR), factor=FACTOR, params=params, device=args.device)
    report = {"rank": 0, "world_size": 1, "seconds": time.perf_counter() - t0, "peak_rss_mb": _rss_mb(),
              "rss_after_imports_mb": baseline, "he_shape": list(image.shape), "he_level": level, "cell_px": k,
              "msi_shape": list(msi), "sr_shape": list(fm.data.shape[1:]), "n_features": fm.data.shape[0],
              "threads": int(os.environ.get("SMSDL_NUM_THREADS", "1"))}
    Path(args.report).with_suffix(".rank0.json").write_text(json.dumps(report))


def child_channels(args) -> None:
    """Thousands of channels: reconstruct_channels on an MSI memmap, SR stack streamed to zarr."""
    import torch  # noqa: F401
    import zarr  # noqa: F401
    from scipy.ndimage import gaussian_filter

    from napari_smsdl.reconstruction import FAST_REGRESSION, reconstruct_channels

    baseline = _rss_mb()
    n_ch, rows, cols, factor = args.channels, 100, 100, FACTOR
    rng = np.random.default_rng(0)
    # 24 smooth feature maps on the SR grid; channels mix 8 base images of the MSI grid, plus noise
    features = np.stack([gaussian_filter(rng.normal(size=(rows * factor, cols * factor)), 3) for _ in range(24)])
    features = (features / features.std(axis=(1, 2), keepdims=True)).astype(np.float32)
    base = np.stack([features[i].reshape(rows, factor, cols, factor).mean(axis=(1, 3)) for i in range(8)])
    path = Path(args.store).with_suffix(".lr.npy")
    lr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n_ch, rows, cols))
    for c0 in range(0, n_ch, 256):  # written in slices: the stack is never in memory at once
        c1 = min(c0 + 256, n_ch)
        w = rng.random((c1 - c0, 8)).astype(np.float32)
        lr[c0:c1] = np.exp(np.tensordot(w, base, 1) * 0.3) + 0.05 * rng.random((c1 - c0, rows, cols), dtype=np.float32)
    lr.flush()
    del lr
    lr = np.load(path, mmap_mode="r")
    t0 = time.perf_counter()
    stack = reconstruct_channels(features, lr, factor, args.store, mask_lr=np.ones((rows, cols), bool),
                                 chunk_channels=args.chunk_channels, params=FAST_REGRESSION, device=args.device)
    seconds = time.perf_counter() - t0
    check = stack.open()[n_ch - 1]
    report = {"channels": n_ch, "msi_shape": [rows, cols], "sr_shape": list(stack.shape[1:]), "factor": factor,
              "chunk_channels": args.chunk_channels, "seconds": round(seconds, 1),
              "seconds_per_channel": round(seconds / n_ch, 4), "peak_rss_mb": round(_rss_mb(), 0),
              "rss_after_imports_mb": round(baseline, 0), "sr_stack_mb": round(4 * n_ch * stack.shape[1] * stack.shape[2] / 1e6, 0),
              "msi_stack_mb": round(4 * n_ch * rows * cols / 1e6, 0), "finite": bool(np.isfinite(check).all()),
              "regression": "fast preset (hidden 96, 200 steps, 3 restarts, PCA 32)", "device": args.device}
    Path(args.report).with_suffix(".rank0.json").write_text(json.dumps(report))


# ------------------------------------------------------------------------------------------ driver


def run_one(slide: Path, work: Path, size: int, procs: int, ssl_steps: int, in_memory: bool, device: str = "cpu") -> dict:
    store = work / f"features-{size}-{procs}.zarr"
    report = work / f"report-{size}-{procs}-{'mem' if in_memory else 'tiled'}"
    for old in work.glob(report.name + ".rank*.json"):
        old.unlink()
    env = {**os.environ, "SMSDL_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    mode = "--child-in-memory" if in_memory else "--child"
    script = [str(Path(__file__).resolve()), mode, "--slide", str(slide), "--store", str(store), "--report", str(report),
              "--ssl-steps", str(ssl_steps), "--device", device]
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", *script]
    else:
        cmd = [sys.executable, *script]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"extraction failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    ranks = [json.loads(p.read_text()) for p in sorted(work.glob(report.name + ".rank*.json"))]
    first = ranks[0]
    he_mp = size * size / 1e6
    guide_mp = first["sr_shape"][0] * first["sr_shape"][1] * first["cell_px"] ** 2 / 1e6
    seconds = max(r["seconds"] for r in ranks)
    return {
        "size": size, "procs": procs, "mode": "in-memory" if in_memory else "tiled", "threads_per_proc": 1,
        "seconds": round(seconds, 1), "wall_seconds_incl_startup": round(wall, 1),
        "seconds_per_he_megapixel": round(seconds / he_mp, 4), "seconds_per_guide_megapixel": round(seconds / guide_mp, 4),
        "peak_rss_mb_per_proc": round(max(r["peak_rss_mb"] for r in ranks), 0),
        "rss_after_imports_mb": round(first["rss_after_imports_mb"], 0),
        "he_level_read": first["he_level"], "he_shape": first["he_shape"], "msi_shape": first["msi_shape"],
        "sr_shape": first["sr_shape"], "guide_px_per_cell": first["cell_px"], "guide_megapixels": round(guide_mp, 1),
        "n_features": first["n_features"], "ssl_steps": ssl_steps, "stages_s": first.get("stages_s", {}),
        "features_finite": first.get("finite", True), "device": device,
    }


def run_channels(args) -> None:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    store = work / f"channels-{args.channels}.zarr"
    report = work / f"report-channels-{args.channels}"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-channels", "--channels", str(args.channels),
           "--chunk-channels", str(args.chunk_channels), "--store", str(store), "--report", str(report),
           "--device", args.device]
    env = {**os.environ, "SMSDL_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"channels run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    run = json.loads(report.with_suffix(".rank0.json").read_text())
    print(json.dumps(run, indent=2))
    if args.no_save:
        return
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"runs": []}
    results["channels"] = [r for r in results.get("channels", []) if r["channels"] != run["channels"]] + [run]
    RESULTS.write_text(json.dumps(results, indent=2))
    write_doc(results)
    print(f"wrote {RESULTS} and {DOC}")


def write_doc(results: dict) -> None:
    rows = sorted(results["runs"], key=lambda r: (r["mode"], r["size"], r["procs"]))
    lines = [
        "| H&E (px, 0.5 µm) | mode | processes × threads | SR grid (cells) | guide (MP) | time (s) | of which SimMIM (s) "
        "| s / H&E MP | s / H&E MP without SimMIM | peak RSS / process (MB) | above the imports (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ssl = sum(v for k, v in r.get("stages_s", {}).items() if k.startswith("self-supervised"))
        he_mp = r["size"] ** 2 / 1e6
        ssl_txt = f"{ssl:.1f}" if r["mode"] == "tiled" else "—"
        rest = f"{(r['seconds'] - ssl) / he_mp:.3f}" if r["mode"] == "tiled" else "—"
        lines.append(
            f"| {r['size']} × {r['size']} | {r['mode']} | {r['procs']} × {r['threads_per_proc']} | "
            f"{r['sr_shape'][0]} × {r['sr_shape'][1]} | {r['guide_megapixels']} | {r['seconds']} | {ssl_txt} | "
            f"{r['seconds_per_he_megapixel']:.3f} | {rest} | {r['peak_rss_mb_per_proc']:.0f} | "
            f"{r['peak_rss_mb_per_proc'] - r['rss_after_imports_mb']:.0f} |"
        )
    lines += [
        "",
        "The tiled path's memory above the imports is set by its tile sizes and stays flat as the slide grows; "
        "the in-memory path (whole pyramid level read, guide and level images in memory) grows with the slide. "
        "The tiled path's time has a fixed part (SimMIM training on bounded regions) and a part linear in the area. "
        "Both run the same extractor: the in-memory path is the guide made whole (`prepare_guide`) and then the "
        "tiled passes on it as one tile, SimMIM on the whole level images (its rows re-measured 2026-12-06 after "
        "the two extractors became one: 10.2 / 18.8 / 60.9 s against 26.2 / 42.7 / 81.8 s before on a busier "
        "machine, peak RSS within 10 %).",
        "",
        f"Synthetic H&E-like slide, JPEG-tiled 3-level OME-TIFF written tile by tile; MSI {MSI_PX_UM:g} µm, F = {FACTOR}, "
        "8 guide px per SR cell (1.5625 µm), H&E read at pyramid level 1 (1 µm). Fast-preset ViTs "
        "(embed 48, depth 2, 1 shift, 40 SimMIM steps per level), default tiling "
        "(256-cell output tiles, 512-guide-px work tiles). \"Above the imports\": peak RSS minus the RSS after importing "
        "torch, timm, SimpleITK and zarr (about 1 GB of shared libraries). CPU only, 1 torch thread per process, on the shared "
        f"2-core development machine ({results.get('machine', '')}). Timings on a busy machine vary by ±30 %.",
    ]
    if results.get("channels"):
        lines += [
            "",
            "Many channels (`reconstruct_channels`: one regression per chunk of channels, MSI read from a memmap, "
            "SR stack written block by block to zarr):",
            "",
            "| channels | MSI (px) | SR (cells) | chunk | time (s) | s / channel | MSI stack (MB) | SR stack (MB) "
            "| peak RSS (MB) | above the imports (MB) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in sorted(results["channels"], key=lambda r: r["channels"]):
            lines.append(
                f"| {r['channels']} | {r['msi_shape'][0]} × {r['msi_shape'][1]} | {r['sr_shape'][0]} × {r['sr_shape'][1]} "
                f"| {r['chunk_channels']} | {r['seconds']} | {r['seconds_per_channel']} | {r['msi_stack_mb']:.0f} "
                f"| {r['sr_stack_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] - r['rss_after_imports_mb']:.0f} |"
            )
        lines += ["", f"Regression: {results['channels'][0]['regression']}; 1 thread."]
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=20000, help="slide side in pixels (default 20000)")
    parser.add_argument("--procs", type=int, default=1, help="processes (torchrun ranks, gloo) (default 1)")
    parser.add_argument("--ssl-steps", type=int, default=40, help="SimMIM steps per ViT level (default 40)")
    parser.add_argument("--in-memory", action="store_true", help="run the in-memory path instead (small sizes only)")
    parser.add_argument("--work", default=str(HERE / "work" / "wsi"), help="folder for the slide and stores")
    parser.add_argument("--no-save", action="store_true", help="do not update the results JSON/markdown")
    parser.add_argument("--channels", type=int, default=0,
                        help="instead: reconstruct this many MSI channels (100 x 100 px, F = 4) in chunks, streamed to zarr")
    parser.add_argument("--chunk-channels", type=int, default=64, help="channels per chunk with --channels (default 64)")
    parser.add_argument("--slide-compression", default="jpeg", choices=["jpeg", "zlib"],
                        help="tile compression of the generated slide (zlib needs no imagecodecs)")
    parser.add_argument("--device", default="cpu", help="torch device for the ViTs/regression: cpu (default), cuda")
    parser.add_argument("--child-channels", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-in-memory", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--slide", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.child_in_memory:
        return child_in_memory(args)
    if args.child_channels:
        return child_channels(args)
    if args.channels:
        return run_channels(args)

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    slide = work / f"slide-{args.size}.ome.tif"
    gen_seconds = None
    if not slide.exists():
        t0 = time.perf_counter()
        write_slide(slide, args.size, compression=args.slide_compression)
        gen_seconds = time.perf_counter() - t0
        print(f"wrote {slide} ({slide.stat().st_size / 1e6:.0f} MB) in {gen_seconds:.0f} s, "
              f"generator peak RSS {_rss_mb():.0f} MB")
    run = run_one(slide, work, args.size, args.procs, args.ssl_steps, args.in_memory, args.device)
    run["slide_mb"] = round(slide.stat().st_size / 1e6, 0)
    if gen_seconds is not None:
        run["generation_seconds"] = round(gen_seconds, 1)
        run["generation_peak_rss_mb"] = round(_rss_mb(), 0)
    print(json.dumps(run, indent=2))
    if args.no_save:
        return
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"runs": []}
    results["machine"] = f"{os.cpu_count()} CPUs, torch CPU"
    results["runs"] = [r for r in results["runs"] if (r["size"], r["procs"], r["mode"]) != (run["size"], run["procs"], run["mode"])]
    results["runs"].append(run)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    write_doc(results)
    print(f"wrote {RESULTS} and {DOC}")


if __name__ == "__main__":
    main()
