"""Routing alerts during training: a layer whose dead fraction rises, or whose max_violation
passes a threshold, is logged once as a warning (logger "routescope") and kept in the list
that rs.watch writes to the run's manifest (`training.alerts`, shown on the dashboard's
Overview).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("routescope")

_LAYER_KEY = re.compile(r"/layer_(\d+)/(\w+)$")


@dataclass(frozen=True)
class AlertRules:
    """When to warn. `max_violation`: a layer's hottest expert above (1 + this) times the mean
    load; the default 1.0 is SPEC 4.2's hot-expert factor 2.0. `dead_rise`: a layer's dead
    fraction above its first logged value by at least this much (default: any rise).
    `enabled=False` turns alerts off."""

    max_violation: float | None = 1.0
    dead_rise: float | None = 1e-9
    enabled: bool = True


class Alerts:
    """Checks each read's scalars against the rules; each (layer, kind) warns once."""

    def __init__(self, rules: AlertRules, prefix: str) -> None:
        self.rules = rules
        self.prefix = prefix
        self.raised: list[dict[str, Any]] = []
        self._seen: set[tuple[int, str]] = set()
        self._first_dead: dict[int, float] = {}

    def check(self, values: dict[str, float], train_step: int) -> list[dict[str, Any]]:
        if not self.rules.enabled:
            return []
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
        if (layer, kind) in self._seen:
            return []
        self._seen.add((layer, kind))
        alert = {"layer": layer, "kind": kind, "value": value, "reference": reference, "train_step": step}
        self.raised.append(alert)
        if kind == "max_violation":
            text = f"max_violation {value:.3f} passed {reference:.3f}"
        else:
            text = f"dead fraction rose from {reference:.3f} to {value:.3f}"
        logger.warning("routescope: layer %d at train step %d: %s", layer, step, text)
        return [alert]
