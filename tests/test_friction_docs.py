"""Issue 38: packaging and docs that must stay true (items 3, 6, 8, 9's pins).

Each test reads the real file (pyproject, notebooks, docs, transformers' source) and fails
when what a user follows drifts from what the code needs.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def test_notebooks_extra_provides_every_notebook_import() -> None:
    """Item 3: `pip install -e ".[notebooks]"` gives every module the notebooks import."""
    provided = requirement_names(PYPROJECT["project"]["dependencies"])
    provided |= requirement_names(PYPROJECT["project"]["optional-dependencies"]["notebooks"])
    dists = md.packages_distributions()
    needed: dict[str, set[str]] = {}
    for source in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py")):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "routescope":
                    continue
                for dist in dists.get(top, [top]):
                    needed.setdefault(dist.lower().replace("_", "-"), set()).add(source.name)
    assert "datasets" in needed  # notebooks/06_training's Trainer data
    missing = {dist: sorted(files) for dist, files in needed.items() if dist not in provided}
    assert not missing, f"imported by the notebooks but in no install they get: {missing}"
