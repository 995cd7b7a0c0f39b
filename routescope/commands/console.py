"""Terminal output shared by the reading commands: rich tables, the stdout console, a spinner
on stderr, and the `--skip-corrupt` option."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import pandas as pd

from routescope.commands.report_sections import fmt

TABLE_ROWS = 20  # rows of a long table printed before "… N more"


@contextmanager
def status(message: str) -> Iterator[None]:
    """A spinner on stderr while long work runs (plain and silent when stderr is not a terminal)."""
    from rich.console import Console

    console = Console(stderr=True)
    if not console.is_terminal:
        yield
        return
    with console.status(message):
        yield


def add_skip_corrupt_argument(parser: argparse.ArgumentParser) -> None:
    """`--skip-corrupt` for every command that reads a run (open_run(..., skip_corrupt=True))."""
    parser.add_argument(
        "--skip-corrupt",
        action="store_true",
        help="read a run with corrupt or truncated parts: skip them (and the rows of the same "
        "steps in the other tables) and say what was skipped",
    )


def table(title: str, df: pd.DataFrame, columns: list[str], empty: str) -> Any:
    from rich.table import Table

    cols = [c for c in columns if c in df.columns]
    table = Table(title=title, title_justify="left", show_edge=False, header_style="bold")
    for col in cols:
        table.add_column(col, justify="left" if col in ("change", "path") else "right")
    if df.empty:
        return f"[bold]{title}[/bold]: {empty}"
    for row in df[cols].head(TABLE_ROWS).itertuples(index=False):
        table.add_row(*(fmt(v.item() if hasattr(v, "item") else v) for v in row))
    if len(df) > TABLE_ROWS:
        table.caption = f"… {len(df) - TABLE_ROWS} more rows (use --json for all)"
    return table


def output_console() -> Any:
    """stdout console; wide when stdout is a file or pipe so tables are not truncated."""
    from rich.console import Console

    console = Console()
    console = console if console.is_terminal else Console(width=160)
    console.on_broken_pipe = _raise_broken_pipe  # rich would exit 1; main() ends quietly with 0
    return console


def _raise_broken_pipe() -> NoReturn:
    raise BrokenPipeError
