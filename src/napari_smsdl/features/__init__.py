"""Multi-level H&E features from self-supervised Vision Transformers, in memory or tile by tile.

:func:`extract_features` works on a registered H&E guide in memory; :func:`extract_features_tiled`
reads a whole slide lazily and writes a chunked zarr store (:class:`TiledFeatures`).
"""

from ._tiled import TiledFeatures, TilingParams, extract_features_tiled
from ._vit import (
    FAST_FEATURES,
    LEVELS,
    TOKEN_PX,
    WINDOW_TOKENS,
    FeatureMaps,
    FeatureParams,
    build_vits,
    choose_cell_px,
    extract_features,
    feature_dim,
    make_vit,
    save_vits,
)

__all__ = [
    "FAST_FEATURES",
    "FeatureMaps",
    "FeatureParams",
    "LEVELS",
    "TOKEN_PX",
    "TiledFeatures",
    "TilingParams",
    "WINDOW_TOKENS",
    "build_vits",
    "choose_cell_px",
    "extract_features",
    "extract_features_tiled",
    "feature_dim",
    "make_vit",
    "save_vits",
]
