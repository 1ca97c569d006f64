"""``smsdl reconstruct``: the real use: super-resolve an MSI with the H&E, no ground truth.

``smsdl reconstruct --he HE --msi MSI.imzML --factor F [--mz M ...|--peaks N] [--transform T.tfm]
[--baselines bicubic,cnn] [--fast] -o OUTDIR`` writes ``sr_smsdl.ome.tif`` (channel names = m/z,
physical pixel size = MSI pixel size / F), the requested baselines, ``figure.png`` and
``run.json`` (settings, timings, inputs).

``--project DIR`` also saves the run as a project folder (see :mod:`napari_smsdl.project`: inputs
with their SHA-256, transform and landmarks, parameters, ViT weights, feature cache, SR stacks),
which the napari plugin's Export & project widget reopens. Without ``--he``/``--msi`` (and
``--factor``), ``smsdl reconstruct --project DIR -o OUTDIR`` reopens a saved project instead and
writes the same outputs from its stored results, without computing anything again.
"""

from __future__ import annotations

import logging
import resource
import time
from pathlib import Path

import numpy as np

from ._common import (
    add_method_args,
    add_msi_channel_args,
    load_he,
    load_msi,
    load_transform_arg,
    settings_from_args,
)
from .benchmark import write_json_atomic

log = logging.getLogger(__name__)

#: Arguments that a reopening ``--project DIR`` makes unnecessary.
REOPEN_OPTIONAL = ("he", "msi", "factor")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("reconstruct", help="super-resolve an MSI guided by its H&E (SMSDL-Net)")
    parser.add_argument("--he", required=True, help="H&E image (PNG/JPEG/TIFF/OME-TIFF/SVS)")
    parser.add_argument("--msi", required=True, help="MSI: imzML, or an ion-image stack (.npy/.tif/.csv/.txt)")
    add_method_args(parser)
    add_msi_channel_args(parser)
    parser.add_argument("--baselines", default="", help="also run: comma-separated subset of bicubic,cnn")
    parser.add_argument("--tiled", action="store_true",
                        help="compute H&E features tile by tile from the (pyramidal) file, in bounded memory; "
                             "automatic for H&E images above 64 megapixels")
    parser.add_argument("-o", "--output", required=True, help="output folder")
    parser.add_argument(
        "--project", default=None, metavar="DIR",
        help="also save the run as a project folder; without --he/--msi/--factor, reopen that project and "
        "write its stored results to OUTDIR",
    )
    # --he, --msi and --factor stay required unless --project reopens a saved project (checked in run,
    # with the same argparse error as before)
    for action in parser._actions:
        if action.dest in REOPEN_OPTIONAL:
            action.required = False
    parser.set_defaults(func=run, _parser=parser)


def run(args) -> int:
    from ..errors import InputError
    from ..export import write_tiff_stack
    from ..figures import comparison_figure
    from ..pipeline import reconstruct

    start = time.perf_counter()
    missing = [f"--{name}" for name in REOPEN_OPTIONAL if getattr(args, name, None) is None]
    if missing:
        if args.project and len(missing) == len(REOPEN_OPTIONAL):
            return reopen(args, start)
        parser = getattr(args, "_parser", None)
        message = f"the following arguments are required: {', '.join(missing)}"
        if args.project:
            message += " (or give none of --he/--msi/--factor to reopen the project)"
        if parser is not None:
            parser.error(message)  # exits with status 2 and the usage, as argparse does
        raise InputError(message)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    msi = load_msi(args.msi, args)
    he, he_px = load_he(args.he, pixel_size_um=args.he_pixel_size, tiled=True if args.tiled else None)
    msi_px = args.msi_pixel_size or msi.pixel_size_um
    transform = load_transform_arg(args.transform)
    if msi_px is None:
        if transform is not None:
            raise InputError("--msi-pixel-size is needed with --transform: the MSI has no pixel size", args.msi)
        msi_px = 1.0
    if he_px is None:
        if transform is not None:
            raise InputError("--he-pixel-size is needed with --transform: the H&E has no pixel size", args.he)
        he_px = msi_px * msi.data.shape[1] / he.shape[0]  # same field of view
    methods = ["smsdl"] + [m.strip() for m in args.baselines.split(",") if m.strip()]
    settings = settings_from_args(args)
    result = reconstruct(
        msi.data, he, he_pixel_size_um=he_px, msi_pixel_size_um=msi_px, settings=settings, methods=methods,
        transform=transform, cache_dir=args.cache_dir or out / "cache", save_weights=out / "vit_weights.pt",
    )
    sr_px = msi_px / args.factor
    files = {}
    for name, stack in result.sr.items():
        files[name] = str(write_tiff_stack(out / f"sr_{name}.ome.tif", stack, channel_names=msi.channel_names, pixel_size_um=sr_px))
    comparison_figure(out / "figure.png", result.sr, channel_names=msi.channel_names)
    run_info = {
        "inputs": {"he": str(args.he), "msi": str(args.msi), "transform": args.transform},
        "channels": list(msi.channel_names), "mz": list(msi.mz) if msi.mz else None,
        "factor": args.factor, "msi_pixel_size_um": msi_px, "sr_pixel_size_um": sr_px, "he_pixel_size_um": he_px,
        "outputs": files, "seconds": {**result.seconds, "total": time.perf_counter() - start},
        "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "settings": result.settings.to_dict(),
        "he_tiled": not isinstance(he, np.ndarray),
    }
    if args.project:
        saved = save_run_as_project(args, result, msi, msi_px=msi_px, he_px=he_px, transform=transform, out=out)
        run_info["project"] = str(saved.path)
    write_json_atomic(out / "run.json", run_info)
    print(f"wrote {', '.join(files.values())} and {out / 'figure.png'}")
    if args.project:
        print(f"saved the project to {args.project}")
    return 0


def save_run_as_project(args, result, msi, *, msi_px: float, he_px: float, transform, out: Path):
    """Save a finished run (and its inputs, transform, landmarks, weights, cache) as a project."""
    from ..project import Project, input_records, save_project

    landmarks = report = None
    if args.transform:
        folder = Path(args.transform)
        folder = folder if folder.is_dir() else folder.parent
        if (folder / "landmarks.csv").is_file():
            from ..registration import read_landmarks_csv

            landmarks = read_landmarks_csv(folder / "landmarks.csv")
        if (folder / "report.json").is_file():
            from ..registration import load_report

            report = load_report(folder)
    weights = out / "vit_weights.pt"
    project = Project.from_reconstruction(
        result, lr_msi=msi.data, channel_names=msi.channel_names, msi_pixel_size_um=msi_px, he_pixel_size_um=he_px,
        mz=msi.mz, transform=transform, landmarks=landmarks, registration_report=report,
        inputs=input_records(he_path=args.he, msi_path=args.msi), weights_path=weights if weights.is_file() else None,
        cache_dir=Path(args.cache_dir) if args.cache_dir else out / "cache",
    )
    return save_project(args.project, project)


def reopen(args, start: float) -> int:
    """Reopen ``--project DIR`` and write its stored results to ``-o`` like a run does."""
    from ..export import write_tiff_stack
    from ..figures import comparison_figure
    from ..project import load_project

    project = load_project(args.project)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    names = list(project.channel_names)
    files = {}
    for name, stack in project.sr.items():
        files[name] = str(write_tiff_stack(out / f"sr_{name}.ome.tif", stack, channel_names=names,
                                           pixel_size_um=project.sr_pixel_size_um))
    comparison_figure(out / "figure.png", project.sr, truth=project.truth, mask=project.mask_hr, channel_names=names)
    inputs = {rec.role: rec.path for rec in project.inputs}
    status = project.input_status()
    write_json_atomic(out / "run.json", {
        "inputs": {"he": inputs.get("he"), "msi": inputs.get("msi"), "transform": None},
        "input_status": status,
        "channels": names, "mz": list(project.mz) if project.mz else None,
        "factor": project.factor, "msi_pixel_size_um": project.msi_pixel_size_um,
        "sr_pixel_size_um": project.sr_pixel_size_um, "he_pixel_size_um": project.he_pixel_size_um,
        "outputs": files, "seconds": {**project.seconds, "total": time.perf_counter() - start},
        "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "settings": project.settings.to_dict(),
        "project": str(project.path), "reopened": True, "saved_at": project.saved_at,
    })
    changed = [f"{role} {state}" for role, state in status.items() if state != "unchanged"]
    print(f"reopened {project.path} (saved {project.saved_at}); wrote {', '.join(files.values())} and "
          f"{out / 'figure.png'}" + (f"; inputs: {', '.join(changed)}" if changed else ""))
    return 0
