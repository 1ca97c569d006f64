"""A project as napari layer data (no Qt): what the widgets add to the viewer when one is reopened."""

from __future__ import annotations

import numpy as np

from .._reader import LayerDataTuple, grid_placement, he_layer, ion_stack_layer
from ..errors import SmsdlError
from ..io import open_histology
from ._project import Project, is_lazy, read_channels

#: napari layers carry the :class:`Project` of their last reconstruction under this metadata key.
LAYER_METADATA_KEY = "smsdl_project"
#: Name of the layer of SMSDL's predictive standard deviation.
UNCERTAINTY_LAYER = "uncertainty (SMSDL)"
#: ``metadata["role"]`` of an uncertainty layer (never an MSI to train on, nor a ground truth).
UNCERTAINTY_ROLE = "uncertainty"


def uncertainty_layer(project: Project, *, msi_scale_rc, msi_translate_rc, method: str = "smsdl") -> LayerDataTuple | None:
    """The (C, h·F, w·F) uncertainty of ``method`` as image-layer data placed like its SR layers (no Qt).

    The last two axes get the SR grid's placement on the MSI layer (``msi_scale_rc``,
    ``msi_translate_rc``: the MSI layer's own, µm), exactly as the Compare widget places the SMSDL
    layers; the leading axis is the channel. A lazy stack stays lazy. Hidden when added (the
    comparison overlay stays as it is); None when the project has no uncertainty for ``method``.
    """
    from ..evaluation import channel_limits, refined_placement, tissue_mask_sr

    stack = project.uncertainty.get(method)
    if stack is None:
        return None
    place = refined_placement(msi_scale_rc, msi_translate_rc, project.factor)
    try:
        limits = channel_limits(stack, 0, mask=tissue_mask_sr(project))
    except Exception:  # noqa: BLE001 - a degenerate mask: napari picks the limits
        limits = None
    kwargs = {
        "name": UNCERTAINTY_LAYER if method == "smsdl" else f"uncertainty ({method})",
        "colormap": "viridis",
        "scale": (1.0, *place["scale"]),
        "translate": (0.0, *place["translate"]),
        "axis_labels": ("channel (m/z)" if project.mz is not None else "channel", "y", "x"),
        "visible": False,
        "metadata": {"role": UNCERTAINTY_ROLE, "kind": "uncertainty", "method": method,
                     "channel_names": list(project.channel_names),
                     "mz": None if project.mz is None else list(project.mz),
                     "pixel_size_um": project.sr_pixel_size_um,
                     "units": "predictive standard deviation, in the MSI's intensity units"},
    }
    if limits is not None:
        kwargs["contrast_limits"] = limits
    return stack if is_lazy(stack) else np.asarray(stack, np.float32), kwargs, "image"


def project_layers(project: Project, *, name: str | None = None) -> tuple[list[LayerDataTuple], list[str]]:
    """Layer data of a reopened project (no Qt): H&E when its file is unchanged, MSI, ground truth,
    SMSDL's uncertainty (hidden; :func:`uncertainty_layer`).

    Returns the layers and notes for the user (e.g. an input file that moved or changed). The MSI
    layer carries the project in its metadata; the ground truth is hidden.
    """
    layers: list[LayerDataTuple] = []
    notes: list[str] = []
    status = project.input_status()
    he_path = project.input_path("he")
    if he_path is not None and status.get("he") == "unchanged":
        try:
            image = open_histology(he_path, pixel_size_um=project.he_pixel_size_um)
            layers.append(he_layer(image, image.pixel_size_um or project.he_pixel_size_um, name=f"{he_path.stem} (H&E)"))
        except SmsdlError as exc:
            notes.append(f"H&E not reopened: {exc}")
    elif he_path is not None:
        notes.append(f"H&E {he_path} is {status.get('he')}; showing the registered H&E stored in the project")
    msi_path = project.input_path("msi")
    stem = name or (msi_path.stem if msi_path is not None else (project.path.name if project.path else "project"))
    common = {"source_path": None if msi_path is None else str(msi_path), "factor": project.factor}
    layers.append(ion_stack_layer(
        project.lr_msi, list(project.channel_names), project.msi_pixel_size_um, name=f"{stem} (MSI)", mz=project.mz,
        metadata=dict(common, kind="measured"), origin_rc_um=project.msi_origin_rc_um,
    ))
    if project.truth is not None:
        truth = project.truth
        names, mz = list(project.channel_names), project.mz
        if project.lazy:  # many channels: layer settings (contrast limits) from the first channels only
            few = list(range(min(8, len(names))))
            truth, names, mz = read_channels(truth, few), [names[c] for c in few], None if mz is None else mz[:len(few)]
        data, kwargs, kind = ion_stack_layer(
            truth, names, project.sr_pixel_size_um, name=f"{stem} ground truth",
            mz=mz, metadata=dict(common, kind="ground_truth", role="reference"),
            origin_rc_um=project.msi_origin_rc_um,  # the SR grid shares the MSI grid's corner
        )
        if project.lazy:  # the layer itself reads the stack on disk
            data = project.truth
            kwargs["metadata"] = dict(kwargs["metadata"], channel_names=list(project.channel_names),
                                      mz=None if project.mz is None else list(project.mz))
        layers.append((data, dict(kwargs, visible=False), kind))
    # SMSDL's uncertainty, on the SR grid of the MSI layer above (placed as the reader places grids)
    msi_place = grid_placement(project.msi_pixel_size_um, n_leading=1, origin_rc_um=project.msi_origin_rc_um)
    extra = uncertainty_layer(project, msi_scale_rc=msi_place["scale"][-2:], msi_translate_rc=msi_place["translate"][-2:])
    if extra is not None:
        layers.append(extra)
    return layers, notes
