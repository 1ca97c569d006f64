"""A small matplotlib canvas widget shared by the dock widgets' plots."""

from __future__ import annotations

from qtpy.QtWidgets import QSizePolicy, QVBoxLayout, QWidget


class PlotCanvas(QWidget):
    """One matplotlib axes on a Qt canvas, 4 × 1.8 in, at least 150 px high."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(4, 1.8), layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(150)
        self.canvas.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        self.axes = self.figure.add_subplot()
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas)

    def _show_text(self, text: str) -> None:
        """Clear the axes, hide them and write ``text`` (if any) in grey in the middle."""
        ax = self.axes
        ax.clear()
        ax.set_axis_off()
        if text:
            ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")
        self.canvas.draw_idle()
