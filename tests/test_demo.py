"""`smsdl demo`: display detection, the headless run (figure + metrics), the docked napari session."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import pytest

from napari_smsdl.commands import demo
from napari_smsdl.features import FeatureParams
from napari_smsdl.reconstruction import RegressionParams, Settings

TINY = dataclasses.replace(
    Settings.preset("fast", factor=4),
    features=FeatureParams(embed_dim=32, depth=1, num_heads=2, ssl_steps=3, ssl_batch=4, shifts=1),
    regression=RegressionParams(hidden=32, steps=20, folds=2, pca_dims=8),
    cnn_iterations=2,
)
ROOT = Path(__file__).resolve().parents[1]


def test_display_detection():
    assert not demo.display_available({})
    assert not demo.display_available({"DISPLAY": ":0", "QT_QPA_PLATFORM": "offscreen"})
    assert demo.display_available({"DISPLAY": ":0"}, probe=False)
    # a display variable whose X server does not exist: Qt cannot open it, so the demo goes headless
    assert not demo.display_available({"DISPLAY": ":987654", "PATH": "/usr/bin:/bin"})


def test_headless_run_writes_figure_and_metrics(tmp_path):
    metrics = demo.run_headless(tmp_path / "out", settings=TINY, methods=("smsdl", "bicubic"))
    out = tmp_path / "out"
    written = json.loads((out / "metrics.json").read_text())
    assert set(written) >= {"smsdl", "bicubic", "seconds", "settings"}
    for method in ("smsdl", "bicubic"):
        assert len(written[method]["ssim"]["per_channel"]) == 5
        assert written[method]["ssim"]["mean"] == pytest.approx(metrics[method]["ssim"]["mean"])
        assert (out / f"sr_{method}.ome.tif").exists()
    assert written["settings"]["factor"] == 4 and written["settings"]["truth_pixel_size_um"] == 10.0
    assert (out / "figure.png").stat().st_size > 20_000
    assert len((out / "metrics.csv").read_text().splitlines()) == 1 + 2 * 6


def test_cli_goes_headless_without_a_display(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(demo, "run_headless", lambda outdir, **kw: calls.append(Path(outdir)) or {})
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert demo.main(["-o", str(tmp_path / "a")]) == 0
    assert "no display" in capsys.readouterr().out
    assert demo.main(["--headless"]) == 0
    assert calls == [tmp_path / "a", Path(demo.DEFAULT_OUTPUT)]


def test_run_demo_script_without_display_fails_cleanly_on_a_missing_venv(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "run-demo.sh"), str(tmp_path / "no-venv" / "bin")],
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}, check=False)
    assert proc.returncode == 2 and "no Python at" in proc.stderr


@pytest.mark.gui
def test_napari_session_has_the_sample_and_every_widget(make_napari_viewer):
    assert demo.display_available()  # gui tests run with a display (xvfb-run): the probe opens it
    viewer, widgets = demo.build_viewer(make_napari_viewer(), settings=TINY)
    assert list(widgets) == list(demo.WIDGETS)
    assert [lay.name for lay in viewer.layers] == ["sample H&E", "sample MSI (40 µm)", "sample ground truth (10 µm)"]
    train = widgets["Train"]
    assert train.msi_layer.value.name == "sample MSI (40 µm)" and train.he_layer.value.name == "sample H&E"
    assert train.settings() == dataclasses.replace(TINY, seed=0)
    assert widgets["Compare"].truth.value is viewer.layers["sample ground truth (10 µm)"]
    assert type(widgets["Export & project"]).__name__ == "ExportWidget"
