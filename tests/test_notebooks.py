"""Tutorial notebooks: each runs top to bottom without a cell error, none is committed with
outputs, and they match scripts/make_notebooks.py. Also the Run's HTML summary (_repr_html_)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import nbformat
import pytest
import torch

import routescope as rs
from routescope.analysis.display import run_html

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = {
    "01_quickstart.ipynb",
    "02_load_balance.ipynb",
    "03_entanglement_and_specialization.ipynb",
    "04_super_experts.ipynb",
    "05_compare_runs.ipynb",
}
CELL_TIMEOUT_S = 300


def _ids(paths: list[Path]) -> list[str]:
    return [p.stem for p in paths]


def _load_make_notebooks():
    spec = importlib.util.spec_from_file_location(
        "_routescope_make_notebooks", REPO / "scripts" / "make_notebooks.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def test_notebooks_match_their_source_script(tmp_path: Path):
    make = _load_make_notebooks()
    for name, cells in make.NOTEBOOKS.items():
        built = make.build_notebook(cells)
        committed = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
        assert [c.source for c in committed.cells] == [c.source for c in built.cells], (
            f"{name} differs from scripts/make_notebooks.py: run `python scripts/make_notebooks.py`"
        )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_runs_top_to_bottom(path: Path, monkeypatch: pytest.MonkeyPatch):
    """Run in notebooks/ as Jupyter would; the notebooks find data/ through the package."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    # the kernel inherits this environment: no network, no stray threads on a shared CPU
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "2"))
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
