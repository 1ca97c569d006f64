"""SpatialData export and import, read back with spatialdata itself.

The export is checked element by element (shapes, channel names, values, the µm transforms) and
the H&E's affine against the registration: a marked H&E pixel must land, through the exported
transform, on the MSI pixel the registration maps it to. The import reads stores written by
spatialdata's own models (an image and a table), and our export, as ``smsdl reconstruct --msi``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

sd = pytest.importorskip("spatialdata")
ad = pytest.importorskip("anndata")

from spatialdata.transformations import get_transformation  # noqa: E402

from napari_smsdl.errors import InputError  # noqa: E402

MZ = (760.5851, 734.5694, 885.5499)
NAMES = tuple(f"m/z {m:.4f}" for m in MZ)
F, MSI_PX, HE_PX = 4, 20.0, 2.0


def _matrix_yx(element, cs="global"):
    t = get_transformation(element, to_coordinate_system=cs)
    return np.asarray(t.to_affine_matrix(input_axes=("y", "x"), output_axes=("y", "x")), float)


def _scale0(element):
    from napari_smsdl.io._spatialdata import _scale0

    return _scale0(element)


def _affine_transform(scale=0.5, angle_deg=7.0, shift=(31.0, -12.5)):
    """A rotation-scale-shift from MSI µm to H&E µm (x, y), as `smsdl register` writes one."""
    import SimpleITK as sitk

    a = np.deg2rad(angle_deg)
    m = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    tx = sitk.AffineTransform(2)
    tx.SetMatrix(m.ravel().tolist())
    tx.SetTranslation(shift)
    return tx


@pytest.fixture
def project(tmp_path):
    """A small in-memory project: 3 m/z, a 6 × 5 MSI at 20 µm, F = 4, an H&E file registered by an affine."""
    from skimage import io as skio

    from napari_smsdl.project import Project, input_records
    from napari_smsdl.reconstruction import Reconstruction, Settings

    rng = np.random.default_rng(7)
    lr = rng.uniform(1, 10, (3, 6, 5)).astype(np.float32)
    lr[:, 0, 0] = np.nan  # not acquired
    sr = {m: rng.uniform(0, 10, (3, 24, 20)).astype(np.float32) for m in ("smsdl", "bicubic", "backprojection", "cnn")}
    sr["smsdl"][:, 0:4, 0:4] = np.nan  # the SR pixels of the missing MSI pixel
    spread = rng.uniform(0, 1, (3, 24, 20)).astype(np.float32)
    he = np.full((90, 80, 3), 230, np.uint8)
    he[40, 30] = (10, 200, 20)  # a marked pixel to follow through the transform
    he_path = tmp_path / "he.png"
    skio.imsave(he_path, he, check_contrast=False)
    guide = rng.uniform(0, 1, (24 * 2, 20 * 2, 3)).astype(np.float32)
    recon = Reconstruction(sr, {"smsdl": 1.5}, guide, None, {}, Settings(factor=F),
                           uncertainty={"smsdl": spread},
                           guidance={"smsdl": {"gain": [0.1, 0.2, -0.1], "gain_std": [0.01] * 3,
                                               "used_histology": [True, True, False]}})
    return Project.from_reconstruction(
        recon, lr_msi=lr, channel_names=NAMES, mz=MZ, msi_pixel_size_um=MSI_PX, he_pixel_size_um=HE_PX,
        transform=_affine_transform(), inputs=input_records(he_path=he_path),
    )


def test_export_round_trip(tmp_path, project):
    from napari_smsdl.project import export_spatialdata

    path = export_spatialdata(project, tmp_path / "out.zarr")
    sdata = sd.read_zarr(path)
    expected = {"msi", "sr_smsdl", "sr_bicubic", "sr_backprojection", "sr_cnn", "uncertainty_smsdl", "he"}
    assert set(sdata.images) == expected
    g = MSI_PX / F
    for name in expected - {"he"}:
        image = sdata.images[name]
        assert list(image.coords["c"].values) == list(NAMES)
        assert tuple(image.dims) == ("c", "y", "x")
        np.testing.assert_allclose(_matrix_yx(image), np.diag([MSI_PX if name == "msi" else g] * 2 + [1.0]))
    np.testing.assert_array_equal(np.asarray(sdata.images["msi"].data), project.lr_msi)
    for method, stack in project.sr.items():
        np.testing.assert_array_equal(np.asarray(sdata.images[f"sr_{method}"].data), stack)
    np.testing.assert_array_equal(np.asarray(sdata.images["uncertainty_smsdl"].data), project.uncertainty["smsdl"])
    # same extent in µm: the MSI grid and every SR grid cover one field
    extents = {n: sd.get_extent(sdata.images[n], coordinate_system="global") for n in ("msi", "sr_smsdl")}
    assert extents["msi"] == extents["sr_smsdl"] == {"y": (0.0, 6 * MSI_PX), "x": (0.0, 5 * MSI_PX)}
    facts = sdata.attrs["napari_smsdl"]
    assert facts["sr_pixel_size_um"] == g and facts["mz"] == list(MZ) and facts["units"] == "micrometer"
    assert facts["registration"]["affine"] == "exact" and "AffineTransform" in facts["registration"]["transform_parameters"]
    assert facts["guidance"]["smsdl"]["used_histology"] == [True, True, False]


def test_export_he_affine_follows_the_registration(tmp_path, project):
    """The marked H&E pixel, mapped by the exported affine, lands where the registration puts it."""
    from napari_smsdl.project import export_spatialdata

    sdata = sd.read_zarr(export_spatialdata(project, tmp_path / "out.zarr"))
    he = sdata.images["he"]
    assert len(he.children) >= 1  # multiscale (a DataTree), even when small
    level0 = np.asarray(_scale0(he).data)
    assert level0.shape == (3, 90, 80) and tuple(level0[:, 40, 30]) == (10, 200, 20)
    m = _matrix_yx(he)
    # centre of H&E pixel (40, 30): intrinsic (40.5, 30.5); its H&E physical µm (x, y) = (30 hp, 40 hp)
    got_um = m @ np.array([40.5, 30.5, 1.0])
    tx = _affine_transform()
    inverse = tx.GetInverse()
    x_msi, y_msi = inverse.TransformPoint((30 * HE_PX, 40 * HE_PX))  # MSI physical (pixel centres at k·p)
    np.testing.assert_allclose(got_um[:2], [y_msi + MSI_PX / 2, x_msi + MSI_PX / 2], atol=1e-9)


def test_export_table_is_sr_pixels_by_mz(tmp_path, project):
    from napari_smsdl.project import export_spatialdata

    sdata = sd.read_zarr(export_spatialdata(project, tmp_path / "out.zarr"))
    table = sdata.tables["table"]
    assert table.shape == (24 * 20 - 16, 3)  # the 16 SR pixels without data are left out
    assert list(table.var_names) == list(NAMES) and list(table.var["mz"]) == list(MZ)
    attrs = table.uns["spatialdata_attrs"]
    assert attrs["region"] == "sr_smsdl" and attrs["instance_key"] == "instance_id"
    rows, cols = table.obs["row"].to_numpy(), table.obs["col"].to_numpy()
    np.testing.assert_array_equal(table.obs["instance_id"].to_numpy(), rows * 20 + cols)
    np.testing.assert_array_equal(np.asarray(table.X), project.sr["smsdl"][:, rows, cols].T)
    g = MSI_PX / F
    np.testing.assert_allclose(table.obsm["spatial"], np.column_stack([(cols + 0.5) * g, (rows + 0.5) * g]))


def test_export_registered_he_when_input_changed(tmp_path, project):
    from napari_smsdl.project import export_spatialdata

    project.input_path("he").write_bytes(b"changed")
    sdata = sd.read_zarr(export_spatialdata(project, tmp_path / "out.zarr"))
    g_k = MSI_PX / F / 2  # the guide image refines the SR grid twice
    np.testing.assert_allclose(_matrix_yx(sdata.images["he"]), np.diag([g_k, g_k, 1.0]))
    assert "registered" in sdata.attrs["napari_smsdl"]["he"]["source"]
    with pytest.raises(InputError, match="changed"):
        export_spatialdata(project, tmp_path / "again.zarr", he="input")


def test_export_refuses_an_existing_store(tmp_path, project):
    from napari_smsdl.project import export_spatialdata

    target = tmp_path / "out.zarr"
    target.mkdir()
    with pytest.raises(InputError, match="already exists"):
        export_spatialdata(project, target)


def test_deformable_registration_is_recorded_as_an_approximate_affine(project):
    import SimpleITK as sitk

    from napari_smsdl.project import he_to_um_matrix

    grid = sitk.Image([40, 40], sitk.sitkFloat32)
    grid.SetSpacing((5.0, 5.0))
    grid.SetOrigin((-10.0, -10.0))
    bspline = sitk.BSplineTransformInitializer(grid, [3, 3], 3)
    params = np.zeros(bspline.GetNumberOfParameters())
    params[7] = 3.0  # one control point pushed 3 µm
    bspline.SetParameters(params.tolist())
    composite = sitk.CompositeTransform([_affine_transform(), bspline])
    matrix, facts = he_to_um_matrix(composite, msi_shape_rc=(6, 5), msi_pixel_size_um=MSI_PX, he_shape_rc=(90, 80),
                                    he_pixel_size_um=HE_PX)
    exact, _ = he_to_um_matrix(_affine_transform(), msi_shape_rc=(6, 5), msi_pixel_size_um=MSI_PX,
                               he_shape_rc=(90, 80), he_pixel_size_um=HE_PX)
    assert facts["affine"].startswith("least-squares") and 0 < facts["max_residual_um"] < 5
    assert "BSpline" in facts["transform_parameters"]
    assert np.abs(matrix - exact).max() > 1e-6  # the deformation moved the fit


def test_missing_extra_names_it(monkeypatch, tmp_path):
    import builtins

    from napari_smsdl.io import write_spatialdata

    real = builtins.__import__

    def no_spatialdata(name, *args, **kwargs):
        if name == "spatialdata" or name.startswith("spatialdata."):
            raise ImportError("No module named 'spatialdata'", name="spatialdata")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_spatialdata)
    with pytest.raises(InputError, match=r"napari-smsdl\[spatialdata\]"):
        write_spatialdata(tmp_path / "x.zarr", msi=np.zeros((1, 2, 2)), channel_names=["a"], msi_pixel_size_um=1,
                          factor=2)


# ---------------------------------------------------------------------------- the CLI and --msi
QUICK = ["--fast", "--ssl-steps", "2", "--regression-steps", "10"]


@pytest.fixture(scope="module")
def sd_inputs(tmp_path_factory):
    """An H&E PNG and the same field's MSI as a SpatialData image written by spatialdata's own model."""
    from skimage import io as skio
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale

    from napari_smsdl.sample import make_sample

    s = make_sample()
    folder = tmp_path_factory.mktemp("sd_inputs")
    skio.imsave(folder / "he.png", s.he_rgb[:64, :64], check_contrast=False)
    lr = s.ground_truth[:3, :16, :16].astype(np.float32)
    image = Image2DModel.parse(lr, dims=("c", "y", "x"), c_coords=list(NAMES),
                               transformations={"global": Scale([10.0, 10.0], axes=("y", "x"))})
    sd.SpatialData(images={"maldi": image}).write(folder / "msi.zarr")
    return folder, lr


def test_cli_reconstruct_reads_spatialdata_msi_and_writes_spatialdata(sd_inputs, tmp_path, capsys):
    from napari_smsdl.cli import main

    folder, lr = sd_inputs
    out, store, project = tmp_path / "run", tmp_path / "result.zarr", tmp_path / "project"
    argv = ["reconstruct", "--he", str(folder / "he.png"), "--msi", str(folder / "msi.zarr"), "--factor", "2",
            *QUICK, "--baselines", "bicubic", "--spatialdata", str(store), "--project", str(project), "-o", str(out)]
    assert main(argv) == 0
    assert f"wrote the SpatialData store {store}" in capsys.readouterr().out
    run = json.loads((out / "run.json").read_text())
    assert run["channels"] == list(NAMES) and run["mz"] == list(MZ) and run["msi_pixel_size_um"] == 10.0
    assert run["spatialdata"] == str(store)
    sdata = sd.read_zarr(store)
    assert {"msi", "sr_smsdl", "sr_bicubic", "uncertainty_smsdl", "he"} <= set(sdata.images)
    np.testing.assert_allclose(np.asarray(sdata.images["msi"].data), lr)
    import tifffile

    np.testing.assert_array_equal(np.asarray(sdata.images["sr_smsdl"].data), tifffile.imread(out / "sr_smsdl.ome.tif"))
    np.testing.assert_allclose(_matrix_yx(sdata.images["sr_smsdl"]), np.diag([5.0, 5.0, 1.0]))
    assert sdata.tables["table"].shape == (32 * 32, 3)

    # smsdl export PROJECT: the same store again from the saved project; an existing one is refused
    again = tmp_path / "again.zarr"
    assert main(["export", str(project), "--spatialdata", str(again)]) == 0
    back = sd.read_zarr(again)
    np.testing.assert_array_equal(np.asarray(back.images["sr_bicubic"].data), np.asarray(sdata.images["sr_bicubic"].data))
    np.testing.assert_array_equal(np.asarray(back.tables["table"].X), np.asarray(sdata.tables["table"].X))
    capsys.readouterr()
    assert main(["export", str(project), "--spatialdata", str(again)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(project), "--spatialdata", str(again), "--overwrite", "--he", "none"]) == 0
    assert "he" not in sd.read_zarr(again).images


def test_msi_from_a_spatialdata_table(tmp_path):
    """A pixels x m/z table with obsm['spatial'] (as imzML converters write it), sparse, with gaps."""
    import pandas as pd
    import scipy.sparse
    from spatialdata.models import TableModel

    from napari_smsdl.io import read_spatialdata_msi

    rng = np.random.default_rng(2)
    rows, cols, px = 5, 7, 25.0
    rr, cc = np.mgrid[:rows, :cols]
    keep = np.ones(rows * cols, bool)
    keep[[3, 17]] = False  # two pixels not acquired
    mz = np.array([700.0, 700.004, 760.5851, 885.5499])
    dense = rng.uniform(0, 5, (rows * cols, 4)).astype(np.float32)
    table = ad.AnnData(X=scipy.sparse.csr_matrix(dense[keep]), var=pd.DataFrame({"mz": mz}, index=[f"b{i}" for i in range(4)]))
    # pixel centres in µm, offset from the origin as instruments write them
    table.obsm["spatial"] = np.column_stack([cc.ravel()[keep] * px + 1000.0, rr.ravel()[keep] * px + 500.0])
    table.obs["region"] = pd.Categorical(["pixels"] * int(keep.sum()))
    table.obs["instance_id"] = np.flatnonzero(keep)
    table = TableModel.parse(table, region="pixels", region_key="region", instance_key="instance_id")
    sd.SpatialData(tables={"msi_table": table}).write(tmp_path / "t.zarr")

    got = read_spatialdata_msi(tmp_path / "t.zarr")
    assert got.element == "tables/msi_table" and got.stack.pixel_size_um == px and got.mz == tuple(mz)
    expected = dense.T.reshape(4, rows, cols).copy()
    expected[:, ~keep.reshape(rows, cols)] = np.nan
    np.testing.assert_array_equal(got.stack.data, expected)
    # --mz 700 with 10 ppm sums the two bins within 7 mDa; an m/z outside the range is refused with it
    summed = read_spatialdata_msi(tmp_path / "t.zarr", mz=[700.002, 885.5499], tol="10ppm")
    assert summed.stack.channel_names == ("m/z 700.0020", "m/z 885.5499")
    np.testing.assert_allclose(summed.stack.data[0], expected[0] + expected[1], rtol=1e-6)
    with pytest.raises(InputError, match="m/z range is 700.0000-885.5499"):
        read_spatialdata_msi(tmp_path / "t.zarr", mz=[500.0])


def test_msi_store_errors_name_the_problem(tmp_path, sd_inputs, project):
    from napari_smsdl.io import read_spatialdata_msi
    from napari_smsdl.project import export_spatialdata

    with pytest.raises(InputError, match="not a SpatialData store"):
        read_spatialdata_msi(tmp_path / "nothing.zarr")
    # our own export holds many m/z images: "msi" is the one read; any other by its path
    store = export_spatialdata(project, tmp_path / "ours.zarr")
    assert read_spatialdata_msi(store).element == "images/msi"
    sr = read_spatialdata_msi(store / "images" / "sr_bicubic")
    assert sr.stack.pixel_size_um == MSI_PX / F and sr.mz == MZ
    np.testing.assert_array_equal(sr.stack.data, project.sr["bicubic"])
    from spatialdata.models import Image2DModel

    two = {n: Image2DModel.parse(np.ones((2, 4, 4), np.float32), dims=("c", "y", "x"), c_coords=["100.5", "200.5"])
           for n in ("a", "b")}
    sd.SpatialData(images=two).write(tmp_path / "two.zarr")
    with pytest.raises(InputError, match=r"several MSI candidates; give one of .*two.zarr/images/a"):
        read_spatialdata_msi(tmp_path / "two.zarr")


@pytest.mark.gui
def test_export_widget_writes_spatialdata(make_napari_viewer, qtbot, tmp_path, project):
    from napari_smsdl.project import LAYER_METADATA_KEY
    from napari_smsdl.widgets.export import ExportWidget

    viewer = make_napari_viewer()
    viewer.add_image(project.lr_msi, name="msi", metadata={LAYER_METADATA_KEY: project})
    export = ExportWidget(viewer)
    qtbot.addWidget(export)
    assert export.spatialdata.value is False  # needs the extra: off unless ticked
    export.spatialdata.value = True
    for box in (export.ome, export.imzml, export.csv, export.png):
        box.value = False
    export.export(tmp_path / "out")
    qtbot.waitUntil(lambda: not export.busy, timeout=60_000)
    assert export.last_error is None, export.last_error
    sdata = sd.read_zarr(tmp_path / "out" / "results.zarr")
    np.testing.assert_array_equal(np.asarray(sdata.images["sr_cnn"].data), project.sr["cnn"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["results.zarr"]


# ---------------------------------------------------------------------------- the tutorial's section
def _tutorial_blocks() -> list[str]:
    """The python code blocks of docs/tutorial.md's "Take it further" section, in order."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "tutorial.md").read_text(encoding="utf-8")
    section = text.split("## Take it further", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.fixture
def exported(tmp_path, project, monkeypatch):
    from napari_smsdl.project import export_spatialdata

    export_spatialdata(project, tmp_path / "results.zarr")
    monkeypatch.chdir(tmp_path)
    return project


def test_tutorial_opens_the_store_and_runs_scanpy(exported):
    pytest.importorskip("scanpy")
    import matplotlib

    matplotlib.use("Agg")
    blocks = _tutorial_blocks()
    assert len(blocks) == 3
    ns: dict = {}
    exec(compile(blocks[0], "tutorial: open", "exec"), ns)
    assert set(ns["sdata"].images) >= {"he", "msi", "sr_smsdl"}
    exec(compile(blocks[2], "tutorial: scanpy", "exec"), ns)
    adata, segments = ns["adata"], ns["segments"]
    assert adata.obsm["X_pca"].shape == (24 * 20 - 16, 2)
    assert segments.shape == (24, 20) and set(np.unique(segments)) == {0, 1, 2, 3}
    assert (segments[:4, :4] == 0).all()  # the SR pixels without data stay unsegmented


@pytest.mark.gui
def test_tutorial_napari_spatialdata(exported, qtbot):
    pytest.importorskip("napari_spatialdata")
    blocks = _tutorial_blocks()
    ns: dict = {}
    exec(compile(blocks[0], "tutorial: open", "exec"), ns)
    # as shown, but headless: the test must not enter napari's event loop
    code = blocks[1].replace("Interactive(sdata)", "interactive = Interactive(sdata, headless=True)")
    exec(compile(code, "tutorial: napari-spatialdata", "exec"), ns)
    interactive = ns["interactive"]
    try:
        widget = interactive._sdata_widget  # the element list offers the store's coordinate system
        assert "global" in [widget.coordinate_system_widget.item(i).text()
                            for i in range(widget.coordinate_system_widget.count())]
    finally:
        qtbot.wait(200)
        interactive._viewer.close()


# ---------------------------------------------------------------------------- many channels (lazy stacks)
def test_lazy_project_exports_from_its_zarr_stores(tmp_path, project, monkeypatch):
    """A many-channel project's SR stacks are zarr arrays on disk: exported channel by channel, same values;
    above TABLE_MAX_VALUES the table is left out and the attributes say so."""
    import dataclasses

    import zarr

    import napari_smsdl.io._spatialdata as sdmod
    from napari_smsdl.project import export_project

    def on_disk(name, stack):
        arr = zarr.create_array(str(tmp_path / f"{name}.zarr"), shape=stack.shape, chunks=(1, *stack.shape[1:]),
                                dtype="float32")
        arr[:] = stack
        return zarr.open_array(str(tmp_path / f"{name}.zarr"), mode="r")

    lazy = dataclasses.replace(project, sr={m: on_disk(m, v) for m, v in project.sr.items()},
                               uncertainty={"smsdl": on_disk("u", project.uncertainty["smsdl"])}, guide_rgb=None)
    assert lazy.lazy
    written = export_project(lazy, tmp_path / "out", formats=("spatialdata",))
    sdata = sd.read_zarr(written["results.zarr"])
    for method, stack in project.sr.items():
        np.testing.assert_array_equal(np.asarray(sdata.images[f"sr_{method}"].data), stack)
    table = sdata.tables["table"]
    rows, cols = table.obs["row"].to_numpy(), table.obs["col"].to_numpy()
    np.testing.assert_array_equal(np.asarray(table.X), project.sr["smsdl"][:, rows, cols].T)
    assert sdata.tables["table"].shape == (24 * 20 - 16, 3)

    monkeypatch.setattr(sdmod, "TABLE_MAX_VALUES", 100)
    written = export_project(lazy, tmp_path / "small", formats=("spatialdata",))
    sdata = sd.read_zarr(written["results.zarr"])
    assert "table" not in sdata.tables
    assert sdata.attrs["napari_smsdl"]["table"].startswith("left out: 1440 values")


def test_cli_register_reads_a_spatialdata_msi(tmp_path):
    """`smsdl register --msi STORE.zarr` takes the MSI and its pixel size (no --msi-pixel-size) from the store."""
    from skimage import data
    from skimage import io as skio
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale

    from napari_smsdl.cli import main
    from napari_smsdl.registration import write_landmarks_csv
    from napari_smsdl.registration._synthetic import make_synthetic_pair

    he = data.immunohistochemistry()[128:384, 128:384]
    pair = make_synthetic_pair(he, moving_pixel_size_um=1.0, fixed_pixel_size_um=8.0, seed=4, deformation_msi_px=1.5)
    skio.imsave(tmp_path / "he.png", pair.moving_rgb, check_contrast=False)
    write_landmarks_csv(pair.landmarks, tmp_path / "pairs.csv")
    msi = np.asarray(pair.fixed_msi, np.float32)
    msi = msi[None] if msi.ndim == 2 else msi
    image = Image2DModel.parse(msi, dims=("c", "y", "x"), c_coords=[f"m/z {700 + i}.0000" for i in range(len(msi))],
                               transformations={"global": Scale([8.0, 8.0], axes=("y", "x"))})
    sd.SpatialData(images={"msi": image}).write(tmp_path / "msi.zarr")
    out = tmp_path / "reg"
    argv = ["register", "--he", str(tmp_path / "he.png"), "--msi", str(tmp_path / "msi.zarr"), "--he-pixel-size", "1",
            "--landmarks", str(tmp_path / "pairs.csv"), "--no-bspline", "--threads", "2", "-o", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["fixed"]["pixel_size_um"] == 8.0
    # the same registration as from the .npy with its pixel size given
    np.save(tmp_path / "msi.npy", pair.fixed_msi)
    argv_npy = [a if a != str(tmp_path / "msi.zarr") else str(tmp_path / "msi.npy") for a in argv]
    argv_npy[argv_npy.index("-o") + 1] = str(tmp_path / "reg_npy")
    assert main([*argv_npy, "--msi-pixel-size", "8"]) == 0
    import SimpleITK as sitk

    a = sitk.ReadTransform(str(out / "transform.tfm"))
    b = sitk.ReadTransform(str(tmp_path / "reg_npy" / "transform.tfm"))
    points = [(x, y) for x in (0.0, 90.0, 180.0) for y in (0.0, 90.0, 180.0)]
    np.testing.assert_allclose([a.TransformPoint(p) for p in points], [b.TransformPoint(p) for p in points], atol=1e-6)


def test_what_counts_as_an_mz_channel(tmp_path):
    from spatialdata.models import Image2DModel

    from napari_smsdl.io import read_spatialdata_msi
    from napari_smsdl.io._spatialdata import mz_from_name

    assert [mz_from_name(n) for n in ("m/z 885.5499", "mz_760.58", "MZ:700", "734.5694")] == [885.5499, 760.58, 700.0,
                                                                                            734.5694]
    assert [mz_from_name(n) for n in ("0", "12", "channel 1", "r", "m/z")] == [None] * 5
    # channels named 0, 1 (spatialdata's default) are not m/z: such a store holds no MSI candidate
    plain = Image2DModel.parse(np.ones((2, 4, 4), np.float32), dims=("c", "y", "x"))
    sd.SpatialData(images={"tic": plain}).write(tmp_path / "plain.zarr")
    with pytest.raises(InputError, match="no image with m/z channel names"):
        read_spatialdata_msi(tmp_path / "plain.zarr")
    # asked for by its path it is read; with only the default identity transform its pixel size is unknown
    got = read_spatialdata_msi(tmp_path / "plain.zarr/images/tic")
    assert got.stack.pixel_size_um is None and got.mz is None and got.stack.channel_names == ("0", "1")
    assert read_spatialdata_msi(tmp_path / "plain.zarr/images/tic", pixel_size_um=12.5).stack.pixel_size_um == 12.5


def test_cli_chunked_reconstruct_writes_spatialdata(sd_inputs, tmp_path):
    """The many-channel path (SR stacks streamed to zarr) exports the same SR values as its OME-TIFFs."""
    import tifffile

    from napari_smsdl.cli import main

    folder, lr = sd_inputs
    out, store = tmp_path / "run", tmp_path / "chunked.zarr"
    argv = ["reconstruct", "--he", str(folder / "he.png"), "--msi", str(folder / "msi.zarr"), "--factor", "2",
            *QUICK, "--chunk-channels", "2", "--baselines", "bicubic", "--spatialdata", str(store), "-o", str(out)]
    assert main(argv) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["chunk_channels"] == 2 and run["spatialdata"] == str(store)
    sdata = sd.read_zarr(store)
    for method in ("smsdl", "bicubic"):
        np.testing.assert_array_equal(np.asarray(sdata.images[f"sr_{method}"].data),
                                      tifffile.imread(out / f"sr_{method}.ome.tif"))
    np.testing.assert_array_equal(np.asarray(sdata.images["uncertainty_smsdl"].data),
                                  tifffile.imread(out / "uncertainty_smsdl.ome.tif"))
    assert list(sdata.images["sr_smsdl"].coords["c"].values) == list(NAMES)


def test_export_reads_a_pyramidal_he_tile_by_tile(tmp_path, project):
    """A whole-slide (tiled, pyramidal) H&E input is exported from its file level by level, same pixels."""
    import dataclasses

    from napari_smsdl.io import open_histology, write_pyramidal_tiff
    from napari_smsdl.project import export_spatialdata, input_records

    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, (600, 520, 3), dtype=np.uint8)
    slide = write_pyramidal_tiff(tmp_path / "slide.ome.tif", rgb, pixel_size_um=HE_PX, n_levels=3)
    assert len(open_histology(slide).levels) == 3
    tiled = dataclasses.replace(project, inputs=input_records(he_path=slide))
    sdata = sd.read_zarr(export_spatialdata(tiled, tmp_path / "out.zarr"))
    he = sdata.images["he"]
    np.testing.assert_array_equal(np.moveaxis(np.asarray(_scale0(he).data), 0, -1), rgb)
    assert len(he.children) == 2  # 600 x 520: one level of 2 (the next would be under 256 pixels)
    assert sdata.attrs["napari_smsdl"]["he"]["source"] == str(slide)
