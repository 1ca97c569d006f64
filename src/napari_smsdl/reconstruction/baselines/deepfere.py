"""DeepFERE-style CNN baseline (Guo et al., Anal. Chem. 2023, 95:9714), made stable.

Architecture (as published): a *mapping head* turns the H&E guide into an MSI-like image
(Conv3×3 + LeakyReLU(0.2): 3→64, three 64→64, 64→C) and a Deep-Image-Prior "skip" U-Net
*fusion* network (5 scales, reflection padding, no batch norm; per scale a skip branch
Conv1×1→5 ch and a deep branch stride-2 Conv3×3→128, Conv3×3 128→128, bilinear ×2 up; then
Conv3×3→128 and Conv1×1→128; last Conv1×1→C and a sigmoid) takes the bicubic-upsampled MSI
concatenated with the mapping output. A fixed Lanczos-2 downsampler D by F is the forward model.
Losses: MSE(D(mapping), LR) + MSE(D(fusion), LR) + a structure-correlation loss (L1 between the
pairwise pixel-distance matrices of the fused output and of the guide over random 16×16 windows,
background zeroed). Adam(lr 2e-4, betas 0.5/0.999).

What :class:`DeepFereConfig` changes by default to make it stable and converged (every item is
switchable, and ``DeepFereConfig.published()`` turns them all off) is documented with the
measurements behind it in ``docs/cnn-baseline.md``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum

import numpy as np
import torch
import torch.nn.functional as tf
from torch import nn

from ...errors import Cancelled, InputError
from .bicubic import bicubic_upsample
from .grid import _check_factor, upsample_mask

ProgressFn = Callable[[str, int, int], None]
StopFn = Callable[[], bool]


class Preset(Enum):
    """Training budgets: an iteration cap and a wall-clock cap in seconds (whichever comes first)."""

    FAST = "fast"
    DEFAULT = "default"


class ForwardModel(Enum):
    """How an SR image is reduced to the LR grid inside the losses."""

    LANCZOS2 = "lanczos2"  # published: Lanczos-2 kernel (support ±2 LR pixels), stride F
    BOX = "box"  # mean over the F×F block (the benchmark's and SMSDL's forward model)


class CorrGuide(Enum):
    """Which image's pixel-distance structure the fused output is pulled towards."""

    HE = "he"  # the H&E guide (RGB), as in the description
    MAPPING = "mapping"  # the mapping head's output (as the published ion-mode trainer does)


#: (mapping-head warm-up, joint) iteration caps per preset.
PRESET_ITERATIONS = {Preset.FAST: (10, 60), Preset.DEFAULT: (60, 400)}
#: Wall-clock budget of the whole training (warm-up + joint) per preset, in seconds, on any device.
PRESET_SECONDS = {Preset.FAST: 15.0, Preset.DEFAULT: 75.0}


@dataclass(frozen=True)
class DeepFereConfig:
    """Training settings; the defaults are the stabilised ones (see ``docs/cnn-baseline.md``).

    Attributes
    ----------
    iterations : int
        Joint training iterations (after the warm-up).
    warmup_iterations : int
        Mapping-head-only iterations before the joint training (published: 1000 of 200000).
    lr : float
        Adam learning rate (published 2e-4; default 5e-4, stable with the other changes).
    betas : tuple of float
        Adam betas (published (0.5, 0.999)).
    cosine_decay : bool
        Cosine-decay the learning rate to 5 % over the joint iterations.
    headroom : float
        Each channel is divided by ``headroom ×`` its LR maximum over tissue (published: 1), so
        the sigmoid output can exceed the LR maximum, as a sharper SR image must.
    residual : bool
        Fusion output = sigmoid(logit(bicubic) + U-Net logits) with the last 1×1 conv initialised
        to zero: training starts exactly at the bicubic image (published: plain sigmoid).
    forward_model : ForwardModel
        Lanczos-2 (published) or the F×F block mean (default: the benchmark's and SMSDL's model).
    tissue_only : bool
        LR losses over tissue LR pixels only (published: every pixel, background included).
    corr_weight : float
        Weight of the structure-correlation loss (published: effectively 5, its 800 windows summed
        and divided by 160).
    corr_windows : int
        Random 16×16 windows per iteration (published: 800).
    corr_guide : CorrGuide
        Distance structure to match: the H&E guide (the issue's description) or the mapping
        output (default; what the published ion-mode trainer matches against).
    corr_normalise : bool
        Divide each window's distance matrix by its mean over tissue pairs, so RGB distances and
        MSI distances compare (published: raw squared distances).
    grad_clip : float or None
        Clip the global gradient norm (published: none).
    warmup_iterations, iterations (defaults)
        60 + 120 (``Preset.DEFAULT``, about 2.5 min on the 128×128 sample with one busy CPU
        thread); ``Preset.FAST`` is 10 + 20 (about 20 s).
    best_of_lr_loss : bool
        Return the fused output of the iteration with the lowest LR-consistency loss
        MSE(D(fusion), LR), not the last one (published: the last).
    rollback : bool
        When the LR-consistency loss exceeds ``rollback_factor`` × its best value so far, restore
        the weights of that best iteration, reset Adam and halve the learning rate (needs
        ``best_of_lr_loss``; published: no).
    rollback_factor : float
        Divergence threshold of the rollback.
    window : int
        Side of the structure-correlation windows in SR pixels (published 16).
    width, mapping_width : int
        Feature widths of the U-Net (published 128) and of the mapping head (published 64);
        smaller only for quick tests.
    time_budget_s : float or None
        Wall-clock budget of the whole training in seconds (None: iterations only). The same
        number applies on every device, so a GPU runs more iterations in it than a CPU. Training
        stops at whichever comes first, the iteration caps or the budget; the warm-up may use at
        most ``warmup_share`` of it, and the cosine decay follows the larger of the two progress
        fractions (iterations done / cap, seconds spent / budget), so it reaches its floor when the
        budget runs out. With a budget the iteration count (and hence the output) depends on the
        machine's speed; ``DeepFereResult.iterations_run`` records it.
    warmup_share : float
        Largest share of ``time_budget_s`` the mapping-head warm-up may take.
    heldout_folds : int
        0: the LR losses use every tissue LR pixel and the returned iterate is the one with the
        lowest LR loss (``best_of_lr_loss``). n ≥ 2: the LR tissue pixels are split into n
        spatially blocked folds (:func:`napari_smsdl.reconstruction._heldout.blocked_folds`, seeded
        by ``seed``); fold 0 is held out of both LR losses, and the returned iterate (and the
        rollback's reference) is the one with the lowest MSE(D(fusion), LR) on the held-out fold.
    patience : int or None
        With held-out folds: stop when the held-out loss has not improved for this many joint
        iterations (None: never stop early).
    """

    iterations: int = PRESET_ITERATIONS[Preset.DEFAULT][1]
    warmup_iterations: int = PRESET_ITERATIONS[Preset.DEFAULT][0]
    lr: float = 5e-4
    betas: tuple[float, float] = (0.5, 0.999)
    cosine_decay: bool = True
    headroom: float = 1.5
    residual: bool = True
    forward_model: ForwardModel = ForwardModel.BOX
    tissue_only: bool = True
    corr_weight: float = 3e-3
    corr_windows: int = 32
    corr_guide: CorrGuide = CorrGuide.MAPPING
    corr_normalise: bool = True
    grad_clip: float | None = 1.0
    best_of_lr_loss: bool = True
    rollback: bool = True
    rollback_factor: float = 10.0
    window: int = 16
    width: int = 128
    mapping_width: int = 64
    time_budget_s: float | None = None
    warmup_share: float = 0.25
    heldout_folds: int = 0
    patience: int | None = None

    @classmethod
    def published(cls, iterations: int = 2000, warmup_iterations: int = 1000) -> DeepFereConfig:
        """The training as published (modulo the iteration count and CPU-sized window batch)."""
        return cls(
            iterations=iterations,
            warmup_iterations=warmup_iterations,
            lr=2e-4,
            betas=(0.5, 0.999),
            cosine_decay=False,
            headroom=1.0,
            residual=False,
            forward_model=ForwardModel.LANCZOS2,
            tissue_only=False,
            corr_weight=5.0,
            corr_windows=32,
            corr_guide=CorrGuide.HE,
            corr_normalise=False,
            grad_clip=None,
            best_of_lr_loss=False,
            rollback=False,
        )

    @classmethod
    def preset(cls, preset: Preset | str) -> DeepFereConfig:
        """The default training with a preset's iteration caps and wall-clock budget."""
        p = Preset(preset)
        warmup, joint = PRESET_ITERATIONS[p]
        return cls(iterations=joint, warmup_iterations=warmup, time_budget_s=PRESET_SECONDS[p])

    def to_dict(self) -> dict:
        """Plain JSON-able settings (enums as their values)."""
        out = {}
        for k, v in self.__dict__.items():
            out[k] = v.value if isinstance(v, Enum) else (list(v) if isinstance(v, tuple) else v)
        return out


@dataclass(frozen=True)
class DeepFereResult:
    """Output of :func:`train_deepfere`.

    Attributes
    ----------
    sr : ndarray of float32, shape (C, H, W)
        Super-resolved stack in the intensity unit of the LR input.
    loss_history : tuple of float
        Total loss per iteration (warm-up first, then joint).
    lr_loss_history : tuple of float
        Fusion LR-consistency loss MSE(D(fusion), LR) per joint iteration, on the normalised scale.
    seconds : float
        Wall-clock training time.
    best_iteration : int
        Joint iteration whose output was returned (0-based; ``iterations`` = the final weights).
    mapping : ndarray of float32, shape (C, H, W)
        The mapping head's H&E→MSI image, rescaled to the input's intensity unit.
    device : str
        Torch device used.
    diagnostics : dict of str to tuple of float
        Per joint iteration, on the normalised scale: ``"map"`` and ``"fuse"`` (LR MSE of the
        mapping and fusion outputs), ``"corr"`` (structure-correlation loss, unweighted),
        ``"saturated"`` (fraction of tissue SR values of the sigmoid output below 0.01 or above
        0.99), ``"contrast"`` (standard deviation over tissue pixels, mean over channels) and
        ``"mean"`` (mean over tissue pixels and channels), ``"grad_norm"`` (global gradient norm
        before clipping).
    rollbacks : tuple of int
        Joint iterations at which a divergence was undone (see ``DeepFereConfig.rollback``).
    warmup_run, iterations_run : int
        Warm-up and joint iterations actually run (fewer than configured when the time budget or
        the held-out patience stopped training).
    stopped_by : str
        ``"iterations"``, ``"time_budget"`` or ``"patience"``.
    guide_cell_px : int
        k: guide pixels per SR cell side that the mapping head saw (k × k × 3 inputs per cell).
    heldout_loss_history : tuple of float
        With held-out folds: MSE(D(fusion), LR) on the held-out fold per joint iteration.
    moved_from_bicubic : float
        RMS difference between the returned SR image and its bicubic start over tissue SR pixels,
        relative to the RMS of the bicubic image there (0: the CNN returned its starting point).
    """

    sr: np.ndarray
    loss_history: tuple[float, ...]
    lr_loss_history: tuple[float, ...]
    seconds: float
    best_iteration: int
    mapping: np.ndarray
    device: str
    diagnostics: dict[str, tuple[float, ...]] = field(default_factory=dict)
    rollbacks: tuple[int, ...] = ()
    warmup_run: int = 0
    iterations_run: int = 0
    stopped_by: str = "iterations"
    guide_cell_px: int = 1
    heldout_loss_history: tuple[float, ...] = ()
    moved_from_bicubic: float = 0.0


# ----------------------------------------------------------------------------- networks


def _conv(c_in: int, c_out: int, k: int, stride: int = 1) -> nn.Sequential:
    """Conv with reflection padding (DIP ``conv(..., pad='reflection')``)."""
    layers: list[nn.Module] = []
    if k > 1:
        layers.append(nn.ReflectionPad2d((k - 1) // 2))
    layers.append(nn.Conv2d(c_in, c_out, k, stride=stride, padding=0))
    return nn.Sequential(*layers)


def _act() -> nn.Module:
    return nn.LeakyReLU(0.2)


class MappingHead(nn.Module):
    """H&E (3 ch) → MSI-like (C ch): five Conv3×3 + LeakyReLU(0.2) blocks, 64 features.

    With ``cell_px`` = k > 1 the input is the guide at k × k pixels per SR cell, folded
    space-to-depth into 3·k² channels per SR cell (``pixel_unshuffle``), so the first convolution
    sees every H&E pixel of its 3 × 3 SR cells (for k = 1 this is the published head).
    """

    def __init__(self, n_out: int, width: int = 64, cell_px: int = 1):
        super().__init__()
        chans = [3 * cell_px * cell_px, width, width, width, width, n_out]
        layers: list[nn.Module] = []
        for a, b in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(a, b, 3, padding=1), _act()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _Level(nn.Module):
    """One scale of the DIP skip network: concat(skip, deeper) then Conv3×3 and Conv1×1."""

    def __init__(self, c_in: int, inner: nn.Module | None, c_inner_out: int,
                 n_down: int = 128, n_up: int = 128, n_skip: int = 5):
        super().__init__()
        self.skip = nn.Sequential(_conv(c_in, n_skip, 1), _act())
        self.down = nn.Sequential(_conv(c_in, n_down, 3, stride=2), _act(), _conv(n_down, n_down, 3), _act())
        self.inner = inner
        self.up = nn.Sequential(
            _conv(n_skip + (c_inner_out if inner is not None else n_down), n_up, 3), _act(),
            _conv(n_up, n_up, 1), _act(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.down(x)
        if self.inner is not None:
            d = self.inner(d)
        d = tf.interpolate(d, scale_factor=2, mode="bilinear", align_corners=False)
        return self.up(torch.cat([self.skip(x), d], dim=1))


class SkipUNet(nn.Module):
    """Deep-Image-Prior "skip" network, 5 scales, 128 features, 5-channel skips, no batch norm.

    Returns the logits of the last Conv1×1 (the sigmoid is applied by the caller, which may add a
    residual logit first). Spatial size must be divisible by 2**scales.
    """

    def __init__(self, c_in: int, c_out: int, scales: int = 5, width: int = 128, n_skip: int = 5):
        super().__init__()
        level: _Level | None = None
        for i in reversed(range(scales)):
            level = _Level(c_in if i == 0 else width, level, width, width, width, n_skip)
        self.body = level
        self.head = nn.Conv2d(width, c_out, 1)
        self.scales = scales

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


# ----------------------------------------------------------------------------- forward model


def lanczos2_kernel_1d(factor: int) -> np.ndarray:
    """1-D Lanczos-2 anti-aliasing kernel for downsampling by F, centred on the F-block centre.

    Taps sit at the SR pixel offsets from the block centre, ``d = offset / F`` with |d| < 2
    (4F taps for even F, 4F − 1 for odd F); weights sinc(d)·sinc(d/2), normalised to sum 1.
    For even F this equals the published ``get_kernel(F, 'lanczos', phase=0.5, 4F+1, support=2)``.
    """
    f = _check_factor(factor)
    n = 4 * f if f % 2 == 0 else 4 * f - 1
    off = np.arange(n) - (n - 1) / 2.0
    d = off / f
    k = np.sinc(d) * np.sinc(d / 2.0)
    return (k / k.sum()).astype(np.float64)


class Downsampler(nn.Module):
    """Fixed LR forward model: depthwise Lanczos-2 (replicate padding) or F×F mean, stride F."""

    def __init__(self, factor: int, channels: int, model: ForwardModel):
        super().__init__()
        self.factor = factor
        self.model = model
        k1 = lanczos2_kernel_1d(factor)
        n = k1.size
        self.pad_l = (3 * factor) // 2 if factor % 2 == 0 else (3 * factor - 1) // 2
        self.pad_r = n - factor - self.pad_l
        k2 = np.outer(k1, k1).astype(np.float32)
        self.register_buffer("weight", torch.from_numpy(k2)[None, None].repeat(channels, 1, 1, 1))
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.model is ForwardModel.BOX:
            return tf.avg_pool2d(x, self.factor)
        x = tf.pad(x, (self.pad_l, self.pad_r, self.pad_l, self.pad_r), mode="replicate")
        return tf.conv2d(x, self.weight, stride=self.factor, groups=self.channels)


# ----------------------------------------------------------------------------- losses


def _masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the pixels where ``mask`` (1, 1, h, w) is 1, all channels."""
    n = mask.sum() * pred.shape[1]
    return ((pred - target) ** 2 * mask).sum() / n.clamp_min(1.0)


def _window_distances(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, win: int) -> torch.Tensor:
    """Squared Euclidean distances between all pixel pairs of K windows: (K, win², win²)."""
    c = x.shape[1]
    ar = torch.arange(win, device=x.device)
    rr = (rows[:, None] + ar[None, :])[:, :, None].expand(-1, win, win)
    cc = (cols[:, None] + ar[None, :])[:, None, :].expand(-1, win, win)
    patches = x[0][:, rr, cc].permute(1, 0, 2, 3).reshape(-1, c, win * win)  # (K, C, P)
    sq = (patches**2).sum(1)  # (K, P)
    g = torch.einsum("kcp,kcq->kpq", patches, patches)
    return (sq[:, :, None] + sq[:, None, :] - 2 * g).clamp_min(0.0)


def structure_correlation_loss(
    fused: torch.Tensor,
    guide: torch.Tensor,
    tissue: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    win: int,
    normalise: bool,
) -> torch.Tensor:
    """L1 between the pairwise pixel-distance matrices of ``fused`` and ``guide`` over windows.

    Rows and columns of background pixels (``tissue`` = 0) are zeroed in both matrices, as in the
    published loss. With ``normalise`` each matrix is divided by its mean over tissue pairs first.
    The guide's matrix carries no gradient.
    """
    d_f = _window_distances(fused, rows, cols, win)
    with torch.no_grad():
        d_g = _window_distances(guide, rows, cols, win)
        m = tissue[0, 0][
            (rows[:, None] + torch.arange(win, device=fused.device))[:, :, None],
            (cols[:, None] + torch.arange(win, device=fused.device))[:, None, :],
        ].reshape(len(rows), win * win)
        pair = m[:, :, None] * m[:, None, :]
    d_f = d_f * pair
    d_g = d_g * pair
    if normalise:
        n_pairs = pair.sum((1, 2)).clamp_min(1.0)
        d_f = d_f / (d_f.sum((1, 2)) / n_pairs + 1e-6)[:, None, None]
        d_g = d_g / (d_g.sum((1, 2)) / n_pairs + 1e-6)[:, None, None]
    return (d_f - d_g).abs().mean()


# ----------------------------------------------------------------------------- training


def _pick_device(device: str) -> torch.device:
    """The project's device policy (CUDA when available; on CPU, torch threads = half the cores)."""
    from ...torch_setup import get_device

    return get_device(device)


def _pad_to_multiple(
    a: np.ndarray, multiple: int, minimum: int = 0
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Mirror-pad the last two axes of (..., H, W) up to multiples of ``multiple`` (≥ ``minimum``).

    Returns the padded array and (top, bottom, left, right).
    """
    hh, ww = a.shape[-2:]
    ph = max(minimum, hh + (-hh) % multiple) - hh
    pw = max(minimum, ww + (-ww) % multiple) - ww
    top, left = ph // 2, pw // 2
    pads = (top, ph - top, left, pw - left)
    width = [(0, 0)] * (a.ndim - 2) + [(pads[0], pads[1]), (pads[2], pads[3])]
    return np.pad(a, width, mode="symmetric"), pads


def train_deepfere(
    lr: np.ndarray,
    guide_rgb: np.ndarray,
    factor: int,
    *,
    mask_lr: np.ndarray | None = None,
    iterations: int | None = None,
    seed: int = 0,
    device: str = "auto",
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    config: DeepFereConfig | None = None,
    preset: Preset | str | None = None,
    background: float | None = None,
) -> DeepFereResult:
    """Train the DeepFERE-style CNN on one image pair and return its SR stack.

    Parameters
    ----------
    lr : ndarray, shape (C, h, w)
        Low-resolution MSI, any non-negative intensity unit; NaN allowed outside tissue.
    guide_rgb : ndarray, shape (h·F·k, w·F·k, 3)
        H&E resampled onto the SR grid refined k times (k ≥ 1 H&E pixels per SR cell side, as
        :func:`napari_smsdl.reconstruction.prepare_guide` makes it for SMSDL), float in [0, 1].
        k is read from the shape; k = 1 is the SR grid itself (the published input).
    factor : int
        Upsampling factor F.
    mask_lr : ndarray of bool, shape (h, w), optional
        Tissue pixels of the LR grid; default: pixels finite in every channel.
    iterations : int, optional
        Joint training iterations; overrides ``config.iterations`` / the preset and switches the
        wall-clock budget off, so that exactly this many run (reproducible on any machine).
    seed : int
        Seeds torch (weights, window positions); results repeat on the same device.
    device : str
        ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ... On CPU the thread
        count follows :func:`napari_smsdl.torch_setup.configure_threads` (``SMSDL_NUM_THREADS``).
    progress : callable(stage, done, total), optional
        Called as ``progress("cnn", i, total)`` every few iterations.
    should_stop : callable() -> bool, optional
        Checked every iteration; when it returns True, :class:`~napari_smsdl.errors.Cancelled`.
    config : DeepFereConfig, optional
        Training settings (default: the stabilised :class:`DeepFereConfig`).
    preset : Preset or str, optional
        ``"fast"`` (15 s budget) or ``"default"`` (75 s budget), used when no config; see
        ``PRESET_ITERATIONS`` and ``PRESET_SECONDS``.
    background : float or None
        Value written to SR pixels whose LR pixel is not tissue; ``None`` (default) keeps the
        network's output there (it starts from the nearest-tissue-filled bicubic image), which is
        what a benchmark needs when SR tissue extends past the LR tissue mask.

    Returns
    -------
    DeepFereResult
        ``sr`` (C, h·F, w·F) float32 in the unit of ``lr``, non-negative.
    """
    f = _check_factor(factor)
    cfg = config if config is not None else (DeepFereConfig.preset(preset) if preset else DeepFereConfig())
    if iterations is not None:  # an explicit count is run exactly: no wall-clock budget
        cfg = replace(cfg, iterations=int(iterations), time_budget_s=None)
    lr_a = np.asarray(lr, dtype=np.float64)
    if lr_a.ndim == 2:
        lr_a = lr_a[None]
    if lr_a.ndim != 3:
        raise InputError(f"the LR stack must have shape (C, h, w), got {lr_a.shape}")
    c, h, w = lr_a.shape
    g = np.asarray(guide_rgb, dtype=np.float32)
    kc = g.shape[0] // (h * f) if g.ndim == 3 and h * f > 0 else 0
    if kc < 1 or g.shape != (h * f * kc, w * f * kc, 3):
        raise InputError(
            f"the guide must have shape (h·F·k, w·F·k, 3) = {(h * f, w * f, 3)} × k (SR grid refined k times, "
            f"RGB), got {g.shape}"
        )
    m_lr = np.isfinite(lr_a).all(axis=0) if mask_lr is None else np.asarray(mask_lr, dtype=bool)
    if m_lr.shape != (h, w) or not m_lr.any():
        raise InputError(f"mask_lr must be a non-empty (h, w) = {(h, w)} boolean mask")
    if not np.isfinite(lr_a[:, m_lr]).all():
        raise InputError("the LR stack has NaN or infinite values on tissue pixels")

    t0 = time.perf_counter()
    budget = cfg.time_budget_s
    dev = _pick_device(device)
    torch.manual_seed(seed)
    if dev.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    gen = torch.Generator(device="cpu").manual_seed(seed)

    # Per-channel normalisation: x / (headroom · LR max over tissue).
    lr_clean = np.where(m_lr[None], np.nan_to_num(lr_a), 0.0)
    ch_max = lr_clean[:, m_lr].max(axis=1)
    scale = np.where(ch_max > 0, ch_max * cfg.headroom, 1.0)
    lr_n = lr_clean / scale[:, None, None]
    m_train = m_lr
    m_held = np.zeros_like(m_lr)
    if cfg.heldout_folds >= 2:
        from .._heldout import blocked_folds

        folds = blocked_folds(m_lr, cfg.heldout_folds, seed=seed)
        m_held = folds == 0
        m_train = m_lr & ~m_held
    bic_n = bicubic_upsample(lr_n, f, mask_lr=m_lr, background=None).astype(np.float64)
    m_sr = upsample_mask(m_lr, f)
    if not cfg.tissue_only:
        # Published: the network sees the raw LR (background zeros) and fits every pixel.
        bic_n = bicubic_upsample(lr_n, f, mask_lr=np.ones_like(m_lr), background=None).astype(np.float64)

    # Pad the SR grid (mirror) to a multiple of 2**5 for the 5-scale U-Net, and to at least 2**6 so
    # that its deepest 3×3 convolutions still have 2×2 maps to reflect; crop afterwards.
    mult = 2**5
    bic_p, pads = _pad_to_multiple(bic_n, mult, 2 * mult)
    top, bottom, left, right = pads
    hh, ww = h * f, w * f
    g_chw = g.transpose(2, 0, 1)
    guide_sr = g_chw.reshape(3, hh, kc, ww, kc).mean(axis=(2, 4)) if kc > 1 else g_chw
    # the mapping head's input: the fine guide mirror-padded by k × the SR padding, folded k × k → channels
    fine_p = np.pad(g_chw, [(0, 0), (top * kc, bottom * kc), (left * kc, right * kc)], mode="symmetric")
    guide_sr_p = np.pad(guide_sr, [(0, 0), (top, bottom), (left, right)], mode="symmetric")

    def crop(x: torch.Tensor) -> torch.Tensor:
        return x[:, :, top : top + hh, left : left + ww]

    as_t = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32, device=dev)[None]  # noqa: E731
    bic_t = as_t(bic_p)
    guide_t = as_t(guide_sr_p)  # the guide on the SR grid (structure loss with CorrGuide.HE)
    map_in = tf.pixel_unshuffle(as_t(fine_p), kc) if kc > 1 else guide_t
    lr_t = as_t(lr_n)
    if cfg.tissue_only:
        m_lr_t = as_t(m_train[None].astype(np.float32))
    else:
        m_lr_t = as_t((~m_held)[None].astype(np.float32))
    m_held_t = as_t(m_held[None].astype(np.float32))
    use_held = bool(m_held.any())
    m_sr_t = as_t(m_sr[None].astype(np.float32))
    eps = 1e-3
    base_logit = torch.logit(bic_t.clamp(eps, 1 - eps)) if cfg.residual else None

    mapping = MappingHead(c, cfg.mapping_width, kc).to(dev)
    fusion = SkipUNet(2 * c, c, width=cfg.width).to(dev)
    if cfg.residual:
        nn.init.zeros_(fusion.head.weight)
        nn.init.zeros_(fusion.head.bias)
    down = Downsampler(f, c, cfg.forward_model).to(dev)
    params = list(mapping.parameters()) + list(fusion.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas)
    total = cfg.warmup_iterations + cfg.iterations
    win = min(cfg.window, hh, ww)

    def fuse() -> tuple[torch.Tensor, torch.Tensor]:
        y = mapping(map_in)
        z = fusion(torch.cat([bic_t, y], dim=1))
        out = torch.sigmoid(z + base_logit) if base_logit is not None else torch.sigmoid(z)
        return crop(out), crop(y)

    def check_stop(i: int) -> None:
        if should_stop is not None and should_stop():
            raise Cancelled(f"CNN training stopped at iteration {i} of {total}")
        if progress is not None and (i % 5 == 0 or i == total):
            progress("cnn", i, total)

    t_train = time.perf_counter()  # the budget counts training only, not the setup above

    def elapsed() -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t_train

    losses: list[float] = []
    stopped_by = "iterations"
    warmup_run = 0
    # Warm-up: the mapping head alone learns H&E → LR-consistent MSI (published: 1000 iterations).
    for i in range(cfg.warmup_iterations):
        if budget is not None and elapsed() >= cfg.warmup_share * budget:
            break
        check_stop(i)
        warmup_run += 1
        opt.zero_grad(set_to_none=True)
        y = crop(mapping(map_in))
        loss = _masked_mse(down(y), lr_t, m_lr_t)
        loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(mapping.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(float(loss.detach()))

    t_joint = elapsed()

    def progress_at(i: int) -> float:
        """Fraction of the joint budget used: iterations or seconds, whichever is further."""
        p = i / max(cfg.iterations, 1)
        if budget is not None:
            p = max(p, (elapsed() - t_joint) / max(budget - t_joint, 1e-9))
        return min(p, 1.0)

    def lr_at(i: int) -> float:
        if not cfg.cosine_decay:
            return cfg.lr
        lo = 0.05 * cfg.lr
        return lo + (cfg.lr - lo) * 0.5 * (1 + math.cos(math.pi * progress_at(i)))

    lr_hist: list[float] = []
    held_hist: list[float] = []
    diag: dict[str, list[float]] = {
        k: [] for k in ("map", "fuse", "corr", "saturated", "contrast", "mean", "grad_norm")
    }
    m_sr_bool = torch.as_tensor(m_sr, device=dev)
    best_loss, best_i, best_out, best_state = math.inf, -1, None, None
    lr_scale = 1.0
    rollbacks: list[int] = []
    iterations_run = 0
    since_best = 0

    def selection_loss(out: torch.Tensor, l_fuse: torch.Tensor) -> float:
        """What picks the returned iterate: the held-out fold's LR MSE, else the training one."""
        if use_held:
            with torch.no_grad():
                return float(_masked_mse(down(out), lr_t, m_held_t))
        return float(l_fuse.detach())

    for i in range(cfg.iterations):
        if budget is not None and i > 0 and elapsed() >= budget:
            stopped_by = "time_budget"
            break
        if cfg.patience is not None and use_held and since_best > cfg.patience:
            stopped_by = "patience"
            break
        check_stop(cfg.warmup_iterations + i)
        iterations_run += 1
        for group in opt.param_groups:
            group["lr"] = lr_scale * lr_at(i)
        opt.zero_grad(set_to_none=True)
        out, y = fuse()
        l_map = _masked_mse(down(y), lr_t, m_lr_t)
        l_fuse = _masked_mse(down(out), lr_t, m_lr_t)
        lf = selection_loss(out, l_fuse)
        if use_held:
            held_hist.append(lf)
        since_best += 1
        if cfg.best_of_lr_loss and lf < best_loss:
            since_best = 0
            # `out` comes from the current (not yet stepped) weights: remember both.
            best_loss, best_i, best_out = lf, i, out.detach().clone()
            if cfg.rollback:
                best_state = (
                    {k: v.detach().clone() for k, v in mapping.state_dict().items()},
                    {k: v.detach().clone() for k, v in fusion.state_dict().items()},
                )
        elif cfg.rollback and best_state is not None and lf > cfg.rollback_factor * best_loss:
            # Divergence (the sigmoid output running off to saturation): go back to the best
            # weights, restart Adam's moments and halve the learning rate.
            mapping.load_state_dict(best_state[0])
            fusion.load_state_dict(best_state[1])
            lr_scale *= 0.5
            opt = torch.optim.Adam(params, lr=lr_scale * lr_at(i), betas=cfg.betas)
            rollbacks.append(i)
            out, y = fuse()
            l_map = _masked_mse(down(y), lr_t, m_lr_t)
            l_fuse = _masked_mse(down(out), lr_t, m_lr_t)
            lf = selection_loss(out, l_fuse)
        loss = l_map + l_fuse
        l_corr = torch.zeros((), device=dev)
        if cfg.corr_weight > 0:
            rows = torch.randint(0, hh - win + 1, (cfg.corr_windows,), generator=gen).to(dev)
            cols = torch.randint(0, ww - win + 1, (cfg.corr_windows,), generator=gen).to(dev)
            ref = crop(guide_t) if cfg.corr_guide is CorrGuide.HE else y.detach()
            tissue = m_sr_t if cfg.tissue_only else (crop(guide_t).sum(1, keepdim=True) >= 0.05).float()
            l_corr = structure_correlation_loss(out, ref, tissue, rows, cols, win, cfg.corr_normalise)
            loss = loss + cfg.corr_weight * l_corr
        with torch.no_grad():
            o_t = out[0][:, m_sr_bool]
            diag["map"].append(float(l_map.detach()))
            diag["fuse"].append(float(l_fuse.detach()))
            diag["corr"].append(float(l_corr.detach()))
            diag["saturated"].append(float(((o_t < 0.01) | (o_t > 0.99)).float().mean()))
            diag["contrast"].append(float(o_t.std(dim=1).mean()))
            diag["mean"].append(float(o_t.mean()))
        loss.backward()
        gnorm = nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip else math.inf)
        diag["grad_norm"].append(float(gnorm))
        opt.step()
        losses.append(float(loss.detach()))
        lr_hist.append(float(l_fuse.detach()))
    check_stop(total)

    with torch.no_grad():
        out_last, y_last = fuse()
        final_l = selection_loss(out_last, _masked_mse(down(out_last), lr_t, m_lr_t))
    if cfg.best_of_lr_loss and best_out is not None and best_loss < final_l:
        chosen, best_i = best_out, best_i
    else:
        chosen, best_i = out_last, iterations_run

    with torch.no_grad():
        start = crop(bic_t)[0][:, m_sr_bool]
        moved = float(((chosen[0][:, m_sr_bool] - start) ** 2).mean().sqrt() / (start**2).mean().sqrt().clamp_min(1e-12))

    sr = chosen[0].cpu().numpy().astype(np.float64) * scale[:, None, None]
    mapping_np = y_last[0].cpu().numpy().astype(np.float64) * scale[:, None, None]
    if background is not None:
        sr[:, ~m_sr] = background
        mapping_np[:, ~m_sr] = background
    return DeepFereResult(
        sr=sr.astype(np.float32),
        loss_history=tuple(losses),
        lr_loss_history=tuple(lr_hist),
        seconds=time.perf_counter() - t0,
        best_iteration=int(best_i),
        mapping=mapping_np.astype(np.float32),
        device=str(dev),
        diagnostics={k: tuple(v) for k, v in diag.items()},
        rollbacks=tuple(rollbacks),
        warmup_run=warmup_run,
        iterations_run=iterations_run,
        stopped_by=stopped_by,
        guide_cell_px=kc,
        heldout_loss_history=tuple(held_hist),
        moved_from_bicubic=moved,
    )
