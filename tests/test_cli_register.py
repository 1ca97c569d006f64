"""``smsdl register``: the CLI contract (files, transform direction, report keys) and bad-input rules."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")

from napari_smsdl.cli import main  # noqa: E402
from napari_smsdl.registration import rc_to_xy_um, write_landmarks_csv  # noqa: E402
from napari_smsdl.registration._synthetic import make_synthetic_pair, warp_error_msi_px  # noqa: E402

P_MSI, P_HE = 8.0, 1.0


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A synthetic pair on disk: he.png (256 x 256), msi.npy (23 x 23, NaN holes), pairs.csv (6 noisy pairs)."""
    from skimage import data
    from skimage import io as skio

    d = tmp_path_factory.mktemp("reg")
    he = data.immunohistochemistry()[128:384, 128:384]
    pair = make_synthetic_pair(he, moving_pixel_size_um=P_HE, fixed_pixel_size_um=P_MSI, seed=4, deformation_msi_px=1.5)
    skio.imsave(d / "he.png", pair.moving_rgb, check_contrast=False)
    np.save(d / "msi.npy", pair.fixed_msi)
    write_landmarks_csv(pair.landmarks, d / "pairs.csv")
    return d, pair


def _argv(d, out, *extra, landmarks=True):
    argv = [
        "register",
        "--he",
        str(d / "he.png"),
        "--msi",
        str(d / "msi.npy"),
        "--he-pixel-size",
        str(P_HE),
        "--msi-pixel-size",
        str(P_MSI),
        "-o",
        str(out),
        "--threads",
        "2",
    ]
    if landmarks:
        argv += ["--landmarks", str(d / "pairs.csv")]
    return argv + list(extra)


def test_register_writes_transform_and_report(files, tmp_path, capsys):
    d, pair = files
    out = tmp_path / "out"
    assert main(_argv(d, out)) == 0
    assert "wrote" in capsys.readouterr().out
    tx = sitk.ReadTransform(str(out / "transform.tfm"))
    # direction: MSI physical (x = col * 8, y = row * 8) -> H&E physical, close to the planted warp
    err = warp_error_msi_px(tx, pair.true_transform, pair.eval_msi_rc, P_MSI)
    assert np.median(err) < 0.5
    he_xy = rc_to_xy_um(pair.landmarks.he_rc, P_HE)
    mapped = np.array([tx.TransformPoint(tuple(p)) for p in rc_to_xy_um(pair.landmarks.msi_rc, P_MSI)])
    assert np.median(np.linalg.norm(mapped - he_xy, axis=1)) < 1.0 * P_MSI  # landmarks within noise
    report = json.loads((out / "report.json").read_text())
    assert set(report) >= {"loo_error_um", "folds_in_tissue", "stages", "seconds"}
    assert set(report["loo_error_um"]) >= {"median", "p90", "max"}
    assert report["folds_in_tissue"] == 0
    assert {s["name"] for s in report["stages"]} == {"landmark affine", "affine refinement", "B-spline"}
    for name in ("affine.tfm", "params.json", "landmarks.csv"):
        assert (out / name).exists()


def test_register_without_landmarks_has_null_loo(files, tmp_path):
    d, _ = files
    out = tmp_path / "out"
    assert main(_argv(d, out, "--no-bspline", landmarks=False)) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["loo_error_um"] is None
    assert report["stages"][0]["name"] == "same field of view"
    assert report["stages"][2] == {"name": "B-spline", "ran": False, "kept": False, "reason": "not asked for"}


def test_register_an_ion_stack_adds_confidence_and_misregistration(files, tmp_path, capsys):
    d, pair = files
    base = np.nan_to_num(pair.fixed_msi, nan=float(np.nanmean(pair.fixed_msi)))
    stack = np.stack([base, base**2, 1.0 - base]).astype(np.float32)
    np.save(d / "stack.npy", stack)
    out = tmp_path / "out"
    argv = _argv(d, out)
    argv[argv.index(str(d / "msi.npy"))] = str(d / "stack.npy")
    assert main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["criterion"] == "channels"
    assert set(report) >= {"loo_error_um", "folds_in_tissue", "stages", "seconds", "confidence_msi_px",
                           "misregistration_msi_px"}
    assert set(report["misregistration_msi_px"]) == {"median", "p90"}
    assert report["confidence_msi_px"] > 0 and "confidence" in printed
    assert np.load(out / "misregistration.npy").shape == stack.shape[1:]
    # the Mattes path on the same stack, asked for by name
    out2 = tmp_path / "out2"
    argv[argv.index(str(out))] = str(out2)
    assert main(argv + ["--criterion", "mattes", "--no-bspline"]) == 0
    assert json.loads((out2 / "report.json").read_text())["criterion"] == "mattes"


def test_register_reads_imzml_tic_and_its_pixel_size(files, tmp_path):
    from napari_smsdl.io import write_imzml

    d, pair = files
    msi = pair.fixed_msi
    mz = np.array([500.0, 600.0, 700.0])
    spectra = [
        (r, c, mz, np.array([0.5, 0.3, 0.2], np.float32) * msi[r, c])
        for r in range(msi.shape[0])
        for c in range(msi.shape[1])
        if np.isfinite(msi[r, c])
    ]
    path = write_imzml(tmp_path / "msi.imzML", spectra, mode="continuous", pixel_size_um=P_MSI)
    out = tmp_path / "out"
    argv = [
        "register",
        "--he",
        str(d / "he.png"),
        "--msi",
        str(path),
        "--he-pixel-size",
        "1",
        "--landmarks",
        str(d / "pairs.csv"),
        "-o",
        str(out),
        "--no-bspline",
        "--no-affine-refinement",
    ]
    assert main(argv) == 0  # no --msi-pixel-size: taken from the imzML
    report = json.loads((out / "report.json").read_text())
    assert report["fixed"]["pixel_size_um"] == P_MSI and report["fixed"]["shape_rc"] == list(msi.shape)


def test_pyramidal_he_gives_the_level0_transform(files, tmp_path):
    """A reduced pyramid level is read, but the transform is expressed in level-0 physical space."""
    from napari_smsdl.io import write_pyramidal_tiff

    d, pair = files
    big = np.repeat(np.repeat(pair.moving_rgb, 2, axis=0), 2, axis=1)  # 512 x 512 at 0.5 µm, same physical image
    write_pyramidal_tiff(tmp_path / "he.ome.tif", big, pixel_size_um=0.5, n_levels=3, tile=128)
    from napari_smsdl.registration import LandmarkPairs, read_landmarks_csv

    lm = read_landmarks_csv(d / "pairs.csv")
    write_landmarks_csv(LandmarkPairs((lm.he_rc + 0.5) * 2 - 0.5, lm.msi_rc), tmp_path / "pairs0.csv")
    common = ["--msi", str(d / "msi.npy"), "--msi-pixel-size", "8", "--no-bspline", "--no-affine-refinement"]
    assert (
        main(
            [
                "register",
                "--he",
                str(tmp_path / "he.ome.tif"),
                "--landmarks",
                str(tmp_path / "pairs0.csv"),
                "-o",
                str(tmp_path / "pyr"),
                *common,
            ]
        )
        == 0
    )  # pixel size from the OME metadata
    assert (
        main(
            [
                "register",
                "--he",
                str(d / "he.png"),
                "--he-pixel-size",
                "1",
                "--landmarks",
                str(d / "pairs.csv"),
                "-o",
                str(tmp_path / "png"),
                *common,
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "pyr" / "report.json").read_text())
    assert report["moving"]["level_scale"] == 0.5 and report["moving"]["pixel_size_um"] == 0.5
    a = sitk.ReadTransform(str(tmp_path / "pyr" / "transform.tfm"))
    b = sitk.ReadTransform(str(tmp_path / "png" / "transform.tfm"))
    # level-0 pixel (0, 0) is centred 0.25 µm before the PNG's (one PNG pixel = 2 x 2 level-0 pixels)
    for p in [(0.0, 0.0), (80.0, 120.0), (170.0, 30.0)]:
        np.testing.assert_allclose(np.subtract(a.TransformPoint(p), b.TransformPoint(p)), [0.25, 0.25], atol=1e-6)


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("missing_he", "nothere.png"),
        ("missing_landmarks", "nothere.csv"),
        ("bad_header", "lacks column"),
        ("two_pairs", "2 landmark pairs"),
        ("zero_pixel_size", "--msi-pixel-size must be a positive"),
        ("landmark_outside", "outside the MSI image"),
        ("no_msi_pixel_size", "give --msi-pixel-size"),
    ],
)
def test_bad_input_one_line_no_traceback(files, tmp_path, case, needle):
    d, pair = files
    argv = _argv(d, tmp_path / "out")
    if case == "missing_he":
        argv[argv.index("--he") + 1] = str(tmp_path / "nothere.png")
    elif case == "missing_landmarks":
        argv[argv.index("--landmarks") + 1] = str(tmp_path / "nothere.csv")
    elif case in ("bad_header", "two_pairs", "landmark_outside"):
        text = {
            "bad_header": "a,b,c,d\n1,2,3,4\n",
            "two_pairs": "he_row,he_col,msi_row,msi_col\n1,2,3,4\n50,60,7,8\n",
            "landmark_outside": "he_row,he_col,msi_row,msi_col\n10,10,1,1\n100,10,10,1\n10,100,1,10\n50,50,500,5\n",
        }[case]
        (tmp_path / "bad.csv").write_text(text)
        argv[argv.index("--landmarks") + 1] = str(tmp_path / "bad.csv")
    elif case == "zero_pixel_size":
        argv[argv.index("--msi-pixel-size") + 1] = "0"
    elif case == "no_msi_pixel_size":
        i = argv.index("--msi-pixel-size")
        del argv[i : i + 2]
    proc = subprocess.run([sys.executable, "-m", "napari_smsdl", *argv], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines
    if case in ("bad_header", "two_pairs", "landmark_outside"):
        assert "bad.csv" in lines[0]
    assert not (tmp_path / "out" / "transform.tfm").exists()
