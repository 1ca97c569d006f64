"""Output locations: writability checks before the work, and output folders written as a unit."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from ._files import fsync_dir

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- writable locations
def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def check_writable_dir(path: str | os.PathLike, *, option: str) -> Path:
    """Create the folder ``path`` (and its parents) and prove it writable with a probe file.

    Run before the work starts, so a read-only disk or a typo is found in a second, not at the end.
    ``os.access`` is not enough (root, network shares): a real file is created and removed.

    Raises
    ------
    InputError
        Naming ``option``, the folder and the reason.
    """
    from .errors import InputError

    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise InputError(f"{option}: exists and is not a folder; give a folder path", path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".smsdl-write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise InputError(f"{option}: cannot write here ({_reason(exc)})", path) from exc
    return path


def check_writable_file(path: str | os.PathLike, *, option: str) -> Path:
    """Check that the file ``path`` can be created (its folder is writable) and is not a folder."""
    from .errors import InputError

    path = Path(path).expanduser()
    if path.is_dir():
        raise InputError(f"{option}: is a folder; give a file name (e.g. {path / 'ions.tif'})", path)
    check_writable_dir(path.parent if str(path.parent) else Path("."), option=option)
    return path


# ---------------------------------------------------------------------------- output folders as a unit
#: Files whose presence means "this folder holds a finished napari-smsdl run" (written last by each command).
RUN_MARKERS = ("run.json", "metrics.json", "report.json")
#: Environment variable (tests): seconds to sleep inside a save, once the new result is complete and
#: before it replaces the old one, so a test can kill the process at that moment.
SAVE_DELAY_ENV = "SMSDL_TEST_SAVE_DELAY"


def test_save_delay(where: str) -> None:
    """Sleep ``$SMSDL_TEST_SAVE_DELAY`` seconds (fault tests), announcing ``where`` on stderr."""
    delay = os.environ.get(SAVE_DELAY_ENV)
    if delay:
        import sys
        import time

        print(f"smsdl: test save delay at {where}", file=sys.stderr, flush=True)
        time.sleep(float(delay))


test_save_delay.__test__ = False  # not a pytest test despite the name


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _marker(folder: Path) -> str | None:
    return next((m for m in RUN_MARKERS if (folder / m).is_file()), None)


class OutputFolder:
    """An output folder written as a unit: work happens in a hidden staging folder beside it.

    ``path`` is the staging folder (write everything there, the marker file such as ``run.json``
    last); :meth:`commit` renames it into place, replacing a previous run whole, and removes the
    old one. Until then the previous result is untouched: a killed or failed run leaves it whole
    and never new files beside it. Stale staging folders of dead processes are removed by the next
    run into the same place. Use :func:`output_folder`.
    """

    def __init__(self, target: str | os.PathLike, *, overwrite: bool = False, option: str = "-o",
                 carry: tuple[str, ...] = (), staging: str | os.PathLike | None = None):
        from .errors import InputError

        self.target = Path(target).expanduser()
        self.overwrite = overwrite
        self.option = option
        self.committed = False
        name = self.target.name
        if not name or name in (".", ".."):
            self.target = self.target.resolve()
            name = self.target.name
        self._prefix = f".{name}.staging-"
        self._old_prefix = f".{name}.old-"
        parent = self.target.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"{option}: cannot create the folder above it ({_reason(exc)})", self.target) from exc
        if staging is not None:  # another torchrun rank: rank 0 checked the place and created it
            self.path = Path(staging)
            self._owner = False
            return
        self._recover()
        self._check_target()
        self._owner = True
        self.path = parent / f"{self._prefix}{os.getpid()}-{os.urandom(3).hex()}"
        try:
            self.path.mkdir()
            probe = self.path / ".smsdl-write-probe"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            shutil.rmtree(self.path, ignore_errors=True)
            raise InputError(f"{option}: cannot write the output folder ({_reason(exc)})", self.target) from exc
        for sub in carry:
            _link_tree(self.target / sub, self.path / sub)

    def _siblings(self, prefix: str):
        try:
            return [p for p in self.target.parent.iterdir() if p.name.startswith(prefix)]
        except OSError:
            return []

    def _recover(self) -> None:
        """Put back a previous result left aside by a commit that was killed; drop dead staging folders."""
        for p in self._siblings(self._old_prefix) + self._siblings(self._prefix):
            try:
                pid = int(p.name.split("-")[-2])
            except (ValueError, IndexError):
                continue
            if _pid_alive(pid):
                continue
            if p.name.startswith(self._old_prefix) and not self.target.exists() and _marker(p):
                log.warning("%s: restoring the previous result left aside by an interrupted run", self.target)
                os.rename(p, self.target)
            else:
                shutil.rmtree(p, ignore_errors=True)

    def _check_target(self) -> None:
        from .errors import InputError

        target, option = self.target, self.option
        if not target.exists():
            return
        if not target.is_dir():
            raise InputError(f"{option}: exists and is not a folder; remove it or give another folder", target)
        marker = _marker(target)
        if marker is not None and not self.overwrite:
            raise InputError(f"{option}: already holds a run ({marker}); give --overwrite to replace it "
                             "or choose another folder", target)
        if marker is None and any(target.iterdir()):
            raise InputError(f"{option}: holds files but no finished run ({', '.join(RUN_MARKERS)}); "
                             "choose a new or empty folder (--overwrite replaces only a finished run)", target)

    def final(self, path: str | os.PathLike) -> Path:
        """Where ``path`` (inside the staging folder) will be once committed."""
        path = Path(path)
        try:
            return self.target / path.relative_to(self.path)
        except ValueError:
            return path

    def commit(self) -> Path:
        """Rename the staging folder into place (replacing the old run whole); returns the folder."""
        from .errors import InputError

        if not self._owner or self.committed:
            return self.target
        test_save_delay(f"output folder {self.target}")
        if self.target.exists():
            # another process may have finished a run here meanwhile: keep ours and say where
            if _marker(self.target) and not self.overwrite:
                raise InputError(f"{self.option}: another run finished here meanwhile; this run's result is "
                                 f"kept in {self.path}", self.target)
            if not any(self.target.iterdir()):
                # an empty folder the user made (perhaps the working directory) stays that folder: the
                # files move in one by one, the marker (run.json...) last, so it still marks a whole run
                entries = sorted(self.path.iterdir(), key=lambda p: (p.name in RUN_MARKERS, p.name))
                for entry in entries:
                    os.rename(entry, self.target / entry.name)
                self.path.rmdir()
                self.committed = True
                fsync_dir(self.target)
                return self.target
        old = None
        if self.target.exists():
            old = self.target.parent / f"{self._old_prefix}{os.getpid()}-{os.urandom(3).hex()}"
            os.rename(self.target, old)
        os.rename(self.path, self.target)
        self.committed = True
        fsync_dir(self.target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.target

    def discard(self) -> None:
        if self._owner and not self.committed:
            shutil.rmtree(self.path, ignore_errors=True)


@contextlib.contextmanager
def output_folder(target: str | os.PathLike, *, overwrite: bool = False, option: str = "-o",
                  carry: tuple[str, ...] = ()) -> Iterator[OutputFolder]:
    """Write a command's output folder as a unit (see :class:`OutputFolder`).

    The checks (the folder holds a finished run and ``overwrite`` is off, it holds other files, it
    cannot be written) run on entry, before any work. The body writes into ``folder.path``; on a
    normal exit the staging folder is committed, on an exception (Ctrl-C included) it is removed and
    the previous result is left as it was. ``carry`` names sub-folders of a previous run (a feature
    cache) linked into the staging folder so a rerun with ``overwrite`` can reuse them.

    Under torchrun every rank enters it: rank 0 creates the staging folder, the others are told its
    name and never commit.
    """
    from . import distributed as dd

    made: list[OutputFolder] = []

    def make() -> str:  # rank 0 (or the only process) checks and creates the staging folder
        made.append(OutputFolder(target, overwrite=overwrite, option=option, carry=carry))
        return str(made[0].path)

    name = dd.main_rank_decides(make)  # a refusal stops every rank with the same message
    folder = made[0] if made else OutputFolder(target, overwrite=True, option=option, staging=name)
    try:
        yield folder
    except BaseException:
        folder.discard()
        raise
    folder.commit()


def _link_tree(source: Path, target: Path) -> None:
    """Hard-link the files of ``source`` into ``target`` (copy where links fail). Cache files are
    replaced, not rewritten in place, so a link never lets the new run change the old run's copy;
    sub-folders (zarr stores, written in place) are copied."""
    if not source.is_dir():
        return
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        dest = target / item.name
        try:
            if item.is_dir():
                shutil.copytree(item, dest)
            else:
                try:
                    os.link(item, dest)
                except OSError:
                    shutil.copy2(item, dest)
        except OSError as exc:  # a cache is an optimisation: recompute rather than fail
            log.warning("could not reuse %s (%s)", item, _reason(exc))
