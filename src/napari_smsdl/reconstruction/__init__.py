"""SMSDL-Net reconstruction: regression through the forward model, baselines, the pipeline.

:func:`reconstruct` runs SMSDL and, on request, the bicubic and CNN baselines
(:mod:`napari_smsdl.reconstruction.baselines`) on the same SR grid; :func:`reconstruct_many_channels`
streams thousands of channels to zarr chunk by chunk.
"""

from . import baselines
from ._channels import (
    CHUNKED_ABOVE_CHANNELS,
    DEFAULT_CHUNK_CHANNELS,
    ManyChannelRun,
    mask_from_stack,
    reconstruct_channels,
    reconstruct_many_channels,
    standardise_features,
)
from ._pipeline import Method, Reconstruction, Settings, prepare_guide, reconstruct, tiled_feature_store
from ._regression import (
    FAST_REGRESSION,
    RegressionParams,
    block_mean,
    conserve_block_means,
    effective_pca_dims,
    train_regression,
)

__all__ = [
    "CHUNKED_ABOVE_CHANNELS",
    "DEFAULT_CHUNK_CHANNELS",
    "FAST_REGRESSION",
    "ManyChannelRun",
    "Method",
    "Reconstruction",
    "RegressionParams",
    "Settings",
    "baselines",
    "block_mean",
    "conserve_block_means",
    "effective_pca_dims",
    "mask_from_stack",
    "prepare_guide",
    "reconstruct",
    "reconstruct_channels",
    "reconstruct_many_channels",
    "standardise_features",
    "tiled_feature_store",
    "train_regression",
]
