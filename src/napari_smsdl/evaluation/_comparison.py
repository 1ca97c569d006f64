"""Qt-free helpers behind the Train and Compare widgets: grid placement, pixel look-ups, differences,
shared contrast limits, tissue segments.

Lazy SR stacks (a many-channel :class:`~napari_smsdl.project.Project`, zarr arrays) are never read
whole here: :func:`lazy_difference_stacks` builds dask arrays that napari reads one channel at a
time, and :func:`channel_limits` reads the one channel it needs.

World coordinates are napari's, in µm, (row, col) order. The reader's convention places a grid of
pixel size ``s`` with ``scale = s`` and ``translate = s/2`` (top-left corner at 0 µm); here the
MSI layer's actual ``scale``/``translate`` are taken as given, so everything follows the MSI
wherever it sits. MSI pixel (i, j) covers exactly the SR cells [i·F, (i+1)·F) × [j·F, (j+1)·F).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..io import tissue_mask

#: Display labels of the methods (and of the ground truth and the measured MSI).
METHOD_LABELS = {"lr": "LR", "truth": "ground truth", "smsdl": "SMSDL", "bicubic": "BI",
                 "backprojection": "BI + back-projection (H&E-free)", "cnn": "CNN"}


#: Display order of the methods: SMSDL, then BI, the H&E-free control and the CNN.
METHOD_ORDER = ("smsdl", "bicubic", "backprojection", "cnn")


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def ordered_methods(methods) -> list[str]:
    """SMSDL first, then the baselines (BI, the H&E-free control, CNN), then anything else in the given order."""
    rank = {m: i for i, m in enumerate(METHOD_ORDER)}
    return sorted(methods, key=lambda m: rank.get(m, len(METHOD_ORDER)))


def channel_label(index: int, channel_names: Sequence[str], mz: Sequence[float] | None = None) -> str:
    """A short label for a channel: ``"m/z 885.5499"`` when the m/z is known, else its name."""
    if mz is not None and index < len(mz) and mz[index] is not None:
        return f"m/z {float(mz[index]):.4f}"
    return str(channel_names[index])


# ---------------------------------------------------------------------------- histology guidance
def fallback_summary(guidance: dict | None, channel_names: Sequence[str], mz: Sequence[float] | None = None,
                     max_named: int = 20) -> str | None:
    """One sentence naming the channels whose output is the H&E-free control (None without guidance).

    ``guidance`` is :meth:`napari_smsdl.reconstruction.Guidance.to_dict` (``used_histology`` per
    channel); the CLI prints it and the Train widget shows it.
    """
    if not guidance or "used_histology" not in guidance:
        return None
    used = [bool(u) for u in guidance["used_histology"]]
    n = len(channel_names)
    fell = [channel_label(i, channel_names, mz) if i < n else f"channel {i}" for i, u in enumerate(used) if not u]
    head = f"SMSDL used the H&E on {len(used) - len(fell)} of {len(used)} channels"
    # where the LR image was too small for the check of the detail inside a pixel, say that the decision is weaker
    cautions = {"held_out": " (decided by the held-out gain alone: the MSI is too small for the scale-transfer "
                            "check of the detail inside a pixel, so a channel that uses the H&E may still be worse "
                            "than the control)",
                "scale_transfer_per_pixel": " (the MSI is small: the scale-transfer check ran on single-pixel folds, "
                                            "a decision on few pixels)"}
    caution = "" if len(fell) == len(used) else cautions.get(guidance.get("decided_by"), "")
    if not fell:
        return head + "; no channel fell back to the H&E-free control" + caution
    shown = ", ".join(fell[:max_named]) + (f" and {len(fell) - max_named} more" if len(fell) > max_named else "")
    vetoed = sum(bool(v) for v in guidance.get("held_out_veto") or [])
    veto = (f" ({vetoed} of them passed the scale-transfer check but their held-out gain was clearly negative: the "
            "two tests disagree, so the control is kept)") if vetoed else ""
    return f"{head}; fell back to the H&E-free control (BI + back-projection) on: {shown}{veto}{caution}"


def guidance_cells(guidance: dict | None, channel: int | None) -> tuple[str, str]:
    """Table text of one channel's histology gain: (``"gain ± std"``, ``"yes"``/``"no (control)"``).

    A used channel whose output takes only part of the histology's detail (``guidance["weight"]``
    below 1) reads ``"yes (weight 0.62)"``; one the held-out gain vetoed ``"no (control: held-out veto)"``.

    ``channel`` None gives the summary of every channel: the mean gain ± the std of the channels'
    gains, and how many channels use the histology. ``("—", "—")`` without guidance.
    """
    if not guidance or not guidance.get("gain"):
        return "—", "—"
    gain = np.asarray(guidance["gain"], float)
    std = np.asarray(guidance.get("gain_std", [np.nan] * len(gain)), float)
    used = [bool(u) for u in guidance.get("used_histology", [True] * len(gain))]
    if channel is None:
        finite = gain[np.isfinite(gain)]
        if not finite.size:
            return "—", f"{sum(used)}/{len(used)}"
        return f"{finite.mean():.3g} ± {finite.std():.2g}", f"{sum(used)}/{len(used)}"
    c = int(channel)
    if c >= len(gain):
        return "—", "—"
    text = "—" if not np.isfinite(gain[c]) else f"{gain[c]:.3g} ± {std[c]:.2g}"
    if not used[c]:
        vetoed = guidance.get("held_out_veto") or []
        return text, "no (control: held-out veto)" if c < len(vetoed) and vetoed[c] else "no (control)"
    # a used channel takes the share ``weight`` of the histology's detail over the control (1: all of it)
    weights = guidance.get("weight") or []
    w = weights[c] if c < len(weights) and weights[c] is not None else 1.0
    return text, "yes" if not np.isfinite(w) or w >= 0.995 else f"yes (weight {w:.2f})"


# ---------------------------------------------------------------------------- placement
def refined_placement(msi_scale_rc: Sequence[float], msi_translate_rc: Sequence[float], refine: float) -> dict:
    """napari ``scale``/``translate`` (row, col) of the MSI grid refined ``refine`` times.

    The refined grid covers the same area: its pixel (0, 0) shares the top-left corner of MSI
    pixel (0, 0), so pixel centres sit at ``corner + (k + 1/2) · s / refine``.
    """
    s = np.asarray(msi_scale_rc, float)[-2:]
    t = np.asarray(msi_translate_rc, float)[-2:]
    fine = s / float(refine)
    return {"scale": tuple(fine.tolist()), "translate": tuple((t - s / 2 + fine / 2).tolist())}


def placement_transform(
    *,
    msi_scale_rc: Sequence[float],
    msi_translate_rc: Sequence[float],
    msi_pixel_size_um: float,
    he_scale_rc: Sequence[float],
    he_translate_rc: Sequence[float],
    he_pixel_size_um: float,
):
    """The MSI → H&E transform implied by where the two layers sit in the viewer.

    Returns a SimpleITK ``AffineTransform`` from MSI physical (x, y) µm (origin at the centre of
    MSI pixel (0, 0)) to H&E physical (x, y) µm (origin at the centre of H&E pixel (0, 0)), the
    convention of :mod:`napari_smsdl.registration`: what you see overlaid is what is used.
    """
    import SimpleITK as sitk

    sm, tm = np.asarray(msi_scale_rc, float)[-2:], np.asarray(msi_translate_rc, float)[-2:]
    sh, th = np.asarray(he_scale_rc, float)[-2:], np.asarray(he_translate_rc, float)[-2:]
    # per axis a: he_phys = p_h / s_h · (t_m + s_m / p_m · msi_phys − t_h)
    gain_rc = he_pixel_size_um / sh * sm / msi_pixel_size_um
    offset_rc = he_pixel_size_um / sh * (tm - th)
    transform = sitk.AffineTransform(2)
    transform.SetMatrix((float(gain_rc[1]), 0.0, 0.0, float(gain_rc[0])))
    transform.SetTranslation((float(offset_rc[1]), float(offset_rc[0])))
    return transform


def he_level_for_guide(level_rows: Sequence[int], level0_pixel_size_um: float, sr_pixel_size_um: float,
                       max_cell_px: int) -> int:
    """The coarsest H&E pyramid level still fine enough for the guide image.

    The guide samples each SR cell with up to ``max_cell_px`` × ``max_cell_px`` H&E pixels, so a level
    whose pixel size is ≤ SR pixel / ``max_cell_px`` loses nothing; level 0 when none is coarse enough.
    """
    rows0 = float(level_rows[0])
    best = 0
    for k, rows in enumerate(level_rows):
        if level0_pixel_size_um * rows0 / rows <= sr_pixel_size_um / max(1, max_cell_px) * 1.0001:
            best = k
    return best


def transform_to_level(transform, *, level0_pixel_size_um: float, scale: float):
    """An MSI → H&E level-0 transform re-expressed for a pyramid level ``scale`` times smaller.

    Level pixel (0, 0) is centred on level-0 pixel ``(1/scale − 1)/2``, so the level's physical
    space (µm, origin at its pixel (0, 0) centre) is level-0 space shifted by that many level-0 pixels.
    """
    import SimpleITK as sitk

    if scale == 1.0:
        return transform
    offset = (1.0 / scale - 1.0) / 2.0 * level0_pixel_size_um
    composite = sitk.CompositeTransform(2)
    composite.AddTransform(sitk.TranslationTransform(2, (-offset, -offset)))  # applied last
    composite.AddTransform(transform)  # applied first
    return composite


@dataclass(frozen=True)
class PixelHit:
    """Where a world point falls: SR cell (row, col), the MSI pixel it came from, the point in µm."""

    sr_rc: tuple[int, int]
    lr_rc: tuple[int, int]
    world_rc_um: tuple[float, float]


def locate_pixel(
    world_rc_um: Sequence[float],
    *,
    msi_scale_rc: Sequence[float],
    msi_translate_rc: Sequence[float],
    lr_shape_rc: Sequence[int],
    factor: int,
) -> PixelHit | None:
    """The SR cell and MSI pixel under a world point (µm), or None outside the MSI field of view."""
    s = np.asarray(msi_scale_rc, float)[-2:]
    t = np.asarray(msi_translate_rc, float)[-2:]
    pos = np.asarray(world_rc_um, float)[-2:]
    corner = t - s / 2
    sr = np.floor((pos - corner) / (s / factor)).astype(int)
    rows, cols = int(lr_shape_rc[0]) * factor, int(lr_shape_rc[1]) * factor
    if not (0 <= sr[0] < rows and 0 <= sr[1] < cols):
        return None
    return PixelHit((int(sr[0]), int(sr[1])), (int(sr[0] // factor), int(sr[1] // factor)), (float(pos[0]), float(pos[1])))


def pixel_values(project, hit: PixelHit, channels: Sequence[int] | None = None) -> dict[str, list[float]]:
    """Values at one SR cell: ``{"lr": [...], "truth": [...], method: [...]}`` per channel.

    ``lr`` is the measured MSI pixel the cell came from (NaN when not acquired); ``truth`` is
    present only when the project has a ground truth.
    """
    chans = list(range(len(project.channel_names))) if channels is None else [int(c) for c in channels]
    r, c = hit.sr_rc
    i, j = hit.lr_rc
    out = {"lr": [float(project.lr_msi[k, i, j]) for k in chans]}
    if project.truth is not None:
        out["truth"] = [float(project.truth[k, r, c]) for k in chans]
    for method, stack in project.sr.items():
        out[method] = [float(stack[k, r, c]) for k in chans]
    return out


# ---------------------------------------------------------------------------- differences and limits
def _reference_stack(project, reference: str):
    """The stack differences are taken against: the ground truth, or a method's SR stack."""
    if reference == "truth":
        if project.truth is None:
            raise InputError("no ground truth to take differences against; pick BI as the reference")
        return project.truth
    if reference in project.sr:
        return project.sr[reference]
    raise InputError(f"reference {reference!r} is not one of {['truth', *project.sr]}")


def difference_stacks(project, reference: str = "truth") -> dict[str, np.ndarray]:
    """Method − reference stacks (C, rows, cols) for every other method.

    ``reference`` is ``"truth"`` (needs a ground truth) or a method name such as ``"bicubic"``.
    """
    ref = _reference_stack(project, reference)
    return {m: (s - ref).astype(np.float32) for m, s in project.sr.items() if m != reference}


def lazy_difference_stacks(project, reference: str = "bicubic", mask: np.ndarray | None = None) -> dict:
    """Method − reference as lazy (dask) stacks, NaN outside ``mask``; nothing is read until shown.

    As :func:`difference_stacks` for a project whose stacks are zarr arrays: each (C, rows, cols)
    result is computed one channel at a time when napari (or anything else) slices it.
    """
    import dask.array as da

    ref = _reference_stack(project, reference)

    def lazy(stack):
        return da.from_array(stack, chunks=(1, *tuple(stack.shape)[1:]), asarray=True).astype(np.float32)

    out = {}
    for method, stack in project.sr.items():
        if method == reference:
            continue
        diff = lazy(stack) - lazy(ref)
        if mask is not None:
            diff = da.where(np.asarray(mask, bool)[None], diff, np.float32(np.nan))
        out[method] = diff.astype(np.float32)
    return out


def channel_limits(stack, channel: int, *, mask: np.ndarray | None = None, symmetric: bool = False,
                   percentile: float = 99.5) -> tuple[float, float]:
    """:func:`shared_limits` of one channel of a (C, rows, cols) stack, reading only that channel."""
    return shared_limits([np.asarray(stack[int(channel)], np.float32)], mask=mask, symmetric=symmetric,
                         percentile=percentile)


def shared_limits(images: Sequence[np.ndarray], *, mask: np.ndarray | None = None, symmetric: bool = False,
                  percentile: float = 99.5) -> tuple[float, float]:
    """Contrast limits shared by images shown side by side: robust range of the first image.

    The first image is the reference (the ground truth when there is one, else SMSDL), so every
    method is seen on the same scale and brightness differences are real. ``symmetric`` gives
    ``(-a, a)`` with ``a`` the percentile of |values| (difference maps).
    """
    ref = np.asarray(images[0], float)
    values = ref[mask] if mask is not None and mask.shape == ref.shape else ref.ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return (-1.0, 1.0) if symmetric else (0.0, 1.0)
    if symmetric:
        a = float(np.percentile(np.abs(values), percentile))
        a = a if a > 0 else 1.0
        return -a, a
    lo = float(min(0.0, np.percentile(values, 100 - percentile)))
    hi = float(np.percentile(values, percentile))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def tissue_mask_sr(project) -> np.ndarray:
    """Tissue on the SR grid: the project's ``mask_hr``, else the MSI tissue mask upsampled by F."""
    if project.mask_hr is not None:
        return np.asarray(project.mask_hr, bool)
    lr = project.lr_msi
    mask_lr = project.mask_lr if project.mask_lr is not None else tissue_mask(lr)
    f = project.factor
    return np.repeat(np.repeat(np.asarray(mask_lr, bool), f, axis=0), f, axis=1)


# ---------------------------------------------------------------------------- segments
def cluster_segments(stack: np.ndarray, *, n_segments: int, mask: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """Tissue segments of an SR stack by k-means (``scipy.cluster.vq.kmeans2``) on its channels.

    Each channel is standardised over the tissue pixels, so every m/z weighs the same.

    Parameters
    ----------
    stack : (C, rows, cols)
    n_segments : int
        k, from 2 to 32.
    mask : (rows, cols) bool, optional
        Pixels to segment (default: finite in every channel).
    seed : int

    Returns
    -------
    (rows, cols) int32 labels: 0 outside the mask, 1..k inside, 1 the largest segment.
    """
    from scipy.cluster.vq import kmeans2

    data = np.asarray(stack, float)
    if data.ndim == 2:
        data = data[None]
    if not 2 <= int(n_segments) <= 32:
        raise InputError(f"number of segments must be from 2 to 32, got {n_segments}")
    if mask is None:
        mask = np.isfinite(data).all(0)
    mask = np.asarray(mask, bool) & np.isfinite(data).all(0)
    if mask.sum() < n_segments:
        raise InputError(f"only {int(mask.sum())} tissue pixels for {n_segments} segments")
    x = data[:, mask].T
    x = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1.0)
    _, labels = kmeans2(x, int(n_segments), minit="++", seed=np.random.default_rng(seed))
    counts = np.bincount(labels, minlength=int(n_segments))
    rank = np.empty_like(counts)
    rank[np.argsort(-counts, kind="stable")] = np.arange(len(counts))
    out = np.zeros(mask.shape, np.int32)
    out[mask] = rank[labels] + 1
    return out


# ---------------------------------------------------------------------------- metrics table
def metrics_rows(metrics: dict, channel_names: Sequence[str], channels: Sequence[int] | None = None,
                 columns: Sequence[str] = ("rmse", "ssim", "r2", "psnr"),
                 mean_label: str = "mean (all channels)") -> list[tuple]:
    """Table rows ``(method label, channel label, *values)``: the chosen channels, then the mean."""
    chans = list(range(len(channel_names))) if channels is None else list(channels)
    rows = []
    for method, scores in metrics.items():
        if not isinstance(scores, dict) or not all(isinstance(scores.get(m), dict) for m in columns):
            continue
        for c in chans:
            rows.append((method_label(method), str(channel_names[c]), *(float(scores[m]["per_channel"][c]) for m in columns)))
        rows.append((method_label(method), mean_label, *(float(scores[m]["mean"]) for m in columns)))
    return rows
