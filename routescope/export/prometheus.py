"""Prometheus endpoint for a recording in progress: expert token counters and balance gauges.

`RoutingExporter` is a recorder observer: the background writer hands it each finished
step's host tables (`rs.record(..., observers=[exporter])`, or `RoutingExporter(recorder)`),
so the model's forward never waits on it. It serves its own `CollectorRegistry` with
prometheus-client's HTTP server, on loopback unless told otherwise.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from routescope import schema

Tables = dict[str, dict[str, np.ndarray]]

# gauge name -> (help text, function of a layer's window counts L_e); SPEC section 4.1
BALANCE_GAUGES = {
    "cv": "population std / mean of expert loads over the window",
    "max_violation": "(max load - mean load) / mean load over the window (MaxVio)",
    "balancedness": "mean load / max load over the window (EPLB ratio)",
}


def balance_numbers(loads: np.ndarray) -> dict[str, float]:
    """cv, max_violation and balancedness of one layer's expert loads L_e (all experts, zeros too)."""
    loads = np.asarray(loads, dtype=np.float64)
    mean = loads.mean() if loads.size else 0.0
    if mean <= 0:
        return {}
    return {
        "cv": float(np.sqrt(((loads - mean) ** 2).mean()) / mean),
        "max_violation": float((loads.max() - mean) / mean),
        "balancedness": float(mean / loads.max()),
    }


class RoutingExporter:
    """Serve live routing metrics of one recording process over HTTP for Prometheus to scrape.

    - `routescope_expert_tokens_total{layer,expert}`: routing rows per expert (every slot counts),
      left out when `per_layer_only=True` to keep label cardinality at one series per layer;
    - `routescope_layer_tokens_total{layer}`, `routescope_tokens_total`, `routescope_steps_total`;
    - `routescope_layer_{cv,max_violation,balancedness}{layer}`: balance over the last `window`
      recorded steps (forwards), and `routescope_window_steps`.

    `port=0` picks a free port (read it back from `.port`). `start=False` builds the registry
    without serving it (call `start()` later, or scrape `.registry` yourself).
    """

    def __init__(
        self,
        recorder: Any = None,
        port: int = 9400,
        host: str = "127.0.0.1",
        *,
        per_layer_only: bool = False,
        window: int = 100,
        num_experts: dict[int, int] | None = None,
        start: bool = True,
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1 step, got {window}")
        self.recorder = recorder
        self.host = host
        self.port = port
        self.per_layer_only = per_layer_only
        self.window = window
        self._num_experts = {int(k): int(v) for k, v in (num_experts or {}).items()}
        self._lock = threading.Lock()
        self._totals: dict[int, np.ndarray] = {}
        self._recent: deque[dict[int, np.ndarray]] = deque(maxlen=window)
        self.steps = 0
        self.tokens = 0
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_Collector(self))
        if recorder is not None:
            recorder.observers.append(self)
        if start:
            self.start()

    # -- serving -----------------------------------------------------------------------
    def start(self) -> int:
        """Start the HTTP server (idempotent); returns the port it listens on."""
        if self._server is None:
            self._server, self._thread = start_http_server(self.port, addr=self.host, registry=self.registry)
            self.port = int(self._server.server_port)
        return self.port

    def stop(self) -> None:
        """Stop serving and detach from the recorder."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self.recorder is not None and self in self.recorder.observers:
            self.recorder.observers.remove(self)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def __enter__(self) -> RoutingExporter:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- observer (writer thread) ------------------------------------------------------
    def __call__(self, tables: Tables) -> None:
        self.observe(tables)

    def observe(self, tables: Tables) -> None:
        """Count one step's routing rows per (layer, expert)."""
        routing = tables.get(schema.ROUTING) or {}
        tokens = tables.get(schema.TOKENS) or {}
        layers = np.asarray(routing.get("layer", ()), dtype=np.int64)
        experts = np.asarray(routing.get("expert", ()), dtype=np.int64)
        step: dict[int, np.ndarray] = {}
        for layer in np.unique(layers):
            chosen = experts[layers == layer]
            width = max(self._experts_of(int(layer)), int(chosen.max()) + 1 if chosen.size else 0)
            step[int(layer)] = np.bincount(chosen, minlength=width)
        with self._lock:
            for layer, counts in step.items():
                total = self._totals.get(layer)
                if total is None or len(total) < len(counts):
                    grown = np.zeros(len(counts), dtype=np.int64)
                    if total is not None:
                        grown[: len(total)] = total
                    total = grown
                total[: len(counts)] += counts
                self._totals[layer] = total
            self._recent.append(step)
            self.steps += 1
            self.tokens += len(next(iter(tokens.values()), ()))

    def _experts_of(self, layer: int) -> int:
        if layer not in self._num_experts and self.recorder is not None:
            known = getattr(self.recorder, "manifest", {}).get("num_experts", {})
            if str(layer) in known:
                self._num_experts[layer] = int(known[str(layer)])
        return self._num_experts.get(layer, 0)

    # -- numbers -----------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """Totals per layer, window loads per layer and window step count (copies, under the lock)."""
        with self._lock:
            totals = {layer: counts.copy() for layer, counts in sorted(self._totals.items())}
            window: dict[int, np.ndarray] = {}
            for step in self._recent:
                for layer, counts in step.items():
                    acc = window.setdefault(layer, np.zeros(len(totals[layer]), dtype=np.int64))
                    if len(acc) < len(counts):
                        acc = np.concatenate([acc, np.zeros(len(counts) - len(acc), dtype=np.int64)])
                        window[layer] = acc
                    acc[: len(counts)] += counts
            for layer, acc in window.items():  # experts seen only outside the window still count as 0
                if len(acc) < len(totals[layer]):
                    window[layer] = np.concatenate(
                        [acc, np.zeros(len(totals[layer]) - len(acc), dtype=np.int64)]
                    )
            return {
                "totals": totals,
                "window": dict(sorted(window.items())),
                "window_steps": len(self._recent),
                "steps": self.steps,
                "tokens": self.tokens,
            }

    def metrics(self) -> Iterator[Metric]:
        snap = self.snapshot()
        steps = CounterMetricFamily("routescope_steps", "forward passes recorded")
        steps.add_metric([], snap["steps"])
        tokens = CounterMetricFamily("routescope_tokens", "tokens recorded (padding excluded)")
        tokens.add_metric([], snap["tokens"])
        window_steps = GaugeMetricFamily("routescope_window_steps", "steps in the balance window")
        window_steps.add_metric([], snap["window_steps"])
        yield from (steps, tokens, window_steps)

        layer_tokens = CounterMetricFamily(
            "routescope_layer_tokens", "routing rows per MoE layer (tokens x k)", labels=["layer"]
        )
        for layer, counts in snap["totals"].items():
            layer_tokens.add_metric([str(layer)], int(counts.sum()))
        yield layer_tokens

        if not self.per_layer_only:
            expert_tokens = CounterMetricFamily(
                "routescope_expert_tokens",
                "routing rows per expert (every top-k slot counts)",
                labels=["layer", "expert"],
            )
            for layer, counts in snap["totals"].items():
                for expert, count in enumerate(counts):
                    expert_tokens.add_metric([str(layer), str(expert)], int(count))
            yield expert_tokens

        gauges = {
            name: GaugeMetricFamily(
                f"routescope_layer_{name}", f"{text} ({self.window}-step window)", labels=["layer"]
            )
            for name, text in BALANCE_GAUGES.items()
        }
        for layer, loads in snap["window"].items():
            for name, value in balance_numbers(loads).items():
                gauges[name].add_metric([str(layer)], value)
        yield from gauges.values()


class _Collector:
    """Adapter the registry calls at scrape time (on the HTTP server's thread)."""

    def __init__(self, exporter: RoutingExporter) -> None:
        self._exporter = exporter

    def collect(self) -> Iterator[Metric]:
        return self._exporter.metrics()
