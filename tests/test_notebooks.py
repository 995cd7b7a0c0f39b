"""Tutorial notebooks: each runs top to bottom without a cell error, none is committed with
outputs, each .ipynb is in sync with its jupytext percent-format source (notebooks/NN_*.py,
the file to edit) and uses only the public API. Also `rs.bundled`, which the notebooks use
to find the bundled model, and the Run's HTML summary (_repr_html_)."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import jupytext
import nbformat
import pytest
import torch

import routescope as rs
from routescope.analysis.display import run_html

pytestmark = pytest.mark.slow  # README's test command leaves this file out (-m 'not slow')

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = {
    "01_quickstart.ipynb",
    "02_load_balance.ipynb",
    "03_entanglement_and_specialization.ipynb",
    "04_super_experts.ipynb",
    "05_compare_runs.ipynb",
    "06_training.ipynb",
}
CELL_TIMEOUT_S = 300
# What a notebook may import from routescope: the package itself and its public helpers.
PUBLIC_MODULES = {"routescope", "routescope.plots", "routescope.bundled"}


def _ids(paths: list[Path]) -> list[str]:
    return [p.stem for p in paths]


def test_every_tutorial_notebook_is_present():
    assert {p.name for p in NOTEBOOKS} >= EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_is_committed_without_outputs(path: Path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [
        i
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)
    ]
    assert not dirty, f"{path.name}: cells {dirty} have outputs or execution counts; clear them"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_is_in_sync_with_its_percent_source(path: Path):
    source = path.with_suffix(".py")
    assert source.is_file(), f"{path.name} has no paired source {source.name}"
    text = jupytext.read(source)
    committed = nbformat.read(path, as_version=4)
    assert text.metadata.get("jupytext", {}).get("formats") == "ipynb,py:percent", source.name
    assert committed.metadata.get("jupytext", {}).get("formats") == "ipynb,py:percent", path.name
    assert [(c.cell_type, c.source) for c in committed.cells] == [
        (c.cell_type, c.source) for c in text.cells
    ], f"{path.name} differs from {source.name}: edit the .py, then run `jupytext --sync {source}`"


def _routescope_uses(tree: ast.AST) -> tuple[set[str], set[str]]:
    """(routescope modules a notebook imports, names it takes from the package or `rs`)."""
    modules, names = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.name for a in node.names if a.name.split(".")[0] == "routescope"}
        elif isinstance(node, ast.ImportFrom) and node.module == "routescope":
            modules |= {
                f"routescope.{a.name}" for a in node.names if f"routescope.{a.name}" in PUBLIC_MODULES
            }
            names |= {a.name for a in node.names if f"routescope.{a.name}" not in PUBLIC_MODULES}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("routescope."):
            modules.add(node.module)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "rs":
            names.add(node.attr)
    return modules, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_uses_only_the_public_api(path: Path):
    nb = jupytext.read(path.with_suffix(".py"))
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    modules, names = _routescope_uses(ast.parse(code))
    assert "routescope" in modules, f"{path.name} does not import routescope"
    assert modules <= PUBLIC_MODULES, f"{path.name} imports internals: {sorted(modules - PUBLIC_MODULES)}"
    assert names <= set(rs.__all__), (
        f"{path.name} uses names outside rs.__all__: {sorted(names - set(rs.__all__))}"
    )


def test_bundled_paths_and_their_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    assert (rs.bundled.model_path() / "config.json").is_file()
    assert rs.bundled.corpus_path().suffix == ".jsonl" and rs.bundled.corpus_path().is_file()
    assert rs.bundled.model_path().parent == rs.bundled.data_dir() == REPO / "data"
    monkeypatch.setenv(rs.bundled.DATA_ENV, str(tmp_path))
    assert rs.bundled.data_dir() == tmp_path
    with pytest.raises(FileNotFoundError, match=r"bundled model is missing at .*model.*ROUTESCOPE_DATA"):
        rs.bundled.model_path()
    with pytest.raises(FileNotFoundError, match="bundled corpus is missing"):
        rs.bundled.corpus_path()
    from routescope.commands.inputs import bundled_corpus, bundled_model

    assert bundled_model is rs.bundled.model_path and bundled_corpus is rs.bundled.corpus_path


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_runs_top_to_bottom(path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Run in notebooks/ as Jupyter would; the notebooks find data/ through the package, and
    leave no temporary folder behind."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    # the kernel inherits this environment: no network, no stray threads on a shared CPU
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "2"))
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's tempfile.mkdtemp lands here
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        allow_errors=False,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    try:
        client.execute()
    except CellExecutionError as exc:
        pytest.fail(f"{path.name} failed:\n{exc}", pytrace=False)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{path.name}: {errors[0].get('ename')}: {errors[0].get('evalue')}"
    left = sorted(p.name for p in tmp_path.glob("routescope-notebook-*"))
    assert not left, f"{path.name} left its temporary folder(s) behind: {left}"


# -- Run._repr_html_ ---------------------------------------------------------------------
@pytest.fixture
def small_run(tiny_model, tmp_path: Path):
    model = tiny_model("mixtral")
    out = tmp_path / 'run <b>&"x"'  # markup in the path must come out escaped
    gen = torch.Generator().manual_seed(0)
    with rs.record(model, out, labels={"domain": "code"}) as rec, torch.no_grad():
        model(input_ids=torch.randint(1, 100, (2, 12), generator=gen))
        rec.set_labels(domain="<script>alert(1)</script>")
        model(input_ids=torch.randint(1, 100, (2, 12), generator=gen))
    return rs.open_run(out)


def test_run_html_summarizes_manifest_and_metrics(small_run):
    page = run_html(small_run)
    m = small_run.manifest
    assert page.startswith("<div") and page.rstrip().endswith("</div>")
    assert "mixtral" in page and str(m["tokens"]) in page and "domain" in page
    assert "complete" in page
    for metric in ("balance", "dead_experts", "hot_experts", "entanglement"):
        if hasattr(small_run, metric):
            assert f"{metric}() failed" not in page, page
    if hasattr(small_run, "balance"):
        assert "norm_entropy" in page and "max_violation" in page
    if hasattr(small_run, "entanglement"):
        assert "mutual_info_bits" in page


def test_run_html_escapes_every_string(small_run):
    page = run_html(small_run)
    assert "<b>" not in page and "<script>" not in page
    assert "run &lt;b&gt;&amp;&quot;x&quot;" in page


def test_run_renders_in_jupyter(small_run):
    if not hasattr(rs.Run, "_repr_html_"):
        pytest.skip("Run._repr_html_ not added yet")
    assert small_run._repr_html_() == run_html(small_run)
