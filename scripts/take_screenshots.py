"""Screenshots for docs/tutorial.md, taken from the running plugin on the built-in sample.

Run under a (virtual) display, from the repository root::

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/take_screenshots.py [--out docs/images]

(``make screenshots`` does exactly that). It drives the real widgets, as a user would, through
their public methods: Load opens the sample's files; then, on the sample layers (which include
the ground truth), Register with six landmark pairs, Train with the fast preset, Compare (grid view,
difference maps, a picked pixel, segments), Export & project — all in the single-dock flow
(*SMSDL flow*, one step at a time). Every step's widget, the flow dock in the window, the comparison
view and the exported figure are saved as PNG (``QWidget.grab()``,
``viewer.screenshot(canvas_only=False)``; ``figure.png`` copied from the export, shrunk).
Takes a few minutes on a laptop CPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

WINDOW = (1600, 960)


def shrink(path: Path) -> None:
    """256-colour PNG (a window screenshot drops from ~700 kB to ~250 kB; fine for docs)."""
    from PIL import Image

    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    small.save(path, optimize=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/images", help="folder of the PNG files (default docs/images)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from napari_smsdl.widgets.train import preload_torch

    preload_torch()  # before the canvas exists (see its docstring)
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_smsdl.reconstruction import Settings
    from napari_smsdl.registration import LandmarkPairs
    from napari_smsdl.sample import write_sample

    app = QApplication.instance() or QApplication([])
    written: list[Path] = []
    started = time.perf_counter()

    def pump(seconds: float = 0.3) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            app.processEvents()
            time.sleep(0.02)

    def wait(widget, timeout: float = 900.0) -> None:
        end = time.perf_counter() + timeout
        while widget.busy:
            if time.perf_counter() > end:
                raise TimeoutError(f"{type(widget).__name__} still busy after {timeout} s")
            app.processEvents()
            time.sleep(0.05)
        pump(0.5)

    def show_tab(name: str) -> None:
        flow.go_to({"Export & project": "Export"}.get(name, name))
        pump(0.3)

    def grab(widget, name: str) -> None:
        path = out / f"{name}.png"
        pump(0.2)
        widget.grab().save(str(path))
        written.append(path)
        print(f"  {path}")

    def window(name: str) -> None:
        path = out / f"{name}.png"
        pump(0.5)
        viewer.screenshot(str(path), canvas_only=False, flash=False)
        shrink(path)
        written.append(path)
        print(f"  {path}")

    viewer = napari.Viewer(title="napari-smsdl", show=True)
    viewer.window.resize(*WINDOW)
    _, flow = viewer.window.add_plugin_dock_widget("napari-smsdl", "SMSDL flow (all steps, one dock)")
    pump(1.0)
    load, register, train, compare, export = flow.load, flow.register, flow.train, flow.compare, flow.export

    # ---- 1. Load: the sample written as files (H&E PNG + processed imzML), as one's own data would be
    print("Load")
    files = Path(tempfile.mkdtemp(prefix="smsdl-shots-"))
    write_sample(files / "sample")
    show_tab("Load")
    load.n_peaks.value = 5
    load.load(files / "sample" / "he.png", files / "sample" / "msi.imzML", he_pixel_size_um=2.5)
    wait(load)
    load.add_layers()
    wait(load)
    viewer.layers["msi (MSI)"].opacity = 0.75  # the H&E shows through
    viewer.reset_view()
    grab(load, "load-widget")
    window("load-window")
    window("flow-window")  # the single-dock flow: step buttons, the Load page, Back / Next
    viewer.layers.clear()

    # ---- 2. The sample layers (H&E, measured MSI, ground truth) and Register with six landmark pairs
    print("Register")
    viewer.open_sample("napari-smsdl", "smsdl_sample")
    show_tab("Register")
    register.set_layers(he="sample H&E", msi="sample MSI (40 µm)")
    msi_rc = np.array([[3, 4], [5, 27], [16, 16], [27, 5], [28, 28], [12, 22]], float)
    pairs = LandmarkPairs((msi_rc + 0.5) * 16 - 0.5, msi_rc)  # 16 H&E pixels per MSI pixel, same field of view
    he_points, msi_points = register.add_landmark_layers()
    he_points.data, msi_points.data = pairs.he_rc, pairs.msi_rc
    register.run()
    wait(register)
    viewer.layers.selection.active = viewer.layers["sample MSI (40 µm)"]
    viewer.reset_view()
    window("register-window")
    grab(register, "register-widget")
    register.accept()
    register.side_by_side.value = False
    for name in list(viewer.layers):
        if name.name.startswith("registration: ") or name.name.endswith("landmarks"):
            name.visible = False

    # ---- 3. Train: fast preset; a view while it runs, and the finished widget
    print("Train (fast preset)")
    show_tab("Train")
    train.set_layers(he="sample H&E", msi="sample MSI (40 µm)")
    train.set_settings(Settings.preset("fast", factor=4))
    train.start()
    end = time.perf_counter() + 900
    while train.busy and len(train.plot.steps) < 8 and time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.05)
    grab(train, "train-running")
    wait(train)
    if train.last_error:
        raise SystemExit(f"training failed: {train.last_error}")
    grab(train, "train-done")

    # ---- 4. Compare: grid, differences, a picked pixel, segments
    print("Compare")
    show_tab("Compare")
    compare.show_results(channels=[1, 2, 4], truth="sample ground truth (10 µm)")
    compare.set_grid(True)
    window("compare-grid")
    grab(compare, "compare-widget")
    compare.reference.value = "truth"
    compare.differences.value = True
    compare.show_results(channels=[4])  # one channel: LR, truth, 3 methods, 3 differences in a 3 × 3 grid
    window("compare-differences")
    compare.differences.value = False
    compare.show_results(channels=[1, 2, 4])
    compare.set_grid(False)
    compare.inspect_pixel((560.0, 420.0))
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    camera.center = (0, 560.0, 420.0)
    camera.zoom = camera.zoom * 2.5
    window("compare-pixel")
    grab(compare, "compare-pixel-widget")
    for layer in viewer.layers:  # segments over the registered H&E only
        layer.visible = layer.name == "compare: H&E (registered, SR grid)"
    compare.segment(4, method="smsdl")
    viewer.reset_view()
    window("compare-segments")

    # ---- 5. Export & project
    print("Export & project")
    show_tab("Export & project")
    results = files / "results"
    export.export(results)
    wait(export)
    export.save_project(files / "project")
    wait(export)
    grab(export, "export-widget")
    figure = out / "figure.png"  # the exported paper figure (300 dpi; shrunk for the docs)
    from PIL import Image

    with Image.open(results / "figure.png") as image:
        image = image.convert("RGB")
        image.thumbnail((1400, 1400))
        image.save(figure)
    shrink(figure)
    written.append(figure)
    print(f"  {figure}")

    print(f"{len(written)} screenshots in {time.perf_counter() - started:.0f} s")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
