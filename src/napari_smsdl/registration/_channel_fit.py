"""Fits on the many-channel criterion: Gauss–Newton affine, per-patch residual shifts, a smooth warp.

A transform is handled here as NumPy: ``y = M (x + d(x)) + b`` maps MSI physical ``x`` (µm) to H&E
physical ``y`` (µm), with ``d`` an optional displacement field on the MSI grid (a B-spline sampled).
For a given transform the ion PCs ``Y`` are regressed on the sampled histology features ``Φ``
(ridge); the prediction's spatial gradient (central differences through the features) linearises
the residual in the transform parameters (Lucas–Kanade with a learned, many-channel intensity map).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ._channels import ChannelTargets, OpticalFeatures, block_folds, cv_r2, predict, ridge_fit

__all__ = ["ChannelProblem", "LinearMap"]

#: Gaussian smoothing (MSI px) of both sides, coarse to fine
LEVELS_MSI_PX = (2.0, 1.0, 0.5)
#: side of the tissue patches of the misregistration map (MSI px)
CV_PATCH = 16


@dataclass(frozen=True)
class LinearMap:
    """``y = matrix @ x + offset`` (MSI physical (x, y) µm → H&E physical (x, y) µm)."""

    matrix: np.ndarray
    offset: np.ndarray

    @classmethod
    def from_sitk(cls, affine) -> LinearMap:
        import SimpleITK as sitk

        a = sitk.AffineTransform(affine)
        m = np.asarray(a.GetMatrix(), float).reshape(2, 2)
        c = np.asarray(a.GetCenter(), float)
        t = np.asarray(a.GetTranslation(), float)
        return cls(m, c + t - m @ c)

    def to_sitk(self, center_xy_um):
        """A SimpleITK affine with centre ``center_xy_um``, parameters rounded (bit-stable files)."""
        import SimpleITK as sitk

        c = np.asarray(center_xy_um, float)
        m = np.round(self.matrix, 12)
        t = np.round(self.offset + m @ c - c, 9)
        tx = sitk.AffineTransform(2)
        tx.SetMatrix(m.ravel().tolist())
        tx.SetCenter(tuple(c.tolist()))
        tx.SetTranslation(tuple(t.tolist()))
        return tx

    def apply(self, xy: np.ndarray) -> np.ndarray:
        return xy @ self.matrix.T + self.offset

    @property
    def scale(self) -> float:
        return float(np.sqrt(abs(np.linalg.det(self.matrix))))


@dataclass
class FitTrace:
    """What a fit did (for the report)."""

    iterations: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)


class ChannelProblem:
    """The ion PCs and histology features of one registration, with per-level caches.

    Parameters
    ----------
    targets : ChannelTargets
    features : OpticalFeatures
    he_per_msi : float
        H&E µm per MSI µm (approximate; only sets the feature smoothing per level).
    """

    def __init__(
        self, targets: ChannelTargets, features: OpticalFeatures, he_per_msi: float, *, stride: int = 1, _share=None
    ):
        self.targets = targets
        self.features = features
        self.p = targets.pixel_size_um
        self.per_msi_px = self.p * he_per_msi / features.pixel_size_um  # reduced px per MSI px
        self.he_per_msi = he_per_msi
        sel = targets.mask.copy()
        if stride > 1:
            keep = np.zeros_like(sel)
            keep[::stride, ::stride] = True
            sel &= keep
        rows, cols = np.nonzero(sel)
        self.rows, self.cols = rows, cols
        self.xy = np.column_stack([cols * self.p, rows * self.p]).astype(float)
        shape = targets.shape_rc
        self.centre_xy = np.array([(shape[1] - 1) / 2 * self.p, (shape[0] - 1) / 2 * self.p])
        self.folds = block_folds(shape)[rows, cols]
        self._y: dict[float, np.ndarray] = {}
        self._f: dict[float, np.ndarray] = {} if _share is None else _share._f
        self._g: dict[float, np.ndarray] = {} if _share is None else _share._g
        self._full_y = {} if _share is None else _share._full_y
        self._edge: dict[float, np.ndarray] = {}

    def subset(self, stride: int) -> ChannelProblem:
        """The same problem on every ``stride``-th pixel per axis (caches shared)."""
        return ChannelProblem(self.targets, self.features, self.he_per_msi, stride=stride, _share=self)

    # ---- caches -------------------------------------------------------------------------------------
    def y(self, sigma: float) -> np.ndarray:
        if sigma not in self._y:
            if sigma not in self._full_y:
                self._full_y[sigma] = self.targets.smoothed(sigma)
            self._y[sigma] = self._full_y[sigma][:, self.rows, self.cols].T
        return self._y[sigma]

    def f(self, sigma: float) -> np.ndarray:
        if sigma not in self._f:
            from ._channels import pixel_major

            images = self.features.smoothed(sigma, self.per_msi_px)
            d_row, d_col = np.gradient(images, axis=(1, 2))  # per reduced pixel
            self._f[sigma] = pixel_major(images)
            self._g[sigma] = pixel_major(np.concatenate([d_col, d_row]).astype(np.float32))
        return self._f[sigma]

    def edge_ok(self, sigma: float) -> np.ndarray:
        """(n,) pixels at least 2 sigma from the MSI grid's edge and from non-acquired pixels."""
        if sigma not in self._edge:
            from scipy.ndimage import binary_erosion

            r = int(np.ceil(2 * sigma))
            m = self.targets.mask
            if r > 0:
                m = binary_erosion(np.pad(m, r), iterations=r)[r:-r, r:-r]
            self._edge[sigma] = m[self.rows, self.cols]
        return self._edge[sigma]

    # ---- sampling ----------------------------------------------------------------------------------
    def points(self, disp_xy_um: np.ndarray | None) -> np.ndarray:
        if disp_xy_um is None:
            return self.xy
        return self.xy + disp_xy_um[self.rows, self.cols]

    def sample(self, lin: LinearMap, sigma: float, disp=None, shift_px: np.ndarray | None = None, grad=False):
        """Features at the mapped pixels: (phi (n, F), inside (n,), [dphi/dx, dphi/dy] per MSI px)."""
        x = self.points(disp)
        if shift_px is not None:
            x = x + shift_px * self.p
        y = lin.apply(x)
        images = self.f(sigma)
        margin = 2.0 * sigma * self.per_msi_px
        if not grad:
            phi, inside = self.features.sample(images, y, margin)
            inside &= self.edge_ok(sigma)
            return phi, inside, None
        phi, inside, g = self.features.sample(images, y, margin, gradients=self._g[sigma])
        inside &= self.edge_ok(sigma)
        n_f = phi.shape[1]
        d_col, d_row = g[:, :n_f], g[:, n_f:]
        per = self.p / self.features.pixel_size_um  # chain rule: reduced px per µm, times µm per MSI px
        grads = [(d_col * lin.matrix[0, axis] + d_row * lin.matrix[1, axis]) * per for axis in range(2)]
        return phi, inside, grads

    # ---- scores ------------------------------------------------------------------------------------
    def score(self, lin: LinearMap, sigma: float = 0.0, disp=None, weights=None) -> dict:
        """Cross-validated R² (blocks), in-sample R² and the overlap of the mapped MSI grid."""
        phi, inside, _ = self.sample(lin, sigma, disp)
        y = self.y(sigma)
        w = None if weights is None else weights[inside]
        if inside.sum() < max(50, 4 * phi.shape[1]):
            return {"cv_r2": float("nan"), "r2": float("nan"), "overlap": float(inside.mean())}
        cv = cv_r2(phi[inside], y[inside], self.folds[inside], w)
        beta = ridge_fit(phi[inside], y[inside], w)
        res = y[inside] - predict(phi[inside], beta)
        sst = ((y[inside] - y[inside].mean(axis=0)) ** 2).sum()
        return {"cv_r2": cv, "r2": 1.0 - float((res**2).sum()) / max(float(sst), 1e-12), "overlap": float(inside.mean())}

    # ---- global fit ----------------------------------------------------------------------------------
    def fit_affine(
        self,
        lin: LinearMap,
        *,
        model: str = "affine",
        levels=LEVELS_MSI_PX,
        disp=None,
        max_iter: int = 20,
        tol_px: float = 0.003,
        weights=None,
        trace: FitTrace | None = None,
    ) -> LinearMap:
        """Levenberg–Marquardt on the regression residual, coarse to fine. ``model``: translation,
        similarity or affine (the deformation added to the MSI side before ``lin``)."""
        for sigma in levels:
            lin, it = self._lm_level(lin, sigma, model, disp, max_iter, tol_px, weights)
            if trace is not None:
                trace.iterations.append(it)
        return lin

    def _objective(self, lin, sigma, disp, weights):
        phi, inside, _ = self.sample(lin, sigma, disp)
        y = self.y(sigma)
        if inside.sum() < max(50, 4 * phi.shape[1]):
            return np.inf
        w = np.ones(int(inside.sum())) if weights is None else weights[inside]
        beta = ridge_fit(phi[inside], y[inside], w)
        res = y[inside] - predict(phi[inside], beta)
        return float((w[:, None] * res**2).sum() / w.sum())

    def _lm_level(self, lin, sigma, model, disp, max_iter, tol_px, weights):
        y = self.y(sigma)
        x = self.points(disp)
        uv = (x - self.centre_xy) / self.p  # MSI px from the field centre
        half = max(float(np.abs(uv).max()), 1.0)
        uv_n = uv / half
        mu = 1e-3
        current = self._objective(lin, sigma, disp, weights)
        it = 0
        for it in range(1, max_iter + 1):
            phi, inside, (gx, gy) = self.sample(lin, sigma, disp, grad=True)
            if inside.sum() < max(50, 4 * phi.shape[1]):
                break
            w = np.ones(len(phi)) if weights is None else weights
            w = np.where(inside, w, 0.0)
            beta = ridge_fit(phi[inside], y[inside], w[inside])
            res = (y - predict(phi, beta)) * (w > 0)[:, None]
            qx, qy = (np.einsum("nf,fk->nk", g, beta[1:]) for g in (gx, gy))  # (n, K) prediction gradients per MSI px
            u, v = uv_n[:, 0:1], uv_n[:, 1:2]
            if model == "translation":
                cols = [qx, qy]
            elif model == "similarity":
                cols = [qx, qy, qx * u + qy * v, -qx * v + qy * u]
            else:
                cols = [qx, qy, qx * u, qx * v, qy * u, qy * v]
            jac = np.stack([c * np.sqrt(w)[:, None] for c in cols], axis=-1)  # (n, K, P)
            r = res * np.sqrt(w)[:, None]
            h = np.einsum("nkp,nkq->pq", jac, jac)
            g = np.einsum("nkp,nk->p", jac, r)
            accepted = False
            for _ in range(8):
                step = np.linalg.solve(h + mu * np.diag(np.diag(h) + 1e-9), g)
                cand = self._update(lin, step, model, half)
                value = self._objective(cand, sigma, disp, weights)
                if value < current:
                    lin, current, accepted = cand, value, True
                    mu = max(mu / 3, 1e-6)
                    break
                mu *= 4
            if not accepted:
                break
            move = np.abs(step[:2]).max() + (np.abs(step[2:]).max() if len(step) > 2 else 0.0)
            if move < tol_px:
                break
        return lin, it

    def _update(self, lin: LinearMap, step: np.ndarray, model: str, half: float) -> LinearMap:
        t = step[:2]
        if model == "translation":
            lmat = np.zeros((2, 2))
        elif model == "similarity":
            a, b = step[2] / half, step[3] / half
            lmat = np.array([[a, -b], [b, a]])
        else:
            lmat = np.array([[step[2], step[3]], [step[4], step[5]]]) / half
        # D(x) = p t + L (x - c)  (µm);  y = M (x + D(x)) + b
        m = lin.matrix @ (np.eye(2) + lmat)
        off = lin.offset + lin.matrix @ (self.p * t - lmat @ self.centre_xy)
        return LinearMap(m, off)

    # ---- local shifts --------------------------------------------------------------------------------
    def patch_ids(self, patch_px: int) -> tuple[np.ndarray, tuple[int, int]]:
        shape = self.targets.shape_rc
        n_r, n_c = -(-shape[0] // patch_px), -(-shape[1] // patch_px)
        return (self.rows // patch_px) * n_c + self.cols // patch_px, (n_r, n_c)

    def local_shifts(
        self,
        lin: LinearMap,
        *,
        disp=None,
        sigma: float = 0.5,
        patch_px: int = CV_PATCH,
        iterations: int = 3,
        pixel_weights: np.ndarray | None = None,
        fit_mask: np.ndarray | None = None,
        max_shift_px: float = 3.0,
    ) -> dict:
        """Per patch, the residual MSI shift (px) that best aligns it, with the global regression fixed.

        Returns a dict with ``shift`` (n_r, n_c, 2) (row, col) MSI px (NaN where a patch has too few
        pixels), ``sd`` (n_r, n_c) its standard error (px, from the Gauss–Newton curvature and the
        residual variance), ``count`` (n_r, n_c) pixels used, and ``grid`` (n_r, n_c).
        """
        y = self.y(sigma)
        pid, grid = self.patch_ids(patch_px)
        n_p = grid[0] * grid[1]
        use = np.ones(len(pid), bool) if pixel_weights is None else pixel_weights > 0
        phi, inside, _ = self.sample(lin, sigma, disp)
        fit_sel = inside & (use if fit_mask is None else (fit_mask & use))
        beta = ridge_fit(phi[fit_sel], y[fit_sel])
        shift = np.zeros((n_p, 2))  # (x, y) MSI px
        h_last = np.zeros((n_p, 2, 2))
        s2 = np.zeros(n_p)
        count = np.zeros(n_p)
        for _ in range(iterations):
            phi, inside, (gx, gy) = self.sample(lin, sigma, disp, shift_px=shift[pid], grad=True)
            ok = inside & use
            res = (y - predict(phi, beta)) * ok[:, None]
            qx, qy = (np.einsum("nf,fk->nk", g, beta[1:]) * ok[:, None] for g in (gx, gy))
            hxx = np.bincount(pid, (qx * qx).sum(1), n_p)
            hxy = np.bincount(pid, (qx * qy).sum(1), n_p)
            hyy = np.bincount(pid, (qy * qy).sum(1), n_p)
            bx = np.bincount(pid, (qx * res).sum(1), n_p)
            by = np.bincount(pid, (qy * res).sum(1), n_p)
            count = np.bincount(pid, ok.astype(float), n_p)
            s2 = np.bincount(pid, (res**2).sum(1), n_p) / np.maximum(count * y.shape[1], 1)
            h = np.stack([np.stack([hxx, hxy], -1), np.stack([hxy, hyy], -1)], -2)
            h_last = h
            det = hxx * hyy - hxy**2
            good = (count >= 0.25 * patch_px**2) & (det > 1e-12 * np.maximum(hxx + hyy, 1e-12) ** 2)
            dx = np.where(good, (hyy * bx - hxy * by) / np.where(good, det, 1), 0.0)
            dy = np.where(good, (hxx * by - hxy * bx) / np.where(good, det, 1), 0.0)
            shift = np.clip(shift + np.column_stack([dx, dy]), -max_shift_px, max_shift_px)
        det = h_last[:, 0, 0] * h_last[:, 1, 1] - h_last[:, 0, 1] ** 2
        good = (count >= 0.25 * patch_px**2) & (det > 0)
        tr_inv = np.where(good, (h_last[:, 0, 0] + h_last[:, 1, 1]) / np.where(good, det, 1), np.nan)
        sd = np.sqrt(s2 * tr_inv)
        out_shift = np.where(good[:, None], shift[:, ::-1], np.nan)  # (row, col)
        return {
            "shift": out_shift.reshape(grid + (2,)),
            "sd": np.where(good, sd, np.nan).reshape(grid),
            "count": count.reshape(grid),
            "grid": grid,
            "patch_px": patch_px,
            "information": h_last.reshape(grid + (2, 2)),
        }



# ---- the joint fit with landmarks ------------------------------------------------------------------------
# Parameters θ = (tx, ty, Sxx, Sxy, Syx, Syy) of a small affine change about a base map ``lin0``: an MSI point
# x moves by D(x) = t + S·u(x) MSI px before ``lin0`` (u: offset from the field centre divided by the half
# field, as in the Levenberg–Marquardt fit), so every map near ``lin0`` is linear in θ and so are the
# landmark residuals.


def _half_field(problem: ChannelProblem) -> float:
    uv = (problem.xy - problem.centre_xy) / problem.p
    return max(float(np.abs(uv).max()), 1.0)


def theta_between(problem: ChannelProblem, lin0: LinearMap, lin: LinearMap) -> np.ndarray:
    """θ (see above) with ``lin = lin0 ∘ (x + D_θ(x))``."""
    half = _half_field(problem)
    m0_inv = np.linalg.inv(lin0.matrix)
    a = m0_inv @ lin.matrix - np.eye(2)
    b = m0_inv @ (lin.offset - lin0.offset)
    t = (a @ problem.centre_xy + b) / problem.p
    s = a * half
    return np.array([t[0], t[1], s[0, 0], s[0, 1], s[1, 0], s[1, 1]])


def map_from_theta(problem: ChannelProblem, lin0: LinearMap, theta: np.ndarray) -> LinearMap:
    """Inverse of :func:`theta_between`."""
    return problem._update(lin0, np.asarray(theta, float), "affine", _half_field(problem))


def channel_covariance(problem: ChannelProblem, lin: LinearMap, sigma: float, block_px: int = CV_PATCH) -> np.ndarray:
    """(6, 6) covariance of the channel criterion's affine optimum θ (MSI px), cluster-robust over tissue blocks.

    The regression residuals of neighbouring pixels are correlated (shared misfit of the forward
    model, not independent noise), so the naive Gauss–Newton covariance ``s² H⁻¹`` is far too small
    (by a factor of about 3 in sd on the bladder pair). The sandwich ``H⁻¹ (Σ_b g_b g_bᵀ) H⁻¹`` with
    per-block score vectors ``g_b`` treats each ``block_px`` block as one independent observation."""
    y = problem.y(sigma)
    half = _half_field(problem)
    u, v = (((problem.xy - problem.centre_xy) / problem.p) / half).T
    phi, inside, (gx, gy) = problem.sample(lin, sigma, None, grad=True)
    beta = ridge_fit(phi[inside], y[inside])
    res = (y - predict(phi, beta)) * inside[:, None]
    qx, qy = (np.einsum("nf,fk->nk", g, beta[1:]) * inside[:, None] for g in (gx, gy))
    jac = np.stack([qx, qy, qx * u[:, None], qx * v[:, None], qy * u[:, None], qy * v[:, None]], axis=-1)
    h = np.einsum("nkp,nkq->pq", jac, jac)
    score = np.einsum("nkp,nk->np", jac, res)
    pid, grid = problem.patch_ids(block_px)
    n_b = grid[0] * grid[1]
    per_block = np.stack([np.bincount(pid, score[:, i], n_b) for i in range(6)], axis=1)
    per_block = per_block[np.bincount(pid, inside.astype(float), n_b) > 0]
    n_used = len(per_block)
    h_inv = np.linalg.pinv(h, hermitian=True)  # pinv: a parameter the pixels do not fix gets no weight
    return h_inv @ np.einsum("bp,bq->pq", per_block, per_block) @ h_inv * n_used / max(n_used - 1, 1)


def landmark_information(problem: ChannelProblem, lin0: LinearMap, fixed_xy_um: np.ndarray,
                         moving_xy_um: np.ndarray, sigma_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Information matrix (6, 6) and θ-gradient (6,) of the landmark misfit Σ |r_i|² / σ² at θ = 0.

    ``r_i`` is landmark i's miss in MSI px (``lin0⁻¹`` of the H&E point minus the MSI point, the
    change D_θ taken off); ``sigma_px`` the click noise per axis in MSI px."""
    half = _half_field(problem)
    x = np.asarray(fixed_xy_um, float)
    d = (np.linalg.solve(lin0.matrix, (np.asarray(moving_xy_um, float) - lin0.offset).T).T - x) / problem.p
    u, v = (((x - problem.centre_xy) / problem.p) / half).T
    a = np.zeros((2 * len(x), 6))
    a[0::2, 0], a[0::2, 2], a[0::2, 3] = 1.0, u, v
    a[1::2, 1], a[1::2, 4], a[1::2, 5] = 1.0, u, v
    w = 1.0 / max(float(sigma_px), 1e-3) ** 2
    return w * a.T @ a, w * a.T @ d.ravel()


def joint_fit(problem: ChannelProblem, lin0: LinearMap, lin_channel: LinearMap, cov_channel: np.ndarray,
              fixed_xy_um: np.ndarray, moving_xy_um: np.ndarray, sigma_px: float) -> tuple[LinearMap, dict]:
    """The affine that best fits both the landmarks (weighted by their click noise) and the channel
    criterion (weighted by its cluster-robust covariance), in the quadratic approximation of each
    about its own optimum; ``lin0`` is the landmarks' least-squares affine.

    Returns the map and the standard deviations (MSI px) of θ from each source and combined."""
    info_l, grad_l = landmark_information(problem, lin0, fixed_xy_um, moving_xy_um, sigma_px)
    theta_l = np.linalg.lstsq(info_l, grad_l, rcond=None)[0]  # ≈ 0 when lin0 is their least-squares fit
    theta_c = theta_between(problem, lin0, lin_channel)
    # consistency (Birge ratio): the two estimates must agree within their stated errors. The channel
    # covariance counts block-to-block scatter but not a misfit of the forward model shared by the whole
    # field, so where the landmarks sit further from the channel optimum than both errors allow, the
    # channel covariance is inflated until they agree (χ² of the difference = its 6 degrees of freedom)
    diff = theta_c - theta_l
    cov_l = np.linalg.pinv(info_l, hermitian=True)
    chi2 = float(diff @ np.linalg.pinv(cov_channel + cov_l, hermitian=True) @ diff)
    inflation = 1.0
    if chi2 > len(diff):
        lo, hi = 1.0, 1e6
        for _ in range(30):  # bisection on the factor: χ²(k) falls monotonically with k
            mid = np.sqrt(lo * hi)
            if float(diff @ np.linalg.pinv(mid * cov_channel + cov_l, hermitian=True) @ diff) > len(diff):
                lo = mid
            else:
                hi = mid
        inflation = hi
    info_c = np.linalg.pinv(inflation * cov_channel, hermitian=True)
    total = info_c + info_l
    theta = np.linalg.lstsq(total, info_c @ theta_c + info_l @ theta_l, rcond=None)[0]
    # expected error of the joint affine, RMS over the MSI field (MSI px): its covariance mapped to each pixel
    half = _half_field(problem)
    u, v = (((problem.xy - problem.centre_xy) / problem.p) / half).T
    cov = np.linalg.pinv(total, hermitian=True)
    var = 0.0
    for axis in range(2):
        idx = [axis, 2 + 2 * axis, 3 + 2 * axis]  # (t, S_axis,u, S_axis,v)
        g = np.column_stack([np.ones_like(u), u, v])
        var += np.einsum("ni,ij,nj->n", g, cov[np.ix_(idx, idx)], g)
    rms = float(np.sqrt(var.mean()))
    sd = {name: np.sqrt(np.clip(np.diag(np.linalg.pinv(m, hermitian=True)), 0, None)).round(4).tolist()
          for name, m in (("channels", info_c), ("landmarks", info_l), ("joint", total))}
    return map_from_theta(problem, lin0, theta), {"theta_sd_msi_px": sd, "landmark_sigma_msi_px": round(sigma_px, 4),
                                                  "disagreement_chi2": round(chi2, 3),
                                                  "expected_rms_error_msi_px": round(rms, 4),
                                                  "channel_covariance_inflation": round(float(inflation), 3),
                                                  "channel_weight": round(float(np.trace(cov @ info_c) / 6), 4)}
