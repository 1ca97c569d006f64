"""``smsdl reconstruct``: the real use: super-resolve an MSI with the H&E, no ground truth.

``smsdl reconstruct --he HE --msi MSI.imzML --factor F [--mz M ...|--peaks N] [--transform T.tfm]
[--baselines bicubic,backprojection,cnn] [--fast] [--force-histology] [--chunk-channels N] -o OUTDIR``
writes ``sr_smsdl.ome.tif`` (channel names = m/z, physical pixel size = MSI pixel size / F), SMSDL's
predictive standard deviation ``uncertainty_smsdl.ome.tif`` (same shape and pixel size), the
requested baselines (``backprojection`` is the H&E-free control: bicubic + back-projection to the
measured block means), ``figure.png`` and ``run.json`` (settings, timings, inputs; ``guidance``:
per channel the held-out histology gain ± std, the scale-transfer gain ± std where that check ran, and
whether the histology was used; ``choices``: the settings chosen from held-out LR pixels;
``uncertainty``: the uncertainty files). Channels whose gain (scale transfer where it ran, held-out
otherwise) is not clearly positive output the control (``--force-histology``: none); the run prints which.

**Many channels.** Every run goes through one channel-chunked loop (every method on every chunk:
SMSDL, bicubic, the control, the CNN). An MSI with more than 64 channels (or any MSI with
``--chunk-channels N``) is cut into chunks of N channels (default 64) and goes through
:func:`napari_smsdl.reconstruction.reconstruct_many_channels`: the H&E features are computed once,
each chunk's SMSDL regression (and CNN) is trained on its own, and every method's SR stack is
streamed to ``OUTDIR/sr_<method>.zarr``; the OME-TIFFs are then written page by page from those
stores. An imzML's ion images are streamed to ``OUTDIR/msi_lr.zarr`` (a group of channels per pass
over the file), a 3-D ``.npy`` stack is memory-mapped. ``--project`` saves a lazy project (SR
stacks copied page by page, see :mod:`napari_smsdl.project`). ``--chunk-channels 0`` keeps all
channels in one chunk in memory whatever their number. The figure shows the first channels.

**torchrun.** ``torchrun --nproc_per_node=N -m napari_smsdl reconstruct ...`` takes the same
arguments and writes the same files. Rank 0 computes the in-memory features and sends them to the
others (tiled features are shared between ranks); one chunk is trained by every rank together (the
regression under DistributedDataParallel on shards of the MSI pixels,
:func:`napari_smsdl.reconstruction.train_regression`), several chunks are dealt between the ranks.
Rank 0 alone writes the OME-TIFFs, figure, ``run.json`` and project, and prints.

``--project DIR`` also saves the run as a project folder (see :mod:`napari_smsdl.project`: inputs
with their SHA-256, transform and landmarks, parameters, ViT weights, feature cache, SR stacks),
which the napari plugin's Export & project widget reopens. Without ``--he``/``--msi`` (and
``--factor``), ``smsdl reconstruct --project DIR -o OUTDIR`` reopens a saved project instead and
writes the same outputs from its stored results, without computing anything again.

``--spatialdata OUT.zarr`` also writes the run (or the reopened project) as one SpatialData store:
H&E, MSI, every SR stack and uncertainty in one µm coordinate system, and a table of SMSDL's SR
pixels × m/z (:func:`napari_smsdl.project.export_spatialdata`; needs ``napari-smsdl[spatialdata]``).
``--msi`` also takes a SpatialData store holding an image of m/z channels or a table of m/z.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import resource
import time
from pathlib import Path

import numpy as np

from .._files import write_json_atomic
from .._outputs import check_writable_dir, output_folder
from ._progress import cli_progress
from ._common import (
    add_method_args,
    add_msi_channel_args,
    add_output_args,
    load_he,
    load_msi,
    load_transform_arg,
    settings_from_args,
)

log = logging.getLogger(__name__)

#: Arguments that a reopening ``--project DIR`` makes unnecessary.
REOPEN_OPTIONAL = ("he", "msi", "factor")
#: Channels shown in the figure of a chunked (many-channel) run.
FIGURE_CHANNELS = 6


def add_parser(subparsers) -> None:
    from ..reconstruction import CHUNKED_ABOVE_CHANNELS, DEFAULT_CHUNK_CHANNELS

    parser = subparsers.add_parser("reconstruct", help="super-resolve an MSI guided by its H&E (SMSDL-Net)")
    parser.add_argument("--he", required=True, help="H&E image (PNG/JPEG/TIFF/OME-TIFF/SVS)")
    parser.add_argument("--msi", required=True, help="MSI: imzML, an ion-image stack (.npy/.tif/.csv/.txt) or a SpatialData .zarr")
    add_method_args(parser)
    add_msi_channel_args(parser)
    parser.add_argument("--baselines", default="", help="also run: comma-separated subset of bicubic,backprojection,cnn "
                        "(backprojection: the H&E-free control, bicubic + back-projection to the block means)")
    parser.add_argument("--tiled", action="store_true",
                        help="compute H&E features tile by tile from the (pyramidal) file, in bounded memory; "
                             "automatic for H&E images above 64 megapixels")
    parser.add_argument(
        "--chunk-channels", type=int, default=None, metavar="N",
        help=f"train SMSDL N channels at a time and stream the SR stack to OUTDIR/sr_smsdl.zarr (many channels); "
        f"automatic with N={DEFAULT_CHUNK_CHANNELS} above {CHUNKED_ABOVE_CHANNELS} channels, 0 = always in memory",
    )
    add_output_args(parser)
    parser.add_argument(
        "--spatialdata", default=None, metavar="OUT.zarr",
        help="also write every image and an SR pixels x m/z table as one SpatialData store "
        "(needs napari-smsdl[spatialdata]; see `smsdl export`)",
    )
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
    parser.set_defaults(func=run, _parser=parser, torchrun=True)


def run(args) -> int:
    from .. import distributed as dd
    from ..errors import InputError
    from ..reconstruction import Method

    start = time.perf_counter()
    missing = [f"--{name}" for name in REOPEN_OPTIONAL if getattr(args, name, None) is None]
    if missing:
        if args.project and len(missing) == len(REOPEN_OPTIONAL):
            return reopen(args, start) if dd.is_main_process() else 0
        parser = getattr(args, "_parser", None)
        message = f"the following arguments are required: {', '.join(missing)}"
        if args.project:
            message += " (or give none of --he/--msi/--factor to reopen the project)"
        if parser is not None:
            parser.error(message)  # exits with status 2 and the usage, as argparse does
        raise InputError(message)
    main = dd.is_main_process()
    from ..reconstruction import check_factor

    check_factor(args.factor)  # --factor 0 is an input error now, not a ZeroDivisionError later
    methods = ["smsdl"] + [m.strip() for m in args.baselines.split(",") if m.strip()]
    unknown = [m for m in methods if m not in {x.value for x in Method}]
    if unknown:
        raise InputError(f"unknown baseline(s) {', '.join(unknown)}: choose from bicubic, backprojection, cnn")
    chunk = getattr(args, "chunk_channels", None)
    if chunk is not None and chunk < 0:
        raise InputError(f"--chunk-channels must be 0 (in memory) or a positive number of channels, got {chunk}")
    if args.cache_dir:
        check_writable_dir(args.cache_dir, option="--cache-dir")
    check_spatialdata_arg(args)
    with contextlib.ExitStack() as stack:
        if args.project:  # one writer at a time, and a read-only folder found now, not at the end
            from ..project._store import project_lock

            # rank 0 holds the lock; a refusal stops every rank with its message
            dd.main_rank_decides(lambda: stack.enter_context(project_lock(args.project, option="--project")))
        # the old cache is carried over so a rerun with --overwrite need not recompute the features
        folder = stack.enter_context(output_folder(args.output, overwrite=args.overwrite,
                                                   carry=() if args.cache_dir else ("cache",)))
        outcome = _run(args, folder, start=start, main=main, methods=methods, chunk=chunk)
    if main:  # after the commit: the paths printed exist
        _report(args, folder, *outcome)
    return 0


def _run(args, folder, *, start: float, main: bool, methods: list[str], chunk: int | None):
    """The run itself, writing into the staging folder ``folder.path`` (``run.json`` last)."""
    from .. import distributed as dd
    from ..errors import InputError
    from ..evaluation import comparison_figure
    from ..io import write_tiff_stack
    from ..reconstruction import CHUNKED_ABOVE_CHANNELS, DEFAULT_CHUNK_CHANNELS, reconstruct

    out = folder.path
    lazy_above = None if chunk == 0 else (0 if chunk else CHUNKED_ABOVE_CHANNELS)
    msi = load_msi(args.msi, args, lazy_above=lazy_above, store=out / "msi_lr.zarr",
                   chunk_channels=chunk or DEFAULT_CHUNK_CHANNELS)
    n_channels = int(msi.data.shape[0])
    chunked = bool(chunk) or (chunk is None and n_channels > CHUNKED_ABOVE_CHANNELS)
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
        he_px = msi_px * msi.data.shape[-2] / he.shape[0]  # same field of view
    settings = settings_from_args(args)
    cache_dir = Path(args.cache_dir) if args.cache_dir else out / "cache"
    weights = out / "vit_weights.pt"
    tiled = not isinstance(he, np.ndarray)
    sr_px = msi_px / args.factor
    info = {
        "inputs": {"he": str(args.he), "msi": str(args.msi), "transform": args.transform},
        "channels": list(msi.channel_names), "mz": list(msi.mz) if msi.mz else None,
        "factor": args.factor, "msi_pixel_size_um": msi_px, "sr_pixel_size_um": sr_px, "he_pixel_size_um": he_px,
    }
    if not main and not chunked:  # the other ranks only take part in the distributed SMSDL training
        methods, weights = ["smsdl"], None
        if not tiled:  # tiled features share one store between the ranks; in memory, rank 0 caches
            cache_dir = None
    with cli_progress() as progress:
        if chunked:
            from ..reconstruction import reconstruct_many_channels

            result = reconstruct_many_channels(
                msi.data, he, he_pixel_size_um=he_px, msi_pixel_size_um=msi_px, out=out, settings=settings,
                methods=methods, transform=transform, channel_names=msi.channel_names,
                chunk_channels=chunk or DEFAULT_CHUNK_CHANNELS, cache_dir=cache_dir, save_weights=weights,
                progress=progress,
            )
        else:
            result = reconstruct(
                msi.data, he, he_pixel_size_um=he_px, msi_pixel_size_um=msi_px, settings=settings, methods=methods,
                transform=transform, cache_dir=cache_dir, save_weights=weights, progress=progress,
            )
    if not main:  # the other ranks only took part in the features, the training and the channel chunks
        return None
    if chunked:  # zarr stores, written page by page; the figure shows the first channels
        sr = {name: stack.open() for name, stack in result.sr.items()}
        stores = {name: stack for name, stack in result.sr.items() if stack.open_uncertainty() is not None}
        spread = {name: stack.open_uncertainty() for name, stack in stores.items()}  # SMSDL's predictive std
        guidance = {name: stack.guidance() for name, stack in stores.items()}
        choices = {name: _store_choices(stack) for name, stack in stores.items()}
        shown = {name: stack.read(slice(0, FIGURE_CHANNELS)) for name, stack in result.sr.items()}
        figure = {"channel_names": msi.channel_names[:FIGURE_CHANNELS], "max_channels": FIGURE_CHANNELS}
        extra = {"chunk_channels": chunk or DEFAULT_CHUNK_CHANNELS,
                 "zarr": {name: str(folder.final(stack.path)) for name, stack in result.sr.items()},
                 "msi_store": None if msi.store is None else str(folder.final(msi.store))}
    else:
        sr, spread, guidance, choices = result.sr, result.uncertainty, dict(result.guidance), dict(result.choices)
        shown = result.sr
        figure = {"channel_names": msi.channel_names, "he_rgb": result.guide_rgb, "pixel_size_um": sr_px}
        extra = {"chunk_channels": None}
    files = {name: str(folder.final(write_tiff_stack(out / f"sr_{name}.ome.tif", stack,
                                                     channel_names=msi.channel_names, pixel_size_um=sr_px)))
             for name, stack in sr.items()}
    uncertainty_files = {name: str(folder.final(write_tiff_stack(
        out / f"uncertainty_{name}.ome.tif", stack, channel_names=msi.channel_names, pixel_size_um=sr_px)))
        for name, stack in spread.items()}
    comparison_figure(out / "figure.png", shown, **figure)
    seconds, used = dict(result.seconds), result.settings
    run_info = {
        **info, "outputs": files, "seconds": {**seconds, "total": time.perf_counter() - start},
        "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "settings": used.to_dict(), "he_tiled": tiled, **extra, "world_size": dd.get_world_size(),
        "uncertainty": uncertainty_files, "guidance": guidance, "choices": choices,
    }
    if args.project:
        saved = save_run_as_project(args, result, msi, msi_px=msi_px, he_px=he_px,
                                    transform=transform, out=out)
        run_info["project"] = str(saved.path)
    if getattr(args, "spatialdata", None):
        from ..project import export_spatialdata

        project = run_project(args, result, msi, msi_px=msi_px, he_px=he_px,
                              transform=transform, out=out)
        run_info["spatialdata"] = str(export_spatialdata(project, args.spatialdata, overwrite=args.overwrite))
    write_json_atomic(out / "run.json", run_info)  # last: its presence marks a finished run
    return [*files.values(), *uncertainty_files.values()], guidance.get("smsdl"), msi.channel_names


def _report(args, folder, written, guidance, channel_names) -> None:
    from ..evaluation._comparison import fallback_summary

    print(f"wrote {', '.join(written)} and {folder.target / 'figure.png'}")
    summary = fallback_summary(guidance, channel_names)
    if summary:
        print(summary)
    if args.project:
        print(f"saved the project to {args.project}")
    if getattr(args, "spatialdata", None):
        print(f"wrote the SpatialData store {args.spatialdata}")


def check_spatialdata_arg(args) -> None:
    """``--spatialdata OUT.zarr``: a .zarr path, free (or ``--overwrite``), and the extra installed,
    all found before the work."""
    target = getattr(args, "spatialdata", None)
    if not target:
        return
    from ..errors import InputError
    from ..io._spatialdata import _import_spatialdata

    path = Path(target)
    if path.suffix.lower() != ".zarr":
        raise InputError("--spatialdata: the store must end in .zarr", path)
    if path.exists() and not args.overwrite:
        raise InputError("--spatialdata: already exists; choose another path or add --overwrite", path)
    _import_spatialdata()


def _store_choices(stack):
    """The held-out choices recorded in a chunked SMSDL store (one entry per chunk), or None."""
    from ..project._project import store_choices

    return store_choices(stack)


def save_run_as_project(args, result, msi, *, msi_px: float, he_px: float, transform, out: Path):
    """Save a finished run (and its inputs, transform, landmarks, weights, cache) as a project.

    ``result`` is a :class:`napari_smsdl.reconstruction.Reconstruction` or, from the chunked path, a
    :class:`napari_smsdl.reconstruction.ManyChannelRun` (a lazy project: the SR stacks are copied page
    by page; the LR stack is held in memory while saving).
    """
    from ..project import save_project

    return save_project(args.project, run_project(args, result, msi, msi_px=msi_px, he_px=he_px,
                                                  transform=transform, out=out))


def run_project(args, result, msi, *, msi_px: float, he_px: float, transform, out: Path):
    """A finished run as an (unsaved) :class:`napari_smsdl.project.Project`, as :func:`save_run_as_project` saves it."""
    from ..project import Project, input_records
    from ..reconstruction import ManyChannelRun

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
    common = dict(
        channel_names=msi.channel_names, msi_pixel_size_um=msi_px, he_pixel_size_um=he_px, mz=msi.mz,
        transform=transform, landmarks=landmarks, registration_report=report,
        inputs=input_records(he_path=args.he, msi_path=args.msi), weights_path=weights if weights.is_file() else None,
        cache_dir=Path(args.cache_dir) if args.cache_dir else out / "cache",
    )
    # a lazy project for a ManyChannelRun: its SR stacks are the zarr stores, saved page by page
    lr = np.asarray(msi.data[:], np.float32) if isinstance(result, ManyChannelRun) else msi.data
    project = Project.from_reconstruction(result, lr_msi=lr, **common)
    return dataclasses.replace(project, msi_origin_rc_um=tuple(msi.origin_rc_um))


def reopen(args, start: float) -> int:
    """Reopen ``--project DIR`` and write its stored results to ``-o`` like a run does."""
    from ..project import is_project, load_project

    if not is_project(args.project):
        load_project(args.project)  # raises its one-line reason (no folder, no manifest) before -o is checked
    check_spatialdata_arg(args)
    with output_folder(args.output, overwrite=args.overwrite) as folder:  # checked before the project is read
        project = load_project(args.project)
        files, summary = _write_reopened(project, folder, start)
        if getattr(args, "spatialdata", None):
            from ..project import export_spatialdata

            files["spatialdata"] = str(export_spatialdata(project, args.spatialdata, overwrite=args.overwrite))
    status = project.input_status()
    changed = [f"{role} {state}" for role, state in status.items() if state != "unchanged"]
    print(f"reopened {project.path} (saved {project.saved_at}); wrote {', '.join(files.values())} and "
          f"{folder.target / 'figure.png'}" + (f"; inputs: {', '.join(changed)}" if changed else ""))
    if summary:
        print(summary)
    return 0


def _write_reopened(project, folder, start: float):
    from ..evaluation import comparison_figure
    from ..evaluation._comparison import fallback_summary
    from ..io import write_tiff_stack
    from ..project._store import _pageable

    out = folder.path
    names = list(project.channel_names)
    files = {}
    for name, stack in project.sr.items():
        files[name] = str(folder.final(write_tiff_stack(out / f"sr_{name}.ome.tif", stack, channel_names=names,
                                                        pixel_size_um=project.sr_pixel_size_um)))
    uncertainty_files = {}
    for name, stack in project.uncertainty.items():
        uncertainty_files[name] = str(folder.final(write_tiff_stack(
            out / f"uncertainty_{name}.ome.tif", _pageable(stack), channel_names=names,
            pixel_size_um=project.sr_pixel_size_um)))
    # a lazy (many-channel) project: the figure shows its first channels, read from disk
    shown = project.subset(range(min(FIGURE_CHANNELS, len(names)))) if project.lazy else project
    comparison_figure(out / "figure.png", shown.sr, truth=shown.truth, mask=shown.mask_hr,
                      channel_names=list(shown.channel_names), max_channels=FIGURE_CHANNELS,
                      he_rgb=shown.guide_rgb, pixel_size_um=project.sr_pixel_size_um)
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
        "uncertainty": uncertainty_files, "guidance": project.guidance, "choices": project.choices,
    })  # last: its presence marks a finished run
    return files, fallback_summary(project.guidance.get("smsdl"), names, project.mz)
