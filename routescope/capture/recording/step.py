"""One recorded forward pass: device tensors gathered by the hooks, turned into table columns.

The recorder fills a StepBuffers while the forward runs, moves it to the host in one go at
the end (non-blocking into pinned memory on CUDA), and submits a HostStep to the writer;
`HostStep.to_tables` runs on the writer thread.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from routescope import schema
from routescope.capture.recording.modality import modality_names
from routescope.capture.recording.rows import DeferredRows, as_tensor
from routescope.errors import RouteScopeError
from routescope.store.step_rollups import StepInput, step_counts


@dataclass
class StepBuffers:
    """Device-side state of the forward in flight (filled by hooks, no host sync)."""

    step: int
    phase: str
    seq_ids: np.ndarray  # [B] int64, host
    labels: dict[str, str | None]
    # [B, S]: the caller's on CUDA (the host copy copies them), else an int32 copy
    token_ids: torch.Tensor | None
    positions: torch.Tensor | None  # [B, S]; both None in a one-token decode step: `snap` holds them
    valid: torch.Tensor | DeferredRows  # [B, S] bool; a CPU decode step's made on the writer thread
    valid_flat: torch.Tensor | None  # [B*S] float32, for masked sums in the stats hooks (router_stats)
    # (layers, expert ids [L, tokens, k], weights [L, tokens, k]) per device and k (capture/recording/sink.py)
    groups: list[tuple[list[int], torch.Tensor, torch.Tensor]] = field(default_factory=list)
    stats: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    valid_by_device: dict[torch.device, torch.Tensor] = field(default_factory=dict)
    stack: str = schema.STACK_DECODER  # encoder or decoder
    modality: torch.Tensor | None = None  # [B, S] int8 codes (capture/recording/modality.py); None: all text
    train_step: int | None = None  # optimizer step (rs.watch); None: not a training run
    # a one-token decode step's [B, 3] token ids, positions, real token (decoded.py)
    snap: torch.Tensor | None = None

    @property
    def batch_tokens(self) -> int:
        return int(self.valid.numel())

    def valid_on(self, device: torch.device) -> torch.Tensor:
        """The token mask (float) on `device`: with a device_map, layers live on several devices."""
        if device == self.valid_flat.device:
            return self.valid_flat
        mask = self.valid_by_device.get(device)
        if mask is None:
            mask = self.valid_by_device[device] = self.valid_flat.to(device, non_blocking=True)
        return mask

    def finish(self, num_experts: dict[int, int], with_weights: bool, rollups: bool = False) -> HostStep:
        """Start the step's copy to the host: a fixed number of copies whatever the depth.
        `rollups`: its tables come with its rollup counts (store/step_rollups.py)."""
        layers, host, events, uniform = self._host_parts(with_weights)
        return HostStep(
            step=self.step,
            phase=self.phase,
            seq_ids=self.seq_ids,
            labels=self.labels,
            layers=layers,
            num_experts=num_experts,
            host=host,
            events=events,
            uniform=uniform,
            with_weights=with_weights,
            with_stats=bool(self.stats),
            stack=self.stack,
            train_step=self.train_step,
            rollups=rollups,
        )

    def _host_parts(self, with_weights: bool) -> tuple[list[int], dict[str, Any], list, bool]:
        """The step's layers, its host tensors (or rows the writer makes), the copies' events,
        and whether its layers are one stacked group."""
        step = self
        if (
            step.snap is not None
            and len(step.groups) == 1
            and isinstance(step.groups[0][1], DeferredRows)
            and not step.stats
            and step.snap.device.type == "cpu"
        ):  # the usual CPU decode step: every part on the host, or made by the writer
            layers, experts, weights = step.groups[0]
            host = {"snap": step.snap, "valid": step.valid, "experts": experts}
            if with_weights:
                host["weights"] = weights
            if step.modality is not None:
                host["modality"] = step.modality
            return layers, host, [], True
        tensors: dict[str, torch.Tensor] = (
            {"snap": step.snap}  # a one-token decode step's ids and positions, one copy already
            if step.snap is not None
            # the caller's ids: on a GPU the host copy is the copy; elsewhere a copy made at the
            # step's start (the caller may reuse its tensor); positions and valid are the recorder's own
            else {"token_ids": step.token_ids, "positions": step.positions}
        )
        # a CPU step's rows and valid mask that the writer makes (capture/recording/rows.py, decoded.py)
        kept: dict[str, DeferredRows] = {}
        (kept if isinstance(step.valid, DeferredRows) else tensors)["valid"] = step.valid
        if step.modality is not None:
            tensors["modality"] = step.modality
        uniform = len(step.groups) == 1  # one stacked tensor: every layer on one device, one k
        if uniform:
            layers, experts, weights = step.groups[0]
            columns = {"experts": experts, "weights": weights} if with_weights else {"experts": experts}
            for key, rows in columns.items():  # in the routers' dtypes: the host side casts
                (kept if isinstance(rows, DeferredRows) else tensors)[key] = rows
        else:
            by_layer = sorted(
                (
                    (layer, experts[i], weights[i])
                    for layers_, experts, weights in (
                        (g[0], as_tensor(g[1]), as_tensor(g[2])) for g in step.groups
                    )
                    for i, layer in enumerate(layers_)
                ),
                key=lambda item: item[0],
            )
            layers = [layer for layer, _, _ in by_layer]
            for i, (_, experts, weights) in enumerate(by_layer):
                tensors[f"experts{i}"] = experts
                if with_weights:
                    tensors[f"weights{i}"] = weights
        for i, layer in enumerate(layers if step.stats else ()):
            if layer in step.stats:
                prob_sum, entropy, margin = step.stats[layer]
                tensors.update({f"prob_sum{i}": prob_sum, f"entropy{i}": entropy, f"margin{i}": margin})
        host, events = to_host(tensors)
        if kept:
            host = {**host, **kept}
        return layers, host, events, uniform


def copy_ids(ids: torch.Tensor | None, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    """A step's token ids (-1 for an embeddings input), copied now: the caller may reuse its
    tensor. Not on CUDA, where the host copy is the copy; on a CPU to int32, at the step's
    start (after the graph ran, the first op of a step costs three times as much)."""
    token_ids = ids if ids is not None else torch.full(shape, -1, device=device)
    if token_ids.device.type == "cuda":
        return token_ids
    return token_ids.to(torch.int32, copy=True)  # integer ids never carry a gradient


def to_host(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[torch.cuda.Event]]:
    """Copy device tensors to the host without blocking; the events mark when they are there.

    Tensors are grouped by device (a `device_map` spreads layers over several GPUs): each
    CUDA device gets its copies and one event on its own current stream.
    """
    for value in tensors.values():  # a loop, not all(...): this runs once per decode step
        if value.device.type != "cpu" or value.requires_grad:
            break
    else:
        return tensors, []  # the usual CPU step: the host tensors already (no copy, no event)
    host: dict[str, torch.Tensor] = {}
    by_device: dict[torch.device, list[str]] = {}
    for key, value in tensors.items():
        by_device.setdefault(value.device, []).append(key)
    events = []
    for device, keys in by_device.items():
        if device.type == "cpu":  # the usual CPU step: kept as they are, no call per tensor
            host.update({k: tensors[k].detach() if tensors[k].requires_grad else tensors[k] for k in keys})
            continue
        if device.type != "cuda":
            host.update({k: _on_host(tensors[k]) for k in keys})
            continue
        with torch.cuda.device(device):
            for key in keys:
                value = tensors[key]
                buffer = torch.empty(value.shape, dtype=value.dtype, device="cpu", pin_memory=True)
                buffer.copy_(value, non_blocking=True)
                host[key] = buffer
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            events.append(event)
    return host, events


def _on_host(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor of a device without streams (CPU, MPS, XPU...) on the host: CPU ones as they are."""
    if tensor.device.type == "cpu":
        return tensor.detach() if tensor.requires_grad else tensor
    return tensor.detach().to("cpu")


def host_numpy(tensor: torch.Tensor | DeferredRows) -> np.ndarray:
    """A host tensor as numpy, on the writer thread: a step's expert ids and weights come in
    the router's dtypes (int64, bfloat16...), which numpy has or float32 holds exactly, and
    a CPU step's rows that the writer makes are made here (capture/recording/rows.py)."""
    if isinstance(tensor, DeferredRows):
        tensor = tensor.stack()
    if tensor.dtype == torch.bfloat16:
        return tensor.float().numpy()
    return tensor.numpy()


def host_arrays(host: dict[str, Any], made: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """A step's host tensors as numpy (`made`: those made already), a decode step's `snap`
    split into its token ids and positions."""
    h = {k: made[k] if made and k in made else host_numpy(v) for k, v in host.items()}
    snap = h.pop("snap", None)
    if snap is not None:
        h["token_ids"], h["positions"] = snap[:, :1], snap[:, 1:2]
    return h


@dataclass
class HostStep:
    """A finished step on its way to disk. Layers share k and token count (`uniform`) or not."""

    step: int
    phase: str
    seq_ids: np.ndarray
    labels: dict[str, str | None]
    layers: list[int]
    num_experts: dict[int, int]
    host: dict[str, torch.Tensor | DeferredRows]  # DeferredRows: made by `host_numpy`, on the writer thread
    events: list[torch.cuda.Event]
    uniform: bool
    with_weights: bool
    with_stats: bool
    stack: str = schema.STACK_DECODER
    train_step: int | None = None
    on_error: Callable[[int, BaseException], None] | None = None  # set: a failure loses this step only
    rollups: bool = False  # count the step's rollup cells with its tables (`rollup_counts`)
    # set by to_tables when `rollups`: the writer sums them into the part's rollup rows
    rollup_counts: list[StepInput] | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        """Host bytes this step holds until the writer has turned it into tables."""
        size = 0
        for t in self.host.values():  # a loop, not sum(...): this runs once per decode step
            size += t.nbytes if isinstance(t, DeferredRows) else t.numel() * t.element_size()
        return size

    def to_tables(self) -> dict[str, dict[str, np.ndarray]]:
        """The step's rows (on the writer thread). With `on_error`, a step whose rows cannot be
        made is reported there and gives no tables; the writer goes on with the next step."""
        if self.on_error is None:
            return self._tables()
        try:
            return self._tables()
        except Exception as error:
            self.on_error(self.step, error)
            return {}

    def _tables(self) -> dict[str, dict[str, np.ndarray]]:
        for event in self.events:
            event.synchronize()
        h = host_arrays(self.host)
        seq_len = h["valid"].shape[1]
        keep = np.flatnonzero(h["valid"].reshape(-1))
        n = len(keep)
        seq = np.repeat(self.seq_ids.astype(np.int64), seq_len)[keep]
        pos = h["positions"].reshape(-1)[keep].astype(np.int32)
        tokens = {
            "seq_id": seq,
            "pos": pos,
            "token_id": h["token_ids"].reshape(-1)[keep].astype(np.int32),
            "step": np.full(n, self.step, dtype=np.int32),
            "phase": np.full(n, self.phase, dtype=object),
            "modality": (
                modality_names(h["modality"].reshape(-1)[keep])
                if "modality" in h
                else np.full(n, schema.TOKEN_EXTRA_DEFAULTS["modality"], dtype=object)
            ),
            "stack": np.full(n, self.stack, dtype=object),
        }
        if self.train_step is not None:
            tokens[schema.TRAIN_STEP] = np.full(n, self.train_step, dtype=np.int32)
        for label, value in self.labels.items():
            tokens[label] = np.full(n, value, dtype=object)
        per_layer = [self._layer_arrays(h, i, keep) for i in range(len(self.layers))]
        tables: dict[str, dict[str, np.ndarray]] = {schema.TOKENS: tokens}
        tables[schema.ROUTING] = self._routing(per_layer, seq, pos)
        if self.with_stats:
            tables.update(self._stats(h, per_layer, keep, seq, pos))
        if self.rollups:
            codes = h["modality"].reshape(-1)[keep] if "modality" in h else None
            self.rollup_counts = [step_counts(tokens, self.layers, [e for e, _ in per_layer], codes)]
        return tables

    def _layer_arrays(self, h: dict[str, np.ndarray], i: int, keep: np.ndarray) -> tuple[np.ndarray, ...]:
        if self.uniform:
            experts, weights = h["experts"][i], h["weights"][i] if self.with_weights else None
        else:
            experts, weights = h[f"experts{i}"], h.get(f"weights{i}")
        return experts[keep], (weights[keep] if weights is not None else None)

    def _routing(self, per_layer: list, seq: np.ndarray, pos: np.ndarray) -> dict[str, np.ndarray]:
        n = len(seq)
        ks = [experts.shape[1] for experts, _ in per_layer]
        row_width = sum(ks)  # routing rows per token, all layers
        # token-major order (seq_id, pos, layer, slot): the key columns compress to runs
        experts = np.concatenate([e.astype(np.int16) for e, _ in per_layer], axis=1)
        if experts.size and experts.min() < 0:  # a compiled graph left a layer unwritten (capture.compiled)
            raise RouteScopeError(
                "a compiled forward did not write every recorded MoE layer's choice: a graph compiled "
                "without routescope's hooks ran (call torch._dynamo.reset() before record() to rule that "
                "out), or the compiled model skipped a MoE layer; record the uncompiled model to compare"
            )
        columns = {
            "seq_id": np.repeat(seq, row_width),
            "pos": np.repeat(pos, row_width),
            "layer": np.tile(np.repeat(np.array(self.layers, dtype=np.int16), ks), n),
            "slot": np.tile(np.concatenate([np.arange(k, dtype=np.int8) for k in ks]), n),
            "expert": experts.reshape(-1),
        }
        if self.with_weights:
            weights = np.concatenate([w.astype(np.float32) for _, w in per_layer], axis=1)
            columns["weight"] = weights.reshape(-1)
        return columns

    def _stats(self, h: dict, per_layer: list, keep: np.ndarray, seq: np.ndarray, pos: np.ndarray) -> dict:
        stats: dict[str, list[np.ndarray]] = {c: [] for c in schema.ROUTER_STATS_COLUMNS}
        rtok: dict[str, list[np.ndarray]] = {c: [] for c in schema.ROUTER_TOKENS_COLUMNS}
        for i, layer in enumerate(self.layers):
            if f"prob_sum{i}" not in h:
                continue
            num_experts = self.num_experts[layer]
            prob_sum = h[f"prob_sum{i}"].astype(np.float64)
            stats["step"].append(np.full(num_experts, self.step, dtype=np.int32))
            stats["layer"].append(np.full(num_experts, layer, dtype=np.int16))
            stats["expert"].append(np.arange(num_experts, dtype=np.int16))
            stats["prob_sum"].append(prob_sum[:num_experts])
            counts = np.bincount(per_layer[i][0].reshape(-1).astype(np.int64), minlength=num_experts)
            stats["tokens"].append(counts[:num_experts].astype(np.int64))
            rtok["seq_id"].append(seq)
            rtok["pos"].append(pos)
            rtok["layer"].append(np.full(len(seq), layer, dtype=np.int16))
            rtok["entropy"].append(h[f"entropy{i}"][keep].astype(np.float32))
            rtok["margin"].append(h[f"margin{i}"][keep].astype(np.float32))
        if not stats["step"]:
            return {}
        return {
            schema.ROUTER_STATS: {c: np.concatenate(v) for c, v in stats.items()},
            schema.ROUTER_TOKENS: {c: np.concatenate(v) for c, v in rtok.items()},
        }
