"""``smsdl demo [-o DIR] [--headless]``: the whole workflow on the built-in sample.

* With a display, napari opens with the sample loaded (H&E, measured MSI, ground truth) and the
  Load, Register, Train, Compare and Export & project widgets docked; Train is set to the fast
  preset, so pressing Start shows SMSDL, BI, the H&E-free control and CNN side by side within a
  couple of minutes.
* With no display (neither ``DISPLAY`` nor ``WAYLAND_DISPLAY``, or one Qt cannot open) or with
  ``--headless``, the benchmark runs on the sample with the fast preset (the ground truth
  block-averaged by F = 4, reconstructed by every method, scored) and writes ``figure.png``,
  ``metrics.json``, the SR stacks and SMSDL's uncertainty (OME-TIFF) into DIR (default
  ``demo-output``), and says which channels fell back to the H&E-free control.

Also runnable as ``python -m napari_smsdl.commands.demo`` (what ``make demo`` calls).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

#: The plugin's dock widgets, in the order of the workflow (display names in napari.yaml).
WIDGETS = ("Load", "Register", "Train", "Compare", "Export & project")
DEFAULT_OUTPUT = "demo-output"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="open napari on the built-in sample with the widgets docked (headless: run the benchmark)"
    )
    parser.add_argument("-o", "--output", default=DEFAULT_OUTPUT, help=f"headless output folder (default {DEFAULT_OUTPUT})")
    parser.add_argument("--headless", action="store_true", help="run the benchmark without opening napari")
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace a previous run in the output folder (the default {DEFAULT_OUTPUT} is "
                        "always replaced: it is the demo's own)")
    parser.set_defaults(func=run)


def display_available(env: Mapping[str, str] | None = None, *, probe: bool = True) -> bool:
    """True when a display is named in ``env`` and (with ``probe``) Qt can really open it.

    The probe starts a short Python process that creates a ``QApplication``: a display variable
    left over in a shell whose X server is gone would otherwise abort the demo inside Qt.
    """
    env = dict(os.environ if env is None else env)
    if not (env.get("DISPLAY") or env.get("WAYLAND_DISPLAY")):
        return False
    if env.get("QT_QPA_PLATFORM", "").startswith(("offscreen", "minimal")):
        return False
    if not probe:
        return True
    code = "from qtpy.QtWidgets import QApplication; QApplication([])"
    try:
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def run_headless(outdir: str | os.PathLike, *, settings=None,
                 methods=("smsdl", "bicubic", "backprojection", "cnn"), overwrite: bool = True) -> dict:
    """Run the benchmark on the built-in sample and write ``figure.png`` and ``metrics.json``.

    ``settings`` defaults to the fast preset. The folder is written as a unit (staged, renamed into
    place, ``metrics.json`` last); a previous run there is replaced only with ``overwrite``.
    Returns the metrics (method → metric → mean and per-channel values, plus ``seconds``).
    """
    from .._outputs import output_folder

    with output_folder(outdir, overwrite=overwrite) as folder:
        metrics = _run_headless(folder.path, settings=settings, methods=methods)
    out = folder.target
    for name in metrics["settings"]["methods"]:
        m = metrics[name]
        print(f"{name:>14}: RMSE {m['rmse']['mean']:.4f}  SSIM {m['ssim']['mean']:.4f}  R2 {m['r2']['mean']:.4f}  "
              f"PSNR {m['psnr']['mean']:.2f}  ({m['seconds']:.1f} s)")
    if metrics["settings"].get("fallback_summary"):
        print(metrics["settings"]["fallback_summary"])
    print(f"wrote {out / 'figure.png'} and {out / 'metrics.json'}")
    return metrics


def _run_headless(out: Path, *, settings, methods) -> dict:
    from .._files import jsonable
    from ..evaluation import comparison_figure, run_benchmark
    from ..io import write_metrics_csv, write_tiff_stack
    from ..reconstruction import Settings
    from ..sample import make_sample
    from .benchmark import write_json_atomic

    from ..evaluation._comparison import fallback_summary

    start = time.perf_counter()
    sample = make_sample()
    settings = settings or Settings.preset("fast", factor=sample.factor)
    truth_px = sample.msi_pixel_size_um / sample.factor

    from ._progress import cli_progress

    with cli_progress() as progress:
        result = run_benchmark(
            sample.ground_truth, sample.he_rgb, factor=sample.factor, truth_pixel_size_um=truth_px,
            he_pixel_size_um=sample.he_pixel_size_um, settings=settings, mask_hr=sample.mask_hr, methods=methods,
            cache_dir=out / "cache", progress=progress,
        )
    names = [f"m/z {mz:.4f}" for mz in sample.mz]
    for name, stack in result.reconstruction.sr.items():
        write_tiff_stack(out / f"sr_{name}.ome.tif", stack, channel_names=names, pixel_size_um=truth_px)
    for name, stack in result.reconstruction.uncertainty.items():
        write_tiff_stack(out / f"uncertainty_{name}.ome.tif", stack, channel_names=names, pixel_size_um=truth_px)
    comparison_figure(out / "figure.png", result.reconstruction.sr, truth=result.truth, mask=result.mask_hr,
                      channel_names=names, lr=result.lr, he_rgb=result.reconstruction.guide_rgb,
                      pixel_size_um=truth_px)
    write_metrics_csv(out / "metrics.csv", result.metrics, channel_names=names)
    metrics = dict(result.metrics)
    metrics["seconds"] = {name: m["seconds"] for name, m in result.metrics.items()}
    metrics["seconds"]["total"] = time.perf_counter() - start
    metrics["settings"] = {
        "sample": "napari-smsdl built-in sample (scikit-image IHC image + simulated MSI)",
        "factor": sample.factor, "channels": names, "truth_pixel_size_um": truth_px,
        "msi_pixel_size_um": sample.msi_pixel_size_um, "he_pixel_size_um": sample.he_pixel_size_um,
        "reconstruction": result.reconstruction.settings.to_dict(),
        "methods": list(result.reconstruction.sr),
        "fallback_summary": fallback_summary(result.reconstruction.guidance.get("smsdl"), names),
    }
    write_json_atomic(out / "metrics.json", jsonable(metrics))  # last: it marks a finished run
    return metrics


def build_viewer(viewer=None, *, show: bool = True, settings=None):
    """napari with the sample loaded and the single-dock flow (every widget, as steps), Train on the fast preset.

    Returns ``(viewer, {display name: widget})``.
    """
    from ..widgets.train import preload_torch

    preload_torch()  # before the canvas exists: see preload_torch for why
    import napari

    from ..reconstruction import Settings

    if viewer is None:
        viewer = napari.Viewer(title="napari-smsdl demo", show=show)
    viewer.open_sample("napari-smsdl", "smsdl_sample")
    # one dock for the whole flow (five docked widgets would stack taller than the screen)
    _, flow = viewer.window.add_plugin_dock_widget("napari-smsdl", "SMSDL flow (all steps, one dock)")
    widgets = dict(zip(WIDGETS, (flow.load, flow.register, flow.train, flow.compare, flow.export), strict=True))
    train = widgets["Train"]
    train.set_settings(settings or Settings.preset("fast", factor=4))
    train.status.value = "The sample is loaded: press Start (fast preset, about a minute), then look at Compare."
    flow.go_to("Train")  # the step to start from
    return viewer, widgets


def run(args) -> int:
    if args.headless or not display_available():
        if not args.headless:
            print("no display: running the demo headless (benchmark on the sample, fast preset)")
        # the default folder is the demo's own: a second `make demo` replaces it
        run_headless(args.output, overwrite=args.overwrite or args.output == DEFAULT_OUTPUT)
        return 0
    import napari

    build_viewer()
    print("napari is open with the sample and the napari-smsdl widgets; close the window to end the demo")
    napari.run()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m napari_smsdl.commands.demo [-o DIR] [--headless]``."""
    parser = argparse.ArgumentParser(prog="smsdl")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["demo", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except Exception as exc:  # noqa: BLE001 - one line, as the smsdl CLI does
        from ..errors import SmsdlError

        message = str(exc) if isinstance(exc, SmsdlError) else f"{type(exc).__name__}: {exc}"
        print(f"smsdl demo: error: {' '.join(message.split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
