"""Dashboard callbacks called directly with values, on runs recorded from a real model.

The bundled model (data/model, with its tokenizer) when it exists, else a tiny Mixtral.
`record_demo_run` and `add_calibration` are shared with tests/test_dashboard_browser.py.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from dash.exceptions import PreventUpdate

import routescope as rs
from routescope import schema

REPO = Path(__file__).resolve().parent.parent
BUNDLED_MODEL = REPO / "data" / "model"
SAMPLE = REPO / "data" / "sample.jsonl"
DOMAINS = ("code", "math", "prose")


# -- runs --------------------------------------------------------------------------------
def have_bundled_model() -> bool:
    return (BUNDLED_MODEL / "config.json").is_file() and SAMPLE.is_file()


def record_demo_run(out: Path, seed: int = 0, max_new_tokens: int = 6, calibrate: bool = False) -> Path:
    """Record prefill forwards under each domain label, then a generate call; with
    `calibrate`, also run the Super Experts calibration into the run.

    Runs of different seeds see the same token ids where they overlap, so Compare can
    match tokens: the tiny model's weights differ by seed, the bundled model's runs cut
    their texts at different lengths.
    """
    warnings.simplefilter("ignore")
    if have_bundled_model():
        return _record_bundled(out, seed, max_new_tokens, calibrate)
    from tests.tiny_models import build_tiny_model

    model = build_tiny_model("mixtral", seed=seed, num_hidden_layers=3)
    gen = torch.Generator().manual_seed(0)
    with rs.record(model, out, labels={"domain": DOMAINS[0]}) as rec, torch.no_grad():
        for domain in DOMAINS:
            rec.set_labels(domain=domain)
            ids = torch.randint(1, 128, (3, 24), generator=gen)
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
        ids = torch.randint(1, 128, (2, 6), generator=gen)
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    if calibrate:
        batches = [{"input_ids": torch.randint(1, 128, (2, 16), generator=gen)} for _ in range(2)]
        rs.find_super_experts(model, batches, out=out, progress=False)
    return out


def _record_bundled(out: Path, seed: int, max_new_tokens: int, calibrate: bool) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(BUNDLED_MODEL)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    model = AutoModelForCausalLM.from_pretrained(BUNDLED_MODEL).eval()
    records = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines() if line.strip()]
    by_domain: dict[str, list[str]] = {}
    for r in records:
        by_domain.setdefault(r["domain"], []).append(r["text"])
    domains = sorted(by_domain)
    with rs.record(model, out, labels={"domain": domains[0]}) as rec, torch.no_grad():
        for i, domain in enumerate(domains):
            rec.set_labels(domain=domain)
            texts = by_domain[domain][i % 2 : i % 2 + 3]
            batch = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=64 - 16 * seed)
            model(**batch)
        tok.padding_side = "left"
        batch = tok([t[:40] for t in by_domain[domains[0]][:2]], return_tensors="pt", padding=True)
        # output_router_logits=False: the aux-loss path of generate's decode steps needs no router logits
        model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            output_router_logits=False,
        )
    if calibrate:
        tok.padding_side = "right"
        texts = [by_domain[d][-1] for d in domains]
        rs.find_super_experts(model, texts, tokenizer=tok, out=out, progress=False, max_length=64)
    return out


def write_table(run_dir: Path, table: str, df: pd.DataFrame) -> None:
    """Write one SPEC-format part of `table` (stand-in for a calibration pass in tests)."""
    target = run_dir / table / "rank=0"
    target.mkdir(parents=True, exist_ok=True)
    arrow = pa.Table.from_pandas(df[list(schema.TABLE_COLUMNS[table])], schema=schema.schema_for(table))
    pq.write_table(arrow, target / "part-00000.parquet")


def add_calibration(run_dir: Path) -> None:
    """expert_activations and hidden_stats rows with one clear Super Expert (layer of the first MoE)."""
    run = rs.open_run(run_dir)
    rows = []
    for layer in run.moe_layers:
        for expert in range(run.num_experts(layer)):
            rows.append((layer, expert, False, 1.0 + 0.1 * expert + 0.05 * layer, expert * 3, 100))
    rows[1] = (rows[1][0], rows[1][1], False, 250.0, 7, 100)
    acts = pd.DataFrame(
        rows, columns=["layer", "expert", "shared", "max_abs_output", "channel", "tokens_seen"]
    )
    write_table(run_dir, "expert_activations", acts)
    n = int(run.manifest["num_hidden_layers"])
    hidden = pd.DataFrame(
        {
            "layer": range(n),
            "max_abs": [5.0] + [900.0] * (n - 1),
            "median_abs": [0.5] * n,
            "channel": [3] * n,
            "seq_id": [0] * n,
            "pos": [0] * n,
        }
    )
    write_table(run_dir, "hidden_stats", hidden)
    run.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dash")
    a = record_demo_run(root / "run_a", seed=0)
    b = record_demo_run(root / "run_b", seed=1)
    add_calibration(b)
    empty = root / "empty"
    from tests.tiny_models import build_tiny_model

    with rs.record(build_tiny_model("mixtral"), empty):
        pass
    live = root / "live"
    shutil.copytree(a, live)
    manifest = json.loads((live / "manifest.json").read_text())
    manifest["complete"] = False
    (live / "manifest.json").write_text(json.dumps(manifest))
    notrun = root / "not_a_run"
    notrun.mkdir()
    (notrun / "notes.txt").write_text("hello")
    return {"a": a, "b": b, "empty": empty, "live": live, "notrun": notrun, "missing": root / "missing"}


@pytest.fixture(scope="module")
def app(runs):
    from routescope.dashboard.app import create_app

    keys = ["a", "b", "empty", "live", "notrun", "missing"]
    return create_app([runs[k] for k in keys])


KEY = {"a": "0", "b": "1", "empty": "2", "live": "3", "notrun": "4", "missing": "5"}


def state(name: str) -> dict:
    return {"run": KEY[name], "version": None}


def traces_with_data(fig) -> int:
    count = 0
    for trace in fig.data:
        for attr in ("x", "y", "z", "values"):
            values = getattr(trace, attr, None)
            if values is not None and len(values):
                count += 1
                break
        else:
            if trace.type == "sankey" and len(trace.link.value):
                count += 1
    return count


def texts(component) -> str:
    """All text inside a Dash component tree."""
    if component is None:
        return ""
    if isinstance(component, (str, int, float)):
        return str(component)
    if isinstance(component, (list, tuple)):
        return " ".join(texts(c) for c in component)
    if getattr(component, "className", None) == "rs-table":  # a table: its cells, unescaped
        return " ".join(" ".join(row) for row in markdown_cells(component))
    return texts(getattr(component, "children", None))


def table_rows(component) -> list[list[str]]:
    """The body cells of a `components.table` (one Markdown pipe table), as the browser shows them."""
    return markdown_cells(component.children.children)[1:]


def markdown_cells(markdown) -> list[list[str]]:
    """Header and body cells of a `components.table`'s Markdown component (or its text)."""
    import html as html_lib
    import re

    text = getattr(markdown, "children", markdown)
    lines = text.splitlines()
    rows = []
    for line in lines[:1] + lines[2:]:  # the second line is the rule under the header
        cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
        rows.append([html_lib.unescape(re.sub(r"\\(.)", r"\1", c.strip())) for c in cells])
    return rows


# -- tests -------------------------------------------------------------------------------
@pytest.mark.slow
def test_create_app_reads_nothing_until_asked(tmp_path):
    from routescope.dashboard import runs as registry_module
    from routescope.dashboard.app import create_app

    before = registry_module._CURRENT
    try:
        create_app([tmp_path / "does-not-exist"])
        registry = registry_module.get_registry()
        assert all(slot.run is None for slot in registry.slots.values())
        assert registry.options() == [{"label": "0: does-not-exist", "value": "0"}]
    finally:
        registry_module._CURRENT = before


@pytest.mark.slow
def test_serve_opens_and_checks_the_first_run_ahead(tmp_path, runs):
    """`start_ahead` (what `serve` adds to create_app): the first run is opened and its parts'
    footers checked before a browser asks; a run that cannot open is left for the page."""
    import sys

    from routescope.dashboard import app as app_module
    from routescope.dashboard import runs as registry_module

    before = registry_module._CURRENT
    try:
        app_module.create_app([runs["a"], tmp_path / "gone"])
        registry = registry_module.get_registry()
        app_module.start_ahead().join(timeout=60)
        assert "scipy.special" in sys.modules
        assert registry.slots["0"].run is not None and registry.slots["1"].run is None
        version = tuple(str(v) for v in registry.version("0"))
        assert app_module._DAMAGE[("0", version)] == []
        app_module.create_app([tmp_path / "gone"])
        app_module.start_ahead().join(timeout=60)  # nothing raised on the thread
        assert registry_module.get_registry().slots["0"].error
    finally:
        registry_module._CURRENT = before


@pytest.mark.slow
def test_overview(app, runs):
    from routescope.dashboard.pages import overview

    summary, layers_view, fig, _alerts, msg, verdict = overview.update_overview(state("a"))
    run = rs.open_run(runs["a"])
    assert msg is None
    health = layers_view.children[0].figure  # one layers x metric view, one row per MoE layer
    assert list(health.data[0].y) == [f"L{layer}" for layer in run.moe_layers]
    assert texts(verdict).startswith("Doctor: ")
    assert rs.doctor_verdict(run.doctor())["headline"] in texts(verdict)
    assert traces_with_data(fig) == 4
    assert "complete" in texts(summary)
    assert run.manifest["model_type"] in texts(summary)


@pytest.mark.slow
def test_load_page_filters_are_bound_not_pasted(app, runs):
    from routescope.dashboard.pages import load

    phases, labels, lo, hi, steps, _marks, _layers, layer, *_values = load.load_controls(state("a"))
    assert {"label": "prefill", "value": "prefill"} in phases
    assert labels == [{"label": "domain", "value": "domain"}]
    assert steps == [lo, hi]
    heat, bars, co, _ranks, msg, note, _caption = load.update_load(
        state("a"), "prefill", "domain", "math", None, "share", layer
    )
    run = rs.open_run(runs["a"])
    expected = run.expert_load(where="phase = 'prefill' AND domain = 'math'")
    z = pd.DataFrame(heat.data[0].z).to_numpy()  # dead cells are left empty (NaN)
    assert abs(pd.DataFrame(z).sum().sum() - expected.groupby("layer")["share"].sum().sum()) < 1e-6
    assert bars.data[0].type == "bar" and len(bars.data[0].x) == run.num_experts(layer)
    assert traces_with_data(co) == 1
    assert "domain = math" in note
    # a hostile value is a value: no rows, no error, and the run is untouched
    heat, *_rest, msg, _note, _cap = load.update_load(
        state("a"), "all", "domain", "x' OR 1=1; DROP VIEW tokens; --", None, "lift", layer
    )
    assert "No token matches" in texts(msg)
    assert len(run.sql("SELECT * FROM tokens LIMIT 1")) == 1
    # a label column that is not in the manifest is refused before any SQL is built
    out = load.update_load(state("a"), "all", 'domain" = domain OR "x', "code", None, "lift", layer)
    assert "not a label of this run" in texts(out[4])


@pytest.mark.slow
def test_load_step_range_and_expert_details(app, runs):
    from routescope.dashboard.pages import load

    _, _, _lo, hi, *_ = load.load_controls(state("a"))
    heat, *_ = load.update_load(state("a"), "all", None, None, [hi, hi], "lift", None)
    assert heat.data[0].type == "heatmap" and len(heat.data[0].z) == len(rs.open_run(runs["a"]).moe_layers)
    click = {"points": [{"x": 1, "y": "L" + str(rs.open_run(runs["a"]).moe_layers[0])}]}
    detail = load.show_expert(state("a"), click, "all", None, None, None)
    text = texts(detail)
    assert "expert 1" in text and "Most frequent tokens" in text and "Chosen together with" in text
    assert load.show_expert(state("a"), None, "all", None, None, None).startswith("Click")


@pytest.mark.slow
def test_entanglement_specialization_tokens(app, runs):
    from routescope.dashboard.pages import entanglement, specialization, tokens

    _pairs, pair, _top = entanglement.entanglement_controls(state("a"))
    mi, trans, sankey, msg = entanglement.update_entanglement(state("a"), pair, 10)
    assert (
        msg is None
        and traces_with_data(mi) == 3
        and traces_with_data(trans) == 1
        and traces_with_data(sankey) == 1
    )
    bad = entanglement.update_entanglement(state("a"), "0-99", 10)
    assert "not consecutive MoE layers" in texts(bad[3])
    # the Sankey starts once the MI figure is answered, and again only for another run,
    # version or path count; the MI figure needs no pair, the transition heatmap says a bad one
    mi_again, mi_msg, ready = entanglement.mi_then_ready(state("a"))
    assert traces_with_data(mi_again) == 3 and mi_msg is None and ready == "0@None"
    bad_trans, bad_msg = entanglement.transition_figure(state("a"), "0-99")
    assert "not consecutive MoE layers" in texts(bad_msg) and not traces_with_data(bad_trans)
    with pytest.raises(PreventUpdate):
        entanglement.pathways_when_ready(None, 10, state("a"), None)  # the figures are not in yet
    sankey_again, drawn_for = entanglement.pathways_when_ready(ready, 10, state("a"), None)
    assert traces_with_data(sankey_again) == 1 and drawn_for == "0@None|10"
    with pytest.raises(PreventUpdate):
        entanglement.pathways_when_ready(ready, 10, state("a"), drawn_for)  # another pair only
    assert entanglement.pathways_when_ready(ready, 15, state("a"), drawn_for)[1] == "0@None|15"

    _label_opts, label, _layer_opts, layer, _lift = specialization.specialization_controls(state("a"))
    heat, msg, _caption = specialization.update_specialization(state("a"), label, layer)
    rep = specialization.update_repetition(state("a"))
    assert msg is None and traces_with_data(heat) == 1 and traces_with_data(rep) == 2

    _seq_opts, seq, _layer_opts, _layer, _start = tokens.tokens_controls(state("a"))
    lanes, _note, text, msg = tokens.update_tokens(state("a"), seq, 0)
    run = rs.open_run(runs["a"])
    assert msg is None and traces_with_data(lanes) == 1
    assert len(lanes.data[0].z) == len(run.moe_layers)
    assert ":0." in lanes.data[0].text[0][0]  # weights on hover
    assert len(text) == run.sql("SELECT count(*) AS n FROM tokens WHERE seq_id = ?", [seq])["n"][0]
    last = int(run.sql("SELECT max(seq_id) AS s FROM tokens")["s"][0])
    assert (
        f"of {run.sql('SELECT count(*) AS n FROM tokens WHERE seq_id = ?', [last])['n'][0]}"
        in (tokens.update_tokens(state("a"), seq, 0, last)[1])
    )
    assert "has no tokens" in texts(tokens.update_tokens(state("a"), seq, 0, 10**9)[3])


@pytest.mark.slow
def test_tokens_window_is_capped(app, runs, monkeypatch):
    from routescope.dashboard import queries
    from routescope.dashboard.pages import tokens

    monkeypatch.setattr(queries, "MAX_LANE_CELLS", 8 * 3)
    monkeypatch.setattr(queries, "MAX_LANE_TOKENS", 8)
    from routescope.dashboard.runs import get_registry

    get_registry().clear_cache()
    try:
        _lanes, note, text, _msg = tokens.update_tokens(state("a"), 0, 2)
        assert len(text) == 8 and "positions 2–9" in note
    finally:
        get_registry().clear_cache()


@pytest.mark.slow
def test_super_experts_page(app, runs):
    from routescope.dashboard.pages import super_experts

    scatter, listing, massive, msg = super_experts.update_super_experts(state("a"))
    assert "routescope super-experts --model" in texts(msg) and str(runs["a"]) in texts(msg)
    scatter, listing, massive, msg = super_experts.update_super_experts(state("b"))
    assert msg is None
    assert any(t.name == "Super Expert (rule met)" for t in scatter.data)
    assert traces_with_data(massive) == 3  # max, median, the 100 line
    assert "1 Super Expert" in texts(listing)


@pytest.mark.slow
def test_compare(app, runs):
    from routescope.dashboard.pages import compare

    opts_a, a, _opts_b, b = compare.compare_controls(state("a"))
    assert (a, b) == ("0", "1") and len(opts_a) == 6
    delta, bal, summary, _msg, style = compare.update_compare(state("a"), "0", "1")
    assert delta.data[0].type == "heatmap" and traces_with_data(bal) == 8
    assert style == {}
    for metric in ("cv", "max_violation", "balancedness", "norm_entropy"):
        assert metric in texts(summary)
    assert "changed state" in texts(summary)
    # router saturation and token agreement: a callback of their own, after the rest
    sat, sat_summary = compare.update_saturation(state("a"), "0", "1")
    assert traces_with_data(sat) == 3 and "tokens_matched" in texts(sat_summary)
    summary = sat_summary
    expected = rs.compare(runs["a"], runs["b"])
    assert list(sat.data[0].y) == pytest.approx(expected.saturation["saturation"].tolist())
    assert list(sat.data[2].y) == pytest.approx(expected.saturation["exact_match"].tolist())
    differs = expected.token_agreement["any_layer_differs"].iloc[0]
    assert f"{differs:.1%} have a different top-k set in at least one layer" in texts(summary)
    for matched in expected.saturation["tokens_matched"]:
        assert str(matched) in texts(summary)
    # the same run on both sides: guidance only, the figures hidden
    *_figs, tables, msg, style = compare.update_compare(state("a"), "0", "0")
    assert "same run" in texts(msg) and tables is None and style == {"display": "none"}
    out = compare.update_compare(state("a"), "0", "../../etc")
    assert "unknown run" in texts(out[3])
    assert compare.update_saturation(state("a"), "0", "0")[1] is None


@pytest.mark.slow
def test_router_saturation_does_not_hold_the_runs_that_other_pages_query(app, runs):
    """Saturation of two big runs takes minutes; it runs on connections of its own, so a page's
    query of either run (which takes that run's lock) does not wait for it, and vice versa."""
    import threading

    from routescope.dashboard.pages import compare
    from routescope.dashboard.runs import get_registry

    registry = get_registry()
    registry.clear_cache()
    compare.update_compare(state("a"), "0", "1")  # the page's first callback: runs open, summaries in
    held, release = threading.Event(), threading.Event()

    def hold_both() -> None:  # what a long query on both runs does to their locks
        with registry._slot("0").lock, registry._slot("1").lock:
            held.set()
            release.wait(60)

    holder = threading.Thread(target=hold_both, daemon=True)
    holder.start()
    held.wait(10)
    done: list = []
    worker = threading.Thread(target=lambda: done.append(compare.update_saturation(state("a"), "0", "1")))
    worker.start()
    worker.join(60)
    release.set()
    holder.join(10)
    assert done, "saturation waited for the runs' locks"
    sat, _summary = done[0]
    expected = rs.compare(runs["a"], runs["b"])
    assert list(sat.data[0].y) == pytest.approx(expected.saturation["saturation"].tolist())


@pytest.mark.slow
def test_unknown_run_key_is_refused(app):
    from routescope.dashboard.app import update_run_state
    from routescope.dashboard.pages import load, overview

    for key in ("9", "../run", "/etc/passwd", None, 0):
        out = overview.update_overview({"run": key})
        assert "unknown run" in texts(out[4])
        data, status, _disabled = update_run_state(key, 0)
        assert data is None and "unknown run" in texts(status)
    assert "unknown run" in texts(load.update_load({"run": "12"}, "all", None, None, None, "lift", 0)[4])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("missing", "no such directory"),
        ("notrun", "is not a routescope run"),
        ("empty", "holds no tokens"),
    ],
)
def test_bad_runs_show_a_page_message(app, name, expected):
    from routescope.dashboard.app import update_run_state
    from routescope.dashboard.pages import PAGES, load, overview

    data, status, _ = update_run_state(KEY[name], 0)
    assert expected in texts(status) or expected in texts(overview.update_overview(data or state(name))[4])
    assert expected in texts(load.update_load(state(name), "all", None, None, None, "lift", None)[4])
    assert len(PAGES) == 9


@pytest.mark.slow
def test_live_run_refreshes(app, runs):
    from dash import no_update

    from routescope.dashboard.app import update_run_state
    from routescope.dashboard.runs import get_registry

    data, status, disabled = update_run_state(KEY["live"], 0)
    assert disabled is False and "still recording" in texts(status)
    assert update_run_state(KEY["live"], 1, data)[0] is no_update  # nothing new: pages keep their figures
    before = get_registry().query(KEY["live"], "summary")["tokens"]
    # the recorder appends a part: the next refresh sees it
    extra = runs["live"] / "tokens" / "rank=0" / "part-09999.parquet"
    rows = pa.Table.from_pylist(
        [{"seq_id": 10_000, "pos": 0, "token_id": 1, "step": 99, "phase": "prefill", "domain": "code"}],
        schema=schema.schema_for("tokens", ("domain",)),
    )
    pq.write_table(rows, extra)
    manifest = json.loads((runs["live"] / "manifest.json").read_text())
    manifest["tokens"] += 1
    manifest["updated_at"] = "later"
    (runs["live"] / "manifest.json").write_text(json.dumps(manifest))
    data2, _, _ = update_run_state(KEY["live"], 2, data)
    assert data2["version"] != data["version"]
    assert get_registry().query(KEY["live"], "summary")["tokens"] == before + 1


@pytest.mark.slow
def test_filters_build_predicates_from_fixed_columns(runs):
    from routescope.dashboard.filters import FilterError, TokenFilter

    run = rs.open_run(runs["a"])
    pred, params = TokenFilter.from_inputs("decode", "domain", "code", [1, 3]).sql(run)
    assert pred == 'phase = ? AND "domain" = ? AND step >= ? AND step <= ?'
    assert params == ["decode", "code", 1, 3]
    assert TokenFilter.from_inputs("all", "", None, None).sql(run) == ("true", [])
    with pytest.raises(FilterError):
        TokenFilter(phase="prefill' OR '1").sql(run)
    with pytest.raises(FilterError):
        TokenFilter(label="nope", value="x").sql(run)


@pytest.mark.slow
def test_queries_are_cached_per_filter(app):
    from routescope.dashboard.filters import TokenFilter
    from routescope.dashboard.runs import get_registry

    registry = get_registry()
    first = registry.query("0", "expert_load", TokenFilter(phase="prefill"))
    assert registry.query("0", "expert_load", TokenFilter(phase="prefill")) is first
    assert registry.query("0", "expert_load", TokenFilter(phase="decode")) is not first


@pytest.mark.slow
def test_no_html_rendering_anywhere():
    """No HTML from strings; Markdown only in `components.table`, which escapes every cell
    (test_dashboard_browser checks that the browser shows each cell literally)."""
    for path in (REPO / "dashboard").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "dangerously_allow_html" not in text, path
        assert text.count("dcc.Markdown(") == (1 if path.name == "components.py" else 0), path
    from routescope.dashboard.components import md_cell

    assert md_cell("*a* | <b> [x](y) http://z") == r"\*a\* \| &lt;b\> \[x\]\(y\) http&#58;//z"


@pytest.mark.slow
def test_cli_bad_input_exits_2(runs, capsys):
    import argparse

    from routescope.dashboard.command import add_dashboard_arguments, dashboard_command

    parser = argparse.ArgumentParser()
    add_dashboard_arguments(parser)
    for name, expected in (
        ("missing", "no such directory"),
        ("notrun", "is not a routescope run"),
        ("empty", "holds no tokens"),
    ):
        assert dashboard_command(parser.parse_args([str(runs[name])])) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err
    assert dashboard_command(parser.parse_args([str(runs["a"]), "--port", "0"])) == 2
    assert parser.parse_args([str(runs["a"])]).host == "127.0.0.1"


@pytest.mark.slow
def test_label_values_and_tokens_stay_text_in_figures():
    from routescope import plots

    spec = pd.DataFrame(
        {
            "domain": ["<b>x</b>", "a&b"],
            "layer": [0, 0],
            "expert": [0, 0],
            "tokens": [3, 2],
            "share": [1.0, 1.0],
            "lift": [2.0, 2.0],
        }
    )
    fig = plots.specialization_heatmap(spec, "domain", 0)
    assert list(fig.data[0].y) == ["&lt;b&gt;x&lt;/b&gt;", "a&amp;b"]
    lanes = pd.DataFrame(
        {"pos": [0], "layer": [0], "token": ["<img src=x>"], "experts": [[1, 2]], "weights": [[0.6, 0.4]]}
    )
    fig = plots.expert_lanes(lanes, 4)
    assert "<img" not in fig.data[0].text[0][0] and "&lt;img" in fig.data[0].text[0][0]
    assert "<img" not in fig.layout.xaxis.ticktext[0]
