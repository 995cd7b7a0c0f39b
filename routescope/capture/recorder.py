"""rs.record: hooks on a model's routers that stream every routing decision to a run directory.

The recorder adds a pre-hook and a hook on the model itself (a forward pass starts and ends
there) and one hook per MoE layer (from `discovery.find_routers`). Layer hooks only keep
detached device tensors; at the end of each forward the step goes to the host in one copy
and on to the background writer (`store.writer`).
"""

from __future__ import annotations

import inspect
import math
import shutil
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from routescope import schema
from routescope.capture.discovery import LogitsSite, RouterSite, find_logits_sites, find_routers, text_config
from routescope.capture.step import HostStep, StepBuffers, to_host
from routescope.errors import RouteScopeError
from routescope.store.layout import list_tables, table_dir
from routescope.store.manifest import MANIFEST_NAME, read_manifest, write_manifest
from routescope.store.writer import PartWriter

MODES = ("create", "overwrite", "append")
# Sequence ids of rank R start at R << SEQ_ID_RANK_SHIFT, so ranks never collide.
SEQ_ID_RANK_SHIFT = 40


class RunExistsError(RouteScopeError, FileExistsError):
    """The output directory already holds a run and neither overwrite nor append was asked."""


def check_labels(labels: dict[str, Any]) -> dict[str, str | None]:
    """Label names must be identifiers and not clash with a column; values become strings."""
    checked: dict[str, str | None] = {}
    for name, value in labels.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"label name {name!r} is not allowed: use a Python identifier such as 'domain'")
        if name in schema.RESERVED_LABELS or name.lower() in schema.RESERVED_LABELS:
            allowed = "any identifier except " + ", ".join(sorted(schema.RESERVED_LABELS))
            raise ValueError(
                f"label name {name!r} is reserved (a column of the run tables); allowed: {allowed}"
            )
        checked[name] = None if value is None else str(value)
    return checked


class Recorder:
    """Context manager returned by `routescope.record`; see its docstring."""

    def __init__(
        self,
        model: nn.Module,
        out_dir: str | Path,
        labels: dict[str, Any] | None = None,
        router_stats: bool = False,
        *,
        mode: str = "create",
        weights: bool = True,
        rows_per_part: int = 4_000_000,
        flush_seconds: float = 10.0,
        max_pending: int = 8,
        rank: int | None = None,
        world_size: int | None = None,
        handle_sigterm: bool = True,
        observers: Any = (),
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not allowed; use one of {', '.join(MODES)}")
        self.model = model
        self.out_dir = Path(out_dir)
        self.router_stats = router_stats
        self.mode = mode
        self.with_weights = weights
        self.rows_per_part = rows_per_part
        self.flush_seconds = flush_seconds
        self.max_pending = max_pending
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        self.handle_sigterm = handle_sigterm
        self.observers: list[Any] = list(observers)
        self._previous_sigterm: Any = None
        self._labels = check_labels(labels or {})
        self._label_names: list[str] = list(self._labels)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._step: StepBuffers | None = None
        self._depth = 0
        self._last_prefill_ids: np.ndarray | None = None
        self._ignored_calls = 0
        self._manifest_lock = threading.Lock()
        self.sites: list[RouterSite] = []
        self.steps = 0
        self.writer: PartWriter | None = None
        self.manifest: dict[str, Any] = {}

    # -- public ------------------------------------------------------------------------
    def set_labels(self, **labels: Any) -> None:
        """Labels for the forwards that follow (earlier forwards keep theirs)."""
        checked = check_labels(labels)
        with self._manifest_lock:
            self._labels.update(checked)
            for name in checked:
                if name not in self._label_names:
                    self._label_names.append(name)

    @property
    def labels(self) -> dict[str, str | None]:
        return dict(self._labels)

    @property
    def tokens(self) -> int:
        """Tokens written to disk so far (flushed parts)."""
        return self.writer.tokens_written + self._tokens_before if self.writer else 0

    def flush(self) -> None:
        """Write every finished step to disk now and update the manifest."""
        if self.writer is not None:
            self.writer.flush()

    # -- context manager ---------------------------------------------------------------
    def __enter__(self) -> Recorder:
        self.sites = find_routers(self.model)
        self._prepare_directory()
        self.writer = PartWriter(
            self.out_dir,
            rank=self.rank,
            rows_per_part=self.rows_per_part,
            flush_seconds=self.flush_seconds,
            max_pending=self.max_pending,
            on_flush=self._on_flush,
            observers=self.observers,
        )
        try:
            self._add_hooks()
        except BaseException:
            self._remove_hooks()
            self.writer.close()
            raise
        self._install_sigterm_handler()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        self._remove_hooks()
        self._restore_sigterm_handler()
        self._step = None
        writer_error: BaseException | None = None
        try:
            if self.writer is not None:
                self.writer.close()
        except RouteScopeError as error:
            writer_error = error
        clean = exc_type is None and writer_error is None
        self._write_manifest(complete=clean)
        if self._ignored_calls:
            warnings.warn(
                f"routescope: {self._ignored_calls} router calls ran outside a forward of the recorded "
                "model and were not recorded (call the model you passed to record())",
                stacklevel=2,
            )
        if writer_error is not None and exc_type is None:
            raise writer_error

    # -- SIGTERM: a job scheduler's stop should still leave a readable run ---------------
    def _install_sigterm_handler(self) -> None:
        if not self.handle_sigterm or threading.current_thread() is not threading.main_thread():
            return
        self._previous_sigterm = signal.getsignal(signal.SIGTERM)
        if self._previous_sigterm not in (signal.SIG_DFL, None):
            return  # the program handles SIGTERM itself; leave it be

        def on_sigterm(signum: int, frame: Any) -> None:
            raise SystemExit(128 + signum)  # unwinds through __exit__: flush, manifest

        signal.signal(signal.SIGTERM, on_sigterm)

    def _restore_sigterm_handler(self) -> None:
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None

    # -- directory and manifest --------------------------------------------------------
    def _prepare_directory(self) -> None:
        manifest_path = self.out_dir / self._manifest_name
        self._tokens_before = 0
        self._step_offset = 0
        self._next_seq_id = self.rank << SEQ_ID_RANK_SHIFT
        if manifest_path.exists() or self._own_parts_exist():
            if self.mode == "create":
                raise RunExistsError(
                    f"{self.out_dir} already holds a routescope run; pass mode='overwrite' to replace it "
                    "or mode='append' to add to it (CLI: --overwrite / --append)"
                )
            if self.mode == "overwrite":
                self._remove_run_files()
            else:
                self._load_for_append(manifest_path)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.manifest = self._base_manifest()
        self._write_manifest(complete=False)

    def _own_parts_exist(self) -> bool:
        # Only this rank's parts: other ranks of the same run may already have flushed theirs.
        return self.out_dir.is_dir() and any(
            any(table_dir(self.out_dir, table, self.rank).glob("part-*.parquet"))
            for table in list_tables(self.out_dir)
        )

    @property
    def _manifest_name(self) -> str:
        return MANIFEST_NAME if self.rank == 0 else f"manifest.rank={self.rank}.json"

    def _remove_run_files(self) -> None:
        # A single process replaces every rank of an earlier multi-rank run; a rank of a
        # multi-rank run removes only its own files (the others may be writing already).
        ranks = "rank=*" if self.world_size == 1 else f"rank={self.rank}"
        for table in schema.TABLE_COLUMNS:
            for path in (self.out_dir / table).glob(ranks):
                shutil.rmtree(path, ignore_errors=True)
        (self.out_dir / self._manifest_name).unlink(missing_ok=True)
        if self.world_size == 1:
            for fragment in self.out_dir.glob("manifest.rank=*.json"):
                fragment.unlink(missing_ok=True)

    def _load_for_append(self, manifest_path: Path) -> None:
        old = read_manifest(self.out_dir) if self.rank == 0 else _read_json(manifest_path)
        layers = [site.layer for site in self.sites]
        if [int(x) for x in old.get("moe_layers", [])] != layers:
            raise RouteScopeError(
                f"cannot append to {self.out_dir}: it was recorded with MoE layers {old.get('moe_layers')}, "
                f"this model has {layers}"
            )
        self._tokens_before = int(old.get("tokens", 0))
        self._step_offset = int(old.get("steps", 0))
        self._next_seq_id = int(old.get("next_seq_id", self._next_seq_id))
        for name in old.get("labels", []):
            if name not in self._label_names:
                self._label_names.append(name)
        self._created_at = old.get("created_at")

    def _base_manifest(self) -> dict[str, Any]:
        config = text_config(self.model)
        import transformers

        import routescope

        return {
            "format_version": schema.FORMAT_VERSION,
            "model_type": getattr(config, "model_type", type(self.model).__name__),
            "model_name": getattr(config, "_name_or_path", "") or type(self.model).__name__,
            "model_class": type(self.model).__name__,
            "num_hidden_layers": int(getattr(config, "num_hidden_layers", 0) or 0),
            "moe_layers": [site.layer for site in self.sites],
            "num_experts": {str(site.layer): site.num_experts for site in self.sites},
            "top_k": {str(site.layer): site.top_k for site in self.sites},
            "router_kind": {str(site.layer): site.adapter.name for site in self.sites},
            "router_modules": {str(site.layer): site.name for site in self.sites},
            "num_shared_experts": _shared_experts(config),
            "weights_recorded": self.with_weights,
            "router_stats": self.router_stats,
            "rank": self.rank,
            "world_size": self.world_size,
            "device": str(_model_device(self.model)),
            "dtype": str(_model_dtype(self.model)),
            "versions": {
                "routescope": routescope.__version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            },
            "created_at": getattr(self, "_created_at", None) or _now(),
        }

    def _on_flush(self, tokens_written: int) -> None:
        self._write_manifest(complete=False)

    def _write_manifest(self, complete: bool) -> None:
        with self._manifest_lock:
            tokens = self._tokens_before + (self.writer.tokens_written if self.writer else 0)
            self.manifest.update(
                labels=list(self._label_names),
                tokens=tokens,
                steps=self._step_offset + self.steps,
                next_seq_id=self._next_seq_id,
                complete=complete,
                updated_at=_now(),
            )
            write_manifest(self.out_dir, self.manifest, name=self._manifest_name)

    # -- hooks -------------------------------------------------------------------------
    def _add_hooks(self) -> None:
        self._forward_signature = inspect.signature(self.model.forward)
        self._handles.append(self.model.register_forward_pre_hook(self._begin_step, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._end_step, always_call=True))
        for site in self.sites:
            if site.adapter.hook == "pre":
                hook = self._make_pre_hook(site)
                self._handles.append(site.module.register_forward_pre_hook(hook, with_kwargs=True))
            else:
                hook = self._make_post_hook(site)
                self._handles.append(site.module.register_forward_hook(hook, with_kwargs=True))
        if self.router_stats:
            layers = [site.layer for site in self.sites]
            logits_sites = find_logits_sites(self.model, layers)
            missing = sorted(set(layers) - {s.layer for s in logits_sites})
            if missing:
                raise RouteScopeError(
                    f"router_stats=True needs router logits, but none are declared for layers {missing} "
                    f"of {type(self.model).__name__}"
                )
            for logits_site in logits_sites:
                hook = self._make_logits_hook(logits_site)
                self._handles.append(logits_site.module.register_forward_hook(hook))

    def _remove_hooks(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def _make_pre_hook(self, site: RouterSite):
        extract, layer = site.adapter.extract, site.layer

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            step = self._step
            if step is None:
                self._ignored_calls += 1
                return
            indices, weights = extract(module, args, kwargs, None)
            step.routing[layer] = (indices.detach(), weights.detach())
            step.calls[layer] = step.calls.get(layer, 0) + 1

        return hook

    def _make_post_hook(self, site: RouterSite):
        extract, layer = site.adapter.extract, site.layer

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            step = self._step
            if step is None:
                self._ignored_calls += 1
                return
            indices, weights = extract(module, args, kwargs, output)
            step.routing[layer] = (indices.detach(), weights.detach())
            step.calls[layer] = step.calls.get(layer, 0) + 1

        return hook

    def _make_logits_hook(self, site: LogitsSite):
        layer, index = site.layer, site.index

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            step = self._step
            if step is None:
                return
            logits = output[index] if isinstance(output, (tuple, list)) else output
            logits = logits.detach().reshape(-1, logits.shape[-1]).float()
            if logits.shape[0] != step.valid_flat.shape[0]:
                return
            probs = logits.softmax(-1)
            prob_sum = (probs * step.valid_flat[:, None]).sum(0, dtype=torch.float64)
            entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1) / math.log(probs.shape[-1])
            top2 = probs.topk(min(2, probs.shape[-1]), dim=-1).values
            margin = top2[:, 0] - top2[:, -1] if top2.shape[-1] > 1 else top2[:, 0]
            step.stats[layer] = (prob_sum, entropy, margin)

        return hook

    # -- step bookkeeping --------------------------------------------------------------
    def _begin_step(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._depth += 1
        if self._depth > 1:
            return  # the model called itself: the outer call is the step
        self.writer.raise_if_failed()
        bound = self._forward_signature.bind_partial(*args, **kwargs).arguments
        inner = bound.get("kwargs", {})
        get = lambda name: bound.get(name, inner.get(name))  # noqa: E731
        input_ids, embeds, mask = get("input_ids"), get("inputs_embeds"), get("attention_mask")
        reference = input_ids if input_ids is not None else embeds
        if reference is None:
            self._step = None
            return
        batch, seq_len = reference.shape[0], reference.shape[1]
        device = reference.device
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            mask = mask.to(device)
            past = mask.shape[1] - seq_len
            valid = mask[:, past:] != 0
            positions = mask.long().cumsum(1)[:, past:] - 1
        else:
            past = _cache_length(get("past_key_values"))
            valid = torch.ones(batch, seq_len, dtype=torch.bool, device=device)
            positions = torch.arange(past, past + seq_len, device=device).expand(batch, seq_len)
        phase = schema.PHASE_DECODE if past > 0 else schema.PHASE_PREFILL
        seq_ids = self._seq_ids(phase, batch)
        token_ids = input_ids if input_ids is not None else torch.full((batch, seq_len), -1, device=device)
        with self._manifest_lock:
            labels = {name: self._labels.get(name) for name in self._label_names}
        self._step = StepBuffers(
            step=self._step_offset + self.steps,
            phase=phase,
            seq_ids=seq_ids,
            labels=labels,
            token_ids=token_ids.detach(),
            positions=positions,
            valid=valid,
            valid_flat=valid.reshape(-1).float(),
        )

    def _seq_ids(self, phase: str, batch: int) -> np.ndarray:
        last = self._last_prefill_ids
        if phase == schema.PHASE_DECODE and last is not None and len(last) == batch:
            return last
        ids = np.arange(self._next_seq_id, self._next_seq_id + batch, dtype=np.int64)
        self._next_seq_id += batch
        self._last_prefill_ids = ids
        return ids

    def _end_step(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._depth = max(0, self._depth - 1)
        if self._depth > 0:
            return
        step, self._step = self._step, None
        if step is None or output is None or not step.routing:
            return  # no step, the forward raised, or no MoE layer ran
        self.writer.submit(self._finish(step))
        self.steps += 1

    def _finish(self, step: StepBuffers) -> HostStep:
        layers = sorted(step.routing)
        twice = [layer for layer in layers if step.calls.get(layer, 0) > 1]
        if twice:
            raise RouteScopeError(f"MoE layers {twice} ran more than once in one forward; cannot record them")
        expected = step.batch_tokens
        pairs = [step.routing[layer] for layer in layers]
        for layer, (indices, _) in zip(layers, pairs, strict=True):
            if indices.shape[0] != expected:
                raise RouteScopeError(
                    f"layer {layer} routed {indices.shape[0]} tokens, but the forward had {expected} "
                    "(batch x sequence); this router layout is not supported yet"
                )
        tensors: dict[str, torch.Tensor] = {
            "token_ids": step.token_ids.to(torch.int32),
            "positions": step.positions.to(torch.int32),
            "valid": step.valid,
        }
        uniform = len({indices.shape for indices, _ in pairs}) == 1
        if uniform:
            tensors["experts"] = torch.stack([indices for indices, _ in pairs]).to(torch.int16)
            if self.with_weights:
                tensors["weights"] = torch.stack([weights for _, weights in pairs]).to(torch.float32)
        else:
            for i, (indices, weights) in enumerate(pairs):
                tensors[f"experts{i}"] = indices.to(torch.int16)
                if self.with_weights:
                    tensors[f"weights{i}"] = weights.to(torch.float32)
        for i, layer in enumerate(layers):
            if layer in step.stats:
                prob_sum, entropy, margin = step.stats[layer]
                tensors.update({f"prob_sum{i}": prob_sum, f"entropy{i}": entropy, f"margin{i}": margin})
        host, event = to_host(tensors)
        return HostStep(
            step=step.step,
            phase=step.phase,
            seq_ids=step.seq_ids,
            labels=step.labels,
            layers=layers,
            num_experts={site.layer: site.num_experts for site in self.sites},
            host=host,
            event=event,
            uniform=uniform,
            with_weights=self.with_weights,
            with_stats=bool(step.stats),
        )


def record(
    model: nn.Module,
    out_dir: str | Path,
    labels: dict[str, Any] | None = None,
    router_stats: bool = False,
    **options: Any,
) -> Recorder:
    """Record every routing decision of `model` into the run directory `out_dir`.

    Use as a context manager around plain forwards and `model.generate(...)`. On exit, also
    on an exception, every hook is removed, recorded steps are flushed and the manifest is
    written (`complete` is true only after a clean exit).

    Options: `mode` ('create' refuses an existing run, 'overwrite', 'append'); `weights`
    (False drops the combine weights, about 3x smaller); `rows_per_part`; `flush_seconds`
    (a part is written at least this often, so a live run is readable); `max_pending`
    (steps queued before the model waits for the disk); `rank`, `world_size`;
    `handle_sigterm` (default True: SIGTERM ends the block like an exception, so the
    recorded steps are flushed and the manifest says `complete: false`); `observers`
    (callables given each finished step's tables, dict of table -> column arrays, on the
    writer thread, never on the model's; e.g. `routescope.export.prometheus.RoutingExporter`).
    `router_stats=True` also records the router_stats and router_tokens tables.
    """
    return Recorder(model, out_dir, labels=labels, router_stats=router_stats, **options)


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None and torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(rank or 0), int(world_size or 1)


def _cache_length(cache: Any) -> int:
    if cache is None:
        return 0
    try:
        return int(cache.get_seq_length())
    except Exception:
        return 0


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _model_dtype(model: nn.Module) -> torch.dtype:
    try:
        return next(model.parameters()).dtype
    except StopIteration:
        return torch.float32


def _shared_experts(config: Any) -> int:
    for key in ("n_shared_experts", "num_shared_experts", "shared_expert_intermediate_size"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value if key != "shared_expert_intermediate_size" else 1
    return 0


def _read_json(path: Path) -> dict[str, Any]:
    import json

    return json.loads(path.read_text(encoding="utf-8"))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
