"""A project as napari layer data (no Qt): what the widgets add to the viewer when one is reopened."""

from __future__ import annotations

from .._reader import LayerDataTuple, he_layer, ion_stack_layer
from ..errors import SmsdlError
from ..io import open_histology
from ._project import Project, read_channels

#: napari layers carry the :class:`Project` of their last reconstruction under this metadata key.
LAYER_METADATA_KEY = "smsdl_project"


def project_layers(project: Project, *, name: str | None = None) -> tuple[list[LayerDataTuple], list[str]]:
    """Layer data of a reopened project (no Qt): H&E when its file is unchanged, MSI, ground truth.

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
        metadata=dict(common, kind="measured"),
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
        )
        if project.lazy:  # the layer itself reads the stack on disk
            data = project.truth
            kwargs["metadata"] = dict(kwargs["metadata"], channel_names=list(project.channel_names),
                                      mz=None if project.mz is None else list(project.mz))
        layers.append((data, dict(kwargs, visible=False), kind))
    return layers, notes
