"""Baselines the SMSDL-Net reconstruction is compared against, on the same inputs and SR grid.

* :func:`bicubic_upsample` — bicubic (Keys, a = −0.5) interpolation, pixel-centre aligned.
* :func:`backprojection_upsample` — the H&E-free control: bicubic + iterative back-projection to
  the block means; :func:`conserve` is that conservation step, shared by every guided method.
* :func:`train_deepfere` — a DeepFERE-style CNN (Guo et al., Anal. Chem. 2023, 95:9714), made
  stable; see ``docs/cnn-baseline.md``. Imports torch, so it is loaded lazily on first access.
* :func:`block_average` — the benchmark's degradation (mean over each F×F block of tissue pixels).

Grids: the low-resolution (LR) MSI has shape (h, w); the super-resolved (SR) grid has shape
(h·F, w·F) and LR pixel (i, j) covers exactly the SR block [i·F, (i+1)·F) × [j·F, (j+1)·F).
"""

from __future__ import annotations

from typing import Any

from .backprojection import Conservation, backprojection_upsample, conserve
from .bicubic import bicubic_upsample
from .grid import block_average, fill_nearest_tissue, upsample_mask

__all__ = [
    "Conservation",
    "backprojection_upsample",
    "conserve",
    "DeepFereConfig",
    "DeepFereResult",
    "Preset",
    "bicubic_upsample",
    "block_average",
    "fill_nearest_tissue",
    "train_deepfere",
    "upsample_mask",
]

_LAZY = {"train_deepfere", "DeepFereResult", "DeepFereConfig", "Preset"}


def __getattr__(name: str) -> Any:  # PEP 562: keep torch out of `import napari_smsdl.reconstruction.baselines`
    if name in _LAZY:
        from . import deepfere

        return getattr(deepfere, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
