"""The **Compare** dock widget: SMSDL, BI, the H&E-free control, CNN (and the ground truth) side by side, in µm.

An adapter only: the reconstruction is the :class:`~napari_smsdl.project.Project` the Train widget
(or a reopened project) left on the MSI layer's ``metadata["smsdl_project"]``; the maths is in
:mod:`napari_smsdl.evaluation` (placement, pixel look-up, differences, limits, segments) and
:mod:`napari_smsdl.evaluation` (through :meth:`Project.with_truth`).

For each chosen channel it adds one 2-D layer per column: the measured MSI (LR), the ground truth
when there is one, and every method, all with the same colormap and linked contrast limits, placed
in µm over the registered H&E (scale = MSI pixel / F, pixel corners shared with the MSI). Grid view
tiles the layers side by side in µm (one channel per row, the method names above the columns) in one
batch; difference maps (method − ground truth, or − BI) use a diverging
colormap with symmetric limits. Clicking the canvas lists, for the pixel under the cursor, the
value of every method and of the LR pixel it came from. k-means segments of an SR stack become a
Labels layer. The metrics table also shows, per channel, SMSDL's held-out histology gain ± its std
over folds and whether the channel used the histology (where it did not, SMSDL's output is the H&E-free
control, BI + back-projection); without a ground truth it shows only that.

**Many channels.** A project whose SR stacks are lazy (zarr arrays: more than 64 channels, see
:mod:`napari_smsdl.project`) is never loaded whole: each column becomes one (channels, rows, cols)
layer backed by its lazy array, napari's channel slider moves through the channels, the contrast
limits follow the channel shown (computed from that channel alone), difference maps are lazy (dask)
stacks, and metrics, pixel values and segments use the selected channels (at most
``LAZY_SCORED_CHANNELS`` of them). The status line says so.

Every action is a method with explicit arguments::

    w = CompareWidget(viewer)
    w.show_results(channels=[0, 1], truth="sample ground truth (10 µm)")
    w.set_grid(True)
    w.inspect_pixel((105.0, 233.0))      # world (row, col) in µm
    w.segment(4)
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    Label,
    PushButton,
    Select,
    SpinBox,
)
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget

from ..errors import InputError
from ..evaluation import (
    PixelHit,
    channel_label,
    channel_limits,
    cluster_segments,
    difference_stacks,
    lazy_difference_stacks,
    locate_pixel,
    method_label,
    metrics_rows,
    pixel_values,
    refined_placement,
    shared_limits,
    tissue_mask_sr,
)
from ..evaluation._comparison import fallback_summary, guidance_cells, ordered_methods  # noqa: F401 (re-exported)
from ..project import LAYER_METADATA_KEY, LAZY_SCORED_CHANNELS, UNCERTAINTY_ROLE, Project, read_channels
from ._jobs import ErrorDisplay
from ._layers import _last2, set_selection

if TYPE_CHECKING:
    import napari


PREFIX = "compare: "
GUIDE_NAME = PREFIX + "H&E (registered, SR grid)"
PICK_NAME = PREFIX + "picked pixel"
COLORMAP = "magma"
DIFF_COLORMAP = "RdBu_r"
FROM_PROJECT = "project"

TOOLTIPS = {
    "source": "The MSI layer whose reconstruction (from Train, or a reopened project) is shown.",
    "channels": "Channels (m/z) to show: one row of layers each.",
    "truth": "A ground-truth stack on the SR grid (e.g. the sample's), to score the methods against.",
    "show": "Add the comparison layers (existing ones are replaced).",
    "grid": "Grid view: one channel per row, one method per column.",
    "differences": "Add difference maps: method − reference, diverging colours, symmetric limits.",
    "reference": "Reference of the difference maps: the ground truth when one is chosen (the error maps), else BI; "
                 "the H&E-free control shows what the histology changed.",
    "metrics": "Scores against the ground truth; 'histology gain': 1 − held-out error with the H&E / without it "
               "(± std over folds); 'H&E used': no = the channel's SMSDL output is the H&E-free control.",
    "n_segments": "Number of tissue segments (k-means on the SR stack's channels).",
    "segment_method": "Which SR stack to segment.",
    "segment": "Cluster the SR stack into tissue segments (a Labels layer).",
    "pixel": "Click a pixel on the canvas: values of every method and of its LR pixel.",
}

METRIC_COLUMNS = ("rmse", "ssim", "r2", "psnr")
#: The last two columns: SMSDL's held-out histology gain (± its std over folds) and whether the
#: channel used the histology (else its output is the H&E-free control).
METRIC_HEADERS = ("method", "channel", "RMSE", "SSIM", "R²", "PSNR (dB)", "histology gain", "H&E used")


def _fmt(value: float) -> str:
    if value is None or not np.isfinite(value):
        return "—"
    return f"{value:.4g}"


def truth_from_layer(layer, project: Project) -> np.ndarray:
    """The ground-truth stack of ``layer`` for the project's channels, on the SR grid (no Qt).

    Channels are matched by name (``metadata["channel_names"]``); without names the layer must
    have exactly the project's channels. For a lazy project the layer's data are not read: the
    result is the layer's array itself, or a lazy (dask) selection of its channels.
    """
    data = layer.data[0] if layer.multiscale else layer.data
    if np.ndim(data) == 2 or not project.lazy:
        data = np.asarray(data, np.float32)
    if data.ndim == 2:
        data = data[None]
    names = list(layer.metadata.get("channel_names") or [])
    if all(n in names for n in project.channel_names):
        index = [names.index(n) for n in project.channel_names]
        if not project.lazy:
            data = data[index]
        elif index != list(range(len(data))):  # many channels: picked lazily, one channel when shown
            import dask.array as da

            data = da.from_array(data, chunks=(1, *tuple(data.shape)[1:]), asarray=True)[index]
    elif len(data) != len(project.channel_names):
        raise InputError(f"ground truth layer {layer.name!r} has {len(data)} channels and none of the names "
                         f"{list(project.channel_names)}")
    sr_shape = (project.lr_msi.shape[1] * project.factor, project.lr_msi.shape[2] * project.factor)
    if data.shape[1:] != sr_shape:
        raise InputError(f"ground truth layer {layer.name!r} is {data.shape[1]}×{data.shape[2]} pixels; the SR grid "
                         f"is {sr_shape[0]}×{sr_shape[1]} (factor {project.factor})")
    return data


def add_comparison_layers(
    viewer,
    project: Project,
    msi_layer,
    *,
    channels: Sequence[int] | None = None,
    differences: str | None = None,
    grid: bool = False,
    grid_by: str = "auto",
    spare_differences: str | None = None,
    spares: dict[int, list] | None = None,
) -> dict[int, list]:
    """Add the comparison layers of ``project`` placed on ``msi_layer`` (old ones are replaced).

    Returns ``{channel: [layers of that row]}`` (LR, truth, methods, then differences).
    ``spare_differences`` (with ``differences`` None, an in-memory project and a ``spares`` dict to
    fill): difference maps against that reference are built now, hidden and outside the rows, so
    that turning them on later (:func:`set_differences`) creates no layer.
    """
    with _batched(viewer):
        if spares is not None:
            spares.clear()
        return _add_comparison_layers(viewer, project, msi_layer, channels=channels, differences=differences,
                                      grid=grid, grid_by=grid_by, spare_differences=spare_differences, spares=spares)


def _label_slots(rows: dict[int, list], spares: dict[int, list]) -> int:
    """Grid labels for the largest grid of ``rows`` and their spare difference maps (one per row and column)."""
    return len(rows) + max((len(row) + len(spares.get(c, ())) for c, row in rows.items()), default=0)


_BATCH_DEPTH: dict[int, int] = {}


@contextlib.contextmanager
def _batched(viewer, *, freeze_gc: bool = False):
    """One scene-graph rebuild (and one of napari's garbage collections) for many layer changes.

    ``freeze_gc`` (a batch that removes no layer): napari's full ``gc.collect()`` at the end of the
    batch (there to free the GPU resources of removed layers) scans only the objects made during
    the batch, not the whole heap (torch, the project: most of a second on 2 cores); the others go
    back to the collector's oldest generation after it.

    Re-entrant: napari's ``batched_update`` resumes the canvas at the end of *every* batch, so an
    inner batch (removing the old layers inside a rebuild) would switch the pause off for the rest
    of the outer one, and every later append, move or ``visible`` change would rebuild the whole
    grid again (minutes for a grid of 50 layers). Only the outermost batch here begins and ends one.
    """
    layers = viewer.layers
    batched = getattr(layers, "batched_update", None)
    key = id(layers)
    depth = _BATCH_DEPTH.get(key, 0)
    if batched is None or depth:
        _BATCH_DEPTH[key] = depth + 1
        try:
            yield
        finally:
            _BATCH_DEPTH[key] = depth
        return
    _BATCH_DEPTH[key] = 1
    # napari makes every inserted layer the active one, and each activation rebuilds the layer
    # controls (a quarter of a second per layer): keep the user's selection during the batch
    activate = getattr(layers, "_activate_on_insert", None)
    try:
        if activate is not None:
            layers._activate_on_insert = False
        if freeze_gc:
            gc.freeze()
        with batched():
            yield
    finally:
        if freeze_gc:
            gc.unfreeze()
        if activate is not None:
            layers._activate_on_insert = activate
        _BATCH_DEPTH.pop(key, None)


def _add_comparison_layers(viewer, project, msi_layer, *, channels, differences, grid, grid_by,
                           spare_differences=None, spares=None) -> dict[int, list]:
    from napari.layers import Image

    remove_comparison_layers(viewer)
    if project.lazy:
        return _add_lazy_layers(viewer, project, msi_layer, channels=channels, differences=differences, grid=grid,
                                grid_by=grid_by)
    chans = list(range(len(project.channel_names))) if channels is None else [int(c) for c in channels]
    msi_scale, msi_translate = _last2(msi_layer.scale), _last2(msi_layer.translate)
    sr_place = refined_placement(msi_scale, msi_translate, project.factor)
    added = []
    if project.guide_rgb is not None:
        k = project.guide_rgb.shape[0] / (project.lr_msi.shape[1] * project.factor)
        guide = Image(np.asarray(project.guide_rgb), name=GUIDE_NAME, rgb=True,
                      **refined_placement(msi_scale, msi_translate, project.factor * k),
                      metadata={"role": "guide", "pixel_size_um": project.sr_pixel_size_um / k})
        viewer.layers.append(guide)
        added.append(guide)
    mask = tissue_mask_sr(project)
    rows: dict[int, list] = {}
    for c in chans:
        label = channel_label(c, project.channel_names, project.mz)
        columns = [("lr", project.lr_msi[c])]
        if project.truth is not None:
            columns.append(("truth", project.truth[c]))
        columns += [(m, project.sr[m][c]) for m in ordered_methods(project.sr)]
        reference = project.truth[c] if project.truth is not None else next(iter(project.sr.values()))[c]
        limits = shared_limits([reference], mask=mask)
        row = []
        for method, image in columns:
            place = {"scale": tuple(msi_scale), "translate": tuple(msi_translate)} if method == "lr" else sr_place
            layer = Image(
                np.asarray(image, np.float32), name=f"{PREFIX}{method_label(method)} · {label}", colormap=COLORMAP,
                contrast_limits=limits, **place,
                metadata={"role": "comparison", "method": method, "channel": c, "channel_name": project.channel_names[c],
                          "pixel_size_um": project.msi_pixel_size_um if method == "lr" else project.sr_pixel_size_um},
            )
            row.append(layer)
        for layer in row:
            layer.metadata["home_translate"] = tuple(layer.translate)  # grid tiles are offsets from here
            viewer.layers.append(layer)
        rows[c] = row
        _link_limits(row)
    if differences:
        _append_difference_layers(viewer, project, msi_layer, rows, differences)
    elif spare_differences and spares is not None:
        _append_difference_layers(viewer, project, msi_layer, rows, spare_differences, into=spares)
    arrange(viewer, rows, grid=grid, grid_by=grid_by, label_slots=_label_slots(rows, spares or {}),
            parked=[lay for layers in (spares or {}).values() for lay in layers])
    return rows


def _append_difference_layers(viewer, project, msi_layer, rows: dict[int, list], differences: str, *,
                              into: dict[int, list] | None = None) -> None:
    """Append the difference maps (method − ``differences``) to every row (in-memory project).

    ``into``: put them there (channel → hidden layers) instead of in the rows.
    """
    from napari.layers import Image

    sr_place = refined_placement(_last2(msi_layer.scale), _last2(msi_layer.translate), project.factor)
    mask = tissue_mask_sr(project)
    diffs = difference_stacks(project, differences)
    diffs = {m: np.where(mask[None], d, np.nan).astype(np.float32) for m, d in diffs.items()}  # tissue only
    if not diffs:
        return
    ref_label = method_label(differences)
    for c, row in rows.items():
        label = channel_label(c, project.channel_names, project.mz)
        d_limits = shared_limits([next(iter(diffs.values()))[c]], mask=mask, symmetric=True)
        added = []
        for method in ordered_methods(diffs):
            layer = Image(
                diffs[method][c], name=f"{PREFIX}{method_label(method)} − {ref_label} · {label}",
                colormap=DIFF_COLORMAP, contrast_limits=d_limits, **sr_place, visible=False,
                metadata={"role": "difference", "method": method, "reference": differences, "channel": c},
            )
            layer.metadata["home_translate"] = tuple(layer.translate)
            viewer.layers.append(layer)
            added.append(layer)
        (row if into is None else into.setdefault(c, [])).extend(added)
        _link_limits(added)


def set_differences(viewer, project, msi_layer, rows: dict[int, list], differences: str | None, *, grid: bool,
                    grid_by: str = "auto", spares: dict[int, list] | None = None, shown: bool = True) -> dict[int, list]:
    """Add or remove only the difference maps of ``rows`` (the other layers stay), in one batch.

    The comparison layers are not rebuilt: toggling difference maps costs the difference layers
    alone. With ``spares`` (channel → hidden difference layers, see :func:`add_comparison_layers`)
    maps turned off are kept there, hidden, and turned on again from there: a toggle then creates
    and removes no layer, only a new reference does. A lazy (many-channel) project is rebuilt as a
    whole (one row of stack layers). ``shown=False`` (with ``spares``) makes the maps of
    ``differences`` and keeps them in the pool, hidden: a new reference chosen while the maps are off.
    """
    pool = {} if spares is None else spares
    for c, row in rows.items():  # the difference maps shown go back to the pool
        pool.setdefault(c, []).extend(lay for lay in row if lay.metadata.get("role") == "difference")
        row[:] = [lay for lay in row if lay.metadata.get("role") != "difference"]
    stale = [lay for layers in pool.values() for lay in layers
             if lay.metadata.get("reference") != differences and (differences or spares is None)]
    with _batched(viewer, freeze_gc=not stale):
        for layers in pool.values():
            for layer in [lay for lay in layers if lay in stale]:
                layers.remove(layer)
                if layer in viewer.layers:
                    viewer.layers.remove(layer)
        if differences and not any(pool.values()):
            _append_difference_layers(viewer, project, msi_layer, rows, differences, into=pool)
        if differences and shown:
            for c, row in rows.items():
                row.extend(pool.pop(c, []))
        parked = [lay for layers in pool.values() for lay in layers]
        arrange(viewer, rows, grid=grid, grid_by=grid_by, parked=parked,
                label_slots=_label_slots(rows, pool))
    return rows


def _add_lazy_layers(viewer, project, msi_layer, *, channels, differences, grid, grid_by) -> dict[int, list]:
    """One (C, rows, cols) layer per column, backed by the lazy stacks; limits follow the channel shown."""
    from napari.layers import Image

    n = len(project.channel_names)
    first = int(channels[0]) if channels else 0
    msi_scale, msi_translate = _last2(msi_layer.scale), _last2(msi_layer.translate)
    sr_place = refined_placement(msi_scale, msi_translate, project.factor)
    mask = tissue_mask_sr(project)

    def stack_place(place: dict) -> dict:  # a leading channel axis: scale 1, translate 0 (channel index)
        return {"scale": (1.0, *place["scale"]), "translate": (0.0, *place["translate"])}

    columns = [("lr", project.lr_msi)]
    if project.truth is not None:
        columns.append(("truth", project.truth))
    columns += [(m, project.sr[m]) for m in ordered_methods(project.sr)]
    reference = project.truth if project.truth is not None else project.sr[ordered_methods(project.sr)[0]]
    limits = channel_limits(reference, first, mask=mask)
    axis_labels = ("channel (m/z)" if project.mz is not None else "channel", "y", "x")
    row = []
    for method, stack in columns:
        place = {"scale": tuple(msi_scale), "translate": tuple(msi_translate)} if method == "lr" else sr_place
        row.append(Image(
            stack, name=f"{PREFIX}{method_label(method)} · {n} channels", colormap=COLORMAP, contrast_limits=limits,
            axis_labels=axis_labels, **stack_place(place),
            metadata={"role": "comparison", "method": method, "channel": None, "lazy": True,
                      "channel_names": list(project.channel_names),
                      "pixel_size_um": project.msi_pixel_size_um if method == "lr" else project.sr_pixel_size_um},
        ))
    diffs = lazy_difference_stacks(project, differences, mask) if differences else {}
    d_limits = None
    if diffs:
        d_limits = channel_limits(next(iter(diffs.values())), first, mask=mask, symmetric=True)
        ref_label = method_label(differences)
        for method in ordered_methods(diffs):
            row.append(Image(
                diffs[method], name=f"{PREFIX}{method_label(method)} − {ref_label} · {n} channels",
                colormap=DIFF_COLORMAP, contrast_limits=d_limits, axis_labels=axis_labels, **stack_place(sr_place),
                metadata={"role": "difference", "method": method, "reference": differences, "channel": None,
                          "lazy": True},
            ))
    for layer in row:
        layer.metadata["home_translate"] = tuple(layer.translate)  # grid tiles are offsets from here
        viewer.layers.append(layer)
    comparison = [lay for lay in row if lay.metadata["role"] == "comparison"]
    difference = [lay for lay in row if lay.metadata["role"] == "difference"]
    _link_limits(comparison)
    _link_limits(difference)
    viewer.dims.set_point(0, float(first))
    _follow_channel(viewer, comparison, difference, reference, diffs, mask)
    rows = {first: row}
    arrange(viewer, rows, grid=grid, grid_by=grid_by)
    return rows


def shown_channel(viewer) -> int:
    """The channel napari's slider shows (the world position on the leading axis, rounded)."""
    return int(round(float(viewer.dims.point[0]))) if viewer.dims.ndim >= 3 else 0


def _follow_channel(viewer, comparison: list, difference: list, reference, diffs: dict, mask) -> None:
    """Contrast limits of lazy stack layers computed from the channel shown, whenever the slider moves."""
    state = {"channel": shown_channel(viewer)}
    event = viewer.dims.events.current_step

    def on_step(*_):
        if not comparison or comparison[0] not in viewer.layers:
            event.disconnect(on_step)  # the layers are gone: stop following
            return
        channel = shown_channel(viewer)
        if channel == state["channel"] or not 0 <= channel < reference.shape[0]:
            return
        state["channel"] = channel
        comparison[0].contrast_limits = channel_limits(reference, channel, mask=mask)  # linked: the row follows
        if difference:
            difference[0].contrast_limits = channel_limits(next(iter(diffs.values())), channel, mask=mask,
                                                           symmetric=True)

    event.connect(on_step)


def remove_comparison_layers(viewer) -> None:
    with _batched(viewer):
        for layer in [lay for lay in viewer.layers if lay.name.startswith(PREFIX)]:
            viewer.layers.remove(layer)


def _link_limits(layers: list) -> None:
    """Keep the contrast limits of ``layers`` equal (changing one changes all)."""
    state = {"busy": False}

    def follow(event, source=None):
        if state["busy"]:
            return
        state["busy"] = True
        try:
            limits = tuple(source.contrast_limits)
            for other in layers:
                if other is not source and tuple(other.contrast_limits) != limits:
                    other.contrast_limits = limits
        finally:
            state["busy"] = False

    for layer in layers:
        layer.events.contrast_limits.connect(lambda event, lay=layer: follow(event, lay))


def grid_rows(viewer, n_channels: int, n_columns: int, image_shape_rc: Sequence[int] = (1, 1)) -> str:
    """``"channels"`` (one channel per grid row) unless one method per row shows the images larger."""
    height, width = (np.asarray(viewer.canvas.size, float) if hasattr(viewer, "canvas") else np.array([600.0, 800.0]))
    aspect = float(image_shape_rc[0]) / float(image_shape_rc[1])

    def image_px(n_rows: int, n_cols: int) -> float:  # displayed image height in a cell
        return min(height / n_rows, width / n_cols * aspect)

    return "methods" if image_px(n_columns, n_channels) > 1.2 * image_px(n_channels, n_columns) else "channels"


#: Gap between grid tiles, as a fraction of a tile's height / width (room for the column labels).
GRID_GAP = 0.12
LABELS_NAME = PREFIX + "grid labels"


def arrange(viewer, rows: dict[int, list], *, grid: bool, grid_by: str = "auto", parked: Sequence = (),
            label_slots: int = 0) -> dict[tuple[int, int], Any]:
    """Overlay (H&E, with the first channel's SMSDL on top) or grid view.

    Grid view tiles the comparison layers in world space, one tile per layer (``grid_by="channels"``:
    one channel per tile row, one method per column; ``"methods"``: one method per row; ``"auto"``:
    whichever shows the images larger on this canvas), with the column and row names written on the
    canvas (a Points layer, :data:`LABELS_NAME`). napari's own grid is not used: it recomputes every
    layer's cell for every layer and every cell (O(n^4) in the number of layers; minutes for the 50
    layers of a 5-channel comparison with difference maps), whereas a tile is one ``translate``.
    Everything happens in one batch: napari rebuilds its scene once, recomputes its dims once
    (not once per ``translate``) and collects garbage over the batch's own objects only.
    ``parked``: layers kept hidden at home (spare difference maps); ``label_slots``: make the grid
    labels layer that large, so that a later grid with more columns renames it in place.

    Returns ``{(tile row, tile col): layer}`` in grid view (empty for the overlay).
    """
    with _batched(viewer, freeze_gc=True), _one_dims_update(viewer) as move:
        tiles = _arrange(viewer, rows, grid=grid, grid_by=grid_by, parked=parked, label_slots=label_slots, move=move)
    viewer.reset_view()  # after the batch: the camera fits what is shown
    return tiles


@contextlib.contextmanager
def _one_dims_update(viewer):
    """Yield a ``move(layer, translate)``; napari's dims follow all the moves once, at the end.

    napari recomputes the world extent of every layer and the dims after each ``translate``
    (and re-slices on the new ranges): O(n²) for n tiled layers. The viewer's handler is blocked
    on the moved layers and called once.
    """
    on_change = getattr(viewer, "_on_layers_change", None)
    moved: list = []

    def move(layer, translate: np.ndarray) -> None:
        if np.array_equal(np.asarray(layer.translate, float), translate):
            return  # every change costs a recompute of the dims
        emitter = layer.events.translate
        if on_change is not None:
            emitter.block(on_change)
        try:
            layer.translate = translate
        finally:
            if on_change is not None:
                emitter.unblock(on_change)
        moved.append(layer)

    try:
        yield move
    finally:
        if moved and on_change is not None:
            on_change()


def warm_up(viewer, layers: Sequence) -> int:
    """Draw the hidden ``layers`` once, unseen, so that showing them later costs no GL set-up.

    The first draw of a layer links its shader program (about 30 ms a layer in software OpenGL),
    uploads its texture and, for text, renders the glyphs: for a grid of 30 layers most of the
    first toggle. Here each hidden layer is sliced and its vispy node drawn once into the canvas's
    framebuffer (the napari layers stay hidden; the frame is never shown: the canvas is redrawn
    before it is next painted), then hidden again. Nothing is drawn when the viewer has no canvas
    on screen (the first real draw then pays). Returns the number of layers drawn.
    """
    canvas = getattr(getattr(getattr(viewer, "window", None), "_qt_viewer", None), "canvas", None)
    visuals = getattr(canvas, "layer_to_visual", None)
    scene = getattr(canvas, "_scene_canvas", None)
    native = getattr(scene, "native", None)
    if visuals is None or native is None or not native.isVisible() or not getattr(native, "isValid", lambda: True)():
        return 0  # no canvas on screen, or its GL context not made yet
    nodes = []
    for layer in layers:
        visual = visuals.get(layer)
        if layer.visible or visual is None or visual.node.visible:
            continue
        layer.set_view_slice()  # a hidden layer is not sliced: its node may hold no data yet
        layer.events.set_data()  # the vispy layer takes the slice
        nodes.append(visual.node)
    if not nodes:
        return 0
    try:
        for node in nodes:
            node.visible = True
        # into the canvas's own framebuffer, not an off-screen one of vispy's: software OpenGL compiles a
        # shader again for each framebuffer format (an off-screen draw left 0.2 s of the labels' text to
        # the first grid view). Nothing reaches the screen: it is not swapped, and the update below
        # redraws the real scene before the canvas is next shown
        scene.set_current()
        scene._draw_scene()
    finally:
        for node in nodes:
            node.visible = False
        scene.update()
    return len(nodes)


def _home(layer) -> np.ndarray:
    """The layer's own placement (translate) when not tiled, recorded when it was made."""
    return np.asarray(layer.metadata.get("home_translate", layer.translate), float)


def _extent_rc(layer) -> np.ndarray:
    """World (rows, cols) size of a layer's last two axes in µm."""
    return np.asarray(np.shape(layer.data)[-2:], float) * _last2(layer.scale)


def _arrange(viewer, rows: dict[int, list], *, grid: bool, grid_by: str, parked: Sequence, label_slots: int,
             move) -> dict[tuple[int, int], Any]:
    if hasattr(viewer, "canvas"):
        viewer.canvas.grid.enabled = False  # a grid left on by an older version or the user
    row_layers = [lay for row in rows.values() for lay in row]
    shown = {id(lay) for lay in row_layers}
    for layer in [*row_layers, *parked]:
        layer.metadata["grid_tile"] = None
    for layer in parked:  # hidden first: a hidden layer is not re-sliced when it moves
        if layer.visible:
            layer.visible = False
        move(layer, _home(layer))
    if LABELS_NAME in viewer.layers:  # kept (hidden) between toggles: making a Points layer costs more
        viewer.layers[LABELS_NAME].visible = False
    if not grid:
        first = next(iter(rows.values()), [])
        top = next((lay for lay in first if lay.metadata.get("method") == "smsdl"), first[-1] if first else None)
        for layer in row_layers:  # hidden before they move home
            if layer.visible and layer is not top:
                layer.visible = False
        for layer in row_layers:  # back home
            move(layer, _home(layer))
        if top is not None and not top.visible:
            top.visible = True
        if label_slots and row_layers and LABELS_NAME not in viewer.layers:
            # made now, hidden, at the grid's corner (not to widen the view), holding every name a grid of
            # these layers and the parked ones can show, so that :func:`warm_up` renders their glyphs:
            # grid view then only moves and renames it
            size = np.max([_extent_rc(lay) for lay in row_layers], axis=0)
            corner = _home(first[-1])[-2:] - _last2(first[-1].scale) / 2
            names = list(dict.fromkeys(name for lay in (*row_layers, *parked) for name in _tile_names(lay)))
            _add_grid_labels(viewer, corner, size, size * (1.0 + GRID_GAP), {}, {}, slots=max(label_slots, len(names)))
            labels = viewer.layers[LABELS_NAME]
            labels.visible = False
            labels.features = {"label": names + [""] * (len(labels.data) - len(names))}
        if top is not None:
            top.opacity = 0.85
        if GUIDE_NAME in viewer.layers:
            viewer.layers[GUIDE_NAME].visible = True
        return {}
    n_cols = max((len(row) for row in rows.values()), default=1)
    first = next(iter(rows.values()), [])
    shape_rc = np.shape(first[-1].data)[-2:] if first else (1, 1)
    by = grid_rows(viewer, len(rows), n_cols, shape_rc) if grid_by == "auto" else grid_by
    if by not in ("channels", "methods"):
        raise ValueError(f"grid_by must be 'auto', 'channels' or 'methods', got {grid_by!r}")
    for layer in viewer.layers:  # hide first, show after the moves: a hidden layer is not re-sliced when it moves
        if layer.visible and id(layer) not in shown and layer.name != LABELS_NAME:
            layer.visible = False
    if not row_layers:
        return {}
    size = np.max([_extent_rc(lay) for lay in row_layers], axis=0)
    step = size * (1.0 + GRID_GAP)
    corner = _home(first[-1])[-2:] - _last2(first[-1].scale) / 2  # the shared pixel corner of the row
    tiles: dict[tuple[int, int], Any] = {}
    col_names: dict[int, str] = {}
    row_names: dict[int, str] = {}
    for i, row in enumerate(rows.values()):
        for j, layer in enumerate(row):
            r, c = (i, j) if by == "channels" else (j, i)
            offset = np.array([r, c], float) * step
            tiles[(r, c)] = layer
            layer.metadata["grid_tile"] = (r, c)
            translate = _home(layer)  # tiles are offsets from home
            translate[-2:] += offset
            move(layer, translate)
            what, channel = _tile_names(layer)
            col_names.setdefault(c, what if by == "channels" else channel)
            row_names.setdefault(r, channel if by == "channels" else what)
    for layer in row_layers:
        if not layer.visible:
            layer.visible = True
    _add_grid_labels(viewer, corner, size, step, col_names, row_names, slots=label_slots)
    return tiles


#: Grid labels must fit a tile's width on the canvas: the longest method names, shortened.
SHORT_LABELS = {method_label("backprojection"): "H&E-free control", "ground truth": "truth"}


def _tile_names(layer) -> tuple[str, str]:
    """(method, channel) names of a tiled layer as the grid labels write them (the method shortened)."""
    what, _, channel = layer.name[len(PREFIX):].rpartition(" · ")
    return _short_label(what), channel


def _short_label(text: str) -> str:
    for long, short in SHORT_LABELS.items():
        text = text.replace(long, short)
    return text


def _add_grid_labels(viewer, corner, size, step, col_names: dict, row_names: dict, *, slots: int = 0) -> None:
    """Column names above the tiles, row names in a tile-wide margin left of them, as canvas text.

    A 2-D Points layer (invisible points, text only), so it shows on every slice of a channel stack.
    It has at least ``slots`` labels (plus two anchors), the unused ones empty at an anchor, so that
    a grid with more or fewer columns renames the layer in place instead of making a new one.
    """
    from napari.layers import Points

    gap = step - size
    coords = [(corner[0] - gap[0] * 0.5, corner[1] + c * step[1] + size[1] / 2) for c in col_names]
    coords += [(corner[0] + r * step[0] + size[0] / 2, corner[1] - gap[1] - size[1] / 2) for r in row_names]
    texts = list(col_names.values()) + list(row_names.values())
    # two empty labels at the margins' outer corners: the camera then fits the whole text, not half
    anchors = [(corner[0] - gap[0], corner[1] - gap[1] - size[1]), (corner[0] - gap[0], corner[1])]
    existing = len(viewer.layers[LABELS_NAME].data) if LABELS_NAME in viewer.layers else 0
    n = max(len(coords) + len(anchors), existing, slots + len(anchors))  # a larger layer stays: empty labels fill it
    coords += [anchors[1]] * (n - len(coords) - len(anchors)) + anchors
    texts += [""] * (n - len(texts))
    coords = np.asarray(coords, float).reshape(-1, 2)
    if LABELS_NAME in viewer.layers:
        labels = viewer.layers[LABELS_NAME]
        if len(labels.data) == len(coords):  # same size: move and rename in place
            labels.data = coords
            labels.features = {"label": texts}
            labels.visible = True
            return
        # a different count is a new layer: napari's text styles do not follow a resize in place
        viewer.layers.remove(labels)
    labels = Points(coords, name=LABELS_NAME, size=0.0, face_color="transparent",
                    border_width=0.0, features={"label": texts},
                    text={"string": "{label}", "color": "white", "size": 9, "anchor": "center"},
                    metadata={"role": "grid_labels"})
    viewer.layers.append(labels)


def fit_table(table: QTableWidget, *, max_rows: int = 20, max_width: int = 640) -> None:
    """Size a table to show all its rows (up to ``max_rows``) and columns (up to ``max_width`` px)."""
    table.resizeColumnsToContents()
    table.resizeRowsToContents()
    frame = 2 * table.frameWidth()
    rows = sum(table.rowHeight(i) for i in range(min(table.rowCount(), max_rows)))
    height = table.horizontalHeader().height() + rows + frame
    if table.rowCount() > max_rows or table.horizontalHeader().length() + frame > max_width:
        height += table.horizontalScrollBar().sizeHint().height()
    table.setFixedHeight(max(height, 60))
    table.setMinimumWidth(min(table.horizontalHeader().length() + frame, max_width))


class CompareWidget(ErrorDisplay, QWidget):
    """Dock widget: comparison layers, grid view, differences, metrics, pixel values, segments.

    Attributes
    ----------
    project : Project or None
        The project shown (with its ground truth and metrics when one was given).
    rows : dict
        Channel → its comparison layers.
    picked : dict or None
        The last :meth:`inspect_pixel` result.
    last_error : str or None
    """

    _widget_name = "Compare"

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.project: Project | None = None
        self.rows: dict[int, list] = {}
        #: channel → difference maps built with the comparison but not shown (hidden, at home)
        self._spares: dict[int, list] = {}
        self.picked: dict | None = None
        self.last_error: str | None = None
        self._watched: set[int] = set()
        tip = TOOLTIPS

        self.source = ComboBox(label="MSI layer", choices=self._project_layers, tooltip=tip["source"])
        self.channels = Select(choices=[], label="channels", tooltip=tip["channels"])
        self.channels.native.setMinimumHeight(80)
        self.truth = ComboBox(label="ground truth", choices=self._truth_choices, tooltip=tip["truth"])
        self.show_button = PushButton(text="Show", tooltip=tip["show"])
        self.grid = CheckBox(value=False, text="grid view", tooltip=tip["grid"])
        self.differences = CheckBox(value=False, text="difference maps", tooltip=tip["differences"])
        self.reference = ComboBox(label="reference", choices=[("ground truth", "truth"), ("BI", "bicubic"),
                                                              (method_label("backprojection"), "backprojection")],
                                  value="bicubic", tooltip=tip["reference"])
        self.n_segments = SpinBox(value=4, min=2, max=32, label="segments", tooltip=tip["n_segments"])
        self.segment_method = ComboBox(label="segment", choices=self._method_choices, tooltip=tip["segment_method"])
        self.segment_button = PushButton(text="Segment tissue", tooltip=tip["segment"])
        self.status = Label(value="Train first (or reopen a project), then Show.")
        self.status.native.setWordWrap(True)
        self.status.native.setContentsMargins(9, 0, 9, 6)
        self.pixel_label = Label(value="Click a pixel on the canvas to see every method's value there.")
        self.pixel_label.native.setWordWrap(True)
        self.pixel_label.native.setContentsMargins(9, 0, 9, 0)
        self.pixel_label.tooltip = tip["pixel"]

        self.metrics_table = QTableWidget(0, len(METRIC_HEADERS))
        self.metrics_table.setHorizontalHeaderLabels(METRIC_HEADERS)
        self.metrics_table.setToolTip(tip["metrics"])
        self._setup_table(self.metrics_table)
        self.pixel_table = QTableWidget(0, 1)
        self.pixel_table.setHorizontalHeaderLabels(["channel"])
        self._setup_table(self.pixel_table)

        choose = Container(widgets=[self.source, self.channels, self.truth, self.show_button])
        view = Container(widgets=[self.grid, self.differences, self.reference])
        segments = Container(widgets=[self.n_segments, self.segment_method, self.segment_button])
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(choose.native)
        layout.addWidget(view.native)
        layout.addWidget(self.metrics_table)
        layout.addWidget(self.pixel_label.native)
        layout.addWidget(self.pixel_table)
        layout.addWidget(segments.native)
        layout.addWidget(self.status.native)
        layout.addStretch(1)

        self.source.changed.connect(self._on_source)
        self.show_button.changed.connect(lambda: self.show_results())
        self._grid_by = "auto"
        self.grid.changed.connect(lambda value: self.set_grid(bool(value), rows=self._grid_by))
        self.differences.changed.connect(lambda *_: self._update_differences())
        self.reference.changed.connect(self._on_reference)
        self._reference_by_user = False
        self.truth.changed.connect(lambda *_: self._default_reference())
        self.segment_button.changed.connect(lambda: self.segment())
        self.viewer.layers.events.inserted.connect(self._on_inserted)
        self.viewer.layers.events.removed.connect(self._reset_choices)
        self.viewer.mouse_drag_callbacks.append(self._on_click)
        callbacks, on_click = self.viewer.mouse_drag_callbacks, self._on_click
        self.destroyed.connect(lambda *_: on_click in callbacks and callbacks.remove(on_click))
        for layer in self.viewer.layers:
            self._watch(layer)
        self._reset_choices()
        self._on_source(self.source.value)
        self._default_reference()

    @staticmethod
    def _setup_table(table: QTableWidget) -> None:
        table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        table.verticalHeader().setVisible(False)
        table.setMinimumHeight(110)

    def closeEvent(self, event) -> None:
        if self._on_click in self.viewer.mouse_drag_callbacks:
            self.viewer.mouse_drag_callbacks.remove(self._on_click)
        super().closeEvent(event)

    # ------------------------------------------------------------------ choices
    def _project_layers(self, *_: Any) -> list:
        from napari.layers import Image

        return [(lay.name, lay) for lay in self.viewer.layers
                if isinstance(lay, Image) and isinstance(lay.metadata.get(LAYER_METADATA_KEY), Project)]

    def _truth_choices(self, *_: Any) -> list:
        from napari.layers import Image

        choices: list = [("(none)", None)]
        project = self._source_project()
        if project is not None and project.truth is not None:
            choices.append(("stored in the project", FROM_PROJECT))
        for lay in self.viewer.layers:
            if isinstance(lay, Image) and not lay.rgb and not lay.name.startswith(PREFIX) and lay is not self.source.value \
                    and lay.metadata.get("role") != UNCERTAINTY_ROLE and np.ndim(lay.data[0] if lay.multiscale else lay.data) in (2, 3):
                choices.append((lay.name, lay))
        return choices

    def _method_choices(self, *_: Any) -> list:
        project = self.project or self._source_project()
        return [(method_label(m), m) for m in ordered_methods(project.sr if project is not None else [])]

    def _source_project(self) -> Project | None:
        layer = self.source.value
        return layer.metadata.get(LAYER_METADATA_KEY) if layer is not None else None

    def _watch(self, layer) -> None:
        if id(layer) not in self._watched and hasattr(layer.events, "metadata"):
            self._watched.add(id(layer))
            layer.events.metadata.connect(lambda event, lay=layer: self._on_metadata(lay))

    def _on_inserted(self, event) -> None:
        self._watch(event.value)
        self._reset_choices()

    def _reset_choices(self, *_: Any) -> None:
        old = self.source.value
        self.source.reset_choices()
        if self.source.value is not old:
            self._on_source(self.source.value)
        else:
            self._reset_truth()
        self.segment_method.reset_choices()

    def _reset_truth(self) -> None:
        current = self.truth.value
        self.truth.reset_choices()
        values = [v for _, v in self._truth_choices()]
        if current is not None and any(v is current for v in values):
            self.truth.value = current
            return
        if FROM_PROJECT in values:
            self.truth.value = FROM_PROJECT
            return
        guess = next((v for v in values if v is not None and v != FROM_PROJECT
                      and (v.metadata.get("kind") == "ground_truth" or v.metadata.get("role") == "reference")), None)
        self.truth.value = guess

    def _on_source(self, layer) -> None:
        project = layer.metadata.get(LAYER_METADATA_KEY) if layer is not None else None
        if project is None:
            self.channels.choices = []
        else:
            n = len(project.channel_names)
            self.channels.choices = [(channel_label(k, project.channel_names, project.mz), k) for k in range(n)]
            # lazy (many channels): the first few are scored; the slider shows any channel
            set_selection(self.channels, range(min(n, LAZY_SCORED_CHANNELS) if project.lazy else n))
        self._reset_truth()
        self.segment_method.reset_choices()

    def _on_metadata(self, layer) -> None:
        """A layer's metadata changed: a new reconstruction from Train is shown straight away."""
        project = layer.metadata.get(LAYER_METADATA_KEY)
        if not isinstance(project, Project):
            return
        self.source.reset_choices()
        if project is self.project:
            return
        if self.project is not None and project.sr is self.project.sr and layer is self.source.value:
            self.project = project  # same results (e.g. just saved): nothing to redraw
            return
        self.source.value = layer
        self._on_source(layer)
        self.show_results()

    # ------------------------------------------------------------------ actions
    def show_results(self, project: Project | None = None, *, channels: Sequence[int] | None = None,
                     truth: Any = "auto") -> dict[int, list]:
        """Add the comparison layers and fill the metrics table.

        Parameters
        ----------
        project : Project, optional
            Default: the one on the chosen MSI layer.
        channels : sequence of int, optional
            Channel indices to show (default: the selection).
        truth : layer, layer name, ``"project"``, None or ``"auto"``
            The ground truth (``"auto"``: the widget's choice).
        """
        try:
            return self._show(project, channels, truth)
        except Exception as exc:  # noqa: BLE001 - shown to the user
            self._on_error(exc)
            return {}

    def _show(self, project, channels, truth) -> dict[int, list]:
        msi_layer = self.source.value
        if project is None:
            project = self._source_project()
        if project is None or msi_layer is None:
            raise InputError("nothing to compare yet: train first (Train widget) or reopen a project")
        if channels is not None:
            set_selection(self.channels, [int(c) for c in channels])
        if truth != "auto":
            self._reset_truth()
            self.truth.value = self.viewer.layers[truth] if isinstance(truth, str) and truth != FROM_PROJECT else truth
        chosen = self._chosen(project)
        if not chosen:
            raise InputError("no channel selected")
        truth_value = self.truth.value
        if truth_value is not None and truth_value != FROM_PROJECT:
            project = project.with_truth(truth_from_layer(truth_value, project), channels=chosen)
        elif truth_value == FROM_PROJECT and project.lazy and project.truth is not None \
                and (project.metrics is None or self._scored(project) != chosen):
            project = project.with_truth(project.truth, project.mask_hr, channels=chosen)
        elif truth_value is None and project.truth is not None:
            project = dataclasses.replace(project, truth=None, mask_hr=None, metrics=None)
        self.project = project
        if msi_layer.metadata.get(LAYER_METADATA_KEY) is not project:
            msi_layer.metadata = {**msi_layer.metadata, LAYER_METADATA_KEY: project}  # Export saves this one
        reference = self._reference(project)
        # the difference maps are built now, hidden, when not shown: turning them on creates no layer
        self.rows = add_comparison_layers(self.viewer, project, msi_layer, channels=chosen, differences=reference,
                                          grid=bool(self.grid.value), grid_by=self._grid_by,
                                          spare_differences=self._reference(project, shown=False), spares=self._spares)
        # the hidden layers (tiles, difference maps, grid labels) are drawn once now: the toggles then show them at once
        hidden = [*(lay for row in self.rows.values() for lay in row), *(lay for ls in self._spares.values() for lay in ls)]
        self._warm_up([*hidden, *(self.viewer.layers[n] for n in (LABELS_NAME,) if n in self.viewer.layers)])
        self._fill_metrics(project, chosen)
        self.segment_method.reset_choices()
        n = sum(len(r) for r in self.rows.values())
        scored = "; scored against the ground truth" if project.metrics else ""
        if project.lazy:
            n_ch = len(project.channel_names)
            self.status.value = (
                f"{n} layers of all {n_ch} channels at {project.sr_pixel_size_um:g} µm (MSI "
                f"{project.msi_pixel_size_um:g} µm / F = {project.factor}), read from disk one channel at a time: "
                f"move the channel slider to browse them. Many channels: the stacks are not loaded whole; metrics, "
                f"pixel values and segments use the {len(chosen)} selected channel(s) (at most "
                f"{LAZY_SCORED_CHANNELS}){scored}.")
            return self.rows
        self.status.value = (f"{n} layers for {len(chosen)} channel(s) at {project.sr_pixel_size_um:g} µm "
                             f"(MSI {project.msi_pixel_size_um:g} µm / F = {project.factor}){scored}.")
        return self.rows

    def _chosen(self, project: Project) -> list[int]:
        """The selected channels; for a lazy project at most ``LAZY_SCORED_CHANNELS`` of them."""
        chosen = sorted(int(c) for c in self.channels.value)
        return chosen[:LAZY_SCORED_CHANNELS] if project.lazy else chosen

    @staticmethod
    def _scored(project: Project) -> list[int] | None:
        first = next(iter((project.metrics or {}).values()), None)
        return None if not isinstance(first, dict) else first.get("scored_channels")

    def _reference(self, project: Project, *, shown: bool = True) -> str | None:
        """The reference of the difference maps (None: no difference maps; ``shown=False``: even when off)."""
        reference = self.reference.value if self.differences.value or not shown else None
        if reference == "truth" and project.truth is None:
            reference = "bicubic" if "bicubic" in project.sr else None
        if reference is not None and reference not in ("truth", *project.sr):
            reference = None
        return reference

    def _on_reference(self, *_: Any) -> None:
        if not getattr(self, "_setting_reference", False):
            self._reference_by_user = True  # a choice made in the widget stays
        if self.differences.value:
            self._update_differences()
        else:
            self._renew_spares()

    def _renew_spares(self) -> None:
        """A new reference while the maps are off: their hidden layers are made (and drawn) now, not at the toggle."""
        project, msi = self.project, self.source.value
        if not self.rows or not self._spares or project is None or msi is None or project.lazy:
            return
        reference = self._reference(project, shown=False)
        if reference is None or all(lay.metadata.get("reference") == reference
                                    for layers in self._spares.values() for lay in layers):
            return
        try:
            set_differences(self.viewer, project, msi, self.rows, reference, grid=bool(self.grid.value),
                            grid_by=self._grid_by, spares=self._spares, shown=False)
        except Exception as exc:  # noqa: BLE001 - shown to the user
            self._on_error(exc)
            return
        self._warm_up([lay for layers in self._spares.values() for lay in layers])

    def _warm_up(self, layers: list) -> None:
        """:func:`warm_up`, a speed-up only: should a GL call fail, the first toggle draws the layers (logged)."""
        try:
            warm_up(self.viewer, layers)
        except Exception:  # noqa: BLE001
            logging.getLogger(__name__).warning("Compare: drawing the hidden layers in advance failed", exc_info=True)

    def _default_reference(self) -> None:
        """Difference maps reference the ground truth when one is chosen (else BI), unless picked by hand."""
        if self._reference_by_user:
            return
        wanted = "truth" if self.truth.value is not None else "bicubic"
        if self.reference.value != wanted:
            self._setting_reference = True
            try:
                self.reference.value = wanted
            finally:
                self._setting_reference = False

    def _refresh_if_shown(self) -> None:
        if self.rows:
            self.show_results(self.project)

    def _update_differences(self) -> None:
        """Difference maps on or off (or a new reference): only the difference layers change."""
        project, msi = self.project, self.source.value
        if not self.rows or project is None or msi is None or project.lazy \
                or any(lay not in self.viewer.layers for row in self.rows.values() for lay in row):
            self._refresh_if_shown()
            return
        if any(lay not in self.viewer.layers for layers in self._spares.values() for lay in layers):
            with _batched(self.viewer):  # one was deleted by hand: the maps are made again
                for layer in [lay for layers in self._spares.values() for lay in layers if lay in self.viewer.layers]:
                    self.viewer.layers.remove(layer)
            self._spares.clear()
        try:
            set_differences(self.viewer, project, msi, self.rows, self._reference(project),
                            grid=bool(self.grid.value), grid_by=self._grid_by, spares=self._spares)
        except Exception as exc:  # noqa: BLE001 - shown to the user
            self._on_error(exc)

    def set_grid(self, enabled: bool, *, rows: str = "auto") -> None:
        """Grid view or overlay on the H&E.

        ``rows``: ``"channels"`` (one channel per grid row), ``"methods"`` (one method per row) or
        ``"auto"`` (whichever shows the images larger on the canvas).
        """
        self._grid_by = rows
        if bool(self.grid.value) != enabled:
            self.grid.value = enabled  # calls back here through the checkbox
            return
        arrange(self.viewer, self.rows, grid=enabled, grid_by=rows, label_slots=_label_slots(self.rows, self._spares))

    @property
    def tiles(self) -> dict[tuple[int, int], Any]:
        """Grid view: ``{(tile row, tile col): layer}`` of the shown layers (empty for the overlay)."""
        return {lay.metadata["grid_tile"]: lay for row in self.rows.values() for lay in row
                if lay.metadata.get("grid_tile") is not None}

    def _fill_metrics(self, project: Project, channels: Sequence[int]) -> None:
        table = self.metrics_table
        labels = [channel_label(k, project.channel_names, project.mz) for k in range(len(project.channel_names))]
        guidance = project.guidance or {}
        if not project.metrics:  # no ground truth: SMSDL's histology gain per channel is all there is to show
            rows = [(method_label(m), labels[c], *([np.nan] * len(METRIC_COLUMNS)), m, c)
                    for m in ordered_methods(guidance) for c in channels]
            rows += [(method_label(m), "all channels", *([np.nan] * len(METRIC_COLUMNS)), m, None)
                     for m in ordered_methods(guidance)]
        else:
            metrics = {m: project.metrics[m] for m in ordered_methods(project.metrics)}
            mean_label = "mean (all channels)"
            scored = self._scored(project)
            if scored is not None:  # lazy: only some channels were scored
                channels = [c for c in channels if c in scored]
                mean_label = f"mean ({len(scored)} scored channels)"
            rows = []
            for method in metrics:  # metrics_rows gives each method its channels, then its mean
                part = metrics_rows({method: metrics[method]}, labels, channels, columns=METRIC_COLUMNS,
                                    mean_label=mean_label)
                rows += [(*r, method, c) for r, c in zip(part, [*channels, None], strict=False)]
        table.setRowCount(len(rows))
        for i, row in enumerate(rows):
            *values, method, channel = row
            gain, used = guidance_cells(guidance.get(method), channel) if method in guidance else ("—", "—")
            cells = (values[0], values[1], *(_fmt(v) for v in values[2:]), gain, used)
            for j, text in enumerate(cells):
                item = QTableWidgetItem(text)
                if j >= 2:
                    item.setTextAlignment(int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter))
                table.setItem(i, j, item)
        fit_table(table)

    # ------------------------------------------------------------------ pixel values
    def _on_click(self, viewer, event) -> None:
        if self.project is None or event.type != "mouse_press":
            return
        try:
            self.inspect_pixel(tuple(event.position)[-2:])
        except RuntimeError:  # the widget was closed: stop listening
            if self._on_click in viewer.mouse_drag_callbacks:
                viewer.mouse_drag_callbacks.remove(self._on_click)

    def inspect_pixel(self, world_rc_um: Sequence[float]) -> dict | None:
        """Values of every method at the SR pixel under a world point (row, col) in µm, and its LR pixel."""
        project, msi = self.project, self.source.value
        if project is None or msi is None:
            return None
        world_rc_um = self._untiled(world_rc_um)
        hit = locate_pixel(world_rc_um, msi_scale_rc=_last2(msi.scale), msi_translate_rc=_last2(msi.translate),
                           lr_shape_rc=project.lr_msi.shape[1:], factor=project.factor)
        if hit is None:
            self.pixel_label.value = "Outside the MSI field of view."
            self.pixel_table.setRowCount(0)
            self.picked = None
            return None
        chans = self._chosen(project) or list(range(len(project.channel_names)))
        if project.lazy:  # the channel on show first, then the selected ones
            shown = shown_channel(self.viewer)
            chans = [shown] + [c for c in chans if c != shown] if 0 <= shown < len(project.channel_names) else chans
            chans = chans[:LAZY_SCORED_CHANNELS]
        values = pixel_values(project, hit, chans)
        self.picked = {"hit": hit, "channels": chans, "values": values}
        self._fill_pixel_table(project, hit, chans, values)
        self._mark_pixel(hit)
        return self.picked

    def _untiled(self, world_rc_um: Sequence[float]) -> np.ndarray:
        """A point on a grid tile mapped back to the layers' own placement (unchanged outside the grid)."""
        point = np.asarray(world_rc_um, float)[-2:]
        for layer in (lay for row in self.rows.values() for lay in row):
            offset = (np.asarray(layer.translate, float) - _home(layer))[-2:]
            if not offset.any():
                continue
            corner = np.asarray(layer.translate, float)[-2:] - _last2(layer.scale) / 2
            if np.all(point >= corner) and np.all(point < corner + _extent_rc(layer)):
                return point - offset
        return point

    def _fill_pixel_table(self, project: Project, hit: PixelHit, chans: list[int], values: dict) -> None:
        headers = ["channel", *(method_label(k) + (f" {hit.lr_rc}" if k == "lr" else "") for k in values)]
        table = self.pixel_table
        table.setColumnCount(len(headers))
        table.setHorizontalHeaderLabels(headers)
        table.setRowCount(len(chans))
        for i, c in enumerate(chans):
            cells = [channel_label(c, project.channel_names, project.mz), *(_fmt(v[i]) for v in values.values())]
            for j, text in enumerate(cells):
                item = QTableWidgetItem(text)
                if j:
                    item.setTextAlignment(int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter))
                table.setItem(i, j, item)
        table.resizeColumnsToContents()
        y, x = hit.world_rc_um
        self.pixel_label.value = (f"SR pixel (row {hit.sr_rc[0]}, col {hit.sr_rc[1]}) at ({y:.1f}, {x:.1f}) µm, "
                                  f"from MSI pixel (row {hit.lr_rc[0]}, col {hit.lr_rc[1]}).")

    def _mark_pixel(self, hit: PixelHit) -> None:
        """Outline the picked SR pixel and the MSI pixel it came from (a Shapes layer)."""
        from napari.layers import Shapes

        msi = self.source.value
        s, t = _last2(msi.scale), _last2(msi.translate)
        corner = t - s / 2
        cell = s / self.project.factor
        sr0 = corner + np.asarray(hit.sr_rc) * cell
        lr0 = corner + np.asarray(hit.lr_rc) * s
        boxes = [np.array([sr0, sr0 + cell]), np.array([lr0, lr0 + s])]
        rects = [np.array([[a[0], a[1]], [a[0], b[1]], [b[0], b[1]], [b[0], a[1]]]) for a, b in boxes]
        if PICK_NAME in self.viewer.layers:
            layer = self.viewer.layers[PICK_NAME]
            layer.data = rects
        else:
            layer = Shapes(rects, shape_type="rectangle", name=PICK_NAME, edge_color=["cyan", "white"],
                           face_color="transparent", edge_width=max(cell[0] / 6, 0.5))
            self.viewer.layers.append(layer)
        layer.edge_color = ["cyan", "white"]
        layer.visible = not self.grid.value  # in grid view it would take a grid cell of its own

    # ------------------------------------------------------------------ segments
    def segment(self, n_segments: int | None = None, *, method: str | None = None):
        """k-means tissue segments of an SR stack as a Labels layer (returned)."""
        from napari.layers import Labels

        try:
            project, msi = self.project, self.source.value
            if project is None or msi is None:
                raise InputError("show a reconstruction first")
            if n_segments is not None:
                self.n_segments.value = int(n_segments)
            if method is not None:
                self.segment_method.value = method
            method = self.segment_method.value or next(iter(project.sr))
            stack = project.sr[method]
            if project.lazy:  # many channels: segment on the selected ones, never the whole stack
                stack = read_channels(stack, self._chosen(project) or [shown_channel(self.viewer)])
            labels = cluster_segments(stack, n_segments=int(self.n_segments.value),
                                      mask=tissue_mask_sr(project), seed=project.settings.seed)
        except Exception as exc:  # noqa: BLE001
            self._on_error(exc)
            return None
        name = f"{PREFIX}segments ({method_label(method)}, k={int(self.n_segments.value)})"
        for old in [lay for lay in self.viewer.layers if lay.name.startswith(PREFIX + "segments")]:
            self.viewer.layers.remove(old)
        layer = Labels(labels, name=name, opacity=0.5,
                       **refined_placement(_last2(msi.scale), _last2(msi.translate), project.factor),
                       metadata={"role": "segments", "method": method})
        self.viewer.layers.append(layer)
        sizes = np.bincount(labels.ravel())[1:]
        self.status.value = f"{len(sizes)} segments of the {method_label(method)} stack; pixels per segment: " + \
            ", ".join(str(int(v)) for v in sizes) + "."
        return layer
