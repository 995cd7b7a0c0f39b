"""The labels a recording's steps carry: set from any thread, read once per step.

`rs.record(labels=...)` and `Recorder.set_labels` give the labels of the forwards that follow;
a sequence keeps the labels it started with (its decode steps carry them, capture/recording/
identity.py), and a label name set later reads None for earlier steps. A step reads a
snapshot made once per change, and the steps of one decode loop share one merged dict.
"""

from __future__ import annotations

import threading
from typing import Any

from routescope.schema import check_labels


class StepLabels:
    """A recording's labels: their names in order, their values now, and each step's."""

    def __init__(self, labels: dict[str, Any] | None) -> None:
        self._values = check_labels(labels or {})
        self._names: list[str] = list(self._values)
        self._lock = threading.Lock()  # the model thread takes it only when the labels changed
        self._now: dict[str, str | None] | None = None  # the snapshot steps read; None: changed
        self._merged: tuple[Any, Any, dict[str, str | None]] = (None, None, {})

    def set(self, **labels: Any) -> None:
        """Labels for the forwards that follow (earlier forwards keep theirs)."""
        checked = check_labels(labels)
        with self._lock:
            self._values.update(checked)
            self._add(checked)

    def add_names(self, names: list[str]) -> None:
        """Names a run has already (appending to it): later steps carry them, as None if unset."""
        with self._lock:
            self._add(names)

    def _add(self, names: Any) -> None:
        for name in names:
            if name not in self._names:
                self._names.append(name)
        self._now = None

    @property
    def values(self) -> dict[str, str | None]:
        """The labels set so far (a copy)."""
        return dict(self._values)

    @property
    def names(self) -> list[str]:
        """Every label name, in the order first given (a copy)."""
        with self._lock:
            return list(self._names)

    def now(self) -> dict[str, str | None]:
        """Every name's value now (a dict shared until the labels change: never change it)."""
        now = self._now
        if now is None:
            with self._lock:
                now = self._now = {name: self._values.get(name) for name in self._names}
        return now

    def of_step(self, sequences: dict[str, str | None], now: dict[str, str | None]) -> dict[str, str | None]:
        """A step's labels: its sequences' (set when they started), then `now`'s for a name set
        since. The steps of one decode loop share one dict (never change it)."""
        known, then, merged = self._merged
        if sequences is not known or now is not then:
            merged = {name: sequences.get(name, now.get(name)) for name in now}
            self._merged = (sequences, now, merged)
        return merged
