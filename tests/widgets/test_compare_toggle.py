"""Compare's view toggles are one batch: napari rebuilds its scene once per toggle, not once per layer.

Grid view and difference maps on the (cropped) sample after a real fast-preset training of every
method. The bound is on work, not on time: the number of scene-graph rebuilds of napari's canvas
(``VispyCanvas._reorder_layers`` runs once per rebuild), of napari's dims recomputations (each
``translate`` of a tiled layer recomputes every layer's extent and the dims range, unless batched)
and of layers created per toggle. Before the batching, turning on difference maps in grid view
rebuilt the scene 131 times for 50 layers.
"""

from __future__ import annotations

import pytest

from napari_smsdl.widgets.compare import LABELS_NAME, CompareWidget
from napari_smsdl.widgets.train import TrainWidget

from .test_train_compare import TINY, _wait, sample_viewer  # noqa: F401 (the fixture)

pytestmark = pytest.mark.gui


def _count_rebuilds(viewer) -> dict:
    """Count napari's scene-graph rebuilds (a spy on the canvas method every rebuild calls)."""
    canvas = viewer.window._qt_viewer.canvas
    count = {"n": 0}
    original = canvas._reorder_layers

    def counted(*args, **kwargs):
        count["n"] += 1
        return original(*args, **kwargs)

    canvas._reorder_layers = counted
    return count


def _count_dims_updates(viewer) -> dict:
    """Count the changes of napari's dims range (one per recomputation that moved the world extent)."""
    count = {"n": 0}
    viewer.dims.events.range.connect(lambda *_: count.__setitem__("n", count["n"] + 1))
    return count


def test_grid_and_difference_toggles_rebuild_the_scene_once(sample_viewer, qtbot, tmp_path):
    viewer = sample_viewer
    train, compare = TrainWidget(viewer), CompareWidget(viewer)
    qtbot.addWidget(train)
    qtbot.addWidget(compare)
    train.channels.value = [0, 2, 4]
    train.start(TINY, cache_dir=tmp_path / "cache")
    _wait(qtbot, train)
    assert train.last_error is None, train.last_error
    assert len(compare.rows) == 3 and all(len(row) == 6 for row in compare.rows.values())
    comparison = [lay for row in compare.rows.values() for lay in row]
    inserted = []
    viewer.layers.events.inserted.connect(lambda event: inserted.append(event.value.name))
    removed = []
    viewer.layers.events.removed.connect(lambda event: removed.append(event.value.name))
    # the difference maps were made with the comparison, hidden: 4 per channel, none shown yet
    spares = [lay for lay in viewer.layers if lay.metadata.get("role") == "difference"]
    assert len(spares) == 3 * 4 and not any(lay.visible for lay in spares)
    rebuilds, dims = _count_rebuilds(viewer), _count_dims_updates(viewer)

    compare.grid.value = True  # 18 layers move into tiles, every other layer is hidden
    assert rebuilds["n"] <= 2 and len(compare.tiles) == 18
    assert dims["n"] <= 2  # one recomputation for the 18 moves, not one per move
    assert inserted == []  # nothing made: the same layers, tiled, and the labels made hidden with them

    rebuilds["n"], dims["n"], inserted[:] = 0, 0, []
    compare.differences.value = True  # the 12 hidden difference maps join the rows, the 18 others stay
    assert rebuilds["n"] <= 2 and dims["n"] <= 2
    assert [lay for row in compare.rows.values() for lay in row[:6]] == comparison
    assert inserted == [] and removed == []  # no layer made or removed: the labels are renamed in place
    shown = [lay for lay in compare.tiles.values() if lay.metadata.get("role") == "difference"]
    assert len(compare.tiles) == 30 and set(map(id, shown)) == set(map(id, spares))
    assert all(lay.visible for lay in compare.tiles.values())
    # the ground truth is chosen (the sample's): the maps are method − ground truth
    assert all(lay.name.split(" · ")[0].endswith("− ground truth") for lay in shown)
    labels = [t for t in viewer.layers[LABELS_NAME].features["label"] if t]
    assert sum(t.endswith("− truth") for t in labels) == 4  # the new columns are named on the canvas (short)

    rebuilds["n"], dims["n"] = 0, 0
    compare.differences.value = False  # back to the pool, hidden
    assert rebuilds["n"] <= 2 and dims["n"] <= 2 and inserted == [] and removed == []
    assert len(compare.tiles) == 18 and not any(lay.visible for lay in spares)

    rebuilds["n"], dims["n"] = 0, 0
    compare.grid.value = False
    assert rebuilds["n"] <= 2 and dims["n"] <= 2 and not compare.tiles and compare.last_error is None
    assert not viewer.layers[LABELS_NAME].visible and inserted == [] and removed == []

    compare.reference.value = "bicubic"  # a new reference: the maps are made again (when shown)
    compare.differences.value = True
    names = [lay.name for row in compare.rows.values() for lay in row if lay.metadata.get("role") == "difference"]
    assert len(names) == 3 * 3 and all(" − BI · " in n for n in names) and compare.last_error is None
