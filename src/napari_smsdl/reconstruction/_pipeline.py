"""The reconstruction pipeline and the benchmark protocol, shared by the CLI and the widgets.

* :func:`prepare_guide` resamples the registered H&E onto the super-resolution (SR) grid refined
  ``k`` times, so each SR cell sees its own k × k patch of H&E.
* :class:`Settings`, :class:`Method` and :class:`Reconstruction` say what a run is and what it made;
  :func:`check_inputs` refuses what cannot work before minutes of compute.
* :func:`_guide_and_features` computes the guide and the H&E features once per run;
  :func:`run_cnn` is the CNN baseline on a set of channels. The run itself, for any number of
  channels, is :mod:`napari_smsdl.reconstruction._channels` (:func:`reconstruct`).

Grids: the MSI has pixel size p µm and shape (h, w); the SR grid has pixel size p/F and shape
(h·F, w·F); MSI pixel (i, j) covers exactly SR cells [i·F, (i+1)·F) × [j·F, (j+1)·F).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError
from ..io import tissue_mask
from ..features import FAST_FEATURES, FeatureMaps, FeatureParams, choose_cell_px, extract_features
from ._regression import FAST_REGRESSION, RegressionParams
from .baselines.backprojection import Conservation, conserve

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]



class Method(str, enum.Enum):
    SMSDL = "smsdl"
    BICUBIC = "bicubic"
    BACKPROJECTION = "backprojection"  # the H&E-free control: bicubic + back-projection
    CNN = "cnn"


@dataclass(frozen=True)
class Settings:
    """Everything that decides a reconstruction (saved with the results)."""

    factor: int = 4
    features: FeatureParams = FeatureParams()
    regression: RegressionParams = RegressionParams()
    cnn_preset: str = "default"
    cnn_iterations: int | None = None
    max_cell_px: int = 8  # H&E pixels per SR cell side in the guide image (caps memory and time)
    seed: int = 0
    device: str = "auto"

    @classmethod
    def preset(cls, name: str = "default", **overrides) -> Settings:
        """``"default"`` or ``"fast"`` (the fast preset is for tests and demos: under 2 minutes)."""
        if name == "fast":
            base = cls(features=FAST_FEATURES, regression=FAST_REGRESSION, cnn_preset="fast", max_cell_px=4)
        elif name == "default":
            base = cls()
        else:
            raise InputError(f"unknown preset {name!r} (use 'default' or 'fast')")
        seed = overrides.get("seed")
        if seed is not None:  # one seed drives every random part
            base = dataclasses.replace(
                base,
                features=dataclasses.replace(base.features, seed=seed),
                regression=dataclasses.replace(base.regression, seed=seed),
            )
        return dataclasses.replace(base, **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Reconstruction:
    """SR stacks per method (C, h·F, w·F) float32, with timings and what was used to make them."""

    sr: dict
    seconds: dict
    guide_rgb: np.ndarray
    features: FeatureMaps | None
    loss_history: dict = field(default_factory=dict)
    settings: Settings = Settings()
    #: method → (C, h·F, w·F) predictive standard deviation (SMSDL)
    uncertainty: dict = field(default_factory=dict)
    #: method → per-channel histology gain (:meth:`Guidance.to_dict`) (SMSDL)
    guidance: dict = field(default_factory=dict)
    #: method → the settings chosen from held-out LR pixels and their scores (SMSDL)
    choices: dict = field(default_factory=dict)



def prepare_guide(
    he_rgb: np.ndarray,
    *,
    he_pixel_size_um: float,
    msi_shape: tuple[int, int],
    msi_pixel_size_um: float,
    factor: int,
    transform=None,
    max_cell_px: int = 8,
) -> tuple[np.ndarray, int]:
    """The H&E on the SR grid refined k times: ((h·F·k, w·F·k, 3) float32 in [0, 1], k).

    ``transform`` maps MSI physical space (µm, origin at the centre of MSI pixel (0, 0)) to H&E
    physical space; None means the H&E covers exactly the MSI field of view.
    """
    from ..registration import resample_moving_to_grid, same_field_of_view_transform
    from ..registration._stages import field_of_view_mismatch

    from ..io import to_rgb_uint8

    he = to_rgb_uint8(he_rgb).astype(np.float32) / 255.0  # the documented dtype rules, or a refusal
    sr_px = msi_pixel_size_um / factor
    k = choose_cell_px(he_pixel_size_um, sr_px, max_cell_px)
    grid_px = sr_px / k
    if transform is None:
        mismatch = field_of_view_mismatch(msi_shape, msi_pixel_size_um, he.shape[:2], he_pixel_size_um)
        if mismatch:
            log.warning(mismatch)
        transform = same_field_of_view_transform(msi_shape, msi_pixel_size_um, he.shape[:2], he_pixel_size_um)
    rows, cols = msi_shape[0] * factor * k, msi_shape[1] * factor * k
    # the fine grid covers the MSI grid: its pixel (0, 0) centre sits at -p/2 + g/2 in MSI space
    origin = -msi_pixel_size_um / 2 + grid_px / 2
    guide = resample_moving_to_grid(
        he, he_pixel_size_um, transform, grid_shape_rc=(rows, cols), grid_pixel_size_um=grid_px,
        grid_origin_um=(origin, origin), antialias=True,
    )
    return np.clip(np.asarray(guide, np.float32), 0, 1), k


def check_factor(factor) -> int:
    """F as an int from 2 to 16; anything else (0, 2.5, "4x") is refused, never rounded."""
    try:
        f = int(factor)
    except (TypeError, ValueError):
        raise InputError(f"the factor must be an integer from 2 to 16, got {factor!r}") from None
    if f != factor or not 2 <= f <= 16:
        raise InputError(f"the factor must be an integer from 2 to 16, got {factor!r}")
    return f


def check_inputs(lr_msi, he_rgb, settings: Settings, methods, mask_lr=None, transform=None):
    """Everything that can be checked before minutes of work: (LR stack, F, tissue mask) or InputError.

    The MSI must be (channels, rows, cols); an array whose last axis looks like channels is refused
    with how to fix it rather than guessed, since a (rows, cols, C) stack read as (C, rows, cols) is
    garbage that trains without complaint.
    """
    lr = np.asarray(lr_msi, np.float32)
    if lr.ndim == 2:
        lr = lr[None]
    if lr.ndim != 3:
        raise InputError(f"the MSI stack must be (channels, rows, cols), got shape {np.shape(lr_msi)}")
    factor = check_factor(settings.factor)
    he_shape = getattr(he_rgb, "shape", None) if not isinstance(he_rgb, list) else np.shape(he_rgb)
    if transform is None and he_shape is not None and len(he_shape) >= 2 and lr.shape[0] > 1:
        # same field of view: the MSI grid and the H&E have one aspect ratio; a channels-last stack does not
        he_aspect = he_shape[0] / he_shape[1]
        as_given, as_last = lr.shape[1] / lr.shape[2], lr.shape[0] / lr.shape[1]
        if abs(np.log(as_given / he_aspect)) > np.log(1.5) and abs(np.log(as_last / he_aspect)) < np.log(1.1):
            raise InputError(
                f"the MSI stack of shape {tuple(lr.shape)} looks channels-last (rows, cols, channels) for an H&E of "
                f"shape {tuple(he_shape)}; pass it as (channels, rows, cols), e.g. np.moveaxis(stack, -1, 0)")
    acquired = np.isfinite(lr).all(0)
    partial = ~acquired & np.isfinite(lr).any(0)
    if partial.any():
        # a NaN means "no spectrum here": a pixel with NaN in only some channels is dropped from all of them
        bad = np.flatnonzero((~np.isfinite(lr[:, partial])).any(1))
        row, col = (int(v[0]) for v in np.nonzero(partial))
        log.warning("%d MSI pixels (e.g. row %d, column %d) are NaN in %d of %d channels (e.g. channel %d): they are "
                    "treated as having no spectrum and left out of every channel", int(partial.sum()), row, col,
                    len(bad), lr.shape[0], int(bad[0]))
    if mask_lr is None:
        mask_lr = tissue_mask(lr)
    elif np.shape(mask_lr) != lr.shape[1:]:
        raise InputError(f"the tissue mask {np.shape(mask_lr)} does not match the MSI grid {lr.shape[1:]}")
    mask_lr = np.asarray(mask_lr, bool) & acquired
    if not mask_lr.any() or not np.nan_to_num(lr)[:, mask_lr].any():
        raise InputError(f"the MSI ({lr.shape[1]} × {lr.shape[2]} pixels, {lr.shape[0]} channels) has no acquired "
                         "pixel with a non-zero intensity")
    needed = 2 * settings.regression.folds
    if Method.SMSDL in methods and mask_lr.sum() < needed:
        raise InputError(f"only {int(mask_lr.sum())} tissue pixels in the MSI: SMSDL needs at least {needed} "
                         f"({settings.regression.folds} held-out folds of 2)")
    return lr, factor, mask_lr


@dataclass
class _Prepared:
    """The guide and the features of one run (:func:`_guide_and_features`), computed once for every method."""

    guide: np.ndarray | None  # (rows·F·k, cols·F·k, 3) in memory; each SR cell's mean colour when tiled
    features: object  # (D, rows·F, cols·F): numpy, the tiled store's zarr array, or None (not needed)
    maps: FeatureMaps | None
    seconds: float
    from_cache: bool
    tiled: bool

    def seconds_for(self, run_seconds: dict) -> dict:
        """Per-method seconds with what they needed: SMSDL the guide and features, the CNN its guide."""
        seconds = dict(run_seconds)
        for method in ("smsdl", "cnn"):
            if method in seconds:
                seconds[method] += self.seconds
        return seconds


def _guide_and_features(he_rgb, msi_shape: tuple[int, int], methods, *, he_pixel_size_um: float,
                       msi_pixel_size_um: float, settings: Settings, transform=None, cache_dir=None,
                       save_weights=None, progress: ProgressFn | None = None, should_stop=None,
                       in_memory: bool = True) -> _Prepared:
    """The guide (:func:`prepare_guide`) and the SMSDL features, once, for an H&E array or a whole slide.

    An H&E array: the guide in memory (always when ``in_memory``, to show it; else only for SMSDL or
    the CNN), then :func:`napari_smsdl.features.extract_features` for SMSDL. A lazy
    :class:`napari_smsdl.io.HistologyImage`: the tiled store (:func:`tiled_feature_store`), read into
    memory when ``in_memory`` else streamed, and the CNN's guide from its last 3 features (each SR
    cell's mean colour). Under torchrun every rank calls this; rank 0 alone computes the features.
    """
    from ..io import HistologyImage

    methods = [Method(m) for m in methods]
    guided = Method.SMSDL in methods or Method.CNN in methods
    stage = progress or (lambda *_: None)
    factor = int(settings.factor)
    t0 = time.perf_counter()
    guide, features, maps, from_cache = None, None, None, False
    tiled = isinstance(he_rgb, HistologyImage)  # a lazy (whole-slide) H&E: features tile by tile
    if tiled and guided:
        store = tiled_feature_store(he_rgb, msi_shape, msi_pixel_size_um, he_pixel_size_um, transform, settings,
                                    cache_dir, save_weights, progress, should_stop)
        from_cache = store.from_cache
        if in_memory:
            maps = FeatureMaps(store.read(), store.names, store.ssl_losses, store.seconds, store.from_cache)
            features = maps.data
        else:
            features = store.open()  # streamed, never whole in memory
        guide = np.clip(np.asarray(features[-3:], np.float32).transpose(1, 2, 0), 0, 1)
    elif not tiled and (in_memory or guided):
        stage("resampling H&E onto the SR grid", 0, 1)
        guide, _ = prepare_guide(
            he_rgb, he_pixel_size_um=he_pixel_size_um, msi_shape=msi_shape, msi_pixel_size_um=msi_pixel_size_um,
            factor=factor, transform=transform, max_cell_px=settings.max_cell_px,
        )
        stage("resampling H&E onto the SR grid", 1, 1)  # closes the stage (a CLI log line times it)
        if Method.SMSDL in methods:
            maps = extract_features(
                guide, sr_shape=(msi_shape[0] * factor, msi_shape[1] * factor), factor=factor,
                params=settings.features, cache_dir=cache_dir, device=settings.device, save_weights=save_weights,
                progress=progress, should_stop=should_stop,
            )
            features, from_cache = maps.data, maps.from_cache
    return _Prepared(guide, features, maps, time.perf_counter() - t0, from_cache, tiled)


def run_cnn(lr, guide, factor, *, mask_lr, bicubic, settings: Settings, conservation, progress=None,
            should_stop=None) -> tuple[np.ndarray, dict, list]:
    """The CNN baseline on a set of channels: (SR stack, what it ran, loss history).

    The CNN sees the same guide as SMSDL's features (k × k H&E pixels per SR cell, folded into
    3·k² input channels of its mapping head), within its preset's budget, and its output gets the
    same conservation as SMSDL. Both the in-memory and the many-channel path call this.
    """
    from .baselines import train_deepfere

    cnn = train_deepfere(
        lr, guide, factor, mask_lr=mask_lr, iterations=settings.cnn_iterations, seed=settings.seed,
        device=settings.device, progress=progress, should_stop=should_stop, preset=settings.cnn_preset,
    )
    # what the budget allowed, and whether the CNN left its bicubic start at all (a label for outputs)
    ran = {
        "guide_cell_px": int(cnn.guide_cell_px), "warmup_run": int(cnn.warmup_run),
        "iterations_run": int(cnn.iterations_run), "stopped_by": cnn.stopped_by,
        "moved_from_bicubic": float(cnn.moved_from_bicubic), "conservation": str(Conservation(conservation).value),
        "equals_start": bool(cnn.moved_from_bicubic < 1e-3),
    }
    if cnn.moved_from_bicubic < 1e-3:
        log.warning("the CNN returned (almost) its bicubic start (relative change %.1e after %d iterations)",
                    cnn.moved_from_bicubic, cnn.iterations_run)
    out = conserve(np.asarray(cnn.sr, np.float32), lr, factor, mask_lr, conservation)
    # how far that is from the same conservation of its bicubic start (the H&E-free control when the
    # conservation is exact): relative RMS difference over the tissue SR cells
    start = conserve(bicubic, lr, factor, mask_lr, conservation)
    on = np.repeat(np.repeat(mask_lr, factor, 0), factor, 1)
    diff = np.sqrt(np.mean((out[:, on] - start[:, on]) ** 2))
    rel = float(diff / max(float(np.sqrt(np.mean(start[:, on] ** 2))), 1e-12))
    ran["differs_from_conserved_start"] = rel
    ran["equals_conserved_start"] = bool(rel < 1e-3)
    if rel < 1e-3:
        log.warning("after conservation the CNN equals its conserved bicubic start (relative difference %.1e): "
                    "with exact conservation that is the H&E-free control", rel)
    return out, ran, list(getattr(cnn, "loss_history", []))


def tiled_feature_store(histology, msi_shape, msi_pixel_size_um, he_pixel_size_um, transform, settings, cache_dir,
                        save_weights=None, progress=None, should_stop=None):
    """Whole-slide features through :func:`napari_smsdl.features.extract_features_tiled` (the store).

    The zarr store lives in ``cache_dir`` (a temporary folder without one, made by rank 0 and shared
    with the other ranks under torchrun); its own key (slide content, grid, parameters) decides
    whether it is reused.
    """
    from pathlib import Path

    from .. import distributed as dd
    from ..features import extract_features_tiled

    folder = Path(dd.broadcast_object(str(cache_dir) if cache_dir else _temporary_folder()))
    folder.mkdir(parents=True, exist_ok=True)
    return extract_features_tiled(
        histology, msi_shape=tuple(msi_shape), msi_pixel_size_um=msi_pixel_size_um, factor=settings.factor,
        out=folder / f"features-tiled-{Path(histology.path).stem}.zarr", transform=transform,
        he_pixel_size_um=he_pixel_size_um, params=settings.features, max_cell_px=settings.max_cell_px,
        device=settings.device, save_weights=save_weights, progress=progress, should_stop=should_stop,
    )


def _temporary_folder() -> str | None:
    import tempfile

    from .. import distributed as dd

    return tempfile.mkdtemp(prefix="smsdl-tiled-") if dd.is_main_process() else None
