"""Importers: routing data captured by serving and training engines converted into run directories.

One folder per engine reads that engine's files (`sglang/`, `vllm/`, `megatron/`); each parses
its own layout into an `ImportedRun` (plain column arrays), and the shared core (`core/`:
errors, input-file checks, model layout, response turns, and `core/tables.py`, the handoff to
the store's writer and manifest code) writes it, so an imported run reads like a recorded one.
`responses.py` places the response records of either server (RL rollouts) into sequences.
`routescope import` (commands/import_run.py) calls these; docs/scale_out.md lists the accepted
layouts and the sources they follow.
"""

from __future__ import annotations

from routescope.importers.core.tables import (
    ImportedRun,
    ImportFormatError,
    RunExistsError,
    build_manifest,
    counts_to_table,
    parse_layers,
    sequences_to_tables,
    write_imported_run,
)

__all__ = [
    "ImportFormatError",
    "ImportedRun",
    "RunExistsError",
    "build_manifest",
    "counts_to_table",
    "parse_layers",
    "sequences_to_tables",
    "write_imported_run",
]
