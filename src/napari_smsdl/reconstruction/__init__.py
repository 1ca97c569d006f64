"""SMSDL-Net reconstruction: regression through the forward model, baselines, the pipeline.

:func:`reconstruct` runs SMSDL and, on request, the bicubic baseline, the H&E-free control
(bicubic + back-projection) and the CNN
(:mod:`napari_smsdl.reconstruction.baselines`) on the same SR grid; :func:`reconstruct_many_channels`
streams thousands of channels to zarr chunk by chunk.
"""

from . import baselines
from ._channels import (
    CHUNKED_ABOVE_CHANNELS,
    DEFAULT_CHUNK_CHANNELS,
    ManyChannelRun,
    mask_from_stack,
    reconstruct,
    reconstruct_channels,
    reconstruct_many_channels,
    standardise_features,
)
from ._pipeline import (
    Method,
    Reconstruction,
    Settings,
    check_factor,
    check_inputs,
    prepare_guide,
    tiled_feature_store,
)
from ._heldout import blocked_folds
from ._regression import FAST_REGRESSION, Guidance, RegressionParams, RegressionResult, fit_guided, train_regression
from .baselines.backprojection import Conservation, backprojection_upsample, block_mean, conserve

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
    "Conservation",
    "Guidance",
    "RegressionResult",
    "backprojection_upsample",
    "blocked_folds",
    "check_factor",
    "check_inputs",
    "conserve",
    "fit_guided",
    "mask_from_stack",
    "prepare_guide",
    "reconstruct",
    "reconstruct_channels",
    "reconstruct_many_channels",
    "standardise_features",
    "tiled_feature_store",
    "train_regression",
]
