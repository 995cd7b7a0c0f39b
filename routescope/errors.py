"""Error classes of routescope: every error the library raises on purpose derives from RouteScopeError."""

from __future__ import annotations


class RouteScopeError(Exception):
    """Base class of routescope's own errors."""


class UnsupportedModelError(RouteScopeError, ValueError):
    """The model has no router that routescope can find."""


class RunFormatError(RouteScopeError):
    """A directory is not a routescope run, or one of its files is corrupt or truncated."""


class WriterError(RouteScopeError):
    """The background Parquet writer failed (disk full, read-only directory, ...)."""
