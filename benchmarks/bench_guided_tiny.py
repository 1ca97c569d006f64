"""Tiny images: 40 × 40 crops of the bladder section at F = 4 (LR 10 × 10), too small for blocked check folds.

The LR pooled by 2 is 5 × 5: at most 4 fold tiles of 3 × 3, too few for even a 3-fold scale-transfer
check on blocked folds (the cerebellum pair at F = 4, LR 10 × 9, is the same size). Two rules decide
per ion whether SMSDL uses the H&E there:

* ``per-pixel`` (the default): the scale-transfer check on single-pixel folds decides (and sets the
  blend weight); the input and the conservation are the held-out folds' choice;
* ``held-out``: no check, the held-out gain decides (the rule before the per-pixel check).

Six crops (MSI rows 0–39 / 80–119, columns 0–39 / 100–139 / 200–239 of
``../shared/data/mouse-bladder-dev``, with their optical image), seeds 0–2, the protocol of
``bench_guided.py`` (SMSDL and the control). Nothing was tuned on them. Appends one JSON line per
crop, rule and seed to ``benchmarks/results/guided_tiny/runs.jsonl`` (SMSDL − control per metric and
per ion, the ions using the H&E, what decided) and prints the summary.

    python benchmarks/bench_guided_tiny.py [--rules per-pixel,held-out] [--seeds 0,1,2] [--summary]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_guided_crops as crops  # noqa: E402

OUT = HERE / "results" / "guided_tiny" / "runs.jsonl"
CROPS = [(0, 0), (0, 100), (0, 200), (80, 0), (80, 100), (80, 200)]  # (row, column) corners, MSI pixels
CROP_SHAPE = (40, 40)
METRICS = ("rmse", "ssim", "r2")


def _held_out_rule() -> None:
    """The rule before: no check where the pooled tissue is too small for blocked folds."""
    from napari_smsdl.reconstruction import _regression

    pooling = _regression.check_pooling

    def blocked_only(mask_lr, factor, folds, *args, per_pixel=False):
        return pooling(mask_lr, factor, folds, *args)

    _regression.check_pooling = blocked_only


def run(rule: str, seed: int) -> None:
    if rule == "held-out":
        _held_out_rule()
    for (r0, c0), s, c in crops.crop_benchmarks(seed, CROPS, CROP_SHAPE):
        out = {"rule": rule, "seed": seed, "crop": [r0, c0],
               **{m: s[m]["mean"] - c[m]["mean"] for m in METRICS},
               "used": int(sum(s["guidance"]["used_histology"])), "decided_by": s["guidance"].get("decided_by"),
               "per_channel": {m: np.subtract(s[m]["per_channel"], c[m]["per_channel"]).tolist() for m in METRICS}}
        crops.append_run(OUT, out, "per_channel")


def summary() -> list[str]:
    runs = [json.loads(line) for line in OUT.read_text().splitlines()]
    lines = ["| rule | SMSDL − control: RMSE | SSIM | R² | ions with histology (of 20) | worst crop R² "
             "| ion decisions worse than the control on R² by > 0.01 | runs |", "|---|---|---|---|---|---|---|---|"]
    for rule in ("per-pixel", "held-out"):
        mine = [r for r in runs if r["rule"] == rule]
        if not mine:
            continue
        # per seed: the mean over the crops; then mean ± std over seeds
        seeds = sorted({r["seed"] for r in mine})
        per_seed = {m: [np.mean([r[m] for r in mine if r["seed"] == s]) for s in seeds] for m in METRICS}
        cells = [f"{np.mean(v):+.4f} ± {np.std(v, ddof=1) if len(v) > 1 else 0:.4f}" for v in per_seed.values()]
        worst = min(np.mean([r["r2"] for r in mine if r["crop"] == list(cr)]) for cr in CROPS
                    if any(r["crop"] == list(cr) for r in mine))
        bad = sum(int((np.asarray(r["per_channel"]["r2"]) < -0.01).sum()) for r in mine)
        n_dec = sum(len(r["per_channel"]["r2"]) for r in mine)
        lines.append(f"| {rule} | " + " | ".join(cells) + f" | {np.mean([r['used'] for r in mine]):.1f} | "
                     f"{worst:+.4f} | {bad} of {n_dec} | {len(mine)} ({len(seeds)} seeds × {len(mine) // len(seeds)} crops) |")
    return lines


def main(argv=None) -> int:
    return crops.cli(argv, __doc__.splitlines()[0], "per-pixel,held-out", run, summary)


if __name__ == "__main__":
    raise SystemExit(main())
