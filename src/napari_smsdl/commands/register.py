"""``smsdl register``: register an H&E onto an MSI and write the transform and its quality report.

``smsdl register --he HE_IMAGE --msi MSI_IMAGE --he-pixel-size UM --msi-pixel-size UM
[--landmarks pairs.csv] -o OUTDIR``

MSI_IMAGE is an ``.imzML`` (its TIC image is registered) or a single-channel image (TIFF, PNG,
``.npy``; a multi-channel stack uses ``--msi-feature``). ``pairs.csv`` has the header
``he_row,he_col,msi_row,msi_col`` in pixel (data) coordinates of each image. Writes
``OUTDIR/transform.tfm`` (MSI physical µm → H&E physical µm, readable by ``SimpleITK.ReadTransform``)
and ``OUTDIR/report.json``, plus ``affine.tfm``, ``params.json``, ``landmarks.csv`` and, with
``--images``, TIFFs of the warped H&E, the checkerboard and the Jacobian map.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    from ..registration import Criterion, FixedFeature, MovingFeature, RegistrationParams

    defaults = RegistrationParams()
    parser = subparsers.add_parser(
        "register",
        help="register an H&E onto an MSI (landmark affine + B-spline) and write transform.tfm + report.json",
        description=(
            "Register an H&E (moving) onto an MSI (fixed): landmark affine, mutual-information affine, B-spline. "
            "Writes OUTDIR/transform.tfm (MSI physical um -> H&E physical um; x = col * pixel size, "
            "y = row * pixel size, origin at the centre of pixel (0, 0)) and OUTDIR/report.json (held-out "
            "landmark error, folds in tissue, stages, seconds)."
        ),
    )
    parser.add_argument("--he", required=True, metavar="HE_IMAGE", help="H&E image (PNG/JPEG/TIFF/OME-TIFF/SVS)")
    parser.add_argument(
        "--msi", required=True, metavar="MSI_IMAGE", help=".imzML (TIC used) or single-channel TIFF/PNG/NPY"
    )
    parser.add_argument(
        "--he-pixel-size",
        type=float,
        default=None,
        metavar="UM",
        help="H&E pixel size in µm (default: from the file's metadata)",
    )
    parser.add_argument(
        "--msi-pixel-size",
        type=float,
        default=None,
        metavar="UM",
        help="MSI pixel size in µm (default: from the imzML/TIFF metadata)",
    )
    parser.add_argument(
        "--landmarks",
        default=None,
        metavar="PAIRS_CSV",
        help="CSV with header he_row,he_col,msi_row,msi_col (pixel coordinates); "
        "without it the start is 'same field of view'",
    )
    parser.add_argument("-o", "--output", required=True, metavar="OUTDIR",
                        help="output folder (written whole at the end; refused when it already holds a "
                        "registration, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a previous registration in OUTDIR (the old one stays whole until the new one "
                        "is complete)")
    parser.add_argument(
        "--he-feature",
        choices=[m.value for m in MovingFeature],
        default=defaults.moving_feature.value,
        help=f"H&E image to register (default {defaults.moving_feature.value}; auto: best mutual information)",
    )
    parser.add_argument(
        "--msi-feature",
        choices=[m.value for m in FixedFeature],
        default=defaults.fixed_feature.value,
        help="for a multi-channel MSI stack: tic, pc1, ion (with --msi-channel) or auto",
    )
    parser.add_argument("--msi-channel", type=int, default=0, help="channel for --msi-feature ion (default 0)")
    from ._common import add_region_arg

    add_region_arg(parser)
    parser.add_argument("--no-affine-refinement", action="store_true", help="skip the mutual-information affine stage")
    parser.add_argument("--no-bspline", action="store_true", help="skip the B-spline stage (affine only)")
    parser.add_argument(
        "--mesh-spacing",
        type=float,
        default=defaults.mesh_spacing_msi_px,
        metavar="MSI_PX",
        help=f"final B-spline control-point spacing in MSI pixels (default {defaults.mesh_spacing_msi_px:g})",
    )
    parser.add_argument(
        "--no-guard", action="store_true", help="keep every stage even when it worsens the held-out landmark error"
    )
    parser.add_argument(
        "--criterion",
        choices=[c.value for c in Criterion],
        default=defaults.criterion.value,
        help="what drives the image stages: channels (regression of many ion components on histology "
        "features; the default for an ion stack), mattes (mutual information of one image pair) or auto",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the metric sampling (default 0)")
    parser.add_argument("--threads", type=int, default=None, help="SimpleITK threads (default: all cores)")
    parser.add_argument(
        "--images", action="store_true", help="also write warped_he.tif, checkerboard.tif, jacobian.tif"
    )
    parser.set_defaults(func=run)


def _positive(value, option: str) -> float | None:
    from ..errors import InputError

    if value is None:
        return None
    if not np.isfinite(value) or value <= 0:
        raise InputError(f"{option} must be a positive number of µm, got {value:g}")
    return float(value)


def load_msi_image(path: str | Path, *, pixel_size_um: float | None = None,
                   region: int | None = None) -> tuple[np.ndarray, float | None]:
    """The MSI to register: an imzML's TIC image, an image/stack file, or a SpatialData store's MSI
    (:func:`napari_smsdl.io.read_spatialdata_msi`). ((rows, cols) or (C, rows, cols), µm)."""
    path = Path(path)
    from ._common import check_region

    check_region(path, region)
    from ..io import is_spatialdata

    if is_spatialdata(path):
        from ..io import read_spatialdata_msi

        stack = read_spatialdata_msi(path, pixel_size_um=pixel_size_um).stack
        return (stack.data[0] if stack.data.shape[0] == 1 else stack.data), stack.pixel_size_um
    if path.suffix.lower() == ".imzml":
        from ..io import open_imzml

        ds = open_imzml(path, pixel_size_um=pixel_size_um, region=region)
        return ds.tic_image(), (pixel_size_um or ds.pixel_size_um)
    from ..io import read_ion_stack

    stack = read_ion_stack(path, pixel_size_um=pixel_size_um)
    data = stack.data[0] if stack.data.shape[0] == 1 else stack.data
    return data, (pixel_size_um or stack.pixel_size_um)


def load_he_image(path: str | Path, *, pixel_size_um: float | None, msi_pixel_size_um: float):
    """The H&E at the pyramid level that registration needs: (rgb uint8, level pixel size µm, level-0 → level scale)."""
    import dataclasses

    from ..errors import InputError
    from ..io import open_histology
    from ..registration._levels import HE_LEVEL_FRACTION

    image = open_histology(path)
    size0 = pixel_size_um or image.pixel_size_um
    if size0 is None:
        raise InputError("no pixel size in the file's metadata; give --he-pixel-size", path)
    # the pyramid level, or a strided read of a file without one, at the resolution registration uses
    rgb, scale = dataclasses.replace(image, pixel_size_um=size0).read_reduced(HE_LEVEL_FRACTION * msi_pixel_size_um)
    return rgb, size0 / scale, scale


def run(args) -> int:
    from .._outputs import output_folder
    from ..registration import read_landmarks_csv, save_registration

    t0 = time.perf_counter()
    he_size = _positive(args.he_pixel_size, "--he-pixel-size")
    msi_size = _positive(args.msi_pixel_size, "--msi-pixel-size")
    landmarks = read_landmarks_csv(args.landmarks) if args.landmarks else None
    # checked and staged before the work; written whole at the end (report.json last)
    with output_folder(args.output, overwrite=args.overwrite) as folder:
        result = _register(args, he_size, msi_size, landmarks)
        written = {name: folder.final(path) for name, path in
                   save_registration(result, folder.path, images=args.images).items()}
    rep = result.report
    loo = rep["loo_error_msi_px"]
    held = (
        f"held-out landmark error median {loo['median']:.2f} / p90 {loo['p90']:.2f} MSI px"
        if loo
        else "no held-out error"
    )
    trust = ""
    if rep.get("confidence_msi_px") is not None and rep.get("misregistration_msi_px"):
        mis = rep["misregistration_msi_px"]
        trust = (
            f"; confidence {rep['confidence_msi_px']:.2f} MSI px, local misregistration median "
            f"{mis['median']:.2f} / p90 {mis['p90']:.2f} MSI px"
        )
    print(
        f"{rep['final']}; {held}; {rep['folds_in_tissue']} folded pixel(s) in tissue{trust}; "
        f"{time.perf_counter() - t0:.1f} s"
    )
    for message in rep["messages"]:
        print(f"note: {message}")
    print(f"wrote {written['transform']} and {written['report']}")
    return 0


def _register(args, he_size: float | None, msi_size: float | None, landmarks):
    """Read the images and register them (the result with its H&E side at level 0)."""
    from ..errors import InputError, RegistrationError
    from ..registration import RegistrationParams, register
    from ..registration._levels import landmarks_to_level, result_to_level0

    msi, msi_size = load_msi_image(args.msi, pixel_size_um=msi_size, region=getattr(args, "region", None))
    if msi_size is None:
        raise InputError("no pixel size in the file's metadata; give --msi-pixel-size", args.msi)
    values = np.asarray(msi, np.float64)[np.isfinite(msi)]
    if values.size == 0 or values.min() == values.max():  # ITK would fail with "Zero-valued spacing"
        what = "has no finite value" if values.size == 0 else f"is constant (every value {values[0]:g})"
        raise InputError(f"the MSI image to register {what}: there is no structure to align the H&E to", args.msi)
    he, he_level_size, scale = load_he_image(args.he, pixel_size_um=he_size, msi_pixel_size_um=msi_size)
    landmarks_level0 = landmarks
    landmarks = landmarks_to_level(landmarks, scale)  # H&E landmarks are level-0 pixels
    if args.mesh_spacing <= 0:
        raise InputError(f"--mesh-spacing must be > 0, got {args.mesh_spacing:g}")
    params = RegistrationParams(
        moving_feature=args.he_feature,
        fixed_feature=args.msi_feature,
        fixed_channel=args.msi_channel,
        refine_affine=not args.no_affine_refinement,
        bspline=not args.no_bspline,
        mesh_spacing_msi_px=args.mesh_spacing,
        guard=not args.no_guard,
        seed=args.seed,
        threads=args.threads,
        criterion=args.criterion,
    )
    try:
        from ._progress import cli_progress

        with cli_progress() as progress:
            result = register(
                msi,
                he,
                fixed_pixel_size_um=msi_size,
                moving_pixel_size_um=he_level_size,
                landmarks=landmarks,
                params=params,
                progress=progress,
            )
    except RegistrationError as exc:
        if args.landmarks and exc.path is None and "landmark" in exc.problem:
            raise RegistrationError(exc.problem, args.landmarks) from exc
        raise
    return result_to_level0(
        result, level0_pixel_size_um=he_level_size * scale, scale=scale, landmarks_level0=landmarks_level0
    )
