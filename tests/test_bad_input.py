"""Bad input and faults through the CLI, end to end: output folders written as a unit, project
locks, unwritable outputs found before the work, and a run killed in the middle of its save.

Cheap by design: most cases reopen a small saved project (``smsdl reconstruct --project P -o OUT``
writes every output a run writes, without training); only the fault test on the project runs a
real (tiny, fast-preset) reconstruction.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from napari_smsdl._outputs import OutputFolder, output_folder
from napari_smsdl.cli import main
from napari_smsdl.errors import InputError
from napari_smsdl.project import Project, load_project, save_project
from napari_smsdl.reconstruction import Reconstruction, Settings

NAMES = ("m/z 500.0000", "m/z 750.0000", "m/z 900.0000")


def _project(methods=("smsdl", "bicubic"), channels: int = 3, seed: int = 0) -> Project:
    """A small project made without training (random stacks; the file layout is what matters)."""
    rng = np.random.default_rng(seed)
    lr = rng.uniform(1, 100, (channels, 6, 5)).astype(np.float32)
    sr = {m: rng.uniform(0, 100, (channels, 24, 20)).astype(np.float32) for m in methods}
    recon = Reconstruction(sr, {m: 0.1 for m in methods}, rng.uniform(0, 1, (24, 20, 3)).astype(np.float32), None,
                           {m: [] for m in methods}, Settings.preset("fast", factor=4, seed=seed))
    return Project.from_reconstruction(recon, lr_msi=lr, channel_names=NAMES[:channels], msi_pixel_size_um=40.0,
                                       he_pixel_size_um=2.5)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def _err_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def _cli(*argv: str, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "napari_smsdl", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}, **kw)


@pytest.fixture
def two_projects(tmp_path):
    """Project A (3 channels, smsdl + bicubic) and B (2 channels, smsdl only), saved."""
    a, b = tmp_path / "A", tmp_path / "B"
    save_project(a, _project())
    save_project(b, _project(("smsdl",), channels=2, seed=1))
    return a, b


# ---------------------------------------------------------------------------- item 1: -o is a unit
def test_a_rerun_into_a_finished_run_is_refused_then_replaced_whole_with_overwrite(two_projects, tmp_path, capsys):
    a, b = two_projects
    out = tmp_path / "out"
    assert main(["reconstruct", "--project", str(a), "-o", str(out)]) == 0
    first = _files(out)
    assert {"sr_smsdl.ome.tif", "sr_bicubic.ome.tif", "run.json", "figure.png"} <= set(first)
    capsys.readouterr()

    assert main(["reconstruct", "--project", str(b), "-o", str(out)]) == 2
    line = _err_line(capsys)
    assert str(out) in line and "already holds a run (run.json)" in line and "--overwrite" in line
    assert _files(out) == first and _siblings(out) == []

    # the case: fewer channels and no bicubic must not leave the old bicubic stack beside the new run.json
    assert main(["reconstruct", "--project", str(b), "-o", str(out), "--overwrite"]) == 0
    now = _files(out)
    assert "sr_bicubic.ome.tif" not in now and set(json.loads(now["run.json"])["outputs"]) == {"smsdl"}
    assert json.loads(now["run.json"])["outputs"]["smsdl"] == str(out / "sr_smsdl.ome.tif")  # final paths, not staging
    assert _siblings(out) == []


def test_a_failed_run_leaves_the_previous_result_whole(two_projects, tmp_path, capsys):
    a, _ = two_projects
    out = tmp_path / "out"
    assert main(["reconstruct", "--project", str(a), "-o", str(out)]) == 0
    before = _files(out)
    broken = tmp_path / "broken"
    save_project(broken, _project())
    snapshot = json.loads((broken / "project.json").read_text())["snapshot"]
    (broken / snapshot / "results" / "sr_smsdl.ome.tif").write_bytes(b"changed")  # fails its check mid-run
    capsys.readouterr()
    assert main(["reconstruct", "--project", str(broken), "-o", str(out), "--overwrite"]) == 2
    assert "sr_smsdl.ome.tif" in _err_line(capsys)
    assert _files(out) == before and _siblings(out) == []


@pytest.mark.parametrize("case", ["file", "foreign", "below_a_file"])
def test_unusable_output_folders_are_refused_before_any_work(tmp_path, capsys, case):
    target = tmp_path / "target"
    if case == "file":
        target.write_text("x")
    elif case == "foreign":  # a folder of the user's with no run in it: never replaced, even with --overwrite
        target.mkdir()
        (target / "notes.txt").write_text("mine")
    else:
        (tmp_path / "afile").write_text("x")
        target = tmp_path / "afile" / "out"
    # the inputs do not exist: the output problem is reported first, so it was checked before any reading
    argv = ["--he", str(tmp_path / "missing.png"), "--msi", str(tmp_path / "missing.npy"), "--factor", "4",
            "-o", str(target), "--overwrite"]
    for command in ("reconstruct", "benchmark", "register"):
        extra = ["--he-pixel-size", "1", "--msi-pixel-size", "4"] if command == "register" else []
        assert main([command, *argv, *extra] if command != "register" else
                    [command, *[a for a in argv if a not in ("--factor", "4")], *extra]) == 2
        line = _err_line(capsys)
        assert str(target) in line and "-o" in line and "missing" not in line, line
    if case == "foreign":
        assert (target / "notes.txt").read_text() == "mine" and "--overwrite replaces only a finished run" in line
    if case == "file":
        assert "not a folder" in line


def test_unwritable_project_and_cache_are_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    base = ["reconstruct", "--he", str(tmp_path / "missing.png"), "--msi", str(tmp_path / "missing.npy"),
            "--factor", "4", "-o", str(tmp_path / "out")]
    assert main([*base, "--project", str(tmp_path / "afile" / "p")]) == 2
    line = _err_line(capsys)
    assert "--project" in line and str(tmp_path / "afile" / "p") in line and "missing" not in line
    assert main([*base, "--cache-dir", str(tmp_path / "afile" / "c")]) == 2
    line = _err_line(capsys)
    assert "--cache-dir" in line and "missing" not in line
    assert not (tmp_path / "out").exists() and _siblings(tmp_path / "out") == []


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True, reason="root writes anywhere")
def test_read_only_output_parent_is_refused(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main(["reconstruct", "--he", "x.png", "--msi", "y.npy", "--factor", "4", "-o", str(ro / "out")]) == 2
        assert "cannot write" in _err_line(capsys)
    finally:
        ro.chmod(0o755)


def test_output_folder_helper_commits_discards_and_recovers(tmp_path):
    target = tmp_path / "run"
    with output_folder(target) as folder:
        (folder.path / "a.txt").write_text("1")
        (folder.path / "run.json").write_text("{}")
        assert not target.exists() and folder.final(folder.path / "a.txt") == target / "a.txt"
    assert _files(target) == {"a.txt": b"1", "run.json": b"{}"}
    with pytest.raises(RuntimeError), output_folder(target, overwrite=True) as folder:
        (folder.path / "b.txt").write_text("2")
        raise RuntimeError("the run failed")
    assert _files(target) == {"a.txt": b"1", "run.json": b"{}"} and _siblings(target) == []
    # a commit killed between its two renames: the old run aside, nothing in place -> put back
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    aside = tmp_path / f".run.old-{dead}-abcdef"
    os.rename(target, aside)
    stale = tmp_path / f".run.staging-{dead}-123456"
    stale.mkdir()
    folder = OutputFolder(target, overwrite=True)
    assert _files(target) == {"a.txt": b"1", "run.json": b"{}"} and not stale.exists()
    folder.discard()
    with pytest.raises(InputError, match="already holds a run"):
        OutputFolder(target)
    # an existing empty folder keeps its identity (it may be the working directory): files move into it
    empty = tmp_path / "empty"
    empty.mkdir()
    inode = empty.stat().st_ino
    with output_folder(empty) as folder:
        (folder.path / "run.json").write_text("{}")
        (folder.path / "sub").mkdir()
        (folder.path / "sub" / "x.bin").write_bytes(b"x")
    assert empty.stat().st_ino == inode and _files(empty) == {"run.json": b"{}", "sub/x.bin": b"x"}
    assert _siblings(empty) == []


# ---------------------------------------------------------------------------- item 2: project locks
_HOLD = """
import sys, time
from napari_smsdl.project._store import project_lock
with project_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_a_second_writer_waits_then_refuses_naming_the_project(two_projects, tmp_path, capsys, monkeypatch):
    a, _ = two_projects
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(a), "30"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        monkeypatch.setenv("SMSDL_LOCK_TIMEOUT", "0.5")
        t0 = time.monotonic()
        with pytest.raises(InputError) as err:
            save_project(a, _project(seed=5))
        assert 0.4 < time.monotonic() - t0 < 20
        assert str(a) in str(err.value) and f"being written by process {holder.pid}" in str(err.value)
        # the CLI refuses the same way, before the work (the inputs do not even exist)
        assert main(["reconstruct", "--he", "missing.png", "--msi", "missing.npy", "--factor", "4",
                     "-o", str(tmp_path / "out"), "--project", str(a)]) == 2
        line = _err_line(capsys)
        assert "--project" in line and "being written by" in line and "missing" not in line
        load_project(a)  # readers are not blocked by a writer that has not reached its swap
    finally:
        holder.kill()
        holder.wait()
    save_project(a, _project(seed=5))  # a dead holder's lock is gone with it


# ---------------------------------------------------------------------------- item 7: killed in the save
def _wait_for(proc: subprocess.Popen, text: str, timeout: float) -> str:
    """Read ``proc``'s stderr until a line holds ``text`` (the save-delay hook announces itself)."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if text in line:
            return line
    proc.kill()
    raise AssertionError(f"never reached {text!r}: {''.join(seen)[-2000:]}")


def test_a_run_killed_while_committing_its_output_leaves_the_previous_one(two_projects, tmp_path):
    a, b = two_projects
    out = tmp_path / "out"
    assert main(["reconstruct", "--project", str(a), "-o", str(out)]) == 0
    before = _files(out)
    proc = _cli("reconstruct", "--project", str(b), "-o", str(out), "--overwrite",
                env={"SMSDL_TEST_SAVE_DELAY": "60"})
    _wait_for(proc, "test save delay at output folder", 120)
    staged = [tmp_path / n for n in _siblings(out) if ".staging-" in n]
    assert len(staged) == 1 and (staged[0] / "run.json").is_file()  # the new run was complete ...
    proc.send_signal(signal.SIGKILL)  # ... and is killed just before it replaces the old one
    proc.wait()
    assert _files(out) == before
    # the next run cleans up the dead run's staging folder
    assert main(["reconstruct", "--project", str(b), "-o", str(out), "--overwrite"]) == 0
    assert _siblings(out) == [] and "sr_bicubic.ome.tif" not in _files(out)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """A 64 × 64 H&E and a (2, 16, 16) MSI of the same field of view."""
    from skimage import io as skio

    from napari_smsdl.sample import make_sample

    s = make_sample()
    folder = tmp_path_factory.mktemp("tiny")
    skio.imsave(folder / "he.png", s.he_rgb[:64, :64], check_contrast=False)
    np.save(folder / "msi.npy", s.msi[:2, :16, :16])
    return folder


def test_a_run_killed_while_saving_its_project_leaves_project_and_output_whole(tiny_pair, tmp_path, two_projects):
    a, _ = two_projects
    project = tmp_path / "proj"
    save_project(project, _project())
    manifest = (project / "project.json").read_text()
    out = tmp_path / "out"
    assert main(["reconstruct", "--project", str(a), "-o", str(out)]) == 0
    before = _files(out)
    quick = ["--fast", "--ssl-steps", "2", "--regression-steps", "5"]
    proc = _cli("reconstruct", "--he", str(tiny_pair / "he.png"), "--msi", str(tiny_pair / "msi.npy"),
                "--factor", "4", *quick, "-o", str(out), "--overwrite", "--project", str(project),
                env={"SMSDL_TEST_SAVE_DELAY": "60"})
    _wait_for(proc, "test save delay at project", 300)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # the project: the previous save, whole and verified; the output: the previous run, whole
    assert (project / "project.json").read_text() == manifest
    reopened = load_project(project)
    assert reopened.channel_names == NAMES and set(reopened.sr) == {"smsdl", "bicubic"}
    assert _files(out) == before
    # the next save into the project takes over: the dead writer's lock and staging folder are gone
    save_project(project, _project(seed=2))
    assert not [p for p in project.iterdir() if p.name.startswith(".staging-")]


# ---------------------------------------------------------------------------- item 6: ion and H&E messages
def test_ion_into_a_folder_an_existing_file_and_a_negative_tolerance(imzml_file, tmp_path, capsys):
    import tifffile

    path, _, _ = imzml_file
    folder = tmp_path / "ions"
    folder.mkdir()
    assert main(["ion", str(path), "--mz", "500", "--tol", "0.5da", "-o", str(folder)]) == 0
    written = folder / f"{path.stem}_ions.ome.tif"
    assert sorted(p.name for p in folder.iterdir()) == [written.name]  # a sensible name, no temporary left
    assert tifffile.imread(written).shape == (6, 8)
    capsys.readouterr()
    assert main(["ion", str(path), "--mz", "500", "--tol", "0.5da", "-o", str(folder)]) == 2
    line = _err_line(capsys)
    assert str(written) in line and "already exists" in line and "--overwrite" in line
    assert main(["ion", str(path), "--mz", "500", "--tol", "0.5da", "-o", str(written), "--overwrite"]) == 0
    capsys.readouterr()
    (tmp_path / "afile").write_text("x")
    assert main(["ion", str(path), "--mz", "500", "-o", str(tmp_path / "afile" / "x.tif")]) == 2
    line = _err_line(capsys)
    assert str(tmp_path / "afile") in line and "not a folder" in line and "File exists" not in line
    for argv in (["ion", str(path), "--mz", "500", "--tol", "-5ppm", "-o", str(tmp_path / "t.tif")],
                 ["reconstruct", "--he", "x.png", "--msi", str(path), "--factor", "4", "--tol", "-5ppm", "-o", "o"]):
        code = main(argv) if argv[0] == "ion" else None
        if code is None:  # reconstruct checks it while reading the command line (argparse, exit 2)
            with pytest.raises(SystemExit) as exit_info:
                main(argv)
            code = exit_info.value.code
        assert code == 2
        err = capsys.readouterr().err
        assert "must be positive" in err and "-5ppm" in err and "expected one argument" not in err
    assert not (tmp_path / "t.tif").exists()


def test_tiny_and_unreadable_histology_messages_name_the_file(tmp_path, capsys):
    from skimage import io as skio

    skio.imsave(tmp_path / "tiny.png", np.zeros((1, 1, 3), np.uint8), check_contrast=False)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really" * 8)
    np.save(tmp_path / "msi.npy", np.random.default_rng(0).random((2, 16, 16)).astype(np.float32))
    for he, expected in (("tiny.png", "1 × 1 pixels"), ("bad.png", "cannot read this image")):
        for command in ("reconstruct", "register"):
            extra = ["--factor", "4"] if command == "reconstruct" else ["--he-pixel-size", "1", "--msi-pixel-size", "4"]
            assert main([command, "--he", str(tmp_path / he), "--msi", str(tmp_path / "msi.npy"), *extra,
                         "-o", str(tmp_path / f"out-{command}")]) == 2
            line = _err_line(capsys)
            assert str(tmp_path / he) in line and expected in line and "SimpleITK" not in line, line
            assert not (tmp_path / f"out-{command}").exists() and _siblings(tmp_path / f"out-{command}") == []


# ---------------------------------------------------------------------------- item 4: a huge H&E
@pytest.fixture
def flat_tiff(tmp_path):
    """A 3000 × 2000 tiled, compressed TIFF without a pyramid whose pixels encode their position."""
    import tifffile

    rows, cols = np.mgrid[0:3000, 0:2000]
    rgb = np.stack([rows % 251, cols % 241, (rows // 251 + cols // 241) % 256], axis=-1).astype(np.uint8)
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, rgb, tile=(256, 256), compression="zlib", photometric="rgb",
                     resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    return path, rgb


def test_registration_reads_a_strided_level_of_a_file_without_pyramid(flat_tiff, monkeypatch):
    from napari_smsdl.commands.register import load_he_image
    from napari_smsdl.io import open_histology

    path, rgb = flat_tiff
    monkeypatch.setenv("SMSDL_READ_BUDGET_GIB", str(1e6 / 2**30))  # 1 MB: level 0 (18 MB) is over it
    image = open_histology(path, pixel_size_um=0.5)
    with pytest.raises(InputError) as err:
        image.read(0)
    text = str(err.value)
    assert str(path) in text and "3000 × 2000" in text and "0.0168 GiB" in text and "SMSDL_READ_BUDGET_GIB" in text
    # MSI pixel 40 µm: registration wants 5 µm, every 10th pixel, block centres (first = 4)
    got, size_um, scale = load_he_image(path, pixel_size_um=0.5, msi_pixel_size_um=40.0)
    np.testing.assert_array_equal(got, rgb[4::10, 4::10])
    assert scale == 0.1 and size_um == pytest.approx(5.0)


def test_a_read_over_the_budget_is_refused_with_the_numbers(flat_tiff, tmp_path, capsys, monkeypatch):
    path, _ = flat_tiff
    np.save(tmp_path / "msi.npy", np.random.default_rng(0).random((16, 16)).astype(np.float32))
    monkeypatch.setenv("SMSDL_READ_BUDGET_GIB", str(1e5 / 2**30))  # 100 kB: even every 10th pixel (180 kB) is over
    assert main(["register", "--he", str(path), "--msi", str(tmp_path / "msi.npy"), "--he-pixel-size", "0.5",
                 "--msi-pixel-size", "40", "-o", str(tmp_path / "reg")]) == 2
    line = _err_line(capsys)
    assert "every 10th pixel of level 0 (300 × 200)" in line and "GiB" in line and "pyramidal" in line
    assert not (tmp_path / "reg").exists()


# ---------------------------------------------------------------------------- item 5 through the CLI
def test_factor_zero_tiny_and_empty_msi_are_refused_and_leave_nothing(tmp_path, capsys):
    from skimage import io as skio

    skio.imsave(tmp_path / "he.png", np.random.default_rng(0).integers(0, 256, (64, 64, 3)).astype(np.uint8),
                check_contrast=False)
    np.save(tmp_path / "msi.npy", np.random.default_rng(1).random((2, 16, 16)).astype(np.float32))
    np.save(tmp_path / "one.npy", np.ones((2, 1, 1), np.float32))
    np.save(tmp_path / "zero.npy", np.zeros((16, 16), np.float32))
    he, out = str(tmp_path / "he.png"), tmp_path / "out"
    for command in ("reconstruct", "benchmark"):
        assert main([command, "--he", he, "--msi", str(tmp_path / "msi.npy"), "--factor", "0", "-o", str(out)]) == 2
        line = _err_line(capsys)
        assert "factor must be an integer from 2 to 16, got 0" in line and "ZeroDivision" not in line
    # a 1-pixel MSI: refused before training, and no cache/ or weights left behind (nothing at all)
    assert main(["reconstruct", "--he", he, "--msi", str(tmp_path / "one.npy"), "--factor", "4", "--fast",
                 "-o", str(out)]) == 2
    line = _err_line(capsys)
    assert str(tmp_path / "one.npy") in line and "(2, 1, 1)" in line
    assert not out.exists() and _siblings(out) == []
    # an all-zero MSI: not ITK's "Zero-valued spacing" but what is wrong with the file
    assert main(["register", "--he", he, "--msi", str(tmp_path / "zero.npy"), "--he-pixel-size", "1",
                 "--msi-pixel-size", "4", "-o", str(out)]) == 2
    line = _err_line(capsys)
    assert str(tmp_path / "zero.npy") in line and "constant (every value 0)" in line and "ITK" not in line
    assert not out.exists() and _siblings(out) == []
