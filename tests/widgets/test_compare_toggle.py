"""Compare's view toggles are one batch: napari rebuilds its scene once per toggle, not once per layer.

Grid view and difference maps on the (cropped) sample after a real fast-preset training of every
method. The bound is on work, not on time: the number of scene-graph rebuilds of napari's canvas
(``VispyCanvas._reorder_layers`` runs once per rebuild) and of layers created per toggle. Before
the batching, turning on difference maps in grid view rebuilt the scene 131 times for 50 layers.
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
    rebuilds = _count_rebuilds(viewer)

    compare.grid.value = True  # 18 layers move into tiles, every other layer is hidden
    assert rebuilds["n"] <= 2 and len(compare.tiles) == 18
    assert inserted == [LABELS_NAME]  # nothing rebuilt: the same layers, tiled

    rebuilds["n"], inserted[:] = 0, []
    compare.differences.value = True  # + 4 difference maps per channel, the 18 others stay as they are
    assert rebuilds["n"] <= 2
    assert [lay for row in compare.rows.values() for lay in row[:6]] == comparison
    added = [name for name in inserted if name != LABELS_NAME]  # the labels follow the new column count
    assert len(added) == 3 * 4 and len(compare.tiles) == 30
    assert all(lay.visible for lay in compare.tiles.values())
    # the ground truth is chosen (the sample's): the maps are method − ground truth
    assert all(name.split(" · ")[0].endswith("− ground truth") for name in added)

    rebuilds["n"], inserted[:] = 0, []
    compare.differences.value = False
    assert rebuilds["n"] <= 2 and set(inserted) <= {LABELS_NAME} and len(compare.tiles) == 18

    rebuilds["n"] = 0
    compare.grid.value = False
    assert rebuilds["n"] <= 2 and not compare.tiles and compare.last_error is None
    assert not viewer.layers[LABELS_NAME].visible
