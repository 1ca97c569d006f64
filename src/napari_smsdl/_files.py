"""Small file helpers shared by the core: content hashes, JSON-safe values, atomic JSON writes.

Output folders written as a unit live in :mod:`._outputs`, locks between processes in :mod:`._locks`."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def jsonable(obj, *, other=None):
    """Plain JSON types: numpy scalars/arrays unwrapped, paths as strings, NaN/inf as null.

    ``other``, when given, converts any value of another type (e.g. ``str``, for metadata that
    must always serialise); by default such values are returned as they are.
    """
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v, other=other) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v, other=other) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist(), other=other)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    if other is None or obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return other(obj)


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    """Write JSON through a temporary file and ``os.replace``: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(jsonable(obj), indent=2))
    os.replace(tmp, path)
    return path


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
