"""Status lines follow the state, and Register's pixel sizes come from the layers (issue 17)."""

from __future__ import annotations

import threading

import pytest

from napari_smsdl.widgets.export import ExportWidget
from napari_smsdl.widgets.register import RegisterWidget
from napari_smsdl.widgets.train import TrainWidget

from .test_train_compare import MSI, TINY, _wait, sample_viewer  # noqa: F401 (the fixture)

pytestmark = pytest.mark.gui


def test_register_pixel_sizes_come_from_the_layers_and_a_typed_one_is_flagged(sample_viewer, qtbot, monkeypatch):
    from napari.utils.notifications import notification_manager

    register = RegisterWidget(sample_viewer)
    qtbot.addWidget(register)
    assert register.he_layer.value.name == "sample H&E" and register.msi_layer.value.name == MSI
    assert register.he_pixel_size.value == pytest.approx(2.5)  # the layer's scale, not the 1.0 default
    assert register.msi_pixel_size.value == pytest.approx(40.0)
    assert register.pixel_size_warnings() == [] and not (not register.pixel_warning.native.isHidden())

    register.he_pixel_size.value = 1.0  # typed: disagrees with the layer, flagged before any run
    assert (not register.pixel_warning.native.isHidden())
    assert "H&E pixel 1 µm typed, but layer 'sample H&E' is drawn at 2.5 µm" in register.pixel_warning.value
    messages = []
    notification_manager.notification_ready.connect(lambda n: messages.append(str(n.message)))
    monkeypatch.setenv("SMSDL_NOTHREADS", "1")
    register.bspline.value = False
    register.refine_affine.value = False
    register.run()
    assert any("drawn at 2.5 µm" in m for m in messages)  # said when it ran, not silently
    register.he_pixel_size.value = 2.5  # back to the layer's: the warning goes
    assert not (not register.pixel_warning.native.isHidden()) and register.pixel_warning.value == ""


def test_final_status_lines_follow_the_state(sample_viewer, qtbot, tmp_path, monkeypatch):
    viewer = sample_viewer
    register, train, export = RegisterWidget(viewer), TrainWidget(viewer), ExportWidget(viewer)
    for w in (register, train, export):
        qtbot.addWidget(w)
    assert train.use_registration.text == "use accepted registration (none)"
    assert export.status.value.startswith("Train (and Compare) first")

    # Accept: Train's checkbox follows at once (the registration arrives as a metadata change)
    monkeypatch.setenv("SMSDL_NOTHREADS", "1")
    register.bspline.value = False
    register.refine_affine.value = False
    register.run()
    assert register.last_error is None, register.last_error
    assert register.status.value.endswith("Accept or Revert.")
    register.accept()
    assert train.use_registration.text == "use accepted registration" and train.use_registration.enabled
    register.revert()
    assert train.use_registration.text == "use accepted registration (none)"
    monkeypatch.delenv("SMSDL_NOTHREADS")

    # Train on a worker: the last line is the summary, even with progress queued behind the result
    worker = train.start(TINY, methods=["bicubic", "backprojection"], cache_dir=tmp_path / "cache")
    assert worker is not None
    _wait(qtbot, train)
    assert train.last_error is None, train.last_error
    summary = train.status.value
    assert summary.startswith("Done in ") and summary.endswith("Open Compare to look at the results.")
    late = threading.Thread(target=train._relay.progressed.emit, args=("back-projection", 3, 10))
    late.start()
    late.join()
    qtbot.wait(100)  # the queued progress signal is delivered now, after the result
    assert train.status.value == summary and not train.progress_bars

    # Export no longer asks to train first
    assert export.status.value == f"Ready: export the results of {MSI!r} or save them as a project."
    assert export.export_button.enabled


def test_start_leaves_the_preparation_to_the_worker(sample_viewer, qtbot, tmp_path, monkeypatch):
    """Start returns once the worker is started: reading the layers and the imports run on it."""
    from napari_smsdl.widgets import train as train_module

    threads = []
    original = train_module.prepare_inputs

    def spy(*args, **kwargs):  # the real preparation, recording the thread it runs in
        threads.append(threading.current_thread())
        return original(*args, **kwargs)

    monkeypatch.setattr(train_module, "prepare_inputs", spy)
    train = TrainWidget(sample_viewer)
    qtbot.addWidget(train)
    worker = train.start(TINY, methods=["bicubic"], cache_dir=tmp_path / "cache")
    assert worker is not None and train.busy
    # nothing was prepared in the main thread during start() (the worker may already be at it)
    assert all(t is not threading.main_thread() for t in threads)
    _wait(qtbot, train)
    assert train.last_error is None, train.last_error
    assert len(threads) == 1 and threads[0] is not threading.main_thread()
    assert set(train.project.sr) == {"bicubic"}
