"""The **Load** dock widget: open an H&E and an MSI, look at the mean spectrum, add layers in µm.

An adapter only: files are opened by :func:`napari_smsdl.io.open_histology`,
:func:`napari_smsdl.io.open_imzml` or :func:`napari_smsdl.io.read_ion_stack`, spectra and
ion images come from :class:`napari_smsdl.io.ImzMLDataset`, layers from
:mod:`napari_smsdl._reader`. Slow steps (opening, mean spectrum, ion images) run in a
``thread_worker`` so the viewer stays responsive; set ``SMSDL_NOTHREADS=1`` to run them
synchronously (debugging).

Every action is a method with explicit arguments, so scripts and tests bypass the dialogs::

    w = LoadWidget(viewer)
    w.load(he_path="he.png", msi_path="msi.imzML", he_pixel_size_um=2.5)
    ...  # wait until not w.busy
    w.add_layers(mz=[885.55], tol="10ppm", norm="tic")
"""

from __future__ import annotations

import dataclasses
import enum
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    LineEdit,
    PushButton,
    Select,
    SpinBox,
)
from qtpy.QtWidgets import QVBoxLayout, QWidget

from .._reader import DEFAULT_N_PEAKS, DEFAULT_TOLERANCE, LayerDataTuple, he_layer, ion_stack_layer
from ..errors import InputError
from ..io import (
    HistologyImage,
    ImzMLDataset,
    IonStack,
    Normalization,
    Spectrum,
    make_windows,
    open_histology,
    open_imzml,
    read_ion_stack,
)
from ._jobs import JobRunner
from ._layers import set_selection
from ._plots import PlotCanvas

if TYPE_CHECKING:
    import napari


_HE_FILTER = "Images (*.png *.jpg *.jpeg *.tif *.tiff *.svs *.ndpi *.scn *.btf);;All files (*)"
_MSI_FILTER = "MSI (*.imzML *.imzml *.tif *.tiff *.npy *.csv *.txt *.tsv);;All files (*)"

TOOLTIPS = {
    "he_path": "H&E image: PNG, JPEG, TIFF, OME-TIFF or pyramidal TIFF/SVS (read lazily).",
    "he_pixel_size_um": "H&E pixel size in µm; filled from the file's metadata when it has one.",
    "msi_path": "MSI: an .imzML (with its .ibd beside it) or an ion-image stack (.tif, .npy, .csv).",
    "msi_pixel_size_um": "MSI pixel size in µm; filled from the imzML metadata when it has one.",
    "open": "Open both files (in the background) and compute the mean spectrum.",
    "source": "Ion images of the picked peaks, or of the m/z values typed below.",
    "n_peaks": "Number of strongest peaks of the mean spectrum to offer.",
    "channels": "Channels to add as layers (Ctrl/Shift-click to select several).",
    "typed_mz": "m/z values separated by commas or spaces, e.g. '760.585, 885.55'.",
    "tolerance": "Half-width of each m/z window: '10ppm' or '0.01da'.",
    "norm": "Per-pixel normalisation of the ion images.",
    "add": "Add the H&E and the chosen ion images as layers, both in µm.",
}


class ChannelSource(str, enum.Enum):
    """Where the m/z channels come from."""

    PEAKS = "picked peaks"
    TYPED = "typed m/z"


def parse_mz_list(text: str) -> list[float]:
    """Parse ``"760.585, 885.55"`` (commas, semicolons or spaces) into a list of m/z values."""
    items = [t for t in re.split(r"[,;\s]+", text.strip()) if t]
    if not items:
        raise InputError("no m/z value given: type e.g. '760.585, 885.55'")
    try:
        values = [float(t) for t in items]
    except ValueError as exc:
        raise InputError(f"cannot read m/z values {text!r}: {exc}") from exc
    if any(not np.isfinite(v) or v <= 0 for v in values):
        raise InputError(f"m/z values must be positive numbers, got {text!r}")
    return values


def _path_or_none(value: Any) -> Path | None:
    """A FileEdit value as a Path, or None when it is empty."""
    if value is None:
        return None
    text = str(value).strip()
    return None if text in ("", ".") else Path(text)


@dataclass(frozen=True)
class OpenedFiles:
    """What :func:`open_files` returns: opened inputs and their spectrum summary (None = not given)."""

    he: HistologyImage | None
    msi: ImzMLDataset | IonStack | None
    spectrum: Spectrum | None
    peaks_mz: np.ndarray
    msi_path: Path | None = None


def open_files(
    he_path: Path | None,
    msi_path: Path | None,
    *,
    he_pixel_size_um: float | None = None,
    msi_pixel_size_um: float | None = None,
    n_peaks: int = DEFAULT_N_PEAKS,
) -> OpenedFiles:
    """Open the H&E and the MSI (imzML or ion stack) and summarise the spectrum (no Qt).

    Pixel sizes are used where the files' metadata has none. The mean spectrum and the picked
    peaks are computed for imzML only (an ion stack has no spectrum).
    """
    he = open_histology(he_path, pixel_size_um=he_pixel_size_um) if he_path else None
    msi: ImzMLDataset | IonStack | None = None
    spectrum, peaks = None, np.zeros(0)
    if msi_path:
        if msi_path.suffix.lower() == ".imzml":
            msi = open_imzml(msi_path, pixel_size_um=msi_pixel_size_um)
            spectrum = msi.mean_spectrum()
            peaks = msi.pick_peaks(n_peaks)
        else:
            msi = read_ion_stack(msi_path, pixel_size_um=msi_pixel_size_um)
    return OpenedFiles(he, msi, spectrum, np.asarray(peaks, float), msi_path)


class SpectrumPlot(PlotCanvas):
    """A small matplotlib plot of the mean spectrum with the picked peaks marked."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.show_message("no spectrum")

    def show_message(self, text: str) -> None:
        self._show_text(text)

    def show_spectrum(self, spectrum: Spectrum, peaks_mz: Sequence[float], selected_mz: Sequence[float] = ()) -> None:
        ax = self.axes
        ax.clear()
        ax.set_axis_on()
        ax.plot(spectrum.mz, spectrum.intensity, lw=0.6, color="0.25")
        if len(peaks_mz):
            heights = np.interp(peaks_mz, spectrum.mz, spectrum.intensity) if len(spectrum.mz) else peaks_mz * 0
            chosen = np.isin(np.round(peaks_mz, 6), np.round(np.asarray(selected_mz, float), 6))
            ax.plot(np.asarray(peaks_mz)[~chosen], heights[~chosen], "v", color="tab:blue", ms=4)
            ax.plot(np.asarray(peaks_mz)[chosen], heights[chosen], "v", color="tab:red", ms=5)
        ax.set_xlabel("m/z", fontsize=8)
        ax.set_ylabel("mean intensity", fontsize=8)
        ax.tick_params(labelsize=7)
        self.canvas.draw_idle()


class LoadWidget(JobRunner, QWidget):
    """Dock widget: pick H&E and MSI files, set pixel sizes, choose m/z channels, add layers.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        The viewer the layers are added to.

    Attributes
    ----------
    opened : OpenedFiles or None
        The inputs opened by the last successful :meth:`load`.
    busy : bool
        True while a background job runs (the buttons are disabled meanwhile).
    last_error : str or None
        Message of the last failed job.
    """

    _widget_name = "Load"
    _quiet_errors = (InputError,)

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.opened: OpenedFiles | None = None
        self.busy = False
        self.last_error: str | None = None
        self._worker = None

        tip = TOOLTIPS
        self.he_file = FileEdit(mode="r", filter=_HE_FILTER, label="H&E", tooltip=tip["he_path"])
        self.he_pixel_size = FloatSpinBox(
            value=1.0, min=1e-3, max=1e5, step=0.1, label="H&E pixel (µm)", tooltip=tip["he_pixel_size_um"]
        )
        self.msi_file = FileEdit(mode="r", filter=_MSI_FILTER, label="MSI", tooltip=tip["msi_path"])
        self.msi_pixel_size = FloatSpinBox(
            value=1.0, min=1e-3, max=1e5, step=0.1, label="MSI pixel (µm)", tooltip=tip["msi_pixel_size_um"]
        )
        for spin in (self.he_pixel_size, self.msi_pixel_size):
            spin.native.setDecimals(4)
        self.open_button = PushButton(text="Open", tooltip=tip["open"])
        self._files = Container(
            widgets=[self.he_file, self.he_pixel_size, self.msi_file, self.msi_pixel_size, self.open_button]
        )

        self.plot = SpectrumPlot()

        self.source = ComboBox(
            choices=[(c.value, c) for c in ChannelSource],
            value=ChannelSource.PEAKS,
            label="channels from",
            tooltip=tip["source"],
        )
        self.n_peaks = SpinBox(value=DEFAULT_N_PEAKS, min=1, max=200, label="peaks", tooltip=tip["n_peaks"])
        self.channels = Select(choices=[], label="channels", tooltip=tip["channels"])
        self.channels.native.setMinimumHeight(90)
        self.typed_mz = LineEdit(value="", label="m/z", tooltip=tip["typed_mz"])
        self.tolerance = LineEdit(value=DEFAULT_TOLERANCE, label="tolerance", tooltip=tip["tolerance"])
        self.norm = ComboBox(
            choices=[(n.value, n) for n in Normalization],
            value=Normalization.NONE,
            label="normalise",
            tooltip=tip["norm"],
        )
        self.add_button = PushButton(text="Add layers", tooltip=tip["add"])
        self.status = Label(value="Pick an H&E and an MSI file, then Open.")
        self.status.native.setWordWrap(True)
        self.status.native.setContentsMargins(9, 0, 9, 6)
        self._channel_box = Container(
            widgets=[
                self.source,
                self.n_peaks,
                self.channels,
                self.typed_mz,
                self.tolerance,
                self.norm,
                self.add_button,
            ]
        )

        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self._files.native)
        layout.addWidget(self.plot)
        layout.addWidget(self._channel_box.native)
        layout.addWidget(self.status.native)
        layout.addStretch(1)

        self.open_button.changed.connect(lambda: self.load())
        self.add_button.changed.connect(lambda: self.add_layers())
        self.n_peaks.changed.connect(self._on_n_peaks)
        self.source.changed.connect(self._sync_enabled)
        self.channels.changed.connect(self._redraw_spectrum)
        self._sync_enabled()

    # ------------------------------------------------------------------ actions
    def load(
        self,
        he_path: str | os.PathLike | None = None,
        msi_path: str | os.PathLike | None = None,
        *,
        he_pixel_size_um: float | None = None,
        msi_pixel_size_um: float | None = None,
    ):
        """Open the files (arguments override the fields, which are updated to match).

        Pixel sizes given here are kept; otherwise the files' metadata fills the fields when it
        has one. Runs in a background worker (returned, or None when run synchronously);
        :attr:`busy` is False again once it is done.
        """
        if he_path is not None:
            self.he_file.value = Path(he_path)
        if msi_path is not None:
            self.msi_file.value = Path(msi_path)
        if he_pixel_size_um is not None:
            self.he_pixel_size.value = float(he_pixel_size_um)
        if msi_pixel_size_um is not None:
            self.msi_pixel_size.value = float(msi_pixel_size_um)
        he, msi = _path_or_none(self.he_file.value), _path_or_none(self.msi_file.value)
        if he is None and msi is None:
            self._on_error(InputError("pick an H&E or an MSI file first"))
            return None
        keep_he, keep_msi = he_pixel_size_um is not None, msi_pixel_size_um is not None

        def on_opened(result: OpenedFiles) -> None:
            self._on_opened(result, keep_he_size=keep_he, keep_msi_size=keep_msi)

        return self._run(
            open_files,
            he,
            msi,
            he_pixel_size_um=float(self.he_pixel_size.value) if keep_he else None,
            msi_pixel_size_um=float(self.msi_pixel_size.value) if keep_msi else None,
            n_peaks=int(self.n_peaks.value),
            on_returned=on_opened,
            message="Opening " + " and ".join(p.name for p in (he, msi) if p),
        )

    def add_layers(
        self,
        mz: Sequence[float] | None = None,
        *,
        tol: str | None = None,
        norm: Normalization | str | None = None,
        channels: Sequence[Any] | None = None,
        he_pixel_size_um: float | None = None,
        msi_pixel_size_um: float | None = None,
    ):
        """Add the H&E and the chosen ion images as layers in µm (existing ones are replaced).

        Parameters
        ----------
        mz : sequence of float, optional
            Typed m/z values (switches the source to "typed m/z"); default: the widget's choice.
        tol, norm : optional
            Tolerance (``"10ppm"``, ``"0.01da"``) and normalisation; default: the fields.
        channels : sequence, optional
            Values to select in the channel list (picked m/z, or channel indices of an ion stack).
        he_pixel_size_um, msi_pixel_size_um : float, optional
            Override the pixel-size fields.
        """
        if self.opened is None:
            self._on_error(InputError("open the files first (Open)"))
            return None
        if mz is not None:
            self.typed_mz.value = ", ".join(repr(float(m)) for m in mz)
            self.source.value = ChannelSource.TYPED
        if tol is not None:
            self.tolerance.value = str(tol)
        if norm is not None:
            self.norm.value = Normalization(norm)
        if channels is not None:
            set_selection(self.channels, list(channels))
        if he_pixel_size_um is not None:
            self.he_pixel_size.value = float(he_pixel_size_um)
        if msi_pixel_size_um is not None:
            self.msi_pixel_size.value = float(msi_pixel_size_um)
        try:
            request = self._ion_request()
        except InputError as exc:
            self._on_error(exc)
            return None
        opened = self.opened
        he_size = float(self.he_pixel_size.value)
        msi_size = float(self.msi_pixel_size.value)
        return self._run(
            _build_layers,
            opened,
            request,
            he_pixel_size_um=he_size,
            msi_pixel_size_um=msi_size,
            on_returned=self._add_to_viewer,
            message="Adding layers",
        )

    # ------------------------------------------------------------------ internals
    def _ion_request(self) -> dict:
        """The channel choice as plain arguments for :func:`_build_layers`."""
        msi = self.opened.msi if self.opened else None
        if isinstance(msi, IonStack):
            chosen = list(self.channels.value) or list(range(len(msi.data)))
            return {"indices": [int(i) for i in chosen]}
        if isinstance(msi, ImzMLDataset):
            tol = self.tolerance.value.strip()
            make_windows([1.0], tol)  # validates the tolerance before starting a job
            if self.source.value is ChannelSource.TYPED:
                mz = parse_mz_list(self.typed_mz.value)
            else:
                mz = [float(m) for m in self.channels.value]
                if not mz:
                    raise InputError("no peak selected: select channels in the list or type m/z values")
            return {"mz": mz, "tol": tol, "norm": Normalization(self.norm.value)}
        return {}

    def _set_busy(self, busy: bool, message: str | None = None) -> None:
        self.busy = busy
        self.open_button.enabled = not busy
        self.add_button.enabled = not busy and self.opened is not None
        if message:
            self.status.value = message
            self.last_error = None if busy else self.last_error

    def _on_opened(self, result: OpenedFiles, *, keep_he_size: bool, keep_msi_size: bool) -> None:
        self.opened = result
        if result.he is not None and result.he.pixel_size_um and not keep_he_size:
            self.he_pixel_size.value = float(result.he.pixel_size_um)
        if result.msi is not None and result.msi.pixel_size_um and not keep_msi_size:
            self.msi_pixel_size.value = float(result.msi.pixel_size_um)
        self._fill_channels()
        parts = []
        if result.he is not None:
            parts.append(f"H&E {result.he.shape[0]}×{result.he.shape[1]} px")
        if isinstance(result.msi, ImzMLDataset):
            ds = result.msi
            parts.append(f"MSI {ds.shape[0]}×{ds.shape[1]} px, {ds.n_spectra} spectra ({ds.mode})")
        elif isinstance(result.msi, IonStack):
            parts.append(f"ion stack {'×'.join(map(str, result.msi.data.shape))}")
        self.status.value = "Opened " + "; ".join(parts) + "."
        self._set_busy(self.busy)

    def _fill_channels(self) -> None:
        msi = self.opened.msi if self.opened else None
        if isinstance(msi, ImzMLDataset):
            choices = [(f"{m:.4f}", float(m)) for m in self.opened.peaks_mz]
        elif isinstance(msi, IonStack):
            choices = [(name, k) for k, name in enumerate(msi.channel_names)]
        else:
            choices = []
        self.channels.choices = choices
        set_selection(self.channels, [value for _, value in choices])  # one pass: thousands of peaks
        self._sync_enabled()
        self._redraw_spectrum()

    def _on_n_peaks(self, n: int) -> None:
        if self.opened is None or not isinstance(self.opened.msi, ImzMLDataset):
            return
        peaks = np.asarray(self.opened.msi.pick_peaks(int(n)), float)  # the mean spectrum is cached
        self.opened = dataclasses.replace(self.opened, peaks_mz=peaks)
        self._fill_channels()

    def _sync_enabled(self, *_: Any) -> None:
        is_imzml = self.opened is not None and isinstance(self.opened.msi, ImzMLDataset)
        typed = self.source.value is ChannelSource.TYPED
        self.source.enabled = is_imzml
        self.n_peaks.enabled = is_imzml and not typed
        self.channels.enabled = not (is_imzml and typed)
        self.typed_mz.enabled = is_imzml and typed
        self.tolerance.enabled = is_imzml
        self.norm.enabled = is_imzml
        self.add_button.enabled = not self.busy and self.opened is not None

    def _redraw_spectrum(self, *_: Any) -> None:
        if self.opened is None or self.opened.spectrum is None:
            msi = self.opened.msi if self.opened else None
            self.plot.show_message("ion-image stack: no spectrum" if isinstance(msi, IonStack) else "no spectrum")
            return
        self.plot.show_spectrum(self.opened.spectrum, self.opened.peaks_mz, list(self.channels.value))

    def _add_to_viewer(self, layers: list[LayerDataTuple]) -> None:
        from napari.layers import Layer

        names = []
        for data, kwargs, layer_type in layers:
            new = Layer.create(data, kwargs, layer_type)
            existing = [i for i, lay in enumerate(self.viewer.layers) if lay.name == new.name]
            if existing:
                index = existing[0]
                self.viewer.layers.pop(index)
                self.viewer.layers.insert(index, new)
            else:
                self.viewer.layers.append(new)
            names.append(new.name)
        self.status.value = "Added " + ", ".join(names) + "."


def _build_layers(
    opened: OpenedFiles,
    request: dict,
    *,
    he_pixel_size_um: float,
    msi_pixel_size_um: float,
) -> list[LayerDataTuple]:
    """Layer data for the H&E and the requested ion images (runs in the worker; no Qt)."""
    layers: list[LayerDataTuple] = []
    if opened.he is not None:
        layers.append(he_layer(opened.he, he_pixel_size_um, name=f"{opened.he.path.stem} (H&E)"))
    msi = opened.msi
    if isinstance(msi, ImzMLDataset):
        images = msi.ion_images(request["mz"], request["tol"], norm=request["norm"])
        meta = {
            "source_path": str(msi.path),
            "tolerance": request["tol"],
            "normalization": Normalization(request["norm"]).value,
            "windows": [(w.low, w.high) for w in images.windows],
        }
        layers.append(
            ion_stack_layer(
                images.data,
                images.channel_names,
                msi_pixel_size_um,
                name=f"{msi.path.stem} (MSI)",
                mz=[w.center for w in images.windows],
                metadata=meta,
            )
        )
    elif isinstance(msi, IonStack):
        idx = request["indices"]
        layers.append(
            ion_stack_layer(
                msi.data[idx],
                [msi.channel_names[i] for i in idx],
                msi_pixel_size_um,
                name=f"{opened.msi_path.stem} (MSI)",
                metadata={"source_path": str(opened.msi_path)},
            )
        )
    return layers
