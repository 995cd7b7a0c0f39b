"""The red panels at the top of `routescope report`: a run still written (INCOMPLETE), read
without corrupt parts (PARTIAL), or whose cheap invariants fail (DAMAGED, analysis/quick_check.py).
"""

from __future__ import annotations

from typing import Any


def incomplete_banner(path: str, skipped: list[str] | None = None) -> Any:
    from rich.panel import Panel

    if skipped:
        return Panel(
            f"PARTIAL RUN: {len(skipped)} corrupt part(s) of {path} skipped ({', '.join(skipped)}).\n"
            "The numbers below leave out the tokens, routing and steps those parts held.",
            style="bold red",
        )
    return Panel(
        f"INCOMPLETE RUN: {path} is still being written, or its recording crashed.\n"
        "The numbers below cover only the parts flushed so far.",
        style="bold red",
    )


def damage_banner(path: str, problems: list[str]) -> Any:
    from rich.panel import Panel

    lines = "\n".join(f"- {p}" for p in problems)
    return Panel(
        f"DAMAGED RUN: {path}\n{lines}\nThe numbers below cannot be trusted: run `routescope check {path}` "
        "for every failed invariant.",
        style="bold red",
    )
