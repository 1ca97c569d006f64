"""The bladder section cut in two halves, as cases nothing was tuned on: SMSDL vs the H&E-free control per ion.

The left half (MSI columns 0–121) and the right half (122–243) of ``../shared/data/mouse-bladder-dev``,
each with its optical image, at F = 2 and 4 (LR 62 × 61 / 31 × 30; the scale-transfer check pools
the LR by 2 at every F, 5 folds here), seeds 0–2, the protocol of
``bench_guided.py`` (SMSDL, the control and bicubic only). Writes
``benchmarks/results/guided_halves/<case>_s<seed>.json`` (skipped when there) and prints, per case,
SMSDL − control (mean ± std over seeds), the ions using the H&E and how many ions fall below the
control by more than their seed spread.

    python benchmarks/bench_guided_halves.py [--only bladderleft4,bladderright4,bladderleft2,bladderright2]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_guided as guided  # noqa: E402

OUT = HERE / "results" / "guided_halves"
HALF_COLS = 122  # of 244 MSI columns; 4 optical columns per MSI column
_load_whole = guided.load_case  # main() points guided.load_case at load_half, which reads through this


def load_half(name: str):
    truth, he, factor, truth_px, he_px, names = _load_whole("bladder" + name[-1])
    k = he.shape[1] // truth.shape[2]
    if "left" in name:
        return truth[:, :, :HALF_COLS], he[:, : HALF_COLS * k], factor, truth_px, he_px, names
    return truth[:, :, HALF_COLS:], he[:, HALF_COLS * k :], factor, truth_px, he_px, names


def summarise(entries: list[dict]) -> str:
    parts = []
    for key in ("rmse", "ssim", "r2"):
        s = np.array([e["metrics"]["smsdl"][key]["per_channel"] for e in entries])
        c = np.array([e["metrics"]["backprojection"][key]["per_channel"] for e in entries])
        d = (s - c).mean(axis=1)
        better = -(s - c).mean(axis=0) if key == "rmse" else (s - c).mean(axis=0)
        below = int((better < -s.std(axis=0) - 1e-12).sum())
        parts.append(f"{key} {d.mean():+.4f} ± {d.std():.4f} ({below} ions below their seed spread)")
    used = np.mean([sum(e["metrics"]["smsdl"]["guidance"]["used_histology"]) for e in entries])
    return f"H&E used on {used:.1f} ions; " + "; ".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="bladderleft4,bladderright4,bladderleft2,bladderright2")
    args = parser.parse_args(argv)
    if not (guided.SHARED / "mouse-bladder-dev").exists():
        print("skipped: the bladder data set is absent")
        return 0
    guided.load_case = load_half  # run_case reads its case through this
    OUT.mkdir(parents=True, exist_ok=True)
    for name in args.only.split(","):
        entries = []
        for seed in (0, 1, 2):
            path = OUT / f"{name}_s{seed}.json"
            if not path.exists():
                entry = guided.run_case(name, seed, ["smsdl", "backprojection", "bicubic"], False)
                path.write_text(json.dumps(entry, default=float))
            entries.append(json.loads(path.read_text()))
        print(f"{name}: SMSDL − control: {summarise(entries)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
