"""Reconstruction quality and time: SMSDL vs bicubic vs CNN, by the benchmark protocol.

Data sets (each: ground truth at native resolution, block-averaged by F, reconstructed back):
* ``sample``: the built-in sample (H&E 2.5 µm, ground truth 10 µm), F = 4;
* ``mouse``: the real mouse-cerebellum H&E + UMAP MSI from ../shared (same field of view), F = 2, 4.
Also an ablation of the self-supervised training (same settings, ViTs left at random weights).

    python benchmarks/bench_reconstruction.py [--preset default|fast] [--only sample,mouse2,mouse4]

Writes benchmarks/results/reconstruction_<preset>.json and docs/benchmarks/reconstruction_<preset>.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
# the mouse data beside the checkout (../shared); SMSDL_SHARED_DATA points elsewhere (e.g. on a GPU machine)
SHARED = Path(os.environ.get("SMSDL_SHARED_DATA", HERE.parent.parent / "shared" / "data" / "mouse-cerebellum"))


def datasets(only: set[str]):
    from napari_smsdl.sample import make_sample

    if "sample" in only:
        s = make_sample()
        yield "sample", 4, np.where(s.mask_hr, s.ground_truth, 0), s.he_rgb, s.msi_pixel_size_um / s.factor, s.he_pixel_size_um
    if SHARED.exists() and ({"mouse2", "mouse4"} & only):
        from skimage import io as skio

        he = skio.imread(SHARED / "HE.png")[..., :3]
        truth = np.loadtxt(SHARED / "mouse_brain_umap.txt").reshape(40, 36, 3).transpose(2, 0, 1).astype(np.float32)
        # no pixel sizes are known: 1 unit per MSI pixel, the H&E spans the same field of view
        he_px = 40.0 / he.shape[0]
        for factor in (2, 4):
            if f"mouse{factor}" in only:
                yield f"mouse{factor}", factor, truth, he, 1.0, he_px


def _device_description() -> str:
    import torch

    from napari_smsdl.torch_setup import configure_threads

    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"CPU, {configure_threads()} torch thread(s) of {os.cpu_count()} cores, torch {torch.__version__}"


def main() -> None:
    from napari_smsdl.evaluation import run_benchmark
    from napari_smsdl.reconstruction import Settings

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="default", choices=["default", "fast"])
    parser.add_argument("--only", default="sample,mouse2,mouse4")
    parser.add_argument("--no-ablation", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=None,
                        help="results file stem (default reconstruction_<preset>; e.g. reconstruction_gpu on a GPU machine)")
    args = parser.parse_args()
    name_stem = args.name or f"reconstruction_{args.preset}"
    only = set(args.only.split(","))
    results = {}
    for name, factor, truth, he, truth_px, he_px in datasets(only):
        settings = Settings.preset(args.preset, factor=factor, seed=args.seed)
        t0 = time.perf_counter()
        bench = run_benchmark(truth, he, factor=factor, truth_pixel_size_um=truth_px, he_pixel_size_um=he_px, settings=settings)
        entry = {"factor": factor, "truth_shape": list(bench.truth.shape), "lr_shape": list(bench.lr.shape),
                 "wall_seconds": time.perf_counter() - t0, "metrics": bench.metrics}
        if not args.no_ablation:
            random_vit = dataclasses.replace(settings, features=dataclasses.replace(settings.features, ssl_steps=0))
            ab = run_benchmark(truth, he, factor=factor, truth_pixel_size_um=truth_px, he_pixel_size_um=he_px,
                               settings=random_vit, methods=["smsdl"])
            entry["ablation_random_vit"] = ab.metrics["smsdl"]
        results[name] = entry
        line = {m: round(v["ssim"]["mean"], 3) for m, v in bench.metrics.items()}
        print(name, "SSIM", line, f"{entry['wall_seconds']:.0f} s", flush=True)
    results["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    results["preset"] = args.preset
    results["device"] = _device_description()
    (HERE / "results").mkdir(exist_ok=True)
    out = HERE / "results" / f"{name_stem}.json"
    out.write_text(json.dumps(results, indent=2))
    lines = ["| data | F | method | RMSE ↓ | SSIM ↑ | R² ↑ | PSNR ↑ | Pearson ↑ | seconds |", "|---|---|---|---|---|---|---|---|---|"]
    for name, entry in results.items():
        if not isinstance(entry, dict):
            continue
        rows = dict(entry["metrics"])
        if "ablation_random_vit" in entry:
            rows["smsdl, random ViT (ablation)"] = entry["ablation_random_vit"]
        for method, m in rows.items():
            lines.append(
                f"| {name} | {entry['factor']} | {method} | {m['rmse']['mean']:.4f} | {m['ssim']['mean']:.4f} | "
                f"{m['r2']['mean']:.4f} | {m['psnr']['mean']:.2f} | {m['pearson']['mean']:.4f} | {m['seconds']:.1f} |"
            )
    lines.append(f"\nPreset `{args.preset}`, seed {args.seed}; peak memory {results['peak_memory_mb']:.0f} MB (whole run); "
                 f"{results['device']}.")
    md = HERE.parent / "docs" / "benchmarks" / f"{name_stem}.md"
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
