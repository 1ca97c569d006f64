"""The foundation CLI contract: info / ion / sample, and one-line errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from napari_smsdl.cli import main


def test_info_json(imzml_file, capsys):
    path, mode, _ = imzml_file
    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["shape"] == [6, 8] and info["n_spectra"] == 47 and info["mode"] == mode
    assert info["pixel_size_um"] == 20.0
    assert 400 <= info["mz_range"][0] < info["mz_range"][1] <= 900


def test_ion_writes_float32_stack(imzml_file, tmp_path):
    path, _, _ = imzml_file
    out = tmp_path / "ions.tif"
    assert main(["ion", str(path), "--mz", "500", "--mz", "750", "--tol", "0.5da", "--norm", "none", "-o", str(out)]) == 0
    stack = tifffile.imread(out)
    assert stack.shape == (2, 6, 8) and stack.dtype == np.float32
    assert np.isnan(stack[:, 2, 3]).all() and np.isfinite(stack[:, 0, 0]).all()


def test_sample_command(tmp_path):
    assert main(["sample", "-o", str(tmp_path / "s")]) == 0
    for name in ("he.png", "msi.imzML", "msi.ibd", "ground_truth.npy", "sample.json"):
        assert (tmp_path / "s" / name).exists()


@pytest.mark.parametrize("argv", [["info", "{missing}"], ["ion", "{missing}", "--mz", "500", "-o", "{out}"]])
def test_bad_input_one_line_no_traceback(tmp_path, argv):
    missing = tmp_path / "missing.imzML"
    argv = [a.format(missing=missing, out=tmp_path / "o.tif") for a in argv]
    proc = subprocess.run([sys.executable, "-m", "napari_smsdl", *argv], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing.imzML" in lines[0] and "not found" in lines[0]


def test_debug_flag_shows_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "napari_smsdl", "--debug", "info", str(tmp_path / "x.imzML")],
        capture_output=True, text=True,
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr
