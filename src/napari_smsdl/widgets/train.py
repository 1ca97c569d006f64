"""The **Train** dock widget: super-resolve the MSI with SMSDL-Net and the baselines, on a worker.

An adapter only: inputs come from the H&E and MSI layers (and the registration the Register widget
accepted, stored on the MSI layer), the work is :func:`napari_smsdl.project.reconstruct_project`
(which calls :func:`napari_smsdl.reconstruction.reconstruct`), and the result, a
:class:`~napari_smsdl.project.Project`, is stored on the MSI layer's
``metadata["smsdl_project"]`` for the Compare and Export widgets. When a run ends the status line
names the channels that fell back to the H&E-free control (their held-out histology gain was not
clearly positive; "force H&E" turns the fallback off), and SMSDL's uncertainty is added as the
(hidden) image layer ``"uncertainty (SMSDL)"``, on the SMSDL layers' grid.

The job runs on a napari ``thread_worker``; the core's ``progress`` and ``on_loss`` callbacks are
relayed to the main thread by Qt signals and drive one progress bar per stage in napari's activity
dock and a live loss curve. Cancel sets a flag that the core polls (``should_stop``): it raises
:class:`~napari_smsdl.errors.Cancelled` within a few seconds and the widget is usable again.
Set ``SMSDL_NOTHREADS=1`` to run synchronously (debugging).

**Many channels.** With more channels selected than ``reconstruction.CHUNKED_ABOVE_CHANNELS`` the core
takes the chunked path (see :func:`~napari_smsdl.project.reconstruct_project`): every method
(SMSDL, BI, the control, the CNN: one network per chunk) runs chunk by chunk and its SR stack is
streamed to a zarr store in the run folder (:attr:`TrainWidget.run_dir`); the project's stacks stay
on disk (Compare shows them as lazy layers). There is no live loss curve.

Every action is a method with explicit arguments, so scripts and tests bypass the dialogs::

    w = TrainWidget(viewer)
    w.set_layers(he="sample H&E", msi="sample MSI (40 µm)")
    w.set_settings(Settings.preset("fast", factor=4))
    w.start()          # returns the worker; wait until not w.busy
    w.project          # the result (also on the MSI layer's metadata)
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    Label,
    PushButton,
    Select,
    SpinBox,
)
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import QVBoxLayout, QWidget

from ..errors import InputError
from ..evaluation import channel_label, he_level_for_guide, placement_transform, transform_to_level
from ..project import (
    LAYER_METADATA_KEY,
    UNCERTAINTY_LAYER,
    UNCERTAINTY_ROLE,
    Project,
    input_records,
    reconstruct_project,
    uncertainty_layer,
    uses_chunked_path,
)
from ..evaluation._comparison import fallback_summary
from ..reconstruction import Settings
from ._jobs import JobRunner
from ._layers import HeMsiLayers, _last2, set_selection
from ._plots import PlotCanvas

if TYPE_CHECKING:
    import napari

logger = logging.getLogger(__name__)

#: Where the Register widget leaves an accepted registration (see widgets/register.py).
REGISTRATION_KEY = "smsdl_registration"
COMPARE_PREFIX = "compare: "

TOOLTIPS = {
    "he_layer": "The H&E (RGB image layer) that guides the super-resolution.",
    "msi_layer": "The measured MSI (an image stack: channels × rows × cols), in µm.",
    "channels": "Channels (m/z) to super-resolve (Ctrl/Shift-click to select several).",
    "use_registration": "Use the registration accepted in the Register widget; otherwise the layers' "
    "placement in the viewer (what you see overlaid) maps the MSI onto the H&E.",
    "factor": "Super-resolution factor F: each MSI pixel becomes F × F pixels.",
    "preset": "fast: small networks, few steps (demos, a quick look); default: the full settings.",
    "seed": "Seed of every random part; the same seed gives the same result on the same machine.",
    "feature_source": "H&E features: ViTs trained self-supervised on this H&E, or a local checkpoint.",
    "checkpoint": "Local ViT weights ({level: state_dict} or one state dict) used instead of training.",
    "ssl_steps": "Self-supervised (masked image modelling) steps per ViT branch.",
    "embed_dim": "ViT width (token features per branch); must be a multiple of the heads (2 or 4).",
    "depth": "ViT depth (transformer blocks per branch).",
    "reg_steps": "Most regression steps per fold network; each stops early at its best held-out error.",
    "folds": "Held-out folds of the MSI pixels: one network per fold, their mean is the result, their spread "
             "the uncertainty; the folds also measure, per ion, how much the H&E helps.",
    "force_histology": "Use the H&E on every ion, even where the held-out pixels say it does not help "
                       "(default: those ions fall back to the H&E-free control).",
    "hidden": "Hidden units of the regression network.",
    "smsdl": "SMSDL-Net: H&E features + regression (the method of this plugin).",
    "bicubic": "Bicubic upsampling (BI), the baseline every method must beat.",
    "backprojection": "Bicubic + back-projection to the measured block means: the H&E-free control SMSDL must beat.",
    "cnn": "A DeepFERE-style CNN trained on this image pair (a learned baseline; slower).",
    "cnn_iterations": "CNN training iterations (0: the preset's).",
    "start": "Run feature extraction, SMSDL training and the baselines in the background.",
    "cancel": "Stop the running job within a few seconds.",
}


class FeatureSource(str, enum.Enum):
    """Where the H&E features' ViT weights come from."""

    SELF_SUPERVISED = "self-supervised on this H&E"
    CHECKPOINT = "local checkpoint"


class Preset(str, enum.Enum):
    FAST = "fast"
    DEFAULT = "default"


def default_cache_dir() -> Path:
    """The per-user feature cache (``$XDG_CACHE_HOME/napari-smsdl/features``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "napari-smsdl" / "features"


def preload_torch() -> None:
    """Import torch, timm and the training modules before the worker starts.

    Importing timm pulls in torchvision → torch._dynamo → triton. Triton's bundled LLVM clashes with
    the LLVM that Mesa's software OpenGL (llvmpipe: xvfb, VMs, remote desktops) has already loaded
    for napari's canvas, and the process dies with a segmentation fault inside ``import triton``.
    Nothing here needs triton (no ``torch.compile``), so unless triton is already imported or
    ``SMSDL_ALLOW_TRITON=1`` is set, it is marked as unavailable (``sys.modules["triton"] = None``,
    which torch reads as "not installed") before timm is imported. The imports also happen in the
    main thread, not in the worker.
    """
    block_triton()
    import timm.models.vision_transformer  # noqa: F401
    import torch  # noqa: F401

    from .. import features, reconstruction  # noqa: F401
    from ..reconstruction.baselines import deepfere  # noqa: F401


def block_triton() -> None:
    """Mark triton as unavailable (see :func:`preload_torch`); cheap, so Start does it in the main thread."""
    import sys

    if "triton" not in sys.modules and os.environ.get("SMSDL_ALLOW_TRITON", "") != "1":
        logger.info("napari-smsdl: triton disabled in this napari session (not needed; it crashes next to Mesa's OpenGL)")
        sys.modules["triton"] = None  # type: ignore[assignment]


def prepare_and_reconstruct(gathered: dict, **run: Any):
    """The Train job, run on the worker: imports, reading the layers' arrays, then the reconstruction.

    ``gathered`` holds what :meth:`TrainWidget._gather` read from the widgets and layers in the
    main thread (references, no copies); here the arrays are read, the H&E level chosen, the
    transform built (:func:`prepare_inputs`) and :func:`reconstruct_project` called.
    """
    progress = run.get("progress")
    if progress is not None:
        progress("preparing (imports, reading the layers)", 0, 1)
    preload_torch()
    inputs = prepare_inputs(gathered, run["settings"])
    if progress is not None:
        progress("preparing (imports, reading the layers)", 1, 1)
    project = reconstruct_project(**inputs, **run)
    # the MSI layer's top-left corner (an imzML off the instrument's origin): a reopened project goes there too
    corner = np.asarray(gathered["msi_translate"], float)[-2:] - np.asarray(gathered["msi_scale"], float)[-2:] / 2
    return dataclasses.replace(project, msi_origin_rc_um=(float(corner[0]), float(corner[1])))


def prepare_inputs(g: dict, settings: Settings) -> dict:
    """Plain arguments for :func:`reconstruct_project` from the gathered layer references (no Qt)."""
    data = np.asarray(g["msi_data"], dtype=np.float32)
    if data.ndim == 2:
        data = data[None]
    chosen = g["chosen"]
    if not (chosen == list(range(len(data))) and uses_chunked_path(len(data))):
        data = data[chosen]  # many channels, all selected: no copy of the stack (the project only reads it)
    registration = g["registration"]
    msi_px, he_px0 = g["msi_px"], g["he_px0"]
    levels = g["he_levels"]
    level = he_level_for_guide([lv.shape[0] for lv in levels], he_px0, msi_px / settings.factor, settings.max_cell_px)
    scale = levels[level].shape[0] / levels[0].shape[0]
    he_rgb = np.asarray(levels[level])
    if registration:
        transform = registration["transform"]
    else:
        transform = placement_transform(
            msi_scale_rc=g["msi_scale"], msi_translate_rc=g["msi_translate"], msi_pixel_size_um=msi_px,
            he_scale_rc=g["he_scale"], he_translate_rc=g["he_translate"], he_pixel_size_um=he_px0,
        )
    transform = transform_to_level(transform, level0_pixel_size_um=he_px0, scale=scale)
    report = registration.get("report") if registration else None
    landmarks = None
    if registration is not None:
        from ..registration import LandmarkPairs

        rows = (report or {}).get("residuals") or []
        if rows:
            landmarks = LandmarkPairs(np.array([[r["he_row"], r["he_col"]] for r in rows]),
                                      np.array([[r["msi_row"], r["msi_col"]] for r in rows]))
    return {
        "lr_msi": data,
        "he_rgb": he_rgb,
        "channel_names": g["channel_names"],
        "mz": g["mz"],
        "msi_pixel_size_um": msi_px,
        "he_pixel_size_um": he_px0 / scale,
        "transform": transform,
        "landmarks": landmarks,
        "registration_report": report,
        "inputs": g["inputs"],
    }


class _Relay(QObject):
    """Carries the core's callbacks from the worker thread to the widget (queued signals)."""

    progressed = Signal(str, int, int)
    loss = Signal(int, float)


class LossPlot(PlotCanvas):
    """A small matplotlib plot of the training loss, fed point by point while training runs."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.steps: list[int] = []
        self.losses: list[float] = []
        self._line = None
        self.clear("no training yet")

    def clear(self, message: str = "") -> None:
        self.steps, self.losses, self._line = [], [], None
        self._show_text(message)

    def _setup_axes(self) -> None:
        ax = self.axes
        ax.clear()
        ax.set_axis_on()
        ax.set_yscale("log")
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("loss", fontsize=8)
        ax.tick_params(labelsize=7)

    def add_point(self, step: int, loss: float) -> None:
        """Append one (step, loss) of the SMSDL regression and redraw."""
        if self._line is None:
            self._setup_axes()
            (self._line,) = self.axes.plot([], [], color="tab:red", lw=1.2, label="SMSDL (live)")
        self.steps.append(int(step))
        self.losses.append(max(float(loss), 1e-12))
        self._line.set_data(self.steps, self.losses)
        self.axes.relim()
        self.axes.autoscale_view()
        self.canvas.draw_idle()

    def show_histories(self, histories: dict) -> None:
        """The full loss curves of the finished methods (SMSDL regression, CNN)."""
        curves = {m: h for m, h in histories.items() if len(h)}
        if not curves:
            return
        self._setup_axes()
        colours = {"smsdl": "tab:red", "cnn": "tab:blue"}
        for method, values in curves.items():
            values = np.maximum(np.asarray(values, float), 1e-12)
            self.axes.plot(np.arange(len(values)), values, lw=1.0, color=colours.get(method),
                           label={"smsdl": "SMSDL", "cnn": "CNN"}.get(method, method))
        self.axes.legend(fontsize=7, frameon=False)
        self._line = None
        self.canvas.draw_idle()


class TrainWidget(JobRunner, HeMsiLayers, QWidget):
    """Dock widget: choose layers, channels and settings, Start, watch progress and loss, Cancel.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer

    Attributes
    ----------
    project : Project or None
        The last finished reconstruction (also on the MSI layer's ``metadata["smsdl_project"]``).
    busy : bool
        True while a job runs.
    last_error : str or None
        Message of the last failure (``"cancelled"`` after Cancel).
    cancel_seconds : float or None
        Seconds from the last Cancel to the job's end.
    cache_dir : Path
        Feature cache (default: the per-user cache, :func:`default_cache_dir`).
    progress_bars : dict
        Stage → the napari ``progress`` bar of the running stage (in the activity dock).
    run_dir : Path or None
        Folder of the last run (ViT weights; the zarr SR stores of a many-channel run).
    uncertainty_layer : napari.layers.Image or None
        The layer ``"uncertainty (SMSDL)"`` the last run added (SMSDL's predictive std, placed like
        the SMSDL layers; hidden when added).
    """

    _widget_name = "Train"
    _cancelled_status = "Cancelled; nothing was changed. Start again when ready."
    _cancelled_notice = "Training cancelled"

    #: Emitted in the main thread with the :class:`Project` when a job succeeds.
    trained = Signal(object)
    #: Emitted in the main thread with (stage, done, total) as the job reports progress.
    progressed = Signal(str, int, int)

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.project: Project | None = None
        self.busy = False
        self.last_error: str | None = None
        self.cancel_seconds: float | None = None
        self.cache_dir: Path = default_cache_dir()
        self._worker = None
        self._stop = threading.Event()
        self._cancel_at: float | None = None
        self._started_at = 0.0
        self.progress_bars: dict = {}
        self.run_dir: Path | None = None
        self.uncertainty_layer = None
        self._relay = _Relay()
        self._relay.progressed.connect(self._on_progress)
        self._relay.loss.connect(self._on_loss)
        tip = TOOLTIPS

        self.he_layer = ComboBox(label="H&E layer", choices=self._rgb_layers, tooltip=tip["he_layer"])
        self.msi_layer = ComboBox(label="MSI layer", choices=self._msi_layers, tooltip=tip["msi_layer"])
        self.channels = Select(choices=[], label="channels", tooltip=tip["channels"])
        self.channels.native.setMinimumHeight(80)
        self.use_registration = CheckBox(value=True, text="use accepted registration", tooltip=tip["use_registration"])
        self.factor = SpinBox(value=4, min=2, max=16, label="factor F", tooltip=tip["factor"])
        self.preset = ComboBox(choices=[(p.value, p) for p in Preset], value=Preset.FAST, label="preset",
                               tooltip=tip["preset"])
        self.seed = SpinBox(value=0, min=0, max=2**31 - 1, label="seed", tooltip=tip["seed"])
        self.feature_source = ComboBox(choices=[(f.value, f) for f in FeatureSource], value=FeatureSource.SELF_SUPERVISED,
                                       label="features", tooltip=tip["feature_source"])
        self.checkpoint = FileEdit(mode="r", filter="Weights (*.pt *.pth *.safetensors);;All files (*)",
                                   label="checkpoint", tooltip=tip["checkpoint"])
        self.ssl_steps = SpinBox(value=0, min=0, max=100_000, label="SSL steps", tooltip=tip["ssl_steps"])
        self.embed_dim = SpinBox(value=48, min=8, max=1024, step=4, label="ViT width", tooltip=tip["embed_dim"])
        self.depth = SpinBox(value=2, min=1, max=24, label="ViT depth", tooltip=tip["depth"])
        self.reg_steps = SpinBox(value=200, min=1, max=100_000, label="regression steps", tooltip=tip["reg_steps"])
        self.folds = SpinBox(value=5, min=2, max=20, label="held-out folds", tooltip=tip["folds"])
        self.force_histology = CheckBox(value=False, text="use the H&E on every ion", tooltip=tip["force_histology"])
        self.hidden = SpinBox(value=96, min=4, max=4096, label="hidden units", tooltip=tip["hidden"])
        self.use_smsdl = CheckBox(value=True, text="SMSDL", tooltip=tip["smsdl"])
        self.use_bicubic = CheckBox(value=True, text="BI (bicubic)", tooltip=tip["bicubic"])
        self.use_backprojection = CheckBox(value=True, text="H&E-free control", tooltip=tip["backprojection"])
        self.use_cnn = CheckBox(value=True, text="CNN", tooltip=tip["cnn"])
        self.cnn_iterations = SpinBox(value=0, min=0, max=100_000, label="CNN iterations", tooltip=tip["cnn_iterations"])
        self.start_button = PushButton(text="Start", tooltip=tip["start"])
        self.cancel_button = PushButton(text="Cancel", tooltip=tip["cancel"])
        self.plot = LossPlot()
        self.status = Label(value="Choose the H&E and MSI layers, then Start.")
        self.status.native.setWordWrap(True)
        self.status.native.setContentsMargins(9, 0, 9, 6)

        inputs = Container(widgets=[self.he_layer, self.msi_layer, self.channels, self.use_registration])
        general = Container(widgets=[self.factor, self.preset, self.seed])
        features = Container(widgets=[self.feature_source, self.checkpoint, self.ssl_steps, self.embed_dim, self.depth])
        regression = Container(widgets=[self.reg_steps, self.folds, self.hidden, self.force_histology])
        methods_row = Container(widgets=[self.use_smsdl, self.use_bicubic, self.use_backprojection, self.use_cnn],
                                layout="horizontal", labels=False)
        baselines = Container(widgets=[methods_row, self.cnn_iterations])
        run_row = Container(widgets=[self.start_button, self.cancel_button], layout="horizontal", labels=False)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        for part in (inputs, general, features, regression, baselines, run_row):
            layout.addWidget(part.native)
        layout.addWidget(self.plot)
        layout.addWidget(self.status.native)
        layout.addStretch(1)

        self.msi_layer.changed.connect(self._on_msi_layer)
        self._watched: set[int] = set()
        self.he_layer.changed.connect(lambda *_: self._sync_enabled())
        self.preset.changed.connect(self._on_preset)
        self.feature_source.changed.connect(lambda *_: self._sync_enabled())
        for box in (self.use_smsdl, self.use_cnn, self.use_bicubic, self.use_backprojection):
            box.changed.connect(lambda *_: self._sync_enabled())
        self.start_button.changed.connect(lambda: self.start())
        self.cancel_button.changed.connect(lambda: self.cancel())
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self._reset_choices)
        self._base = Settings.preset("fast")
        self.set_settings(self._base)
        self._reset_choices()
        self._on_msi_layer(self.msi_layer.value)

    # ------------------------------------------------------------------ layer choice
    def _image_layers(self) -> list:
        from napari.layers import Image

        return [lay for lay in self.viewer.layers if isinstance(lay, Image) and not lay.name.startswith(COMPARE_PREFIX)
                and not lay.name.startswith("registration: ")]

    def _rgb_layers(self, *_: Any) -> list:
        return [(lay.name, lay) for lay in self._image_layers() if lay.rgb]

    def _msi_layers(self, *_: Any) -> list:
        layers = [lay for lay in self._image_layers() if not lay.rgb and lay.metadata.get("role") != UNCERTAINTY_ROLE]
        # the measured MSI first: a ground truth or reference stack is not what one trains on
        layers.sort(key=lambda lay: lay.metadata.get("kind") == "ground_truth" or lay.metadata.get("role") == "reference")
        return [(lay.name, lay) for lay in layers]

    def _watch(self, layer) -> None:
        """An accepted registration arrives as a metadata change: the checkbox follows at once."""
        if id(layer) not in self._watched and hasattr(layer.events, "metadata"):
            self._watched.add(id(layer))
            layer.events.metadata.connect(lambda *_: self._sync_enabled())

    def _reset_choices(self, *_: Any) -> None:
        for layer in self.viewer.layers:
            self._watch(layer)
        old = self.msi_layer.value
        self.he_layer.reset_choices()
        self.msi_layer.reset_choices()
        if self.msi_layer.value is not old:
            self._on_msi_layer(self.msi_layer.value)
        self._sync_enabled()

    def _on_msi_layer(self, layer) -> None:
        if layer is None:
            self.channels.choices = []
            self._sync_enabled()
            return
        data = layer.data[0] if layer.multiscale else layer.data
        n = data.shape[0] if np.ndim(data) == 3 else 1
        names = list(layer.metadata.get("channel_names") or [f"channel {k}" for k in range(n)])[:n]
        mz = layer.metadata.get("mz")
        self.channels.choices = [(channel_label(k, names, mz), k) for k in range(n)]
        set_selection(self.channels, range(n))  # thousands of channels: one pass
        factor = layer.metadata.get("factor")
        if isinstance(factor, int) and 2 <= factor <= 16:
            self.factor.value = factor
        self._sync_enabled()

    # ------------------------------------------------------------------ settings
    def set_settings(self, settings: Settings) -> None:
        """Fill the fields from ``settings`` (fields without a control are kept as given)."""
        self._base = settings
        self.factor.value = int(settings.factor)
        self.seed.value = int(settings.seed)
        f, r = settings.features, settings.regression
        self.feature_source.value = FeatureSource.CHECKPOINT if f.checkpoint else FeatureSource.SELF_SUPERVISED
        if f.checkpoint:
            self.checkpoint.value = Path(f.checkpoint)
        self.ssl_steps.value = int(f.ssl_steps)
        self.embed_dim.value = int(f.embed_dim)
        self.depth.value = int(f.depth)
        self.reg_steps.value = int(r.steps)
        self.folds.value = int(r.folds)
        self.force_histology.value = not r.fallback
        self.hidden.value = int(r.hidden)
        self.cnn_iterations.value = int(settings.cnn_iterations or 0)
        self._sync_enabled()

    def _on_preset(self, preset: Preset) -> None:
        self.set_settings(Settings.preset(Preset(preset).value, factor=int(self.factor.value), seed=int(self.seed.value),
                                          device=self._base.device))

    def settings(self) -> Settings:
        """The :class:`~napari_smsdl.reconstruction.Settings` the fields describe."""
        base = self._base
        seed = int(self.seed.value)
        checkpoint = None
        if self.feature_source.value is FeatureSource.CHECKPOINT:
            text = str(self.checkpoint.value or "").strip()
            if text in ("", "."):
                raise InputError("choose a checkpoint file, or use self-supervised features")
            if not Path(text).is_file():
                raise InputError("checkpoint file not found", text)
            checkpoint = text
        embed_dim = int(self.embed_dim.value)
        heads = base.features.num_heads
        if embed_dim % heads:
            heads = next(h for h in (4, 2, 1) if embed_dim % h == 0)
        features = dataclasses.replace(base.features, ssl_steps=int(self.ssl_steps.value), embed_dim=embed_dim,
                                       num_heads=heads, depth=int(self.depth.value), checkpoint=checkpoint, seed=seed)
        regression = dataclasses.replace(base.regression, steps=int(self.reg_steps.value),
                                         folds=int(self.folds.value), fallback=not self.force_histology.value,
                                         hidden=int(self.hidden.value), seed=seed)
        return dataclasses.replace(base, factor=int(self.factor.value), seed=seed, features=features,
                                   regression=regression, cnn_iterations=int(self.cnn_iterations.value) or None)

    def methods(self) -> list[str]:
        chosen = [("smsdl", self.use_smsdl), ("bicubic", self.use_bicubic), ("backprojection", self.use_backprojection),
                  ("cnn", self.use_cnn)]
        return [name for name, box in chosen if box.value]

    # ------------------------------------------------------------------ inputs
    def _gather(self) -> dict:
        """What the job needs from the widgets and layers, read in the main thread (no array copies).

        Cheap checks only; reading the arrays happens on the worker (:func:`prepare_inputs`).
        """
        he, msi = self.he_layer.value, self.msi_layer.value
        if he is None or msi is None:
            raise InputError("choose the H&E and MSI layers first")
        if not he.rgb:
            raise InputError(f"layer {he.name!r} is not an RGB image; choose the H&E")
        data = msi.data[0] if msi.multiscale else msi.data
        if np.ndim(data) not in (2, 3):
            raise InputError(f"layer {msi.name!r} has shape {tuple(np.shape(data))}; expected (channels, rows, cols)")
        n_msi = np.shape(data)[0] if np.ndim(data) == 3 else 1
        chosen = sorted(int(c) for c in self.channels.value)
        if not chosen:
            raise InputError("no channel selected: select the m/z channels to super-resolve")
        names_all = list(msi.metadata.get("channel_names") or [f"channel {k}" for k in range(n_msi)])
        mz_all = msi.metadata.get("mz")
        msi_px = float(_last2(msi.scale)[1])
        registration = msi.metadata.get(REGISTRATION_KEY) if self.use_registration.value else None
        if registration and registration.get("he_layer") not in (None, he.name):
            raise InputError(f"the accepted registration maps the MSI onto H&E layer {registration['he_layer']!r}, "
                             f"not {he.name!r}: choose that layer, or untick 'use accepted registration'")
        he_px0 = float(registration["he_pixel_size_um"]) if registration else float(_last2(he.scale)[1])
        if registration:
            msi_px = float(registration.get("msi_pixel_size_um") or msi_px)
        return {
            "msi_data": data, "n_msi": n_msi, "chosen": chosen,
            "channel_names": [names_all[k] for k in chosen],
            "mz": None if not mz_all else [mz_all[k] for k in chosen],
            "msi_px": msi_px, "he_px0": he_px0, "registration": registration,
            "he_levels": list(he.data) if he.multiscale else [he.data],
            "msi_scale": _last2(msi.scale), "msi_translate": _last2(msi.translate),
            "he_scale": _last2(he.scale), "he_translate": _last2(he.translate),
            "inputs": input_records(he_path=he.metadata.get("source_path"), msi_path=msi.metadata.get("source_path")),
        }

    def _inputs(self, settings: Settings) -> dict:
        """Plain arguments for :func:`reconstruct_project` (gathered and prepared at once; scripts, tests)."""
        return prepare_inputs(self._gather(), settings)

    # ------------------------------------------------------------------ run
    def start(self, settings: Settings | None = None, *, methods: Sequence[str] | None = None,
              cache_dir: str | os.PathLike | None = None):
        """Start a reconstruction (worker returned; None when synchronous or refused).

        ``settings`` (filled into the fields) and ``methods`` override the widget's choices;
        ``cache_dir`` sets :attr:`cache_dir`. :attr:`busy` is False again once the job is done.
        """
        if self.busy:
            self._on_error(InputError("a training job is already running"))
            return None
        if settings is not None:
            self.set_settings(settings)
        if methods is not None:
            for name, box in (("smsdl", self.use_smsdl), ("bicubic", self.use_bicubic),
                              ("backprojection", self.use_backprojection), ("cnn", self.use_cnn)):
                box.value = name in methods
        if cache_dir is not None:
            self.cache_dir = Path(cache_dir)
        try:
            chosen = self.settings()
            gathered = self._gather()  # cheap: references and checks; the arrays are read on the worker
            methods = self.methods()
            if not methods:
                raise InputError("no method chosen: tick SMSDL and/or a baseline")
            n_channels = len(gathered["chosen"])
        except Exception as exc:  # noqa: BLE001 - shown to the user
            self._on_error(exc)
            return None
        block_triton()  # in the main thread, before anything imports timm (see preload_torch)
        run_dir = self.run_dir = Path(tempfile.mkdtemp(prefix="napari-smsdl-run-"))
        kwargs = dict(
            settings=chosen, methods=methods, cache_dir=self.cache_dir, weights_path=run_dir / "vit_weights.pt",
            progress=self._relay.progressed.emit, should_stop=self._stop.is_set, on_loss=self._relay.loss.emit,
            run_dir=run_dir,
        )
        self._stop.clear()
        self.last_error = None
        self._cancel_at = None
        self.cancel_seconds = None
        self._started_at = time.perf_counter()
        if uses_chunked_path(n_channels):
            self.plot.clear(f"{n_channels} channels: trained chunk by chunk, no live loss curve")
            self._set_busy(True, f"Training {', '.join(methods)} at F = {chosen.factor} on {n_channels} channels, "
                                 f"chunk by chunk; the SR stacks are streamed to {run_dir} …")
        else:
            self.plot.clear("waiting for the first SMSDL steps …")
            self._set_busy(True, f"Training {', '.join(methods)} at F = {chosen.factor} …")
        # imports, reading the layers, choosing the H&E level and the reconstruction: all on the worker
        return self._start_job(prepare_and_reconstruct, gathered, **kwargs, on_returned=self._on_done,
                               on_finished=self._on_finished)

    def cancel(self) -> None:
        """Ask the running job to stop (the core raises Cancelled at its next check)."""
        if self.busy:
            self._stop.set()
            self._cancel_at = time.perf_counter()
            self.status.value = "Cancelling …"

    def _on_progress(self, stage: str, done: int, total: int) -> None:
        from napari.utils import progress

        if not self.accepts_progress():  # queued behind the result: the summary stays
            return
        # the status first: the bar's refresh may process queued events, the result among them
        self._show_progress(f"{stage}: {done}/{total}")
        bar = self.progress_bars.get(stage)
        if bar is None:
            for old in self.progress_bars.values():  # stages run one after the other
                old.close()
            self.progress_bars = {}
            bar = self.progress_bars[stage] = progress(total=max(int(total), 1), desc=f"SMSDL: {stage}")
        bar.total = max(int(total), 1)
        bar.n = min(int(done), bar.total)
        bar.refresh()
        if not self.accepts_progress():  # the result (and the end) arrived while the bar was made or drawn
            self._close_bars()
            return
        self.progressed.emit(stage, int(done), int(total))

    def _on_loss(self, step: int, loss: float) -> None:
        self.plot.add_point(step, loss)

    def _close_bars(self) -> None:
        for bar in self.progress_bars.values():
            bar.close()
        self.progress_bars = {}

    def _on_finished(self) -> None:
        self._close_bars()
        if self._cancel_at is not None:
            self.cancel_seconds = time.perf_counter() - self._cancel_at
        self._worker = None
        self._set_busy(False)

    def _sync_enabled(self) -> None:
        ready = self.he_layer.value is not None and self.msi_layer.value is not None
        self.start_button.enabled = ready and not self.busy
        self.cancel_button.enabled = self.busy
        msi = self.msi_layer.value
        has_reg = msi is not None and REGISTRATION_KEY in msi.metadata
        self.use_registration.enabled = has_reg
        self.use_registration.text = "use accepted registration" if has_reg else "use accepted registration (none)"
        checkpoint = self.feature_source.value is FeatureSource.CHECKPOINT
        smsdl = bool(self.use_smsdl.value)
        self.checkpoint.enabled = smsdl and checkpoint
        for w in (self.ssl_steps, self.embed_dim, self.depth):
            w.enabled = smsdl and not checkpoint
        self.feature_source.enabled = smsdl
        for w in (self.reg_steps, self.folds, self.hidden, self.force_histology):
            w.enabled = smsdl
        self.cnn_iterations.enabled = bool(self.use_cnn.value)

    def _on_cancelled(self) -> None:
        self.plot.clear("cancelled")

    def _error_notice(self, message: str) -> str:
        return f"Training failed: {message}" if self.busy else message  # busy: it broke during the run

    def _on_done(self, project: Project) -> None:
        self.project = project
        seconds = time.perf_counter() - self._started_at
        msi = self.msi_layer.value
        if msi is not None:
            msi.metadata = {**msi.metadata, LAYER_METADATA_KEY: project}  # emits metadata: Compare follows
            self._add_uncertainty_layer(project, msi)
        self.plot.show_histories(project.loss_history)
        done = ", ".join(f"{m} {project.seconds.get(m, 0):.1f} s" for m in project.sr)
        where = (f" {len(project.channel_names)} channels: the SR stacks stay on disk in {self.run_dir} "
                 "(read one channel at a time)." if project.lazy else "")
        fallback = fallback_summary(project.guidance.get("smsdl"), project.channel_names, project.mz)
        fallback = f" {fallback}." if fallback else ""
        spread = (f" Its uncertainty is the hidden layer '{UNCERTAINTY_LAYER}'."
                  if self.uncertainty_layer is not None else "")
        self.status.value = (f"Done in {seconds:.0f} s ({done}); SR pixel {project.sr_pixel_size_um:g} µm.{where}"
                             f"{fallback}{spread} Open Compare to look at the results.")
        self.trained.emit(project)

    def _add_uncertainty_layer(self, project: Project, msi) -> None:
        """SMSDL's uncertainty as an image layer placed like the SMSDL layers (replacing an older one)."""
        from napari.layers import Layer

        self.uncertainty_layer = None
        data = uncertainty_layer(project, msi_scale_rc=_last2(msi.scale), msi_translate_rc=_last2(msi.translate))
        if data is None:
            return
        stack, kwargs, kind = data
        if kwargs["name"] in self.viewer.layers:
            self.viewer.layers.remove(kwargs["name"])
        self.uncertainty_layer = Layer.create(stack, kwargs, kind)
        self.viewer.layers.append(self.uncertainty_layer)
