"""The single-dock flow: five steps in one dock that fits a 1,000 px screen, with Back and Next."""

from __future__ import annotations

import pytest

from napari_smsdl.widgets.flow import STEPS, FlowWidget

from .test_train_compare import sample_viewer  # noqa: F401 (the fixture)

pytestmark = pytest.mark.gui


def test_one_dock_for_the_whole_flow_fits_the_screen(sample_viewer, qtbot):
    viewer = sample_viewer
    flow = FlowWidget(viewer)
    dock = viewer.window.add_dock_widget(flow, name="SMSDL flow", area="right")
    viewer.window._qt_window.resize(1600, 1000)
    viewer.window.show()
    qtbot.waitExposed(viewer.window._qt_window)
    assert flow.step == "Load" and not flow.back_button.isEnabled()
    # every step fits: the dock asks for at most ~900 px whatever the page (the pages scroll)
    for step in STEPS:
        flow.go_to(step)
        qtbot.wait(10)
        assert flow.sizeHint().height() <= 900 and flow.minimumSizeHint().height() <= 900
        assert dock.sizeHint().height() <= 900 and dock.minimumSizeHint().height() <= 900
    assert viewer.window._qt_window.height() <= 1000
    # step names are not cut: each button is at least as wide as its text
    for button in flow.step_buttons:
        assert button.width() >= button.fontMetrics().horizontalAdvance(button.text())
    # the pages are the single widgets, wired to the same viewer
    assert flow.page("Train") is flow.train and flow.train.he_layer.value.name == "sample H&E"
    assert flow.page("Register").he_pixel_size.value == pytest.approx(2.5)
    flow.go_to("Load")
    flow.next_button.click()
    assert flow.step == "Register" and flow.back_button.isEnabled()
    flow.back_button.click()
    assert flow.step == "Load"
    flow.step_buttons[4].click()
    assert flow.step == "Export" and not flow.next_button.isEnabled()
    flow.go_to("Train")
    flow.train.trained.emit(None)  # a finished run moves the flow on to Compare
    assert flow.step == "Compare"
