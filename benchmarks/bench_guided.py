"""Does the histology earn its keep? SMSDL vs bicubic, the H&E-free control and the CNN, seeds 0–2.

Data sets (ground truth at native resolution, block-averaged by F, reconstructed back, scored on
tissue): the real bladder ion images (``../shared/data/mouse-bladder-dev``: 20 noisy AP-SMALDI ion
images + the optical image of the section) and the real mouse-cerebellum pair (UMAP summary) at
F = 2 and 4, and the built-in sample at F = 4; since 2026-12-07 both real pairs at F = 3 too, a
factor no setting or rule was developed on (the case name's last digit is F), and ``bladderfive3``:
five of the bladder ions fitted on their own at F = 3 (:data:`FIVE_IONS`). Every case runs for
seeds 0, 1 and 2 (one seed drives the ViT training, the folds and the networks), so a difference
can be read against the seed spread. On every case the features are also ablated: SMSDL trained on the same fold
design with colour-only features (each SR cell's mean colour) and with ViTs left at random weights.

Each (case, seed) is written to ``benchmarks/results/guided/<case>_s<seed>.json`` as soon as it is
done and skipped when already there (delete a file to re-run it); ``--report`` only aggregates
them into ``benchmarks/results/guided.json`` and ``docs/benchmarks/guided.md``.

    python benchmarks/bench_guided.py [--only bladder4,bladder2,bladder3,mouse4,mouse2,mouse3,sample4] [--seeds 0,1,2]
                                      [--methods smsdl,bicubic,backprojection,cnn] [--no-ablation] [--merge] [--report]

``--merge --methods ""`` re-runs only the feature ablations into the existing case files.

The fallback study (``--forced``): SMSDL with the histology forced on every channel and the control,
per channel, with both ground-truth-free gains (held-out, scale transfer), written to
``benchmarks/results/guided/forced/<case>_s<seed>.json``; ``--rules`` then scores fallback rules
offline against the true per-channel gain (1 − MSE(SMSDL forced) / MSE(control) on the truth).

The uncertainty study (``--uncertainty [--seeds 0]``): Spearman(uncertainty, |error|) on tissue of
SMSDL's map and of variants re-combined from the same fit's inputs (each part alone, unit
weights, another calibration, a model-free map), written to
``benchmarks/results/guided/uncertainty/<case>_s<seed>.json``; ``--report`` adds their table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("SMSDL_SHARED_DATA", HERE.parent.parent / "shared" / "data"))
OUT = HERE / "results" / "guided"
METRICS = ("rmse", "ssim", "r2")
#: the bladder ions of the ``bladderfive<F>`` cases: the five a first try of the CLI at F = 3 picked (every
#: fourth, from the third), where the held-out veto was found
FIVE_IONS = (2, 7, 11, 15, 18)
LABELS = {"smsdl": "SMSDL", "bicubic": "bicubic", "backprojection": "H&E-free control", "cnn": "CNN",
          "smsdl_colour": "SMSDL, colour-only features", "smsdl_random_vit": "SMSDL, random ViT"}


def load_case(name: str):
    """(truth (C, H, W), H&E RGB, F, truth pixel µm, H&E pixel µm, channel names) of a case."""
    factor = int(name[-1])
    if name.startswith("bladder"):
        from skimage import io as skio

        d = SHARED / "mouse-bladder-dev"
        truth = np.load(d / "ions.npy").astype(np.float32)
        names = [str(m) for m in json.loads((d / "channels.json").read_text())]
        if name.startswith("bladderfive"):  # five ions fitted on their own (the network is shared across channels)
            truth, names = truth[list(FIVE_IONS)], [names[i] for i in FIVE_IONS]
        return truth, skio.imread(d / "optical.png")[..., :3], factor, 10.0, 2.5, names
    if name.startswith("mouse"):
        from skimage import io as skio

        d = SHARED / "mouse-cerebellum"
        he = skio.imread(d / "HE.png")[..., :3]
        truth = np.loadtxt(d / "mouse_brain_umap.txt").reshape(40, 36, 3).transpose(2, 0, 1).astype(np.float32)
        return truth, he, factor, 1.0, 40.0 / he.shape[0], ["UMAP 1", "UMAP 2", "UMAP 3"]
    from napari_smsdl.sample import make_sample

    s = make_sample()
    truth = np.where(s.mask_hr, s.ground_truth, 0).astype(np.float32)
    return truth, s.he_rgb, factor, s.msi_pixel_size_um / s.factor, s.he_pixel_size_um, list(s.channel_names)


def run_case(name: str, seed: int, methods: list[str], ablation: bool) -> dict:
    import torch

    from napari_smsdl.evaluation import run_benchmark, score_stack
    from napari_smsdl.features import extract_features
    from napari_smsdl.reconstruction import Settings, prepare_guide, train_regression

    truth, he, factor, truth_px, he_px, names = load_case(name)
    settings = Settings.preset("default", factor=factor, seed=seed)
    cache = OUT / "cache"
    t0 = time.perf_counter()
    # methods=[] with ablation: only the ablation variants (re-run after a change to the regression)
    bench = run_benchmark(truth, he, factor=factor, truth_pixel_size_um=truth_px, he_pixel_size_um=he_px,
                          settings=settings, methods=methods or ["backprojection"], cache_dir=cache, refine=False)
    if not methods:
        bench.metrics.clear()
    entry = {"case": name, "seed": seed, "factor": factor, "channels": names, "truth_shape": list(bench.truth.shape),
             "lr_shape": list(bench.lr.shape), "wall_seconds": time.perf_counter() - t0, "metrics": bench.metrics,
             "device": "cuda" if torch.cuda.is_available() else "cpu", "torch_threads": torch.get_num_threads()}
    if ablation:
        lr, mask_lr, mask_hr = bench.lr, bench.mask_lr, bench.mask_hr
        guide, _ = prepare_guide(he, he_pixel_size_um=he_px, msi_shape=lr.shape[1:], msi_pixel_size_um=truth_px * factor,
                                 factor=factor, max_cell_px=settings.max_cell_px)
        sr_shape = (lr.shape[1] * factor, lr.shape[2] * factor)
        fm = extract_features(guide, sr_shape=sr_shape, factor=factor, params=settings.features, cache_dir=cache)
        variants = {"smsdl_colour": fm.data[-3:]}  # the last 3 features are each SR cell's mean colour
        random_params = dataclasses.replace(settings.features, ssl_steps=0)
        variants["smsdl_random_vit"] = extract_features(guide, sr_shape=sr_shape, factor=factor, params=random_params,
                                                        cache_dir=cache).data
        for key, feats in variants.items():
            t1 = time.perf_counter()
            result = train_regression(feats, lr, factor, mask_lr=mask_lr, params=settings.regression)
            entry["metrics"][key] = {**score_stack(bench.truth, result.sr, mask_hr), "seconds": time.perf_counter() - t1,
                                     "guidance": result.guidance.to_dict()}
    return entry


def run_forced(name: str, seed: int) -> dict:
    """SMSDL forced on every channel vs the control, with the per-channel gains of both checks."""
    from napari_smsdl.evaluation import run_benchmark
    from napari_smsdl.reconstruction import Settings

    truth, he, factor, truth_px, he_px, names = load_case(name)
    settings = Settings.preset("default", factor=factor, seed=seed)
    settings = dataclasses.replace(settings, regression=dataclasses.replace(settings.regression, fallback=False))
    t0 = time.perf_counter()
    bench = run_benchmark(truth, he, factor=factor, truth_pixel_size_um=truth_px, he_pixel_size_um=he_px,
                          settings=settings, methods=["smsdl", "backprojection"], cache_dir=OUT / "cache", refine=False)
    s, c = bench.metrics["smsdl"], bench.metrics["backprojection"]
    ch = s["choices"]
    return {"case": name, "seed": seed, "factor": factor, "channels": names, "wall_seconds": time.perf_counter() - t0,
            "smsdl_seconds": s["seconds"], "forced": {k: s[k]["per_channel"] for k in METRICS},
            "control": {k: c[k]["per_channel"] for k in METRICS}, "guidance": s["guidance"],
            "held_out_clear": [bool(g - 2.0 * sd / np.sqrt(ch["folds"]) > 0)
                               for g, sd in zip(s["guidance"]["gain"], s["guidance"]["gain_std"])],
            "held_out_negative": [bool(g + 2.0 * sd / np.sqrt(ch["folds"]) < 0)
                                  for g, sd in zip(s["guidance"]["gain"], s["guidance"]["gain_std"])],
            "scale_transfer": ch.get("scale_transfer"), "gain_over_control": ch["gain_over_control"],
            "uncertainty_spearman": s["uncertainty_spearman"]}


def uncertainty_study(name: str, seed: int) -> dict:
    """Spearman(uncertainty, |error|) per channel of SMSDL's map and of variants built from the same inputs.

    The SMSDL fit runs once (as in the benchmark); its uncertainty inputs (SR, fold spread, LR) are
    caught on the way and re-combined: each part alone, the unit weights (spread ⊕ noise, the map
    before the calibration), the calibrated map without the histology part (no features), and a
    model-free map (the LR 3 × 3 spread). Written to
    ``benchmarks/results/guided/uncertainty/<case>_s<seed>.json``.
    """
    from scipy.ndimage import uniform_filter

    from napari_smsdl.evaluation import degrade
    from napari_smsdl.evaluation._benchmark import uncertainty_rank_correlation
    from napari_smsdl.features import extract_features
    from napari_smsdl.io import tissue_mask
    from napari_smsdl.reconstruction import (
        Settings,
        _regression,
        _uncertainty,
        prepare_guide,
        train_regression,
    )

    truth, he, factor, truth_px, he_px, names = load_case(name)
    settings = Settings.preset("default", factor=factor, seed=seed)
    mask_hr = tissue_mask(truth)  # as run_benchmark
    rows, cols = (truth.shape[1] // factor) * factor, (truth.shape[2] // factor) * factor
    he = he[: int(round(he.shape[0] * rows / truth.shape[1])), : int(round(he.shape[1] * cols / truth.shape[2]))]
    truth, mask_hr = truth[:, :rows, :cols], mask_hr[:rows, :cols]
    lr, mask_lr = degrade(truth, mask_hr, factor)
    guide, _ = prepare_guide(he, he_pixel_size_um=he_px, msi_shape=lr.shape[1:], msi_pixel_size_um=truth_px * factor,
                             factor=factor, max_cell_px=settings.max_cell_px)
    fm = extract_features(guide, sr_shape=(rows, cols), factor=factor, params=settings.features, cache_dir=OUT / "cache")
    caught = {}
    original = _regression.uncertainty_map

    def catch(sr, spread, lr_, mask_lr_, factor_, **kw):
        caught.update(sr=np.asarray(sr, np.float64), spread=np.asarray(spread, np.float64), kw=kw)
        return original(sr, spread, lr_, mask_lr_, factor_, **kw)

    _regression.uncertainty_map = catch
    try:
        result = train_regression(fm.data, lr, factor, mask_lr=mask_lr, params=settings.regression)
    finally:
        _regression.uncertainty_map = original
    truth_clean = np.where(mask_hr[None], np.nan_to_num(truth), 0.0)
    sr, spread, kw = caught["sr"], caught["spread"], caught["kw"]
    lr64 = np.nan_to_num(lr).astype(np.float64)
    coef = _uncertainty.noise_variance_model(lr64, mask_lr)
    grid = np.asarray(kw["features"]).reshape(-1, *sr.shape[1:])
    mask_sr = np.repeat(np.repeat(mask_lr, factor, 0), factor, 1)
    parts = _uncertainty._parts(sr, spread, coef, factor, factor,
                                _uncertainty.histology_variation(grid, factor, mask_sr))

    def score(var):
        return uncertainty_rank_correlation(np.sqrt(var), result.sr, truth_clean, mask_hr)

    out = {"calibrated (the map)": uncertainty_rank_correlation(result.uncertainty, result.sr, truth_clean, mask_hr)}
    for i, part in enumerate(_uncertainty.PARTS):
        out[f"{part} alone"] = score(parts[i])
    out["unit weights (spread + noise)"] = score(parts[0] + parts[1])
    # the map as it was before the histology part: the same calibration without the features
    w3 = _uncertainty.calibrate(lr64, mask_lr, coef, folds=kw["folds"], seed=kw["seed"]).weights
    out["calibrated, without the histology part"] = score(np.einsum("cp,pchw->chw", w3, parts))
    # for comparison: the local spread of the measurement itself (no model at all)
    grad = np.stack([np.sqrt(np.maximum(uniform_filter(c ** 2, 3) - uniform_filter(c, 3) ** 2, 0)) for c in lr])
    out["LR local spread (no model)"] = uncertainty_rank_correlation(np.repeat(np.repeat(grad, factor, 1), factor, 2),
                                                                     result.sr, truth_clean, mask_hr)
    for k, v in out.items():
        print(f"{name} s{seed} {k:>32}: {v['mean']:+.3f}  per channel " + " ".join(f"{x:+.2f}" for x in v["per_channel"]))
    entry = {"case": name, "seed": seed, "factor": factor, "spearman": out,
             "calibration": result.choices["uncertainty"]}
    (OUT / "uncertainty").mkdir(parents=True, exist_ok=True)
    (OUT / "uncertainty" / f"{name}_s{seed}.json").write_text(json.dumps(entry, indent=1))
    return entry


def uncertainty_table() -> list[str]:
    """Markdown: per case and variant, Spearman mean over channels (mean ± std over seeds) and the lowest channel."""
    entries = [json.loads(f.read_text()) for f in sorted((OUT / "uncertainty").glob("*_s*.json"))]
    if not entries:
        return []
    cases = sorted({e["case"] for e in entries}, key=lambda c: (c[:-1], c[-1]))
    variants = list(dict.fromkeys("calibrated on k" if k.startswith("calibrated on k") else k
                                  for e in entries for k in e["spearman"]))
    lines = ["| variant | " + " | ".join(f"{c[:-1]} F={c[-1]}" for c in cases) + " |", "|---" * (len(cases) + 1) + "|"]
    for v in variants:
        cells = []
        for c in cases:
            vals = [(e["spearman"][k]["mean"], np.nanmin(np.array(e["spearman"][k]["per_channel"], float))
                     if np.isfinite(e["spearman"][k]["per_channel"]).any() else np.nan) for e in entries if e["case"] == c
                    for k in e["spearman"] if k == v or (v == "calibrated on k" and k.startswith(v))]
            if not vals:
                cells.append("—")
                continue
            m, lo = np.array(vals, float).T
            if not np.isfinite(m).any():
                cells.append("constant map")
                continue
            cells.append(f"{m.mean():.2f} ± {m.std(ddof=1) if len(m) > 1 else 0:.2f} (min {lo.min():.2f}; {len(m)} seeds)")
        label = "calibrated on every k ≤ F with an interior pooled pixel" if v == "calibrated on k" else v
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


#: fallback rules scored offline: (held-out clearly positive, scale clearly positive or None) → use
RULES = {  # (held-out gain clearly positive, scale gain clearly positive or None, held-out gain clearly negative)
    "held-out only": lambda h, sc, neg: h,
    "scale only (held-out where absent)": lambda h, sc, neg: h if sc is None else sc,
    "scale unless the held-out gain is clearly negative (the default)":
        lambda h, sc, neg: h if sc is None else sc & ~neg,
    "both (held-out where absent)": lambda h, sc, neg: h if sc is None else h & sc,
    "either (held-out where absent)": lambda h, sc, neg: h if sc is None else h | sc,
}


def _held_out_negative(entry: dict) -> np.ndarray:
    """Per channel: the held-out gain is clearly negative (recorded since the veto; else from the gains and
    the default preset's folds, which every forced run used)."""
    if "held_out_negative" in entry:
        return np.array(entry["held_out_negative"], bool)
    from napari_smsdl.reconstruction import Settings

    folds = Settings.preset("default", factor=entry["factor"]).regression.folds
    g = entry["guidance"]
    return np.asarray(g["gain"]) + 2.0 * np.asarray(g["gain_std"]) / np.sqrt(folds) < 0


def rules() -> list[str]:
    """Per rule: agreement with the true per-channel gain's sign, and the margin over the control."""
    files = sorted((OUT / "forced").glob("*_s*.json"))
    entries = [json.loads(f.read_text()) for f in files]
    print(f"{len(entries)} forced runs: " + ", ".join(f"{e['case']}_s{e['seed']}" for e in entries))
    for e in entries:
        st = e["scale_transfer"] or {}
        true = 1 - np.square(e["forced"]["rmse"]) / np.square(e["control"]["rmse"])
        print(f"\n{e['case']} s{e['seed']}: smsdl {e['smsdl_seconds']:.0f} s, scale check "
              f"{st.get('seconds', float('nan')):.1f} s ({'available' if st.get('available') else st.get('reason')})")
        g = e["guidance"]
        for i, name in enumerate(e["channels"]):
            sg = f"{g['scale_gain'][i]:+.3f} ± {g['scale_gain_std'][i]:.3f}" if "scale_gain" in g else "—"
            print(f"  {name[:12]:>12}: true {true[i]:+.4f} (dSSIM {e['forced']['ssim'][i] - e['control']['ssim'][i]:+.4f})"
                  f" | held-out {g['gain'][i]:+.3f} ± {g['gain_std'][i]:.3f} | scale {sg}")
    lines = rules_table(entries)
    print("\n" + "\n".join(lines))
    return lines


def rules_table(entries: list) -> list[str]:
    """Markdown: per rule and case, agreement with the true sign and the margin over the control (seeds)."""
    lines = ["| rule | data | F | seeds | agrees with the true sign | wrongly uses | wrongly falls back | "
             "SMSDL − control: RMSE | SSIM | R² | channels with histology |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    cases = sorted({e["case"] for e in entries}, key=lambda c: (c[:-1], c[-1]))
    for rule, f in RULES.items():
        for case in cases:
            agree = total = wrong_use = wrong_back = 0
            margins, used = [], []
            group = sorted((e for e in entries if e["case"] == case), key=lambda e: e["seed"])
            for e in group:
                h = np.array(e["held_out_clear"], bool)
                st = e["scale_transfer"] or {}
                use = f(h, np.array(st["clearly_positive"], bool) if st.get("available") else None,
                        _held_out_negative(e))
                true = 1 - np.square(e["forced"]["rmse"]) / np.square(e["control"]["rmse"]) > 0
                agree += int((use == true).sum())
                wrong_use += int((use & ~true).sum())
                wrong_back += int((~use & true).sum())
                total += len(use)
                margins.append([np.mean(np.where(use, e["forced"][k], e["control"][k])) - np.mean(e["control"][k])
                                for k in METRICS])
                used.append(int(use.sum()))
            m = np.array(margins)
            sd = m.std(0, ddof=1) if len(m) > 1 else np.zeros(3)
            lines.append(f"| {rule} | {case[:-1]} | {case[-1]} | {len(group)} | {agree}/{total} | {wrong_use} | {wrong_back} | "
                         + " | ".join(f"{m[:, k].mean():+.4f} ± {sd[k]:.4f}" for k in range(3))
                         + f" | {np.mean(used):.1f} of {len(true)} |")
    return lines


def _mean_std(values) -> tuple[float, float]:
    a = np.asarray(values, float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def _study_spearman(case: str, seed: int) -> dict | None:
    """The current map's Spearman from ``--uncertainty`` (None where the study has not run for that seed)."""
    path = OUT / "uncertainty" / f"{case}_s{seed}.json"
    return json.loads(path.read_text())["spearman"]["calibrated (the map)"] if path.exists() else None


def report() -> dict:
    """Aggregate every case file: mean ± std over seeds per method, margins over the control."""
    by_case: dict = {}
    for f in sorted(OUT.glob("*_s*.json")):
        e = json.loads(f.read_text())
        by_case.setdefault(e["case"], []).append(e)
    summary: dict = {}
    lines = ["| data | F | method | RMSE ↓ | SSIM ↑ | R² ↑ | seconds | seeds |", "|---|---|---|---|---|---|---|---|"]
    margins = ["| data | F | SMSDL − control: RMSE | SSIM | R² | channels with histology | worst channel ΔSSIM (seed spread) "
               "| channels worse than the control by more than their seed spread: RMSE / SSIM / R² "
               "| Spearman(unc., \\|err\\|), from --uncertainty where it ran |", "|---|---|---|---|---|---|---|---|---|"]
    for case, entries in sorted(by_case.items(), key=lambda kv: (kv[0][:-1], kv[0][-1])):
        entries.sort(key=lambda e: e["seed"])
        factor = entries[0]["factor"]
        methods = [m for m in LABELS if all(m in e["metrics"] for e in entries)]
        summary[case] = {"factor": factor, "seeds": [e["seed"] for e in entries], "methods": {},
                         # SMSDL re-run alone after a change: its ablation rows are from the run before
                         "smsdl_rerun": sorted({e["smsdl_rerun"] for e in entries if "smsdl_rerun" in e})}
        for m in methods:
            stats = {k: _mean_std([e["metrics"][m][k]["mean"] for e in entries]) for k in METRICS}
            stats["seconds"] = _mean_std([e["metrics"][m]["seconds"] for e in entries])
            summary[case]["methods"][m] = stats
            lines.append(f"| {case[:-1]} | {factor} | {LABELS[m]} | " + " | ".join(
                f"{stats[k][0]:.4f} ± {stats[k][1]:.4f}" for k in METRICS) + f" | {stats['seconds'][0]:.0f} | {len(entries)} |")
        if "smsdl" in methods and "backprojection" in methods:
            d = {k: _mean_std([e["metrics"]["smsdl"][k]["mean"] - e["metrics"]["backprojection"][k]["mean"] for e in entries])
                 for k in METRICS}
            # per metric, the channel furthest below the control and those below by more than their seed
            # spread: a channel may tie on SSIM and lose on RMSE and R² (worse = higher RMSE)
            worse_by = {}
            for k in METRICS:
                sign = 1.0 if k == "rmse" else -1.0
                delta = np.array([np.subtract(e["metrics"]["smsdl"][k]["per_channel"],
                                              e["metrics"]["backprojection"][k]["per_channel"]) for e in entries]).mean(0)
                k_spread = np.array([e["metrics"]["smsdl"][k]["per_channel"] for e in entries]).std(0, ddof=1) \
                    if len(entries) > 1 else np.zeros(delta.shape[0])
                k_worst = int(np.argmax(sign * delta))
                worse_by[k] = {"index": k_worst, "delta": float(delta[k_worst]), "seed_spread": float(k_spread[k_worst]),
                               "channels_below_spread": [int(i) for i in np.flatnonzero(sign * delta > k_spread)]}
            n_channels = delta.shape[0]
            used = [sum(e["metrics"]["smsdl"]["guidance"]["used_histology"]) for e in entries]
            # the uncertainty study refits the same SMSDL (same settings and seed) and scores the same map: where
            # it ran after the benchmark rows, its numbers are the current map's (the SR does not depend on it)
            spearman = [_study_spearman(e["case"], e["seed"]) or e["metrics"]["smsdl"]["uncertainty_spearman"]
                        for e in entries]
            rho = [s_["mean"] for s_ in spearman]
            rho_min = min(min(s_["per_channel"]) for s_ in spearman)
            ssim_worst = worse_by["ssim"]
            below = len(ssim_worst["channels_below_spread"])
            summary[case]["margin_over_control"] = {k: d[k] for k in METRICS}
            summary[case]["worst_channel"] = {"index": ssim_worst["index"], "delta_ssim": ssim_worst["delta"],
                                              "seed_spread": ssim_worst["seed_spread"], "channels_below_spread": below}
            summary[case]["worst_channel_by_metric"] = worse_by
            summary[case]["used_histology"] = used
            summary[case]["uncertainty_spearman"] = {"mean": _mean_std(rho), "min_channel": rho_min}
            margins.append(
                f"| {case[:-1]} | {factor} | {d['rmse'][0]:+.4f} ± {d['rmse'][1]:.4f} | {d['ssim'][0]:+.4f} ± {d['ssim'][1]:.4f} | "
                f"{d['r2'][0]:+.4f} ± {d['r2'][1]:.4f} | {np.mean(used):.1f} of {n_channels} | "
                f"{ssim_worst['delta']:+.4f} ({ssim_worst['seed_spread']:.4f}); {below} below spread | "
                + " / ".join(str(len(worse_by[k]["channels_below_spread"])) for k in METRICS)
                + f" (worst R² {worse_by['r2']['delta']:+.4f}, spread {worse_by['r2']['seed_spread']:.4f}) | "
                f"{np.mean(rho):.2f} (min channel {rho_min:.2f}) |")
    (HERE / "results" / "guided.json").write_text(json.dumps(summary, indent=2))
    md = HERE.parent / "docs" / "benchmarks" / "guided.md"
    md.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + "\n\nMargins over the H&E-free control (mean ± std over seeds):\n\n" + "\n".join(margins) + "\n"
    unc = uncertainty_table()
    if unc:
        text += ("\nUncertainty variants, Spearman(uncertainty, |error|) on tissue, mean over channels (mean ± std "
                 "over seeds; lowest channel of any seed), all from one SMSDL fit per case and seed "
                 "(`bench_guided.py --uncertainty`):\n\n" + "\n".join(unc) + "\n")
    forced = [json.loads(f.read_text()) for f in sorted((OUT / "forced").glob("*_s*.json"))]
    if forced:
        text += ("\nPer-channel fallback rules, scored against the true per-channel gain (SMSDL forced on every "
                 "channel vs the control, on the ground truth; `bench_guided.py --forced`, then `--rules`). "
                 "Held-out / scale: that gain more than two standard errors above zero; \"where absent\": the "
                 "held-out gain where the LR is too small for any scale-transfer check (none of these cases since the "
                 "check runs on single-pixel folds where blocked ones are too few: the cerebellum at F = 4). "
                 "Margins mean ± std over seeds:\n\n" + "\n".join(rules_table(forced)) + "\n")
    md.write_text(text)
    print(md.read_text())
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="bladder4,bladder2,bladder3,mouse4,mouse2,mouse3,sample4")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default="smsdl,bicubic,backprojection,cnn")
    parser.add_argument("--no-ablation", action="store_true")
    parser.add_argument("--report", action="store_true", help="only aggregate the case files")
    parser.add_argument("--forced", action="store_true", help="the fallback study: SMSDL forced vs the control")
    parser.add_argument("--uncertainty", action="store_true", help="Spearman of uncertainty variants vs |error|")
    parser.add_argument("--rules", action="store_true", help="only score fallback rules on the --forced results")
    parser.add_argument("--merge", action="store_true",
                        help="run only --methods on cases already written and merge them in (e.g. a changed CNN)")
    args = parser.parse_args()
    if args.rules:
        return rules()
    if args.uncertainty:
        from napari_smsdl.torch_setup import configure_threads

        configure_threads()
        for seed in args.seeds.split(","):
            for case in args.only.split(","):
                if (OUT / "uncertainty" / f"{case}_s{seed}.json").exists():
                    continue
                uncertainty_study(case, int(seed))
        print("\n".join(uncertainty_table()))
        return None
    if args.forced:
        from napari_smsdl.torch_setup import configure_threads

        configure_threads()
        (OUT / "forced").mkdir(parents=True, exist_ok=True)
        for seed in (int(s) for s in args.seeds.split(",")):
            for case in args.only.split(","):
                path = OUT / "forced" / f"{case}_s{seed}.json"
                if path.exists() or (case.startswith(("bladder", "mouse")) and not SHARED.exists()):
                    continue
                entry = run_forced(case, seed)
                path.write_text(json.dumps(entry, indent=1))
                print(case, seed, f"{entry['wall_seconds']:.0f} s", flush=True)
        return rules()
    if not args.report:
        from napari_smsdl.torch_setup import configure_threads

        configure_threads()
        OUT.mkdir(parents=True, exist_ok=True)
        methods = [m for m in args.methods.split(",") if m]
        for seed in (int(s) for s in args.seeds.split(",")):
            for case in args.only.split(","):
                path = OUT / f"{case}_s{seed}.json"
                if path.exists() != args.merge:
                    continue
                if case.startswith(("bladder", "mouse")) and not SHARED.exists():
                    print(f"{case}: {SHARED} is absent, skipped")
                    continue
                entry = run_case(case, seed, methods, ablation=(not args.merge or not methods) and not args.no_ablation)
                if args.merge:
                    old = json.loads(path.read_text())
                    old["metrics"].update(entry["metrics"])
                    if not methods:  # the ablations re-run beside the SMSDL row as it is now: like for like again
                        old.pop("smsdl_rerun", None)
                    entry = old
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(entry, indent=1))
                tmp.replace(path)
                print(case, seed, {m: round(v["ssim"]["mean"], 4) for m, v in entry["metrics"].items()},
                      f"{entry['wall_seconds']:.0f} s", flush=True)
    report()


if __name__ == "__main__":
    main()
