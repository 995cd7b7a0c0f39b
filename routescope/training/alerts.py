"""Routing alerts during training, by the doctor's rules: each is logged once as a warning
(logger "routescope") and kept in the list that rs.watch writes to the run's manifest
(`training.alerts`, shown on the dashboard's Overview).

The rules are `analysis.doctor_rules.judge_layer`, the ones `run.doctor()` applies to a
recorded run, with the same evidence bar: an expert is dead when a uniform router would have
missed it over the tokens seen with probability below the bar (counted since the first log,
so an expert dead from step 1 alerts as soon as there is evidence, and per window, so one that
dies later alerts too); hot experts and unbalanced or collapsed layers are judged per log
window. Training logs many windows, so the bar is spent over them: the n-th log tests at
alpha / (n (n + 1)), which sums to alpha over any number of logs. A clean run stays silent.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from routescope.analysis.doctor_rules import DoctorThresholds, judge_layer

logger = logging.getLogger("routescope")

_LAYER_KEY = re.compile(r"/layer_(\d+)/(\w+)$")
SERIOUS = ("warning", "critical")
WINDOW_FINDINGS = ("dead_expert", "hot_expert", "layer_collapse", "layer_imbalance")


@dataclass(frozen=True)
class AlertRules:
    """When to warn. `thresholds`: the doctor's rules and evidence bar (docs/doctor.md).
    Optional fixed rules on top, without an evidence bar: `max_violation` (a layer's hottest
    expert above (1 + this) times the mean load) and `dead_rise` (a layer's dead fraction above
    its first logged value by at least this much); both off by default. `enabled=False` turns
    alerts off."""

    thresholds: DoctorThresholds = field(default_factory=DoctorThresholds)
    max_violation: float | None = None
    dead_rise: float | None = None
    enabled: bool = True


class Alerts:
    """Checks each read against the rules; each (layer, expert, kind) warns once."""

    def __init__(self, rules: AlertRules, prefix: str) -> None:
        self.rules = rules
        self.prefix = prefix
        self.raised: list[dict[str, Any]] = []
        self._seen: set[tuple[int, int | None, str]] = set()
        self._first_dead: dict[int, float] = {}
        self._since_start: dict[int, np.ndarray] = {}  # routing slots per expert since the first log
        self._logs = 0

    def check(self, values: dict[str, float], train_step: int, totals: list[Any] | None = None) -> list[dict]:
        """New alerts from one log: `values` the scalars, `totals` the counters' LayerTotals of
        the window (layer, top_k, counts per expert), which the doctor's rules read."""
        if not self.rules.enabled:
            return []
        new = self._fixed_rules(values, train_step)
        if totals:
            new += self._doctor_rules(totals, train_step)
        return new

    def _doctor_rules(self, totals: list[Any], step: int) -> list[dict]:
        self._logs += 1
        n = self._logs
        th = dataclasses.replace(self.rules.thresholds, alpha=self.rules.thresholds.alpha / (n * (n + 1)))
        seen = [t for t in totals if t.tokens > 0]
        tests = sum(int(t.num_experts) for t in seen)
        new: list[dict] = []
        for t in seen:
            counts = np.asarray(t.counts, dtype=np.float64)
            total = self._since_start.get(t.layer)
            total = counts.copy() if total is None else total + counts
            self._since_start[t.layer] = total
            found = judge_layer(t.layer, total, t.top_k, th, tests, len(seen))
            found = [f for f in found if f["finding"] == "dead_expert"]
            found += [
                f
                for f in judge_layer(t.layer, counts, t.top_k, th, tests, len(seen))
                if f["finding"] in WINDOW_FINDINGS
            ]
            for f in found:
                if f["severity"] in SERIOUS:
                    new += self._raise_finding(f, step)
        return new

    def _raise_finding(self, f: dict[str, Any], step: int) -> list[dict]:
        key = (int(f["layer"]), f["expert"], f["finding"])
        if key in self._seen:
            return []
        self._seen.add(key)
        alert = {
            "layer": int(f["layer"]),
            "expert": f["expert"],
            "kind": f["finding"],
            "severity": f["severity"],
            "evidence": f["evidence"],
            "suggestion": f["suggestion"],
            "train_step": step,
            "text": ("" if f["expert"] is None else f"expert {f['expert']}: ") + f["evidence"],
        }
        self.raised.append(alert)
        logger.warning(
            "routescope: layer %d at train step %d: %s %s", alert["layer"], step, f["finding"], alert["text"]
        )
        return [alert]

    def _fixed_rules(self, values: dict[str, float], train_step: int) -> list[dict]:
        new = []
        for key, value in values.items():
            match = _LAYER_KEY.search(key)
            if match is None or not key.startswith(self.prefix + "/"):
                continue
            layer, metric = int(match.group(1)), match.group(2)
            if metric == "max_violation" and self.rules.max_violation is not None:
                if value > self.rules.max_violation:
                    new += self._raise(layer, "max_violation", value, self.rules.max_violation, train_step)
            elif metric == "dead_fraction" and self.rules.dead_rise is not None:
                first = self._first_dead.setdefault(layer, value)
                if value - first >= self.rules.dead_rise:
                    new += self._raise(layer, "dead_fraction_rise", value, first, train_step)
        return new

    def _raise(self, layer: int, kind: str, value: float, reference: float, step: int) -> list[dict]:
        if (layer, None, kind) in self._seen:
            return []
        self._seen.add((layer, None, kind))
        if kind == "max_violation":
            text = f"max_violation {value:.3f} passed {reference:.3f}"
        else:
            text = f"dead fraction rose from {reference:.3f} to {value:.3f}"
        alert = {"layer": layer, "kind": kind, "value": value, "reference": reference, "train_step": step}
        self.raised.append({**alert, "severity": "warning", "text": text})
        logger.warning("routescope: layer %d at train step %d: %s", layer, step, text)
        return [alert]
