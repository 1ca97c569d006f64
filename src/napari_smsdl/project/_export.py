"""Exporting a project's results: OME-TIFF, imzML, metrics CSV, the comparison figure, SpatialData."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..evaluation import comparison_figure
from ..io import write_metrics_csv, write_sr_imzml, write_tiff_stack
from ._project import Project
from ._store import _pageable


#: What :func:`export_results` can write (``"spatialdata"`` needs the extra ``napari-smsdl[spatialdata]``).
EXPORT_FORMATS = ("ome-tiff", "imzml", "csv", "png", "spatialdata")
#: What it writes when not told: every format that needs no optional package.
DEFAULT_EXPORT_FORMATS = ("ome-tiff", "imzml", "csv", "png")
#: File name of the SpatialData store inside an export folder.
SPATIALDATA_NAME = "results.zarr"


def export_results(project, outdir: str | os.PathLike, *,
                   formats: Sequence[str] = DEFAULT_EXPORT_FORMATS) -> dict[str, Path]:
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
        (``figure.png``: LR, ground truth, methods and error maps per channel), ``"spatialdata"``
        (``results.zarr``: :func:`export_spatialdata`).

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
            lr=project.lr_msi, he_rgb=project.guide_rgb, pixel_size_um=sr_px,
        )
    if "spatialdata" in formats:
        written[SPATIALDATA_NAME] = export_spatialdata(project, out / SPATIALDATA_NAME, overwrite=True)
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
    rest = tuple(f for f in formats if f not in ("png", "spatialdata"))
    if "spatialdata" in formats:  # reads the lazy stacks channel by channel itself
        written[SPATIALDATA_NAME] = export_spatialdata(project, Path(outdir) / SPATIALDATA_NAME, overwrite=True)
    if rest:
        written.update(export_results(paged, outdir, formats=rest))
    if "png" in formats:
        first = range(min(LAZY_FIGURE_CHANNELS, len(project.channel_names)))
        written.update(export_results(project.subset(first), outdir, formats=("png",)))
    return written


# ---------------------------------------------------------------------------- SpatialData
def export_spatialdata(project: Project, path: str | os.PathLike, *, he: str = "auto",
                       overwrite: bool = False) -> Path:
    """Write a project as one SpatialData ``.zarr`` (:func:`napari_smsdl.io.write_spatialdata`).

    Elements, all in the µm coordinate system ``"global"`` (origin: the top-left corner of the MSI
    grid): ``"msi"`` (the measured MSI), ``"sr_<method>"`` for every method (``"sr_backprojection"``
    is the H&E-free control), ``"uncertainty_<method>"`` where there is one, ``"he"`` and the table
    ``"table"`` of SMSDL's SR pixels × m/z. Channel names are the project's (m/z labels).

    Parameters
    ----------
    he : ``"auto"``, ``"input"``, ``"registered"`` or ``"none"``
        ``"input"``: the H&E file the project was made from (it must be unchanged), at full resolution,
        with the registration as an affine; ``"registered"``: the H&E already resampled onto the SR grid
        (the guide image the project stores), a scale; ``"auto"``: the input when it is unchanged, else
        the registered one when stored, else none.
    overwrite : bool
        Replace an existing store.

    Notes
    -----
    The registration (MSI µm → H&E µm, a SimpleITK transform) is written into the H&E's affine: exact
    for an affine registration, the least-squares affine over the MSI field for a deformable one (its
    largest residual in µm is in the attributes, with the transform's parameters). The attributes
    (``sdata.attrs["napari_smsdl"]``) also hold the pixel sizes, the factor, the settings, metrics and
    the per-channel guidance when the project has them.
    """
    from ..io._spatialdata import write_spatialdata

    if he not in ("auto", "input", "registered", "none"):
        raise InputError(f"he must be auto, input, registered or none, got {he!r}")
    msi_px, factor = float(project.msi_pixel_size_um), project.factor
    attrs: dict = {"settings": project.settings.to_dict(), "seconds": dict(project.seconds)}
    if project.metrics:
        attrs["metrics"] = project.metrics
    if project.guidance:
        attrs["guidance"] = project.guidance
    if project.path is not None:
        attrs["project"] = str(project.path)
    image, matrix = None, None
    he_path = project.input_path("he")
    unchanged = he_path is not None and project.input_status().get("he") == "unchanged"
    if he == "input" and not unchanged:
        raise InputError(f"the H&E input {he_path} is {project.input_status().get('he', 'not recorded')}; "
                         "export the registered H&E (he='registered') instead")
    if he in ("auto", "input") and unchanged:
        from ..io import open_histology

        image = open_histology(he_path, pixel_size_um=project.he_pixel_size_um)
        he_px = float(image.pixel_size_um or project.he_pixel_size_um)
        matrix, registration = he_to_um_matrix(project.transform, msi_shape_rc=project.lr_msi.shape[1:],
                                               msi_pixel_size_um=msi_px, he_shape_rc=image.shape,
                                               he_pixel_size_um=he_px)
        attrs["he"] = {"source": str(he_path), "pixel_size_um": he_px}
        attrs["registration"] = registration
    elif he in ("auto", "registered") and project.guide_rgb is not None:
        image = np.asarray(project.guide_rgb)
        cell = image.shape[0] / (project.lr_msi.shape[1] * factor)
        grid_px = msi_px / factor / cell
        matrix = np.diag([grid_px, grid_px, 1.0])
        attrs["he"] = {"source": "the registered H&E on the SR grid (the project's guide image)",
                       "pixel_size_um": grid_px}
    elif he == "registered":
        raise InputError("this project stores no registered H&E (a many-channel project keeps none); use he='input'")
    return write_spatialdata(
        path, msi=project.lr_msi, channel_names=project.channel_names, msi_pixel_size_um=msi_px, factor=factor,
        sr=project.sr, uncertainty=project.uncertainty, mz=project.mz, he=image, he_to_um_yx=matrix,
        table_method="smsdl" if "smsdl" in project.sr else next(iter(project.sr), None), attrs=attrs,
        overwrite=overwrite,
    )


def he_to_um_matrix(transform, *, msi_shape_rc, msi_pixel_size_um: float, he_shape_rc,
                    he_pixel_size_um: float) -> tuple[np.ndarray, dict]:
    """The (3, 3) affine from H&E intrinsic (row, col) coordinates to the export's µm (y, x), and facts.

    ``transform`` maps MSI physical µm (origin at the centre of MSI pixel (0, 0)) to H&E physical µm
    (SimpleITK, x-y); None means the H&E covers the MSI field of view. SpatialData puts pixel corners
    at integers and the export's µm origin at the MSI grid's corner, hence the half-pixel shifts. A
    non-affine transform is replaced by its least-squares affine over the MSI field (17 × 17 points);
    the facts say which, with the largest residual (µm) and the transform's parameters.
    """
    import SimpleITK as sitk

    from ..registration import same_field_of_view_transform

    p, hp = float(msi_pixel_size_um), float(he_pixel_size_um)
    rows, cols = (int(v) for v in msi_shape_rc)
    if transform is None:
        transform = same_field_of_view_transform((rows, cols), p, tuple(int(v) for v in he_shape_rc), hp)
        source = "same field of view (no registration)"
    else:
        source = "registration"
    xs = np.linspace(-p / 2, (cols - 0.5) * p, 17)
    ys = np.linspace(-p / 2, (rows - 0.5) * p, 17)
    msi_xy = np.array([(x, y) for y in ys for x in xs])
    he_xy = np.array([transform.TransformPoint((float(x), float(y))) for x, y in msi_xy])
    design = np.column_stack([msi_xy, np.ones(len(msi_xy))])
    coef, *_ = np.linalg.lstsq(design, he_xy, rcond=None)  # (3, 2): he = [x y 1] @ coef
    residual = float(np.abs(design @ coef - he_xy).max())
    forward = np.eye(3)
    forward[:2, :] = coef.T  # MSI physical xy -> H&E physical xy
    to_he_phys = np.array([[hp, 0, -hp / 2], [0, hp, -hp / 2], [0, 0, 1.0]])  # H&E corner-intrinsic -> physical
    to_um = np.array([[1, 0, p / 2], [0, 1, p / 2], [0, 0, 1.0]])  # MSI physical -> export µm
    total_xy = to_um @ np.linalg.inv(forward) @ to_he_phys
    swap = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1.0]])
    exact = residual < 1e-6 * max(1.0, p * max(rows, cols))
    facts = {
        "source": source, "transform_class": transform.GetName(),
        "affine": "exact" if exact else "least-squares approximation over the MSI field",
        "max_residual_um": residual,
        "msi_to_he_affine_xy": forward.tolist(),
        "transform_parameters": _transform_text(transform, sitk),
    }
    return swap @ total_xy @ swap, facts


def _transform_text(transform, sitk) -> str:
    """The transform as SimpleITK writes a ``.tfm`` file (its class, parameters and fixed parameters)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "transform.tfm"
        sitk.WriteTransform(transform, str(target))
        return target.read_text()
