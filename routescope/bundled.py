"""Paths of the bundled tiny model and its held-out corpus.

`rs.bundled.model_path()` and `rs.bundled.corpus_path()` are what notebooks, docs and the
`demo` / `profile` / `super-experts` defaults use. In a clone they live in `data/` at the
repository root; an installed package carries the same files as package data in
`routescope/_data/` (pyproject maps `data/` there). $ROUTESCOPE_DATA overrides both. Both
raise FileNotFoundError naming the path and what to do when the file is not there.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "ROUTESCOPE_DATA"


def data_dir() -> Path:
    """The bundled data folder: $ROUTESCOPE_DATA, else `routescope/_data/` in an installed
    package, else `data/` beside the package (a clone, or an editable install of one)."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    package = Path(__file__).resolve().parent
    installed = package / "_data"
    return installed if installed.is_dir() else package.parent / "data"


def model_path() -> Path:
    """Folder of the bundled Qwen3-MoE model (config.json, weights, tokenizer)."""
    path = data_dir() / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the bundled model is missing at {path}; run `python scripts/train_model.py`, "
            f"set ${DATA_ENV}, or pass --model"
        )
    return path


def corpus_path() -> Path:
    """The bundled held-out corpus: JSONL, one {"text", "domain"} record a line."""
    path = data_dir() / "sample.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"the bundled corpus is missing at {path}; set ${DATA_ENV} or pass --data")
    return path


__all__ = ["DATA_ENV", "corpus_path", "data_dir", "model_path"]
