"""Inputs of the commands: the bundled defaults, and text corpora from files, folders or JSONL.

Used by `profile`, `demo` and `super-experts`; every bad input raises ValueError or
FileNotFoundError with one line that names the file (and line) at fault. The bundled paths
live in `routescope.bundled` (public); the names here are kept for older callers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from routescope.bundled import corpus_path as bundled_corpus
from routescope.bundled import data_dir
from routescope.bundled import model_path as bundled_model

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".text")
__all__ = ["TEXT_SUFFIXES", "TextRecord", "bundled_corpus", "bundled_model", "data_dir", "read_texts"]


@dataclass
class TextRecord:
    text: str
    labels: dict[str, str] = field(default_factory=dict)


def read_texts(
    path: str | Path, text_field: str = "text", label_fields: list[str] | None = None
) -> list[TextRecord]:
    """Records from a .jsonl file (text + string label fields), a text file, or a folder of them."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data path {path} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (*TEXT_SUFFIXES, ".jsonl"))
        if not files:
            raise ValueError(f"data directory {path} holds no .txt, .md, .py or .jsonl file")
        records = [r for f in files for r in read_texts(f, text_field, label_fields)]
    elif path.suffix == ".jsonl":
        records = _read_jsonl(path, text_field, label_fields)
    else:
        text = path.read_text(encoding="utf-8", errors="replace")
        records = [TextRecord(text, {"source": path.name})] if text.strip() else []
    if not records:
        raise ValueError(f"data path {path} holds no text")
    return records


def _read_jsonl(path: Path, text_field: str, label_fields: list[str] | None) -> list[TextRecord]:
    records = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: each line must be a JSON object")
            if text_field not in row:
                raise ValueError(
                    f"{path}:{number}: no {text_field!r} field (fields: {', '.join(row) or 'none'})"
                )
            text = row[text_field]
            if not isinstance(text, str):
                raise ValueError(f"{path}:{number}: field {text_field!r} must be a string")
            names = label_fields if label_fields is not None else [k for k in row if k != text_field]
            labels = {}
            for name in names:
                value = row.get(name)
                if value is None:
                    continue
                if not isinstance(value, str):
                    raise ValueError(
                        f"{path}:{number}: label field {name!r} must be a string, got {type(value).__name__}"
                    )
                labels[name] = value
            records.append(TextRecord(text, labels))
    return records
