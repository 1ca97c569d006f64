"""Landmark-seeded nonlinear registration of the H&E (moving) onto the MSI (fixed), with SimpleITK.

Physical space (the contract): pixel ``(row, col)`` of an image with pixel size ``p`` µm is centred
at ``(x, y) = (col * p, row * p)`` µm. Every transform here maps **MSI physical → H&E physical**,
the direction SimpleITK resamples the H&E onto MSI grids with (fixed = MSI, moving = H&E).

Stages: (1) landmark affine (``LandmarkBasedTransformInitializer``) or a same-field-of-view start;
(2) optional affine refinement on Mattes mutual information; (3) a B-spline in MSI space on top of the
affine, multi-resolution, LBFGS2. Every run reports held-out landmark errors, per-landmark residuals,
the Jacobian determinant and folds in the tissue, a checkerboard and a warped grid; a guard keeps the
earlier stage when a later one makes held-out errors worse.

For an ion stack (≥ 2 channels, ≥ 400 pixels; ``RegistrationParams.criterion``) the image stages are
driven by many channels instead of one: the cross-validated R² of a ridge regression of the leading
ion principal components on histology colour/texture features through the MSI pixel footprint
(:mod:`._channels`). Without landmarks the start is a rotation/scale/mirror sweep (:mod:`._sweep`);
the affine stage is a Levenberg–Marquardt similarity fit on that criterion; the B-spline is fitted to
per-patch residual shifts and kept only when it raises the held-out channel R² and does not worsen
held-out landmarks. Every run reports ``confidence_msi_px`` and a local misregistration map
(``misregistration_msi_px``: median and p90 over tissue patches; the map in
``RegistrationResult.misregistration`` and ``misregistration.npy``). The optimisers' metrics run on one
ITK thread and every random choice is seeded, so the same inputs give bit-identical files.
"""

from ._coords import GridSpec, affine_to_napari_matrix, rc_to_xy_um, super_resolution_grid, xy_um_to_rc
from ._features import fixed_feature_image, moving_feature_image
from ._io import load_params, load_report, load_transform, save_registration
from ._landmarks import CSV_HEADER, LandmarkPairs, fit_landmark_affine, read_landmarks_csv, write_landmarks_csv
from ._params import Criterion, FixedFeature, FovFit, MovingFeature, RegistrationParams
from ._refine import RefinementDecision, refine_same_field_of_view
from ._register import RegistrationResult, iter_register, register
from ._resample import resample_moving_to_grid
from ._stages import compose, same_field_of_view_transform

__all__ = [
    "CSV_HEADER",
    "Criterion",
    "FixedFeature",
    "FovFit",
    "GridSpec",
    "LandmarkPairs",
    "MovingFeature",
    "RegistrationParams",
    "RefinementDecision",
    "RegistrationResult",
    "affine_to_napari_matrix",
    "compose",
    "fit_landmark_affine",
    "fixed_feature_image",
    "iter_register",
    "load_params",
    "load_report",
    "load_transform",
    "moving_feature_image",
    "rc_to_xy_um",
    "read_landmarks_csv",
    "refine_same_field_of_view",
    "register",
    "resample_moving_to_grid",
    "same_field_of_view_transform",
    "save_registration",
    "super_resolution_grid",
    "write_landmarks_csv",
    "xy_um_to_rc",
]
