"""The **SMSDL flow** dock widget: Load → Register → Train → Compare → Export in one dock, as steps.

Docking the five widgets one by one stacks them (a 3,500 px tall column on a 1,000 px screen).
This one holds the same five widgets, unchanged, as the pages of a step panel: a row of step
buttons (the step names are never cut), one page shown at a time inside a scroll area, and
**Back** / **Next** below. Each page is the single widget itself, so every action and test of the
single widgets applies here too (``flow.train.start(...)``).

::

    flow = FlowWidget(viewer)
    flow.go_to("Train")     # or flow.next_step()
    flow.train.start()
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qtpy.QtWidgets import (
    QButtonGroup,
    QFrame,
    QHBoxLayout,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QStackedWidget,
    QVBoxLayout,
    QWidget,
)

if TYPE_CHECKING:
    import napari

STEPS = ("Load", "Register", "Train", "Compare", "Export")
#: Most height the dock asks for (px): it fits a 1,000 px screen with napari's menus and title bar.
MAX_HEIGHT_HINT = 760


class FlowWidget(QWidget):
    """One dock for the whole flow: five steps, one shown at a time, with Back and Next.

    Attributes
    ----------
    load, register, train, compare, export
        The single widgets that make up the steps.
    step : str
        The step shown.
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__()
        from .compare import CompareWidget
        from .export import ExportWidget
        from .load import LoadWidget
        from .register import RegisterWidget
        from .train import TrainWidget

        self.viewer = napari_viewer
        self.load = LoadWidget(napari_viewer)
        self.register = RegisterWidget(napari_viewer)
        self.train = TrainWidget(napari_viewer)
        self.compare = CompareWidget(napari_viewer)
        self.export = ExportWidget(napari_viewer)
        pages = (self.load, self.register, self.train, self.compare, self.export)

        self.stack = QStackedWidget()
        self.scrolls: list[QScrollArea] = []
        for page in pages:
            scroll = QScrollArea()
            scroll.setWidgetResizable(True)
            scroll.setFrameShape(QFrame.Shape.NoFrame)
            scroll.setWidget(page)
            scroll.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Ignored)
            self.scrolls.append(scroll)
            self.stack.addWidget(scroll)

        self.step_buttons: list[QPushButton] = []
        group = QButtonGroup(self)
        group.setExclusive(True)
        steps_row = QHBoxLayout()
        steps_row.setSpacing(2)
        for i, name in enumerate(STEPS):
            button = QPushButton(f"{i + 1} {name}")
            button.setCheckable(True)
            button.setToolTip(f"Step {i + 1}: {name}")
            button.setMinimumWidth(button.fontMetrics().horizontalAdvance(button.text()) + 16)  # never cut
            button.clicked.connect(lambda _=False, k=i: self.go_to(k))
            group.addButton(button, i)
            steps_row.addWidget(button)
            self.step_buttons.append(button)
        self.back_button = QPushButton("◀ Back")
        self.next_button = QPushButton("Next ▶")
        self.back_button.clicked.connect(lambda: self.go_to(self.stack.currentIndex() - 1))
        self.next_button.clicked.connect(self.next_step)
        nav = QHBoxLayout()
        nav.addWidget(self.back_button)
        nav.addStretch(1)
        nav.addWidget(self.next_button)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addLayout(steps_row)
        layout.addWidget(self.stack, 1)
        layout.addLayout(nav)
        # a finished run moves the flow on: Train → Compare
        self.train.trained.connect(lambda *_: self.go_to("Compare"))
        self.go_to(0)

    @property
    def step(self) -> str:
        return STEPS[self.stack.currentIndex()]

    def page(self, step: str | int) -> QWidget:
        """The single widget of a step (by name or index)."""
        index = STEPS.index(step) if isinstance(step, str) else int(step)
        return self.scrolls[index].widget()

    def go_to(self, step: str | int) -> None:
        """Show a step (by name or index; out-of-range indices are clamped)."""
        index = STEPS.index(step) if isinstance(step, str) else min(max(int(step), 0), len(STEPS) - 1)
        self.stack.setCurrentIndex(index)
        self.step_buttons[index].setChecked(True)
        self.back_button.setEnabled(index > 0)
        self.next_button.setEnabled(index < len(STEPS) - 1)
        self.next_button.setText("Next ▶" if index == len(STEPS) - 1 else f"Next: {STEPS[index + 1]} ▶")

    def next_step(self) -> None:
        self.go_to(self.stack.currentIndex() + 1)

    def sizeHint(self):
        hint = super().sizeHint()
        hint.setHeight(min(hint.height(), MAX_HEIGHT_HINT))
        return hint

    def minimumSizeHint(self):
        hint = super().minimumSizeHint()
        hint.setHeight(min(hint.height(), MAX_HEIGHT_HINT))
        return hint
