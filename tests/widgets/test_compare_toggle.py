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

    compare.reference.value = "bicubic"  # a new reference while the maps are off: made now, hidden
    assert len(inserted) == 3 * 3 and len(removed) == 3 * 4 and compare.last_error is None
    assert not any(lay.visible for ls in compare._spares.values() for lay in ls)
    inserted[:], removed[:] = [], []
    compare.differences.value = True  # ... so that turning them on still makes and removes nothing
    assert inserted == [] and removed == []
    names = [lay.name for row in compare.rows.values() for lay in row if lay.metadata.get("role") == "difference"]
    assert len(names) == 3 * 3 and all(" − BI · " in n for n in names) and compare.last_error is None


def _synthetic_viewer(make_napari_viewer, qtbot):
    """A shown viewer (GL drawing happens) with a 2-channel, 4-method project on its MSI layer, no training."""
    import numpy as np

    from napari_smsdl.project import LAYER_METADATA_KEY, Project
    from napari_smsdl.reconstruction import Settings

    rng = np.random.default_rng(0)
    project = Project(lr_msi=rng.uniform(1, 10, (2, 8, 6)).astype(np.float32), channel_names=("ζ-ion", "ψ-ion"),
                      msi_pixel_size_um=40.0, he_pixel_size_um=2.5, settings=Settings.preset("fast", factor=4),
                      sr={m: rng.uniform(0, 10, (2, 32, 24)).astype(np.float32)
                          for m in ("smsdl", "bicubic", "backprojection", "cnn")})
    viewer = make_napari_viewer(show=True)
    viewer.add_image(project.lr_msi, scale=(1, 40, 40), translate=(0, 20, 20), name="msi",
                     metadata={LAYER_METADATA_KEY: project})
    compare = CompareWidget(viewer)
    qtbot.addWidget(compare)
    qtbot.wait(50)  # the canvas is on screen: its GL context exists
    return viewer, compare


def _count_first_draws(monkeypatch) -> dict:
    """Count shader programs linked and glyphs rendered (what a layer's first draw costs)."""
    from napari._vispy.utils.qt_font import QtTextureFont
    from vispy.gloo.glir import GlirProgram

    count = {"links": 0, "glyphs": 0}
    link, load = GlirProgram.link_program, QtTextureFont._load_char

    def counted_link(self, *args, **kwargs):
        count["links"] += 1
        return link(self, *args, **kwargs)

    def counted_load(self, *args, **kwargs):
        count["glyphs"] += 1
        return load(self, *args, **kwargs)

    monkeypatch.setattr(GlirProgram, "link_program", counted_link)
    monkeypatch.setattr(QtTextureFont, "_load_char", counted_load)
    return count


def test_show_draws_the_hidden_layers_once_so_the_first_toggles_link_no_shader(make_napari_viewer, qtbot,
                                                                              monkeypatch):
    import napari_smsdl.widgets.compare as compare_module

    viewer, compare = _synthetic_viewer(make_napari_viewer, qtbot)
    count = _count_first_draws(monkeypatch)
    compare.show_results()  # the hidden layers and the grid labels are drawn once, off-screen
    qtbot.wait(10)
    assert count["links"] >= 9 + 6  # the hidden tiles (2 channels × LR + 4 methods, one shown) and 3 maps (− BI) each
    assert count["glyphs"] >= 2  # the labels' text, ζ and ψ (in no other test) among it
    hidden = [lay for lay in viewer.layers if lay.name.startswith(compare_module.PREFIX) and not lay.visible]
    assert len(hidden) == 9 + 6 + 1  # the warm-up left every one of them hidden, in napari and on the canvas
    visuals = viewer.window._qt_viewer.canvas.layer_to_visual
    assert not any(visuals[lay].node.visible for lay in hidden)

    count["links"] = count["glyphs"] = 0
    compare.grid.value = True
    qtbot.wait(10)
    assert count == {"links": 0, "glyphs": 0} and len(compare.tiles) == 10
    compare.differences.value = True
    qtbot.wait(10)
    assert count == {"links": 0, "glyphs": 0} and len(compare.tiles) == 16
    compare.differences.value = compare.grid.value = False
    qtbot.wait(10)
    assert compare.last_error is None

    monkeypatch.setattr(compare_module, "warm_up", lambda *args: 0)
    compare.show_results()  # without the warm-up (new layers): the first grid view links a program per tile
    qtbot.wait(10)
    count["links"] = 0
    compare.grid.value = True
    qtbot.wait(10)
    assert count["links"] >= 9 and compare.last_error is None
