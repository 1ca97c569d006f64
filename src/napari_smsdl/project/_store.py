"""Saving and reopening a project folder, atomically, with lazy stores for many channels.

Atomicity: a save writes a complete new snapshot into a hidden staging folder, flushes it to
disk, renames it into place, and only then replaces ``project.json`` (temp file + ``os.replace``).
A crash at any point leaves either the previous manifest with its intact snapshot or the new one
with its complete snapshot; leftovers of an interrupted save are removed by the next save.
:func:`load_project` checks every file against the manifest's hashes.

Several processes: a writer holds an OS lock on ``DIR/.smsdl-write.lock`` for its whole save
(:func:`project_lock`; the CLI takes it before the work starts), so a second writer waits up to
``$SMSDL_LOCK_TIMEOUT`` seconds (default 30) and then refuses, naming the project. The swap (the
rename, the new manifest, the removal of the old snapshot) runs under an exclusive lock on
``DIR/.smsdl-read.lock`` that :func:`load_project` holds shared while it reads, so a reader sees the
old save or the new one, never a snapshot being removed. Staging folders carry the writer's pid and
a random part; only those of dead processes are removed.

A lazy (many-channel) project is saved page by page (its OME-TIFFs are never held whole;
``parameters.json`` records ``"lazy": true``) and reopened lazily: its stacks are zarr views of the
OME-TIFFs (``tifffile`` ``aszarr``, :func:`open_lazy_tiff`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import logging
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np

from .._files import fsync_dir, jsonable, sha256_file
from .._locks import LockTimeout, file_lock, lock_holder, lock_timeout
from .._outputs import test_save_delay
from ..errors import InputError
from ._format import (
    CACHE_DIR,
    FORMAT,
    FORMAT_VERSION,
    GUIDANCE,
    GUIDE,
    LANDMARKS,
    LOSS_HISTORY,
    MASKS,
    METRICS_CSV,
    METRICS_JSON,
    MSI_LR,
    PARAMETERS,
    PROJECT_FILE,
    REGISTRATION_REPORT,
    SNAPSHOT_RE,
    STAGING_PREFIX,
    TRANSFORM,
    TRUTH,
    WEIGHTS,
    InputRecord,
    _nan_metrics,
    _read_manifest,
    settings_from_dict,
    sr_file,
    uncertainty_file,
)
from ._project import Project, is_lazy

log = logging.getLogger(__name__)


class _Pages:
    """A lazy (C, rows, cols) stack read one channel at a time (for ``write_tiff_stack``)."""

    def __init__(self, stack):
        self._stack = stack
        self.shape = tuple(int(n) for n in stack.shape)
        self.chunks = (1, *self.shape[1:])

    def __getitem__(self, key):
        return np.asarray(self._stack[key], np.float32)


def _pageable(stack):
    """``stack`` itself when ``write_tiff_stack`` can stream it (numpy, integer chunks), else :class:`_Pages`."""
    chunks = getattr(stack, "chunks", None)
    if not is_lazy(stack) or (chunks and all(isinstance(c, (int, np.integer)) for c in chunks)):
        return stack
    return _Pages(stack)


def open_lazy_tiff(path: str | os.PathLike, n_channels: int):
    """A (C, rows, cols) OME-TIFF as a read-only zarr array, read page by page (``tifffile`` ``aszarr``)."""
    import tifffile
    import zarr

    try:
        arr = zarr.open(tifffile.imread(path, aszarr=True), mode="r")
    except Exception as exc:
        raise InputError(f"unreadable TIFF ({exc})", path) from exc
    if arr.ndim != 3 or int(arr.shape[0]) != int(n_channels):
        raise InputError(f"stack of shape {tuple(arr.shape)} does not hold {n_channels} channels", path)
    return arr

def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(root)


def _write_snapshot(stage: Path, project: Project) -> None:
    """Write every file of a snapshot into ``stage`` (a fresh folder)."""
    import tifffile

    from ..io import write_metrics_csv, write_tiff_stack

    for sub in ("inputs", "registration", "weights", "results"):
        (stage / sub).mkdir(parents=True, exist_ok=True)
    names = list(project.channel_names)
    write_tiff_stack(stage / MSI_LR, project.lr_msi, channel_names=names, pixel_size_um=project.msi_pixel_size_um)
    for method, stack in project.sr.items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", method):
            raise InputError(f"method name {method!r} cannot be a file name")
        write_tiff_stack(stage / sr_file(method), _pageable(stack), channel_names=names,
                         pixel_size_um=project.sr_pixel_size_um)
    for method, stack in project.uncertainty.items():
        if method not in project.sr:
            raise InputError(f"uncertainty of {method!r}, which has no SR stack")
        write_tiff_stack(stage / uncertainty_file(method), _pageable(stack), channel_names=names,
                         pixel_size_um=project.sr_pixel_size_um)
    if project.guidance or project.choices:
        (stage / GUIDANCE).write_text(json.dumps(jsonable({"guidance": project.guidance, "choices": project.choices}),
                                                 indent=2), encoding="utf-8")
    if project.guide_rgb is not None:
        guide = np.asarray(project.guide_rgb)
        if guide.dtype != np.uint8:
            guide = np.clip(np.round(np.nan_to_num(guide.astype(np.float32)) * 255.0), 0, 255).astype(np.uint8)
        tifffile.imwrite(stage / GUIDE, guide, photometric="rgb", compression="zlib")
    if project.truth is not None:
        write_tiff_stack(stage / TRUTH, _pageable(project.truth), channel_names=names,
                         pixel_size_um=project.sr_pixel_size_um)
    masks = {k: np.asarray(v, bool) for k, v in (("mask_hr", project.mask_hr), ("mask_lr", project.mask_lr)) if v is not None}
    if masks:
        np.savez_compressed(stage / MASKS, **masks)
    if project.metrics is not None:
        (stage / METRICS_JSON).write_text(json.dumps(jsonable(project.metrics), indent=2), encoding="utf-8")
        write_metrics_csv(stage / METRICS_CSV, project.metrics, channel_names=names)
    (stage / LOSS_HISTORY).write_text(json.dumps(jsonable(project.loss_history)), encoding="utf-8")
    if project.transform is not None:
        import SimpleITK as sitk

        sitk.WriteTransform(project.transform, str(stage / TRANSFORM))
    if project.landmarks is not None and len(project.landmarks):
        from ..registration import write_landmarks_csv

        write_landmarks_csv(project.landmarks, stage / LANDMARKS)
    if project.registration_report is not None:
        (stage / REGISTRATION_REPORT).write_text(json.dumps(jsonable(project.registration_report), indent=2))
    if project.weights_path is not None:
        if not Path(project.weights_path).is_file():
            raise InputError("trained weights file not found", project.weights_path)
        shutil.copyfile(project.weights_path, stage / WEIGHTS)
    parameters = {
        "settings": project.settings.to_dict(),
        "methods": list(project.sr),
        "uncertainty": list(project.uncertainty),
        "factor": project.factor,
        "channel_names": names,
        "mz": None if project.mz is None else list(project.mz),
        "msi_pixel_size_um": project.msi_pixel_size_um,
        "he_pixel_size_um": project.he_pixel_size_um,
        "sr_pixel_size_um": project.sr_pixel_size_um,
        "lr_shape": list(project.lr_msi.shape),
        "msi_origin_rc_um": [float(v) for v in project.msi_origin_rc_um],
        "seconds": project.seconds,
        "lazy": project.lazy,
    }
    (stage / PARAMETERS).write_text(json.dumps(jsonable(parameters), indent=2), encoding="utf-8")
    for sub in ("inputs", "registration", "weights", "results"):
        if not any((stage / sub).iterdir()):
            (stage / sub).rmdir()


def _copy_cache(source: Path | None, target: Path) -> list[str]:
    """Copy feature-cache files into the project's cache (each atomically); their names."""
    if source is None or not Path(source).is_dir():
        return []
    source = Path(source)
    names = []
    for path in sorted(source.glob("features-*.npz")):
        if ".tmp" in path.name:
            continue
        names.append(path.name)
        dest = target / path.name
        if source.resolve() == target.resolve() or (dest.exists() and dest.stat().st_size == path.stat().st_size):
            continue
        target.mkdir(parents=True, exist_ok=True)
        tmp = target / f".{path.name}.tmp{os.getpid()}"
        shutil.copyfile(path, tmp)
        os.replace(tmp, dest)
    return names


WRITE_LOCK = ".smsdl-write.lock"
READ_LOCK = ".smsdl-read.lock"


@contextlib.contextmanager
def project_lock(directory: str | os.PathLike, *, timeout: float | None = None, option: str = "project folder"):
    """Hold the writer's lock of the project folder ``directory`` (created if needed).

    A second writer (another process, or another thread) waits up to ``timeout`` seconds (default
    ``$SMSDL_LOCK_TIMEOUT`` or 30 s) and then gets an :class:`InputError` naming the project and the
    process holding it. Re-entrant: :func:`save_project` inside it does not wait for itself. Also
    proves the folder writable before any work (a clear error instead of a failure at the end).
    """
    from .._outputs import check_writable_dir

    directory = check_writable_dir(Path(directory).expanduser(), option=option)
    wait = lock_timeout(timeout)
    try:
        with file_lock(directory / WRITE_LOCK, timeout=wait):
            yield directory
    except LockTimeout as exc:
        holder = lock_holder(directory / WRITE_LOCK)
        who = f"process {holder}" if holder and holder != str(os.getpid()) else "another process"
        raise InputError(f"{option}: being written by {who} (waited {wait:g} s); wait for it to finish, "
                         f"or choose another project folder", directory) from exc


def save_project(directory: str | os.PathLike, project: Project) -> Project:
    """Save ``project`` into the folder ``directory`` (created if needed), atomically.

    A previous save in the same folder is replaced as a whole only once the new one is complete
    (see the module notes); files in the folder that are not part of a project are left alone.

    Returns
    -------
    Project
        The same project with ``path``, ``saved_at``, and ``weights_path``/``cache_dir`` pointing
        into the folder.
    """
    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    with project_lock(directory):
        return _save_locked(directory, project)


def _save_locked(directory: Path, project: Project) -> Project:
    previous = _read_manifest(directory)
    number = 1
    if previous is not None:
        match = SNAPSHOT_RE.match(str(previous.get("snapshot", "")))
        number = int(match.group(1)) + 1 if match else 1
    existing = [int(m.group(1)) for p in directory.iterdir() if (m := SNAPSHOT_RE.match(p.name))]
    number = max([number, *(n + 1 for n in existing)])
    snapshot = f"save-{number:04d}"
    # unique per process and save: a clean-up never takes another writer's folder for its own
    stage = directory / f"{STAGING_PREFIX}{snapshot}-{os.getpid()}-{os.urandom(3).hex()}"
    stage.mkdir()
    try:
        _write_snapshot(stage, project)
        _fsync_tree(stage)
        test_save_delay(f"project {directory}")
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    cache_names = _copy_cache(project.cache_dir, directory / CACHE_DIR)
    files = {}
    for path in sorted(stage.rglob("*")):
        if path.is_file():
            rel = path.relative_to(stage).as_posix()
            files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    saved_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "saved_at": saved_at,
        "snapshot": snapshot,
        "files": files,
        "cache": {"folder": CACHE_DIR, "files": cache_names},
        "inputs": [rec.to_dict() for rec in project.inputs],
        "summary": {
            "factor": project.factor,
            "methods": list(project.sr),
            "channels": list(project.channel_names),
            "lr_shape": list(project.lr_msi.shape),
            "sr_pixel_size_um": project.sr_pixel_size_um,
            "has_ground_truth": project.truth is not None,
            "registered": project.transform is not None,
        },
    }
    tmp = directory / f".{PROJECT_FILE}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(jsonable(manifest), indent=2))
        fh.flush()
        os.fsync(fh.fileno())
    try:
        # readers hold this lock shared while they load: none sees the old snapshot go mid-read
        with file_lock(directory / READ_LOCK, timeout=max(lock_timeout(), 300.0)):
            os.rename(stage, directory / snapshot)
            fsync_dir(directory)
            os.replace(tmp, directory / PROJECT_FILE)
            fsync_dir(directory)
            _remove_leftovers(directory, keep=snapshot)
    except BaseException:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
        if tmp.exists():
            tmp.unlink()
        raise
    log.info("project saved to %s (%s, %d files)", directory, snapshot, len(files))
    lazy = {}
    if project.lazy:  # read on from the saved copy: the stores it came from may be an older snapshot, now removed
        n = len(project.channel_names)
        lazy["sr"] = {m: open_lazy_tiff(directory / snapshot / sr_file(m), n) for m in project.sr}
        lazy["uncertainty"] = {m: open_lazy_tiff(directory / snapshot / uncertainty_file(m), n)
                               for m in project.uncertainty}
        if project.truth is not None and TRUTH in files:
            lazy["truth"] = open_lazy_tiff(directory / snapshot / TRUTH, n)
    return dataclasses.replace(
        project,
        **lazy,
        path=directory,
        saved_at=saved_at,
        weights_path=directory / snapshot / WEIGHTS if WEIGHTS in files else None,
        cache_dir=directory / CACHE_DIR,
    )


def _remove_leftovers(directory: Path, *, keep: str) -> None:
    """Remove older snapshots and staging folders of interrupted saves (never anything else).

    Called with the writer's lock held: every writer stages under that lock, so any other staging
    folder is what a killed save left behind, not a save in progress.
    """
    for path in directory.iterdir():
        if not path.is_dir() or path.name == keep:
            continue
        if path.name.startswith(STAGING_PREFIX):
            shutil.rmtree(path, ignore_errors=True)
        elif SNAPSHOT_RE.match(path.name) and (path / PARAMETERS).exists():
            shutil.rmtree(path, ignore_errors=True)
        elif SNAPSHOT_RE.match(path.name) and not any(path.iterdir()):
            path.rmdir()

# ---------------------------------------------------------------------------- loading
def is_project(directory: str | os.PathLike) -> bool:
    """True when ``directory`` holds a project manifest."""
    return (Path(directory) / PROJECT_FILE).is_file()


def load_project(directory: str | os.PathLike, *, verify: bool = True) -> Project:
    """Reopen a project saved by :func:`save_project` (see :func:`_load_project`); while it reads, a
    writer in another process cannot swap the snapshot (the shared read lock)."""
    folder = Path(directory).expanduser()
    folder = folder.parent if folder.name == PROJECT_FILE else folder
    if not folder.is_dir():
        raise InputError("project folder not found", folder)
    try:
        with file_lock(folder / READ_LOCK, shared=True, timeout=max(lock_timeout(), 300.0), required=False):
            return _load_project(folder, verify=verify)
    except LockTimeout as exc:
        raise InputError(f"a save into this project did not finish its swap ({exc}); try again", folder) from exc


def _load_project(directory: str | os.PathLike, *, verify: bool = True) -> Project:
    """Reopen a project saved by :func:`save_project`.

    Parameters
    ----------
    directory : path-like
        The project folder (or its ``project.json``).
    verify : bool
        Check every file of the snapshot against the SHA-256 in the manifest (default).

    Raises
    ------
    InputError
        Naming the file: no manifest (not a project, or a save that never completed), a file of
        the snapshot missing or changed since it was saved, an unreadable file.
    """
    import tifffile

    directory = Path(directory).expanduser()
    if directory.name == PROJECT_FILE:
        directory = directory.parent
    if not directory.is_dir():
        raise InputError("project folder not found", directory)
    manifest = _read_manifest(directory)
    if manifest is None:
        staged = any(p.name.startswith(STAGING_PREFIX) for p in directory.iterdir())
        hint = " (an interrupted save left a staging folder; nothing was completed)" if staged else ""
        raise InputError(f"not a napari-smsdl project: no {PROJECT_FILE}{hint}", directory)
    if int(manifest.get("version", 0)) > FORMAT_VERSION:
        raise InputError(f"project format version {manifest.get('version')} is newer than this napari-smsdl reads "
                         f"({FORMAT_VERSION})", directory / PROJECT_FILE)
    snap = directory / str(manifest["snapshot"])
    files: dict = manifest.get("files", {})
    for rel, info in files.items():
        path = snap / rel
        if not path.is_file():
            raise InputError(f"project file missing (listed in {PROJECT_FILE})", path)
        if path.stat().st_size != info.get("bytes"):
            raise InputError("project file changed since it was saved (size differs)", path)
        if verify and sha256_file(path) != info.get("sha256"):
            raise InputError("project file changed since it was saved (SHA-256 differs)", path)

    def read_json(rel: str, default=None):
        if rel not in files:
            return default
        try:
            return json.loads((snap / rel).read_text(encoding="utf-8"))
        except ValueError as exc:
            raise InputError(f"unreadable JSON ({exc})", snap / rel) from exc

    def read_tiff(rel: str) -> np.ndarray | None:
        if rel not in files:
            return None
        try:
            return tifffile.imread(snap / rel)
        except Exception as exc:
            raise InputError(f"unreadable TIFF ({exc})", snap / rel) from exc

    params = read_json(PARAMETERS)
    if params is None:
        raise InputError(f"project snapshot has no {PARAMETERS}", snap)
    names = tuple(params["channel_names"])
    lr = read_tiff(MSI_LR)
    if lr is None:
        raise InputError(f"project snapshot has no {MSI_LR}", snap)
    lr = np.asarray(lr, np.float32).reshape(len(names), *np.shape(lr)[-2:])
    sr = {}
    lazy = bool(params.get("lazy", False))  # many channels: the stacks stay on disk, read page by page
    for method in params["methods"]:
        if sr_file(method) not in files:
            raise InputError(f"project snapshot has no {sr_file(method)}", snap)
        if lazy:
            sr[method] = open_lazy_tiff(snap / sr_file(method), len(names))
            continue
        stack = read_tiff(sr_file(method))
        sr[method] = np.asarray(stack, np.float32).reshape(len(names), *np.shape(stack)[-2:])
    uncertainty = {}
    for method in params.get("uncertainty", []):  # absent in projects saved before it existed
        rel = uncertainty_file(method)
        if rel not in files:
            raise InputError(f"project snapshot has no {rel}", snap)
        if lazy:
            uncertainty[method] = open_lazy_tiff(snap / rel, len(names))
        else:
            stack = read_tiff(rel)
            uncertainty[method] = np.asarray(stack, np.float32).reshape(len(names), *np.shape(stack)[-2:])
    recorded = read_json(GUIDANCE, {}) or {}
    if lazy and TRUTH in files:
        truth = open_lazy_tiff(snap / TRUTH, len(names))
    else:
        truth = read_tiff(TRUTH)
        if truth is not None:
            truth = np.asarray(truth, np.float32).reshape(len(names), *np.shape(truth)[-2:])
    mask_hr = mask_lr = None
    if MASKS in files:
        with np.load(snap / MASKS, allow_pickle=False) as npz:
            mask_hr = npz.get("mask_hr")
            mask_lr = npz.get("mask_lr")
    transform = None
    if TRANSFORM in files:
        from ..registration import load_transform

        transform = load_transform(snap / TRANSFORM)
    landmarks = None
    if LANDMARKS in files:
        from ..registration import read_landmarks_csv

        landmarks = read_landmarks_csv(snap / LANDMARKS)
    cache = directory / manifest.get("cache", {}).get("folder", CACHE_DIR)
    return Project(
        lr_msi=lr,
        channel_names=names,
        msi_pixel_size_um=float(params["msi_pixel_size_um"]),
        he_pixel_size_um=float(params["he_pixel_size_um"]),
        settings=settings_from_dict(params["settings"]),
        sr=sr,
        mz=None if params.get("mz") is None else tuple(float(m) for m in params["mz"]),
        seconds={k: float(v) if v is not None else math.nan for k, v in params.get("seconds", {}).items()},
        loss_history=read_json(LOSS_HISTORY, {}),
        guide_rgb=read_tiff(GUIDE),
        truth=truth,
        mask_hr=mask_hr,
        mask_lr=mask_lr,
        metrics=_nan_metrics(read_json(METRICS_JSON)),
        transform=transform,
        landmarks=landmarks,
        registration_report=read_json(REGISTRATION_REPORT),
        inputs=tuple(InputRecord.from_dict(d) for d in manifest.get("inputs", [])),
        weights_path=snap / WEIGHTS if WEIGHTS in files else None,
        cache_dir=cache,
        path=directory,
        saved_at=manifest.get("saved_at"),
        uncertainty=uncertainty,
        guidance=dict(recorded.get("guidance") or {}),
        choices=dict(recorded.get("choices") or {}),
        msi_origin_rc_um=_origin(params.get("msi_origin_rc_um"), snap / PARAMETERS),  # absent before it was saved
    )


def _origin(value, path: Path) -> tuple[float, float]:
    """The saved MSI origin (row, col) µm; (0, 0) for projects saved before it was recorded."""
    if value is None:
        return (0.0, 0.0)
    try:
        row, col = (float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise InputError(f"msi_origin_rc_um must be two numbers, got {value!r}", path) from exc
    if not (math.isfinite(row) and math.isfinite(col)):
        raise InputError(f"msi_origin_rc_um must be finite, got {value!r}", path)
    return (row, col)
