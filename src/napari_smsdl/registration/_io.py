"""Save and load a registration: transform (.tfm), landmarks (CSV), parameters and report (JSON)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .._files import jsonable as _jsonable

from ..errors import InputError
from ._landmarks import write_landmarks_csv
from ._params import RegistrationParams

__all__ = ["load_params", "load_report", "load_transform", "save_registration"]

TRANSFORM_FILE = "transform.tfm"
AFFINE_FILE = "affine.tfm"
REPORT_FILE = "report.json"
PARAMS_FILE = "params.json"
LANDMARKS_FILE = "landmarks.csv"
MISREGISTRATION_FILE = "misregistration.npy"




def save_registration(result, outdir: str | os.PathLike, *, images: bool = False) -> dict[str, Path]:
    """Write what is needed to reproduce and inspect a registration into ``outdir``.

    Files: ``transform.tfm`` (the full MSI physical → H&E physical composite, readable by
    ``SimpleITK.ReadTransform``), ``affine.tfm`` (its affine part), ``report.json``, ``params.json``,
    ``landmarks.csv`` (when there were landmarks), ``misregistration.npy`` (the local misregistration
    map, (rows, cols) float32 MSI px, NaN outside tissue patches, when there is one), and with ``images=True`` float32/uint8 TIFFs of the
    warped H&E, checkerboard and Jacobian map. ``report.json`` is written last.

    Returns
    -------
    dict
        Name → path of every file written.
    """
    import SimpleITK as sitk

    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    sitk.WriteTransform(result.transform, str(out / TRANSFORM_FILE))
    written["transform"] = out / TRANSFORM_FILE
    sitk.WriteTransform(result.affine, str(out / AFFINE_FILE))
    written["affine"] = out / AFFINE_FILE
    (out / PARAMS_FILE).write_text(json.dumps(result.params.to_dict(), indent=2))
    written["params"] = out / PARAMS_FILE
    if getattr(result, "misregistration", None) is not None:
        np.save(out / MISREGISTRATION_FILE, np.asarray(result.misregistration, np.float32))
        written["misregistration"] = out / MISREGISTRATION_FILE
    if result.landmarks is not None:
        written["landmarks"] = write_landmarks_csv(result.landmarks, out / LANDMARKS_FILE)
    if images:
        import tifffile

        grid = result.display_grid
        res = (1e4 / grid.pixel_size_um, 1e4 / grid.pixel_size_um)
        for name, arr in (("warped_he", result.warped_he_rgb), ("checkerboard", result.checkerboard)):
            path = out / f"{name}.tif"
            tifffile.imwrite(
                path,
                arr,
                resolution=res,
                resolutionunit="CENTIMETER",
                photometric="rgb" if arr.ndim == 3 else "minisblack",
            )
            written[name] = path
        msi_res = (1e4 / result.fixed_pixel_size_um,) * 2
        path = out / "jacobian.tif"
        tifffile.imwrite(path, result.jacobian.astype(np.float32), resolution=msi_res, resolutionunit="CENTIMETER")
        written["jacobian"] = path
    # last: a report.json marks a finished registration (the CLI refuses to write over one)
    (out / REPORT_FILE).write_text(json.dumps(_jsonable(result.report), indent=2))
    written["report"] = out / REPORT_FILE
    return written


def load_transform(path: str | os.PathLike):
    """Read a transform written by :func:`save_registration` (MSI physical → H&E physical).

    ``path`` may be the ``.tfm`` file or the output directory holding ``transform.tfm``.
    """
    import SimpleITK as sitk

    path = Path(path)
    if path.is_dir():
        path = path / TRANSFORM_FILE
    if not path.exists():
        raise InputError("transform file not found", path)
    try:
        return sitk.ReadTransform(str(path))
    except RuntimeError as exc:
        raise InputError(f"not a readable ITK transform ({' '.join(str(exc).split())[-200:]})", path) from exc


def load_report(path: str | os.PathLike) -> dict:
    """Read ``report.json`` (``path`` may be the file or its directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / REPORT_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise InputError("report file not found", path) from exc
    except json.JSONDecodeError as exc:
        raise InputError(f"not valid JSON ({exc.msg} at line {exc.lineno})", path) from exc


def load_params(path: str | os.PathLike) -> RegistrationParams:
    """Read ``params.json`` (``path`` may be the file or its directory) into :class:`RegistrationParams`."""
    path = Path(path)
    if path.is_dir():
        path = path / PARAMS_FILE
    try:
        return RegistrationParams.from_dict(json.loads(path.read_text()))
    except FileNotFoundError as exc:
        raise InputError("parameters file not found", path) from exc
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise InputError(f"not valid registration parameters ({exc})", path) from exc
