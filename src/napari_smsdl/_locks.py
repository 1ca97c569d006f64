"""OS file locks between processes (a project has one writer at a time; readers see whole saves)."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- locks between processes
#: Environment variable: seconds a writer waits for another process's lock before refusing.
LOCK_TIMEOUT_ENV = "SMSDL_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT_S = 30.0

_held: dict[str, list] = {}  # key -> [count, fd]; locks this process holds (re-entrant)
_thread_locks: dict[str, threading.RLock] = {}
_registry = threading.Lock()


class LockTimeout(OSError):
    """Another process holds the lock."""


def _os_lock(fd: int, shared: bool) -> bool:
    """Try once to lock ``fd``; True when taken."""
    try:
        import fcntl
    except ImportError:  # Windows: one exclusive byte-range lock (no shared mode)
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _os_unlock(fd: int) -> None:
    try:
        import fcntl
    except ImportError:
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        return
    fcntl.flock(fd, fcntl.LOCK_UN)


def lock_timeout(timeout: float | None = None) -> float:
    if timeout is not None:
        return float(timeout)
    try:
        return float(os.environ.get(LOCK_TIMEOUT_ENV, DEFAULT_LOCK_TIMEOUT_S))
    except ValueError:
        return DEFAULT_LOCK_TIMEOUT_S


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, *, shared: bool = False, timeout: float | None = None,
              required: bool = True) -> Iterator[bool]:
    """Hold an OS lock on the file ``path`` (``fcntl.flock``; Windows: ``msvcrt.locking``, exclusive).

    Waits up to ``timeout`` seconds (default ``$SMSDL_LOCK_TIMEOUT`` or 30 s), then raises
    :class:`LockTimeout`. Re-entrant within a process (a nested lock on the same file is free) and
    exclusive between its threads. The OS drops the lock when the process dies, so a killed run
    never leaves a project locked. With ``required=False``, a lock file that cannot be created or
    opened (a read-only folder, which no writer can use either) locks nothing and yields False.
    """
    import time

    path = Path(path)
    key = os.path.realpath(path)
    with _registry:
        tlock = _thread_locks.setdefault(key, threading.RLock())
    wait = lock_timeout(timeout)
    deadline = time.monotonic() + wait
    if not tlock.acquire(timeout=max(wait, 0.0)):
        raise LockTimeout(f"waited {wait:g} s for another thread of this process")
    try:
        entry = _held.get(key)
        if entry is not None:
            entry[0] += 1
            try:
                yield True
            finally:
                entry[0] -= 1
            return
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            try:
                fd = os.open(path, os.O_RDONLY)  # flock works on a read-only descriptor
            except OSError:
                if required:
                    raise
                fd = None
        if fd is None:
            yield False
            return
        try:
            while not _os_lock(fd, shared):
                if time.monotonic() >= deadline:
                    raise LockTimeout(f"waited {wait:g} s")
                time.sleep(0.05)
            if not shared:
                try:  # who holds it, for the other process's message
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{os.getpid()}\n".encode())
                except OSError:
                    pass
            _held[key] = [1, fd]
            try:
                yield True
            finally:
                del _held[key]
                _os_unlock(fd)
        finally:
            os.close(fd)
    finally:
        tlock.release()


def lock_holder(path: str | os.PathLike) -> str | None:
    """The pid written into a lock file by its holder (for messages), or None."""
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return text or None
