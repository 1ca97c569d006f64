"""How much could ANY H&E-feature method gain over the H&E-free control? Oracle ceilings, seeds 0–2.

SMSDL's margin over the H&E-free control (bicubic + exact back-projection to the measured block
means, ``bench_guided.py``) is small on the real bladder ions. This benchmark asks whether a better
method could do much better with the same features, or whether the detail the control misses is not
in the histology at all. Per case and seed, on the protocol of ``bench_guided.py`` (truth
block-averaged by F, scored on tissue with :func:`napari_smsdl.evaluation.score_stack`):

1. **control**: the H&E-free control's scores.
2. **detail statistics**: the detail the control misses, ``truth − control`` on tissue: its share of
   the truth variance and its lag-1 spatial correlation (mean of the row and column lags), mean over
   channels. A white detail (lag-1 ≈ 0) is pixel noise, which no guide can predict.
3. **oracle ceilings**: models fitted to that detail *on the ground truth* (what no real method
   has), cross-validated by image halves (fit on the left half, predict the right, and vice versa),
   then made exactly consistent with the block means like every method here:
   (a) ridge on the ViT features, (b) ridge on colour only (each SR cell's mean colour, the last 3
   features), both on standardised features with each F × F block's mean removed (the block mean is
   fixed by the measurement; only within-block detail is free), the ridge penalty per channel chosen
   on an inner split of the training half only; (c) gradient boosting on 30 principal components
   of the ViT features + the bicubic value + the sub-pixel position, early-stopped on a split of the
   training half; (d) ridge on the ViT features as (a) but cross-fitted on a checkerboard of
   tiles (``TILE_LR`` LR pixels a side, two ViT tokens), so that a region found in one image half
   only (the sample's stroma ion) is in both folds; (e) as (d) with the control's own within-block
   detail as one more, unpenalised regressor, fitted to the truth's within-block detail: the
   features may then replace the bicubic detail instead of only adding to it (SMSDL replaces it);
   (f) as (e) without the features (one scale of the control's detail per channel, no H&E): the
   part of (e)'s gain that needs no histology.
   An oracle that barely beats the control bounds what the features can add.
4. **CNN, real guide vs blank guide**: the CNN baseline (``run_cnn``) with SMSDL's guide and with a
   constant guide of the same mean, the same settings and a fixed iteration count (no wall-clock
   budget, so the result does not depend on machine load), exact conservation. If the blank guide
   scores as well, the CNN's gain is a learned H&E-free interpolation, not the histology.

The ViT features are those of ``bench_guided.py`` for the same seed (its cache,
``benchmarks/results/guided/cache``); SMSDL's own scores are read from its case files
``benchmarks/results/guided/<case>_s<seed>.json`` (re-read by ``--report``, so a re-run of
``bench_guided.py`` is picked up without re-running the oracles). Each (case, seed) is written to
``benchmarks/results/ceiling/<case>_s<seed>.json`` and skipped when already there (``--cnn``
adds the CNN pair to files that lack it); ``--report`` only aggregates them into
``benchmarks/results/ceiling.json`` and ``docs/benchmarks/ceiling.md``.

    python benchmarks/bench_ceiling.py [--only mouse4,mouse2,sample4,bladder4,bladder2] [--seeds 0,1,2]
                                       [--cnn mouse4,mouse2,bladder4] [--cnn-iterations 150] [--report]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_guided import OUT as GUIDED
from bench_guided import SHARED, load_case

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "ceiling"
METRICS = ("rmse", "ssim", "r2")
ALPHAS = 10.0 ** np.arange(-1, 6)  # ridge penalties tried on the inner split (features standardised)
ORACLES = {"oracle_ridge_vit": "oracle: ridge on ViT features", "oracle_ridge_colour": "oracle: ridge on colour",
           "oracle_gbm_vit": "oracle: boosting on ViT PCs + bicubic + position",
           "oracle_ridge_vit_tiles": "oracle: ridge on ViT features, checkerboard folds",
           "oracle_ridge_vit_free_tiles": "oracle: ridge on ViT features + the control's detail, checkerboard folds",
           "oracle_control_scale_tiles": "oracle, no H&E: the control's detail rescaled, checkerboard folds"}
# checkerboard tile side in LR pixels: two ViT tokens (tissue_tokens_msi_px = 4 MSI pixels each), less
# where the LR image is under 4 such tiles a side (the cerebellum), so that both folds stay balanced
TILE_LR = 8


def _scores(truth: np.ndarray, sr: np.ndarray, mask: np.ndarray) -> dict:
    from napari_smsdl.evaluation import score_stack

    s = score_stack(truth, sr, mask)
    return {k: {"mean": float(s[k]["mean"]), "per_channel": [float(v) for v in s[k]["per_channel"]]} for k in METRICS}


def detail_statistics(truth: np.ndarray, control: np.ndarray, mask: np.ndarray) -> dict:
    """Share of the truth variance the control misses and its lag-1 correlation, per channel.

    Both on tissue pixels; the lag-1 correlation averages the row and column neighbour pairs whose
    two pixels are on tissue. ``truth`` and ``control`` are (C, H, W), ``mask`` (H, W) bool.
    """
    detail = truth - control
    share, lag = [], []
    pairs = [(mask[:, 1:] & mask[:, :-1], (slice(None), slice(1, None)), (slice(None), slice(None, -1))),
             (mask[1:] & mask[:-1], (slice(1, None), slice(None)), (slice(None, -1), slice(None)))]
    for d, t in zip(detail, truth):
        share.append(float(d[mask].var() / max(t[mask].var(), 1e-30)))
        lag.append(float(np.mean([np.corrcoef(d[a][m], d[b][m])[0, 1] for m, a, b in pairs])))
    return {"missed_variance_share": share, "lag1_correlation": lag,
            "missed_variance_share_mean": float(np.mean(share)), "lag1_correlation_mean": float(np.mean(lag))}


def _standardise(feats: np.ndarray) -> np.ndarray:
    f = feats.reshape(feats.shape[0], -1).astype(np.float64)
    return ((f - f.mean(1, keepdims=True)) / (f.std(1, keepdims=True) + 1e-6)).reshape(feats.shape)


def _block_free(x: np.ndarray, factor: int) -> np.ndarray:
    """``x`` minus each F × F block's mean: the part of a feature that varies within a measured pixel."""
    from napari_smsdl.reconstruction.baselines.backprojection import block_mean

    return x - np.repeat(np.repeat(block_mean(x, factor), factor, -2), factor, -1)


def column_halves(cols: int, factor: int) -> np.ndarray:
    """Column index splitting ``cols`` SR columns into two halves at an LR block boundary."""
    return (cols // (2 * factor)) * factor


def tile_folds(shape: tuple[int, int], factor: int, tile_lr: int = TILE_LR) -> tuple[np.ndarray, np.ndarray]:
    """Checkerboard folds of ``tile_lr`` × ``tile_lr`` LR-pixel tiles over an SR grid of ``shape``.

    Returns ``(fold, tile_row_parity)``, both (rows, cols) bool: ``fold`` is the tile's checkerboard
    colour (the two cross-fitting folds), ``tile_row_parity`` the parity of its tile row (the inner
    split of one fold's tiles into two interleaved sets, for the ridge penalty). Unlike image halves,
    every region of the image has tiles in both folds.
    """
    side = tile_lr * factor
    r, c = np.meshgrid(np.arange(shape[0]) // side, np.arange(shape[1]) // side, indexing="ij")
    return (r + c) % 2 == 1, r % 2 == 1


def _ridge_fit(a: np.ndarray, y: np.ndarray, alphas) -> np.ndarray:
    """Ridge weights (n_alphas, p, n_targets) of ``y`` (n, t) on ``a`` (n, p) for each penalty, via one SVD."""
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    uty = u.T @ y
    return np.stack([vt.T @ ((s / (s ** 2 + al))[:, None] * uty) for al in alphas])


def ridge_oracle(feats: np.ndarray, target: np.ndarray, train: np.ndarray, factor: int,
                 alphas=ALPHAS, inner: np.ndarray | None = None) -> tuple[np.ndarray, list[float]]:
    """Ridge fit of ``target`` (C, H, W) on block-mean-free ``feats`` (D, H, W) over ``train`` pixels.

    The penalty is chosen per channel on an inner split of the training pixels (``inner`` (H, W)
    bool, by default its columns cut in two at an LR block boundary: fit on one side, validate on
    the other, both ways), then the model is refitted on all of them with that penalty. Returns the
    prediction at every pixel (C, H, W) and the chosen penalties. Nothing outside ``train`` is looked at.
    """
    x = _block_free(_standardise(feats), factor)
    if inner is None:
        cols = np.flatnonzero(train.any(0))
        inner_cut = max(((cols[0] + cols[-1] + 1) // 2) // factor * factor, factor)
        inner = np.zeros_like(train)
        inner[:, :inner_cut] = True
    sse = np.zeros((len(alphas), target.shape[0]))
    for fit, val in ((train & inner, train & ~inner), (train & ~inner, train & inner)):
        w = _ridge_fit(x[:, fit].T, target[:, fit].T, alphas)
        sse += ((x[:, val].T @ w - target[:, val].T[None]) ** 2).sum(1)
    best = sse.argmin(0)
    w_all = _ridge_fit(x[:, train].T, target[:, train].T, alphas)
    w = np.stack([w_all[best[c], :, c] for c in range(target.shape[0])], 1)  # (D, C)
    pred = np.tensordot(w.T, x, 1)
    return pred, [float(alphas[b]) for b in best]


def ridge_free_oracle(feats: np.ndarray | None, control_detail: np.ndarray, target: np.ndarray, train: np.ndarray,
                      factor: int, inner: np.ndarray, alphas=ALPHAS) -> tuple[np.ndarray, list[float]]:
    """As :func:`ridge_oracle`, one channel at a time, with that channel's control as one more regressor.

    ``target`` is the truth's within-block detail (truth minus the measured block mean, on tissue),
    ``control_detail`` the control's (the same, of the control). The latter enters divided by its
    standard deviation and scaled by 1e3, so its penalty is negligible: the fit can keep it
    (coefficient 1: the additive oracle), drop it (0: the features replace the bicubic detail) or
    anything between, which the additive oracle cannot. ``feats=None``: the control's detail alone
    (one scale per channel, no H&E), which tells how much of that oracle's gain needs no histology.
    """
    x = _block_free(_standardise(feats), factor) if feats is not None else np.zeros((0, *target.shape[1:]))
    z = control_detail / (control_detail.reshape(len(control_detail), -1).std(1)[:, None, None] + 1e-30) * 1e3
    pred, chosen = np.zeros_like(target), []
    for c in range(target.shape[0]):
        xc = np.concatenate([x, z[c][None]], 0)
        sse = np.zeros(len(alphas))
        for fit, val in ((train & inner, train & ~inner), (train & ~inner, train & inner)):
            w = _ridge_fit(xc[:, fit].T, target[c, fit][:, None], alphas)[..., 0]  # (n_alphas, D + 1)
            sse += ((w @ xc[:, val] - target[c, val][None]) ** 2).sum(1)
        best = int(sse.argmin())
        w = _ridge_fit(xc[:, train].T, target[c, train][:, None], alphas[best:best + 1])[0, :, 0]
        pred[c] = np.tensordot(w, xc, 1)
        chosen.append(float(alphas[best]))
    return pred, chosen


def gbm_oracle(feats: np.ndarray, bicubic: np.ndarray, target: np.ndarray, train: np.ndarray, factor: int,
               seed: int, n_pcs: int = 30) -> np.ndarray:
    """Gradient-boosted fit of ``target`` per channel on ViT PCs + that channel's bicubic + sub-pixel position.

    The principal components come from all pixels' features (no target involved); the boosting
    stops early on a random 20 % of the training pixels. Returns the prediction at every pixel.
    """
    from sklearn.ensemble import HistGradientBoostingRegressor

    d, rows, cols = feats.shape
    f = _standardise(feats).reshape(d, -1)
    _, vecs = np.linalg.eigh(f @ f.T)
    pcs = vecs[:, ::-1][:, :n_pcs].T @ f
    sub = np.stack(np.meshgrid(np.arange(rows) % factor, np.arange(cols) % factor, indexing="ij")).reshape(2, -1)
    pred = np.zeros_like(target)
    tr = train.ravel()
    for c in range(target.shape[0]):
        x = np.concatenate([pcs, bicubic[c].reshape(1, -1), sub], 0).T
        model = HistGradientBoostingRegressor(max_iter=300, learning_rate=0.05, max_leaf_nodes=15, early_stopping=True,
                                              validation_fraction=0.2, n_iter_no_change=20, random_state=seed)
        model.fit(x[tr], target[c].ravel()[tr])
        pred[c] = model.predict(x).reshape(rows, cols)
    return pred


def _prepare(name: str, seed: int) -> dict:
    """The benchmark protocol's inputs for one case: cropped truth, LR, masks, guide, bicubic, control."""
    from napari_smsdl.evaluation import degrade
    from napari_smsdl.io import tissue_mask
    from napari_smsdl.reconstruction import Settings, prepare_guide
    from napari_smsdl.reconstruction.baselines import bicubic_upsample
    from napari_smsdl.reconstruction.baselines.backprojection import (
        Conservation,
        conserve,
    )

    truth, he, factor, truth_px, he_px, names = load_case(name)
    settings = Settings.preset("default", factor=factor, seed=seed)
    mask_hr = tissue_mask(truth)  # as run_benchmark
    rows, cols = (truth.shape[1] // factor) * factor, (truth.shape[2] // factor) * factor
    if (rows, cols) != truth.shape[1:]:  # as run_benchmark: keep the same-field-of-view correspondence
        he = he[: round(he.shape[0] * rows / truth.shape[1]), : round(he.shape[1] * cols / truth.shape[2])]
        truth, mask_hr = truth[:, :rows, :cols], mask_hr[:rows, :cols]
    lr, mask_lr = degrade(truth, mask_hr, factor)
    guide, _ = prepare_guide(he, he_pixel_size_um=he_px, msi_shape=lr.shape[1:], msi_pixel_size_um=truth_px * factor,
                             factor=factor, max_cell_px=settings.max_cell_px)
    bicubic = bicubic_upsample(np.nan_to_num(lr), factor, mask_lr=mask_lr)
    control = conserve(bicubic, lr, factor, mask_lr, Conservation.EXACT)
    truth_c = np.where(mask_hr[None], np.nan_to_num(truth), 0.0)
    return {"truth": truth_c, "lr": lr, "mask_lr": mask_lr, "mask_hr": mask_hr, "guide": guide, "bicubic": bicubic,
            "control": control, "factor": factor, "settings": settings, "names": names}


def _guided_margins(name: str, seed: int) -> dict | None:
    """SMSDL's and the control's means from bench_guided's case file (None when it is absent)."""
    path = GUIDED / f"{name}_s{seed}.json"
    if not path.exists():
        return None
    m = json.loads(path.read_text())["metrics"]
    return {key: {k: m[key][k]["mean"] for k in METRICS} for key in ("smsdl", "backprojection") if key in m}


def run_oracles(name: str, seed: int, entry: dict | None = None) -> dict:
    """The control, the detail statistics and every oracle of one case; with ``entry`` (a case file
    written before an oracle was added), only the oracles it lacks."""
    from napari_smsdl.features import extract_features
    from napari_smsdl.reconstruction.baselines.backprojection import (
        Conservation,
        conserve,
    )

    p = _prepare(name, seed)
    truth, control, mask, factor, lr, mask_lr = (p[k] for k in ("truth", "control", "mask_hr", "factor", "lr", "mask_lr"))
    t0 = time.perf_counter()
    fm = extract_features(p["guide"], sr_shape=truth.shape[1:], factor=factor, params=p["settings"].features,
                          cache_dir=GUIDED / "cache")
    fresh = {"case": name, "seed": seed, "factor": factor, "channels": p["names"], "truth_shape": list(truth.shape),
             "features_seconds": time.perf_counter() - t0, "features_from_cache": bool(fm.from_cache),
             "metrics": {"backprojection": _scores(truth, control, mask)},
             "detail": detail_statistics(truth, control, mask), "guided": _guided_margins(name, seed), "alphas": {}}
    if entry is None:
        entry = fresh
    else:
        ctrl_old = entry["metrics"]["backprojection"]
        if any(abs(ctrl_old[k]["mean"] - fresh["metrics"]["backprojection"][k]["mean"]) > 1e-6 for k in METRICS):
            raise RuntimeError(f"{name} s{seed}: the control differs from the case file's; delete it and re-run")
        entry.setdefault("alphas", {})
        entry.setdefault("features_reruns", []).append({k: fresh[k] for k in ("features_seconds", "features_from_cache")})
    entry["tile_lr"] = max(1, min(TILE_LR, min(lr.shape[1:]) // 4))
    tiles, tile_rows = tile_folds(mask.shape, factor, entry["tile_lr"])
    target = np.where(mask[None], truth - control, 0.0)
    nearest = np.repeat(np.repeat(np.where(mask_lr[None], np.nan_to_num(lr), 0.0), factor, -2), factor, -1)
    target_free = np.where(mask[None], truth - nearest, 0.0)  # the truth's within-block detail
    cut = column_halves(truth.shape[2], factor)
    left = np.zeros(mask.shape, bool)
    left[:, :cut] = True
    for key in ORACLES:
        if key in entry["metrics"]:
            continue
        t1 = time.perf_counter()
        out = control.astype(np.float64).copy()
        alphas = []
        for half in ((tiles, ~tiles) if key.endswith("_tiles") else (left, ~left)):
            train, test = half & mask, ~half
            if key in ("oracle_ridge_vit_free_tiles", "oracle_control_scale_tiles"):
                feats = fm.data if key == "oracle_ridge_vit_free_tiles" else None
                pred, chosen = ridge_free_oracle(feats, np.where(mask[None], control - nearest, 0.0), target_free,
                                                 train, factor, tile_rows)
                alphas.append(chosen)
                out[:, test] = nearest[:, test] + pred[:, test]
                continue
            if key == "oracle_gbm_vit":
                pred = gbm_oracle(fm.data, p["bicubic"], target, train, factor, seed)
            elif key == "oracle_ridge_vit_tiles":
                pred, chosen = ridge_oracle(fm.data, target, train, factor, inner=tile_rows)
                alphas.append(chosen)
            else:
                pred, chosen = ridge_oracle(fm.data if key == "oracle_ridge_vit" else fm.data[-3:], target, train, factor)
                alphas.append(chosen)
            out[:, test] = control[:, test] + pred[:, test]
        out = conserve(out.astype(np.float32), lr, factor, mask_lr, Conservation.EXACT)
        entry["metrics"][key] = {**_scores(truth, out, mask), "seconds": time.perf_counter() - t1}
        if alphas:
            entry["alphas"][key] = alphas
        print(f"  {name} s{seed} {key}: " + " ".join(f"{k} {entry['metrics'][key][k]['mean']:.4f}" for k in METRICS),
              flush=True)
    return entry


def run_cnn_pair(name: str, seed: int, iterations: int) -> dict:
    """The CNN with the real guide and with a constant guide of the same mean, a fixed iteration count."""
    from napari_smsdl.reconstruction._pipeline import run_cnn

    p = _prepare(name, seed)
    settings = dataclasses.replace(p["settings"], cnn_iterations=iterations)
    out = {}
    for key, guide in (("cnn_real_guide", p["guide"]), ("cnn_blank_guide", np.full_like(p["guide"], p["guide"].mean()))):
        t0 = time.perf_counter()
        c0 = time.process_time()
        sr, ran, _ = run_cnn(p["lr"], guide, p["factor"], mask_lr=p["mask_lr"], bicubic=p["bicubic"], settings=settings,
                             conservation="exact")
        out[key] = {**_scores(p["truth"], sr, p["mask_hr"]), "seconds": time.perf_counter() - t0,
                    "cpu_seconds": time.process_time() - c0, "ran": ran}
        print(f"  {name} s{seed} {key}: " + " ".join(f"{k} {out[key][k]['mean']:.4f}" for k in METRICS)
              + f" ({out[key]['seconds']:.0f} s, {ran['iterations_run']} it)", flush=True)
    return out


def _mean_std(values) -> tuple[float, float]:
    a = np.asarray(values, float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def _fmt(ms: tuple[float, float], sign: bool = True) -> str:
    return f"{ms[0]:+.4f} ± {ms[1]:.4f}" if sign else f"{ms[0]:.4f} ± {ms[1]:.4f}"


def report() -> dict:
    """Mean ± std over seeds: the control, the detail statistics, and every method's margin over the control."""
    by_case: dict = {}
    for f in sorted(OUT.glob("*_s*.json")):
        e = json.loads(f.read_text())
        by_case.setdefault(e["case"], []).append(e)
    summary: dict = {}
    head = ["| data | F | seeds | control RMSE | SSIM | R² | detail share of truth variance | detail lag-1 corr. |",
            "|---|---|---|---|---|---|---|---|"]
    rows = ["| data | F | method − control | seeds | RMSE | SSIM | R² |", "|---|---|---|---|---|---|---|"]
    order = {"mouse": 0, "sample": 1, "bladder": 2}
    mismatched: list[str] = []
    for case, entries in sorted(by_case.items(), key=lambda kv: (order.get(kv[0][:-1], 9), kv[0][-1])):
        entries.sort(key=lambda e: e["seed"])
        for e in entries:  # SMSDL's margin from bench_guided's current case file (it may be re-run after this one)
            e["guided"] = _guided_margins(case, e["seed"]) or e.get("guided")
            ctrl_g = (e["guided"] or {}).get("backprojection")
            if ctrl_g and any(abs(ctrl_g[k] - e["metrics"]["backprojection"][k]["mean"]) > 1e-5 for k in METRICS):
                mismatched.append(f"{case}_s{e['seed']}")  # not the same control (protocol changed in between)
        factor = entries[0]["factor"]
        ctrl = {k: _mean_std([e["metrics"]["backprojection"][k]["mean"] for e in entries]) for k in METRICS}
        share = _mean_std([e["detail"]["missed_variance_share_mean"] for e in entries])
        lag = _mean_std([e["detail"]["lag1_correlation_mean"] for e in entries])
        s = summary[case] = {"factor": factor, "seeds": [e["seed"] for e in entries], "control": ctrl,
                             "detail_share": share, "detail_lag1": lag, "margins": {}}
        head.append(f"| {case[:-1]} | {factor} | {len(entries)} | " + " | ".join(_fmt(ctrl[k], False) for k in METRICS)
                    + f" | {share[0]:.3f} ± {share[1]:.3f} | {lag[0]:+.3f} ± {lag[1]:.3f} |")
        # (label, per-entry margins or None): SMSDL from bench_guided, the oracles, the CNN pair
        methods = [("SMSDL (bench_guided)", [
            {k: e["guided"]["smsdl"][k] - e["guided"]["backprojection"][k] for k in METRICS}
            if e.get("guided") and "smsdl" in e["guided"] else None for e in entries])]
        for key, label in ORACLES.items():
            methods.append((label, [{k: e["metrics"][key][k]["mean"] - e["metrics"]["backprojection"][k]["mean"]
                                     for k in METRICS} if key in e["metrics"] else None for e in entries]))
        for key, label in (("cnn_real_guide", "CNN, real guide"), ("cnn_blank_guide", "CNN, blank guide")):
            methods.append((label, [{k: e["cnn"][key][k]["mean"] - e["metrics"]["backprojection"][k]["mean"]
                                     for k in METRICS} if "cnn" in e else None for e in entries]))
        for label, margins in methods:
            got = [m for m in margins if m is not None]
            if not got:
                continue
            d = {k: _mean_std([m[k] for m in got]) for k in METRICS}
            s["margins"][label] = d
            rows.append(f"| {case[:-1]} | {factor} | {label} | {len(got)} | " + " | ".join(_fmt(d[k]) for k in METRICS) + " |")
        if all("cnn" in e for e in entries[:1]):
            s["cnn_iterations"] = entries[0]["cnn"]["iterations"]
    if mismatched:
        print("WARNING: the control differs from bench_guided's (re-run these case files): " + ", ".join(mismatched))
        summary["control_mismatch"] = mismatched
    (HERE / "results" / "ceiling.json").write_text(json.dumps(summary, indent=2))
    md = HERE.parent / "docs" / "benchmarks" / "ceiling.md"
    md.parent.mkdir(parents=True, exist_ok=True)
    its = sorted({e["cnn"]["iterations"] for es in by_case.values() for e in es if "cnn" in e})
    text = ("# Ceiling: what could any H&E-feature method add over the H&E-free control?\n\n"
            "`benchmarks/bench_ceiling.py`, the protocol of `bench_guided.py`. The H&E-free control and the detail it misses (truth − control on tissue; "
            "share of the truth variance, mean over channels, and its lag-1 spatial correlation), mean ± std over seeds:\n\n"
            + "\n".join(head) + "\n\nMargins over the control (mean ± std over seeds; RMSE ↓, SSIM and R² ↑). "
            "The oracles are fitted to the ground truth's missing detail on one image half and scored on the other "
            "(both ways; 'checkerboard folds': on a checkerboard of tiles two ViT tokens wide, fewer on the cerebellum's "
            "small image, so that every region is in both folds), then conserved exactly; '+ the control's detail' may "
            "also drop or rescale the control's within-block detail (an unpenalised regressor) instead of only adding "
            "to it; SMSDL's margin is that of `bench_guided.py` for the same seeds; "
            f"the CNN pair runs {', '.join(map(str, its)) or '—'} joint iterations, real vs constant guide:\n\n"
            + "\n".join(rows) + "\n"
            + (f"\n**Stale:** the control of {', '.join(mismatched)} differs from `bench_guided.py`'s; re-run those.\n"
               if mismatched else ""))
    md.write_text(text)
    print(text)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="mouse4,mouse2,sample4,bladder4,bladder2", help="cases for the oracles")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--cnn", default="mouse4,mouse2,bladder4", help="cases for the CNN pair ('' for none)")
    parser.add_argument("--cnn-iterations", type=int, default=150)
    parser.add_argument("--report", action="store_true", help="only aggregate the case files")
    args = parser.parse_args()
    if not args.report:
        from napari_smsdl.torch_setup import configure_threads

        configure_threads()
        OUT.mkdir(parents=True, exist_ok=True)
        cnn_cases = [c for c in args.cnn.split(",") if c]
        for seed in (int(s) for s in args.seeds.split(",")):
            for case in args.only.split(","):
                if case.startswith(("bladder", "mouse")) and not SHARED.exists():
                    print(f"{case}: {SHARED} is absent, skipped")
                    continue
                path = OUT / f"{case}_s{seed}.json"
                entry = json.loads(path.read_text()) if path.exists() else None
                t0, c0 = time.perf_counter(), time.process_time()
                missing = entry is None or any(k not in entry["metrics"] for k in ORACLES)
                if missing:
                    entry = run_oracles(case, seed, entry)
                if case in cnn_cases and "cnn" not in entry:
                    entry["cnn"] = {"iterations": args.cnn_iterations, **run_cnn_pair(case, seed, args.cnn_iterations)}
                elif not missing:
                    continue
                entry.setdefault("runs", []).append({"wall_seconds": time.perf_counter() - t0,
                                                     "cpu_seconds": time.process_time() - c0,
                                                     "loadavg_1min": os.getloadavg()[0]})
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(entry, indent=1))
                tmp.replace(path)
                print(case, seed, f"{entry['runs'][-1]['wall_seconds']:.0f} s wall, "
                      f"{entry['runs'][-1]['cpu_seconds']:.0f} s CPU, load {entry['runs'][-1]['loadavg_1min']:.2f}",
                      flush=True)
    report()


if __name__ == "__main__":
    main()
