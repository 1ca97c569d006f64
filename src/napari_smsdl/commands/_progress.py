"""Progress of the long commands: a bar per stage on a terminal, plain log lines otherwise.

The core reports progress as ``progress(stage, done, total)`` calls (the protocol the widgets
feed into napari's progress bars, see ``widgets/_jobs.py``). :class:`CliProgress` is such a
callback for the command line: when stderr is a terminal it draws one tqdm bar per stage (a new
stage closes the bar before it) and routes log records through tqdm so that they do not tear the
bars; when stderr is a pipe or a file (CI, ``2> log``) it writes a log line at a stage's first
step, at every quarter and at its end with the stage's seconds, so a long run is not silent and a
log stays short. Under torchrun only rank 0 reports.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time

log = logging.getLogger("napari_smsdl.progress")


class CliProgress:
    """``progress(stage, done, total)`` for the CLI (use as a context manager).

    Parameters
    ----------
    stream : file-like, optional
        Where bars go (default ``sys.stderr``, looked up when entered).
    bars : bool, optional
        Force bars (True) or log lines (False); default: bars when ``stream`` is a terminal.
    """

    def __init__(self, stream=None, *, bars: bool | None = None):
        self._stream = stream
        self._bars = bars
        self._bar = None
        self._stage: str | None = None
        self._started = 0.0
        self._quarter = -1
        self._redirect = None
        self.enabled = True

    # ------------------------------------------------------------------ context
    def __enter__(self) -> CliProgress:
        from .. import distributed as dd

        self.enabled = dd.is_main_process()
        stream = self._stream if self._stream is not None else sys.stderr
        self._stream = stream
        if self._bars is None:
            isatty = getattr(stream, "isatty", None)
            self._bars = bool(isatty and isatty())
        if self._bars and self.enabled:
            from tqdm.contrib.logging import logging_redirect_tqdm

            # log records above the bars, not through them
            self._redirect = logging_redirect_tqdm(loggers=[logging.getLogger()])
            self._redirect.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._finish()
        if self._redirect is not None:
            self._redirect.__exit__(*exc)
            self._redirect = None

    @property
    def bars(self) -> bool:
        return bool(self._bars)

    # ------------------------------------------------------------------ the callback
    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        done, total = int(done), int(total)
        if stage != self._stage:
            self._finish()
            self._start(stage, total)
        if self._bars:
            bar = self._bar
            if total > 0 and bar.total != total:
                bar.total = total
            bar.update(max(0, done - bar.n))
        else:
            quarter = int(4 * done / total) if total > 0 else 0
            if done == 1 or quarter > self._quarter or (total > 0 and done >= total):
                self._quarter = quarter
                self._log_line(stage, done, total)
        if total > 0 and done >= total:
            self._finish()

    def _start(self, stage: str, total: int) -> None:
        self._stage, self._started, self._quarter = stage, time.perf_counter(), 0
        if self._bars:
            from tqdm import tqdm

            # follow the terminal's width; a terminal that reports none (0 columns) gets 80
            width = _columns(self._stream)
            self._bar = tqdm(total=total if total > 0 else None, desc=stage, file=self._stream, leave=True,
                             dynamic_ncols=width > 0, ncols=None if width > 0 else 80, mininterval=0.2)

    def _log_line(self, stage: str, done: int, total: int) -> None:
        seconds = time.perf_counter() - self._started
        if total > 0 and done >= total:
            log.info("%s: %d/%d done in %.1f s", stage, done, total, seconds)
        elif total > 0:
            log.info("%s: %d/%d (%d%%)", stage, done, total, round(100 * done / total))
        else:
            log.info("%s: %d", stage, done)

    def _finish(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._stage = None


def _columns(stream) -> int:
    import os

    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


@contextlib.contextmanager
def cli_progress(stream=None, *, bars: bool | None = None):
    """A :class:`CliProgress` for the length of a ``with`` block (bars closed at its end)."""
    with CliProgress(stream, bars=bars) as progress:
        yield progress
