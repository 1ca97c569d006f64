"""``smsdl benchmark``: degrade a real MSI by F, reconstruct it with SMSDL, BI, the H&E-free control
and the CNN, score all.

Contract: ``smsdl benchmark --he HE_IMAGE --msi GROUND_TRUTH --factor F [--fast]
[--transform FILE.tfm] [--seed N] [--force-histology] -o OUTDIR`` writes ``metrics.json`` (method →
metric → {"mean", "per_channel"}, plus "seconds"; ``backprojection`` is the H&E-free control, and
``smsdl`` also holds ``guidance`` — the per-channel held-out histology gain and whether the channel
used the histology — ``choices`` and ``uncertainty_spearman``), the SR stacks as OME-TIFF
(``sr_<method>.ome.tif``), SMSDL's predictive standard deviation as ``uncertainty_smsdl.ome.tif``
(same shape and pixel size as ``sr_smsdl.ome.tif``) and ``figure.png``. It prints one line naming
the channels that fell back to the control (``--force-histology``: none do).

Without ``--transform`` the H&E is taken to cover the MSI's field of view, and that start is
refined on mutual information when that clearly helps (``--no-refine`` turns it off); the decision
and its reason are in ``metrics.json`` under ``settings.registration``.

Under ``torchrun --nproc_per_node=N -m napari_smsdl benchmark ...`` (same arguments, same outputs)
every rank runs the SMSDL part of the pipeline: rank 0 computes the H&E features (reading and
writing the feature cache) and sends them to the others, and the regression runs under
DistributedDataParallel, each rank on its share of the MSI pixels. Rank 0 alone also runs the
baselines, scores, writes every file and prints.
"""

from __future__ import annotations

import logging
import resource
import time

from .._files import write_json_atomic
from .._outputs import check_writable_dir, output_folder
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

#: Methods scored by default (every one there is).
DEFAULT_METHODS = "smsdl,bicubic,backprojection,cnn"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "benchmark", help="score SMSDL, bicubic, the H&E-free control and CNN on a downsampled real MSI against its "
        "native resolution"
    )
    parser.add_argument("--he", required=True, help="H&E image (PNG/JPEG/TIFF/OME-TIFF/SVS)")
    parser.add_argument("--msi", required=True, help="ground truth: imzML, or .npy (rows, cols)/(channels, rows, cols)")
    add_method_args(parser)
    add_msi_channel_args(parser)
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help=f"comma-separated subset of {DEFAULT_METHODS} (backprojection: the H&E-free control, "
                        "bicubic + back-projection to the measured block means)")
    parser.add_argument(
        "--no-refine", action="store_true",
        help="without --transform, use the same-field-of-view start as it is (default: refine it on mutual "
        "information and keep the refinement only when it clearly helps; the decision is in metrics.json)",
    )
    add_output_args(parser)
    parser.set_defaults(func=run, torchrun=True)



def run(args) -> int:
    from ..distributed import is_main_process
    from ..evaluation._comparison import fallback_summary

    start = time.perf_counter()
    main = is_main_process()
    _methods(args.methods)  # a typo is refused before the output folder is touched
    if args.cache_dir:
        check_writable_dir(args.cache_dir, option="--cache-dir")
    # checked and staged before any work; written whole at the end (metrics.json last)
    with output_folder(args.output, overwrite=args.overwrite, carry=() if args.cache_dir else ("cache",)) as folder:
        result = _run(args, folder, start=start, main=main)
    if result is None:
        return 0
    msi, result = result
    out = folder.target
    for name in result.reconstruction.sr:
        m = result.metrics[name]
        print(f"{name:>14}: RMSE {m['rmse']['mean']:.4f}  SSIM {m['ssim']['mean']:.4f}  R2 {m['r2']['mean']:.4f}  "
              f"PSNR {m['psnr']['mean']:.2f}  ({m['seconds']:.1f} s)")
    summary = fallback_summary(result.reconstruction.guidance.get("smsdl"), msi.channel_names)
    if summary:
        print(summary)
    print(f"wrote {out / 'metrics.json'}, {out / 'figure.png'}")
    return 0


def _methods(text: str) -> list[str]:
    from ..errors import InputError
    from ..reconstruction import Method

    methods = [m.strip() for m in text.split(",") if m.strip()]
    known = [m.value for m in Method]
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise InputError(f"unknown method(s) {', '.join(unknown)}: choose from {', '.join(known)}")
    return methods


def _run(args, folder, *, start: float, main: bool):
    """The benchmark, writing into the staging folder ``folder.path``; (msi, result) on rank 0, else None."""
    from ..distributed import get_world_size
    from ..errors import InputError
    from ..evaluation import comparison_figure, run_benchmark
    from ..io import write_tiff_stack

    out = folder.path
    msi = load_msi(args.msi, args)
    he, he_px = load_he(args.he, pixel_size_um=args.he_pixel_size)
    truth = msi.data
    if truth.ndim != 3 or min(truth.shape[1:]) < 2 * args.factor:
        raise InputError(f"ground truth of shape {truth.shape} is too small for factor {args.factor}", args.msi)
    truth_px = args.msi_pixel_size or msi.pixel_size_um
    transform = load_transform_arg(args.transform)
    if truth_px is None:
        if transform is not None and not args.msi_pixel_size:
            raise InputError("--msi-pixel-size is needed with --transform when the MSI has no pixel size", args.msi)
        truth_px = 1.0  # one unit per ground-truth pixel; only ratios matter without a transform
    if he_px is None:
        if transform is not None:
            raise InputError("--he-pixel-size is needed with --transform when the H&E has no pixel size", args.he)
        # same field of view: the H&E spans the MSI grid
        he_px = truth_px * truth.shape[1] / he.shape[0]
    settings = settings_from_args(args)
    methods = _methods(args.methods)
    cache_dir = args.cache_dir or out / "cache"
    if not main:  # other ranks only take part in the distributed SMSDL training
        methods, cache_dir = [m for m in methods if m == "smsdl"], None
        if not methods:
            return None

    from ._progress import cli_progress

    with cli_progress() as progress:
        result = run_benchmark(
            truth, he, factor=args.factor, truth_pixel_size_um=truth_px, he_pixel_size_um=he_px, settings=settings,
            transform=transform, methods=methods, cache_dir=cache_dir, refine=not args.no_refine, progress=progress,
        )
    if not main:
        return None
    sr_px = truth_px
    for name, stack in result.reconstruction.sr.items():
        write_tiff_stack(out / f"sr_{name}.ome.tif", stack, channel_names=msi.channel_names, pixel_size_um=sr_px)
    for name, stack in result.reconstruction.uncertainty.items():  # SMSDL's predictive std, on the SR grid
        write_tiff_stack(out / f"uncertainty_{name}.ome.tif", stack, channel_names=msi.channel_names,
                         pixel_size_um=sr_px)
    write_tiff_stack(out / "ground_truth.ome.tif", result.truth, channel_names=msi.channel_names, pixel_size_um=sr_px)
    write_tiff_stack(out / "lr_input.ome.tif", result.lr, channel_names=msi.channel_names, pixel_size_um=sr_px * args.factor)
    comparison_figure(
        out / "figure.png", result.reconstruction.sr, truth=result.truth, mask=result.mask_hr,
        channel_names=msi.channel_names, he_rgb=result.reconstruction.guide_rgb, pixel_size_um=sr_px,
    )
    metrics = dict(result.metrics)
    metrics["seconds"] = {name: m["seconds"] for name, m in result.metrics.items()}
    metrics["seconds"]["total"] = time.perf_counter() - start
    metrics["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    metrics["settings"] = {
        "factor": args.factor, "preset": "fast" if args.fast else "default", "seed": args.seed,
        "channels": list(msi.channel_names), "truth_shape": list(result.truth.shape), "lr_shape": list(result.lr.shape),
        "transform": args.transform, "he_pixel_size_um": he_px, "truth_pixel_size_um": truth_px,
        "world_size": get_world_size(), "force_histology": not settings.regression.fallback,
        "registration": result.registration or {"start": "--transform" if args.transform else "same field of view",
                                                 "refinement": "not run"},
    }
    write_json_atomic(out / "metrics.json", metrics)  # last: its presence marks a finished run
    return msi, result
