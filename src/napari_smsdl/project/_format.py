"""The on-disk format of a project folder: its layout, file names, manifest and version.

Layout on disk::

    DIR/project.json              the manifest, written last: which snapshot is current, every
                                  file of it with its SHA-256 and size, the input records
    DIR/save-0003/                the current snapshot (read only through the manifest)
        parameters.json           settings, methods, pixel sizes, channels, m/z, timings, the MSI origin
        inputs/msi_lr.ome.tif     the measured MSI (C, h, w) float32, NaN = not acquired
        inputs/he_guide.tif       the registered H&E on the SR grid (uint8 RGB, for display)
        registration/transform.tfm, landmarks.csv, report.json
        weights/vit_weights.pt    the self-supervised ViT weights ({level: state_dict})
        results/sr_<method>.ome.tif, ground_truth.ome.tif, masks.npz,
        results/uncertainty_<method>.ome.tif   predictive std of SMSDL (same grid as its SR stack)
        results/guidance.json     per method: histology gain per channel, held-out choices
        results/metrics.json, metrics.csv, loss_history.json

Projects saved before the uncertainty and guidance existed have neither file and still open (with
empty ``uncertainty``/``guidance``/``choices``); regression settings they saved under names that no
longer exist (``restarts``, ``holdout``, ``pixels_per_dim``, ``conserve_mean``) are dropped with a
log line by :func:`settings_from_dict`.

The manifest (``project.json``) names the format (``FORMAT``) and its version (``FORMAT_VERSION``;
a newer version than this code reads is refused); :class:`InputRecord` is how an input file is
recorded in it, :func:`settings_from_dict` reads the parameters back.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .._files import sha256_file
from ..errors import InputError
from ..reconstruction import Settings


log = logging.getLogger(__name__)

PROJECT_FILE = "project.json"
FORMAT = "napari-smsdl project"
FORMAT_VERSION = 1
CACHE_DIR = "cache"
SNAPSHOT_RE = re.compile(r"^save-(\d{4,})$")
STAGING_PREFIX = ".staging-"

# file names inside a snapshot
PARAMETERS = "parameters.json"
MSI_LR = "inputs/msi_lr.ome.tif"
GUIDE = "inputs/he_guide.tif"
TRANSFORM = "registration/transform.tfm"
LANDMARKS = "registration/landmarks.csv"
REGISTRATION_REPORT = "registration/report.json"
WEIGHTS = "weights/vit_weights.pt"
TRUTH = "results/ground_truth.ome.tif"
MASKS = "results/masks.npz"
METRICS_JSON = "results/metrics.json"
METRICS_CSV = "results/metrics.csv"
LOSS_HISTORY = "results/loss_history.json"
GUIDANCE = "results/guidance.json"


def sr_file(method: str) -> str:
    """Snapshot-relative path of a method's SR stack."""
    return f"results/sr_{method}.ome.tif"


def uncertainty_file(method: str) -> str:
    """Snapshot-relative path of a method's uncertainty (predictive std) stack."""
    return f"results/uncertainty_{method}.ome.tif"

# ---------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class InputRecord:
    """Where an input came from: ``role`` (``"he"``, ``"msi"``, ``"msi_ibd"``, ``"ground_truth"``...),
    its absolute ``path`` and the SHA-256 and size of the file when it was recorded."""

    role: str
    path: str | None
    sha256: str | None = None
    size_bytes: int | None = None

    @classmethod
    def from_path(cls, role: str, path: str | os.PathLike | None) -> InputRecord:
        """Record a file (hash and size); a missing path or file gives a record without hash."""
        if path is None:
            return cls(role, None)
        p = Path(path).expanduser().resolve()
        if not p.is_file():
            return cls(role, str(p))
        return cls(role, str(p), sha256_file(p), p.stat().st_size)

    def check(self) -> str:
        """``"unchanged"``, ``"changed"``, ``"missing"`` or ``"unknown"`` (nothing was recorded)."""
        if self.path is None or self.sha256 is None:
            return "unknown"
        p = Path(self.path)
        if not p.is_file():
            return "missing"
        if self.size_bytes is not None and p.stat().st_size != self.size_bytes:
            return "changed"
        return "unchanged" if sha256_file(p) == self.sha256 else "changed"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> InputRecord:
        return cls(str(d["role"]), d.get("path"), d.get("sha256"), d.get("size_bytes"))


def input_records(
    *,
    he_path: str | os.PathLike | None = None,
    msi_path: str | os.PathLike | None = None,
    ground_truth_path: str | os.PathLike | None = None,
) -> tuple[InputRecord, ...]:
    """Records of the input files given (an imzML also records the ``.ibd`` beside it)."""
    records = []
    if he_path is not None:
        records.append(InputRecord.from_path("he", he_path))
    if msi_path is not None:
        records.append(InputRecord.from_path("msi", msi_path))
        p = Path(msi_path)
        if p.suffix.lower() == ".imzml":
            ibd = next((p.with_suffix(s) for s in (".ibd", ".IBD", ".Ibd") if p.with_suffix(s).is_file()), None)
            records.append(InputRecord.from_path("msi_ibd", ibd if ibd is not None else p.with_suffix(".ibd")))
    if ground_truth_path is not None:
        records.append(InputRecord.from_path("ground_truth", ground_truth_path))
    return tuple(records)


# ---------------------------------------------------------------------------- settings (de)serialisation
def settings_from_dict(d: dict) -> Settings:
    """Rebuild :class:`~napari_smsdl.reconstruction.Settings` from :meth:`Settings.to_dict`.

    Keys this version does not know (settings of an older version, e.g. the regression's
    ``restarts``, ``holdout``, ``pixels_per_dim``, ``conserve_mean``) are dropped, with a log line.
    """
    from ..features import FeatureParams
    from ..reconstruction import RegressionParams

    def pick(cls, values: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        values = values or {}
        dropped = sorted(k for k in values if k not in names)
        if dropped:
            log.info("saved %s settings no longer used, dropped: %s", cls.__name__, ", ".join(dropped))
        return {k: v for k, v in values.items() if k in names}

    top = pick(Settings, d)
    top["features"] = FeatureParams(**pick(FeatureParams, d.get("features", {})))
    top["regression"] = RegressionParams(**pick(RegressionParams, d.get("regression", {})))
    return Settings(**top)

def _read_manifest(directory: Path) -> dict | None:
    path = directory / PROJECT_FILE
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the project manifest ({exc})", path) from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputError(f"not a napari-smsdl project manifest (format {manifest.get('format')!r})", path)
    return manifest

def _nan_metrics(obj):
    """JSON null (a NaN metric when saved) back to NaN."""
    if obj is None:
        return None
    if isinstance(obj, dict):
        return {k: _nan_metrics(v) if v is not None else math.nan for k, v in obj.items()}
    if isinstance(obj, list):
        return [math.nan if v is None else _nan_metrics(v) for v in obj]
    return obj
