"""Comparison figures (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
import textwrap
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


def nice_length(span: float) -> float:
    """A round scale-bar length (1, 2 or 5 × 10^k) of about a quarter of ``span``."""
    target = max(float(span) / 4.0, 1e-12)
    k = np.floor(np.log10(target))
    return float(max((m * 10 ** k for m in (1, 2, 5) if m * 10 ** k <= target), default=10 ** k))


def _scale_bar(ax, width_px: int, height_px: int, pixel_size_um: float, colour: str = "white") -> None:
    """A scale bar in µm at the bottom right of an image panel (``pixel_size_um`` of that panel)."""
    length_um = nice_length(width_px * pixel_size_um)
    length_px = length_um / pixel_size_um
    x1 = width_px - 0.06 * width_px
    y = height_px - 0.08 * height_px
    ax.plot([x1 - length_px, x1], [y, y], color=colour, lw=2.5, solid_capstyle="butt")
    label = f"{length_um:g} µm" if length_um < 1000 else f"{length_um / 1000:g} mm"
    ax.text(x1 - length_px / 2, y - 0.03 * height_px, label, color=colour, ha="center", va="bottom", fontsize=6)


def _scores(stacks: dict, truth: np.ndarray, mask: np.ndarray | None, n_ch: int) -> dict:
    """Per method and channel: RMSE, SSIM and R² against the truth (the benchmark protocol)."""
    from ._metrics import score_stack

    m = mask if mask is not None else np.ones(truth.shape[-2:], bool)
    out = {}
    for name, stack in stacks.items():
        scored = score_stack(np.asarray(truth[:n_ch], np.float32), np.asarray(stack[:n_ch], np.float32), m)
        out[name] = {k: list(scored[k]["per_channel"]) for k in ("rmse", "ssim", "r2")}
    return out


def comparison_figure(
    path: str | os.PathLike,
    stacks: dict,
    *,
    truth: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    channel_names: Sequence[str] | None = None,
    lr: np.ndarray | None = None,
    max_channels: int = 6,
    he_rgb: np.ndarray | None = None,
    pixel_size_um: float | None = None,
    unit: str = "a.u.",
    dpi: int = 300,
    pdf: bool = True,
) -> Path:
    """The comparison figure, ready for a paper: one row per channel, one column per image.

    Columns: the H&E (``he_rgb``, the registered H&E over the same field, when given), then
    :func:`figure_columns` — (LR), ground truth, SMSDL, BI, the H&E-free control ("BI +
    back-projection (H&E-free)"), the CNN, whichever ``stacks`` holds, and |method − truth| maps
    when there is a ground truth. Every intensity panel of a row shares the colour limits of the
    ground truth (else of the first method), so brightness differences are real; the row's colour
    bars give the intensity in ``unit`` and the |error| in the same unit. With a ground truth each
    method panel carries its RMSE, SSIM and R² on that channel (the benchmark protocol,
    :func:`~napari_smsdl.evaluation.score_stack`). A scale bar in µm (``pixel_size_um``: the SR
    pixel size) sits on the first panel of each row. Rows are labelled with ``channel_names``
    (e.g. "m/z 885.5499"). Outside the tissue ``mask`` every panel has the same white background.

    Written at ``dpi`` as PNG at ``path``, and as a vector PDF beside it when ``pdf``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.gridspec import GridSpec

    names = ordered_methods(stacks)
    first = next(iter(stacks.values()))
    n_ch = min(max_channels, first.shape[0])
    sr_shape = first.shape[-2:]
    columns = figure_columns(stacks, truth=truth, lr=lr)
    intensity = [(t, st) for t, st in columns if not t.startswith("|")]
    errors = [(t, st) for t, st in columns if t.startswith("|")]
    scores = _scores(stacks, truth, mask, n_ch) if truth is not None else {}
    by_title = {method_label(n): n for n in names}
    # long labels (the H&E-free control) on two lines, so neighbouring titles do not overlap
    def wrap(title: str) -> str:
        return title.replace(" (", "\n(", 1) if len(title) > 24 else title

    has_he = he_rgb is not None
    widths = ([1.0] if has_he else []) + [1.0] * len(intensity) + [0.07] + ([0.25] if errors else []) \
        + [1.0] * len(errors) + ([0.07] if errors else [])
    panel_in = 1.55
    fig = plt.figure(figsize=(panel_in * sum(widths) + 0.9, panel_in * n_ch + 0.55), facecolor="white")
    grid = GridSpec(n_ch, len(widths), figure=fig, width_ratios=widths, wspace=0.06, hspace=0.08,
                    left=0.9 / (panel_in * sum(widths) + 0.9), right=0.97, top=1 - 0.45 / (panel_in * n_ch + 0.55),
                    bottom=0.02)
    cmap = matplotlib.colormaps["viridis"].copy()
    cmap.set_bad("white")
    err_cmap = matplotlib.colormaps["magma"].copy()
    err_cmap.set_bad("white")

    def panel(ax, image, title, row, **kw):
        ax.set_facecolor("white")
        im = ax.imshow(image, interpolation="nearest", **kw)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        if row == 0:
            ax.set_title(wrap(title), fontsize=7)
        return im

    for c in range(n_ch):
        ref = truth[c] if truth is not None else stacks[names[0]][c]
        valid = ref[mask] if mask is not None and ref.shape == mask.shape else ref[np.isfinite(ref)]
        vmax = float(np.percentile(valid, 99.5)) if valid.size else 1.0
        vmax = vmax if vmax > 0 else 1.0
        col = 0
        label = channel_names[c] if channel_names is not None and c < len(channel_names) else f"channel {c}"
        label = "\n".join(textwrap.wrap(str(label), 22)[:3])  # long names (m/z + annotation) on a few lines
        if has_he:
            ax = fig.add_subplot(grid[c, col])
            panel(ax, he_rgb, "H&E (registered)", c)
            ax.set_ylabel(label, fontsize=6)
            if pixel_size_um:
                _scale_bar(ax, he_rgb.shape[1], he_rgb.shape[0], pixel_size_um * sr_shape[1] / he_rgb.shape[1], "black")
            col += 1
        im = None
        for j, (title, stack) in enumerate(intensity):
            ax = fig.add_subplot(grid[c, col])
            image = np.asarray(stack[c], np.float32)
            if mask is not None and image.shape == mask.shape:
                image = np.where(mask, image, np.nan)
            im = panel(ax, image, title, c, cmap=cmap, vmin=0, vmax=vmax)
            if j == 0 and not has_he:
                ax.set_ylabel(label, fontsize=6)
            if j == 0 and pixel_size_um and not has_he:  # the H&E panel carries it (black on white)
                _scale_bar(ax, image.shape[1], image.shape[0], pixel_size_um * sr_shape[1] / image.shape[1])
            method = by_title.get(title)
            if method in scores:
                s = scores[method]
                ax.text(0.03, 0.03, f"RMSE {s['rmse'][c]:.3f}\nSSIM {s['ssim'][c]:.3f}\nR² {s['r2'][c]:.3f}",
                        transform=ax.transAxes, fontsize=5, color="white", va="bottom", ha="left",
                        bbox={"boxstyle": "round,pad=0.2", "facecolor": "black", "alpha": 0.55, "lw": 0})
            col += 1
        cax = fig.add_subplot(grid[c, col])
        bar = fig.colorbar(im, cax=cax)
        bar.ax.tick_params(labelsize=5)
        bar.set_label(f"intensity ({unit})", fontsize=5)
        col += 1
        if errors:
            col += 1  # the gap before the error maps
            for title, stack in errors:
                ax = fig.add_subplot(grid[c, col])
                image = np.asarray(stack[c], np.float32)
                if mask is not None and image.shape == mask.shape:
                    image = np.where(mask, image, np.nan)
                im = panel(ax, image, title.replace(" - truth|", " − truth|"), c, cmap=err_cmap, vmin=0,
                           vmax=vmax * 0.5)
                col += 1
            cax = fig.add_subplot(grid[c, col])
            bar = fig.colorbar(im, cax=cax)
            bar.ax.tick_params(labelsize=5)
            bar.set_label(f"|error| ({unit})", fontsize=5)
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=dpi, facecolor="white")
    if pdf:
        tmp_pdf = path.with_name(f".{path.stem}.tmp{os.getpid()}.pdf")
        fig.savefig(tmp_pdf, facecolor="white")
        os.replace(tmp_pdf, path.with_suffix(".pdf"))
    plt.close(fig)
    os.replace(tmp, path)
    return path
