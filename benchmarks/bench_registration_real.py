"""Registration on real-modality pairs: the bladder optical image warped by known transforms, registered
back from the 20 real ion images (issue 13).

The aligned pair in ``../shared/data/mouse-bladder-dev`` (ions 124 × 244 at 10 µm, optical 2.5 µm/px,
MSI pixel (r, c) ↔ optical physical ``x + 3.75 µm``) is turned into unaligned cases by warping the
optical image (rotation, isotropic scale, shift, a mild smooth B-spline warp, crops so the optical image
does not cover the whole MSI grid, other pixel sizes). Each case is registered with the default
parameters, without landmarks and with 6 landmarks (1 optical px click noise), and scored on the MSI
pixels the warped optical image covers, in MSI px, against the known answer. The identity case
(no warp at all) measures how far the method's optimum lies from the data set's own reference
alignment, which is itself good to about 0.5 MSI px (its README): that is the floor of every number.

Usage: ``python benchmarks/bench_registration_real.py [--quick]``; writes
``benchmarks/results/registration_real.json`` and rewrites ``docs/benchmarks/registration.md``
(the synthetic table from ``benchmarks/results/registration.json`` followed by this one).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "mouse-bladder-dev"
P_MSI, P_OPT, OFFSET = 10.0, 2.5, 3.75
TARGETS = {
    "no_landmarks": {"median": 0.5, "p90": 1.0, "folds": 0, "seconds": 30.0},
    "landmarks": {"median": 0.3, "p90": 0.6, "seconds": 10.0},
    "confidence_ratio_within": 2.0,
}
# The reference alignment is one affine (the data set's README), "worse along the top edge"; fits of the
# channel criterion per region (reference_check) put the top half 1-3 MSI px from it and the bottom half
# within 0.3 px. Errors are reported over every covered pixel and, separately, over the bottom half
# (MSI rows 62-123), where the reference can be trusted to the precision the targets ask for.
TRUSTED_FROM_ROW = 62
CASES = [
    {"name": "identity", "rotation_deg": 0.0, "scale": 1.0, "shift_msi_px": (0, 0), "warp_msi_px": 0.0,
     "crop": (0, 1, 0, 1), "pixel_size_um": 2.5},
    {"name": "rot+6 scale+4% warp crop-cols", "rotation_deg": 6.0, "scale": 1.04, "shift_msi_px": (4, -3),
     "warp_msi_px": 0.8, "crop": (0, 1, 0.1, 0.9), "pixel_size_um": 3.0},
    {"name": "rot-8 scale-5% warp crop-top", "rotation_deg": -8.0, "scale": 0.95, "shift_msi_px": (-5, 2),
     "warp_msi_px": 0.5, "crop": (0.1, 1, 0, 1), "pixel_size_um": 2.5},
    {"name": "rot+3 scale+6%", "rotation_deg": 3.0, "scale": 1.06, "shift_msi_px": (2, 5), "warp_msi_px": 0.0,
     "crop": (0, 1, 0, 1), "pixel_size_um": 2.8},
    {"name": "rot-4 scale-2% warp1 crop-bottom", "rotation_deg": -4.0, "scale": 0.98, "shift_msi_px": (-3, -4),
     "warp_msi_px": 1.0, "crop": (0, 0.9, 0, 1), "pixel_size_um": 3.2},
    {"name": "rot+8 shift6 warp crop-sides", "rotation_deg": 8.0, "scale": 1.0, "shift_msi_px": (6, 0),
     "warp_msi_px": 0.6, "crop": (0.05, 1, 0.05, 0.95), "pixel_size_um": 2.5},
]


def covered_points(case, shape_rc, step=3) -> np.ndarray:
    """MSI (row, col) points on a grid whose true position lies inside the warped optical image."""
    from napari_smsdl.registration._warped import _invert_point

    rr, cc = np.meshgrid(np.arange(0, shape_rc[0], step), np.arange(0, shape_rc[1], step), indexing="ij")
    pts = np.column_stack([rr.ravel(), cc.ravel()]).astype(float)
    rows, cols = case.moving_rgb.shape[:2]
    q = case.moving_pixel_size_um
    keep = []
    for rc in pts:
        y = rc[::-1] * P_MSI + OFFSET
        u = _invert_point(case.warp, y, y)
        keep.append(0 <= u[1] / q <= rows - 1 and 0 <= u[0] / q <= cols - 1)
    return pts[np.array(keep)]


def stats(e: np.ndarray) -> dict:
    return {"median": float(np.median(e)), "p90": float(np.percentile(e, 90)), "max": float(e.max())}


def own_alignment(case, transform, pts_rc: np.ndarray) -> np.ndarray:
    """Optical physical (x, y) µm that ``transform`` (MSI → warped) assigns to MSI points."""
    xy = pts_rc[:, ::-1] * P_MSI
    return np.array([case.warp.TransformPoint(transform.TransformPoint(tuple(x))) for x in xy])


def run_case(spec: dict, ions: np.ndarray, optical: np.ndarray, seed: int, reference=None) -> dict:
    from napari_smsdl.registration import RegistrationParams, fit_landmark_affine, rc_to_xy_um, register
    from napari_smsdl.registration._warped import warp_aligned_pair

    kw = {k: v for k, v in spec.items() if k != "name"}
    case = warp_aligned_pair(optical, P_OPT, ions.shape[1:], P_MSI, offset_um=OFFSET, seed=seed, **kw)
    pts = covered_points(case, ions.shape[1:])
    row = {"case": spec["name"], **{k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items()},
           "optical_shape_rc": list(case.moving_rgb.shape[:2]), "n_eval_points": int(len(pts))}
    lm = case.landmarks
    la = fit_landmark_affine(rc_to_xy_um(lm.msi_rc, P_MSI), rc_to_xy_um(lm.he_rc, case.moving_pixel_size_um))
    trusted = pts[:, 0] >= TRUSTED_FROM_ROW
    err_la = case.errors_msi_px(la, pts)
    row["landmark_affine_alone"] = {**stats(err_la), "trusted_region": stats(err_la[trusted])}
    row["n_eval_points_trusted_region"] = int(trusted.sum())
    for label, landmarks in (("no_landmarks", None), ("landmarks", lm)):
        t0, c0 = time.perf_counter(), time.process_time()
        res = register(ions, case.moving_rgb, fixed_pixel_size_um=P_MSI,
                       moving_pixel_size_um=case.moving_pixel_size_um, landmarks=landmarks,
                       params=RegistrationParams(threads=2))
        seconds = time.perf_counter() - t0
        cpu = time.process_time() - c0
        err = case.errors_msi_px(res.transform, pts)
        rep = res.report
        if label == "no_landmarks":
            row["_transform"], row["_case"], row["_pts"] = res.transform, case, pts
        recovery = None
        if label == "no_landmarks" and reference is not None:
            # against the method's own alignment of the unwarped pair: how well the known warp is undone
            ref_case, ref_tx = reference
            full = np.argwhere(np.ones(ions.shape[1:], bool))[::7].astype(float)
            here = case.errors_msi_px(res.transform, full) >= 0  # all points
            mine = own_alignment(case, res.transform, full[here])
            base = own_alignment(ref_case, ref_tx, full[here])
            covered = {tuple(v) for v in pts.astype(int).tolist()}
            sel = np.array([tuple(v) in covered for v in full[here].astype(int).tolist()])
            if sel.any():
                recovery = stats(np.linalg.norm(mine[sel] - base[sel], axis=1) / P_MSI)
        conf = rep["confidence_msi_px"]
        row[label] = {
            **stats(err),
            "trusted_region": stats(err[trusted]),
            "folds_in_tissue": rep["folds_in_tissue"],
            "seconds": seconds,
            "cpu_seconds": cpu,
            "final": rep["final"],
            "confidence_msi_px": conf,
            "confidence_over_error": None if not conf else conf / max(float(np.median(err)), 1e-9),
            "misregistration_msi_px": rep["misregistration_msi_px"],
            "bootstrap_rms_msi_px": (rep["confidence"] or {}).get("bootstrap_rms_msi_px"),
            "loo_error_msi_px_reported": rep["loo_error_msi_px"],
            "sweep_chosen": (rep["start_sweep"] or {}).get("chosen"),
            "recovery_vs_own_unwarped_alignment": recovery,
            "stages": [{k: s.get(k) for k in ("name", "kept", "reason")} for s in rep["stages"]],
        }
        print(f"{spec['name'][:34]:34s} {label:13s} median {row[label]['median']:.2f} p90 {row[label]['p90']:.2f} "
              f"conf {conf} folds {rep['folds_in_tissue']} {seconds:.1f} s  {rep['final']}", flush=True)
    return row


def _decompose(lin, ref, centre_xy) -> dict:
    """A linear map relative to the reference: translation at the field centre, rotation, scales (MSI px, °)."""
    rel = lin.matrix @ np.linalg.inv(ref.matrix)
    u, s, vt = np.linalg.svd(rel)
    rot = u @ vt
    c = np.asarray(centre_xy, float)[None]
    return {"centre_shift_xy_msi_px": ((lin.apply(c) - ref.apply(c))[0] / P_MSI).round(3).tolist(),
            "rotation_deg": round(float(np.degrees(np.arctan2(rot[1, 0], rot[0, 0]))), 3),
            "scales": s.round(4).tolist()}


def _heldout_r2(prob, lin, fold: int) -> float:
    """Channel R² on the pixels of one checkerboard fold, the regression fitted on the other fold."""
    from napari_smsdl.registration._channels import predict, ridge_fit

    y = prob.y(0.5)
    phi, inside, _ = prob.sample(lin, 0.5)
    train, test = inside & (prob.folds != fold), inside & (prob.folds == fold)
    beta = ridge_fit(phi[train], y[train])
    res = y[test] - predict(phi[test], beta)
    return float(1 - (res**2).sum() / ((y[test] - y[train].mean(0)) ** 2).sum())


def reference_check(ions: np.ndarray, optical: np.ndarray) -> dict:
    """Where the method's optimum on the unwarped pair lies against the data set's reference alignment.

    The channel criterion's optimum is fitted from the reference (translation, similarity, affine) and
    decomposed; translation-only fits per region show where the two disagree; each fit is also made on
    one checkerboard fold of 16 px blocks and scored on the other (held-out channel R², against the
    reference's on the same pixels). The same fits on ion images made from the optical image through the
    exact footprint (the truth exact) show the method's own convention floor."""
    from scipy.ndimage import gaussian_filter

    from napari_smsdl.registration._channel_fit import LinearMap
    from napari_smsdl.registration._channel_stages import ChannelContext

    ref = LinearMap(np.eye(2), np.array([OFFSET, OFFSET]))
    rows, cols = ions.shape[1:]
    rgb = optical.astype(float) / 255.0
    od = -np.log(np.clip(rgb, 1 / 255, 1))
    feats = [od[..., 0], od[..., 1], od[..., 2], od[..., 0] * od[..., 2], (rgb.mean(-1) > 0.88).astype(float)]
    boxes = np.stack([f[: 4 * rows, : 4 * cols].reshape(rows, 4, cols, 4).mean(axis=(1, 3)) for f in feats])
    rng = np.random.default_rng(0)
    synthetic = []
    for _ in range(ions.shape[0]):
        im = gaussian_filter(np.tensordot(rng.normal(size=len(feats)), boxes, 1), 0.35)
        synthetic.append((im - im.mean()) / im.std() + 0.5 * rng.normal(size=im.shape))
    out = {}
    for name, stack in (("real ion images", ions), ("exact-footprint synthetic ions", np.array(synthetic))):
        ctx = ChannelContext(stack, optical, P_MSI, P_OPT, 1.0)
        prob = ctx.problem
        entry = {"cv_r2_reference": ctx.score(ref)["cv_r2"], "fits": {}}
        for model in ("translation", "similarity", "affine"):
            lin = prob.fit_affine(ref, model=model, levels=(1.0, 0.5), max_iter=30)
            e = np.linalg.norm(lin.apply(prob.xy) - ref.apply(prob.xy), axis=1) / P_MSI
            gain = []
            for f in (0, 1):
                lin_f = prob.fit_affine(ref, model=model, levels=(1.0, 0.5), max_iter=30,
                                        weights=(prob.folds != f).astype(float))
                gain.append(_heldout_r2(prob, lin_f, f) - _heldout_r2(prob, ref, f))
            entry["fits"][model] = {**_decompose(lin, ref, ctx.centre_xy), "median_vs_reference_msi_px": float(np.median(e)),
                                    "p90_vs_reference_msi_px": float(np.percentile(e, 90)),
                                    "heldout_r2_gain_over_reference": [round(g, 5) for g in gain]}
        if name == "real ion images":
            regions = {f"rows {a}-{b - 1}": (prob.rows >= a) & (prob.rows < b)
                       for a, b in ((0, 31), (31, 62), (62, 93), (93, rows))}
            regions.update({"cols 0-121": prob.cols < cols // 2, f"cols {cols // 2}-{cols - 1}": prob.cols >= cols // 2})
            entry["translation_by_region_xy_msi_px"] = {
                k: ((prob.fit_affine(ref, model="translation", levels=(1.0, 0.5), max_iter=30,
                                     weights=m.astype(float)).offset - ref.offset) / P_MSI).round(3).tolist()
                for k, m in regions.items()}
        out[name] = entry
        print(name, json.dumps(entry), flush=True)
    return out


def summarise(rows: list[dict]) -> dict:
    out = {}
    for label in ("no_landmarks", "landmarks"):
        med = np.array([r[label]["median"] for r in rows])
        p90 = np.array([r[label]["p90"] for r in rows])
        ratio = np.array([r[label]["confidence_over_error"] or np.nan for r in rows])
        out[label] = {
            "median_of_medians": float(np.median(med)), "worst_median": float(med.max()),
            "median_of_p90": float(np.median(p90)), "worst_p90": float(p90.max()),
            "folds_total": int(sum(r[label]["folds_in_tissue"] for r in rows)),
            "seconds_max": float(max(r[label]["seconds"] for r in rows)),
            "seconds_median": float(np.median([r[label]["seconds"] for r in rows])),
            "cpu_seconds_max": float(max(r[label]["cpu_seconds"] for r in rows)),
            "confidence_over_error": {"min": float(np.nanmin(ratio)), "max": float(np.nanmax(ratio)),
                                      "within_x2": int(((ratio >= 0.5) & (ratio <= 2.0)).sum()), "n": len(rows)},
        }
        tr_med = np.array([r[label]["trusted_region"]["median"] for r in rows])
        tr_p90 = np.array([r[label]["trusted_region"]["p90"] for r in rows])
        out[label]["trusted_region"] = {"median_of_medians": float(np.median(tr_med)), "worst_median": float(tr_med.max()),
                                        "median_of_p90": float(np.median(tr_p90)), "worst_p90": float(tr_p90.max())}
    out["landmark_affine_alone"] = {
        "median_of_medians": float(np.median([r["landmark_affine_alone"]["median"] for r in rows])),
        "worst_p90": float(max(r["landmark_affine_alone"]["p90"] for r in rows)),
    }
    n, lm = out["no_landmarks"], out["landmarks"]
    t = TARGETS
    out["targets_met"] = {
        "no landmarks: median < 0.5 px (every case)": n["worst_median"] < t["no_landmarks"]["median"],
        "no landmarks: p90 < 1 px (every case)": n["worst_p90"] < t["no_landmarks"]["p90"],
        "no landmarks: 0 folds": n["folds_total"] == 0,
        "no landmarks: < 30 s": n["seconds_max"] < t["no_landmarks"]["seconds"],
        "6 landmarks: median < 0.3 px (every case)": lm["worst_median"] < t["landmarks"]["median"],
        "6 landmarks: p90 < 0.6 px (every case)": lm["worst_p90"] < t["landmarks"]["p90"],
        "6 landmarks: < 10 s": lm["seconds_max"] < t["landmarks"]["seconds"],
        "confidence within x2 of the median error (every run)": all(
            out[k]["confidence_over_error"]["within_x2"] == len(rows) for k in ("no_landmarks", "landmarks")),
    }
    nt, lt = n["trusted_region"], lm["trusted_region"]
    out["targets_met_trusted_region"] = {
        "no landmarks: median < 0.5 px (every case)": nt["worst_median"] < t["no_landmarks"]["median"],
        "no landmarks: p90 < 1 px (every case)": nt["worst_p90"] < t["no_landmarks"]["p90"],
        "6 landmarks: median < 0.3 px (every case)": lt["worst_median"] < t["landmarks"]["median"],
        "6 landmarks: p90 < 0.6 px (every case)": lt["worst_p90"] < t["landmarks"]["p90"],
    }
    return out


def _trusted(entry: dict) -> str:
    t = entry.get("trusted_region")
    return "—" if not t else f"{t['median']:.2f} / {t['p90']:.2f}"


def markdown(result: dict) -> str:
    s = result["summary"]
    lines = [
        "## Real-modality pairs: the bladder optical image warped, registered back from 20 ion images",
        "",
        f"`python benchmarks/bench_registration_real.py` ({len(result['cases'])} cases, {result['date']}, "
        f"{result['machine']}, SimpleITK {result['simpleitk']}, default parameters, whole `register` call timed). "
        "MSI 124 × 244 at 10 µm (real, noisy ion images); the optical image warped by a known rotation, isotropic "
        "scale, shift, mild smooth warp and crop; errors on the MSI pixels the warped optical image covers, in "
        "**MSI px**, against the data set's reference alignment (itself good to ~0.5 px: the identity row is the "
        "floor). Landmarks: 6, spread over the field, 1 optical px click noise (sd per axis).",
        "",
        "| case | optical | no landmarks: median / p90 | bottom half | conf. (ratio) | s | 6 landmarks: median / p90 "
        "| bottom half | conf. (ratio) | s | landmark affine alone | kept (no landmarks / landmarks) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    short = {"rotation/scale sweep": "sweep", "landmark affine": "LA", "affine refinement": "CA", "B-spline": "BS"}

    def abbreviate(text):
        for long, ab in short.items():
            text = text.replace(long, ab)
        return text

    for r in result["cases"]:
        n, lm, la = r["no_landmarks"], r["landmarks"], r["landmark_affine_alone"]
        lines.append(
            f"| {r['case']} | {r['optical_shape_rc'][0]}×{r['optical_shape_rc'][1]} @ {r['pixel_size_um']} µm | "
            f"{n['median']:.2f} / {n['p90']:.2f} | {_trusted(n)} | "
            f"{n['confidence_msi_px']:.2f} ({n['confidence_over_error']:.1f}) | "
            f"{n['seconds']:.1f} | {lm['median']:.2f} / {lm['p90']:.2f} | {_trusted(lm)} | "
            f"{lm['confidence_msi_px']:.2f} ({lm['confidence_over_error']:.1f}) | {lm['seconds']:.1f} | "
            f"{la['median']:.2f} / {la['p90']:.2f} | {abbreviate(n['final'])} / {abbreviate(lm['final'])} |"
        )
    rec = [r["no_landmarks"]["recovery_vs_own_unwarped_alignment"] for r in result["cases"]]
    rec = [(r["case"], x) for r, x in zip(result["cases"], rec, strict=True) if x]
    n, lm = s["no_landmarks"], s["landmarks"]
    if rec:
        lines += [
            "",
            "Without landmarks, against the method's **own** alignment of the unwarped pair (how well the known "
            "warp is undone, the reference's own error taken out): "
            + "; ".join(f"{name} {x['median']:.2f} / {x['p90']:.2f}" for name, x in rec)
            + " (median / p90 MSI px).",
        ]
    check = result.get("reference_check")
    if check:
        lines += ["", "### Where the method's optimum lies against the reference (the unwarped pair)", "",
                  ("The channel criterion's optimum fitted from the reference alignment, relative to it: shift at the "
                   "field centre (x, y MSI px), rotation, scales, and the disagreement over the field; held-out R² "
                   "gain = the fit made on one checkerboard fold of 16 px blocks, scored on the other, minus the "
                   "reference's score on the same pixels (both folds)."), "",
                  ("| ion images | model | centre shift (x, y) | rotation ° | scales | median / p90 vs reference "
                   "| held-out R² gain over the reference |"), "|---|---|---|---|---|---|---|"]
        for name, entry in check.items():
            for model, f in entry["fits"].items():
                lines.append(
                    f"| {name} | {model} | {f['centre_shift_xy_msi_px'][0]:+.2f}, {f['centre_shift_xy_msi_px'][1]:+.2f} "
                    f"| {f['rotation_deg']:+.2f} | {f['scales'][0]:.4f}, {f['scales'][1]:.4f} | "
                    f"{f['median_vs_reference_msi_px']:.2f} / {f['p90_vs_reference_msi_px']:.2f} | "
                    + ", ".join(f"{g:+.4f}" for g in f["heldout_r2_gain_over_reference"]) + " |")
        reg = check.get("real ion images", {}).get("translation_by_region_xy_msi_px")
        if reg:
            lines += ["", "Translation-only optimum per region of the real pair (x, y MSI px from the reference): "
                      + "; ".join(f"{k}: {v[0]:+.2f}, {v[1]:+.2f}" for k, v in reg.items()) + "."]
    lines += [
        "",
        f"Over the cases: no landmarks median {n['median_of_medians']:.2f} (worst {n['worst_median']:.2f}), p90 "
        f"{n['median_of_p90']:.2f} (worst {n['worst_p90']:.2f}), folds {n['folds_total']}, at most "
        f"{n['seconds_max']:.1f} s; with 6 landmarks median {lm['median_of_medians']:.2f} (worst "
        f"{lm['worst_median']:.2f}), p90 {lm['median_of_p90']:.2f} (worst {lm['worst_p90']:.2f}), at most "
        f"{lm['seconds_max']:.1f} s wall (CPU at most {n['cpu_seconds_max']:.1f} s without, "
        f"{lm['cpu_seconds_max']:.1f} s with landmarks; the 2-core machine was shared with other jobs"
        + (f", 1-minute load {result['load_1min']['start']:.1f} at the start, {result['load_1min']['end']:.1f} at the end"
           if result.get("load_1min") else "")
        + ", so wall and even CPU times vary by up to 2x between runs). Confidence / measured median error: "
        f"{n['confidence_over_error']['min']:.1f}–{n['confidence_over_error']['max']:.1f} without landmarks, "
        f"{lm['confidence_over_error']['min']:.1f}–{lm['confidence_over_error']['max']:.1f} with.",
        "",
        "Targets (issue 13): " + "; ".join(f"{k}: {'met' if v else '**not met**'}" for k, v in s["targets_met"].items())
        + ".",
        "",
        "The same targets over the bottom half only (MSI rows ≥ 62, where translation-only fits per region put the "
        "data within 0.3 px of the reference; in the top half, which its README calls worse, they sit 1–3 px from "
        "it): "
        + "; ".join(f"{k}: {'met' if v else '**not met**'}" for k, v in s.get("targets_met_trusted_region", {}).items())
        + (f" (no landmarks: worst median {s['no_landmarks']['trusted_region']['worst_median']:.2f}, worst p90 "
           f"{s['no_landmarks']['trusted_region']['worst_p90']:.2f}; 6 landmarks: worst median "
           f"{s['landmarks']['trusted_region']['worst_median']:.2f}, worst p90 "
           f"{s['landmarks']['trusted_region']['worst_p90']:.2f})." if "targets_met_trusted_region" in s else ".")
        + " The errors are no smaller there: without landmarks the global similarity the data prefer differs from "
        "the reference by a rotation and a scale (table above), which err over the whole field, not in the top "
        "half alone; with landmarks the error is the six landmarks' click noise, which has no region.",
        "",
        "Stages: sweep = rotation (±12°, 3° steps) × scale (0.95, 1, 1.05) × mirror start scored by masked FFT "
        "correlation of whitened histology features with the leading ion components, re-ranked by the criterion; "
        "CA = Levenberg–Marquardt similarity fit on the channel criterion (block-cross-validated ridge regression "
        "of the 6 leading ion PCs on optical-density, colour-product, contrast and background features through "
        "the pixel footprint); without landmarks it is refitted twice with each 16-px tissue patch weighted by "
        "Tukey's biweight of its own best shift's residual from a least-median-of-squares motion fit to all "
        "patches' shifts, so a locally deformed region does not bend the global fit; with landmarks, a joint affine fit of the landmarks weighted by their click noise "
        "and the channel criterion weighted by its cluster-robust covariance, inflated until the two agree, kept "
        "when the held-out landmark median is not worse and the channel R² not lower; BS = a smooth B-spline fitted to per-patch residual shifts, kept only when it "
        "raises the held-out channel R² by ≥ 0.02 and does not worsen held-out landmarks. Confidence = "
        "√(bootstrap RMS of the global fit over tissue blocks² + median patch residual shift²).",
        "",
    ]
    return "\n".join(lines)


def write_docs(result: dict, md_path) -> None:
    """docs/benchmarks/registration.md: the synthetic table (bench_registration.py's JSON), then this one."""
    synthetic = ROOT / "benchmarks" / "results" / "registration.json"
    text = "# Registration accuracy and speed\n\n"
    if synthetic.exists():
        import importlib.util

        spec = importlib.util.spec_from_file_location("bench_registration", ROOT / "benchmarks" / "bench_registration.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        text = mod.markdown(json.loads(synthetic.read_text())).rstrip() + "\n\n"
        text = text.replace(
            "# Registration accuracy and speed\n",
            "# Registration accuracy and speed\n\n## Synthetic MSI-like images of real histology "
            "(single channel: the Mattes path)\n",
            1,
        )
    Path(md_path).write_text(text + markdown(result))


def main(argv=None) -> int:
    import SimpleITK as sitk
    from skimage import io

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two cases, no files written")
    parser.add_argument("--docs-only", action="store_true", help="rewrite the markdown from the saved JSON files")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "registration_real.json"))
    parser.add_argument("--md", default=str(ROOT / "docs" / "benchmarks" / "registration.md"))
    args = parser.parse_args(argv)
    if args.docs_only:
        write_docs(json.loads(Path(args.json).read_text()), args.md)
        return 0
    if not DATA.exists():
        print(f"skipped: {DATA} is absent")
        return 0
    ions = np.load(DATA / "ions.npy")
    optical = io.imread(DATA / "optical.png")[..., :3]
    cases = CASES[:2] if args.quick else CASES
    t0 = time.perf_counter()
    load_start = os.getloadavg()[0]
    rows = []
    reference = None
    for i, spec in enumerate(cases):
        row = run_case(spec, ions, optical, seed=i, reference=reference)
        if spec["name"] == "identity":
            reference = (row["_case"], row["_transform"])
        rows.append(row)
    for row in rows:
        for key in ("_transform", "_case", "_pts"):
            row.pop(key, None)
    check = None if args.quick else reference_check(ions, optical)
    result = {
        "benchmark": "registration_real",
        "reference_check": check,
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
        "simpleitk": sitk.Version.VersionString(),
        "targets": TARGETS,
        "summary": summarise(rows),
        "cases": rows,
        "total_seconds": time.perf_counter() - t0,
        "load_1min": {"start": load_start, "end": os.getloadavg()[0]},
    }
    print(json.dumps(result["summary"], indent=2))
    if not args.quick:
        Path(args.json).write_text(json.dumps(result, indent=2))
        write_docs(result, args.md)
        print(f"wrote {args.json} and {args.md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
