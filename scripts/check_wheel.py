"""Check what a built routescope wheel holds: the package as a user installs it.

`.ci/run` and tests/test_packaging.py call it on the wheel `python -m build` writes. It fails
(exit 1, one line per problem) when the bundled model, the corpus, a SQL file of
routescope/analysis/queries/ or a dashboard module is missing, when tests or benchmarks
travel along, or when anything installs beside `routescope/` under a top-level name of its own.
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUNDLED = ("sample.jsonl", "model/config.json", "model/model.safetensors", "model/tokenizer.json")


def expected_files() -> list[str]:
    """Paths the wheel must hold, read from the clone: mapped folders land under routescope/."""
    names = [f"routescope/_data/{name}" for name in BUNDLED]
    names += [
        f"routescope/{p.relative_to(REPO / 'routescope').as_posix()}" for p in _files("routescope", "*.sql")
    ]
    names += [
        f"routescope/dashboard/{p.relative_to(REPO / 'dashboard').as_posix()}"
        for p in _files("dashboard", "*")
    ]
    return names


def _files(folder: str, pattern: str) -> list[Path]:
    return [p for p in sorted((REPO / folder).rglob(pattern)) if p.is_file() and "__pycache__" not in p.parts]


def wheel_problems(wheel: Path) -> list[str]:
    """What is wrong with the wheel's contents; empty when it is as a user should get it."""
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    problems = [f"missing {name}" for name in expected_files() if name not in names]
    for name in sorted(names):
        top = name.split("/", 1)[0]
        if top != "routescope" and not top.endswith(".dist-info"):
            problems.append(f"installs outside the routescope package: {name}")
        elif {"tests", "benchmarks"} & set(name.split("/")[:-1]):
            problems.append(f"test or benchmark file in the wheel: {name}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=Path)
    args = parser.parse_args(argv)
    problems = wheel_problems(args.wheel)
    for problem in problems:
        print(f"check_wheel: {problem}", file=sys.stderr)
    if not problems:
        print(
            f"check_wheel: {args.wheel.name} holds the model, corpus, SQL files and dashboard; nothing else"
        )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
