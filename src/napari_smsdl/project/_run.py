"""Running a reconstruction into a :class:`~napari_smsdl.project.Project` (in memory or chunked).

Above ``CHUNKED_ABOVE_CHANNELS`` channels :func:`reconstruct_project` takes the chunked path of
:func:`napari_smsdl.reconstruction.reconstruct_many_channels`: the SR stacks are streamed to zarr
stores in a run folder and the project's ``sr`` values are those lazy (zarr) arrays.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..reconstruction import Settings
from ._format import InputRecord
from ._project import Project


def uses_chunked_path(n_channels: int, chunk_channels: int | None = None) -> bool:
    """Whether :func:`reconstruct_project` streams the SR stacks to zarr (the many-channel path).

    ``chunk_channels``: None = automatic (more than ``reconstruction.CHUNKED_ABOVE_CHANNELS`` channels),
    0 = never, N > 0 = always (N channels per chunk).
    """
    from ..reconstruction import CHUNKED_ABOVE_CHANNELS

    if chunk_channels is not None:
        return chunk_channels > 0
    return int(n_channels) > CHUNKED_ABOVE_CHANNELS


def reconstruct_project(
    lr_msi: np.ndarray,
    he_rgb: np.ndarray,
    *,
    channel_names: Sequence[str],
    msi_pixel_size_um: float,
    he_pixel_size_um: float,
    settings: Settings,
    methods: Sequence[str] = ("smsdl", "bicubic", "backprojection", "cnn"),
    mz: Sequence[float] | None = None,
    transform=None,
    landmarks=None,
    registration_report: dict | None = None,
    inputs: Sequence[InputRecord] = (),
    mask_lr: np.ndarray | None = None,
    cache_dir: str | os.PathLike | None = None,
    weights_path: str | os.PathLike | None = None,
    progress=None,
    should_stop=None,
    on_loss=None,
    run_dir: str | os.PathLike | None = None,
    chunk_channels: int | None = None,
) -> Project:
    """Run :func:`napari_smsdl.reconstruction.reconstruct` and wrap its output and inputs as a :class:`Project`.

    Many channels (:func:`uses_chunked_path`: more than ``reconstruction.CHUNKED_ABOVE_CHANNELS``, or
    ``chunk_channels`` > 0) go through :func:`napari_smsdl.reconstruction.reconstruct_many_channels`
    instead: SMSDL, BI and the control chunk by chunk (``chunk_channels`` per chunk, default
    ``reconstruction.DEFAULT_CHUNK_CHANNELS``) into zarr stores in ``run_dir`` (a new temporary folder
    when None), and the project's ``sr`` values are those lazy arrays; every method runs
    there (the CNN one network per chunk) and ``on_loss`` is not called. ``"backprojection"`` is
    the H&E-free control (bicubic + back-projection to the block means) on both paths.

    ``lr_msi`` is (C, h, w) with NaN where not acquired; ``transform`` maps MSI physical µm to H&E
    physical µm (None: the H&E covers the MSI field of view). The trained ViT weights are written to
    ``weights_path`` when SMSDL runs with self-supervised training. ``progress``, ``should_stop`` and
    ``on_loss`` are passed through (the job raises :class:`~napari_smsdl.errors.Cancelled` when
    ``should_stop()`` returns True).
    """
    from ..reconstruction import reconstruct

    methods = [str(getattr(m, "value", m)) for m in methods]
    if not methods:
        raise InputError("no method chosen: pick SMSDL and/or a baseline")
    train_vit = "smsdl" in methods and not settings.features.checkpoint and settings.features.ssl_steps > 0
    save_weights = weights_path if (weights_path is not None and train_vit) else None
    if save_weights is not None:
        Path(save_weights).parent.mkdir(parents=True, exist_ok=True)
    n_channels = int(np.shape(lr_msi)[0]) if np.ndim(lr_msi) == 3 else 1
    if uses_chunked_path(n_channels, chunk_channels):
        from ..reconstruction import DEFAULT_CHUNK_CHANNELS, reconstruct_many_channels

        if run_dir is None:
            import tempfile

            run_dir = tempfile.mkdtemp(prefix="napari-smsdl-run-")
        run = reconstruct_many_channels(
            lr_msi, he_rgb, he_pixel_size_um=he_pixel_size_um, msi_pixel_size_um=msi_pixel_size_um, out=run_dir,
            settings=settings, methods=methods, transform=transform, mask_lr=mask_lr, channel_names=channel_names,
            chunk_channels=chunk_channels or DEFAULT_CHUNK_CHANNELS, cache_dir=cache_dir, save_weights=save_weights,
            progress=progress, should_stop=should_stop,
        )
        weights = save_weights if save_weights is not None and Path(save_weights).is_file() else None
        return Project.from_reconstruction(
            run, lr_msi=lr_msi, channel_names=channel_names, msi_pixel_size_um=msi_pixel_size_um,
            he_pixel_size_um=he_pixel_size_um, methods=methods, mz=mz, mask_lr=mask_lr, transform=transform,
            landmarks=landmarks, registration_report=registration_report, inputs=inputs, weights_path=weights,
            cache_dir=cache_dir,
        )
    recon = reconstruct(
        lr_msi, he_rgb, he_pixel_size_um=he_pixel_size_um, msi_pixel_size_um=msi_pixel_size_um, settings=settings,
        methods=methods, transform=transform, mask_lr=mask_lr, cache_dir=cache_dir, save_weights=save_weights,
        progress=progress, should_stop=should_stop, on_loss=on_loss,
    )
    weights = save_weights if save_weights is not None and Path(save_weights).is_file() else None
    return Project.from_reconstruction(
        recon, lr_msi=lr_msi, channel_names=channel_names, msi_pixel_size_um=msi_pixel_size_um,
        he_pixel_size_um=he_pixel_size_um, mz=mz, mask_lr=mask_lr, transform=transform, landmarks=landmarks,
        registration_report=registration_report, inputs=inputs, weights_path=weights, cache_dir=cache_dir,
    )
