"""Argument helpers shared by the reconstruction commands."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError


@dataclass(frozen=True)
class MsiInput:
    """An MSI stack (C, rows, cols) with NaN where not acquired, its names and pixel size."""

    data: np.ndarray
    channel_names: tuple[str, ...]
    pixel_size_um: float | None
    mz: tuple[float, ...] | None = None


def add_msi_channel_args(parser) -> None:
    parser.add_argument("--mz", type=float, action="append", default=[], help="m/z channel (repeatable; imzML input)")
    parser.add_argument("--peaks", type=int, default=5, help="with imzML and no --mz: the N strongest peaks (default 5)")
    parser.add_argument("--tol", default="10ppm", help="m/z window half-width, e.g. 10ppm or 0.01da")
    parser.add_argument("--norm", choices=["none", "tic", "rms"], default="none", help="per-pixel normalisation")
    parser.add_argument("--shape", default=None, help="ROWSxCOLS, for a CSV/TXT table of pixels × channels")


def load_msi(path: str, args) -> MsiInput:
    """Read an imzML (ion images of --mz or the strongest peaks) or an ion stack (.npy/.tif/.csv/.txt)."""
    p = Path(path)
    if p.suffix.lower() == ".imzml":
        from ..msi import open_imzml

        ds = open_imzml(p, pixel_size_um=getattr(args, "msi_pixel_size", None))
        mz = list(args.mz) or [float(m) for m in ds.pick_peaks(args.peaks)]
        images = ds.ion_images(mz, args.tol, norm=args.norm)
        return MsiInput(images.data, tuple(images.channel_names), ds.pixel_size_um, tuple(mz))
    from ..ion_stack import read_ion_stack

    shape = None
    if getattr(args, "shape", None):
        try:
            shape = tuple(int(v) for v in args.shape.lower().split("x"))
        except ValueError as exc:
            raise InputError(f"--shape must look like 40x36, got {args.shape!r}") from exc
    stack = read_ion_stack(p, shape_rc=shape)
    data = stack.data.copy()
    return MsiInput(data, stack.channel_names, stack.pixel_size_um)


#: H&E images larger than this (pixels at full resolution) are processed tile by tile.
TILED_ABOVE_PIXELS = 64e6


def load_he(path: str, *, pixel_size_um: float | None, tiled: bool | None = False):
    """The H&E in memory, or (``tiled=True``, or ``None`` and a whole slide) the lazy image itself."""
    from ..histology import open_histology

    image = open_histology(path, pixel_size_um=pixel_size_um)
    if tiled is None:
        tiled = image.shape[0] * image.shape[1] > TILED_ABOVE_PIXELS
    if tiled:
        return image, image.pixel_size_um
    return image.read(0), image.pixel_size_um


def add_method_args(parser) -> None:
    parser.add_argument("--factor", type=int, required=True, help="super-resolution factor F (2-16)")
    parser.add_argument("--fast", action="store_true", help="the fast preset (tests, demos: under 2 minutes)")
    parser.add_argument("--transform", default=None, help="transform.tfm from `smsdl register` (MSI µm → H&E µm)")
    parser.add_argument("--he-pixel-size", type=float, default=None, help="H&E pixel size in µm")
    parser.add_argument("--msi-pixel-size", type=float, default=None, help="MSI pixel size in µm")
    parser.add_argument("--seed", type=int, default=0, help="seed for every random part (default 0)")
    parser.add_argument("--cnn-iterations", type=int, default=None, help="CNN iterations (default: the preset's)")
    parser.add_argument("--ssl-steps", type=int, default=None, help="self-supervised ViT steps per level (default: the preset's)")
    parser.add_argument("--regression-steps", type=int, default=None, help="SMSDL regression steps (default: the preset's)")
    parser.add_argument("--checkpoint", default=None, help="local ViT weights to use instead of self-supervised training")
    parser.add_argument("--cache-dir", default=None, help="feature cache folder (default OUTDIR/cache)")
    parser.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda")


def settings_from_args(args):
    import dataclasses

    from ..pipeline import Settings

    settings = Settings.preset("fast" if args.fast else "default", factor=args.factor, seed=args.seed, device=args.device)
    if args.cnn_iterations:
        settings = dataclasses.replace(settings, cnn_iterations=args.cnn_iterations)
    if args.ssl_steps is not None:
        settings = dataclasses.replace(settings, features=dataclasses.replace(settings.features, ssl_steps=args.ssl_steps))
    if args.regression_steps is not None:
        settings = dataclasses.replace(
            settings, regression=dataclasses.replace(settings.regression, steps=args.regression_steps)
        )
    if args.checkpoint:
        settings = dataclasses.replace(settings, features=dataclasses.replace(settings.features, checkpoint=args.checkpoint))
    return settings


def load_transform_arg(path: str | None):
    if not path:
        return None
    from ..registration import load_transform

    return load_transform(path)
