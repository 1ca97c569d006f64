"""Progress of the long commands: a bar per stage on a terminal, plain log lines otherwise.

The core reports progress as ``progress(stage, done, total)`` calls (the protocol the widgets
feed into napari's progress bars, see ``widgets/_jobs.py``). :class:`CliProgress` is such a
callback for the command line: when stderr is a terminal it draws one tqdm bar per stage (nested
stages stacked, each closed when it reaches its total) and routes log records through tqdm so that
they do not tear the bars; when stderr is a pipe or a file (CI, ``2> log``) it writes a log line at a stage's first
step, at every quarter and at its end with the stage's seconds, so a long run is not silent and a
log stays short. Under torchrun only rank 0 reports.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time

log = logging.getLogger("napari_smsdl.progress")


class _Stage:
    """One stage being reported: its bar (terminal) or its last logged quarter (log), and its start."""

    def __init__(self, bar=None):
        self.bar = bar
        self.started = time.perf_counter()
        self.quarter = 0


class CliProgress:
    """``progress(stage, done, total)`` for the CLI (use as a context manager).

    Stages may nest (feature extraction runs a training per level): each open stage keeps its own bar
    (stacked on a terminal) and its own clock, and is closed when it reaches its total (or at the end
    of the ``with`` block).

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
        self._open: dict[str, _Stage] = {}
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
        for name in list(self._open):  # stages whose last step the core did not report
            state = self._open[name]
            if exc[0] is None:  # the work returned: they are done (an error leaves them where they stopped)
                if state.bar is not None and state.bar.total:
                    state.bar.update(state.bar.total - state.bar.n)
                elif state.bar is None:
                    log.info("%s: done in %.1f s", name, time.perf_counter() - state.started)
            self._close(name)
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
        state = self._open.get(stage)
        if state is None:
            state = self._open[stage] = _Stage(self._new_bar(stage, total) if self._bars else None)
        finished = total > 0 and done >= total
        if self._bars:
            bar = state.bar
            if total > 0 and bar.total != total:
                bar.total = total
            bar.update(max(0, done - bar.n))
        else:
            quarter = int(4 * done / total) if total > 0 else 0
            if done == 1 or quarter > state.quarter or finished:
                state.quarter = quarter
                self._log_line(stage, done, total, state)
        if finished:
            self._close(stage)

    def _new_bar(self, stage: str, total: int):
        from tqdm import tqdm

        # follow the terminal's size; one that reports none (0 columns or 0 lines, as `script` and some
        # CI terminals do) gets 80 x 24, since tqdm hides every bar on a terminal of 0 lines
        width, height = _terminal_size(self._stream)
        return tqdm(total=total if total > 0 else None, desc=stage, file=self._stream, leave=True,
                    dynamic_ncols=width > 0 and height > 0, ncols=None if width > 0 else 80,
                    nrows=None if height > 0 else 24, mininterval=0.2)

    @staticmethod
    def _log_line(stage: str, done: int, total: int, state: _Stage) -> None:
        seconds = time.perf_counter() - state.started
        if total > 0 and done >= total:
            log.info("%s: %d/%d done in %.1f s", stage, done, total, seconds)
        elif total > 0:
            log.info("%s: %d/%d (%d%%)", stage, done, total, round(100 * done / total))
        else:
            log.info("%s: %d", stage, done)

    def _close(self, stage: str) -> None:
        state = self._open.pop(stage, None)
        if state is not None and state.bar is not None:
            state.bar.close()


def _terminal_size(stream) -> tuple[int, int]:
    """(columns, lines) of the terminal behind ``stream``; 0 where it reports none."""
    import os

    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return 0, 0
    return size.columns, size.lines


@contextlib.contextmanager
def cli_progress(stream=None, *, bars: bool | None = None):
    """A :class:`CliProgress` for the length of a ``with`` block (bars closed at its end)."""
    with CliProgress(stream, bars=bars) as progress:
        yield progress
