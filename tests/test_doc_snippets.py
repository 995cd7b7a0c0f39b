"""Every ```python snippet of README.md and docs/*.md runs, as written (issue 26, item 10).

Each snippet runs on the bundled model in its own working directory, with a fresh copy of
small runs this module records once, and a namespace that already holds the names a
reader is assumed to have (the preamble, `preamble()` below):

    rs, torch                 routescope and torch
    model, tokenizer          the bundled model (`rs.bundled.model_path()`), loaded fresh per snippet
    ids, mask                 a batch of 2 unpadded sequences (16 tokens) and its all-ones mask
    ids2, mask2               a left-padded batch of 2 prompts of different lengths, for generate
    batches                   2 dicts of model inputs (input_ids, attention_mask): calibration batches
    loader, optimizer         3 training batches (input_ids, attention_mask, labels) and an SGD optimizer
    evaluate(model)           the mean language-model loss on `ids` (a float)
    run                       rs.open_run("runs/demo")
    runs/demo                 `domain` code then math (up to 32 tokens), prefill and decode steps,
                              router_stats, Super Expert tables
    runs/a, runs/b, runs/base two recordings of the same texts (compare's inputs)
    runs/rollout              a recording of `ids` (replay's input)
    runs/train                a custom training loop under rs.watch(..., out_dir=...): train_step 1..8

A run the snippet itself records (`rs.record(model, "runs/x"` or `rs.watch(..., out_dir="runs/x"`)
is not there before it runs. An `rs.EmptySelectionWarning` (a `where=` that selects nothing)
fails the snippet: the docs must show real numbers.

Opting out: a snippet that needs what this test cannot provide (a Spark session, S3, a GPU,
a server's responses, a `Trainer` with placeholder arguments) has, on the line right before
its fence, an HTML comment (invisible when rendered) with the reason:

    <!-- snippet: skip — needs a Spark session -->

The snippet is then reported as skipped with that reason (`pytest -ra` lists them); a
marker without a reason fails. Prefer making a snippet runnable over skipping it.

A snippet that needs an extra or a service runs with it, and is skipped only where the extra
is absent: `<!-- snippet: needs s3, spark -->` on the line before its fence (issue 38 item 12).
Each need names what it provides:

    trainer     transformers' Trainer on `ds`, a datasets.Dataset of the `loader` batches
                (needs `datasets`; `tensorboard` for report_to=["tensorboard"])
    rollout     rollout.jsonl in the working directory: SGLang /generate records of the bundled
                model (tests/data/sglang_rollout.jsonl); `policy` (the model in train mode) and
                `pg_loss(logits, batch)` (a stand-in policy-gradient loss)
    s3          an S3 emulator (moto's server on loopback) with a bucket `traces`, its
                endpoint and keys in the AWS_* environment (needs `s3fs`, `moto`)
    spark       pyspark and Java (a local session)
"""

from __future__ import annotations

import re
import shutil
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import routescope as rs

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent>[ \t]*)```python[ \t]*$")
SKIP = re.compile(r"<!--\s*snippet:\s*skip\b\s*[—–:-]?\s*(?P<reason>.*?)\s*-->")
NEEDS = re.compile(r"<!--\s*snippet:\s*needs\s+(?P<needs>[\w, ]+?)\s*-->")
# need -> the modules (and programs) it takes; a missing one skips the snippet, naming it
NEED_MODULES = {
    "trainer": ["datasets", "tensorboard"],
    "rollout": [],
    "s3": ["s3fs", "moto"],
    "spark": ["pyspark", "sqlglot", "java"],
}
RECORDS_INTO = re.compile(r"""(?:rs\.record\([^,]+,|out_dir=)\s*["'](?P<path>runs/[^"']+)["']""")
RUNS = ("demo", "a", "b", "base", "rollout", "train")


@dataclass(frozen=True)
class Snippet:
    doc: Path
    line: int  # 1-based line of the opening fence
    code: str
    skip: str | None  # the reason, when marked
    needs: tuple[str, ...] = ()  # extras or services it runs with (NEED_MODULES)

    @property
    def name(self) -> str:
        return f"{self.doc.relative_to(ROOT).as_posix()}:{self.line}"


def extract(doc: Path) -> list[Snippet]:
    """The ```python blocks of one Markdown file (indented ones in list items too)."""
    lines = doc.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        start, indent = i, match.group("indent")
        body = []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        before = next((ln for ln in reversed(lines[:start]) if ln.strip()), "")
        marker = SKIP.search(before)
        skip = None
        if marker:
            skip = marker.group("reason").strip()
            if not skip:
                raise AssertionError(f"{doc.name}:{start + 1}: a snippet skip marker needs a reason")
        wanted = NEEDS.search(before)
        needs = tuple(n.strip() for n in wanted.group("needs").split(",")) if wanted else ()
        unknown = [n for n in needs if n not in NEED_MODULES]
        if unknown:
            raise AssertionError(f"{doc.name}:{start + 1}: unknown snippet needs {unknown}")
        found.append(Snippet(doc, start + 1, textwrap.dedent("\n".join(body)) + "\n", skip, needs))
        i += 1
    return found


SNIPPETS = [s for doc in DOCS for s in extract(doc)]


# -- the preamble ---------------------------------------------------------------------------
def load_bundled() -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = rs.bundled.model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return AutoModelForCausalLM.from_pretrained(path).eval(), tokenizer


def texts() -> list[str]:
    import json

    rows = [json.loads(ln) for ln in rs.bundled.corpus_path().read_text(encoding="utf-8").splitlines() if ln]
    return [r["text"] for r in rows if len(r["text"]) > 400][:8]


def preamble() -> dict[str, Any]:
    """The names every snippet may use (the module docstring lists them)."""
    torch.manual_seed(0)
    model, tokenizer = load_bundled()
    corpus = texts()
    enc = tokenizer(corpus[:2], return_tensors="pt", truncation=True, max_length=16)
    tokenizer.padding_side = "left"
    prompts = tokenizer([corpus[2][:40], corpus[3][:120]], return_tensors="pt", padding=True)
    tokenizer.padding_side = "right"
    batches = [
        {
            k: v
            for k, v in tokenizer(
                corpus[i : i + 2], return_tensors="pt", padding=True, truncation=True, max_length=32
            ).items()
            if k in ("input_ids", "attention_mask")
        }
        for i in (4, 6)
    ]
    loader = [{**b, "labels": b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)} for b in batches]
    loader.append({**loader[0]})

    def evaluate(m: Any) -> float:
        with torch.no_grad():
            return float(m(input_ids=enc["input_ids"], labels=enc["input_ids"]).loss)

    return {
        "rs": rs,
        "torch": torch,
        "model": model,
        "tokenizer": tokenizer,
        "ids": enc["input_ids"],
        "mask": enc["attention_mask"],
        "ids2": prompts["input_ids"],
        "mask2": prompts["attention_mask"],
        "batches": batches,
        "loader": loader,
        "optimizer": torch.optim.SGD(model.parameters(), lr=1e-4),
        "evaluate": evaluate,
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The small runs the snippets read, recorded once."""
    root = tmp_path_factory.mktemp("doc-runs")
    names = preamble()
    model, ids, mask = names["model"], names["ids"], names["mask"]
    with torch.no_grad():
        with rs.record(model, root / "demo", labels={"domain": "code"}, router_stats=True) as rec:
            model(input_ids=ids, attention_mask=mask)
            model(**names["batches"][0])  # code sequences of up to 32 tokens
            rec.set_labels(domain="math")
            model(**names["batches"][1])
            model.generate(
                input_ids=names["ids2"],
                attention_mask=names["mask2"],
                max_new_tokens=4,
                do_sample=False,
                pad_token_id=names["tokenizer"].pad_token_id,
            )
        rs.find_super_experts(model, names["batches"], out=root / "demo", progress=False)
        for name in ("a", "b", "base", "rollout"):
            with rs.record(model, root / name):
                model(input_ids=ids, attention_mask=mask)
    train = load_bundled()[0].train()
    optimizer = torch.optim.SGD(train.parameters(), lr=1e-4)
    with rs.watch(train, out_dir=root / "train") as watch:
        for step in range(8):
            batch = names["loader"][step % len(names["loader"])]
            train(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            watch.end_step(read=False)
    return root


def missing_for(needs: tuple[str, ...]) -> list[str]:
    """The modules (or programs) of `needs` this machine lacks."""
    import importlib.util

    wanted = [m for need in needs for m in NEED_MODULES[need]]
    return [
        m for m in wanted if (shutil.which(m) is None if m == "java" else importlib.util.find_spec(m) is None)
    ]


@pytest.fixture(scope="module")
def s3_emulator():
    """moto's S3 server on loopback with a bucket `traces` (tests/s3_server.py); yields the
    AWS environment that points boto3 and the CLI at it."""
    import s3fs

    from tests.s3_server import aws_env, moto_server, storage_options

    with moto_server() as endpoint:
        s3fs.S3FileSystem(skip_instance_cache=True, **storage_options(endpoint)).call_s3(
            "create_bucket", Bucket="traces"
        )
        yield aws_env(endpoint)


def provide(
    needs: tuple[str, ...], names: dict[str, Any], request: pytest.FixtureRequest, monkeypatch
) -> None:
    """Put what each need provides in place (the module docstring lists them)."""
    if "trainer" in needs:
        from datasets import Dataset

        rows = [
            {"input_ids": row, "attention_mask": [1] * len(row), "labels": row}
            for row in names["ids"].tolist() * 2
        ]
        names["ds"] = Dataset.from_list(rows)
    if "rollout" in needs:
        shutil.copy(ROOT / "tests" / "data" / "sglang_rollout.jsonl", "rollout.jsonl")
        names["policy"] = names["model"]

        def pg_loss(logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
            """A stand-in policy-gradient loss: the sampled tokens' mean log-probability."""
            logp = logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None])
            return -logp.mean()

        names["pg_loss"] = pg_loss
    if "s3" in needs:
        for key, value in request.getfixturevalue("s3_emulator").items():
            monkeypatch.setenv(key, value)


@pytest.mark.slow
@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.name for s in SNIPPETS])
def test_doc_snippet_runs(
    snippet: Snippet,
    runs: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
):
    if snippet.skip:
        pytest.skip(f"{snippet.name}: {snippet.skip}")
    missing = missing_for(snippet.needs)
    if missing:
        pytest.skip(f'{snippet.name}: needs {", ".join(missing)} (pip install -e ".[test,s3,spark]")')
    recorded = set(RECORDS_INTO.findall(snippet.code))
    for name in RUNS:
        if f"runs/{name}" not in recorded:
            shutil.copytree(runs / name, tmp_path / "runs" / name)
    monkeypatch.chdir(tmp_path)
    names = preamble()
    provide(snippet.needs, names, request, monkeypatch)
    if (tmp_path / "runs" / "demo").exists():
        names["run"] = rs.open_run("runs/demo")
    code = compile(snippet.code, snippet.name, "exec")
    with warnings.catch_warnings():
        warnings.simplefilter("error", rs.EmptySelectionWarning)
        try:
            exec(code, names)
        except Exception as exc:  # name the doc line, keep the traceback
            raise AssertionError(
                f"{snippet.name} does not run as written: {type(exc).__name__}: {exc}"
            ) from exc


def test_snippets_are_found_and_markers_parse(tmp_path: Path):
    assert any(s.doc.name == "README.md" for s in SNIPPETS)
    doc = tmp_path / "x.md"
    doc.write_text(
        "text\n<!-- snippet: skip — needs a Spark session -->\n```python\nspark\n```\n\n"
        "- item\n\n  ```python\n  a = 1\n  ```\n",
        encoding="utf-8",
    )
    first, second = extract(doc)
    assert (first.line, first.skip, first.code) == (3, "needs a Spark session", "spark\n")
    assert (second.skip, second.code) == (None, "a = 1\n")
    doc.write_text("<!-- snippet: needs s3, spark -->\n```python\ny = 2\n```\n", encoding="utf-8")
    (needed,) = extract(doc)
    assert (needed.needs, needed.skip) == (("s3", "spark"), None)
    doc.write_text("<!-- snippet: needs gpu -->\n```python\ny = 2\n```\n", encoding="utf-8")
    with pytest.raises(AssertionError, match="unknown snippet needs"):
        extract(doc)
    doc.write_text("<!-- snippet: skip -->\n```python\nx\n```\n", encoding="utf-8")
    with pytest.raises(AssertionError, match="needs a reason"):
        extract(doc)
