"""Multi-level H&E features from self-supervised Vision Transformers, tile by tile.

One extractor: :func:`extract_features_tiled` reads a whole slide lazily and writes a chunked zarr
store (:class:`TiledFeatures`); :func:`extract_features` runs the same passes on a registered H&E
guide in memory, as one tile (:class:`FeatureMaps`).
"""

from ._extract import TiledFeatures, TilingParams, extract_features, extract_features_tiled, feature_names
from ._vit import (
    FAST_FEATURES,
    LEVELS,
    TOKEN_PX,
    WINDOW_TOKENS,
    FeatureMaps,
    FeatureParams,
    build_vits,
    choose_cell_px,
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
    "feature_names",
    "make_vit",
    "save_vits",
]
