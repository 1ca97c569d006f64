"""Reading and writing the data: imzML, H&E slides, ion-image stacks, result files.

``io`` is the lowest stage: it imports only the foundation (:mod:`napari_smsdl.errors`).
"""

from ._export import write_metrics_csv, write_sr_imzml, write_tiff_stack
from ._histology import HistologyImage, open_histology, read_histology, to_rgb_uint8, write_pyramidal_tiff
from ._imzml import ImzMLDataset, ImzMLRegion, Normalization, Spectrum, make_windows, open_imzml, parse_tolerance, write_imzml
from ._ion_stack import IonStack, ome_names_and_pixel_size, read_ion_stack
from ._tissue import tissue_from, tissue_mask
from ._spatialdata import SpatialDataMsi, is_spatialdata, read_spatialdata_msi, write_spatialdata

__all__ = [
    "HistologyImage",
    "ImzMLDataset",
    "ImzMLRegion",
    "IonStack",
    "Normalization",
    "SpatialDataMsi",
    "Spectrum",
    "is_spatialdata",
    "make_windows",
    "ome_names_and_pixel_size",
    "open_histology",
    "open_imzml",
    "parse_tolerance",
    "read_histology",
    "read_ion_stack",
    "read_spatialdata_msi",
    "to_rgb_uint8",
    "write_imzml",
    "write_metrics_csv",
    "write_pyramidal_tiff",
    "write_spatialdata",
    "write_sr_imzml",
    "tissue_from",
    "tissue_mask",
    "write_tiff_stack",
]
