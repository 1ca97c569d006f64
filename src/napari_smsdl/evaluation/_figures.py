"""Comparison figures (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ._comparison import method_label, ordered_methods


def figure_columns(stacks: dict, *, truth: np.ndarray | None = None, lr: np.ndarray | None = None) -> list:
    """The figure's columns, left to right, as ``(title, stack)``: LR, ground truth, every method in
    :data:`~napari_smsdl.evaluation._comparison.METHOD_ORDER` (titled by ``METHOD_LABELS``, so the
    H&E-free control reads "BI + back-projection (H&E-free)"), then |method − truth| per method."""
    names = ordered_methods(stacks)
    columns = ([("LR input", lr)] if lr is not None else []) + ([("ground truth", truth)] if truth is not None else [])
    columns += [(method_label(n), stacks[n]) for n in names]
    if truth is not None:
        columns += [(f"|{method_label(n)} - truth|", np.abs(stacks[n] - truth)) for n in names]
    return columns


def comparison_figure(
    path: str | os.PathLike,
    stacks: dict,
    *,
    truth: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    channel_names: Sequence[str] | None = None,
    lr: np.ndarray | None = None,
    max_channels: int = 6,
) -> Path:
    """One row per channel: (LR), ground truth, each method, and |error| maps when truth exists.

    The columns are :func:`figure_columns`: SMSDL, BI, the H&E-free control ("BI + back-projection
    (H&E-free)") and the CNN, whichever of them ``stacks`` holds.

    Every image of a row shares the colour limits of the ground truth (else of the first method),
    so brightness differences are real differences.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = ordered_methods(stacks)
    n_ch = min(max_channels, next(iter(stacks.values())).shape[0])
    columns = figure_columns(stacks, truth=truth, lr=lr)
    # long labels (the H&E-free control) on two lines, so neighbouring titles do not overlap
    wrapped = {t: t.replace(" (", "\n(", 1) for t, _ in columns if len(t) > 24}
    fig, axes = plt.subplots(n_ch, len(columns), figsize=(2.2 * len(columns), 2.2 * n_ch), squeeze=False)
    for c in range(n_ch):
        ref = truth[c] if truth is not None else stacks[names[0]][c]
        valid = ref[mask] if mask is not None else ref[np.isfinite(ref)]
        vmax = float(np.percentile(valid, 99.5)) if valid.size else 1.0
        for j, (title, stack) in enumerate(columns):
            ax = axes[c, j]
            image = stack[c]
            if mask is not None and image.shape == mask.shape:
                image = np.where(mask, image, np.nan)
            is_error = title.startswith("|")
            if title in wrapped:
                title = wrapped[title]
            ax.imshow(image, cmap="magma" if is_error else "viridis", vmin=0, vmax=vmax * (0.5 if is_error else 1.0),
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_title(title, fontsize=8)
            if j == 0:
                label = channel_names[c] if channel_names is not None else f"channel {c}"
                ax.set_ylabel(label, fontsize=7)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
