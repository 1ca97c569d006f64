"""Choices (Enums) and parameters of the registration, shared by core, CLI and widget."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, fields

__all__ = ["Criterion", "FixedFeature", "FovFit", "MovingFeature", "RegistrationParams"]


class MovingFeature(str, enum.Enum):
    """Which single-channel image of the H&E (moving) is registered."""

    AUTO = "auto"  #: the candidate with the best mutual information after the affine step
    HAEMATOXYLIN = "haematoxylin"  #: haematoxylin density by colour deconvolution (Ruifrok & Johnston)
    INVERTED_GREY = "inverted_grey"  #: 1 − luminance


class FixedFeature(str, enum.Enum):
    """Which single-channel image of the MSI (fixed) is registered, for a multi-channel stack."""

    AUTO = "auto"  #: the candidate with the best mutual information after the affine step
    TIC = "tic"  #: sum over channels (the total ion current of an imzML)
    PC1 = "pc1"  #: first principal component of the channels (per-channel standardised)
    ION = "ion"  #: one channel, ``RegistrationParams.fixed_channel``


class Criterion(str, enum.Enum):
    """What drives the image stages."""

    #: ``CHANNELS`` for a stack of ≥ 2 channels and ≥ 400 pixels, or for any MSI of ≥ 10 000 pixels
    #: with landmarks; else ``MATTES``
    AUTO = "auto"
    MATTES = "mattes"  #: Mattes mutual information of one MSI feature and one H&E feature (SimpleITK)
    CHANNELS = "channels"  #: cross-validated regression of many ion components on histology features


class FovFit(str, enum.Enum):
    """How the no-landmark 'same field of view' start scales the MSI field onto the H&E field."""

    STRETCH = "stretch"  #: each axis scaled to fit (the two images cover exactly the same area)
    ISOTROPIC = "isotropic"  #: one scale (the mean of the two axis scales), centres matched


@dataclass(frozen=True)
class RegistrationParams:
    """Parameters of :func:`napari_smsdl.registration.register`. Distances are in MSI pixels.

    Attributes
    ----------
    moving_feature, fixed_feature : MovingFeature, FixedFeature
        The images registered (``AUTO``: best mutual information after the affine stage).
        ``fixed_feature`` only matters when the MSI is a (channels, rows, cols) stack.
    fixed_channel : int
        Channel used by ``FixedFeature.ION``.
    refine_affine : bool
        Stage 2: refine the affine on Mattes mutual information.
    bspline : bool
        Stage 3: B-spline deformation on top of the affine.
    mesh_spacing_msi_px : float
        Final B-spline control-point spacing in MSI pixels (the mesh is refined to it level by level).
    shrink_msi_px, smoothing_msi_px : tuple of float
        Multi-resolution schedule: per level, the sampling step and the Gaussian sigma, in MSI pixels
        (converted to physical µm; the shrink factor is clipped so a level keeps ≥ 12 pixels per axis).
    affine_iterations, bspline_iterations : int
        Maximum optimiser iterations per level.
    histogram_bins : int or None
        Mattes MI bins (``None``: from the number of samples, 12 to 32).
    sampling_percentage : float or None
        Fraction of fixed pixels sampled at random (with ``seed``) per iteration; ``None`` uses all
        pixels when there are at most 40 000 of them, else 40 000.
    seed : int
        Seed of the metric's random sampling (reproducible runs).
    moving_resolution_msi_px : float
        The H&E feature image is block-averaged down to about this pixel size (in MSI pixels) before
        registering; finer detail than this cannot be matched by the MSI.
    psf_sigma_msi_px : float
        Gaussian blur of the H&E feature (in MSI pixels) so its resolution matches the MSI's.
    guard : bool
        Keep the earlier stage when a stage makes the held-out landmark error worse.
    guard_slack_msi_px : float
        A stage counts as worse when its held-out median error exceeds the earlier one by more than this.
    max_folds : int
        Held-out errors are leave-one-out up to this many landmarks, k-fold (k = max_folds) beyond.
    fov_fit : FovFit
        The no-landmark start.
    outlier_factor : float
        A landmark is flagged when its held-out error exceeds this × the median.
    threads : int or None
        SimpleITK threads for resampling (``None``: SimpleITK's default). The optimisers' metrics run
        on one thread whatever this is, so results do not depend on it.
    criterion : Criterion
        What drives the image stages (see :class:`Criterion`).
    channel_model : str
        Transform fitted by the channel affine stage: ``"similarity"`` (rotation, isotropic scale,
        shift) or ``"affine"``.
    sweep : bool
        Without landmarks and with the channel criterion, start from a rotation/scale/mirror sweep
        instead of the same field of view.
    sweep_mirror : bool
        The sweep also tries the mirrored H&E.
    channel_mesh_msi_px : float
        Control-point spacing (MSI px) of the channel-driven B-spline.
    bspline_min_gain : float
        The channel-driven B-spline is kept when it raises the held-out channel R² by at least this.
    channel_robust_passes : int
        Reweighted passes of the channel affine stage (0: none): each tissue patch is weighted by Tukey's
        biweight of how far its own best shift lies from the other patches', so a locally deformed
        region does not bend the global rotation and scale; the misregistration map then shows it.
    channel_guard_slack_msi_px : float
        ``guard_slack_msi_px`` of the channel-driven stages: with landmarks, an image stage is kept only
        when its held-out landmark median is no worse than the stage before by more than this; the
        default, negative, asks for a clear gain (0.1 MSI px). On the bladder pair the channel
        criterion's optimum sits about 0.6 MSI px from the reference alignment the landmarks come from,
        and six noisy landmarks' leave-one-out median is itself noisy, so the landmarks win ties.
    """

    moving_feature: MovingFeature = MovingFeature.HAEMATOXYLIN
    fixed_feature: FixedFeature = FixedFeature.AUTO
    fixed_channel: int = 0
    refine_affine: bool = True
    bspline: bool = True
    mesh_spacing_msi_px: float = 10.0
    shrink_msi_px: tuple[float, ...] = (2.0, 1.0)
    smoothing_msi_px: tuple[float, ...] = (0.5, 0.0)
    affine_iterations: int = 100
    bspline_iterations: int = 15
    histogram_bins: int | None = None
    sampling_percentage: float | None = None
    seed: int = 0
    moving_resolution_msi_px: float = 0.25
    psf_sigma_msi_px: float = 0.35
    guard: bool = True
    guard_slack_msi_px: float = 0.5
    max_folds: int = 10
    fov_fit: FovFit = FovFit.STRETCH
    outlier_factor: float = 2.0
    threads: int | None = None
    criterion: Criterion = Criterion.AUTO
    channel_model: str = "similarity"
    sweep: bool = True
    sweep_mirror: bool = True
    channel_mesh_msi_px: float = 32.0
    bspline_min_gain: float = 0.02
    channel_robust_passes: int = 2
    channel_guard_slack_msi_px: float = -0.1

    def __post_init__(self):
        if self.channel_model not in ("similarity", "affine"):
            raise ValueError(f"channel_model must be 'similarity' or 'affine', got {self.channel_model!r}")
        for name, cls in (
            ("moving_feature", MovingFeature),
            ("fixed_feature", FixedFeature),
            ("fov_fit", FovFit),
            ("criterion", Criterion),
        ):
            object.__setattr__(self, name, cls(getattr(self, name)))
        object.__setattr__(self, "shrink_msi_px", tuple(float(v) for v in self.shrink_msi_px))
        object.__setattr__(self, "smoothing_msi_px", tuple(float(v) for v in self.smoothing_msi_px))
        if len(self.shrink_msi_px) != len(self.smoothing_msi_px) or not self.shrink_msi_px:
            raise ValueError("shrink_msi_px and smoothing_msi_px need the same, non-zero number of levels")
        if self.mesh_spacing_msi_px <= 0:
            raise ValueError(f"mesh_spacing_msi_px must be > 0, got {self.mesh_spacing_msi_px}")

    def to_dict(self) -> dict:
        """JSON-serialisable dict (Enums as their values)."""
        out = asdict(self)
        for k, v in out.items():
            if isinstance(v, enum.Enum):
                out[k] = v.value
            elif isinstance(v, tuple):
                out[k] = list(v)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> RegistrationParams:
        """Inverse of :meth:`to_dict`; unknown keys are ignored."""
        names = {f.name for f in fields(cls)}
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in names}
        return cls(**kwargs)
