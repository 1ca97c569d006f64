"""The :class:`Project`: one reconstruction session held in memory (eager or lazy stacks), no Qt.

A project holds the inputs (paths and SHA-256 of the files they came from, and the low-resolution
MSI stack itself), the registration (landmarks, transform, report), the parameters
(:class:`~napari_smsdl.reconstruction.Settings` and the pixel sizes), the trained ViT weights, the
feature cache, and the results: the SR stack of every method (``"backprojection"`` is the H&E-free
control), SMSDL's predictive standard deviation (``uncertainty``), the per-channel histology gain and
whether each channel used the histology (``guidance``), the settings chosen from held-out LR pixels
(``choices``), the ground truth and the metrics when there is one, the loss curves.

**Many channels.** A project made by the chunked path holds lazy (zarr) SR stacks
(:attr:`Project.lazy`); scores against a ground truth are then computed for a few chosen channels
(:meth:`Project.with_truth`), the others are NaN.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io import tissue_mask
from ..reconstruction import ManyChannelRun, Reconstruction, Settings
from ._format import InputRecord


#: Channels scored by default against a ground truth when the SR stacks are lazy.
LAZY_SCORED_CHANNELS = 8


def is_lazy(stack) -> bool:
    """True for an array-like that is not a numpy array (a zarr or dask array: read on demand)."""
    return stack is not None and not isinstance(stack, np.ndarray)


def read_channels(stack, channels: Sequence[int]) -> np.ndarray:
    """The given channels of a (C, rows, cols) array-like as float32 numpy, read one at a time."""
    chans = [int(c) for c in channels]
    if not is_lazy(stack):
        return np.asarray(stack, np.float32)[chans]
    if not chans:
        return np.zeros((0, *tuple(stack.shape)[1:]), np.float32)
    return np.stack([np.asarray(stack[c], np.float32) for c in chans])


def store_choices(stack):
    """The held-out choices in a chunked SMSDL store's attributes (one entry per chunk), or None.

    ``stack`` is a :class:`napari_smsdl.reconstruction.ManyChannelRun` ``sr`` entry (a ``ChannelStack``).
    """
    import zarr

    return zarr.open_group(str(stack.path), mode="r").attrs.get("choices")


def _cut_guidance(guidance: dict, chans: Sequence[int]) -> dict:
    """Per-channel lists of every method's guidance cut to ``chans`` (other entries kept)."""
    out = {}
    for method, entry in guidance.items():
        if not isinstance(entry, dict):
            out[method] = entry
            continue
        out[method] = {k: ([v[c] for c in chans] if isinstance(v, list) and len(v) > max(chans, default=-1) else v)
                       for k, v in entry.items()}
    return out

# ---------------------------------------------------------------------------- the project
@dataclass(frozen=True, eq=False)
class Project:
    """One reconstruction session: inputs, registration, parameters, weights and results.

    Attributes
    ----------
    lr_msi : (C, h, w) float32
        The measured low-resolution MSI the methods started from; NaN where not acquired.
    channel_names : tuple of str
        One per channel (e.g. ``"m/z 885.5499"``).
    msi_pixel_size_um, he_pixel_size_um : float
        Pixel sizes in µm of the MSI and of the H&E (level 0).
    settings : Settings
        Everything that decided the reconstruction (``settings.factor`` is F).
    sr : dict
        Method name (``"smsdl"``, ``"bicubic"``, ``"backprojection"`` (the H&E-free control), ``"cnn"``)
        → (C, h·F, w·F) float32 in the MSI's units.
    mz : tuple of float or None
        One m/z per channel when the channels are m/z windows.
    seconds, loss_history : dict
        Per-method wall time (s) and training losses.
    guide_rgb : (h·F·k, w·F·k, 3) array or None
        The registered H&E on the SR grid refined k times (uint8, or float in [0, 1]).
    truth : (C, h·F, w·F) float32 or None
        A ground truth on the SR grid, when one exists (benchmark, simulated sample).
    mask_hr, mask_lr : bool arrays or None
        Tissue masks of the SR grid (scoring) and of the MSI grid (training).
    metrics : dict or None
        Method → :func:`napari_smsdl.evaluation.score_stack` output (+ ``"seconds"``).
    transform : SimpleITK transform or None
        MSI physical µm → H&E physical µm (None: the H&E covers the MSI field of view).
    landmarks : LandmarkPairs or None
    registration_report : dict or None
    inputs : tuple of InputRecord
    weights_path : Path or None
        ViT weights file (a torch ``{level: state_dict}``); inside the project once loaded.
    cache_dir : Path or None
        Feature-cache folder; ``DIR/cache`` once loaded.
    path : Path or None
        The project folder this was loaded from or saved to.
    saved_at : str or None
        ISO time of the save.
    uncertainty : dict
        Method (``"smsdl"``) → (C, h·F, w·F) float32 predictive standard deviation, in the MSI's units,
        on the grid of that method's SR stack (lazy, like ``sr``, for many channels).
    guidance : dict
        Method (``"smsdl"``) → ``{"gain": [...], "gain_std": [...], "used_histology": [...]}``, one
        entry per channel (:meth:`napari_smsdl.reconstruction.Guidance.to_dict`).
    choices : dict
        Method (``"smsdl"``) → the settings chosen from held-out LR pixels and their scores (a list
        of one such dict per chunk of channels for a many-channel run).
    msi_origin_rc_um : (float, float)
        Where the top-left corner of the MSI grid lies, in µm, in the viewer's world (an imzML whose
        raster does not start at position (1, 1) is placed at the instrument's origin,
        :attr:`napari_smsdl.io.ImzMLDataset.origin_rc_um`); a reopened project is placed there again.
    """

    lr_msi: np.ndarray
    channel_names: tuple[str, ...]
    msi_pixel_size_um: float
    he_pixel_size_um: float
    settings: Settings
    sr: dict
    mz: tuple[float, ...] | None = None
    seconds: dict = field(default_factory=dict)
    loss_history: dict = field(default_factory=dict)
    guide_rgb: np.ndarray | None = None
    truth: np.ndarray | None = None
    mask_hr: np.ndarray | None = None
    mask_lr: np.ndarray | None = None
    metrics: dict | None = None
    transform: object | None = None
    landmarks: object | None = None
    registration_report: dict | None = None
    inputs: tuple[InputRecord, ...] = ()
    weights_path: Path | None = None
    cache_dir: Path | None = None
    path: Path | None = None
    saved_at: str | None = None
    uncertainty: dict = field(default_factory=dict)
    guidance: dict = field(default_factory=dict)
    choices: dict = field(default_factory=dict)
    msi_origin_rc_um: tuple[float, float] = (0.0, 0.0)

    @property
    def factor(self) -> int:
        return int(self.settings.factor)

    @property
    def sr_pixel_size_um(self) -> float:
        """SR pixel size in µm: the MSI pixel size / F."""
        return float(self.msi_pixel_size_um) / self.factor

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(self.sr)

    @property
    def fell_back(self) -> list[int]:
        """Channels whose SMSDL output is the H&E-free control (their held-out histology gain was not
        clearly positive); empty without guidance."""
        used = (self.guidance.get("smsdl") or {}).get("used_histology") or []
        return [i for i, u in enumerate(used) if not u]

    @property
    def lazy(self) -> bool:
        """True when the SR stacks are read on demand (zarr) instead of held in memory (many channels)."""
        return any(is_lazy(v) for v in self.sr.values())

    @classmethod
    def from_reconstruction(
        cls,
        recon: Reconstruction | ManyChannelRun,
        *,
        lr_msi: np.ndarray,
        channel_names: Sequence[str],
        msi_pixel_size_um: float,
        he_pixel_size_um: float,
        methods: Sequence[str] | None = None,
        mz: Sequence[float] | None = None,
        mask_lr: np.ndarray | None = None,
        transform=None,
        landmarks=None,
        registration_report: dict | None = None,
        inputs: Sequence[InputRecord] = (),
        weights_path: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
    ) -> Project:
        """A project from a reconstruction and its inputs: both paths of ``reconstruct`` make one.

        A :class:`napari_smsdl.reconstruction.Reconstruction` (:func:`napari_smsdl.reconstruction.reconstruct`)
        gives an in-memory project. A :class:`napari_smsdl.reconstruction.ManyChannelRun`
        (:func:`napari_smsdl.reconstruction.reconstruct_many_channels`) gives a lazy one: ``sr`` holds its zarr
        arrays (read on demand) in the order of ``methods`` (default: the run's), with no loss history and
        no registered guide image (it would be F·k times the MSI).
        """
        if isinstance(recon, ManyChannelRun):
            order = [m for m in (methods or recon.sr) if m in recon.sr] + [m for m in recon.sr if m not in (methods or ())]
            sr = {str(m): recon.sr[m].open() for m in order}
            stores = {str(m): recon.sr[m] for m in order if recon.sr[m].open_uncertainty() is not None}
            run = dict(uncertainty={m: st.open_uncertainty() for m, st in stores.items()},
                       guidance={m: dict(st.guidance()) for m, st in stores.items() if st.guidance() is not None},
                       choices={m: store_choices(st) for m, st in stores.items() if store_choices(st) is not None})
        else:
            sr = {str(k): np.asarray(v, np.float32) for k, v in recon.sr.items()}
            run = dict(loss_history={str(k): [float(x) for x in v] for k, v in recon.loss_history.items()},
                       guide_rgb=recon.guide_rgb,
                       uncertainty={str(k): np.asarray(v, np.float32) for k, v in recon.uncertainty.items()},
                       guidance={str(k): dict(v) for k, v in recon.guidance.items()},
                       choices={str(k): v for k, v in recon.choices.items()})
        return cls._from_run(
            recon.settings, sr, recon.seconds, lr_msi=lr_msi, channel_names=channel_names,
            msi_pixel_size_um=msi_pixel_size_um, he_pixel_size_um=he_pixel_size_um, mz=mz, mask_lr=mask_lr,
            transform=transform, landmarks=landmarks, registration_report=registration_report, inputs=inputs,
            weights_path=weights_path, cache_dir=cache_dir, **run,
        )

    @classmethod
    def _from_run(cls, settings, sr: dict, seconds: dict, *, lr_msi, channel_names, msi_pixel_size_um, he_pixel_size_um,
                  mz, mask_lr, transform, landmarks, registration_report, inputs, weights_path, cache_dir,
                  **extra) -> Project:
        """The fields every finished run sets, normalised (LR stack, names, sizes, paths); ``extra`` as given."""
        lr = np.asarray(lr_msi, np.float32)
        if lr.ndim == 2:
            lr = lr[None]
        if len(channel_names) != lr.shape[0]:
            raise InputError(f"{len(channel_names)} channel names for {lr.shape[0]} channels")
        return cls(
            lr_msi=lr,
            channel_names=tuple(str(n) for n in channel_names),
            msi_pixel_size_um=float(msi_pixel_size_um),
            he_pixel_size_um=float(he_pixel_size_um),
            settings=settings,
            sr=sr,
            mz=None if mz is None else tuple(float(m) for m in mz),
            seconds={str(k): float(v) for k, v in seconds.items()},
            mask_lr=None if mask_lr is None else np.asarray(mask_lr, bool),
            transform=transform,
            landmarks=landmarks,
            registration_report=registration_report,
            inputs=tuple(inputs),
            weights_path=None if weights_path is None else Path(weights_path),
            cache_dir=None if cache_dir is None else Path(cache_dir),
            **extra,
        )

    def with_truth(self, truth, mask_hr: np.ndarray | None = None, *,
                   channels: Sequence[int] | None = None) -> Project:
        """This project with a ground truth on the SR grid and every method scored against it.

        ``mask_hr`` defaults to the pixels that are finite in every channel and non-zero in one.

        With lazy SR stacks (:attr:`lazy`) the truth is kept as given (it may be lazy too) and only
        ``channels`` are scored (default: the first ``LAZY_SCORED_CHANNELS``), read one by one; the
        other channels' scores are NaN, the means are over the scored channels, and every method's
        entry lists them under ``"scored_channels"``. ``mask_hr`` then defaults to the tissue of the
        scored channels. In memory ``channels`` is ignored: every channel is scored.
        """
        from ..evaluation import score_stack

        if self.lazy:
            return self._with_lazy_truth(truth, mask_hr, channels)
        t = np.asarray(truth, np.float32)
        if t.ndim == 2:
            t = t[None]
        self._check_truth_shape(t.shape)
        if mask_hr is None:
            mask_hr = tissue_mask(t)
        mask_hr = np.asarray(mask_hr, bool)
        clean = np.where(mask_hr[None], np.nan_to_num(t), 0.0).astype(np.float32)
        metrics = {}
        for name, stack in self.sr.items():
            metrics[name] = {**score_stack(clean, stack, mask_hr), "seconds": float(self.seconds.get(name, math.nan))}
        return dataclasses.replace(self, truth=clean, mask_hr=mask_hr, metrics=metrics)

    def _check_truth_shape(self, shape) -> None:
        expected = (len(self.channel_names), *self.lr_msi.shape[1:])
        expected = (expected[0], expected[1] * self.factor, expected[2] * self.factor)
        if tuple(shape) != expected:
            raise InputError(f"ground truth of shape {tuple(shape)} does not match the SR stacks {expected}")

    def _with_lazy_truth(self, truth, mask_hr, channels) -> Project:
        from ..evaluation import score_stack

        self._check_truth_shape(truth.shape)
        n = len(self.channel_names)
        chans = sorted({int(c) for c in (range(min(n, LAZY_SCORED_CHANNELS)) if channels is None else channels)})
        if not chans or not all(0 <= c < n for c in chans):
            raise InputError(f"channels to score must be among 0..{n - 1}, got {chans}")
        t = read_channels(truth, chans)
        if mask_hr is None:  # over every channel, as in memory, so a score does not depend on its company
            from ..reconstruction import mask_from_stack

            mask_hr = mask_from_stack(truth)
        mask_hr = np.asarray(mask_hr, bool)
        clean = np.where(mask_hr[None], np.nan_to_num(t), 0.0).astype(np.float32)
        metrics = {}
        for name, stack in self.sr.items():
            scores = score_stack(clean, read_channels(stack, chans), mask_hr)
            full = {}
            for metric, entry in scores.items():
                per = [math.nan] * n
                for c, v in zip(chans, entry["per_channel"], strict=True):
                    per[c] = float(v)
                full[metric] = {"mean": float(entry["mean"]), "per_channel": per}
            metrics[name] = {**full, "seconds": float(self.seconds.get(name, math.nan)), "scored_channels": chans}
        return dataclasses.replace(self, truth=truth, mask_hr=mask_hr, metrics=metrics)

    def subset(self, channels: Sequence[int]) -> Project:
        """An in-memory project of the given channels only (their stacks read channel by channel).

        For a lazy project: a figure or a quick look at a few of thousands of channels. Metrics are
        cut to the channels (their means are kept as they were).
        """
        chans = [int(c) for c in channels]

        def cut_metrics(metrics):
            if metrics is None:
                return None
            out = {}
            for method, scores in metrics.items():
                out[method] = {k: ({**v, "per_channel": [v["per_channel"][c] for c in chans]}
                                   if isinstance(v, dict) and "per_channel" in v else v)
                               for k, v in scores.items() if k != "scored_channels"}
            return out

        return dataclasses.replace(
            self,
            lr_msi=np.asarray(self.lr_msi, np.float32)[chans],
            channel_names=tuple(self.channel_names[c] for c in chans),
            mz=None if self.mz is None else tuple(self.mz[c] for c in chans),
            sr={m: read_channels(v, chans) for m, v in self.sr.items()},
            truth=None if self.truth is None else read_channels(self.truth, chans),
            metrics=cut_metrics(self.metrics),
            uncertainty={m: read_channels(v, chans) for m, v in self.uncertainty.items()},
            guidance=_cut_guidance(self.guidance, chans),
        )

    def input_status(self) -> dict[str, str]:
        """Role → :meth:`InputRecord.check` for every recorded input."""
        return {rec.role: rec.check() for rec in self.inputs}

    def input_path(self, role: str) -> Path | None:
        for rec in self.inputs:
            if rec.role == role and rec.path:
                return Path(rec.path)
        return None
