"""The registration stages driven by the many-channel criterion (ion stacks), as SimpleITK transforms.

* :func:`sweep_affine` — landmark-free start: rotation/scale/mirror sweep with masked FFT
  correlation, the best few refined, the best kept.
* :func:`refine_affine` — Levenberg–Marquardt on the regression residual (similarity by default).
* :func:`fit_bspline` — a smooth B-spline fitted to per-patch residual shifts, with its held-out
  channel criterion (shifts estimated on one checkerboard fold of patches, scored on the other).
* :func:`misregistration_map` and :func:`confidence` — what is left after the final transform.
"""

from __future__ import annotations

import time

import numpy as np

from ._channel_fit import CV_PATCH, ChannelProblem, FitTrace, LinearMap
from ._channels import channel_targets, optical_features, predict, ridge_fit

__all__ = ["ChannelContext"]

#: a patch of the misregistration map is flagged above this residual shift (MSI px)
FLAG_MSI_PX = 0.5
FINE_SIGMA = 0.5
#: Tukey's biweight constant: 95 % efficiency at Gaussian residuals (the textbook value, not tuned)
TUKEY_C = 4.685


class ChannelContext:
    """The ion stack and histology features of one registration (built once, shared by stages)."""

    def __init__(self, fixed_stack, moving_rgb, p: float, q: float, he_per_msi: float, *, psf_sigma_msi_px=0.35):
        self.p, self.q, self.he_per_msi = float(p), float(q), float(he_per_msi)
        self.targets = channel_targets(fixed_stack, p)
        self.features = optical_features(
            moving_rgb, q, msi_pixel_size_he_um=p * he_per_msi, psf_sigma_msi_px=psf_sigma_msi_px
        )
        self.problem = ChannelProblem(self.targets, self.features, he_per_msi)
        self.fast = self.problem.subset(2)
        self.moving_shape = tuple(np.asarray(moving_rgb).shape[:2])
        #: per-patch weights of the last robust affine fit (``None``: unweighted), for its bootstrap
        self.robust_patch_weights: np.ndarray | None = None

    @property
    def centre_xy(self) -> np.ndarray:
        return self.problem.centre_xy

    def to_sitk(self, lin: LinearMap):
        return lin.to_sitk(self.centre_xy)

    def score(self, lin: LinearMap, disp=None) -> dict:
        s = self.problem.score(lin, FINE_SIGMA, disp)
        return {k: round(float(v), 6) for k, v in s.items()}

    # ---- stage 1 without landmarks ----------------------------------------------------------------
    def sweep_affine(self, *, mirror: bool, top: int = 3) -> tuple[object, dict]:
        from ._sweep import sweep_start

        t0 = time.perf_counter()
        rows, cols = self.moving_shape
        centre = np.array([(cols - 1) / 2 * self.q, (rows - 1) / 2 * self.q])
        cands = sweep_start(self.targets, self.features, he_per_msi=self.he_per_msi, he_centre_xy_um=centre,
                            mirror=mirror)
        if not cands:
            return None, {"candidates": [], "reason": "no candidate overlaps the MSI field enough"}
        # the FFT score approximates R² (features whitened over the whole histology, not the overlap):
        # re-rank the leading candidates by the criterion itself before refining the best few
        ranked = []
        for c in cands[:16]:
            sc = self.fast.score(c.linear, 2.0)["cv_r2"]
            ranked.append((sc if np.isfinite(sc) else -np.inf, c))
        ranked.sort(key=lambda t: -t[0])
        tried = []
        for _, c in ranked[:top]:
            lin = self.fast.fit_affine(c.linear, model="similarity", levels=(2.0,), max_iter=8)
            s = self.fast.score(lin, 1.0)
            tried.append((s["cv_r2"] if np.isfinite(s["cv_r2"]) else -np.inf, c, lin))
        best = max(tried, key=lambda t: t[0])
        info = {
            "candidates": [c.to_dict() for c in cands[:8]],
            "n_candidates": len(cands),
            "refined": [{**c.to_dict(), "cv_r2_after_coarse_fit": round(float(s), 6)} for s, c, _ in tried],
            "chosen": best[1].to_dict(),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        return self.to_sitk(best[2]), info

    # ---- stage 2 --------------------------------------------------------------------------------------
    def refine_affine(self, affine, *, model: str, quick: bool = False, coarse: bool = True,
                      robust_passes: int = 0) -> tuple[object, dict]:
        """LM fit from ``affine`` (coarse levels on every 2nd pixel, the fine level on all; ``coarse=False``
        skips the coarsest level, for a start already within a pixel, e.g. from landmarks).
        ``robust_passes`` > 0: then that many reweighted fine fits (see :meth:`_robust_refit`)."""
        t0 = time.perf_counter()
        lin = LinearMap.from_sitk(affine)
        before = self.score(lin)
        trace = FitTrace()
        if not quick:
            lin = self.fast.fit_affine(lin, model=model, levels=(2.0, 1.0) if coarse else (1.0,), max_iter=10,
                                       trace=trace)
            lin = self.problem.fit_affine(lin, model=model, levels=(FINE_SIGMA,), max_iter=8, trace=trace)
        else:
            lin = self.fast.fit_affine(lin, model=model, levels=(1.0, FINE_SIGMA), max_iter=8, trace=trace)
        robust = None
        if robust_passes and not quick:
            lin, robust = self._robust_refit(lin, model, robust_passes, trace)
        after = self.score(lin)
        info = {
            "criterion": "channel regression",
            "model": model,
            "iterations": trace.iterations,
            "robust": robust,
            "channel_score": {"before": before, "after": after},
            "seconds": round(time.perf_counter() - t0, 3),
        }
        return self.to_sitk(lin), info

    def _robust_refit(self, lin: LinearMap, model: str, passes: int, trace: FitTrace) -> tuple[LinearMap, dict]:
        """Iteratively reweighted fine fits. Each pass takes every tissue patch's own best shift, fits the
        motion a change of the global ``model`` would make (shift, rotation, scale, ...) to those shifts by
        least median of squares, and weights each patch by Tukey's biweight of its residual from that
        motion, in units of the LMedS scale; the global fit is then redone with these weights.

        A global transform should follow the bulk of the tissue; a region that is locally deformed (or
        torn, folded, cut differently) otherwise pulls rotation and scale towards a compromise that fits
        neither. What the global fit then leaves in such a region is what the misregistration map shows.
        """
        prob = self.problem
        pid, grid = prob.patch_ids(CV_PATCH)
        rr, cc = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
        centres = np.column_stack([rr.ravel(), cc.ravel()]).astype(float) * CV_PATCH
        history = []
        for k in range(passes):
            ls = prob.local_shifts(lin, sigma=FINE_SIGMA, patch_px=CV_PATCH, iterations=3)
            shift = ls["shift"].reshape(-1, 2)
            ok = np.isfinite(shift).all(axis=1)
            n_par = 4 if model in ("translation", "similarity") else 6
            if ok.sum() < 2 * n_par:  # too few patches to tell the bulk from an outlier
                break
            resid, scale = _lmeds_motion(centres[ok], shift[ok], model, seed=k)
            u = np.zeros(len(shift))
            u[ok] = resid / (TUKEY_C * scale)
            w_patch = np.where(u < 1.0, (1.0 - u**2) ** 2, 0.0)
            w_patch[~ok] = 1.0  # a patch without its own estimate keeps its pixels at full weight
            lin = prob.fit_affine(lin, model=model, levels=(FINE_SIGMA,), max_iter=8, weights=w_patch[pid],
                                  trace=trace)
            self.robust_patch_weights = w_patch
            history.append({"scale_msi_px": round(scale, 4), "patches": int(ok.sum()),
                            "patches_below_half_weight": int((w_patch[ok] < 0.5).sum()),
                            "patches_excluded": int((w_patch[ok] == 0).sum())})
        return lin, {"weights": "Tukey biweight (c = 4.685) of each patch's residual from the LMedS fit of the "
                                "patch shifts, in units of the LMedS scale", "passes": history}

    def joint_landmark_fit(self, affine, fixed_xy_um: np.ndarray, moving_xy_um: np.ndarray, *,
                           quick: bool = False) -> tuple[object, dict]:
        """Affine fitted jointly to the landmarks and the channel criterion (see :func:`joint_fit`).

        ``affine`` is the landmarks' least-squares affine. The channel criterion's affine optimum is
        found from it (Levenberg–Marquardt, ``quick``: every 2nd pixel only, for the held-out folds),
        with its cluster-robust covariance; the landmarks count with their click noise, estimated
        from the affine's residuals (2n − 6 degrees of freedom). Needs ≥ 4 landmarks."""
        from ._channel_fit import channel_covariance, joint_fit

        t0 = time.perf_counter()
        lin0 = LinearMap.from_sitk(affine)
        x, y = np.asarray(fixed_xy_um, float), np.asarray(moving_xy_um, float)
        miss = (np.linalg.solve(lin0.matrix, (y - lin0.offset).T).T - x) / self.p
        sigma = float(np.sqrt((miss**2).sum() / max(2 * len(x) - 6, 1)))
        trace = FitTrace()
        if quick:
            prob = self.fast
            lin_c = prob.fit_affine(lin0, model="affine", levels=(FINE_SIGMA,), max_iter=6, trace=trace)
        else:
            prob = self.problem
            lin_c = self.fast.fit_affine(lin0, model="affine", levels=(1.0,), max_iter=10, trace=trace)
            lin_c = prob.fit_affine(lin_c, model="affine", levels=(FINE_SIGMA,), max_iter=6, trace=trace)
        cov = channel_covariance(prob, lin_c, FINE_SIGMA)
        lin, jinfo = joint_fit(prob, lin0, lin_c, cov, x, y, sigma)
        if quick:
            return self.to_sitk(lin), {}
        info = {
            "criterion": "channel regression",
            "model": "affine, joint with the landmarks",
            "iterations": trace.iterations,
            "channel_score": {"before": self.score(lin0), "channels_alone": self.score(lin_c),
                              "after": self.score(lin)},
            **jinfo,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        return self.to_sitk(lin), info

    # ---- stage 3 --------------------------------------------------------------------------------------
    def _bspline_from_shifts(self, lin: LinearMap, mesh_px: float, patch_fold: int | None, disp=None,
                             smooth: float = 1.0, remove_affine: bool = True):
        """B-spline (MSI space) fitted to per-patch residual shifts; ``patch_fold`` keeps one fold only."""
        import SimpleITK as sitk

        prob = self.problem
        rows, cols = self.targets.shape_rc
        ls = prob.local_shifts(lin, disp=disp, sigma=FINE_SIGMA, patch_px=CV_PATCH, iterations=2)
        n_r, n_c = ls["grid"]
        ci, cj = np.meshgrid(np.arange(n_r), np.arange(n_c), indexing="ij")
        good = np.isfinite(ls["shift"][..., 0])
        if patch_fold is not None:
            good &= ((ci + cj) % 2) != patch_fold
        if good.sum() < 6:
            return None, disp
        centres_rc = np.column_stack([np.minimum((ci[good] + 0.5) * CV_PATCH - 0.5, rows - 1),
                                      np.minimum((cj[good] + 0.5) * CV_PATCH - 0.5, cols - 1)])
        sd = ls["sd"][good]
        weight = 1.0 / np.maximum(sd, 0.05) ** 2
        d_xy = ls["shift"][good][:, ::-1] * self.p  # µm, (x, y)
        base = np.zeros((len(centres_rc), 2)) if disp is None else disp[
            np.round(centres_rc[:, 0]).astype(int), np.round(centres_rc[:, 1]).astype(int)]
        target = base + d_xy
        if remove_affine and len(target) >= 6:
            # the affine part of the residual field belongs to the affine stage (landmarks or the channel
            # fit): the B-spline keeps only the non-affine remainder
            design = np.column_stack([np.ones(len(centres_rc)), centres_rc])
            coef_aff = np.linalg.lstsq(design * np.sqrt(weight)[:, None], target * np.sqrt(weight)[:, None],
                                       rcond=None)[0]
            target = target - design @ coef_aff
        ref = sitk.Image(int(cols), int(rows), sitk.sitkFloat32)
        ref.SetSpacing((self.p, self.p))
        ref.SetOrigin((-self.p / 2, -self.p / 2))
        mesh = [max(1, int(round(cols / mesh_px))), max(1, int(round(rows / mesh_px)))]
        bs = sitk.BSplineTransformInitializer(ref, mesh, 3)
        n_par = len(bs.GetParameters())
        n_coef = n_par // 2
        pts = [tuple(v) for v in (centres_rc[:, ::-1] * self.p)]
        basis = np.empty((len(pts), n_coef))
        for k in range(n_coef):
            e = np.zeros(n_par)
            e[k] = 1.0
            bs.SetParameters(e.tolist())
            basis[:, k] = [bs.TransformPoint(x)[0] - x[0] for x in pts]
        gram = np.einsum("pi,pj->ij", basis, basis * weight[:, None])
        lam = smooth * float(np.trace(gram)) / n_coef * 0.05
        coef = np.linalg.solve(gram + lam * np.eye(n_coef), np.einsum("pi,pk->ik", basis, target * weight[:, None]))
        bs.SetParameters(np.round(np.concatenate([coef[:, 0], coef[:, 1]]), 6).tolist())
        return bs, self._disp(bs)

    def _disp(self, bspline) -> np.ndarray:
        from ._coords import GridSpec
        from ._stages import mapped_points_xy_um

        grid = GridSpec(self.targets.shape_rc, self.p)
        return mapped_points_xy_um(bspline, grid) - grid.pixel_centres_xy_um()

    def _heldout_sse(self, lin: LinearMap, disps) -> float:
        """Held-out squared residual: per pixel fold f, regression fitted on the other fold, with ``disps[f]``."""
        prob = self.problem
        y = prob.y(FINE_SIGMA)
        total = 0.0
        count = 0
        for f in (0, 1):
            phi, inside, _ = prob.sample(lin, FINE_SIGMA, disps[f])
            train, test = inside & (prob.folds != f), inside & (prob.folds == f)
            beta = ridge_fit(phi[train], y[train])
            total += float(((y[test] - predict(phi[test], beta)) ** 2).sum())
            count += int(test.sum())
        return total / max(count, 1)

    def fit_bspline(
        self, affine, *, mesh_px: float, iterations: int = 2, heldout: bool = True
    ) -> tuple[object | None, dict]:
        """Smooth warp from residual shifts, and the held-out channel criterion with and without it."""
        t0 = time.perf_counter()
        lin = LinearMap.from_sitk(affine)
        bs, disp = None, None
        for _ in range(iterations):
            bs, disp = self._bspline_from_shifts(lin, mesh_px, None, disp)
            if bs is None:
                break
        if not heldout:
            return bs, {}
        folds = []
        for f in (0, 1):
            bf, df = None, None
            for _ in range(max(1, iterations - 1)):
                bf, df = self._bspline_from_shifts(lin, mesh_px, 1 - f, df)  # fit on patches of the other fold
                if bf is None:
                    break
            folds.append(df)
        sse_affine = self._heldout_sse(lin, [None, None])
        sse_bs = self._heldout_sse(lin, folds) if all(d is not None for d in folds) else float("inf")
        sst = float(((self.problem.y(FINE_SIGMA) - self.problem.y(FINE_SIGMA).mean(0)) ** 2).sum(1).mean())
        info = {
            "criterion": "channel regression, residual shifts per patch",
            "mesh_msi_px": mesh_px,
            "heldout_channel_r2": {
                "affine": round(1 - sse_affine / sst, 6),
                "bspline": round(1 - sse_bs / sst, 6) if np.isfinite(sse_bs) else None,
            },
            "seconds": round(time.perf_counter() - t0, 3),
        }
        return bs, info

    # ---- quality ------------------------------------------------------------------------------------
    def misregistration_map(self, affine, bspline, tissue: np.ndarray) -> dict:
        """Per tissue patch, the residual shift (MSI px) that best aligns it after the final transform."""
        lin = LinearMap.from_sitk(affine)
        disp = None if bspline is None else self._disp(bspline)
        prob = self.problem
        ls = prob.local_shifts(lin, disp=disp, sigma=FINE_SIGMA, patch_px=CV_PATCH, iterations=3)
        n_r, n_c = ls["grid"]
        pid, _ = prob.patch_ids(CV_PATCH)
        t = tissue[prob.rows, prob.cols].astype(float)
        tissue_frac = (np.bincount(pid, t, n_r * n_c) / np.maximum(np.bincount(pid, None, n_r * n_c), 1)).reshape(
            n_r, n_c)
        shift = ls["shift"]
        mag = np.hypot(shift[..., 0], shift[..., 1])
        in_tissue = np.isfinite(mag) & (tissue_frac >= 0.5)
        mag = np.where(in_tissue, mag, np.nan)
        vals = mag[in_tissue]
        stats = (
            {"median": round(float(np.median(vals)), 4), "p90": round(float(np.percentile(vals, 90)), 4),
             "n_patches": int(len(vals)), "flagged": int((vals > FLAG_MSI_PX).sum())}
            if len(vals) else None
        )
        # the map on the MSI grid: each pixel shows its patch's residual shift (NaN outside tissue patches)
        full = np.repeat(np.repeat(mag, CV_PATCH, 0), CV_PATCH, 1)[: self.targets.shape_rc[0], : self.targets.shape_rc[1]]
        return {
            "magnitude_msi_px": full.astype(np.float32),
            "patch_shift_rc_msi_px": np.where(in_tissue[..., None], shift, np.nan).astype(np.float32),
            "patch_sd_msi_px": np.where(in_tissue, ls["sd"], np.nan).astype(np.float32),
            "patch_px": CV_PATCH,
            "stats": stats,
        }

    def confidence(self, affine, bspline, *, model: str, n_boot: int = 8, seed: int = 0,
                   patch_weights: np.ndarray | None = None) -> dict:
        """Bootstrap over tissue blocks: refit the global transform under Poisson block weights and
        measure how far the pixels move (RMS over pixels, MSI px); its median over replicates.
        ``patch_weights``: the robust fit's per-patch weights, so the bootstrap refits the same estimator."""
        rng = np.random.default_rng(seed)
        lin0 = LinearMap.from_sitk(affine)
        disp = None if bspline is None else self._disp(bspline)
        prob = self.fast
        block = (prob.rows // CV_PATCH) * 1000 + prob.cols // CV_PATCH
        uniq, inv = np.unique(block, return_inverse=True)
        pts = prob.xy
        moves = []
        pixel_weights = None if patch_weights is None else patch_weights[prob.patch_ids(CV_PATCH)[0]]
        for _ in range(n_boot):
            w = rng.poisson(1.0, len(uniq)).astype(float)[inv]
            if pixel_weights is not None:
                w = w * pixel_weights
            lin = prob.fit_affine(lin0, model=model, levels=(FINE_SIGMA,), disp=disp, max_iter=4, weights=w)
            d = np.linalg.norm(lin.apply(pts) - lin0.apply(pts), axis=1) / (self.p * lin0.scale)
            moves.append(float(np.sqrt((d**2).mean())))
        return {"bootstrap_rms_msi_px": round(float(np.sqrt(np.mean(np.square(moves)))), 4), "n_boot": n_boot}


def _motion_design(centres: np.ndarray, model: str) -> np.ndarray:
    """(2n, k) design: the shift (row, col) a small change of ``model`` makes at each centre, stacked."""
    n = len(centres)
    r, c = (centres - centres.mean(axis=0)).T / max(float(np.ptp(centres)), 1.0)
    one, zero = np.ones(n), np.zeros(n)
    cols_r = [one, zero, r, -c] if model in ("translation", "similarity") else [one, zero, r, c, zero, zero]
    cols_c = [zero, one, c, r] if model in ("translation", "similarity") else [zero, one, zero, zero, r, c]
    if model == "translation":
        cols_r, cols_c = cols_r[:2], cols_c[:2]
    design = np.empty((2 * n, len(cols_r)))
    design[0::2] = np.column_stack(cols_r)
    design[1::2] = np.column_stack(cols_c)
    return design


def _lmeds_motion(centres: np.ndarray, shifts: np.ndarray, model: str, *, seed: int,
                  n_subsets: int = 300) -> tuple[np.ndarray, float]:
    """Least-median-of-squares fit of a ``model`` motion to patch shifts (Rousseeuw 1984): exact fits
    to random minimal sets of patches (seeded), the one with the smallest median squared residual.
    Returns each patch's residual length (MSI px) and the robust scale (Rousseeuw & Leroy's
    1.4826·(1 + 5/(n − p))·√median r², floored at 0.05 px)."""
    design = _motion_design(centres, model)
    y = shifts.reshape(-1)
    n, k = len(centres), design.shape[1]
    per = -(-k // 2)  # patches in a minimal set (two equations each)
    rng = np.random.default_rng(seed)
    best, best_med = None, np.inf
    for _ in range(n_subsets):
        pick = rng.choice(n, per, replace=False)
        rows = np.concatenate([2 * pick, 2 * pick + 1])
        theta, *_ = np.linalg.lstsq(design[rows], y[rows], rcond=None)
        r2 = ((design @ theta - y).reshape(n, 2) ** 2).sum(axis=1)
        med = float(np.median(r2))
        if med < best_med:
            best, best_med = theta, med
    resid = np.sqrt(((design @ best - y).reshape(n, 2) ** 2).sum(axis=1))
    scale = 1.4826 * (1 + 5 / max(n - per, 1)) * np.sqrt(best_med)
    return resid, max(float(scale), 0.05)
