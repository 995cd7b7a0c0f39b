"""Token filters chosen on a page (phase, one label's value, a step range, a rank) as SQL predicates.

A predicate is built only from fixed column names and placeholders; the values travel as
bound parameters. A label column is accepted only when the run lists it in its manifest.
The Run API's `where=` takes predicate text without parameters, so for it the values are
bound to DuckDB session variables (`SET VARIABLE name = ?`) that the predicate reads with
`getvariable('name')`; the registry's per-run lock keeps one filter in force per query.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import routescope as rs

PHASES = ("prefill", "decode")


def step_axis(run: rs.Run) -> str:
    """The column a page's steps mean: `train_step` (optimizer step) in a training run recorded
    by rs.watch (its manifest has `training`), else the forward counter `step`."""
    return "train_step" if "training" in run.manifest else "step"


_VAR_PREFIX = "routescope_dashboard_"


class FilterError(ValueError):
    """A filter value the run cannot have (unknown label column, bad phase, bad step)."""


@dataclass(frozen=True)
class TokenFilter:
    """Which tokens a figure counts; None everywhere means all tokens. Hashable for caching."""

    phase: str | None = None
    label: str | None = None
    value: str | None = None
    step_min: int | None = None
    step_max: int | None = None
    rank: int | None = None

    @classmethod
    def from_inputs(
        cls,
        phase: Any = None,
        label: Any = None,
        value: Any = None,
        steps: Any = None,
        rank: Any = None,
    ) -> TokenFilter:
        """From dropdown / range-slider values as the browser sends them ('all', '', None ...)."""
        phase = None if phase in (None, "", "all") else str(phase)
        label = None if label in (None, "") else str(label)
        value = None if value in (None, "") or label is None else str(value)
        step_min = step_max = None
        if isinstance(steps, (list, tuple)) and len(steps) == 2:
            try:
                step_min, step_max = int(steps[0]), int(steps[1])
            except (TypeError, ValueError) as exc:
                raise FilterError(f"step range {steps!r} is not two integers") from exc
        if rank in (None, "", "all"):
            rank = None
        else:
            try:
                rank = int(rank)
            except (TypeError, ValueError) as exc:
                raise FilterError(f"rank {rank!r} is not an integer") from exc
        return cls(phase, label, value, step_min, step_max, rank)

    @property
    def is_empty(self) -> bool:
        return self == TokenFilter()

    def check(self, run: rs.Run) -> None:
        if self.phase is not None and self.phase not in PHASES:
            raise FilterError(f"phase {self.phase!r} is not allowed; use one of {', '.join(PHASES)}")
        if self.label is not None and self.label not in run.labels:
            allowed = ", ".join(run.labels) or "none in this run"
            raise FilterError(f"label {self.label!r} is not a label of this run (labels: {allowed})")

    def terms(self, run: rs.Run) -> list[tuple[str, Any]]:
        """(predicate over one fixed or checked column with one placeholder '{}', value)."""
        self.check(run)
        out: list[tuple[str, Any]] = []
        if self.phase is not None:
            out.append(("phase = {}", self.phase))
        if self.label is not None and self.value is not None:
            out.append((quote_identifier(self.label) + " = {}", self.value))
        axis = step_axis(run)  # a fixed column name, never user text
        if self.step_min is not None:
            out.append((axis + " >= {}", int(self.step_min)))
        if self.step_max is not None:
            out.append((axis + " <= {}", int(self.step_max)))
        if self.rank is not None:
            out.append(("rank = {}", int(self.rank)))
        return out

    def sql(self, run: rs.Run, alias: str = "") -> tuple[str, list[Any]]:
        """('predicate with ? placeholders', params) for the dashboard's own queries; 'true' if empty."""
        prefix = f"{alias}." if alias else ""
        terms = self.terms(run)
        if not terms:
            return "true", []
        return " AND ".join(prefix + t.format("?") for t, _ in terms), [v for _, v in terms]

    def call_with_where(self, run: rs.Run, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call a Run metric method with this filter as `where=`, values bound, not pasted.

        The caller must hold the run's lock (RunRegistry does), as session variables are
        per connection.
        """
        terms = self.terms(run)
        if not terms:
            return method(*args, **kwargs)
        parts = []
        for i, (term, value) in enumerate(terms):
            var = f"{_VAR_PREFIX}{i}"
            run.sql(f"SET VARIABLE {var} = ?", [value])
            parts.append(term.format(f"getvariable('{var}')"))
        try:
            return method(*args, where=" AND ".join(parts), **kwargs)
        finally:
            for i in range(len(terms)):
                run.sql(f"RESET VARIABLE {_VAR_PREFIX}{i}")

    def describe(self) -> str:
        bits = []
        if self.phase:
            bits.append(f"phase {self.phase}")
        if self.label and self.value is not None:
            bits.append(f"{self.label} = {self.value}")
        if self.step_min is not None or self.step_max is not None:
            bits.append(f"steps {self.step_min}–{self.step_max}")
        if self.rank is not None:
            bits.append(f"rank {self.rank}")
        return ", ".join(bits) or "all tokens"


def quote_identifier(name: str) -> str:
    """A double-quoted SQL identifier (label names are identifiers already; quoting is belt and braces)."""
    return '"' + name.replace('"', '""') + '"'
