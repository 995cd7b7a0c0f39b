"""Corpus inputs of the commands: JSONL, text files and folders, and their error messages."""

from __future__ import annotations

import json

import pytest

from routescope.commands.inputs import read_texts


def test_jsonl_text_and_labels(tmp_path):
    path = tmp_path / "c.jsonl"
    rows = [
        {"text": "def f(): pass", "domain": "code"},
        {"text": "2 + 2 = 4", "domain": "math", "src": "gen"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    records = read_texts(path)
    assert [r.text for r in records] == ["def f(): pass", "2 + 2 = 4"]
    assert records[1].labels == {"domain": "math", "src": "gen"}
    assert read_texts(path, label_fields=["domain"])[1].labels == {"domain": "math"}


def test_folder_of_text_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("world")
    (tmp_path / "skip.bin").write_bytes(b"\0")
    assert sorted(r.text for r in read_texts(tmp_path)) == ["hello", "world"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "ok"}\n{"body": "x"}\n', r"c\.jsonl:2: no 'text' field \(fields: body\)"),
        ('{"text": "ok", "domain": 3}\n', r"c\.jsonl:1: label field 'domain' must be a string, got int"),
        ('{"text": "ok"}\nnot json\n', r"c\.jsonl:2: not valid JSON"),
        ('{"text": 5}\n', r"c\.jsonl:1: field 'text' must be a string"),
        ("", r"holds no text"),
    ],
)
def test_bad_jsonl_names_the_line(tmp_path, content, message):
    path = tmp_path / "c.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_texts(path)


def test_missing_and_empty_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_texts(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no .txt"):
        read_texts(tmp_path / "empty")
