"""Prometheus export: scrape the live endpoint over loopback and check it against the recorded run."""

from __future__ import annotations

import urllib.request

import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import routescope as rs
from routescope.export.prometheus import RoutingExporter, balance_numbers

WINDOW = 3


def scrape(url: str) -> dict[str, list]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def forwards(model, count: int) -> None:
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for i in range(count):
            ids = torch.randint(1, 128, (2, 5 + i), generator=generator)
            model(input_ids=ids, attention_mask=torch.ones_like(ids))


@pytest.mark.slow
def test_scrape_matches_recorded_run(tiny_model, tmp_path):
    model = tiny_model("mixtral")
    out = tmp_path / "run"
    with rs.record(model, out) as rec:
        exporter = RoutingExporter(rec, port=0, window=WINDOW)
        try:
            assert exporter.host == "127.0.0.1"
            forwards(model, 5)
            rec.flush()
            samples = scrape(f"http://127.0.0.1:{exporter.port}/metrics")
        finally:
            exporter.stop()
    assert exporter not in rec.observers

    with rs.open_run(out) as run:
        counts = run.sql("SELECT layer, expert, count(*) AS n FROM routing GROUP BY ALL ORDER BY ALL")
        scraped = {
            (int(s.labels["layer"]), int(s.labels["expert"])): s.value
            for s in samples["routescope_expert_tokens_total"]
        }
        experts = run.num_experts(run.moe_layers[0])
        assert len(scraped) == len(run.moe_layers) * experts  # every expert has a series, zeros too
        for row in counts.itertuples():
            assert scraped[(row.layer, row.expert)] == row.n
        assert sum(scraped.values()) == len(run.sql("SELECT 1 FROM routing"))
        assert samples["routescope_tokens_total"][0].value == run.manifest["tokens"]
        assert samples["routescope_steps_total"][0].value == 5

        # cv / max_violation / balancedness over the last WINDOW steps, from SQL
        window = run.sql(
            """SELECT r.layer, r.expert, count(*) AS n FROM routing r
               JOIN tokens t USING (seq_id, pos) WHERE t.step >= 5 - $w GROUP BY ALL""",
            {"w": WINDOW},
        )
        for layer in run.moe_layers:
            loads = np.zeros(run.num_experts(layer))
            part = window[window["layer"] == layer]
            loads[part["expert"].to_numpy()] = part["n"].to_numpy()
            expected = balance_numbers(loads)
            mean = loads.mean()
            assert expected["cv"] == pytest.approx(np.sqrt(((loads - mean) ** 2).mean()) / mean)
            for name in ("cv", "max_violation", "balancedness"):
                (sample,) = [
                    s for s in samples[f"routescope_layer_{name}"] if s.labels["layer"] == str(layer)
                ]
                assert sample.value == pytest.approx(expected[name], rel=1e-12)


@pytest.mark.slow
def test_per_layer_only_limits_cardinality(tiny_model, tmp_path):
    model = tiny_model("mixtral")
    with (
        rs.record(model, tmp_path / "run") as rec,
        RoutingExporter(rec, port=0, per_layer_only=True) as exporter,
    ):
        forwards(model, 2)
        rec.flush()
        samples = scrape(exporter.url)
    assert "routescope_expert_tokens_total" not in samples
    layers = {s.labels["layer"] for s in samples["routescope_layer_tokens_total"]}
    assert all(set(s.labels) == {"layer"} for name in samples for s in samples[name] if s.labels)
    assert layers == {"0", "1"}


def test_exporter_as_record_observer_without_server(tiny_model, tmp_path):
    model = tiny_model("mixtral")
    exporter = RoutingExporter(port=0, start=False, num_experts={0: 4, 1: 4})
    with rs.record(model, tmp_path / "run", observers=[exporter]) as rec:
        forwards(model, 1)
        rec.flush()
    snap = exporter.snapshot()
    assert exporter._server is None
    assert sorted(snap["totals"]) == [0, 1]
    assert snap["steps"] == 1 and snap["window_steps"] == 1


def test_bad_window():
    with pytest.raises(ValueError, match="window"):
        RoutingExporter(window=0, start=False)
