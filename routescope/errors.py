"""Error classes of routescope: every error the library raises on purpose derives from RouteScopeError."""

from __future__ import annotations

from typing import Any


class RouteScopeError(Exception):
    """Base class of routescope's own errors."""


class UnsupportedModelError(RouteScopeError, ValueError):
    """The model has no router that routescope can find."""


class RunFormatError(RouteScopeError):
    """A directory is not a routescope run, or one of its files is corrupt or truncated."""


class WriterError(RouteScopeError):
    """The background Parquet writer failed (disk full, read-only directory, ...)."""


class RunBusyError(RouteScopeError):
    """Another writer holds the run's lock (store/lock.py); `holder` says who, if it said."""

    def __init__(self, message: str, holder: Any = None, lock_path: Any = None) -> None:
        super().__init__(message)
        self.holder = holder
        self.lock_path = lock_path


class EmptySelectionWarning(RuntimeWarning):
    """A metric's or plan's `where=` selects no token of the run: its numbers are NaN or zero."""
