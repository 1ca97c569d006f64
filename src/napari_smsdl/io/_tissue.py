"""Which pixels of an ion-image stack are tissue (measured signal) and which are background.

A pixel is **background** when it has no data (NaN in any channel) or when it is zero in every
channel *and* belongs to a zero region: a 4-connected set of all-zero pixels that holds a 2 × 2
all-zero patch or touches the image's edge (so a region's staircase edges, its one-pixel cracks
and a one-pixel frame go with it). An all-zero pixel in a set that is neither is a measurement:
ion counts are noisy, and a real single-ion image has many scattered zero pixels inside the
tissue. Counting those as background drops them from the block means, from training and from
scoring, and biases all three upwards. The 2 × 2 patch is the smallest one that is wider than a
pixel in both directions, so it asks no more of background than not being a scatter of single pixels.
"""

from __future__ import annotations

import numpy as np


def background_zeros(all_zero: np.ndarray) -> np.ndarray:
    """The all-zero pixels (``all_zero``, (rows, cols) bool) that form zero regions (module rule)."""
    from scipy.ndimage import binary_erosion, label

    all_zero = np.asarray(all_zero, bool)
    if not all_zero.any():
        return all_zero.copy()
    regions, _ = label(all_zero)  # 4-connected
    cores = binary_erosion(all_zero, structure=np.ones((2, 2), bool), border_value=1)
    edge = np.concatenate([regions[0], regions[-1], regions[:, 0], regions[:, -1]])
    keep = np.union1d(regions[cores], edge)
    return np.isin(regions, keep[keep > 0])


def tissue_from(acquired: np.ndarray, any_nonzero: np.ndarray) -> np.ndarray:
    """Tissue pixels from the two per-pixel summaries a (possibly streamed) stack gives.

    Parameters
    ----------
    acquired : (rows, cols) bool
        Finite in every channel.
    any_nonzero : (rows, cols) bool
        Non-zero in at least one channel.
    """
    acquired = np.asarray(acquired, bool)
    return acquired & ~background_zeros(acquired & ~np.asarray(any_nonzero, bool))


def tissue_mask(stack: np.ndarray) -> np.ndarray:
    """(rows, cols) bool tissue mask of a (channels, rows, cols) or (rows, cols) stack (module rule)."""
    stack = np.asarray(stack)
    if stack.ndim == 2:
        stack = stack[None]
    return tissue_from(np.isfinite(stack).all(0), (np.nan_to_num(stack) != 0).any(0))
