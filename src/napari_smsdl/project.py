"""A project folder: one reconstruction session, saved so that it reopens exactly.

What a project holds (:class:`Project`): the inputs (paths and SHA-256 of the files they came from,
and the low-resolution MSI stack itself), the registration (landmarks CSV, transform ``.tfm``,
report), the parameters (:class:`~napari_smsdl.pipeline.Settings` and the pixel sizes), the trained
ViT weights, the feature cache, and the results: the SR stack of every method as OME-TIFF, the
ground truth and the metrics when there is one, the loss curves.

Layout on disk::

    DIR/project.json              the manifest, written last: which snapshot is current, every
                                  file of it with its SHA-256 and size, the input records
    DIR/save-0003/                the current snapshot (read only through the manifest)
        parameters.json           settings, methods, pixel sizes, channels, m/z, timings
        inputs/msi_lr.ome.tif     the measured MSI (C, h, w) float32, NaN = not acquired
        inputs/he_guide.tif       the registered H&E on the SR grid (uint8 RGB, for display)
        registration/transform.tfm, landmarks.csv, report.json
        weights/vit_weights.pt    the self-supervised ViT weights ({level: state_dict})
        results/sr_<method>.ome.tif, ground_truth.ome.tif, masks.npz,
        results/metrics.json, metrics.csv, loss_history.json
    DIR/cache/                    feature cache (content-addressed, shared by snapshots)

Atomicity: a save writes a complete new snapshot into a hidden staging folder, flushes it to
disk, renames it into place, and only then replaces ``project.json`` (temp file + ``os.replace``).
A crash at any point leaves either the previous manifest with its intact snapshot or the new one
with its complete snapshot; leftovers of an interrupted save are removed by the next save.
:func:`load_project` checks every file against the manifest's hashes.

**Many channels.** Above ``channels.CHUNKED_ABOVE_CHANNELS`` channels :func:`reconstruct_project`
takes the chunked path of :func:`napari_smsdl.channels.reconstruct_many_channels`: the SR stacks are
streamed to zarr stores in a run folder and the project's ``sr`` values are those lazy (zarr)
arrays (:attr:`Project.lazy`). Such a project is saved page by page (its OME-TIFFs are never held
whole; ``parameters.json`` records ``"lazy": true``) and reopened lazily: its stacks are zarr views
of the OME-TIFFs (``tifffile`` ``aszarr``). Scores against a ground truth are then computed for a
few chosen channels (:meth:`Project.with_truth`), the others are NaN.

Nothing here imports Qt; the widgets and ``smsdl reconstruct --project`` share it.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._files import jsonable, sha256_file  # noqa: F401 - sha256_file is part of this module's API

from .errors import InputError
from .pipeline import Reconstruction, Settings

log = logging.getLogger(__name__)

PROJECT_FILE = "project.json"
FORMAT = "napari-smsdl project"
FORMAT_VERSION = 1
CACHE_DIR = "cache"
SNAPSHOT_RE = re.compile(r"^save-(\d{4,})$")
STAGING_PREFIX = ".staging-"

# file names inside a snapshot
PARAMETERS = "parameters.json"
MSI_LR = "inputs/msi_lr.ome.tif"
GUIDE = "inputs/he_guide.tif"
TRANSFORM = "registration/transform.tfm"
LANDMARKS = "registration/landmarks.csv"
REGISTRATION_REPORT = "registration/report.json"
WEIGHTS = "weights/vit_weights.pt"
TRUTH = "results/ground_truth.ome.tif"
MASKS = "results/masks.npz"
METRICS_JSON = "results/metrics.json"
METRICS_CSV = "results/metrics.csv"
LOSS_HISTORY = "results/loss_history.json"


def sr_file(method: str) -> str:
    """Snapshot-relative path of a method's SR stack."""
    return f"results/sr_{method}.ome.tif"


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


def uses_chunked_path(n_channels: int, chunk_channels: int | None = None) -> bool:
    """Whether :func:`reconstruct_project` streams the SR stacks to zarr (the many-channel path).

    ``chunk_channels``: None = automatic (more than ``channels.CHUNKED_ABOVE_CHANNELS`` channels),
    0 = never, N > 0 = always (N channels per chunk).
    """
    from .channels import CHUNKED_ABOVE_CHANNELS

    if chunk_channels is not None:
        return chunk_channels > 0
    return int(n_channels) > CHUNKED_ABOVE_CHANNELS


def check_methods_for_channels(methods: Sequence[str], n_channels: int, chunk_channels: int | None = None) -> None:
    """Raise :class:`InputError` for a method the many-channel path does not run (the CNN baseline)."""
    from .channels import CHUNKED_ABOVE_CHANNELS

    methods = [str(getattr(m, "value", m)) for m in methods]
    if "cnn" in methods and uses_chunked_path(n_channels, chunk_channels):
        raise InputError(
            f"the CNN baseline is not run for {int(n_channels)} channels: above {CHUNKED_ABOVE_CHANNELS} channels "
            "SMSDL and BI are trained chunk by chunk and streamed to disk, while the CNN trains one network on "
            f"every channel at once; untick CNN, or select at most {CHUNKED_ABOVE_CHANNELS} channels for it"
        )


class _Pages:
    """A lazy (C, rows, cols) stack read one channel at a time (for ``write_tiff_stack``)."""

    def __init__(self, stack):
        self._stack = stack
        self.shape = tuple(int(n) for n in stack.shape)
        self.chunks = (1, *self.shape[1:])

    def __getitem__(self, key):
        return np.asarray(self._stack[key], np.float32)


def _pageable(stack):
    """``stack`` itself when ``write_tiff_stack`` can stream it (numpy, integer chunks), else :class:`_Pages`."""
    chunks = getattr(stack, "chunks", None)
    if not is_lazy(stack) or (chunks and all(isinstance(c, (int, np.integer)) for c in chunks)):
        return stack
    return _Pages(stack)


def open_lazy_tiff(path: str | os.PathLike, n_channels: int):
    """A (C, rows, cols) OME-TIFF as a read-only zarr array, read page by page (``tifffile`` ``aszarr``)."""
    import tifffile
    import zarr

    try:
        arr = zarr.open(tifffile.imread(path, aszarr=True), mode="r")
    except Exception as exc:
        raise InputError(f"unreadable TIFF ({exc})", path) from exc
    if arr.ndim != 3 or int(arr.shape[0]) != int(n_channels):
        raise InputError(f"stack of shape {tuple(arr.shape)} does not hold {n_channels} channels", path)
    return arr




# ---------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class InputRecord:
    """Where an input came from: ``role`` (``"he"``, ``"msi"``, ``"msi_ibd"``, ``"ground_truth"``...),
    its absolute ``path`` and the SHA-256 and size of the file when it was recorded."""

    role: str
    path: str | None
    sha256: str | None = None
    size_bytes: int | None = None

    @classmethod
    def from_path(cls, role: str, path: str | os.PathLike | None) -> InputRecord:
        """Record a file (hash and size); a missing path or file gives a record without hash."""
        if path is None:
            return cls(role, None)
        p = Path(path).expanduser().resolve()
        if not p.is_file():
            return cls(role, str(p))
        return cls(role, str(p), sha256_file(p), p.stat().st_size)

    def check(self) -> str:
        """``"unchanged"``, ``"changed"``, ``"missing"`` or ``"unknown"`` (nothing was recorded)."""
        if self.path is None or self.sha256 is None:
            return "unknown"
        p = Path(self.path)
        if not p.is_file():
            return "missing"
        if self.size_bytes is not None and p.stat().st_size != self.size_bytes:
            return "changed"
        return "unchanged" if sha256_file(p) == self.sha256 else "changed"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> InputRecord:
        return cls(str(d["role"]), d.get("path"), d.get("sha256"), d.get("size_bytes"))


def input_records(
    *,
    he_path: str | os.PathLike | None = None,
    msi_path: str | os.PathLike | None = None,
    ground_truth_path: str | os.PathLike | None = None,
) -> tuple[InputRecord, ...]:
    """Records of the input files given (an imzML also records the ``.ibd`` beside it)."""
    records = []
    if he_path is not None:
        records.append(InputRecord.from_path("he", he_path))
    if msi_path is not None:
        records.append(InputRecord.from_path("msi", msi_path))
        p = Path(msi_path)
        if p.suffix.lower() == ".imzml":
            ibd = next((p.with_suffix(s) for s in (".ibd", ".IBD", ".Ibd") if p.with_suffix(s).is_file()), None)
            records.append(InputRecord.from_path("msi_ibd", ibd if ibd is not None else p.with_suffix(".ibd")))
    if ground_truth_path is not None:
        records.append(InputRecord.from_path("ground_truth", ground_truth_path))
    return tuple(records)


# ---------------------------------------------------------------------------- settings (de)serialisation
def settings_from_dict(d: dict) -> Settings:
    """Rebuild :class:`~napari_smsdl.pipeline.Settings` from :meth:`Settings.to_dict` (unknown keys ignored)."""
    from .features import FeatureParams
    from .regression import RegressionParams

    def pick(cls, values: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        return {k: v for k, v in (values or {}).items() if k in names}

    top = pick(Settings, d)
    top["features"] = FeatureParams(**pick(FeatureParams, d.get("features", {})))
    top["regression"] = RegressionParams(**pick(RegressionParams, d.get("regression", {})))
    return Settings(**top)


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
        Method name (``"smsdl"``, ``"bicubic"``, ``"cnn"``) → (C, h·F, w·F) float32 in the MSI's units.
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
        Method → :func:`napari_smsdl.metrics.score_stack` output (+ ``"seconds"``).
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
    def lazy(self) -> bool:
        """True when the SR stacks are read on demand (zarr) instead of held in memory (many channels)."""
        return any(is_lazy(v) for v in self.sr.values())

    @classmethod
    def from_reconstruction(
        cls,
        recon: Reconstruction,
        *,
        lr_msi: np.ndarray,
        channel_names: Sequence[str],
        msi_pixel_size_um: float,
        he_pixel_size_um: float,
        mz: Sequence[float] | None = None,
        mask_lr: np.ndarray | None = None,
        transform=None,
        landmarks=None,
        registration_report: dict | None = None,
        inputs: Sequence[InputRecord] = (),
        weights_path: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
    ) -> Project:
        """A project from the output of :func:`napari_smsdl.pipeline.reconstruct` and its inputs."""
        return cls._from_run(
            recon.settings, {str(k): np.asarray(v, np.float32) for k, v in recon.sr.items()}, recon.seconds,
            lr_msi=lr_msi, channel_names=channel_names, msi_pixel_size_um=msi_pixel_size_um,
            he_pixel_size_um=he_pixel_size_um, mz=mz, mask_lr=mask_lr, transform=transform, landmarks=landmarks,
            registration_report=registration_report, inputs=inputs, weights_path=weights_path, cache_dir=cache_dir,
            loss_history={str(k): [float(x) for x in v] for k, v in recon.loss_history.items()},
            guide_rgb=recon.guide_rgb,
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
        from .metrics import score_stack

        if self.lazy:
            return self._with_lazy_truth(truth, mask_hr, channels)
        t = np.asarray(truth, np.float32)
        if t.ndim == 2:
            t = t[None]
        self._check_truth_shape(t.shape)
        if mask_hr is None:
            mask_hr = np.isfinite(t).all(0) & (np.nan_to_num(t) != 0).any(0)
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
        from .metrics import score_stack

        self._check_truth_shape(truth.shape)
        n = len(self.channel_names)
        chans = sorted({int(c) for c in (range(min(n, LAZY_SCORED_CHANNELS)) if channels is None else channels)})
        if not chans or not all(0 <= c < n for c in chans):
            raise InputError(f"channels to score must be among 0..{n - 1}, got {chans}")
        t = read_channels(truth, chans)
        if mask_hr is None:  # over every channel, as in memory, so a score does not depend on its company
            from .channels import mask_from_stack

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

    @classmethod
    def from_many_channels(
        cls,
        run,
        *,
        lr_msi: np.ndarray,
        channel_names: Sequence[str],
        msi_pixel_size_um: float,
        he_pixel_size_um: float,
        methods: Sequence[str] = ("smsdl", "bicubic"),
        mz: Sequence[float] | None = None,
        mask_lr: np.ndarray | None = None,
        transform=None,
        landmarks=None,
        registration_report: dict | None = None,
        inputs: Sequence[InputRecord] = (),
        weights_path: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
    ) -> Project:
        """A lazy project from :func:`napari_smsdl.channels.reconstruct_many_channels`' output.

        ``sr`` holds the zarr arrays of ``run.sr`` (read on demand), in the order of ``methods``;
        there is no loss history and no registered guide image (it would be F·k times the MSI).
        """
        order = [m for m in methods if m in run.sr] + [m for m in run.sr if m not in methods]
        return cls._from_run(
            run.settings, {str(m): run.sr[m].open() for m in order}, run.seconds,
            lr_msi=lr_msi, channel_names=channel_names, msi_pixel_size_um=msi_pixel_size_um,
            he_pixel_size_um=he_pixel_size_um, mz=mz, mask_lr=mask_lr, transform=transform, landmarks=landmarks,
            registration_report=registration_report, inputs=inputs, weights_path=weights_path, cache_dir=cache_dir,
        )

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
        )

    def input_status(self) -> dict[str, str]:
        """Role → :meth:`InputRecord.check` for every recorded input."""
        return {rec.role: rec.check() for rec in self.inputs}

    def input_path(self, role: str) -> Path | None:
        for rec in self.inputs:
            if rec.role == role and rec.path:
                return Path(rec.path)
        return None


# ---------------------------------------------------------------------------- exporting
#: Channels drawn in the figure exported for a lazy (many-channel) project.
LAZY_FIGURE_CHANNELS = 6


def export_project(project: Project, outdir: str | os.PathLike, *, formats: Sequence[str]) -> dict[str, Path]:
    """:func:`napari_smsdl.export.export_results`, also for a lazy (many-channel) project.

    In memory this is ``export_results`` itself. With lazy SR stacks the OME-TIFFs are written page
    by page, the metrics CSV lists every channel (NaN where not scored), the figure shows the first
    ``LAZY_FIGURE_CHANNELS`` channels, and imzML (every SR pixel's spectrum, across all channels at
    once) is refused with an :class:`InputError`.
    """
    from .export import export_results

    if not project.lazy:
        return export_results(project, outdir, formats=formats)
    formats = tuple(formats)
    if "imzml" in formats:
        raise InputError(f"imzML export is not available for {len(project.channel_names)} channels streamed to disk "
                         "(it needs every channel of every SR pixel at once); export OME-TIFF instead")
    written: dict[str, Path] = {}
    paged = dataclasses.replace(project, sr={m: _pageable(v) for m, v in project.sr.items()},
                                truth=None if project.truth is None else _pageable(project.truth))
    rest = tuple(f for f in formats if f != "png")
    if rest:
        written.update(export_results(paged, outdir, formats=rest))
    if "png" in formats:
        first = range(min(LAZY_FIGURE_CHANNELS, len(project.channel_names)))
        written.update(export_results(project.subset(first), outdir, formats=("png",)))
    return written


# ---------------------------------------------------------------------------- saving


def _read_manifest(directory: Path) -> dict | None:
    path = directory / PROJECT_FILE
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the project manifest ({exc})", path) from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputError(f"not a napari-smsdl project manifest (format {manifest.get('format')!r})", path)
    return manifest


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not possible on every platform (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_snapshot(stage: Path, project: Project) -> None:
    """Write every file of a snapshot into ``stage`` (a fresh folder)."""
    import tifffile

    from .export import write_metrics_csv, write_tiff_stack

    for sub in ("inputs", "registration", "weights", "results"):
        (stage / sub).mkdir(parents=True, exist_ok=True)
    names = list(project.channel_names)
    write_tiff_stack(stage / MSI_LR, project.lr_msi, channel_names=names, pixel_size_um=project.msi_pixel_size_um)
    for method, stack in project.sr.items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", method):
            raise InputError(f"method name {method!r} cannot be a file name")
        write_tiff_stack(stage / sr_file(method), _pageable(stack), channel_names=names,
                         pixel_size_um=project.sr_pixel_size_um)
    if project.guide_rgb is not None:
        guide = np.asarray(project.guide_rgb)
        if guide.dtype != np.uint8:
            guide = np.clip(np.round(np.nan_to_num(guide.astype(np.float32)) * 255.0), 0, 255).astype(np.uint8)
        tifffile.imwrite(stage / GUIDE, guide, photometric="rgb", compression="zlib")
    if project.truth is not None:
        write_tiff_stack(stage / TRUTH, _pageable(project.truth), channel_names=names,
                         pixel_size_um=project.sr_pixel_size_um)
    masks = {k: np.asarray(v, bool) for k, v in (("mask_hr", project.mask_hr), ("mask_lr", project.mask_lr)) if v is not None}
    if masks:
        np.savez_compressed(stage / MASKS, **masks)
    if project.metrics is not None:
        (stage / METRICS_JSON).write_text(json.dumps(jsonable(project.metrics), indent=2), encoding="utf-8")
        write_metrics_csv(stage / METRICS_CSV, project.metrics, channel_names=names)
    (stage / LOSS_HISTORY).write_text(json.dumps(jsonable(project.loss_history)), encoding="utf-8")
    if project.transform is not None:
        import SimpleITK as sitk

        sitk.WriteTransform(project.transform, str(stage / TRANSFORM))
    if project.landmarks is not None and len(project.landmarks):
        from .registration import write_landmarks_csv

        write_landmarks_csv(project.landmarks, stage / LANDMARKS)
    if project.registration_report is not None:
        (stage / REGISTRATION_REPORT).write_text(json.dumps(jsonable(project.registration_report), indent=2))
    if project.weights_path is not None:
        if not Path(project.weights_path).is_file():
            raise InputError("trained weights file not found", project.weights_path)
        shutil.copyfile(project.weights_path, stage / WEIGHTS)
    parameters = {
        "settings": project.settings.to_dict(),
        "methods": list(project.sr),
        "factor": project.factor,
        "channel_names": names,
        "mz": None if project.mz is None else list(project.mz),
        "msi_pixel_size_um": project.msi_pixel_size_um,
        "he_pixel_size_um": project.he_pixel_size_um,
        "sr_pixel_size_um": project.sr_pixel_size_um,
        "lr_shape": list(project.lr_msi.shape),
        "seconds": project.seconds,
        "lazy": project.lazy,
    }
    (stage / PARAMETERS).write_text(json.dumps(jsonable(parameters), indent=2), encoding="utf-8")
    for sub in ("inputs", "registration", "weights", "results"):
        if not any((stage / sub).iterdir()):
            (stage / sub).rmdir()


def _copy_cache(source: Path | None, target: Path) -> list[str]:
    """Copy feature-cache files into the project's cache (each atomically); their names."""
    if source is None or not Path(source).is_dir():
        return []
    source = Path(source)
    names = []
    for path in sorted(source.glob("features-*.npz")):
        if ".tmp" in path.name:
            continue
        names.append(path.name)
        dest = target / path.name
        if source.resolve() == target.resolve() or (dest.exists() and dest.stat().st_size == path.stat().st_size):
            continue
        target.mkdir(parents=True, exist_ok=True)
        tmp = target / f".{path.name}.tmp{os.getpid()}"
        shutil.copyfile(path, tmp)
        os.replace(tmp, dest)
    return names


def save_project(directory: str | os.PathLike, project: Project) -> Project:
    """Save ``project`` into the folder ``directory`` (created if needed), atomically.

    A previous save in the same folder is replaced as a whole only once the new one is complete
    (see the module notes); files in the folder that are not part of a project are left alone.

    Returns
    -------
    Project
        The same project with ``path``, ``saved_at``, and ``weights_path``/``cache_dir`` pointing
        into the folder.
    """
    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    previous = _read_manifest(directory)
    number = 1
    if previous is not None:
        match = SNAPSHOT_RE.match(str(previous.get("snapshot", "")))
        number = int(match.group(1)) + 1 if match else 1
    existing = [int(m.group(1)) for p in directory.iterdir() if (m := SNAPSHOT_RE.match(p.name))]
    number = max([number, *(n + 1 for n in existing)])
    snapshot = f"save-{number:04d}"
    stage = directory / f"{STAGING_PREFIX}{snapshot}-{os.getpid()}"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir()
    try:
        _write_snapshot(stage, project)
        _fsync_tree(stage)
        os.rename(stage, directory / snapshot)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _fsync_dir(directory)
    cache_names = _copy_cache(project.cache_dir, directory / CACHE_DIR)
    files = {}
    for path in sorted((directory / snapshot).rglob("*")):
        if path.is_file():
            rel = path.relative_to(directory / snapshot).as_posix()
            files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    saved_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "saved_at": saved_at,
        "snapshot": snapshot,
        "files": files,
        "cache": {"folder": CACHE_DIR, "files": cache_names},
        "inputs": [rec.to_dict() for rec in project.inputs],
        "summary": {
            "factor": project.factor,
            "methods": list(project.sr),
            "channels": list(project.channel_names),
            "lr_shape": list(project.lr_msi.shape),
            "sr_pixel_size_um": project.sr_pixel_size_um,
            "has_ground_truth": project.truth is not None,
            "registered": project.transform is not None,
        },
    }
    tmp = directory / f".{PROJECT_FILE}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(jsonable(manifest), indent=2))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, directory / PROJECT_FILE)
    _fsync_dir(directory)
    _remove_leftovers(directory, keep=snapshot)
    log.info("project saved to %s (%s, %d files)", directory, snapshot, len(files))
    lazy = {}
    if project.lazy:  # read on from the saved copy: the stores it came from may be an older snapshot, now removed
        n = len(project.channel_names)
        lazy["sr"] = {m: open_lazy_tiff(directory / snapshot / sr_file(m), n) for m in project.sr}
        if project.truth is not None and TRUTH in files:
            lazy["truth"] = open_lazy_tiff(directory / snapshot / TRUTH, n)
    return dataclasses.replace(
        project,
        **lazy,
        path=directory,
        saved_at=saved_at,
        weights_path=directory / snapshot / WEIGHTS if WEIGHTS in files else None,
        cache_dir=directory / CACHE_DIR,
    )


def _remove_leftovers(directory: Path, *, keep: str) -> None:
    """Remove older snapshots and staging folders of interrupted saves (never anything else)."""
    for path in directory.iterdir():
        if not path.is_dir() or path.name == keep:
            continue
        if path.name.startswith(STAGING_PREFIX) or (SNAPSHOT_RE.match(path.name) and (path / PARAMETERS).exists()):
            shutil.rmtree(path, ignore_errors=True)
        elif SNAPSHOT_RE.match(path.name) and not any(path.iterdir()):
            path.rmdir()


# ---------------------------------------------------------------------------- loading
def is_project(directory: str | os.PathLike) -> bool:
    """True when ``directory`` holds a project manifest."""
    return (Path(directory) / PROJECT_FILE).is_file()


def load_project(directory: str | os.PathLike, *, verify: bool = True) -> Project:
    """Reopen a project saved by :func:`save_project`.

    Parameters
    ----------
    directory : path-like
        The project folder (or its ``project.json``).
    verify : bool
        Check every file of the snapshot against the SHA-256 in the manifest (default).

    Raises
    ------
    InputError
        Naming the file: no manifest (not a project, or a save that never completed), a file of
        the snapshot missing or changed since it was saved, an unreadable file.
    """
    import tifffile

    directory = Path(directory).expanduser()
    if directory.name == PROJECT_FILE:
        directory = directory.parent
    if not directory.is_dir():
        raise InputError("project folder not found", directory)
    manifest = _read_manifest(directory)
    if manifest is None:
        staged = any(p.name.startswith(STAGING_PREFIX) for p in directory.iterdir())
        hint = " (an interrupted save left a staging folder; nothing was completed)" if staged else ""
        raise InputError(f"not a napari-smsdl project: no {PROJECT_FILE}{hint}", directory)
    if int(manifest.get("version", 0)) > FORMAT_VERSION:
        raise InputError(f"project format version {manifest.get('version')} is newer than this napari-smsdl reads "
                         f"({FORMAT_VERSION})", directory / PROJECT_FILE)
    snap = directory / str(manifest["snapshot"])
    files: dict = manifest.get("files", {})
    for rel, info in files.items():
        path = snap / rel
        if not path.is_file():
            raise InputError(f"project file missing (listed in {PROJECT_FILE})", path)
        if path.stat().st_size != info.get("bytes"):
            raise InputError("project file changed since it was saved (size differs)", path)
        if verify and sha256_file(path) != info.get("sha256"):
            raise InputError("project file changed since it was saved (SHA-256 differs)", path)

    def read_json(rel: str, default=None):
        if rel not in files:
            return default
        try:
            return json.loads((snap / rel).read_text(encoding="utf-8"))
        except ValueError as exc:
            raise InputError(f"unreadable JSON ({exc})", snap / rel) from exc

    def read_tiff(rel: str) -> np.ndarray | None:
        if rel not in files:
            return None
        try:
            return tifffile.imread(snap / rel)
        except Exception as exc:
            raise InputError(f"unreadable TIFF ({exc})", snap / rel) from exc

    params = read_json(PARAMETERS)
    if params is None:
        raise InputError(f"project snapshot has no {PARAMETERS}", snap)
    names = tuple(params["channel_names"])
    lr = read_tiff(MSI_LR)
    if lr is None:
        raise InputError(f"project snapshot has no {MSI_LR}", snap)
    lr = np.asarray(lr, np.float32).reshape(len(names), *np.shape(lr)[-2:])
    sr = {}
    lazy = bool(params.get("lazy", False))  # many channels: the stacks stay on disk, read page by page
    for method in params["methods"]:
        if sr_file(method) not in files:
            raise InputError(f"project snapshot has no {sr_file(method)}", snap)
        if lazy:
            sr[method] = open_lazy_tiff(snap / sr_file(method), len(names))
            continue
        stack = read_tiff(sr_file(method))
        sr[method] = np.asarray(stack, np.float32).reshape(len(names), *np.shape(stack)[-2:])
    if lazy and TRUTH in files:
        truth = open_lazy_tiff(snap / TRUTH, len(names))
    else:
        truth = read_tiff(TRUTH)
        if truth is not None:
            truth = np.asarray(truth, np.float32).reshape(len(names), *np.shape(truth)[-2:])
    mask_hr = mask_lr = None
    if MASKS in files:
        with np.load(snap / MASKS, allow_pickle=False) as npz:
            mask_hr = npz.get("mask_hr")
            mask_lr = npz.get("mask_lr")
    transform = None
    if TRANSFORM in files:
        from .registration import load_transform

        transform = load_transform(snap / TRANSFORM)
    landmarks = None
    if LANDMARKS in files:
        from .registration import read_landmarks_csv

        landmarks = read_landmarks_csv(snap / LANDMARKS)
    cache = directory / manifest.get("cache", {}).get("folder", CACHE_DIR)
    return Project(
        lr_msi=lr,
        channel_names=names,
        msi_pixel_size_um=float(params["msi_pixel_size_um"]),
        he_pixel_size_um=float(params["he_pixel_size_um"]),
        settings=settings_from_dict(params["settings"]),
        sr=sr,
        mz=None if params.get("mz") is None else tuple(float(m) for m in params["mz"]),
        seconds={k: float(v) if v is not None else math.nan for k, v in params.get("seconds", {}).items()},
        loss_history=read_json(LOSS_HISTORY, {}),
        guide_rgb=read_tiff(GUIDE),
        truth=truth,
        mask_hr=mask_hr,
        mask_lr=mask_lr,
        metrics=_nan_metrics(read_json(METRICS_JSON)),
        transform=transform,
        landmarks=landmarks,
        registration_report=read_json(REGISTRATION_REPORT),
        inputs=tuple(InputRecord.from_dict(d) for d in manifest.get("inputs", [])),
        weights_path=snap / WEIGHTS if WEIGHTS in files else None,
        cache_dir=cache,
        path=directory,
        saved_at=manifest.get("saved_at"),
    )


def _nan_metrics(obj):
    """JSON null (a NaN metric when saved) back to NaN."""
    if obj is None:
        return None
    if isinstance(obj, dict):
        return {k: _nan_metrics(v) if v is not None else math.nan for k, v in obj.items()}
    if isinstance(obj, list):
        return [math.nan if v is None else _nan_metrics(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------- running
#: napari layers carry the :class:`Project` of their last reconstruction under this metadata key.
LAYER_METADATA_KEY = "smsdl_project"


def reconstruct_project(
    lr_msi: np.ndarray,
    he_rgb: np.ndarray,
    *,
    channel_names: Sequence[str],
    msi_pixel_size_um: float,
    he_pixel_size_um: float,
    settings: Settings,
    methods: Sequence[str] = ("smsdl", "bicubic", "cnn"),
    mz: Sequence[float] | None = None,
    transform=None,
    landmarks=None,
    registration_report: dict | None = None,
    inputs: Sequence[InputRecord] = (),
    mask_lr: np.ndarray | None = None,
    cache_dir: str | os.PathLike | None = None,
    weights_path: str | os.PathLike | None = None,
    progress=None,
    should_stop=None,
    on_loss=None,
    run_dir: str | os.PathLike | None = None,
    chunk_channels: int | None = None,
) -> Project:
    """Run :func:`napari_smsdl.pipeline.reconstruct` and wrap its output and inputs as a :class:`Project`.

    Many channels (:func:`uses_chunked_path`: more than ``channels.CHUNKED_ABOVE_CHANNELS``, or
    ``chunk_channels`` > 0) go through :func:`napari_smsdl.channels.reconstruct_many_channels`
    instead: SMSDL and BI chunk by chunk (``chunk_channels`` per chunk, default
    ``channels.DEFAULT_CHUNK_CHANNELS``) into zarr stores in ``run_dir`` (a new temporary folder
    when None), and the project's ``sr`` values are those lazy arrays; the CNN baseline is refused
    there (:func:`check_methods_for_channels`) and ``on_loss`` is not called.

    ``lr_msi`` is (C, h, w) with NaN where not acquired; ``transform`` maps MSI physical µm to H&E
    physical µm (None: the H&E covers the MSI field of view). The trained ViT weights are written to
    ``weights_path`` when SMSDL runs with self-supervised training. ``progress``, ``should_stop`` and
    ``on_loss`` are passed through (the job raises :class:`~napari_smsdl.errors.Cancelled` when
    ``should_stop()`` returns True).
    """
    from .pipeline import reconstruct

    methods = [str(getattr(m, "value", m)) for m in methods]
    if not methods:
        raise InputError("no method chosen: pick SMSDL and/or a baseline")
    train_vit = "smsdl" in methods and not settings.features.checkpoint and settings.features.ssl_steps > 0
    save_weights = weights_path if (weights_path is not None and train_vit) else None
    if save_weights is not None:
        Path(save_weights).parent.mkdir(parents=True, exist_ok=True)
    n_channels = int(np.shape(lr_msi)[0]) if np.ndim(lr_msi) == 3 else 1
    if uses_chunked_path(n_channels, chunk_channels):
        from .channels import DEFAULT_CHUNK_CHANNELS, reconstruct_many_channels

        check_methods_for_channels(methods, n_channels, chunk_channels)
        if run_dir is None:
            import tempfile

            run_dir = tempfile.mkdtemp(prefix="napari-smsdl-run-")
        run = reconstruct_many_channels(
            lr_msi, he_rgb, he_pixel_size_um=he_pixel_size_um, msi_pixel_size_um=msi_pixel_size_um, out=run_dir,
            settings=settings, methods=methods, transform=transform, mask_lr=mask_lr, channel_names=channel_names,
            chunk_channels=chunk_channels or DEFAULT_CHUNK_CHANNELS, cache_dir=cache_dir, save_weights=save_weights,
            progress=progress, should_stop=should_stop,
        )
        weights = save_weights if save_weights is not None and Path(save_weights).is_file() else None
        return Project.from_many_channels(
            run, lr_msi=lr_msi, channel_names=channel_names, msi_pixel_size_um=msi_pixel_size_um,
            he_pixel_size_um=he_pixel_size_um, methods=methods, mz=mz, mask_lr=mask_lr, transform=transform,
            landmarks=landmarks, registration_report=registration_report, inputs=inputs, weights_path=weights,
            cache_dir=cache_dir,
        )
    recon = reconstruct(
        lr_msi, he_rgb, he_pixel_size_um=he_pixel_size_um, msi_pixel_size_um=msi_pixel_size_um, settings=settings,
        methods=methods, transform=transform, mask_lr=mask_lr, cache_dir=cache_dir, save_weights=save_weights,
        progress=progress, should_stop=should_stop, on_loss=on_loss,
    )
    weights = save_weights if save_weights is not None and Path(save_weights).is_file() else None
    return Project.from_reconstruction(
        recon, lr_msi=lr_msi, channel_names=channel_names, msi_pixel_size_um=msi_pixel_size_um,
        he_pixel_size_um=he_pixel_size_um, mz=mz, mask_lr=mask_lr, transform=transform, landmarks=landmarks,
        registration_report=registration_report, inputs=inputs, weights_path=weights, cache_dir=cache_dir,
    )
