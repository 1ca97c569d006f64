"""SMSDL regression: features on the SR grid → every m/z channel, trained through the forward model.

A multilayer perceptron shared across channels (one trunk, one positive output per channel) maps
each SR cell's features — the multi-level ViT features, with or without the bicubic-upsampled MSI — to the
intensities of all chosen channels. It never sees a high-resolution target: its loss compares the
mean of its predictions over the F × F cells of each MSI pixel with the measured MSI pixel.

Every setting that used to be a constant tuned on benchmark cases is chosen from the measurement
itself, on spatially blocked folds of the LR tissue pixels (:mod:`._heldout`):

* one network per fold is trained on the other folds and **stopped early** at its best error on
  the held-out fold; the SR image is the mean of the fold networks (an ensemble that saw every
  pixel), and their spread is the model part of the uncertainty (:mod:`._uncertainty`);
* the **feature dimensions** (leading principal components) by a held-out linear fit;
* the **network input**: the features with the bicubic upsampling of the MSI, or the features alone
  (the measurement then reaches the output only through the loss and the conservation): the larger
  scale-transfer gain decides where that check can run, else the lower held-out error;
* the **conservation** of the block means (exact back-projection, smooth, none), by which one
  predicts the held-out pixels best;
* per channel, the **histology gain**: how much the fold networks reduce the held-out error of the
  same network trained on the same pixels without the histology (the bicubic input alone,
  conserved the same way) — so a network's mere smoothing of noise is not credited to the H&E.
  The gain over the control itself is recorded too;
* per channel, the **scale-transfer gain** (:mod:`._scale_check`): the same fit one scale up
  (LR pooled by 2 → LR), scored against the measured LR pixels, over the control — the one check
  that sees the detail drawn inside a pixel. Where it ran, it decides: a channel whose scale-transfer
  gain is not clearly positive (mean minus two standard errors over folds ≤ 0) outputs the H&E-free
  control (bicubic + back-projection; ``fallback``); a channel that uses the histology outputs the
  blend control + w · (SMSDL − control), w the least-squares weight of that blend against the
  measured LR pixels in the same check, clipped to [0, 1] (the share of SMSDL's detail that points
  towards the measurement). A channel whose held-out gain is clearly *negative* (mean plus two
  standard errors < 0: with the H&E the network predicts unseen measured pixels worse than without
  it) falls back too, whatever the check says: the two tests disagree, and the control is the safe
  side. Where the LR pooled by 2 holds too few tiles for blocked folds, the
  check runs on single-pixel folds for this decision and weight only (the input and conservation
  are then the held-out folds' choice); where it is too small even for that, the held-out gain
  decides by the same criterion and a used channel keeps all of SMSDL's detail. The result says
  which channels fell back, each channel's weight and what decided (``Guidance.decided_by``).

Under torchrun (a torch.distributed process group of N > 1 processes) each fold network's training
pixels are sharded across ranks and DistributedDataParallel averages the gradients; every rank ends
with rank 0's weights. :mod:`._channels` calls :func:`fit_guided` on chunks of many channels.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..errors import Cancelled, InputError
from ..io import tissue_mask
from ..torch_setup import get_device
from ._heldout import blocked_folds, choose_pca_dims, held_out_mse
from ._scale_check import (
    blend_weight,
    check_pooling,
    pool_inputs,
    scale_check_folds,
    scale_check_size,
    scale_gain,
    standard_errors,
)
from ._uncertainty import uncertainty_map
from .baselines.backprojection import Conservation, block_mean, conserve

log = logging.getLogger(__name__)

#: A channel uses the histology when its gain (scale-transfer, else held-out) is this many standard errors above zero.
GAIN_STANDARD_ERRORS = 2.0
#: Held-out loss is evaluated every this many steps (early stopping, progress of the best state).
EVAL_EVERY = 25
#: What the network may see besides the features (``RegressionParams.network_input``).
NETWORK_INPUTS = ("bicubic", "features")


@dataclass(frozen=True)
class RegressionParams:
    """Training settings of the regression network.

    ``steps`` is the most any fold network trains; each stops ``patience`` steps after its last
    held-out improvement and keeps its best state. ``pca_dims`` = 0 lets the held-out folds choose
    the feature dimensions; ``conservation`` = ``"auto"`` lets them choose the conservation.
    ``fallback`` = False forces the histology on every channel. ``network_input`` is what each SR
    cell's network sees besides the features: ``"bicubic"`` (the bicubic upsampling of the MSI too),
    ``"features"`` (the features alone; the measurement reaches the output only through the
    training loss and the conservation) or ``"auto"`` (the larger scale-transfer gain where that check
    can run, else the lower held-out error).
    """

    hidden: int = 128
    layers: int = 3
    steps: int = 600
    patience: int = 150
    batch_pixels: int = 256  # MSI pixels per step (each brings its F × F SR cells)
    pca_dims: int = 0
    lr: float = 2e-3
    weight_decay: float = 1e-4
    folds: int = 5
    network_input: str = "auto"
    conservation: str = "auto"
    fallback: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.conservation != "auto":
            Conservation(self.conservation)  # raises ValueError on a typo
        if self.network_input not in ("auto", *NETWORK_INPUTS):
            raise InputError(f"network_input must be 'auto' or one of {NETWORK_INPUTS}, got {self.network_input!r}")
        if self.folds < 2:
            raise InputError(f"the regression needs at least 2 held-out folds, got {self.folds}")


FAST_REGRESSION = RegressionParams(hidden=96, steps=300, patience=100, folds=3)


@dataclass(frozen=True)
class Guidance:
    """Per channel: held-out gain of the histology over the H&E-free control, and whether it is used.

    ``gain`` is 1 − (held-out MSE of SMSDL) / (held-out MSE of the same network without the
    histology), the mean over folds; ``gain_std`` its standard deviation over folds.
    """

    gain: list
    gain_std: list
    used_histology: list
    #: the scale-transfer gain over the control and its standard deviation over the LLR folds
    #: (:mod:`._scale_check`); None where the LR image is too small for the check
    scale_gain: list | None = None
    scale_gain_std: list | None = None
    #: the share of SMSDL's detail over the control in the output (0 on channels that fell back;
    #: the scale-transfer blend weight where that check ran, else 1)
    weight: list | None = None
    #: what decided which channels use the histology: ``"scale_transfer"`` (the check of the detail
    #: inside a pixel), ``"scale_transfer_per_pixel"`` (that check on single-pixel folds: a small LR
    #: image), ``"held_out"`` (too small even for that: the held-out gain, which scores predictions
    #: between pixels, a weaker test) or ``"forced"`` (no fallback)
    decided_by: str | None = None
    #: per channel: the scale-transfer check passed it but its held-out gain was clearly negative, so it
    #: fell back (the held-out veto); None where the check did not decide
    held_out_veto: list | None = None

    def to_dict(self) -> dict:
        out = {"gain": [float(g) for g in self.gain], "gain_std": [float(s) for s in self.gain_std],
               "used_histology": [bool(u) for u in self.used_histology]}
        if self.scale_gain is not None:
            out["scale_gain"] = [float(g) for g in self.scale_gain]
            out["scale_gain_std"] = [float(s) for s in self.scale_gain_std]
        if self.weight is not None:
            out["weight"] = [float(w) for w in self.weight]
        if self.decided_by is not None:
            out["decided_by"] = self.decided_by
        if self.held_out_veto is not None:
            out["held_out_veto"] = [bool(v) for v in self.held_out_veto]
        return out

    @property
    def fell_back(self) -> list[int]:
        """Indices of the channels whose output is the H&E-free control."""
        return [i for i, u in enumerate(self.used_histology) if not u]


@dataclass(frozen=True)
class RegressionResult:
    """The SR stacks (C, rows·F, cols·F) float32 in the MSI's units, and how they were chosen.

    ``sr`` is the output (control + weight · (guided − control); the control on channels that fell
    back), ``guided`` SMSDL on every
    channel, ``control`` the H&E-free control, ``uncertainty`` the predictive standard deviation of
    ``sr``. ``choices`` records the data-driven settings and their held-out scores.
    """

    sr: np.ndarray
    guided: np.ndarray
    control: np.ndarray
    uncertainty: np.ndarray
    guidance: Guidance
    choices: dict
    loss_history: list
    seconds: float
    device: str = "cpu"
    extra: dict = field(default_factory=dict)


def _standardise(features: np.ndarray, pca_dims: int = 0) -> np.ndarray:
    """(D, ...) → (D', N) standardised, optionally reduced to ``pca_dims`` principal components."""
    flat = features.reshape(features.shape[0], -1).astype(np.float64)
    flat = (flat - flat.mean(1, keepdims=True)) / (flat.std(1, keepdims=True) + 1e-6)
    if 0 < pca_dims < flat.shape[0]:
        u, sv, _ = np.linalg.svd(flat @ flat.T)  # D × D: cheap for any number of cells
        flat = u[:, :pca_dims].T @ flat
        flat /= flat[0].std() + 1e-6  # keep the scale of the leading component at 1
    return flat.astype(np.float32)


def max_pca_dims(params: RegressionParams) -> int:
    """Components to keep before the held-out choice (all candidates are leading subsets of them)."""
    from ._heldout import PCA_CANDIDATES

    return params.pca_dims if params.pca_dims > 0 else max(PCA_CANDIDATES)


def train_regression(
    features: np.ndarray,
    lr_msi: np.ndarray,
    factor: int,
    *,
    mask_lr: np.ndarray | None = None,
    params: RegressionParams = RegressionParams(),
    device: str = "auto",
    progress: Callable[[str, int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_loss: Callable[[int, float], None] | None = None,
) -> RegressionResult:
    """Train the fold networks on the forward-model loss and predict every channel on the SR grid.

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

    Notes
    -----
    Under ``torchrun`` every rank must call this with the same arguments (see the module notes).
    """
    lr_msi = np.asarray(lr_msi, np.float32)
    rows, cols = lr_msi.shape[1:]
    if features.shape[1:] != (rows * factor, cols * factor):
        raise InputError(f"features {features.shape[1:]} do not match the SR grid {(rows * factor, cols * factor)}")
    x_feat = _standardise(features, max_pca_dims(params))
    return fit_guided(x_feat, lr_msi, factor, mask_lr=mask_lr, params=params, device=device, progress=progress,
                      should_stop=should_stop, on_loss=on_loss, distributed=_ddp_active())


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
        mask_lr = tissue_mask(lr_msi)
    mask_lr = np.asarray(mask_lr, bool) & acquired
    if mask_lr.sum() < 4:
        raise InputError(f"only {int(mask_lr.sum())} tissue pixels to train on; check the MSI mask")
    scale = np.array([np.percentile(lr_msi[c][mask_lr], 99) or 1.0 for c in range(n_ch)], np.float32)
    scale[scale <= 0] = 1.0
    target = np.nan_to_num(lr_msi) / scale[:, None, None]
    return mask_lr, scale, target


def _design_matrix(features_std: np.ndarray, bicubic, scale: np.ndarray, with_bicubic: bool) -> np.ndarray:
    """Network input (N_sr, D'): standardised features (D'', N_sr), then the scaled bicubic channels
    (``with_bicubic``)."""
    inputs = [features_std]
    if with_bicubic and bicubic is not None:
        inputs.append((np.nan_to_num(bicubic) / scale[:, None, None]).reshape(len(scale), -1).astype(np.float32))
    return np.concatenate(inputs).T


def fit_guided(
    x_feat: np.ndarray,
    lr: np.ndarray,
    factor: int,
    *,
    mask_lr: np.ndarray | None = None,
    params: RegressionParams = RegressionParams(),
    device: str = "auto",
    progress: Callable[[str, int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_loss: Callable[[int, float], None] | None = None,
    distributed: bool = False,
    stage: str = "SMSDL regression",
    pca_dims: int | None = None,
    scale_check: bool = True,
    reference: bool = True,
) -> RegressionResult:
    """SMSDL on one set of channels, from standardised features (the core of both paths).

    Parameters
    ----------
    x_feat : ndarray, shape (D, rows·F·cols·F)
        Standardised features, leading principal components first (:func:`_standardise`).
    lr : ndarray, shape (C, rows, cols)
        The measured channels (NaN = no spectrum).
    factor : int
        F.
    mask_lr : ndarray of bool, shape (rows, cols), optional
        Tissue pixels (default: acquired pixels with any non-zero channel).
    params : RegressionParams
    pca_dims : int, optional
        Use this many leading components instead of choosing (the chunked path chooses once, on
        its first chunk, so every chunk shares one feature space).
    scale_check : bool
        Run the scale-transfer check (:mod:`._scale_check`) where the LR image is large enough.
    reference : bool
        Train the histology-free reference network per fold (the held-out gain's denominator);
        without it the gain is over the H&E-free control (the scale-transfer fit needs no more).
    """
    import torch

    from .baselines import bicubic_upsample

    start = time.perf_counter()
    lr = np.asarray(lr, np.float32)
    n_ch, rows, cols = lr.shape
    mask_lr, scale, target = _targets(lr, mask_lr)
    folds = blocked_folds(mask_lr, params.folds, seed=params.seed)
    n_folds = params.folds
    choices: dict = {"folds": n_folds, "fold_pixels": [int((folds == i).sum()) for i in range(n_folds)]}
    if pca_dims is None:
        if params.pca_dims > 0:
            pca_dims = min(params.pca_dims, x_feat.shape[0])
            choices["pca_dims"] = {"value": pca_dims, "how": "given"}
        else:
            pca_dims, scores = choose_pca_dims(x_feat, target, folds, factor)
            choices["pca_dims"] = {"value": pca_dims, "how": "held-out linear fit",
                                   "held_out_mse": {str(k): v for k, v in scores.items()}}
    else:
        choices["pca_dims"] = {"value": int(pca_dims), "how": "shared by every chunk"}
    feats = np.ascontiguousarray(x_feat[:pca_dims])
    dev = get_device(device)
    bic_full = bicubic_upsample(np.nan_to_num(lr), factor, mask_lr=mask_lr)
    inputs = list(NETWORK_INPUTS) if params.network_input == "auto" else [params.network_input]
    input_choice = {"value": inputs[0], "how": "given"}
    modes = [Conservation(params.conservation)] if params.conservation != "auto" else list(Conservation)
    blocked_check = scale_check and scale_check_size(mask_lr, factor, params.folds)[0]
    if len(inputs) > 1 and blocked_check:
        # the held-out folds favour the features: inside a held-out tile the bicubic input is extrapolated
        # from the tile's edge, which the SR task never asks of it; one scale up both inputs see what
        # they see there, and the within-pixel detail is scored on real pixels
        input_choice = _choose_input_by_scale(feats, lr, factor, mask_lr, params, modes, device=str(dev),
                                              progress=progress, should_stop=should_stop, distributed=distributed)
        inputs = [input_choice["value"]]
        reuse_check = input_choice.pop("checks")[inputs[0]]  # the final check: same input, same modes
    else:
        reuse_check = None
    x_full = {inp: torch.from_numpy(_design_matrix(feats, bic_full, scale, inp == "bicubic")).to(dev) for inp in inputs}
    err = {(inp, m.value): np.zeros((n_folds, n_ch)) for inp in inputs for m in modes}
    err_free = {m.value: np.zeros((n_folds, n_ch)) for m in modes}
    err_control = np.zeros((n_folds, n_ch))
    grid = (n_ch, rows * factor, cols * factor)
    stats = {inp: (np.zeros(grid), np.zeros(grid)) for inp in inputs}  # running mean, M2 of the fold networks
    c_mean, c_m2 = np.zeros(grid), np.zeros(grid)
    best_steps = {inp: [] for inp in inputs}
    histories: dict = {}
    n_runs = n_folds * len(inputs)
    for i in range(n_folds):
        held_out = folds == i
        train = mask_lr & ~held_out
        bic = bicubic_upsample(np.nan_to_num(lr), factor, mask_lr=train)
        fold_control = conserve(bic, lr, factor, train, Conservation.EXACT)
        err_control[i] = held_out_mse(block_mean(fold_control, factor) / scale[:, None, None], target, held_out)
        if reference:  # the same network without the histology (the bicubic input alone): what the measurement supports
            x_free = torch.from_numpy(_design_matrix(feats[:0], bic, scale, True)).to(dev)
            net_free, _, _ = _fit(x_free, target, train, held_out, factor, params, dev,
                                  seed=params.seed + 1000 * i + 1, should_stop=should_stop, distributed=distributed)
            free_pred = _predict(net_free, x_free, n_ch, rows * factor, cols * factor) * scale[:, None, None]
            del x_free, net_free
        for m in modes:
            if reference:
                pooled = block_mean(conserve(free_pred, lr, factor, train, m), factor) / scale[:, None, None]
                err_free[m.value][i] = held_out_mse(pooled, target, held_out)
            else:
                err_free[m.value][i] = err_control[i]
        for k, inp in enumerate(inputs):
            run = i * len(inputs) + k
            x = torch.from_numpy(_design_matrix(feats, bic, scale, inp == "bicubic")).to(dev)
            # the bicubic-input network keeps the seed it always had; the other input gets its own
            net, best_step, losses = _fit(
                x, target, train, held_out, factor, params, dev, seed=params.seed + 1000 * i + 2 * k,
                progress=progress, should_stop=should_stop, on_loss=on_loss if run == 0 else None,
                distributed=distributed, stage=stage, progress_offset=run * params.steps,
                progress_total=n_runs * params.steps,
            )
            best_steps[inp].append(best_step)
            if i == 0:
                histories[inp] = losses
            fold_pred = _predict(net, x, n_ch, rows * factor, cols * factor) * scale[:, None, None]
            for m in modes:
                pooled = block_mean(conserve(fold_pred, lr, factor, train, m), factor) / scale[:, None, None]
                err[(inp, m.value)][i] = held_out_mse(pooled, target, held_out)
            full_pred = _predict(net, x_full[inp], n_ch, rows * factor, cols * factor) * scale[:, None, None]
            _welford(i, full_pred, *stats[inp])
            del x, net
        _welford(i, fold_control, c_mean, c_m2)
    # the input by plain cross-validation (lowest held-out error under the control's exact conservation,
    # or the one given): neither is the safer default; then the conservation for that input
    default_mode = Conservation.EXACT.value if Conservation.EXACT in modes else modes[0].value
    inp = min(inputs, key=lambda a: float(err[(a, default_mode)].mean())) if len(inputs) > 1 else inputs[0]
    held_out_by_input = {f"{a}, {b}": float(v.mean()) for (a, b), v in err.items()}
    err = {b: v for (a, b), v in err.items() if a == inp}  # the chosen input's, per conservation mode
    check = None
    if scale_check and (reuse_check is not None or blocked_check):
        check = reuse_check if reuse_check is not None else _scale_transfer(
            feats, lr, factor, mask_lr, dataclasses.replace(params, network_input=inp), modes, device=str(dev),
            progress=progress, should_stop=should_stop, distributed=distributed)
    if len(modes) == 1:
        mode, mode_how = modes[0], "given"
    elif check is not None and check["available"]:
        # every LR mean is known in the SR task, as every LLR mean is one scale up: there the modes differ
        # by how exactly they meet the means and what that does inside the pixels, scored on real pixels
        mode, mode_how = Conservation(check["conservation"]["value"]), check["conservation"]["how"]
    else:
        # a held-out pixel is outside every mode's reach, so its error cannot tell exact from smooth
        # back-projection (they agree there to 1e-4 relative and the choice would follow rounding), only
        # either from none
        mode = _choose_conservation({k: v for k, v in err.items() if k != Conservation.SMOOTH.value})
        mode_how = "held-out error, exact or none (held-out pixels cannot tell exact from smooth back-projection)"
    if scale_check and check is None:
        # too few pooled tiles for blocked folds: the check on single-pixel folds. Its gain is as valid (the
        # scored LR pixels are unseen, only their means), its fold spread optimistic (no region is replicated),
        # so it judges only what the held-out pixels cannot: the detail inside a pixel, per channel (use and
        # weight); the input and the conservation keep the held-out choice above
        check = _scale_transfer(feats, lr, factor, mask_lr, dataclasses.replace(params, network_input=inp), [mode],
                                device=str(dev), progress=progress, should_stop=should_stop, distributed=distributed,
                                per_pixel=True)
    if scale_check:
        choices["scale_transfer"] = check
    mean, m2 = stats[inp]
    history = histories[inp]
    if len(inputs) > 1:
        input_choice = {"value": inp, "how": "held-out error (the LR image is too small for the scale-transfer check on blocked "
                                            "folds)"}
    choices["network_input"] = {**input_choice, "held_out_mse": held_out_by_input}
    choices["conservation"] = {"value": mode.value, "how": mode_how,
                               "held_out_mse": {k: float(v.mean()) for k, v in err.items()}}
    choices["control_held_out_mse"] = float(err_control.mean())
    choices["steps"] = {"best_per_fold": best_steps[inp], "most": params.steps, "patience": params.patience,
                        "how": "early stopping on each fold's held-out pixels"}
    with np.errstate(divide="ignore", invalid="ignore"):
        denominator = err_free[mode.value]
        gains = np.where(denominator > 1e-12, 1.0 - err[mode.value] / denominator, 0.0)
        over_control = np.where(err_control > 1e-12, 1.0 - err[mode.value] / err_control, 0.0)
    gain, gain_std = gains.mean(0), gains.std(0, ddof=1)
    choices["gain_over_control"] = over_control.mean(0).tolist()
    clearly = gain - GAIN_STANDARD_ERRORS * gain_std / np.sqrt(n_folds) > 0
    against = gain + GAIN_STANDARD_ERRORS * gain_std / np.sqrt(n_folds) < 0  # the H&E clearly hurts held-out pixels
    control = conserve(bic_full, lr, factor, mask_lr, Conservation.EXACT)
    guided = conserve(mean, lr, factor, mask_lr, mode)
    extra = {"clearly_positive": clearly.tolist()}
    if not scale_check:  # the scale-transfer check's own fit: it conserves the raw mean once per mode
        extra["raw_mean"] = mean
    scale_gain = scale_std = None
    if check is not None and check["available"]:
        scale_gain, scale_std = check.pop("gain"), check.pop("gain_std")
        extra["scale_clearly_positive"] = check["clearly_positive"]
    scale_clear = extra.get("scale_clearly_positive")
    used = _decide(clearly, scale_clear, against) if params.fallback else np.ones(n_ch, bool)
    # per channel: the check passed it but the held-out gain vetoed it (said in the result and the summary)
    veto = np.asarray(scale_clear, bool) & against if scale_clear is not None and params.fallback else None
    # a channel that is constant over the tissue (an ion never detected: all zero) has nothing for the
    # histology to explain, and its gains are ratios of rounding errors: its output is the control (the
    # constant itself), whatever --force-histology says
    flat = constant_channels(lr, mask_lr)
    if flat.any():
        used, gain, gain_std = used & ~flat, np.where(flat, 0.0, gain), np.where(flat, 0.0, gain_std)
        veto = None if veto is None else veto & ~flat  # a constant channel falls back for its own reason
        choices["constant_channels"] = int(flat.sum())
        log.warning("%d of %d channels are constant over the tissue (e.g. never detected): their output is the "
                    "H&E-free control, and the fallback summary names them", int(flat.sum()), n_ch)
    # how much of SMSDL's detail over the control a used channel keeps: the least-squares blend weight one
    # scale up (clipped to [0, 1]: never more detail than the network drew), 1 where the check did not run.
    # Not a use rule of its own: it credits a network's smoothing of white noise (a pure-noise channel's
    # weight is clearly positive), so the scale gain decides which channels use the histology at all
    weight = np.clip(check["weight"], 0.0, 1.0) if scale_gain is not None and params.fallback else np.ones(n_ch)
    weight = np.where(used, weight, 0.0)
    decided_by = "forced" if not params.fallback else "held_out" if scale_gain is None else \
        "scale_transfer_per_pixel" if check.get("per_pixel_folds") else "scale_transfer"
    guidance = Guidance(gain.tolist(), gain_std.tolist(), used.tolist(), scale_gain, scale_std, weight.tolist(),
                        decided_by, None if veto is None else veto.tolist())
    w3 = weight[:, None, None]
    sr = np.where(w3 == 1.0, guided, np.where(w3 == 0.0, control, control + w3 * (guided - control))).astype(np.float32)
    spread = np.where(used[:, None, None], weight[:, None, None] * np.sqrt(m2 / (n_folds - 1)),
                      np.sqrt(c_m2 / (n_folds - 1)))
    # spread, noise and unresolved structure, weighted by a calibration one scale up (no ground truth)
    uncertainty, calibration = uncertainty_map(sr, spread, lr, mask_lr, factor, folds=n_folds, seed=params.seed,
                                               features=x_feat)
    choices["uncertainty"] = calibration.to_dict()
    if not used.all():
        log.info("%d of %d channels fell back to the H&E-free control (%s gain not clearly positive)",
                 int((~used).sum()), n_ch, "scale-transfer" if scale_gain is not None else "held-out")
    if progress is not None:
        progress(stage, n_runs * params.steps, n_runs * params.steps)  # the total the fold networks counted to
    return RegressionResult(sr, guided.astype(np.float32), control, uncertainty, guidance, choices, history,
                            time.perf_counter() - start, str(dev), extra)


def constant_channels(lr: np.ndarray, mask_lr: np.ndarray) -> np.ndarray:
    """(C,) bool: channels whose measured values are the same on every tissue pixel (to float32 precision)."""
    vals = np.nan_to_num(np.asarray(lr, np.float64))[:, np.asarray(mask_lr, bool)]
    if vals.shape[1] == 0:
        return np.ones(vals.shape[0], bool)
    spread = vals.max(1) - vals.min(1)
    return spread <= 1e-6 * np.maximum(np.abs(vals).max(1), 1e-30)


def _decide(held_out_clear: np.ndarray, scale_clear: list | None, held_out_against: np.ndarray | None = None) -> np.ndarray:
    """Per channel: use the histology? (the fallback rule; see the module notes).

    ``scale_clear``: the scale-transfer gain is clearly positive; None where the LR image is too
    small for the check. ``held_out_against``: the held-out gain is clearly negative (a veto).
    """
    if scale_clear is None:  # the LR image is too small for the scale-transfer check
        return np.asarray(held_out_clear, bool)
    # SMSDL's output differs from the control's by what it draws inside the LR pixels (and, unless
    # the conservation is exact, by their means); the scale-transfer check scores both of those on
    # real pixels, the held-out folds only predictions across a gap at the LR scale. But where the
    # held-out pixels say the H&E clearly makes predictions worse, the tests disagree: fall back
    use = np.asarray(scale_clear, bool)
    return use if held_out_against is None else use & ~np.asarray(held_out_against, bool)


def _scale_transfer(feats, lr, factor, mask_lr, params: RegressionParams, modes: list, *, device, progress,
                    should_stop, distributed, per_pixel: bool = False) -> dict:
    """The scale-transfer check (:mod:`._scale_check`): the same fit LLR → LR, scored on the measured LR.

    The LLR fit has F² fewer pixels; its batch is F² times smaller so a step covers the same share
    of the image as in the main fit (the same early-stopping dynamics), and it gets the main fit's
    components, so only the scale differs. Its raw prediction is conserved to the LLR means by each
    of ``modes``; exact conservation (the control's) is kept unless another mode's gain, mean over
    channels, is clearly larger over the folds, and the gains, weights and decisions returned are
    those of the mode kept (``conservation`` says which and why). ``per_pixel``: single-pixel folds
    where the pooled tissue holds too few tiles for blocked ones (``per_pixel_folds`` in the result).
    """
    k, n_folds, why = check_pooling(mask_lr, factor, params.folds, per_pixel=per_pixel)
    if not n_folds:
        log.info("scale-transfer check skipped: %s", why)
        return {"available": False, "reason": why}
    t0 = time.perf_counter()
    inputs = pool_inputs(feats, lr, mask_lr, factor, k)
    inner = dataclasses.replace(params, fallback=False, conservation=Conservation.EXACT.value, folds=n_folds,
                                batch_pixels=max(1, params.batch_pixels // k**2))
    fit = fit_guided(inputs.features, inputs.llr, k, mask_lr=inputs.mask_llr, params=inner, device=device,
                     progress=progress, should_stop=should_stop, distributed=distributed,
                     stage="SMSDL scale-transfer check", pca_dims=inputs.features.shape[0], scale_check=False,
                     reference=False)
    folds_llr = blocked_folds(inputs.mask_llr, n_folds, seed=params.seed)
    errors = standard_errors(n_folds, params.folds, GAIN_STANDARD_ERRORS)
    by_mode = {}
    for m in modes:
        guided_m = conserve(fit.extra["raw_mean"], inputs.llr, k, inputs.mask_llr, Conservation(m))
        by_mode[Conservation(m).value] = (guided_m, *scale_gain(guided_m, fit.control, inputs, folds_llr, k))
    if len(modes) == 1:
        mode, how = Conservation(modes[0]), "given"
    else:
        exact_folds = by_mode[Conservation.EXACT.value][3].mean(axis=1)  # per fold, mean over channels
        mode = _clearly_better_than_exact(
            {name: v[3].mean(axis=1) - exact_folds for name, v in by_mode.items()}, errors)
        how = "scale-transfer gain (exact unless another mode is clearly better)"
    guided_lr, gain, std, per_fold = by_mode[mode.value]
    clearly = gain - errors * std / np.sqrt(n_folds) > 0
    weight, weight_std, _ = blend_weight(guided_lr, fit.control, inputs, folds_llr, k)
    conservation = {"value": mode.value, "how": how,
                    "gain_by_mode": {name: float(v[1].mean()) for name, v in by_mode.items()}}
    return {"available": True, "how": why, "pooling": k, "folds": n_folds, "per_pixel_folds": per_pixel and not scale_check_folds(mask_lr, k, params.folds)[0],
            "standard_errors": errors, "conservation": conservation,
            "gain": gain.tolist(), "gain_std": std.tolist(),
            "weight": weight.tolist(), "weight_std": weight_std.tolist(),
            "per_fold": per_fold.tolist(), "clearly_positive": clearly.tolist(),
            "best_steps": fit.choices["steps"]["best_per_fold"], "seconds": time.perf_counter() - t0}


def _choose_input_by_scale(feats, lr, factor, mask_lr, params: RegressionParams, modes: list, *, device, progress,
                           should_stop, distributed) -> dict:
    """The network input whose scale-transfer fit (LLR → LR, each with the conservation its check keeps)
    has the larger gain over the control on the measured LR pixels, mean over channels and folds; ties
    keep the bicubic input."""
    gains, checks = {}, {}
    for inp in NETWORK_INPUTS:
        checks[inp] = check = _scale_transfer(feats, lr, factor, mask_lr, dataclasses.replace(params, network_input=inp),
                                modes, device=device, progress=progress, should_stop=should_stop,
                                distributed=distributed)
        gains[inp] = float(np.mean(check["gain"]))
    best = max(NETWORK_INPUTS, key=lambda a: (gains[a], a == NETWORK_INPUTS[0]))
    return {"value": best, "how": "scale-transfer gain over the control, mean over channels",
            "scale_gain": gains, "checks": checks}


def _choose_conservation(err: dict) -> Conservation:
    """Exact conservation (the control's) unless another mode predicts held-out pixels clearly better
    (``err``: mode → held-out MSE per fold and channel)."""
    exact = err[Conservation.EXACT.value].mean(axis=1)  # per fold
    return _clearly_better_than_exact({name: exact - e.mean(axis=1) for name, e in err.items()}, GAIN_STANDARD_ERRORS)


def _clearly_better_than_exact(advantage: dict, errors: float) -> Conservation:
    """The mode with the largest mean fold-wise advantage over exact conservation, among those whose
    advantage is more than ``errors`` standard errors above zero; exact when there is none.

    ``advantage``: mode → its advantage over exact per fold (higher is better; exact's own is 0).
    """
    best, best_gain = Conservation.EXACT, 0.0
    for name, diff in advantage.items():
        sem = diff.std(ddof=1) / np.sqrt(len(diff))
        if diff.mean() - errors * sem > 0 and diff.mean() > best_gain:
            best, best_gain = Conservation(name), float(diff.mean())
    return best


def _welford(i: int, value: np.ndarray, mean: np.ndarray, m2: np.ndarray) -> None:
    """Running mean and sum of squared deviations over folds, in place (memory of two stacks)."""
    delta = value - mean
    mean += delta / (i + 1)
    m2 += delta * (value - mean)


def _predict(net, x, n_ch: int, rows: int, cols: int, block: int = 65536) -> np.ndarray:
    """The network's positive output on every SR cell, (C, rows, cols) float64, block by block."""
    import torch

    out = np.empty((x.shape[0], n_ch), np.float32)
    with torch.no_grad():
        for s in range(0, x.shape[0], block):
            out[s : s + block] = torch.nn.functional.softplus(net(x[s : s + block])).cpu().numpy()
    return out.T.reshape(n_ch, rows, cols).astype(np.float64)


def _cells(mask: np.ndarray, factor: int, cols: int) -> np.ndarray:
    """(n_pixels, F·F) flat indices into the SR grid of the SR cells of every pixel of ``mask``."""
    pix_r, pix_c = np.nonzero(mask)
    sub_r, sub_c = np.divmod(np.arange(factor * factor), factor)
    return (pix_r[:, None] * factor + sub_r[None]) * (cols * factor) + pix_c[:, None] * factor + sub_c[None]


def _fit(
    x,
    target: np.ndarray,
    train: np.ndarray,
    held_out: np.ndarray,
    factor: int,
    params: RegressionParams,
    dev,
    *,
    seed: int,
    progress=None,
    should_stop=None,
    on_loss=None,
    distributed: bool = False,
    stage: str = "SMSDL regression",
    progress_offset: int = 0,
    progress_total: int | None = None,
):
    """Train one network on the ``train`` pixels, early-stopped on the ``held_out`` pixels.

    Returns (network at its best held-out state, that step, loss history). ``x`` is the
    (N_sr, D') input tensor on ``dev``; ``target`` (C, rows, cols) the scaled MSI. With
    ``distributed`` the training pixels are sharded round robin across ranks, gradients are
    averaged by DistributedDataParallel, the loss history is the mean over ranks and rank 0's
    final weights are copied to every rank.
    """
    import torch

    n_ch, rows, cols = target.shape
    pix_r, pix_c = np.nonzero(train)
    cells_t = torch.from_numpy(_cells(train, factor, cols)).to(dev)
    y_pix = torch.from_numpy(target[:, pix_r, pix_c].T.copy()).to(dev)  # (n_pixels, C)
    val_cells = torch.from_numpy(_cells(held_out, factor, cols)).to(dev)
    val_r, val_c = np.nonzero(held_out)
    y_val = torch.from_numpy(target[:, val_r, val_c].T.copy()).to(dev)
    order = np.random.default_rng(seed).permutation(len(pix_r))
    train_idx = torch.from_numpy(order).to(dev)
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
            batch = max(1, min(-(-batch // world), len(order) // world))
    total = progress_total or params.steps
    torch.manual_seed(seed)
    net = _mlp(x.shape[1], params.hidden, params.layers, n_ch).to(dev)
    model = net
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        ids = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else None
        model = DistributedDataParallel(net, device_ids=ids)  # broadcasts rank 0's initial weights
    opt = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=params.steps)
    losses = []
    gen = torch.Generator(device="cpu").manual_seed(seed + 7919 * rank)
    best = (float("inf"), 0, copy.deepcopy(net.state_dict()))
    for step in range(params.steps):
        if step % 20 == 0:
            stop = should_stop is not None and bool(should_stop())
            if distributed:
                from ..distributed import any_rank

                stop = any_rank(stop)
            if stop:
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
        if step % EVAL_EVERY == EVAL_EVERY - 1 or step == params.steps - 1:
            with torch.no_grad():
                vpred = torch.nn.functional.softplus(net(x[val_cells.reshape(-1)]))
                vloss = float(((vpred.reshape(len(val_r), factor * factor, n_ch).mean(1) - y_val) ** 2).mean())
            if vloss < best[0]:
                best = (vloss, step + 1, copy.deepcopy(net.state_dict()))
            elif step + 1 - best[1] >= params.patience:
                break
        if progress is not None and step % 10 == 0:
            progress(stage, progress_offset + step + 1, total)
        if on_loss is not None and step % 10 == 0:
            on_loss(step, losses[-1])
    net.load_state_dict(best[2])
    log.info("SMSDL fold network: best held-out loss %.3g at step %d", best[0], best[1])
    if distributed:
        from ..distributed import all_reduce_mean, broadcast_module

        broadcast_module(net, src=0)  # identical weights on every rank, whatever each rank chose
        losses = [float(v) for v in all_reduce_mean(losses)]
    return net.eval(), best[1], losses



def _mlp(n_in: int, hidden: int, layers: int, n_out: int):
    import torch

    mods: list = []
    width = n_in
    for _ in range(layers - 1):
        mods += [torch.nn.Linear(width, hidden), torch.nn.GELU()]
        width = hidden
    mods.append(torch.nn.Linear(width, n_out))
    return torch.nn.Sequential(*mods)
