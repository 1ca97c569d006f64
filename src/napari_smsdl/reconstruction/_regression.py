"""SMSDL regression: features on the SR grid → every m/z channel, trained through the forward model.

A multilayer perceptron shared across channels (one trunk, one positive output per channel) maps
each SR cell's features — the multi-level ViT features plus the bicubic-upsampled MSI — to the
intensities of all chosen channels. It never sees a high-resolution target: its loss compares the
mean of its predictions over the F × F cells of each MSI pixel with the measured MSI pixel, over
acquired tissue pixels only. A few restarts with fixed seeds are combined by their median, and an
optional final rescale makes each MSI pixel's mean exactly the measured value.

Under torchrun (a torch.distributed process group of N > 1 processes) the training pixels are
sharded across ranks and DistributedDataParallel averages the gradients; every rank ends with
rank 0's weights (see :func:`train_regression`). :mod:`napari_smsdl.reconstruction` reuses the pieces
(:func:`_targets`, :func:`_design_matrix`, :func:`_fit`) to train chunks of many channels.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import Cancelled, InputError
from ..torch_setup import get_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegressionParams:
    """Training settings of the regression network."""

    hidden: int = 128
    layers: int = 3
    # Few steps on purpose: the forward-model loss keeps falling long after the SR image stops
    # improving (sample, F = 4: 300 steps SSIM 0.81, 750 steps 0.76), see docs/method.md.
    steps: int = 300
    holdout: float = 0.0  # fraction of MSI pixels held out; the best held-out state is kept
    batch_pixels: int = 256  # MSI pixels per step (each brings its F × F SR cells)
    pca_dims: int = 48  # features are reduced by PCA first (0 keeps them all)
    # ... and to at most one dimension per this many training MSI pixels (0: no cap). Each MSI
    # pixel is one constraint; with few of them (mouse F = 4: 80 pixels) 48 dimensions overfit.
    pixels_per_dim: int = 4
    lr: float = 2e-3
    weight_decay: float = 1e-4
    restarts: int = 3
    use_bicubic_input: bool = True
    # Final rescale so each MSI pixel's mean is reproduced exactly. Off by default: on the
    # built-in sample it lowered SSIM (0.827 → 0.813), as it imprints the measurement noise.
    conserve_mean: bool = False
    seed: int = 0


FAST_REGRESSION = RegressionParams(hidden=96, steps=200, restarts=3, pca_dims=32)


@dataclass(frozen=True)
class RegressionResult:
    """``sr`` (C, rows·F, cols·F) float32 in the MSI's units; ``loss_history`` of the first restart."""

    sr: np.ndarray
    loss_history: list
    seconds: float
    device: str


def block_mean(stack, factor: int):
    """Mean over F × F blocks of the last two axes (numpy or torch)."""
    *lead, rows, cols = stack.shape
    return stack.reshape(*lead, rows // factor, factor, cols // factor, factor).mean(axis=(-3, -1))


def effective_pca_dims(params: RegressionParams, n_train_pixels: int) -> int:
    """PCA dimensions actually used: ``params.pca_dims``, capped at one per ``pixels_per_dim`` pixels.

    The cap never goes below 8 dimensions; 0 (no PCA) stays 0 unless the cap applies.
    """
    if params.pixels_per_dim <= 0:
        return params.pca_dims
    cap = max(8, int(n_train_pixels) // params.pixels_per_dim)
    return cap if params.pca_dims <= 0 else min(params.pca_dims, cap)


def _standardise(features: np.ndarray, pca_dims: int = 0) -> np.ndarray:
    """(D, ...) → (D', N) standardised, optionally reduced to ``pca_dims`` principal components."""
    flat = features.reshape(features.shape[0], -1).astype(np.float64)
    flat = (flat - flat.mean(1, keepdims=True)) / (flat.std(1, keepdims=True) + 1e-6)
    if 0 < pca_dims < flat.shape[0]:
        u, sv, _ = np.linalg.svd(flat @ flat.T)  # D × D: cheap for any number of cells
        flat = u[:, :pca_dims].T @ flat
        flat /= flat[0].std() + 1e-6  # keep the scale of the leading component at 1
    return flat.astype(np.float32)


def train_regression(
    features: np.ndarray,
    lr_msi: np.ndarray,
    factor: int,
    *,
    mask_lr: np.ndarray | None = None,
    bicubic: np.ndarray | None = None,
    params: RegressionParams = RegressionParams(),
    device: str = "auto",
    progress: Callable[[str, int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_loss: Callable[[int, float], None] | None = None,
) -> RegressionResult:
    """Train the shared network on the forward-model loss and predict every channel on the SR grid.

    Under ``torchrun`` (a process group of N > 1 processes is initialised, see
    :mod:`napari_smsdl.distributed`) every rank must call this with the same arguments: the
    training MSI pixels are sharded across ranks, each rank draws ``batch_pixels / N`` of its own
    pixels per step, DistributedDataParallel averages the gradients, and rank 0's final weights are
    broadcast so every rank returns the same ``sr``. In a single process nothing changes.

    Parameters
    ----------
    features : (D, rows·F, cols·F) float
        Per-SR-cell features (see :func:`napari_smsdl.features.extract_features`).
    lr_msi : (C, rows, cols) float
        The measured low-resolution MSI; NaN marks pixels without a spectrum.
    factor : int
        F, SR cells per MSI pixel side.
    mask_lr : (rows, cols) bool, optional
        Tissue pixels to train on (default: acquired pixels with any non-zero channel).
    bicubic : (C, rows·F, cols·F), optional
        Bicubic upsampling of ``lr_msi``, used as an extra input when ``params.use_bicubic_input``.
    """
    import torch

    start = time.perf_counter()
    lr_msi = np.asarray(lr_msi, np.float32)
    n_ch, rows, cols = lr_msi.shape
    if features.shape[1:] != (rows * factor, cols * factor):
        raise InputError(f"features {features.shape[1:]} do not match the SR grid {(rows * factor, cols * factor)}")
    mask_lr, scale, target = _targets(lr_msi, mask_lr)
    dims = effective_pca_dims(params, int(mask_lr.sum()))
    if dims != params.pca_dims:
        log.info("%d training pixels: features reduced to %d PCA dimensions (not %d)", mask_lr.sum(), dims, params.pca_dims)
    x_np = _design_matrix(_standardise(features, dims), bicubic, scale, params)  # (N_sr, D')

    dev = get_device(device)
    x = torch.from_numpy(x_np).to(dev)
    nets, history = _fit(
        x, target, mask_lr, factor, params, dev, progress=progress, should_stop=should_stop, on_loss=on_loss,
        distributed=_ddp_active(),
    )
    predictions = []
    for net in nets:
        with torch.no_grad():
            pred = torch.nn.functional.softplus(net(x)).T.reshape(n_ch, rows * factor, cols * factor)
        predictions.append(pred.cpu().numpy())
    sr = np.median(np.stack(predictions), axis=0) * scale[:, None, None]
    if params.conserve_mean:
        sr = conserve_block_means(sr, lr_msi, factor, mask_lr)
    total_steps = params.steps * params.restarts
    if progress is not None:
        progress("SMSDL regression", total_steps, total_steps)
    return RegressionResult(sr.astype(np.float32), history, time.perf_counter() - start, str(dev))


def _ddp_active() -> bool:
    """True when a torch.distributed process group of more than one process is initialised."""
    from ..distributed import is_distributed

    return is_distributed()


def _targets(lr_msi: np.ndarray, mask_lr: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(training mask (rows, cols) bool, per-channel scale (C,), scaled target (C, rows, cols)).

    Every channel is divided by its 99th percentile over the mask so all weigh the same in the loss.
    """
    n_ch = lr_msi.shape[0]
    acquired = np.isfinite(lr_msi).all(axis=0)
    if mask_lr is None:
        mask_lr = acquired & (np.nan_to_num(lr_msi) != 0).any(axis=0)
    mask_lr = np.asarray(mask_lr, bool) & acquired
    if mask_lr.sum() < 4:
        raise InputError(f"only {int(mask_lr.sum())} tissue pixels to train on; check the MSI mask")
    scale = np.array([np.percentile(lr_msi[c][mask_lr], 99) or 1.0 for c in range(n_ch)], np.float32)
    scale[scale <= 0] = 1.0
    target = np.nan_to_num(lr_msi) / scale[:, None, None]
    return mask_lr, scale, target


def _design_matrix(features_std: np.ndarray, bicubic, scale: np.ndarray, params: RegressionParams) -> np.ndarray:
    """Network input (N_sr, D'): standardised features (D'', N_sr), then the scaled bicubic channels."""
    inputs = [features_std]
    if params.use_bicubic_input and bicubic is not None:
        inputs.append((np.nan_to_num(bicubic) / scale[:, None, None]).reshape(len(scale), -1).astype(np.float32))
    return np.concatenate(inputs).T


def _fit(
    x,
    target: np.ndarray,
    mask_lr: np.ndarray,
    factor: int,
    params: RegressionParams,
    dev,
    *,
    progress=None,
    should_stop=None,
    on_loss=None,
    distributed: bool = False,
    stage: str = "SMSDL regression",
) -> tuple[list, list]:
    """Train ``params.restarts`` networks on the forward-model loss; return (networks, first loss history).

    ``x`` is the (N_sr, D') input tensor on ``dev``; ``target`` (C, rows, cols) the scaled MSI.
    With ``distributed`` (a process group of N > 1 is active) the training pixels are sharded
    round robin across ranks, gradients are averaged by DistributedDataParallel, the loss history
    is the mean over ranks and rank 0's final weights are copied to every rank.
    """
    import torch

    n_ch, rows, cols = target.shape
    # SR cells of every training MSI pixel: (n_pixels, F*F) flat indices into the SR grid
    pix_r, pix_c = np.nonzero(mask_lr)
    sub_r, sub_c = np.divmod(np.arange(factor * factor), factor)
    cells = ((pix_r[:, None] * factor + sub_r[None]) * (cols * factor) + pix_c[:, None] * factor + sub_c[None])
    cells_t = torch.from_numpy(cells).to(dev)
    y_pix = torch.from_numpy(target[:, pix_r, pix_c].T.copy()).to(dev)  # (n_pixels, C)
    order = np.random.default_rng(params.seed).permutation(len(pix_r))
    n_val = int(len(order) * params.holdout) if len(order) >= 40 else 0
    val_t = torch.from_numpy(order[:n_val]).to(dev)
    train_idx = torch.from_numpy(order[n_val:]).to(dev)
    n_pix = len(train_idx)
    batch = min(params.batch_pixels, n_pix)
    rank, world = 0, 1
    if distributed:
        from ..distributed import get_rank, get_world_size

        rank, world = get_rank(), get_world_size()
        if n_pix // world < 1:
            log.warning("only %d training pixels for %d ranks: every rank trains on all of them", n_pix, world)
            distributed, rank, world = False, 0, 1
        else:
            train_idx = train_idx[rank::world]  # round-robin shard of the (seeded, shuffled) pixels
            n_pix = len(train_idx)
            # same global batch as one process: world x (batch / world), capped by the smallest shard
            batch = max(1, min(-(-batch // world), len(order[n_val:]) // world))
    nets, history = [], []
    total_steps = params.steps * params.restarts
    for restart in range(params.restarts):
        torch.manual_seed(params.seed + 1000 * restart)
        net = _mlp(x.shape[1], params.hidden, params.layers, n_ch).to(dev)
        model = net
        if distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else None
            model = DistributedDataParallel(net, device_ids=ids)  # broadcasts rank 0's initial weights
        opt = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=params.steps)
        losses = []
        gen = torch.Generator(device="cpu").manual_seed(params.seed + 1000 * restart + 7919 * rank)
        best = (float("inf"), -1, None)
        for step in range(params.steps):
            if distributed:
                if step % 20 == 0:
                    from ..distributed import any_rank

                    if any_rank(should_stop is not None and bool(should_stop())):
                        raise Cancelled("SMSDL training cancelled")
            elif should_stop is not None and step % 20 == 0 and should_stop():
                raise Cancelled("SMSDL training cancelled")
            pick = train_idx[torch.randperm(n_pix, generator=gen)[:batch].to(dev)]
            idx = cells_t[pick]  # (B, F*F)
            pred = torch.nn.functional.softplus(model(x[idx.reshape(-1)])).reshape(batch, factor * factor, n_ch)
            loss = ((pred.mean(1) - y_pix[pick]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if n_val and (step % 25 == 24 or step == params.steps - 1):
                with torch.no_grad():
                    vidx = cells_t[val_t]
                    vpred = torch.nn.functional.softplus(net(x[vidx.reshape(-1)])).reshape(n_val, factor * factor, n_ch)
                    vloss = float(((vpred.mean(1) - y_pix[val_t]) ** 2).mean())
                if vloss < best[0]:
                    best = (vloss, step, copy.deepcopy(net.state_dict()))
            if progress is not None and step % 10 == 0:
                progress(stage, restart * params.steps + step + 1, total_steps)
            if on_loss is not None and restart == 0 and step % 10 == 0:
                on_loss(step, losses[-1])
        if best[2] is not None:
            net.load_state_dict(best[2])
            log.info("SMSDL restart %d: best held-out loss %.3g at step %d", restart, best[0], best[1])
        if distributed:
            from ..distributed import all_reduce_mean, broadcast_module

            broadcast_module(net, src=0)  # identical weights on every rank, whatever each rank chose
            losses = [float(v) for v in all_reduce_mean(losses)]
        nets.append(net.eval())
        if restart == 0:
            history = losses
        if losses:
            log.info("SMSDL restart %d: final forward-model loss %.3g", restart, losses[-1])
    return nets, history


def conserve_block_means(sr: np.ndarray, lr_msi: np.ndarray, factor: int, mask_lr: np.ndarray) -> np.ndarray:
    """Rescale each F × F block so its mean equals the measured MSI pixel (tissue pixels only).

    The ratio is clipped to [0.25, 4] so a near-zero prediction cannot explode.
    """
    pooled = block_mean(sr, factor)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(pooled > 0, np.nan_to_num(lr_msi) / pooled, 1.0)
    ratio = np.clip(np.where(mask_lr[None], ratio, 1.0), 0.25, 4.0)
    return sr * np.repeat(np.repeat(ratio, factor, axis=1), factor, axis=2)


def _mlp(n_in: int, hidden: int, layers: int, n_out: int):
    import torch

    mods: list = []
    width = n_in
    for _ in range(layers - 1):
        mods += [torch.nn.Linear(width, hidden), torch.nn.GELU()]
        width = hidden
    mods.append(torch.nn.Linear(width, n_out))
    return torch.nn.Sequential(*mods)
