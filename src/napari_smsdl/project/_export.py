"""Exporting a project's results: OME-TIFF, imzML, metrics CSV and the comparison figure."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import InputError
from ..evaluation import comparison_figure
from ..io import write_metrics_csv, write_sr_imzml, write_tiff_stack
from ._project import Project
from ._store import _pageable


#: What :func:`export_results` can write.
EXPORT_FORMATS = ("ome-tiff", "imzml", "csv", "png")


def export_results(project, outdir: str | os.PathLike, *, formats: Sequence[str] = EXPORT_FORMATS) -> dict[str, Path]:
    """Write a reconstruction's results into ``outdir`` in the chosen formats.

    Parameters
    ----------
    project : napari_smsdl.project.Project
        The reconstruction (its SR stacks, channel names, m/z, pixel sizes, ground truth, metrics).
    outdir : path-like
        Created if needed.
    formats : sequence of str
        Any of ``"ome-tiff"`` (``sr_<method>.ome.tif``, ``uncertainty_<method>.ome.tif`` — SMSDL's
        predictive std, same grid — plus ``ground_truth.ome.tif`` when there is one), ``"imzml"`` (``sr_<method>.imzML`` + ``.ibd``, continuous, at the SR pixel size; needs
        m/z channels), ``"csv"`` (``metrics.csv``; needs a ground truth; with ``guidance.csv``, the
        per-channel histology gain, when the project has one) and ``"png"``
        (``figure.png``: LR, ground truth, methods and error maps per channel).

    Returns
    -------
    dict
        Name → path of every file written.
    """
    unknown = set(formats) - set(EXPORT_FORMATS)
    if unknown:
        raise InputError(f"unknown export format(s) {sorted(unknown)}; choose from {list(EXPORT_FORMATS)}")
    if "imzml" in formats and project.mz is None:
        raise InputError("imzML export needs one m/z per channel; these channels are not m/z windows")
    if "csv" in formats and not project.metrics:
        raise InputError("no metrics to export: choose a ground truth in Compare first")
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(project.channel_names)
    sr_px = project.sr_pixel_size_um
    written: dict[str, Path] = {}
    if "ome-tiff" in formats:
        for method, stack in project.sr.items():
            written[f"{method}.ome.tif"] = write_tiff_stack(out / f"sr_{method}.ome.tif", stack, channel_names=names,
                                                            pixel_size_um=sr_px)
        for method, stack in project.uncertainty.items():
            written[f"uncertainty_{method}.ome.tif"] = write_tiff_stack(
                out / f"uncertainty_{method}.ome.tif", stack, channel_names=names, pixel_size_um=sr_px)
        if project.truth is not None:
            written["ground_truth.ome.tif"] = write_tiff_stack(out / "ground_truth.ome.tif", project.truth,
                                                               channel_names=names, pixel_size_um=sr_px)
    if "imzml" in formats:
        for method, stack in project.sr.items():
            written[f"{method}.imzML"] = write_sr_imzml(out / f"sr_{method}.imzML", stack, project.mz, sr_px)
    if "csv" in formats:
        written["metrics.csv"] = write_metrics_csv(out / "metrics.csv", project.metrics, channel_names=names)
        if project.guidance:
            from ..io._export import write_guidance_csv

            written["guidance.csv"] = write_guidance_csv(out / "guidance.csv", project.guidance, channel_names=names)
    if "png" in formats:
        written["figure.png"] = comparison_figure(
            out / "figure.png", project.sr, truth=project.truth, mask=project.mask_hr, channel_names=names,
            lr=project.lr_msi,
        )
    return written

#: Channels drawn in the figure exported for a lazy (many-channel) project.
LAZY_FIGURE_CHANNELS = 6


def export_project(project: Project, outdir: str | os.PathLike, *, formats: Sequence[str]) -> dict[str, Path]:
    """:func:`napari_smsdl.project.export_results`, also for a lazy (many-channel) project.

    In memory this is ``export_results`` itself. With lazy SR stacks the OME-TIFFs are written page
    by page, the metrics CSV lists every channel (NaN where not scored), the figure shows the first
    ``LAZY_FIGURE_CHANNELS`` channels, and imzML (every SR pixel's spectrum, across all channels at
    once) is refused with an :class:`InputError`.
    """
    if not project.lazy:
        return export_results(project, outdir, formats=formats)
    formats = tuple(formats)
    if "imzml" in formats:
        raise InputError(f"imzML export is not available for {len(project.channel_names)} channels streamed to disk "
                         "(it needs every channel of every SR pixel at once); export OME-TIFF instead")
    written: dict[str, Path] = {}
    paged = dataclasses.replace(project, sr={m: _pageable(v) for m, v in project.sr.items()},
                                uncertainty={m: _pageable(v) for m, v in project.uncertainty.items()},
                                truth=None if project.truth is None else _pageable(project.truth))
    rest = tuple(f for f in formats if f != "png")
    if rest:
        written.update(export_results(paged, outdir, formats=rest))
    if "png" in formats:
        first = range(min(LAZY_FIGURE_CHANNELS, len(project.channel_names)))
        written.update(export_results(project.subset(first), outdir, formats=("png",)))
    return written
