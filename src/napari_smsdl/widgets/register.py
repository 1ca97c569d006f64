"""The **Register** dock widget: landmark-seeded nonlinear H&E → MSI registration you can inspect.

An adapter only: the registration is :func:`napari_smsdl.registration.iter_register` (run on a
``thread_worker``; its yields drive a napari progress bar, Cancel stops SimpleITK at the next
optimiser iteration); this module gathers inputs from layers and turns the result into layers:
the warped H&E over the MSI (opacity slider), a checkerboard, the deformation grid (Shapes), the
Jacobian-determinant map, the local misregistration map (per tissue patch, the residual shift in MSI
px; patches above 0.5 px are where the super-resolution output is not to be trusted), a table of
landmark pairs with their held-out residuals, the confidence in MSI px and each stage's decision.

Landmarks are two Points layers, **H&E landmarks** and **MSI landmarks**, paired by index and
numbered; they share the scale and translate of their image layer, so their data are pixel
(row, col) coordinates of that image. Set ``SMSDL_NOTHREADS=1`` to run synchronously (debugging).

Every action is a method with explicit arguments, so scripts and tests bypass the dialogs::

    w = RegisterWidget(viewer)
    w.set_layers(he="he (H&E)", msi="msi (MSI)")
    w.add_landmark_layers()
    w.load_landmarks("pairs.csv")
    w.run()            # returns the worker; wait until not w.busy
    w.accept()         # or w.revert()
    w.save("out/")     # transform.tfm, report.json, ...
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, FloatSlider, FloatSpinBox, Label, PushButton, SpinBox
from qtpy.QtCore import Qt
from qtpy.QtGui import QColor
from qtpy.QtWidgets import QFileDialog, QHBoxLayout, QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget

from ..errors import InputError
from ..registration import (
    FixedFeature,
    LandmarkPairs,
    MovingFeature,
    RegistrationParams,
    RegistrationResult,
    iter_register,
    read_landmarks_csv,
    save_registration,
    write_landmarks_csv,
)
from ..registration._levels import choose_he_level, landmarks_to_level, result_to_level0
from ._jobs import JobRunner, use_threads
from ._layers import HeMsiLayers, _last2

if TYPE_CHECKING:
    import napari


HE_POINTS = "H&E landmarks"
MSI_POINTS = "MSI landmarks"
PREFIX = "registration: "
OUTPUTS = ("warped H&E", "checkerboard", "Jacobian", "deformation grid", "misregistration")
METADATA_KEY = "smsdl_registration"
SIDE_GAP_FRACTION = 0.05

TOOLTIPS = {
    "he_layer": "The H&E (RGB image layer), the moving image.",
    "msi_layer": "The MSI (image layer, one channel or a stack), the fixed image.",
    "he_pixel_size": "H&E pixel size in µm (from the layer's scale; a value that disagrees with the layer is flagged).",
    "msi_pixel_size": "MSI pixel size in µm (from the layer's scale; a value that disagrees with the layer is flagged).",
    "he_feature": "H&E image registered: haematoxylin density, inverted grey, or auto (best mutual information).",
    "msi_feature": "For an MSI stack: TIC, first principal component, one ion (channel below), or auto.",
    "msi_channel": "Channel used when the MSI feature is 'ion'.",
    "side_by_side": "Show the H&E to the right of the MSI (clicking landmarks) or overlaid in µm.",
    "add_points": "Add the two landmark layers (click pairs in the same order on both images).",
    "load_csv": "Load landmark pairs from a CSV with header he_row,he_col,msi_row,msi_col.",
    "save_csv": "Save the landmark pairs as CSV (pixel coordinates of each image).",
    "refine_affine": "Stage 2: refine the affine on Mattes mutual information.",
    "bspline": "Stage 3: B-spline deformation on top of the affine.",
    "mesh_spacing": "Final B-spline control-point spacing in MSI pixels.",
    "guard": "Keep the earlier stage when a stage makes the held-out landmark error worse.",
    "run": "Register in the background (held-out errors refit each fold: a few seconds).",
    "cancel": "Stop the running registration.",
    "opacity": "Opacity of the warped H&E over the MSI.",
    "accept": "Keep this result: stored on the MSI layer's metadata for the next steps.",
    "revert": "Discard this result and remove its layers.",
    "save": "Write transform.tfm, report.json, params.json, landmarks.csv and images to a folder.",
}

TABLE_COLUMNS = ("#", "H&E row", "H&E col", "MSI row", "MSI col", "held-out (MSI px)", "fit (MSI px)", "outlier")


def layer_pixel_size_um(layer) -> float:
    """A layer's pixel size in µm: its scale (columns), the size it is drawn with in the viewer."""
    return float(_last2(layer.scale)[1])


def pixel_size_disagreements(what: str, typed_um: float, layer) -> list[str]:
    """Sentences naming where ``typed_um`` disagrees with ``layer``'s scale or its file's pixel size.

    The file's is ``metadata["pixel_size_um"]`` as the readers store it (a number, or (rows, cols)).
    """
    def differs(a: float, b: float) -> bool:
        return abs(a - b) > 1e-6 * max(abs(a), abs(b))

    notes = []
    scale = layer_pixel_size_um(layer)
    if differs(typed_um, scale):
        notes.append(f"{what} pixel {typed_um:g} µm typed, but layer {layer.name!r} is drawn at {scale:g} µm per "
                     f"pixel (its scale): the warp will be scaled by {typed_um / scale:.3g}.")
    stored = layer.metadata.get("pixel_size_um") if isinstance(layer.metadata, dict) else None
    if isinstance(stored, (list, tuple)) and stored:
        stored = stored[-1]
    if isinstance(stored, (int, float)) and stored > 0 and differs(float(stored), scale):
        notes.append(f"Layer {layer.name!r} is drawn at {scale:g} µm per pixel but its file says {float(stored):g} µm.")
    return notes


def stage_summary(report: dict) -> str:
    """One line per stage: name, kept / rejected / not run, and why (from ``report["stages"]``)."""
    lines = []
    for st in report.get("stages", []):
        state = "not run" if not st.get("ran") else ("kept" if st.get("kept") else "rejected")
        lines.append(f"{st['name']}: {state} ({st.get('reason', '')})")
    return "\n".join(lines)


class RegisterWidget(JobRunner, HeMsiLayers, QWidget):
    """Dock widget: pick H&E and MSI layers, click landmark pairs, register, inspect, accept or revert.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer

    Attributes
    ----------
    result : RegistrationResult or None
        The last registration (shown as layers), pending until :meth:`accept` or :meth:`revert`.
    accepted : RegistrationResult or None
        The accepted registration (also in the MSI layer's ``metadata["smsdl_registration"]``).
    busy : bool
        True while a registration runs.
    last_error : str or None
        Message of the last failure (``"cancelled"`` after Cancel).
    """

    _widget_name = "Register"
    _cancelled_status = "Cancelled."
    _cancelled_notice = "Registration cancelled"

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.result: RegistrationResult | None = None
        self.accepted: RegistrationResult | None = None
        self.busy = False
        self.last_error: str | None = None
        self._worker = None
        self._stop = threading.Event()
        self._pbar = None
        self._home_translate: dict[str, np.ndarray] = {}
        defaults = RegistrationParams()
        tip = TOOLTIPS

        self.he_layer = ComboBox(label="H&E layer", choices=self._image_layers, tooltip=tip["he_layer"])
        self.msi_layer = ComboBox(label="MSI layer", choices=self._image_layers, tooltip=tip["msi_layer"])
        self.he_pixel_size = FloatSpinBox(
            value=1.0, min=1e-4, max=1e5, step=0.1, label="H&E pixel (µm)", tooltip=tip["he_pixel_size"]
        )
        self.msi_pixel_size = FloatSpinBox(
            value=1.0, min=1e-4, max=1e5, step=0.1, label="MSI pixel (µm)", tooltip=tip["msi_pixel_size"]
        )
        for spin in (self.he_pixel_size, self.msi_pixel_size):
            spin.native.setDecimals(4)
        self.he_feature = ComboBox(
            label="H&E feature",
            choices=[(m.value, m) for m in MovingFeature],
            value=defaults.moving_feature,
            tooltip=tip["he_feature"],
        )
        self.msi_feature = ComboBox(
            label="MSI feature",
            choices=[(m.value, m) for m in FixedFeature],
            value=defaults.fixed_feature,
            tooltip=tip["msi_feature"],
        )
        self.msi_channel = SpinBox(value=0, min=0, max=10_000, label="MSI channel", tooltip=tip["msi_channel"])
        self.side_by_side = CheckBox(value=True, text="H&&E beside the MSI", tooltip=tip["side_by_side"])
        self.add_points_button = PushButton(text="Add landmark layers", tooltip=tip["add_points"])
        self.load_csv_button = PushButton(text="Load CSV…", tooltip=tip["load_csv"])
        self.save_csv_button = PushButton(text="Save CSV…", tooltip=tip["save_csv"])
        self.refine_affine = CheckBox(
            value=defaults.refine_affine, text="MI affine refinement", tooltip=tip["refine_affine"]
        )
        self.bspline = CheckBox(value=defaults.bspline, text="B-spline", tooltip=tip["bspline"])
        self.mesh_spacing = FloatSpinBox(
            value=defaults.mesh_spacing_msi_px,
            min=1.0,
            max=1000.0,
            step=1.0,
            label="mesh (MSI px)",
            tooltip=tip["mesh_spacing"],
        )
        self.guard = CheckBox(value=defaults.guard, text="guard (held-out error)", tooltip=tip["guard"])
        self.run_button = PushButton(text="Run", tooltip=tip["run"])
        self.cancel_button = PushButton(text="Cancel", tooltip=tip["cancel"])
        self.opacity = FloatSlider(value=0.6, min=0.0, max=1.0, step=0.05, label="H&E opacity", tooltip=tip["opacity"])
        self.accept_button = PushButton(text="Accept", tooltip=tip["accept"])
        self.revert_button = PushButton(text="Revert", tooltip=tip["revert"])
        self.save_button = PushButton(text="Save…", tooltip=tip["save"])
        self.pixel_warning = Label(value="")
        self.pixel_warning.native.setWordWrap(True)
        self.pixel_warning.native.setContentsMargins(9, 0, 9, 0)
        self.pixel_warning.native.setStyleSheet("color: #ff8c00;")
        self.pixel_warning.visible = False
        self.stages_label = Label(value="")
        self.stages_label.native.setWordWrap(True)
        self.stages_label.native.setContentsMargins(9, 0, 9, 0)
        self.status = Label(value="Pick the layers, add landmark layers, click pairs (same order), Run.")
        self.status.native.setWordWrap(True)
        self.status.native.setContentsMargins(9, 0, 9, 6)

        self.table = QTableWidget(0, len(TABLE_COLUMNS))
        self.table.setHorizontalHeaderLabels(TABLE_COLUMNS)
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        self.table.setMinimumHeight(120)

        inputs = Container(
            widgets=[
                self.he_layer,
                self.he_pixel_size,
                self.msi_layer,
                self.msi_pixel_size,
                self.he_feature,
                self.msi_feature,
                self.msi_channel,
            ]
        )
        landmark_row = Container(
            widgets=[self.add_points_button, self.load_csv_button, self.save_csv_button],
            layout="horizontal",
            labels=False,
        )
        stages = Container(
            widgets=[self.side_by_side, landmark_row, self.refine_affine, self.bspline, self.mesh_spacing, self.guard]
        )
        run_row = Container(widgets=[self.run_button, self.cancel_button], layout="horizontal", labels=False)
        outputs = Container(widgets=[self.opacity])
        decide_row = Container(
            widgets=[self.accept_button, self.revert_button, self.save_button], layout="horizontal", labels=False
        )

        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(inputs.native)
        layout.addWidget(self.pixel_warning.native)
        for part in (stages, run_row, outputs):
            layout.addWidget(part.native)
        layout.addWidget(self.table)
        layout.addWidget(self.stages_label.native)
        row = QHBoxLayout()
        row.addWidget(decide_row.native)
        layout.addLayout(row)
        layout.addWidget(self.status.native)
        layout.addStretch(1)

        self.he_layer.changed.connect(self._on_he_layer)
        self.msi_layer.changed.connect(self._on_msi_layer)
        self._sized_from: dict[str, Any] = {"he": None, "msi": None}  # the layer each pixel size was read from
        for spin in (self.he_pixel_size, self.msi_pixel_size):
            spin.changed.connect(lambda *_: self._check_pixel_sizes())
        self.side_by_side.changed.connect(lambda value: self.arrange(bool(value)))
        self.add_points_button.changed.connect(lambda: self.add_landmark_layers())
        self.load_csv_button.changed.connect(lambda: self.load_landmarks())
        self.save_csv_button.changed.connect(lambda: self.save_landmarks())
        self.run_button.changed.connect(lambda: self.run())
        self.cancel_button.changed.connect(lambda: self.cancel())
        self.opacity.changed.connect(self._on_opacity)
        self.accept_button.changed.connect(lambda: self.accept())
        self.revert_button.changed.connect(lambda: self.revert())
        self.save_button.changed.connect(lambda: self.save())
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self._reset_choices)
        self._reset_choices()
        self._sync_enabled()

    # ------------------------------------------------------------------ layer choice
    def _image_layers(self, *_: Any) -> list:
        from napari.layers import Image

        return [
            (layer.name, layer)
            for layer in self.viewer.layers
            if isinstance(layer, Image) and not layer.name.startswith(PREFIX)
        ]

    def _reset_choices(self, *_: Any) -> None:
        self.he_layer.reset_choices()
        self.msi_layer.reset_choices()
        rgb = [layer for _, layer in self._image_layers() if layer.rgb]
        other = [layer for _, layer in self._image_layers() if not layer.rgb]
        if rgb and (self.he_layer.value is None or not self.he_layer.value.rgb):
            self.he_layer.value = rgb[0]
        if other and (self.msi_layer.value is None or self.msi_layer.value.rgb):
            self.msi_layer.value = other[0]
        # a combo box filled with its first choice emits no change: read the pixel sizes here too
        if self.he_layer.value is not self._sized_from["he"]:
            self._on_he_layer(self.he_layer.value)
        if self.msi_layer.value is not self._sized_from["msi"]:
            self._on_msi_layer(self.msi_layer.value)
        self._sync_enabled()

    def _on_he_layer(self, layer) -> None:
        self._sized_from["he"] = layer
        if layer is not None:
            self.he_pixel_size.value = layer_pixel_size_um(layer)
        self._check_pixel_sizes()
        self._sync_enabled()

    def _on_msi_layer(self, layer) -> None:
        self._sized_from["msi"] = layer
        if layer is not None:
            self.msi_pixel_size.value = layer_pixel_size_um(layer)
        self._check_pixel_sizes()
        self._sync_enabled()

    def pixel_size_warnings(self) -> list[str]:
        """Where a pixel size in the fields disagrees with its layer's scale or its file's metadata."""
        notes = []
        for what, spin, layer in (("H&E", self.he_pixel_size, self.he_layer.value),
                                  ("MSI", self.msi_pixel_size, self.msi_layer.value)):
            if layer is None:
                continue
            notes += pixel_size_disagreements(what, float(spin.value), layer)
        return notes

    def _check_pixel_sizes(self) -> list[str]:
        if not hasattr(self, "pixel_warning"):
            return []
        notes = self.pixel_size_warnings()
        self.pixel_warning.value = "⚠ " + " ".join(notes) if notes else ""
        self.pixel_warning.visible = bool(notes)
        return notes

    # ------------------------------------------------------------------ landmarks
    def _points_layer(self, name: str):
        return self.viewer.layers[name] if name in self.viewer.layers else None

    def add_landmark_layers(self) -> tuple:
        """Add (or return) the H&E and MSI landmark Points layers, numbered, on their images."""
        he, msi = self.he_layer.value, self.msi_layer.value
        if he is None or msi is None:
            self._on_error(InputError("choose the H&E and MSI layers first"))
            return None, None
        out = []
        msi_world_px = float(_last2(msi.scale)[0])
        for name, image, colour in ((HE_POINTS, he, "cyan"), (MSI_POINTS, msi, "magenta")):
            layer = self._points_layer(name)
            if layer is None:
                layer = self.viewer.add_points(
                    np.zeros((0, 2)),
                    name=name,
                    ndim=2,
                    scale=_last2(image.scale),
                    translate=_last2(image.translate),
                    size=msi_world_px / float(_last2(image.scale)[0]),  # one MSI pixel across, in data units
                    face_color=colour,
                    border_color="black",
                    features={"label": np.zeros(0, int)},
                    text={"string": "{label}", "color": colour, "size": 12, "anchor": "upper_left"},
                )
                layer.events.data.connect(lambda event, lay=layer: self._renumber(lay))
            out.append(layer)
        self.arrange(bool(self.side_by_side.value))
        self.viewer.layers.selection.active = out[0]
        out[0].mode = "add"
        self._sync_enabled()
        return tuple(out)

    @staticmethod
    def _renumber(layer) -> None:
        n = len(layer.data)
        if len(layer.features) != n or (n and list(layer.features["label"]) != list(range(1, n + 1))):
            layer.features = {"label": np.arange(1, n + 1)}

    def landmarks(self) -> LandmarkPairs | None:
        """The pairs clicked so far (validated), or None when both layers are empty or absent."""
        he, msi = self._points_layer(HE_POINTS), self._points_layer(MSI_POINTS)
        he_rc = np.asarray(he.data, float).reshape(-1, 2) if he is not None else np.zeros((0, 2))
        msi_rc = np.asarray(msi.data, float).reshape(-1, 2) if msi is not None else np.zeros((0, 2))
        if not len(he_rc) and not len(msi_rc):
            return None
        return LandmarkPairs.from_points(he_rc, msi_rc)

    def load_landmarks(self, path: str | os.PathLike | None = None) -> LandmarkPairs | None:
        """Fill the two Points layers from a ``he_row,he_col,msi_row,msi_col`` CSV (dialog without a path)."""
        if path is None:
            path, _ = QFileDialog.getOpenFileName(self, "Landmark pairs", "", "CSV (*.csv);;All files (*)")
            if not path:
                return None
        try:
            pairs = read_landmarks_csv(path)
        except Exception as exc:  # noqa: BLE001 - shown to the user
            self._on_error(exc)
            return None
        he, msi = self.add_landmark_layers()
        if he is None:
            return None
        he.data, msi.data = pairs.he_rc, pairs.msi_rc
        self.status.value = f"Loaded {len(pairs)} landmark pairs from {Path(path).name}."
        return pairs

    def save_landmarks(self, path: str | os.PathLike | None = None) -> Path | None:
        """Write the clicked pairs to CSV (dialog without a path)."""
        try:
            pairs = self.landmarks()
            if pairs is None:
                raise InputError("no landmarks to save")
        except Exception as exc:  # noqa: BLE001
            self._on_error(exc)
            return None
        if path is None:
            path, _ = QFileDialog.getSaveFileName(self, "Save landmark pairs", "pairs.csv", "CSV (*.csv)")
            if not path:
                return None
        out = write_landmarks_csv(pairs, path)
        self.status.value = f"Saved {len(pairs)} landmark pairs to {out.name}."
        return out

    def arrange(self, side_by_side: bool) -> None:
        """Place the H&E (and its landmarks) to the right of the MSI, top edges aligned, or back home."""
        he, msi = self.he_layer.value, self.msi_layer.value
        if he is None or msi is None:
            return
        home = self._home_translate.setdefault(he.name, np.asarray(he.translate, float).copy())
        translate = home.copy()
        if side_by_side:
            ms, mt = _last2(msi.scale), _last2(msi.translate)
            hs = _last2(he.scale)
            cols = np.shape(msi.data[0] if msi.multiscale else msi.data)[-1]
            width = cols * ms[1]
            top = mt[0] - ms[0] / 2
            right = mt[1] + (cols - 0.5) * ms[1]
            translate[-2:] = (top + hs[0] / 2, right + SIDE_GAP_FRACTION * width + hs[1] / 2)
        he.translate = translate
        points = self._points_layer(HE_POINTS)
        if points is not None:
            points.translate = translate[-2:]

    # ------------------------------------------------------------------ run
    def _inputs(self) -> dict:
        """Plain arguments for :func:`iter_register` gathered from the widgets (no maths)."""
        he, msi = self.he_layer.value, self.msi_layer.value
        if he is None or msi is None:
            raise InputError("choose the H&E and MSI layers first")
        if he is msi:
            raise InputError("the H&E and MSI layers must differ")
        if not he.rgb:
            raise InputError(f"layer {he.name!r} is not an RGB image; choose the H&E")
        he_size0 = float(self.he_pixel_size.value)
        msi_size = float(self.msi_pixel_size.value)
        fixed = np.asarray(msi.data[0] if msi.multiscale else msi.data, dtype=np.float32)
        if fixed.ndim > 3:
            raise InputError(
                f"layer {msi.name!r} has {fixed.ndim} dimensions; expected (rows, cols) or (channels, rows, cols)"
            )
        levels = list(he.data) if he.multiscale else [he.data]
        level = choose_he_level([lv.shape[0] for lv in levels], he_size0, msi_size)
        moving = np.asarray(levels[level])
        scale = moving.shape[0] / levels[0].shape[0]
        landmarks0 = self.landmarks()
        params = RegistrationParams(
            moving_feature=self.he_feature.value,
            fixed_feature=self.msi_feature.value,
            fixed_channel=int(self.msi_channel.value),
            refine_affine=bool(self.refine_affine.value),
            bspline=bool(self.bspline.value),
            mesh_spacing_msi_px=float(self.mesh_spacing.value),
            guard=bool(self.guard.value),
        )
        return {
            "fixed_msi": fixed,
            "moving_he_rgb": moving,
            "fixed_pixel_size_um": msi_size,
            "moving_pixel_size_um": he_size0 / scale,
            "landmarks": landmarks_to_level(landmarks0, scale),
            "params": params,
            "_level0": {"level0_pixel_size_um": he_size0, "scale": scale, "landmarks_level0": landmarks0},
        }

    def run(self):
        """Register in a worker (returned; None when synchronous or refused). :attr:`busy` tells when done."""
        if self.busy:
            self._on_error(InputError("a registration is already running"))
            return None
        try:
            kwargs = self._inputs()
        except Exception as exc:  # noqa: BLE001 - shown to the user
            self._on_error(exc)
            return None
        level0 = kwargs.pop("_level0")
        notes = self._check_pixel_sizes()
        if notes:  # flagged before the run, in the widget and as a notification, never silently
            from napari.utils.notifications import show_warning

            show_warning("Register: " + " ".join(notes))
        self._stop.clear()
        self._set_busy(True, "Registering …" + (" (check the pixel sizes: see the warning above)" if notes else ""))

        def on_returned(result: RegistrationResult) -> None:
            self._show_result(result_to_level0(result, **level0))

        if not use_threads():
            steps = iter_register(**kwargs, should_stop=self._stop.is_set)
            self._begin_job()
            try:
                while True:
                    self._on_progress(next(steps))
            except StopIteration as finished:
                self._end_job()
                on_returned(finished.value)
            except Exception as exc:  # noqa: BLE001
                self._end_job()
                self._on_error(exc)
            finally:
                self._set_busy(False)
            return None
        from napari.utils import progress

        self._pbar = progress(total=0, desc="Registering")
        return self._start_worker(
            iter_register, **kwargs, should_stop=self._stop.is_set, on_yielded=self._on_progress,
            on_returned=on_returned, on_finished=lambda: self._set_busy(False),
        )

    def cancel(self) -> None:
        """Ask the running registration to stop (it raises Cancelled at the next optimiser iteration)."""
        if self.busy:
            self._stop.set()
            self.status.value = "Cancelling …"

    def _on_progress(self, item: tuple[str, int, int]) -> None:
        stage, done, total = item
        if not self.busy or not self.accepts_progress():  # queued behind the result/cancel: ignore it
            return
        # the status first: the progress bar's calls below may process queued events, among them the
        # result, whose summary must then stay the last word (not this progress line)
        self._show_progress(f"Registering: {stage} ({done}/{total})")
        pbar = self._pbar  # set_description may process events that close the bar (cancel, done)
        if pbar is not None and not self._stop.is_set():
            pbar.total = total
            pbar.n = done
            pbar.set_description(f"Registering: {stage}")
            if self._pbar is pbar:
                pbar.refresh()

    def _set_busy(self, busy: bool, message: str | None = None) -> None:
        if not busy and self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        super()._set_busy(busy, message)

    def _sync_enabled(self) -> None:
        ready = self.he_layer.value is not None and self.msi_layer.value is not None
        self.run_button.enabled = ready and not self.busy
        self.cancel_button.enabled = self.busy
        self.add_points_button.enabled = ready
        has_result = self.result is not None and not self.busy
        self.accept_button.enabled = has_result and self.result is not self.accepted
        self.revert_button.enabled = has_result
        self.save_button.enabled = has_result
        msi = self.msi_layer.value
        stack = msi is not None and np.ndim(msi.data[0] if msi.multiscale else msi.data) == 3
        self.msi_feature.enabled = stack
        self.msi_channel.enabled = stack

    # ------------------------------------------------------------------ outputs
    def _msi_frame(self) -> tuple[np.ndarray, np.ndarray, float]:
        """(scale, translate) of the MSI layer's last two axes and its pixel size in µm."""
        msi = self.msi_layer.value
        return _last2(msi.scale), _last2(msi.translate), float(self.msi_pixel_size.value)

    def _put_layer(self, data, kwargs: dict, layer_type: str):
        from napari.layers import Layer

        name = kwargs["name"]
        new = Layer.create(data, kwargs, layer_type)
        if name in self.viewer.layers:
            index = self.viewer.layers.index(name)
            self.viewer.layers.pop(index)
            self.viewer.layers.insert(index, new)
        else:
            self.viewer.layers.append(new)
        return new

    def _remove_outputs(self) -> None:
        for suffix in OUTPUTS:
            if PREFIX + suffix in self.viewer.layers:
                self.viewer.layers.remove(PREFIX + suffix)

    def _show_result(self, result: RegistrationResult) -> None:
        self.result = result
        scale, translate, p = self._msi_frame()
        grid = result.display_grid
        grid_scale = scale * grid.pixel_size_um / p
        grid_translate = translate + np.asarray(grid.origin_rc_um) / p * scale
        self._put_layer(
            result.checkerboard,
            {
                "name": PREFIX + "checkerboard",
                "scale": grid_scale,
                "translate": grid_translate,
                "colormap": "gray",
                "visible": False,
                "contrast_limits": (0.0, 1.0),
            },
            "image",
        )
        self._put_layer(
            result.jacobian,
            {
                "name": PREFIX + "Jacobian",
                "scale": scale,
                "translate": translate,
                "colormap": "PiYG",
                "contrast_limits": (0.0, 2.0),
                "visible": False,
                "metadata": {"meaning": "Jacobian determinant of the B-spline; <= 0 folded"},
            },
            "image",
        )
        self._put_layer(
            result.warped_he_rgb,
            {
                "name": PREFIX + "warped H&E",
                "scale": grid_scale,
                "translate": grid_translate,
                "rgb": True,
                "opacity": float(self.opacity.value),
            },
            "image",
        )
        self._put_layer(
            list(result.grid_lines_rc),
            {
                "name": PREFIX + "deformation grid",
                "shape_type": "path",
                "scale": scale,
                "translate": translate,
                "edge_color": "yellow",
                "edge_width": 0.08,
                "face_color": "transparent",
            },
            "shapes",
        )
        if result.misregistration is not None:
            self._put_layer(
                result.misregistration,
                {
                    "name": PREFIX + "misregistration",
                    "scale": scale,
                    "translate": translate,
                    "colormap": "magma",
                    "contrast_limits": (0.0, 1.0),
                    "opacity": 0.7,
                    "visible": False,
                    "metadata": {
                        "meaning": "per tissue patch, the residual shift (MSI px) that best aligns it; > 0.5 px flagged",
                        "unit": "MSI px",
                    },
                },
                "image",
            )
        self._fill_table(result)
        self.stages_label.value = stage_summary(result.report)
        rep = result.report
        loo = rep["loo_error_msi_px"]
        held = (
            f"held-out error median {loo['median']:.2f}, p90 {loo['p90']:.2f}, max {loo['max']:.2f} MSI px"
            if loo
            else "no held-out error (needs ≥ 4 landmarks)"
        )
        notes = "".join(f" {m[0].upper()}{m[1:]}." for m in rep["messages"])
        conf = rep.get("confidence_msi_px")
        mis = rep.get("misregistration_msi_px")
        trust = (
            f" Confidence {conf:.2f} MSI px; local misregistration median {mis['median']:.2f}, "
            f"p90 {mis['p90']:.2f} MSI px."
            if conf is not None and mis
            else ""
        )
        self.status.value = (
            f"{rep['final']}. {held}; {rep['folds_in_tissue']} folded pixel(s) in tissue; "
            f"{rep['seconds']:.1f} s.{trust}{notes} Accept or Revert."
        )
        self._sync_enabled()

    def _fill_table(self, result: RegistrationResult) -> None:
        rows = result.residuals
        self.table.setRowCount(len(rows))
        p = result.fixed_pixel_size_um
        for i, row in enumerate(rows):
            loo = row["loo_error_msi_px"]
            cells = (
                str(row["index"] + 1),
                f"{row['he_row']:.1f}",
                f"{row['he_col']:.1f}",
                f"{row['msi_row']:.2f}",
                f"{row['msi_col']:.2f}",
                "—" if loo is None else f"{loo:.2f}",
                f"{row['fit_error_um'] / p:.2f}",
                "yes" if row["outlier"] else "",
            )
            for j, text in enumerate(cells):
                item = QTableWidgetItem(text)
                item.setTextAlignment(int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter))
                if row["outlier"]:
                    item.setBackground(QColor(255, 200, 200))
                    item.setForeground(QColor(0, 0, 0))
                self.table.setItem(i, j, item)
        self.table.resizeColumnsToContents()

    def _on_opacity(self, value: float) -> None:
        name = PREFIX + "warped H&E"
        if name in self.viewer.layers:
            self.viewer.layers[name].opacity = float(value)

    # ------------------------------------------------------------------ decide
    def accept(self) -> RegistrationResult | None:
        """Keep the shown result: :attr:`accepted` and the MSI layer's ``metadata["smsdl_registration"]``."""
        if self.result is None:
            self._on_error(InputError("nothing to accept: run a registration first"))
            return None
        self.accepted = self.result
        msi = self.msi_layer.value
        if msi is not None:  # a new dict: the metadata event tells Train (its checkbox) at once
            msi.metadata = {**msi.metadata, METADATA_KEY: {
                "transform": self.result.transform,
                "report": self.result.report,
                "he_layer": self.he_layer.value.name if self.he_layer.value is not None else None,
                "he_pixel_size_um": self.result.moving_pixel_size_um,
                "msi_pixel_size_um": self.result.fixed_pixel_size_um,
            }}
        self.status.value = "Accepted: the transform is stored on the MSI layer for the next steps."
        self._sync_enabled()
        return self.accepted

    def revert(self) -> None:
        """Discard the shown result and remove its layers (an earlier accepted result stays)."""
        if self.result is not None and self.result is self.accepted:
            self.accepted = None
            msi = self.msi_layer.value
            if msi is not None and METADATA_KEY in msi.metadata:
                msi.metadata = {k: v for k, v in msi.metadata.items() if k != METADATA_KEY}
        self.result = None
        self._remove_outputs()
        self.table.setRowCount(0)
        self.stages_label.value = ""
        self.status.value = "Reverted."
        self._sync_enabled()

    def save(self, outdir: str | os.PathLike | None = None) -> dict | None:
        """Write the shown result (transform.tfm, report.json, params.json, landmarks.csv, images)."""
        if self.result is None:
            self._on_error(InputError("nothing to save: run a registration first"))
            return None
        if outdir is None:
            outdir = QFileDialog.getExistingDirectory(self, "Save registration to folder")
            if not outdir:
                return None
        try:
            written = save_registration(self.result, outdir, images=True)
        except Exception as exc:  # noqa: BLE001
            self._on_error(exc)
            return None
        self.status.value = f"Saved {len(written)} files to {outdir}."
        return written
