"""Shared job plumbing of the dock widgets: busy flag, background workers, error display.

Slow steps run on a napari ``thread_worker`` so the viewer stays responsive; set
``SMSDL_NOTHREADS=1`` to run them synchronously (debugging). :class:`JobRunner` is a mixin for a
``QWidget`` that has the attributes ``busy``, ``last_error``, ``status`` (a magicgui ``Label``),
``_worker`` and a ``_sync_enabled()`` method.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from ..errors import Cancelled, InputError, SmsdlError


def use_threads() -> bool:
    """False when ``SMSDL_NOTHREADS`` is set (1/true/yes): jobs then run synchronously."""
    return os.environ.get("SMSDL_NOTHREADS", "").lower() not in ("1", "true", "yes")


class ErrorDisplay:
    """Mixin: show an error in the widget's status line, the log and a napari notification.

    Needs ``last_error`` and ``status`` (a magicgui ``Label``). Class attributes set by the widget:
    ``_widget_name`` (in log lines), ``_quiet_errors`` (exception types logged without a
    traceback), ``_cancelled_status`` and ``_cancelled_notice`` (how a
    :class:`~napari_smsdl.errors.Cancelled` job is shown; None: like any other error).
    Log lines go to the logger of the widget's module.
    """

    _widget_name = "Smsdl"
    _quiet_errors: tuple[type[BaseException], ...] = (SmsdlError,)
    _cancelled_status: str | None = None
    _cancelled_notice: str | None = None

    def _on_error(self, exc: BaseException) -> None:
        from napari.utils.notifications import show_error, show_info

        if isinstance(exc, Cancelled) and self._cancelled_notice is not None:
            self.last_error = "cancelled"
            self.status.value = self._cancelled_status
            self._on_cancelled()
            show_info(self._cancelled_notice)
            return
        message = str(exc)
        self.last_error = message
        self.status.value = f"Error: {message}"
        logging.getLogger(type(self).__module__).error(
            "%s widget: %s", self._widget_name, message,
            exc_info=None if isinstance(exc, self._quiet_errors) else exc,
        )
        show_error(self._error_notice(message))

    def _on_cancelled(self) -> None:
        """Hook: extra clean-up when a job was cancelled (before the notice is shown)."""

    def _error_notice(self, message: str) -> str:
        """Hook: the text of the error notification."""
        return message


class JobRunner(ErrorDisplay):
    """Mixin: run jobs on a worker (or synchronously), keep :attr:`busy`, show errors.

    Needs ``busy``, ``last_error``, ``status``, ``_worker`` and ``_sync_enabled()``.
    """

    def _run(self, func: Callable, *args, on_returned: Callable, message: str, **kwargs):
        """Run ``func(*args, **kwargs)`` as the widget's one job (refused while busy).

        Returns the started worker, or None when run synchronously or refused.
        """
        if self.busy:
            self._on_error(InputError("still busy with the previous job; try again when it is done"))
            return None
        self._set_busy(True, message + " …")
        return self._start_job(func, *args, on_returned=on_returned, on_finished=lambda: self._set_busy(False),
                               progress_desc=message, **kwargs)

    def _start_job(self, func: Callable, *args, on_returned: Callable, on_finished: Callable,
                   progress_desc: str | None = None, **kwargs):
        """Call ``func`` now (``SMSDL_NOTHREADS``) or start it on a worker (returned)."""
        if not use_threads():
            self._run_now(func, *args, on_returned=on_returned, on_finished=on_finished, **kwargs)
            return None
        if progress_desc is not None:
            kwargs["_progress"] = {"total": 0, "desc": progress_desc}
        return self._start_worker(func, *args, on_returned=on_returned, on_finished=on_finished, **kwargs)

    #: True once the running job's result (or error) has been shown: later progress is stale.
    _job_over = False

    def _begin_job(self) -> None:
        self._job_over = False

    def _end_job(self) -> None:
        self._job_over = True

    def accepts_progress(self) -> bool:
        """False once the job's result or error is shown.

        Progress is relayed from the worker by queued signals, and the result arrives by another;
        a handler that processes events (a napari progress bar's refresh) can deliver the result in
        the middle of an earlier progress update, and a progress update can be queued behind the
        result. Progress handlers ask this first, so the result summary stays the last word.
        """
        return not self._job_over

    def _show_progress(self, text: str) -> bool:
        """Write a progress line in the status unless the job is over; returns whether it was written."""
        if self._job_over:
            return False
        self.status.value = text
        return True

    def _run_now(self, func: Callable, *args, on_returned: Callable, on_finished: Callable, **kwargs) -> None:
        """Call ``func`` synchronously; errors are shown like the worker's."""
        self._begin_job()
        try:
            result = func(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - shown to the user, like the worker path
            self._end_job()
            self._on_error(exc)
        else:
            self._end_job()
            on_returned(result)
        finally:
            on_finished()

    def _start_worker(self, func: Callable, *args, on_returned: Callable, on_finished: Callable,
                      on_yielded: Callable | None = None, **kwargs):
        """Start ``func`` on a napari worker wired to the widget; returns the worker."""
        from napari.qt.threading import create_worker

        # errors are shown by _on_error; napari would otherwise re-raise them in the main thread
        worker = create_worker(func, *args, _start_thread=False, _ignore_errors=True, **kwargs)
        self._begin_job()

        def returned(result) -> None:
            self._end_job()  # before the summary is written: progress handlers stop writing
            on_returned(result)

        def errored(exc: BaseException) -> None:
            self._end_job()
            self._on_error(exc)

        if on_yielded is not None:
            worker.yielded.connect(lambda item: self.accepts_progress() and on_yielded(item))
        worker.returned.connect(returned)
        worker.errored.connect(errored)
        worker.finished.connect(on_finished)
        self._worker = worker
        worker.start()
        return worker

    def _set_busy(self, busy: bool, message: str | None = None) -> None:
        self.busy = busy
        if message:
            self.status.value = message
        self._sync_enabled()
