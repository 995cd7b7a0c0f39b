"""rs.watch: routing health of a model in training, merged into the logs the training already writes.

How it fits a Hugging Face `Trainer` (or any subclass: TRL's SFTTrainer, DPOTrainer, ...):

- `Trainer.log(logs)` appends to `state.log_history` and then calls the reporting callbacks
  (TensorBoard, W&B, MLflow, ...), before any user callback sees the logs, so a callback
  cannot add scalars that reach the reporters. `watch` therefore wraps `log` on the trainer
  instance, as TRL's trainers override `log()` to merge their own metrics: a training log
  (one with `loss`) gets the routing scalars of the tokens since the previous log, then goes
  on to the trainer's own `log` unchanged.
- A callback attaches the device counters (`capture.counters`) at `on_train_begin` and removes
  them at `on_train_end`, so no hook outlives `train()`. With `out_dir`, a recorder
  (`rs.record`) writes the tokens with their optimizer step, `train_step`, in the same window.
- The optimizer step of a forward is `state.global_step + 1` while it runs: every micro-batch
  of a gradient-accumulation cycle gets the step its gradients go into.
- Nothing here touches the loss: the counters read detached tensors from router hooks, and
  `output_router_logits` is never set (on many models it adds the aux loss to the loss).

A custom loop uses the same object without a Trainer: `with rs.watch(model) as w:` and
`metrics = w.end_step()` once per optimizer step (docs/training.md).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn
from transformers import TrainerCallback

from routescope.capture.recording.counters import RoutingCounters, is_training_forward
from routescope.capture.recording.recorder import Recorder
from routescope.training.alerts import AlertRules, Alerts
from routescope.training.scalars import PREFIX, Detail, check_detail, is_layer_key, routing_scalars

logger = logging.getLogger("routescope")


class Watch:
    """Routing scalars of a model in training; see `watch`."""

    def __init__(
        self,
        model: nn.Module,
        out_dir: str | Path | None = None,
        *,
        layers: Any = None,
        prefix: str = PREFIX,
        detail: Detail = "layers",
        alerts: AlertRules | None = None,
        step_source: Callable[[], int] | None = None,
        **record_options: Any,
    ) -> None:
        if record_options and out_dir is None:
            raise ValueError(
                f"rs.watch options {sorted(record_options)} are recording options: they need out_dir=; "
                "without it the allowed options are layers, prefix, detail and alerts"
            )
        self.detail = check_detail(detail)
        self.model = model
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.layers = layers
        self.prefix = prefix
        self.record_options = record_options
        self.counters: RoutingCounters | None = None
        self.recorder: Recorder | None = None
        self.alerts = Alerts(alerts or AlertRules(), prefix)
        self.train_step = 1  # custom loops: the optimizer step in progress (end_step advances it)
        self._step_source = step_source
        self.history: list[dict[str, float]] = []  # every read, with its train_step

    # -- lifetime ------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self.counters is not None

    def start(self) -> Watch:
        """Add the hooks (and open the recorder when `out_dir` is given)."""
        if self.active:
            return self
        counters = RoutingCounters(self.model, layers=self.layers).__enter__()
        try:
            if self.out_dir is not None:
                options = {"mode": "overwrite", **self.record_options}
                if self.layers is not None:
                    options.setdefault("layers", self.layers)
                recorder = Recorder(self.model, self.out_dir, train_step=self._recorded_step, **options)
                self.recorder = recorder.__enter__()
                self._note_alerts()
        except BaseException:
            counters.close()
            raise
        self.counters = counters
        return self

    def stop(self, exc: BaseException | None = None) -> None:
        """Remove every hook; close the recorder (the manifest gets the alerts)."""
        counters, self.counters = self.counters, None
        if counters is not None:
            counters.close()
        recorder, self.recorder = self.recorder, None
        if recorder is not None:
            self._note_alerts(recorder)
            recorder.__exit__(type(exc) if exc else None, exc, None)

    def _note_alerts(self, recorder: Recorder | None = None) -> None:
        """Put the alerts in the manifest: the recorder writes it at its next flush, so a
        dashboard or `report --follow` on the live run sees them. The key exists from the start,
        so the writer thread never sees the dict change size, only a value replaced."""
        recorder = recorder or self.recorder
        if recorder is not None:
            recorder.manifest["training"] = {"alerts": list(self.alerts.raised), "prefix": self.prefix}

    def __enter__(self) -> Watch:
        return self.start()

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.stop(exc)

    # -- steps and scalars -----------------------------------------------------------------
    def current_step(self) -> int:
        """The optimizer step (1-based) that the forwards running now contribute to."""
        return self._step_source() if self._step_source is not None else self.train_step

    def _recorded_step(self) -> int | None:
        return self.current_step() if is_training_forward(self.model) else None

    def scalars(self) -> dict[str, float]:
        """Read the device totals (one host sync, summed over ranks) and name the scalars.

        Empty when nothing was counted since the previous read. The alerts see every layer's
        values; with detail="brief" only the model aggregates are returned (and logged)."""
        if self.counters is None:
            return {}
        totals = self.counters.read()
        values = routing_scalars(totals, self.prefix)
        if values:
            step = self.current_step() - (1 if self._step_source is not None else 0)
            if self.alerts.check(values, step, totals.layers):  # the doctor's rules read the counts
                self._note_alerts()
            if self.detail == "brief":
                values = {k: v for k, v in values.items() if not is_layer_key(k, self.prefix)}
            self.history.append({"train_step": step, **values})
        return values

    def end_step(self, read: bool = True) -> dict[str, float] | None:
        """Custom loops: call once per optimizer step, after `optimizer.step()`.

        Returns the scalars of the tokens since the previous read, with `train_step`, the
        optimizer step that just ended (as in `history`); {} when nothing was counted since
        then. read=False only advances the step, so the next read covers several steps, and
        returns None."""
        step = self.train_step
        values = self.scalars() if read else None
        self.train_step += 1
        return {"train_step": step, **values} if values else values


class _WatchCallback(TrainerCallback):
    """Attach the counters for the length of `train()`."""

    def __init__(self, watch: Watch) -> None:
        self.watch = watch

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.watch.start()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.watch.stop()


def _is_trainer(target: Any) -> bool:
    return all(hasattr(target, name) for name in ("log", "add_callback", "state", "model"))


def watch(target: Any, out_dir: str | Path | None = None, **options: Any) -> Watch:
    """Routing health per logged step of a transformers `Trainer` (or subclass), or of a model.

    With a trainer: every training log (each `logging_steps`) gets, for each MoE layer `l`,
    `routing/layer_{l}/{cv,max_violation,norm_entropy,dead_fraction,gini,aux_loss,z_loss}`
    (detail="layers", the default), and the model aggregates `routing/aux_loss`,
    `routing/z_loss` (per forward, averaged over the window's forwards: what the model adds to
    its loss; TRL's `aux_loss`), `routing/{aux_loss,z_loss}_pooled`, `routing/max_violation_max`,
    `routing/dead_fraction_mean`, `routing/cv_mean`, `routing/norm_entropy_min`,
    `routing/gini_{mean,max}`, `routing/{cv,max_violation,gini}_{p50,p95}` (across layers),
    `routing/tokens`, over every micro-batch since the previous log, summed over ranks; they
    land in `trainer.state.log_history` and in every `report_to` reporter. detail="brief" logs
    the model aggregates only (a 48-layer model would otherwise log hundreds of series).
    Call before `trainer.train()`.

    With a model (custom loop): use the returned `Watch` as a context manager and call
    `end_step()` after each optimizer step; it returns the same scalars.

    `out_dir`: also record the tokens (all, or `sample=` a fraction of sequences) with an
    INTEGER `train_step` column, the optimizer step their gradients went into (1-based).
    Options: `layers`, `prefix` (default "routing"), `detail` ("layers" or "brief"), `alerts`
    (an `AlertRules`), and any
    `rs.record` option (`sample`, `weights`, `mode`, default 'overwrite', ...).
    """
    if isinstance(target, nn.Module):
        return Watch(target, out_dir, **options)
    if not _is_trainer(target):
        raise TypeError(
            f"rs.watch takes a transformers Trainer (or subclass) or a torch model, not {type(target).__name__}"
        )
    trainer = target
    # train() replaces trainer.state: read it at each call
    result = Watch(trainer.model, out_dir, step_source=lambda: trainer.state.global_step + 1, **options)
    trainer.add_callback(_WatchCallback(result))
    original = trainer.log

    @functools.wraps(original)
    def log(logs: dict[str, float], *args: Any, **kwargs: Any) -> Any:
        if result.active and "loss" in logs:  # a training log (evaluation logs carry eval_loss)
            logs.update(result.scalars())
        return original(logs, *args, **kwargs)

    trainer.log = log
    return result
