"""Exception types. Every message names the file (when there is one) and the problem."""

from __future__ import annotations

from pathlib import Path


class SmsdlError(Exception):
    """Base class of every error napari-smsdl raises on purpose (bad input, failed step)."""

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = None if path is None else Path(path)
        self.problem = message
        super().__init__(f"{self.path}: {message}" if self.path is not None else message)


class InputError(SmsdlError, ValueError):
    """An input file or parameter that cannot be used as given."""


class ImzMLError(InputError):
    """An imzML/ibd pair that cannot be read: missing or truncated .ibd, UUID mismatch, bad XML..."""


class RegistrationError(SmsdlError):
    """Registration could not run (bad landmarks, images without overlap...)."""


class Cancelled(SmsdlError):
    """A long job stopped because the user asked it to (``should_stop()`` returned True)."""
