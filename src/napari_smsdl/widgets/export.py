"""The **Export & project** dock widget: write results, save the session as a project, reopen one.

An adapter only: exports are :func:`napari_smsdl.project.export_results` (OME-TIFF with physical
pixel size and m/z channel names — every method's SR stack and SMSDL's uncertainty,
``uncertainty_smsdl.ome.tif`` — continuous imzML at the SR pixel size, metrics CSV with the
per-channel histology gain beside it, figure PNG);
projects are :func:`napari_smsdl.project.save_project` / :func:`~napari_smsdl.project.load_project`.
The reconstruction is the :class:`~napari_smsdl.project.Project` on the MSI layer's
``metadata["smsdl_project"]`` (left there by Train, scored by Compare). Reopening a project adds
the H&E (when its file is still there and unchanged), the measured MSI, the ground truth and the
comparison layers again. Slow steps run in a ``thread_worker`` (``SMSDL_NOTHREADS=1``: synchronous).

**Many channels.** A lazy project (SR stacks on disk, :attr:`Project.lazy`) is exported through
:func:`napari_smsdl.project.export_project`: OME-TIFF page by page, the metrics CSV, a figure of the
first channels; imzML is refused (and its box disabled). Saving writes its OME-TIFFs page by page and
reopening keeps them on disk.

Every action is a method with explicit arguments::

    w = ExportWidget(viewer)
    w.export("results/", formats=("ome-tiff", "imzml", "csv", "png"))
    w.save_project("my-project/")
    w.open_project("my-project/")
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, Label, PushButton
from qtpy.QtWidgets import QFileDialog, QVBoxLayout, QWidget

from ..errors import InputError
from ..project import (
    EXPORT_FORMATS,
    LAYER_METADATA_KEY,
    Project,
    export_project,
    load_project,
    project_layers,
    save_project,
)
from ._jobs import JobRunner
from .compare import PREFIX, add_comparison_layers

if TYPE_CHECKING:
    import napari


TOOLTIPS = {
    "source": "The MSI layer whose reconstruction is exported or saved.",
    "folder": "Folder the exports are written to.",
    "ome": "SR stacks of every method (the H&E-free control included), SMSDL's uncertainty and the ground truth "
           "as float32 OME-TIFF: µm pixel size, m/z channel names.",
    "imzml": "SR stacks as continuous imzML at the SR pixel size (one spectrum per SR pixel); not for "
    "many-channel runs whose stacks stay on disk.",
    "csv": "Metrics per method and channel (needs a ground truth chosen in Compare), and the per-channel "
           "histology gain (guidance.csv).",
    "png": "The comparison figure: LR, ground truth, methods and error maps per channel.",
    "export": "Write the chosen files into the folder.",
    "project_folder": "The project folder (created when saving).",
    "save": "Save inputs (paths + hashes), registration, parameters, weights, feature cache and results.",
    "open": "Reopen a project: its layers come back exactly as saved.",
}


def _path_or_none(value: Any) -> Path | None:
    if value is None:
        return None
    text = str(value).strip()
    return None if text in ("", ".") else Path(text)




HINT_NONE = "Train (and Compare) first; then export or save the project."
HINT_READY = "Ready: export the results of {name!r} or save them as a project."


class ExportWidget(JobRunner, QWidget):
    """Dock widget: export results, save the session as a project folder, reopen one.

    Attributes
    ----------
    written : dict
        Files written by the last :meth:`export`.
    opened : Project or None
        The project reopened last.
    busy : bool
    last_error : str or None
    """

    _widget_name = "Export"

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.written: dict[str, Path] = {}
        self.opened: Project | None = None
        self.busy = False
        self.last_error: str | None = None
        self._worker = None
        tip = TOOLTIPS

        self.source = ComboBox(label="MSI layer", choices=self._project_layers, tooltip=tip["source"])
        self.folder = FileEdit(mode="d", label="export to", tooltip=tip["folder"])
        self.ome = CheckBox(value=True, text="OME-TIFF stacks", tooltip=tip["ome"])
        self.imzml = CheckBox(value=True, text="imzML (continuous, SR pixel size)", tooltip=tip["imzml"])
        self.csv = CheckBox(value=True, text="metrics CSV", tooltip=tip["csv"])
        self.png = CheckBox(value=True, text="figure PNG", tooltip=tip["png"])
        self.spatialdata = CheckBox(value=False, text="SpatialData (results.zarr)",
                                    tooltip="H&E, MSI, every SR stack and an SR pixels x m/z table in one µm "
                                    "coordinate system (needs napari-smsdl[spatialdata])")
        self.export_button = PushButton(text="Export", tooltip=tip["export"])
        self.project_folder = FileEdit(mode="d", label="project", tooltip=tip["project_folder"])
        self.save_button = PushButton(text="Save project", tooltip=tip["save"])
        self.open_button = PushButton(text="Open project", tooltip=tip["open"])
        self.status = Label(value=HINT_NONE)
        self.status.native.setWordWrap(True)
        self.status.native.setContentsMargins(9, 0, 9, 6)

        exports = Container(widgets=[self.source, self.folder, self.ome, self.imzml, self.csv, self.png,
                                     self.spatialdata, self.export_button])
        project_row = Container(widgets=[self.save_button, self.open_button], layout="horizontal", labels=False)
        projects = Container(widgets=[self.project_folder, project_row])
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(exports.native)
        layout.addWidget(projects.native)
        layout.addWidget(self.status.native)
        layout.addStretch(1)

        self.export_button.changed.connect(lambda: self.export())
        self.save_button.changed.connect(lambda: self.save_project())
        self.open_button.changed.connect(lambda: self.open_project())
        self.source.changed.connect(lambda *_: self._sync_enabled())
        self._watched: set[int] = set()
        self.viewer.layers.events.inserted.connect(self._on_inserted)
        self.viewer.layers.events.removed.connect(self._reset_choices)
        for layer in self.viewer.layers:
            self._watch(layer)
        self._reset_choices()

    # ------------------------------------------------------------------ choices
    def _project_layers(self, *_: Any) -> list:
        from napari.layers import Image

        return [(lay.name, lay) for lay in self.viewer.layers
                if isinstance(lay, Image) and isinstance(lay.metadata.get(LAYER_METADATA_KEY), Project)]

    def _watch(self, layer) -> None:
        if id(layer) not in self._watched and hasattr(layer.events, "metadata"):
            self._watched.add(id(layer))
            layer.events.metadata.connect(lambda *_: self._reset_choices())

    def _on_inserted(self, event) -> None:
        self._watch(event.value)
        self._reset_choices()

    def _reset_choices(self, *_: Any) -> None:
        self.source.reset_choices()
        self._sync_enabled()

    def project(self) -> Project | None:
        layer = self.source.value
        return layer.metadata.get(LAYER_METADATA_KEY) if layer is not None else None

    def _sync_enabled(self) -> None:
        project = self.project()
        has = project is not None and not self.busy
        self.export_button.enabled = has
        self.save_button.enabled = has
        self.open_button.enabled = not self.busy
        self.imzml.enabled = project is None or (project.mz is not None and not project.lazy)
        self.csv.enabled = project is None or bool(project.metrics)
        # the hint follows the state until a job writes its own line
        if self.status.value == HINT_NONE or self.status.value.startswith(HINT_READY.split("{")[0]):
            self.status.value = HINT_NONE if project is None else HINT_READY.format(name=self.source.value.name)

    # ------------------------------------------------------------------ actions
    def export(self, outdir: str | os.PathLike | None = None, *, formats: Sequence[str] | None = None):
        """Write the chosen formats (default: the ticked boxes that apply) into ``outdir``."""
        project = self.project()
        if project is None:
            self._on_error(InputError("nothing to export: train first"))
            return None
        if outdir is not None:
            self.folder.value = Path(outdir)
        folder = _path_or_none(self.folder.value)
        if folder is None:
            folder = _path_or_none(QFileDialog.getExistingDirectory(self, "Export results to folder"))
            if folder is None:
                return None
            self.folder.value = folder
        if formats is None:
            ticked = [("ome-tiff", self.ome), ("imzml", self.imzml), ("csv", self.csv), ("png", self.png),
                      ("spatialdata", self.spatialdata)]
            formats = [name for name, box in ticked if box.value and box.enabled]
        formats = [f for f in formats if f in EXPORT_FORMATS]
        return self._run(export_project, project, folder, formats=tuple(formats), on_returned=self._on_exported,
                         message=f"Exporting to {folder}")

    def save_project(self, directory: str | os.PathLike | None = None):
        """Save the reconstruction as a project folder (atomically)."""
        project = self.project()
        if project is None:
            self._on_error(InputError("nothing to save: train first"))
            return None
        folder = self._project_dir(directory, "Save project to folder")
        if folder is None:
            return None
        return self._run(save_project, folder, project, on_returned=self._on_saved, message=f"Saving project to {folder}")

    def open_project(self, directory: str | os.PathLike | None = None):
        """Reopen a project folder: its layers come back (comparison layers included)."""
        folder = self._project_dir(directory, "Open project folder")
        if folder is None:
            return None

        def load(path: Path):
            project = load_project(path)
            return project, *project_layers(project)

        return self._run(load, folder, on_returned=self._on_opened, message=f"Opening project {folder}")

    def _project_dir(self, directory, caption: str) -> Path | None:
        if directory is not None:
            self.project_folder.value = Path(directory)
        folder = _path_or_none(self.project_folder.value)
        if folder is None:
            folder = _path_or_none(QFileDialog.getExistingDirectory(self, caption))
            if folder is not None:
                self.project_folder.value = folder
        return folder

    def _on_exported(self, written: dict) -> None:
        self.written = dict(written)
        folder = _path_or_none(self.folder.value)
        self.status.value = f"Wrote {len(written)} files to {folder}: " + ", ".join(p.name for p in written.values())

    def _on_saved(self, saved: Project) -> None:
        layer = self.source.value
        if layer is not None:
            layer.metadata = {**layer.metadata, LAYER_METADATA_KEY: saved}
        self.status.value = f"Saved the project to {saved.path} ({saved.saved_at})."

    def _on_opened(self, result) -> None:
        from napari.layers import Layer

        project, layers, notes = result
        self.opened = project
        msi_layer = None
        for data, kwargs, layer_type in layers:
            layer = Layer.create(data, kwargs, layer_type)
            if kwargs["name"] in self.viewer.layers:
                self.viewer.layers.remove(kwargs["name"])
            self.viewer.layers.append(layer)
            if kwargs.get("metadata", {}).get("kind") == "measured":
                msi_layer = layer
        # the project arrives as a metadata change, like a finished training: Compare (if docked) shows it
        msi_layer.metadata = {**msi_layer.metadata, LAYER_METADATA_KEY: project}
        if not any(lay.name.startswith(PREFIX) for lay in self.viewer.layers):
            add_comparison_layers(self.viewer, project, msi_layer)
        self.source.value = msi_layer
        extra = (" " + "; ".join(notes) + ".") if notes else ""
        status = project.input_status()
        if status:
            inputs = ", ".join(f"{role} {state}" for role, state in status.items())
        else:
            inputs = "no input files recorded"
        self.status.value = (f"Opened {project.path.name}: {', '.join(project.sr)} at {project.sr_pixel_size_um:g} µm, "
                             f"saved {project.saved_at}; inputs: {inputs}.{extra}")
        if notes:
            from napari.utils.notifications import show_warning

            show_warning("; ".join(notes))

