"""``smsdl reconstruct``: the real use: super-resolve an MSI with the H&E, no ground truth.

``smsdl reconstruct --he HE --msi MSI.imzML --factor F [--mz M ...|--peaks N] [--transform T.tfm]
[--baselines bicubic,cnn] [--fast] -o OUTDIR`` writes ``sr_smsdl.ome.tif`` (channel names = m/z,
physical pixel size = MSI pixel size / F), the requested baselines, ``figure.png`` and
``run.json`` (settings, timings, inputs).
"""

from __future__ import annotations

import logging
import resource
import time
from pathlib import Path

from ._common import add_method_args, add_msi_channel_args, load_he, load_msi, load_transform_arg, settings_from_args
from .benchmark import write_json_atomic

log = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("reconstruct", help="super-resolve an MSI guided by its H&E (SMSDL-Net)")
    parser.add_argument("--he", required=True, help="H&E image (PNG/JPEG/TIFF/OME-TIFF/SVS)")
    parser.add_argument("--msi", required=True, help="MSI: imzML, or an ion-image stack (.npy/.tif/.csv/.txt)")
    add_method_args(parser)
    add_msi_channel_args(parser)
    parser.add_argument("--baselines", default="", help="also run: comma-separated subset of bicubic,cnn")
    parser.add_argument("-o", "--output", required=True, help="output folder")
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..errors import InputError
    from ..export import write_tiff_stack
    from ..figures import comparison_figure
    from ..pipeline import reconstruct

    start = time.perf_counter()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    msi = load_msi(args.msi, args)
    he, he_px = load_he(args.he, pixel_size_um=args.he_pixel_size)
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
    write_json_atomic(out / "run.json", {
        "inputs": {"he": str(args.he), "msi": str(args.msi), "transform": args.transform},
        "channels": list(msi.channel_names), "mz": list(msi.mz) if msi.mz else None,
        "factor": args.factor, "msi_pixel_size_um": msi_px, "sr_pixel_size_um": sr_px, "he_pixel_size_um": he_px,
        "outputs": files, "seconds": {**result.seconds, "total": time.perf_counter() - start},
        "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "settings": result.settings.to_dict(),
    })
    print(f"wrote {', '.join(files.values())} and {out / 'figure.png'}")
    return 0
