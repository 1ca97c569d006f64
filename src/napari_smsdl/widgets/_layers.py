"""Shared layer plumbing of the dock widgets: the H&E / MSI layer choice."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def _last2(values: Sequence[float]) -> np.ndarray:
    """The last two entries (row, col) of a layer's scale or translate, as floats."""
    return np.asarray(values, float)[-2:]


class HeMsiLayers:
    """Mixin for a widget with ``he_layer`` and ``msi_layer`` combo boxes and ``_sync_enabled()``."""

    def set_layers(self, he: Any = None, msi: Any = None) -> None:
        """Choose the H&E and MSI layers (by layer or name); Register fills its pixel sizes from their scales."""
        if he is not None:
            self.he_layer.value = self.viewer.layers[he] if isinstance(he, str) else he
        if msi is not None:
            self.msi_layer.value = self.viewer.layers[msi] if isinstance(msi, str) else msi
        self._sync_enabled()


def set_selection(select: Any, values: Sequence[Any]) -> None:
    """Select ``values`` in a magicgui ``Select`` in one pass (thousands of channels).

    ``select.value = values`` checks every value against the recomputed list of choices, which takes
    seconds for a few thousand channels; this sets the Qt items directly and emits ``changed`` once.
    """
    from qtpy.QtCore import QItemSelection, QItemSelectionModel, Qt

    wanted = set(values)
    native = select.native
    model = native.selectionModel()
    chosen = QItemSelection()
    found = set()
    for i in range(native.count()):
        value = native.item(i).data(Qt.ItemDataRole.UserRole)
        if value in wanted:
            index = native.model().index(i, 0)
            chosen.select(index, index)
            found.add(value)
    missing = [v for v in values if v not in found]
    if missing:  # as magicgui's own setter does: never select less than asked, silently
        from ..errors import InputError

        raise InputError(f"not among the {native.count()} choices of {select.label!r}: {missing[:5]}"
                         f"{' …' if len(missing) > 5 else ''}")
    native.blockSignals(True)
    try:
        model.select(chosen, QItemSelectionModel.SelectionFlag.ClearAndSelect)
    finally:
        native.blockSignals(False)
    select.changed.emit(select.value)
