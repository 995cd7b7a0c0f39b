"""Named SQL queries read from `routescope/analysis/queries/*.sql`, aiosql style.

A block starts with `-- name: <name>`, then one comment line saying what it returns, then
the SQL with named parameters (`$layer`). `metrics.py` looks queries up by name and
`compose` stacks them as common table expressions; parameter values are always bound.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

QUERY_DIR = Path(__file__).with_name("queries")

_NAME = re.compile(r"^--\s*name:\s*([A-Za-z_]\w*)\s*$")
_PARAM = re.compile(r"\$([A-Za-z_]\w*)")
_LEADING_WITH = re.compile(r"^\s*WITH\s+", re.IGNORECASE)


@dataclass(frozen=True)
class NamedQuery:
    """One `-- name:` block: its SQL text, one-line doc and the `$parameters` it reads."""

    name: str
    doc: str
    sql: str
    params: frozenset[str]
    source: Path


def parse_queries(text: str, source: Path) -> dict[str, NamedQuery]:
    """Split one .sql file into its named blocks; ValueError names the file and line of a bad block."""
    queries: dict[str, NamedQuery] = {}
    blocks: list[tuple[str, int, list[str]]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        match = _NAME.match(line.strip())
        if match:
            blocks.append((match.group(1), lineno, []))
        elif blocks:
            blocks[-1][2].append(line)
        elif line.strip() and not line.strip().startswith("--"):
            raise ValueError(f"{source}:{lineno}: SQL before the first '-- name:' line")
    for name, lineno, lines in blocks:
        while lines and not lines[0].strip():
            lines.pop(0)
        if not lines or not lines[0].strip().startswith("--"):
            raise ValueError(f"{source}:{lineno}: query {name!r} needs a one-line '-- ' doc comment")
        doc = lines.pop(0).strip().lstrip("-").strip()
        sql = "\n".join(lines).strip().rstrip(";").strip()
        if not sql:
            raise ValueError(f"{source}:{lineno}: query {name!r} has no SQL")
        if name in queries:
            raise ValueError(f"{source}:{lineno}: query {name!r} is defined twice")
        queries[name] = NamedQuery(name, doc, sql, frozenset(_PARAM.findall(sql)), source)
    return queries


@functools.cache
def load_queries(directory: Path = QUERY_DIR) -> dict[str, NamedQuery]:
    """Every named query of every .sql file in `directory`; a name may be defined once."""
    queries: dict[str, NamedQuery] = {}
    for path in sorted(Path(directory).glob("*.sql")):
        for name, query in parse_queries(path.read_text(encoding="utf-8"), path).items():
            if name in queries:
                raise ValueError(f"query {name!r} is defined in {queries[name].source} and {path}")
            queries[name] = query
    return queries


def get_query(name: str) -> NamedQuery:
    queries = load_queries()
    if name not in queries:
        raise KeyError(f"no named query {name!r}; known: {', '.join(sorted(queries))}")
    return queries[name]


@dataclass(frozen=True)
class Cte:
    """A common table expression for `compose`; `materialized` None leaves the choice to DuckDB."""

    name: str
    sql: str
    materialized: bool | None = None


def compose(body: str, ctes: Sequence[Cte]) -> str:
    """`WITH <ctes>, <body's own CTEs> <body>`: one statement, CTEs in dependency order."""
    if not ctes:
        return body
    parts = []
    for cte in ctes:
        hint = {None: "", True: " MATERIALIZED", False: " NOT MATERIALIZED"}[cte.materialized]
        parts.append(f"{cte.name} AS{hint} (\n{cte.sql}\n)")
    head = "WITH " + ",\n".join(parts)
    match = _LEADING_WITH.match(body)
    if match:
        return f"{head},\n{body[match.end() :]}"
    return f"{head}\n{body}"
