"""Scoring and comparing reconstructions: metrics, the benchmark protocol, comparison helpers, figures.
"""

from ._benchmark import BenchmarkResult, degrade, run_benchmark
from ._comparison import (
    PixelHit,
    channel_label,
    channel_limits,
    cluster_segments,
    difference_stacks,
    he_level_for_guide,
    lazy_difference_stacks,
    locate_pixel,
    method_label,
    metrics_rows,
    pixel_values,
    placement_transform,
    refined_placement,
    shared_limits,
    tissue_mask_sr,
    transform_to_level,
)
from ._figures import comparison_figure
from ._metrics import METRICS, normalise_pair, score_channel, score_stack

__all__ = [
    "BenchmarkResult",
    "METRICS",
    "PixelHit",
    "channel_label",
    "channel_limits",
    "cluster_segments",
    "comparison_figure",
    "degrade",
    "difference_stacks",
    "he_level_for_guide",
    "lazy_difference_stacks",
    "locate_pixel",
    "method_label",
    "metrics_rows",
    "normalise_pair",
    "pixel_values",
    "placement_transform",
    "refined_placement",
    "run_benchmark",
    "score_channel",
    "score_stack",
    "shared_limits",
    "tissue_mask_sr",
    "transform_to_level",
]
