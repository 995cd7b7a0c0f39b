"""Errors the importers raise: each message is one line, free of control characters."""

from __future__ import annotations

import re

from routescope.errors import RouteScopeError
from routescope.store.rundir import RunExistsError as RunExistsError  # one class for every writer

_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|[\x00-\x08\x0b-\x1f\x7f]")


def one_clean_line(text: str) -> str:
    """ANSI escapes and control characters removed, whitespace collapsed to single spaces."""
    return " ".join(_CONTROL.sub("", text).split())


class ImportFormatError(RouteScopeError, ValueError):
    """A dump does not have the layout an importer expects; the message names the file and the layout."""

    def __init__(self, message: str) -> None:
        super().__init__(one_clean_line(message))
