"""Register on a reduced level of a (pyramidal) H&E and express the result for level 0."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ._landmarks import LandmarkPairs

__all__ = ["HE_LEVEL_FRACTION", "choose_he_level", "landmarks_to_level", "result_to_level0"]

#: registration needs the H&E at no finer than this fraction of the MSI pixel
HE_LEVEL_FRACTION = 0.125


def choose_he_level(level_rows: Sequence[int], level0_pixel_size_um: float, msi_pixel_size_um: float) -> int:
    """The coarsest pyramid level whose pixel size is ≤ ``HE_LEVEL_FRACTION`` × the MSI pixel.

    ``level_rows`` are the row counts of the levels, level 0 first.
    """
    rows0 = float(level_rows[0])
    best = 0
    for k, rows in enumerate(level_rows):
        if level0_pixel_size_um * rows0 / rows <= HE_LEVEL_FRACTION * msi_pixel_size_um * 1.0001:
            best = k
    return best


def landmarks_to_level(landmarks: LandmarkPairs | None, scale: float) -> LandmarkPairs | None:
    """H&E landmarks from level-0 pixels to a level ``scale`` times smaller (pixel centres kept)."""
    if landmarks is None or scale == 1.0:
        return landmarks
    return LandmarkPairs((landmarks.he_rc + 0.5) * scale - 0.5, landmarks.msi_rc)


def result_to_level0(result, *, level0_pixel_size_um: float, scale: float, landmarks_level0: LandmarkPairs | None):
    """Express a result computed on a reduced H&E level in level-0 H&E physical space.

    Level pixel (0, 0) is centred at level-0 pixel ``(1/scale - 1) / 2``: the level's physical space is
    level-0 physical space shifted by ``(1/scale - 1) / 2 * level0_pixel_size_um`` µm on both axes, so
    the affine's translation gains that shift. Report residual coordinates go back to level-0 pixels.
    """
    if scale == 1.0:
        return result
    import SimpleITK as sitk

    from ._stages import compose

    offset = (1.0 / scale - 1.0) / 2.0 * level0_pixel_size_um
    affine = sitk.AffineTransform(result.affine)
    affine.SetTranslation(tuple(float(t) + offset for t in affine.GetTranslation()))
    report = dict(result.report)
    report["moving"] = {**report["moving"], "pixel_size_um": level0_pixel_size_um, "level_scale": scale}
    report["residuals"] = [
        {**row, "he_row": (row["he_row"] + 0.5) / scale - 0.5, "he_col": (row["he_col"] + 0.5) / scale - 0.5}
        for row in report.get("residuals", [])
    ]
    return dataclasses.replace(
        result,
        affine=affine,
        transform=compose(affine, result.bspline),
        report=report,
        landmarks=landmarks_level0 if landmarks_level0 is not None else result.landmarks,
        moving_pixel_size_um=level0_pixel_size_um,
    )
