"""A project folder: one reconstruction session, saved so that it reopens exactly (no Qt).

* ``_format``: the on-disk layout, manifest, file names and format version;
* ``_project``: the :class:`Project` in memory (eager or lazy stacks);
* ``_store``: atomic saving and (lazy) reopening;
* ``_run``: a reconstruction run straight into a project;
* ``_export``: exporting results (files, figure, one SpatialData ``.zarr``);
* ``_layers``: a project as napari layer data (SMSDL's uncertainty included).

The widgets and ``smsdl reconstruct --project`` share it.
"""

from ._export import (
    DEFAULT_EXPORT_FORMATS,
    EXPORT_FORMATS,
    export_project,
    export_results,
    export_spatialdata,
    he_to_um_matrix,
)
from ._format import PROJECT_FILE, InputRecord, input_records, settings_from_dict
from ._layers import LAYER_METADATA_KEY, UNCERTAINTY_LAYER, UNCERTAINTY_ROLE, project_layers, uncertainty_layer
from ._project import LAZY_SCORED_CHANNELS, Project, is_lazy, read_channels
from ._run import reconstruct_project, uses_chunked_path
from ._store import is_project, load_project, open_lazy_tiff, save_project

__all__ = [
    "DEFAULT_EXPORT_FORMATS",
    "EXPORT_FORMATS",
    "InputRecord",
    "LAYER_METADATA_KEY",
    "LAZY_SCORED_CHANNELS",
    "PROJECT_FILE",
    "UNCERTAINTY_LAYER",
    "UNCERTAINTY_ROLE",
    "Project",
    "export_project",
    "export_results",
    "export_spatialdata",
    "he_to_um_matrix",
    "input_records",
    "is_lazy",
    "is_project",
    "load_project",
    "open_lazy_tiff",
    "project_layers",
    "read_channels",
    "reconstruct_project",
    "save_project",
    "settings_from_dict",
    "uncertainty_layer",
    "uses_chunked_path",
]
