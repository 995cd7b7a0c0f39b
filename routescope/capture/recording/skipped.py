"""What a recording could not record, counted by reason (the manifest's `skipped`)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field


@dataclass
class Skipped:
    """What the recorder could not record, by reason; goes into the manifest."""

    counts: dict[str, int] = field(default_factory=dict)

    def add(self, reason: str, n: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + int(n)

    def warn(self, outside: int = 0, first_error: str | None = None) -> None:
        """At the end of a recording: what was not recorded, as warnings (stack: the caller's caller)."""
        if outside:
            warnings.warn(
                f"routescope: {outside} router calls ran outside a forward of the recorded "
                "model and were not recorded (call the model you passed to record())",
                stacklevel=4,
            )
        quiet = {"rows_finished", "rejected_candidates"}  # by design, documented
        loud = {k: v for k, v in self.counts.items() if k not in quiet}
        if loud:
            what = ", ".join(f"{k}={v}" for k, v in sorted(loud.items()))
            first = f"; the first failed step: {first_error}" if first_error else ""
            warnings.warn(
                f"routescope: some model work was not recorded ({what}){first}; the manifest's 'skipped' "
                "says the same (docs/capture.md explains each reason)",
                RuntimeWarning,
                stacklevel=4,
            )
