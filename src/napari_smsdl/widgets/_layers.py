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
