"""Project folders: exact round trip, input records, atomic saves (a crash never half-writes), checks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from napari_smsdl import project as proj
from napari_smsdl.errors import InputError
from napari_smsdl.project import (
    PROJECT_FILE,
    InputRecord,
    Project,
    _store,
    input_records,
    load_project,
    save_project,
    settings_from_dict,
)
from napari_smsdl.reconstruction import Reconstruction, Settings

NAMES = ("m/z 734.5694", "m/z 885.5499")
GUIDANCE = {"gain": [0.125, -0.0625], "gain_std": [0.03125, 0.25], "used_histology": [True, False]}


@pytest.fixture
def project(tmp_path):
    """A project with every part filled (results made cheaply; no training needed here)."""
    import SimpleITK as sitk

    from napari_smsdl.registration import LandmarkPairs

    rng = np.random.default_rng(0)
    lr = rng.uniform(1, 100, (2, 6, 5)).astype(np.float32)
    lr[:, 0, 0] = np.nan
    sr = {m: rng.uniform(0, 100, (2, 24, 20)).astype(np.float32) for m in ("smsdl", "bicubic", "backprojection", "cnn")}
    settings = Settings.preset("fast", factor=4, seed=3)
    recon = Reconstruction(
        sr, {"smsdl": 1.5, "bicubic": 0.01, "backprojection": 0.02, "cnn": 2.0},
        rng.uniform(0, 1, (48, 40, 3)).astype(np.float32), None, {"smsdl": [1.0, 0.5, 0.25], "cnn": []}, settings,
        uncertainty={"smsdl": rng.uniform(0, 3, (2, 24, 20)).astype(np.float32)},
        guidance={"smsdl": GUIDANCE},
        choices={"smsdl": {"folds": 3, "pca_dims": {"value": 8, "how": "held-out linear fit"},
                           "conservation": {"value": "exact", "how": "held-out error"}}},
    )
    he = tmp_path / "inputs" / "he.png"
    msi = tmp_path / "inputs" / "msi.imzML"
    he.parent.mkdir()
    he.write_bytes(b"fake png bytes")
    msi.write_text("<imzML/>")
    msi.with_suffix(".ibd").write_bytes(b"\0" * 32)
    weights = tmp_path / "vit.pt"
    weights.write_bytes(b"weights" * 100)
    cache = tmp_path / "cache"
    cache.mkdir()
    np.savez(cache / "features-abc.npz", data=np.ones((3, 4, 4)))
    affine = sitk.AffineTransform(2)
    affine.SetMatrix((1.1, 0.05, -0.02, 0.95))
    affine.SetTranslation((3.0, -2.5))
    landmarks = LandmarkPairs(np.array([[1.0, 2.0], [30.0, 5.0], [12.0, 33.0]]), np.array([[0.1, 0.2], [3.0, 0.5], [1.2, 3.3]]))
    p = Project.from_reconstruction(
        recon, lr_msi=lr, channel_names=NAMES, msi_pixel_size_um=40.0, he_pixel_size_um=2.5, mz=(734.5694, 885.5499),
        mask_lr=np.isfinite(lr[0]), transform=affine, landmarks=landmarks, registration_report={"final": "affine", "x": math.nan},
        inputs=input_records(he_path=he, msi_path=msi), weights_path=weights, cache_dir=cache,
    )
    truth = rng.uniform(0, 100, (2, 24, 20)).astype(np.float32)
    truth[:, :2] = 0
    return p.with_truth(truth)


def _assert_same(a: Project, b: Project) -> None:
    np.testing.assert_array_equal(a.lr_msi, b.lr_msi)
    assert a.sr.keys() == b.sr.keys()
    for m in a.sr:
        np.testing.assert_array_equal(a.sr[m], b.sr[m])
        assert b.sr[m].dtype == np.float32
    np.testing.assert_array_equal(a.truth, b.truth)
    np.testing.assert_array_equal(a.mask_hr, b.mask_hr)
    np.testing.assert_array_equal(a.mask_lr, b.mask_lr)
    assert a.channel_names == b.channel_names and a.mz == b.mz
    assert a.settings == b.settings
    assert (a.msi_pixel_size_um, a.he_pixel_size_um, a.factor) == (b.msi_pixel_size_um, b.he_pixel_size_um, b.factor)
    assert a.metrics.keys() == b.metrics.keys()
    for m in a.metrics:
        for metric in ("rmse", "ssim", "r2", "psnr"):
            assert a.metrics[m][metric]["per_channel"] == pytest.approx(b.metrics[m][metric]["per_channel"])
    assert a.loss_history == b.loss_history and a.seconds == b.seconds
    assert a.uncertainty.keys() == b.uncertainty.keys()
    for m in a.uncertainty:
        np.testing.assert_array_equal(np.asarray(a.uncertainty[m]), np.asarray(b.uncertainty[m]))
    assert a.guidance == b.guidance and a.choices == b.choices


def test_round_trip_is_exact(project, tmp_path):
    saved = save_project(tmp_path / "proj", project)
    assert saved.path == tmp_path / "proj" and saved.saved_at
    back = load_project(tmp_path / "proj")
    _assert_same(project, back)
    # the guide is kept as uint8 for display
    assert back.guide_rgb.dtype == np.uint8 and back.guide_rgb.shape == (48, 40, 3)
    np.testing.assert_allclose(back.guide_rgb / 255.0, project.guide_rgb, atol=0.5 / 255 + 1e-6)
    # registration: transform, landmarks, report (NaN written as null)
    assert back.transform.GetParameters() == pytest.approx(project.transform.GetParameters())
    np.testing.assert_allclose(back.landmarks.he_rc, project.landmarks.he_rc)
    assert back.registration_report["final"] == "affine" and back.registration_report["x"] is None
    # weights and cache now live in the project
    assert back.weights_path.read_bytes() == b"weights" * 100
    assert back.weights_path.is_relative_to(tmp_path / "proj")
    assert (back.cache_dir / "features-abc.npz").exists()
    # metrics CSV beside the JSON, one row per method and channel plus the means
    snapshot = back.weights_path.parents[1]
    assert len((snapshot / "results" / "metrics.csv").read_text().splitlines()) == 1 + 4 * 3
    # SMSDL's uncertainty and guidance came back: the H&E-free control is a method like the others
    assert back.methods == ("smsdl", "bicubic", "backprojection", "cnn") and back.fell_back == [1]
    assert back.uncertainty["smsdl"].shape == back.sr["smsdl"].shape and back.guidance["smsdl"] == GUIDANCE
    assert back.choices["smsdl"]["conservation"]["value"] == "exact"
    assert {r.split(",")[0] for r in (snapshot / "results" / "metrics.csv").read_text().splitlines()[1:]} == set(back.sr)


def test_input_records_detect_changes(project):
    assert [r.role for r in project.inputs] == ["he", "msi", "msi_ibd"]
    assert project.input_status() == {"he": "unchanged", "msi": "unchanged", "msi_ibd": "unchanged"}
    he = project.input_path("he")
    he.write_bytes(b"other png bytes")
    project.input_path("msi_ibd").unlink()
    assert project.input_status() == {"he": "changed", "msi": "unchanged", "msi_ibd": "missing"}
    assert InputRecord.from_path("he", None).check() == "unknown"


def test_second_save_replaces_the_snapshot(project, tmp_path):
    folder = tmp_path / "proj"
    (folder / "notes.txt").parent.mkdir()
    (folder / "notes.txt").write_text("mine")  # a user's file is never touched
    save_project(folder, project)
    changed = project.with_truth(project.truth * 2)
    save_project(folder, changed)
    snapshots = sorted(p.name for p in folder.iterdir() if p.name.startswith("save-"))
    assert snapshots == ["save-0002"]
    assert json.loads((folder / PROJECT_FILE).read_text())["snapshot"] == "save-0002"
    np.testing.assert_array_equal(load_project(folder).truth, changed.truth)
    assert (folder / "notes.txt").read_text() == "mine"


def test_a_crash_during_save_leaves_the_previous_project(project, tmp_path, monkeypatch):
    folder = tmp_path / "proj"
    save_project(folder, project)
    manifest_before = (folder / PROJECT_FILE).read_text()
    real_write = _store._write_snapshot

    def crash(stage, p):
        real_write(stage, p)  # every file written ...
        raise OSError("disk full")  # ... then the save dies before the snapshot is put in place

    monkeypatch.setattr(_store, "_write_snapshot", crash)
    with pytest.raises(OSError, match="disk full"):
        save_project(folder, project.with_truth(project.truth * 3))
    monkeypatch.undo()
    assert (folder / PROJECT_FILE).read_text() == manifest_before
    _assert_same(project, load_project(folder))
    # a hard kill leaves staging and an unreferenced snapshot behind: still the old project
    (folder / ".staging-save-0009-1").mkdir()
    (folder / ".staging-save-0009-1" / "parameters.json").write_text("{")
    (folder / "save-0008").mkdir()
    (folder / "save-0008" / "parameters.json").write_text("{")
    _assert_same(project, load_project(folder))
    save_project(folder, project)  # the next save cleans them up
    # (the lock files of the writer's and readers' locks stay: an OS lock needs a file)
    assert sorted(p.name for p in folder.iterdir()) == [_store.READ_LOCK, _store.WRITE_LOCK, "cache", PROJECT_FILE,
                                                        "save-0009"]


def test_changed_or_missing_files_are_reported(project, tmp_path):
    folder = tmp_path / "proj"
    saved = save_project(folder, project)
    sr = saved.weights_path.parents[1] / "results" / "sr_cnn.ome.tif"
    data = bytearray(sr.read_bytes())
    data[-1] ^= 0xFF
    sr.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"sr_cnn\.ome\.tif: project file changed since it was saved \(SHA-256"):
        load_project(folder)
    sr.unlink()
    with pytest.raises(InputError, match="sr_cnn.ome.tif: project file missing"):
        load_project(folder)


def test_not_a_project(tmp_path):
    with pytest.raises(InputError, match="no project.json"):
        load_project(tmp_path)
    (tmp_path / ".staging-save-0001-5").mkdir()
    with pytest.raises(InputError, match="interrupted save"):
        load_project(tmp_path)
    (tmp_path / PROJECT_FILE).write_text(json.dumps({"format": "something else"}))
    with pytest.raises(InputError, match="not a napari-smsdl project manifest"):
        load_project(tmp_path)
    with pytest.raises(InputError, match="project folder not found"):
        load_project(tmp_path / "nowhere")


def test_settings_round_trip_through_dict():
    s = Settings.preset("fast", factor=8, seed=5, cnn_iterations=7)
    assert settings_from_dict(s.to_dict()) == s
    assert settings_from_dict({**s.to_dict(), "future_option": 1}) == s


def test_old_regression_settings_are_dropped_with_a_log_line(caplog):
    s = Settings.preset("fast", factor=4)
    old = s.to_dict()
    old["regression"] = {**old["regression"], "restarts": 3, "holdout": 0.1, "pixels_per_dim": 40,
                         "conserve_mean": True}
    with caplog.at_level("INFO", logger="napari_smsdl.project._format"):
        assert settings_from_dict(old) == s
    assert "conserve_mean, holdout, pixels_per_dim, restarts" in caplog.text


def _rewrite_snapshot_file(folder, rel, text):
    """Replace one snapshot file and fix its hash in the manifest (as an older version wrote it)."""
    from napari_smsdl._files import sha256_file

    manifest = json.loads((folder / PROJECT_FILE).read_text())
    path = folder / manifest["snapshot"] / rel
    path.write_text(text)
    manifest["files"][rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    (folder / PROJECT_FILE).write_text(json.dumps(manifest))


def test_a_project_saved_before_uncertainty_and_guidance_still_opens(project, tmp_path, caplog):
    import dataclasses

    old = dataclasses.replace(project, sr={m: project.sr[m] for m in ("smsdl", "bicubic", "cnn")},
                              uncertainty={}, guidance={}, choices={})
    folder = tmp_path / "old"
    save_project(folder, old)
    snapshot = folder / json.loads((folder / PROJECT_FILE).read_text())["snapshot"]
    assert not (snapshot / "results" / "guidance.json").exists()
    assert not list(snapshot.glob("results/uncertainty_*"))
    params = json.loads((snapshot / "parameters.json").read_text())
    del params["uncertainty"]  # the key did not exist
    params["settings"]["regression"].update(restarts=3, conserve_mean=True, pixels_per_dim=40, holdout=0.1)
    for key in ("folds", "patience", "conservation", "fallback"):
        params["settings"]["regression"].pop(key)
    _rewrite_snapshot_file(folder, "parameters.json", json.dumps(params))
    with caplog.at_level("INFO"):
        back = load_project(folder)
    assert "restarts" in caplog.text
    assert back.uncertainty == {} and back.guidance == {} and back.choices == {} and back.fell_back == []
    assert back.methods == ("smsdl", "bicubic", "cnn")
    np.testing.assert_array_equal(back.sr["cnn"], project.sr["cnn"])
    assert back.settings.regression.steps == project.settings.regression.steps


def test_real_reconstruction_round_trip(tmp_path):
    """A real (bicubic-only, so quick) reconstruction of the sample survives save and reopen."""
    from napari_smsdl.reconstruction import reconstruct
    from napari_smsdl.sample import make_sample

    s = make_sample()
    recon = reconstruct(s.msi, s.he_rgb, he_pixel_size_um=2.5, msi_pixel_size_um=40.0,
                        settings=Settings.preset("fast", factor=4), methods=["bicubic"])
    p = Project.from_reconstruction(recon, lr_msi=s.msi, channel_names=s.channel_names, msi_pixel_size_um=40.0,
                                    he_pixel_size_um=2.5, mz=s.mz).with_truth(s.ground_truth, s.mask_hr)
    save_project(tmp_path / "p", p)
    back = load_project(tmp_path / "p")
    _assert_same(p, back)
    assert back.sr_pixel_size_um == 10.0 and back.sr["bicubic"].shape == (5, 128, 128)
    assert back.metrics["bicubic"]["ssim"]["mean"] == pytest.approx(p.metrics["bicubic"]["ssim"]["mean"])
    assert back.transform is None and back.landmarks is None and back.weights_path is None


def test_cli_reconstruct_saves_and_reopens_a_project(tmp_path, capsys):
    """`smsdl reconstruct --project DIR` saves the run; `--project DIR -o OUT` alone reopens it."""
    import tifffile

    from napari_smsdl.cli import main
    from napari_smsdl.sample import write_sample

    sample = tmp_path / "sample"
    write_sample(sample)
    out, folder = tmp_path / "run", tmp_path / "project"
    quick = ["--fast", "--ssl-steps", "2", "--regression-steps", "10", "--cnn-iterations", "2"]
    argv = ["reconstruct", "--he", str(sample / "he.png"), "--msi", str(sample / "msi.imzML"), "--mz", "760.5851",
            "--mz", "885.5499", "--factor", "2", "--he-pixel-size", "2.5", "--baselines", "bicubic", *quick,
            "-o", str(out), "--project", str(folder)]
    assert main(argv) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["project"] == str(folder) and run["factor"] == 2  # the usual outputs, plus where the project is
    p = load_project(folder)
    assert p.factor == 2 and p.mz == pytest.approx((760.5851, 885.5499)) and set(p.sr) == {"smsdl", "bicubic"}
    assert p.input_status() == {"he": "unchanged", "msi": "unchanged", "msi_ibd": "unchanged"}
    assert p.weights_path is not None and p.weights_path.stat().st_size > 1000  # the trained ViTs
    assert list(p.cache_dir.glob("features-*.npz"))
    np.testing.assert_array_equal(p.sr["smsdl"], tifffile.imread(out / "sr_smsdl.ome.tif"))
    np.testing.assert_array_equal(p.uncertainty["smsdl"], tifffile.imread(out / "uncertainty_smsdl.ome.tif"))
    assert p.guidance["smsdl"] == run["guidance"]["smsdl"] and len(p.guidance["smsdl"]["gain"]) == 2
    assert p.choices["smsdl"]["conservation"] == run["choices"]["smsdl"]["conservation"]

    again = tmp_path / "again"
    assert main(["reconstruct", "--project", str(folder), "-o", str(again)]) == 0
    assert "reopened" in capsys.readouterr().out
    for method in ("smsdl", "bicubic"):
        np.testing.assert_array_equal(tifffile.imread(again / f"sr_{method}.ome.tif"),
                                      tifffile.imread(out / f"sr_{method}.ome.tif"))
    np.testing.assert_array_equal(tifffile.imread(again / "uncertainty_smsdl.ome.tif"),
                                  tifffile.imread(out / "uncertainty_smsdl.ome.tif"))
    rerun = json.loads((again / "run.json").read_text())
    assert rerun["guidance"] == run["guidance"] and set(rerun["uncertainty"]) == {"smsdl"}
    assert rerun["reopened"] is True and rerun["sr_pixel_size_um"] == run["sr_pixel_size_um"] == 20.0
    assert (again / "figure.png").exists()

    # a partial request is an argparse error naming what is missing; a folder without project a one-liner
    with pytest.raises(SystemExit) as exit_info:
        main(["reconstruct", "--he", str(sample / "he.png"), "--project", str(folder), "-o", str(again)])
    assert exit_info.value.code == 2
    assert "the following arguments are required: --msi, --factor" in capsys.readouterr().err
    assert main(["reconstruct", "--project", str(tmp_path / "empty"), "-o", str(again)]) == 2
    assert "project folder not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------- many channels: lazy SR stacks
def _lazy_project(tmp_path, n_channels=70):
    """A project whose SR stacks are zarr arrays (as the many-channel path leaves them), no training."""
    import zarr

    rng = np.random.default_rng(5)
    lr = rng.uniform(1, 100, (n_channels, 4, 3)).astype(np.float32)
    sr = {}
    for method in ("smsdl", "bicubic"):
        arr = zarr.create_array(str(tmp_path / f"sr_{method}.zarr"), shape=(n_channels, 16, 12), chunks=(64, 16, 12),
                                dtype="float32")
        arr[:] = rng.uniform(0, 100, arr.shape).astype(np.float32)
        sr[method] = zarr.open_array(str(tmp_path / f"sr_{method}.zarr"), mode="r")
    spread = zarr.create_array(str(tmp_path / "uncertainty.zarr"), shape=(n_channels, 16, 12), chunks=(1, 16, 12),
                               dtype="float32")
    spread[:] = rng.uniform(0, 5, spread.shape).astype(np.float32)
    guidance = {"gain": [float(g) for g in rng.normal(0, 0.1, n_channels)],
                "gain_std": [0.01] * n_channels, "used_histology": [bool(i % 3) for i in range(n_channels)]}
    return Project(lr_msi=lr, channel_names=tuple(f"channel {i}" for i in range(n_channels)), msi_pixel_size_um=40.0,
                   he_pixel_size_um=2.5, settings=Settings.preset("fast", factor=4), sr=sr,
                   seconds={"smsdl": 1.0, "bicubic": 0.1},
                   uncertainty={"smsdl": zarr.open_array(str(tmp_path / "uncertainty.zarr"), mode="r")},
                   guidance={"smsdl": guidance}, choices={"smsdl": [{"pca_dims": {"value": 8}}]})


def test_lazy_project_scores_chosen_channels_and_saves_and_reopens_lazily(tmp_path):
    import zarr

    from napari_smsdl.evaluation import score_stack

    project = _lazy_project(tmp_path)
    assert project.lazy and not Project(project.lr_msi, project.channel_names, 40.0, 2.5, project.settings,
                                        {"smsdl": np.zeros((70, 16, 12), np.float32)}).lazy
    truth = np.random.default_rng(6).uniform(1, 100, (70, 16, 12)).astype(np.float32)
    scored = project.with_truth(truth, channels=[3, 65])
    expected = score_stack(truth[[3, 65]], np.asarray(project.sr["smsdl"][[3, 65]]), np.ones((16, 12), bool))
    per = scored.metrics["smsdl"]["rmse"]["per_channel"]
    assert len(per) == 70 and per[3] == pytest.approx(expected["rmse"]["per_channel"][0]) and math.isnan(per[0])
    assert scored.metrics["smsdl"]["scored_channels"] == [3, 65] and scored.truth is truth
    assert scored.metrics["smsdl"]["rmse"]["mean"] == pytest.approx(expected["rmse"]["mean"])

    saved = save_project(tmp_path / "proj", scored)
    params = json.loads(next((tmp_path / "proj").glob("save-*/parameters.json")).read_text())
    assert params["lazy"] is True
    assert isinstance(saved.sr["smsdl"], zarr.Array) and saved.lazy  # now read from the saved OME-TIFF
    back = load_project(tmp_path / "proj")
    assert back.lazy and isinstance(back.truth, zarr.Array) and back.sr["smsdl"].shape == (70, 16, 12)
    assert back.sr["smsdl"].chunks[0] == 1  # one TIFF page per channel
    for m in project.sr:
        np.testing.assert_array_equal(np.asarray(back.sr[m][:]), np.asarray(project.sr[m][:]))
    np.testing.assert_array_equal(np.asarray(back.truth[:]), truth)
    assert back.metrics["smsdl"]["rmse"]["per_channel"][65] == pytest.approx(per[65])
    # a second save over a lazily reopened project: reads the old snapshot, replaces it atomically
    again = save_project(tmp_path / "proj", back)
    assert sorted(p.name for p in (tmp_path / "proj").iterdir() if p.name.startswith("save-")) == ["save-0002"]
    np.testing.assert_array_equal(np.asarray(load_project(tmp_path / "proj").sr["bicubic"][69]),
                                  np.asarray(project.sr["bicubic"][69]))
    np.testing.assert_array_equal(np.asarray(again.sr["smsdl"][7]), np.asarray(project.sr["smsdl"][7]))
    # the uncertainty is saved page by page and reopened lazily too; guidance and choices come back
    assert isinstance(back.uncertainty["smsdl"], zarr.Array) and back.uncertainty["smsdl"].chunks[0] == 1
    np.testing.assert_array_equal(np.asarray(back.uncertainty["smsdl"][:]), np.asarray(project.uncertainty["smsdl"][:]))
    assert back.guidance == project.guidance and back.choices == project.choices
    assert back.fell_back == [i for i in range(70) if i % 3 == 0]
    few = back.subset([2, 3])  # a quick look at two channels: their uncertainty and guidance only
    assert few.uncertainty["smsdl"].shape == (2, 16, 12) and few.guidance["smsdl"]["used_histology"] == [True, False]
    np.testing.assert_array_equal(few.uncertainty["smsdl"][1], np.asarray(project.uncertainty["smsdl"][3]))


def test_the_chunked_path_is_taken_above_the_threshold_or_when_asked():
    from napari_smsdl.reconstruction import CHUNKED_ABOVE_CHANNELS

    assert not proj.uses_chunked_path(CHUNKED_ABOVE_CHANNELS) and proj.uses_chunked_path(CHUNKED_ABOVE_CHANNELS + 1)
    assert proj.uses_chunked_path(3, 2) and not proj.uses_chunked_path(500, 0)


def test_lazy_project_with_truth_reopens_from_the_cli(tmp_path):
    """`smsdl reconstruct --project DIR -o OUT` on a many-channel project that has a ground truth."""
    import tifffile

    from napari_smsdl.cli import main

    project = _lazy_project(tmp_path)
    truth = np.random.default_rng(7).uniform(1, 100, (70, 16, 12)).astype(np.float32)
    save_project(tmp_path / "proj", project.with_truth(truth, channels=[0, 1]))
    assert main(["reconstruct", "--project", str(tmp_path / "proj"), "-o", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "figure.png").stat().st_size > 0
    with tifffile.TiffFile(tmp_path / "out" / "sr_smsdl.ome.tif") as tif:
        np.testing.assert_array_equal(tif.asarray(), np.asarray(project.sr["smsdl"][:]))


def test_lazy_scores_do_not_depend_on_the_channels_scored_with_them(tmp_path):
    """The default tissue mask comes from every channel of the truth, as for an in-memory project."""
    from napari_smsdl.evaluation import score_stack

    project = _lazy_project(tmp_path)
    truth = np.random.default_rng(8).uniform(1, 100, (70, 16, 12)).astype(np.float32)
    truth[3, :, 6:] = 0  # an ion absent from part of the tissue
    alone = project.with_truth(truth, channels=[3]).metrics["smsdl"]["rmse"]["per_channel"][3]
    with_other = project.with_truth(truth, channels=[3, 4]).metrics["smsdl"]["rmse"]["per_channel"][3]
    in_memory = score_stack(truth, np.asarray(project.sr["smsdl"][:]), np.ones((16, 12), bool))["rmse"]["per_channel"][3]
    assert alone == pytest.approx(with_other) and alone == pytest.approx(in_memory)


_SAVER = """
import sys
import numpy as np
from napari_smsdl.project import Project, save_project
from napari_smsdl.reconstruction import Reconstruction, Settings

folder, seed, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(n):
    rng = np.random.default_rng(seed * 100 + i)
    sr = {"smsdl": np.full((2, 24, 20), seed * 100 + i, np.float32)}
    recon = Reconstruction(sr, {"smsdl": 0.1}, rng.uniform(0, 1, (24, 20, 3)).astype(np.float32), None,
                           {"smsdl": []}, Settings.preset("fast", factor=4))
    p = Project.from_reconstruction(recon, lr_msi=rng.uniform(1, 2, (2, 6, 5)).astype(np.float32),
                                    channel_names=("a", "b"), msi_pixel_size_um=40.0, he_pixel_size_um=2.5)
    save_project(folder, p)
print("done", flush=True)
"""


def test_two_processes_saving_at_once_both_succeed_and_a_reader_sees_only_complete_saves(project, tmp_path):
    """Issue 16 item 2: two writers used to fail about half the time (one's clean-up removed the other's
    staging folder) and a reader saw a broken state; now the writers take turns and every load is whole."""
    import subprocess
    import sys

    folder = tmp_path / "proj"
    save_project(folder, project)
    writers = [subprocess.Popen([sys.executable, "-c", _SAVER, str(folder), str(seed), "4"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    loads, seen = 0, set()
    while any(w.poll() is None for w in writers) or loads == 0:
        p = load_project(folder)  # raises on a missing or changed file: never a half-swapped save
        value = float(p.sr["smsdl"].flat[0])
        assert np.all(p.sr["smsdl"] == value) or "bicubic" in p.sr  # one save's stack, not a mix
        seen.add(value)
        loads += 1
    for w in writers:
        out, err = w.communicate()
        assert w.returncode == 0 and out.strip() == "done", err[-2000:]
    final = load_project(folder)
    assert float(final.sr["smsdl"].flat[0]) in {103.0, 203.0}  # the last save of one of the writers
    assert not [p for p in folder.iterdir() if p.name.startswith(".staging-")]
    assert len([p for p in folder.iterdir() if p.name.startswith("save-")]) == 1
    assert loads >= 1


def test_a_reopened_project_is_placed_at_the_msi_origin(project, tmp_path):
    """An imzML acquired off the instrument's origin: the reopened MSI, truth and uncertainty layers go
    back to where the MSI was (its corner at 1000, 2000 µm), as the imzML reader places it."""
    import dataclasses

    from napari_smsdl.project import project_layers

    folder = tmp_path / "placed"
    save_project(folder, dataclasses.replace(project, msi_origin_rc_um=(1000.0, 2000.0)))
    back = load_project(folder)
    assert back.msi_origin_rc_um == (1000.0, 2000.0)
    layers = {kw["name"]: kw for _, kw, _ in project_layers(back)[0]}
    msi = next(kw for name, kw in layers.items() if name.endswith("(MSI)"))
    truth = next(kw for name, kw in layers.items() if name.endswith("ground truth"))
    unc = layers["uncertainty (SMSDL)"]
    assert tuple(msi["translate"]) == (0.0, 1020.0, 2020.0)  # 40 µm pixels: centre of pixel (0, 0)
    assert tuple(truth["translate"]) == tuple(unc["translate"]) == (0.0, 1005.0, 2005.0)  # 10 µm SR pixels
    # a project saved before the origin was recorded opens at 0, as it did
    snapshot = folder / json.loads((folder / PROJECT_FILE).read_text())["snapshot"]
    params = json.loads((snapshot / "parameters.json").read_text())
    del params["msi_origin_rc_um"]
    _rewrite_snapshot_file(folder, "parameters.json", json.dumps(params))
    assert load_project(folder).msi_origin_rc_um == (0.0, 0.0)
    params["msi_origin_rc_um"] = ["a", 1]
    _rewrite_snapshot_file(folder, "parameters.json", json.dumps(params))
    with pytest.raises(InputError, match="msi_origin_rc_um"):
        load_project(folder)
