"""``smsdl export PROJECT --spatialdata OUT.zarr``: a saved project as one SpatialData store.

Writes the H&E, the measured MSI, every SR stack (SMSDL, bicubic, the H&E-free control, CNN) and
SMSDL's uncertainty as images with m/z channel names, in one µm coordinate system with the
registration recorded, plus an AnnData table of SMSDL's SR pixels × m/z
(:func:`napari_smsdl.project.export_spatialdata`). Needs the extra ``napari-smsdl[spatialdata]``.
The store is written beside OUT.zarr and renamed into place; an existing one is refused unless
``--overwrite``.
"""

from __future__ import annotations

from pathlib import Path


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("export", help="write a saved project as one SpatialData .zarr (H&E, MSI, SR, table)")
    parser.add_argument("project", help="project folder (from `smsdl reconstruct --project` or the Export widget)")
    parser.add_argument("--spatialdata", required=True, metavar="OUT.zarr",
                        help="SpatialData store to write (needs napari-smsdl[spatialdata])")
    parser.add_argument("--he", choices=["auto", "input", "registered", "none"], default="auto",
                        help="which H&E: the input file (unchanged, full resolution, registration as an affine), "
                        "the registered one stored in the project, or none (default: the input when unchanged)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing store")
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..errors import InputError
    from ..io._spatialdata import _import_spatialdata
    from ..project import export_spatialdata, load_project

    out = Path(args.spatialdata)
    if out.suffix.lower() != ".zarr":
        raise InputError("the SpatialData store must end in .zarr", out)
    if out.exists() and not args.overwrite:
        raise InputError("already exists; choose another path or add --overwrite", out)
    _import_spatialdata()  # the missing extra is named before the project is read
    project = load_project(args.project)
    path = export_spatialdata(project, out, he=args.he, overwrite=args.overwrite)
    print(f"wrote {path} ({len(project.sr)} SR stacks, {len(project.channel_names)} channels) from {project.path}")
    return 0
