"""rs.record: a write on each of a model's routers that streams every routing decision to a run directory.

The recorder brackets each forward of the model itself (a step starts and ends there) and
adds one write per MoE layer (from `discovery.find_routers`): both as instance `forward`s in
an eager recording, hooks in a compiled one (capture/recording/wraps.py, sink.py). A
layer's write only hands its choice to the step (a kept reference in an eager decode step,
else a copy into the step's preallocated buffers, which a compiled graph writes too); at the
end of each forward the step goes to the host in one copy and on to the background writer
(`store.writer`). A step that fails (on this thread or the writer's) is lost alone: counted
in the manifest's `skipped` as `steps_failed`, its message in `step_errors`; the recording
goes on. Options: capture/recording/options.py.
"""

from __future__ import annotations

import inspect
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from routescope.capture import facts
from routescope.capture.discovery import RouterSite, find_logits_sites, find_routers, find_stacks
from routescope.capture.recording.batch import StepBatch
from routescope.capture.recording.compiled import check_compilable, drop_compiled_graphs, is_compiled, unwrap
from routescope.capture.recording.generation import GeneratePatch
from routescope.capture.recording.identity import SequenceTracker, bind_inputs
from routescope.capture.recording.labels import StepLabels
from routescope.capture.recording.modality import placeholder_ids, token_modality
from routescope.capture.recording.options import RecordOptions
from routescope.capture.recording.router_stats import logits_hook
from routescope.capture.recording.rows import DeferredRows
from routescope.capture.recording.sink import RouterWrites, RoutingSink
from routescope.capture.recording.skipped import Skipped
from routescope.capture.recording.step import StepBuffers, copy_ids
from routescope.capture.recording.wraps import StepBrackets
from routescope.errors import RouteScopeError
from routescope.store.remote import part_writer, run_directory, run_location
from routescope.store.rundir import RunExistsError as RunExistsError  # re-exported: rs.RunExistsError
from routescope.store.writer import PartWriter

# Sequence ids of rank R start at R << SEQ_ID_RANK_SHIFT, so ranks never collide.
SEQ_ID_RANK_SHIFT = 40
MAX_STEP_ERRORS = 10  # messages of failed steps kept in the manifest (all are counted)
# finished steps go to the writer in batches: this many steps or tokens, or this old (seconds)
BATCH_STEPS, BATCH_TOKENS, BATCH_SECONDS = 32, 8192, 1.0


class Recorder:
    """Context manager returned by `routescope.record`; see its docstring."""

    def __init__(
        self,
        model: nn.Module,
        out_dir: str | Path,
        labels: dict[str, Any] | None = None,
        router_stats: bool = False,
        options: RecordOptions | None = None,
        **kwargs: Any,
    ) -> None:
        options = RecordOptions.from_kwargs(**kwargs) if options is None else options.replace(**kwargs)
        self.options = options
        self.sample, self.seed = options.sample, options.seed
        self.only_layers = None if options.layers is None else list(options.layers)
        self.train_step = options.train_step  # rs.watch: () -> optimizer step (train_step); None: skip
        self.model = unwrap(model)  # torch.compile(model): hooks go on the model inside
        self._compiled_given = self.model is not model
        self._sink: RoutingSink | None = None  # every router hook writes here (capture/recording/sink.py)
        self.out_dir = run_location(out_dir, options.storage_options)  # a Path, or a URI (store/remote.py)
        self.router_stats = router_stats
        self.with_weights = options.weights
        self.rank, self.world_size = facts.rank_and_world(options.rank, options.world_size)
        self.observers: list[Any] = list(options.observers)  # by reference: RoutingExporter(recorder) adds
        self._previous_sigterm: Any = None
        self._labels = StepLabels(labels)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._routers: RouterWrites | None = None  # forward wraps or hooks on the routers (sink.py)
        self._brackets: StepBrackets | None = None  # the same on the model (and encoder): wraps.py
        self._step: StepBuffers | None = None
        self._depth = 0
        self._skipping = False  # in a forward train_step skipped
        self._compiled_step = False  # the step in flight may run a compiled graph
        self._pending: list[Any] = []  # finished steps not yet handed to the writer (a batch)
        self._pending_tokens, self._pending_since = 0, 0.0
        self._batch_seconds = min(BATCH_SECONDS, options.flush_seconds / 4)
        # The model thread takes only the labels' lock (never held during disk I/O, and only
        # after a change); the manifest lock serialises manifest writes (writer thread and exit).
        self._manifest_lock, self._failures_lock = threading.Lock(), threading.Lock()
        self.skipped = Skipped()
        self.step_errors: list[str] = []  # the first messages of failed steps (manifest)
        self._tracker = SequenceTracker(self._allocate_seq_ids, self.skipped, self.sample, self.seed)
        self._overhead = 0.0  # seconds the model's thread spent in routescope code
        self._forwards = 0  # outermost forwards seen
        self._empty_forwards = 0  # of those, forwards in which no MoE layer was recorded
        self._generate_patch: GeneratePatch | None = None
        self._identity: Any = None
        self.sites: list[RouterSite] = []
        self.steps = 0
        self.writer: PartWriter | None = None
        self.manifest: dict[str, Any] = {}

    # -- public ------------------------------------------------------------------------
    def set_labels(self, **labels: Any) -> None:
        """Labels for the forwards that follow (earlier forwards keep theirs)."""
        self._labels.set(**labels)

    @property
    def labels(self) -> dict[str, str | None]:
        return self._labels.values

    @property
    def tokens(self) -> int:
        """Tokens written to disk so far (flushed parts)."""
        return self.writer.tokens_written + self._tokens_before if self.writer else 0

    def flush(self) -> None:
        """Write every finished step to disk now and update the manifest."""
        if self.writer is not None:
            self._send()
            self.writer.flush()

    # -- context manager ---------------------------------------------------------------
    def __enter__(self) -> Recorder:
        if self._compiled_given or is_compiled(self.model):
            check_compilable(self.model, len(find_stacks(self.model)), self.router_stats)
            drop_compiled_graphs(self.model)  # refuses here when it cannot (capture.compiled)
        self.sites = find_routers(self.model)
        if self.only_layers is not None:
            found = [site.layer for site in self.sites]
            unknown = sorted(set(self.only_layers) - set(found))
            if unknown or not self.only_layers:
                raise ValueError(
                    f"layers={self.only_layers} is not allowed: this model's MoE layers are {found}"
                )
            self.sites = [site for site in self.sites if site.layer in self.only_layers]
        self._prepare_directory()  # takes the run's writer lock
        try:
            self.writer = part_writer(
                self.out_dir,
                rank=self.rank,
                rows_per_part=self.options.rows_per_part,
                flush_seconds=self.options.flush_seconds,
                max_pending=self.options.max_pending,
                max_pending_bytes=self.options.max_pending_bytes,
                rollups=self.options.rollups,
                on_flush=self._on_flush,
                observers=self.observers,
            )
        except BaseException:
            self._dir.close()
            raise
        try:
            self._add_hooks()
            self._patch_generate()
        except BaseException:
            self._remove_hooks()
            self.writer.close()
            self._dir.close()
            raise
        if self.options.handle_sigterm:  # a job scheduler's stop still leaves a readable run
            self._previous_sigterm = facts.install_sigterm_exit()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        self._remove_hooks()
        if self._generate_patch is not None:
            self._generate_patch.remove()
        facts.restore_sigterm(self._previous_sigterm)
        self._previous_sigterm = None
        self._step = None
        writer_error: BaseException | None = None
        try:
            self._tracker.release_all(self._submit_held)
            self._send()
        except RouteScopeError as error:
            writer_error = error
        try:
            if self.writer is not None:
                self.writer.close()
        except RouteScopeError as error:
            writer_error = writer_error or error
        if self.writer is not None and self.writer.dropped_steps:
            self.skipped.add("steps_lost_on_writer_error", self.writer.dropped_steps)
            self.skipped.add("tokens_lost_on_writer_error", self.writer.dropped_tokens)
        if self._forwards and self._empty_forwards == self._forwards:
            self.skipped.add("forwards_without_routing", self._empty_forwards)
        if self._brackets is not None and self._brackets.compiled[0]:  # torch.compile(model) in the block
            self.skipped.add("compiled_in_block_forwards", self._brackets.compiled[0])
        clean = exc_type is None and writer_error is None
        try:
            self._write_manifest(complete=clean)
        finally:
            self._dir.close()  # the lock goes after the last manifest write
        self._warn_skipped()
        if writer_error is not None:
            if exc_type is None:
                raise writer_error
            # the block raised too: its exception propagates, but the writer's is not hidden
            warnings.warn(f"routescope: {writer_error}", RuntimeWarning, stacklevel=2)

    def _warn_skipped(self) -> None:
        outside = self._sink.outside if self._sink is not None else 0
        self.skipped.warn(outside, self.step_errors[0] if self.step_errors else None)

    # -- directory and manifest (the rules live in store.rundir) -----------------------
    def _prepare_directory(self) -> None:
        self._dir = run_directory(self.out_dir, self.rank, self.world_size)
        start = self._dir.prepare(
            self.options.mode,
            [site.layer for site in self.sites],
            self.rank << SEQ_ID_RANK_SHIFT,
            wait=self.options.wait,
        )
        self._tokens_before, self._step_offset = start.tokens, start.steps
        self._next_seq_id = start.next_seq_id
        self._labels.add_names(start.labels)
        self._created_at = start.created_at
        try:
            self.manifest = self._base_manifest()
            self._write_manifest(complete=False)
        except BaseException:
            self._dir.close()
            raise

    def _base_manifest(self) -> dict[str, Any]:
        return facts.model_manifest(
            self.model,
            self.sites,
            weights_recorded=self.with_weights,
            sample=self.sample,
            sample_seed=self.seed if self.sample is not None else None,
            router_stats=self.router_stats,
            rank=self.rank,
            world_size=self.world_size,
            created_at=getattr(self, "_created_at", None) or facts.now(),
            options=self.options.manifest(),
        )

    def _on_flush(self, tokens_written: int) -> None:
        self._write_manifest(complete=False)

    def _write_manifest(self, complete: bool) -> None:
        label_names = self._labels.names
        with self._manifest_lock:
            tokens = self._tokens_before + (self.writer.tokens_written if self.writer else 0)
            self.manifest.update(
                labels=label_names,
                tokens=tokens,
                steps=self._step_offset + self.steps,
                next_seq_id=self._next_seq_id,
                skipped=dict(self.skipped.counts),
                step_errors=list(self.step_errors),
                overhead={
                    "seconds": round(self._overhead, 6),
                    "per_step_ms": round(1000 * self._overhead / self.steps, 4) if self.steps else None,
                    "what": "model-thread time in routescope's step bookkeeping and host copies (not the per-layer writes)",
                },
                complete=complete,
                updated_at=facts.now(),
            )
            self._dir.write_manifest(self.manifest)

    # -- hooks -------------------------------------------------------------------------
    def _add_hooks(self) -> None:
        # A step is one forward of a stack: the model, or an encoder-decoder's encoder and decoder apart.
        self._stacks = {id(stack.module): stack for stack in find_stacks(self.model)}
        self._signatures = {
            key: inspect.signature(stack.module.forward) for key, stack in self._stacks.items()
        }
        self._placeholder_ids = placeholder_ids(getattr(self.model, "config", None))
        # eager: one instance forward per stack and router (wraps.py); compiled, now or from
        # `model.compile()` or a compile_config `generate` inside the block on: step hooks
        compiled = self._compiled_given or is_compiled(self.model)
        stacks = [stack.module for stack in self._stacks.values()]
        self._brackets = StepBrackets(stacks, self._begin_step, self._end_step)
        self._brackets.attach(wrap=not compiled)
        self._sink = RoutingSink(self.sites)
        self._num_experts = {site.layer: site.num_experts for site in self.sites}
        self._routers = RouterWrites(self._sink, self.sites)
        self._routers.attach(compiled)
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
                hook = logits_hook(logits_site, lambda: self._step, self.skipped)
                self._handles.append(logits_site.module.register_forward_hook(hook))

    def _use_hooks(self) -> None:
        """Step hooks instead of forward wraps, and marked routers, before dynamo traces the
        model (compiled.py)."""
        if self._brackets is not None and self._brackets.wrapped:
            self._brackets.attach(wrap=False)
        if self._routers is not None and not self._routers.compiled:
            self._routers.attach(compiled=True)

    def _remove_hooks(self) -> None:
        for writes in (self._brackets, self._routers):
            if writes is not None:
                writes.remove()
        while self._handles:
            self._handles.pop().remove()
        if self._sink is not None:
            self._sink.close()

    # -- step bookkeeping --------------------------------------------------------------
    def _begin_step(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """A stack's forward starts (its step wrap or pre-hook): one call, timed (the manifest's overhead)."""
        started = time.perf_counter()
        try:
            if self._depth > 0:
                self._depth += 1
                return  # the model called itself: the outer call is the step
            self.writer.raise_if_failed()
            if facts.PENDING_SIGTERM:  # a SIGTERM whose SystemExit was dropped (facts.py)
                facts.raise_pending_sigterm()
            inputs = bind_inputs(self._signatures[id(module)], args, kwargs)  # raises on packed inputs
            self._depth = 1
            self._forwards += 1
            train_step = self.train_step() if self.train_step is not None else None
            if self.train_step is not None and train_step is None:
                self._step = None  # e.g. an evaluation forward inside a training run
                self._skipping = self._sink.skipping = True
                return
            if self._tracker.holding:  # a step waits for its cache's length (identity.py)
                self._tracker.release(inputs.cache, self._submit_held)
            labels = self._labels.now()
            identity = self._tracker.identify(inputs, labels)
            if identity is None:
                self._step = None
                return
            batch, seq_len = identity.valid.shape
            device, ids, valid = identity.valid.device, inputs.input_ids, identity.valid
            if self.router_stats and isinstance(valid, DeferredRows):
                valid = valid.stack()  # the statistics hooks mask with it in the forward
            self._step = StepBuffers(
                step=self._step_offset + self.steps,
                phase=identity.phase,
                seq_ids=identity.seq_ids,
                labels=self._labels.of_step(identity.labels, labels),
                # a one-token decode step's snap holds a copy of its ids already
                token_ids=copy_ids(ids, valid.shape, device) if identity.snap is None else None,
                positions=identity.positions,
                valid=valid,
                valid_flat=valid.reshape(-1).float() if self.router_stats else None,
                stack=self._stacks[id(module)].name,
                modality=(
                    token_modality(ids, kwargs, ids_by_modality=self._placeholder_ids)
                    if self._placeholder_ids or "mm_token_type_ids" in kwargs
                    else None  # a text model's forward: every token is text
                ),
                train_step=train_step,
                snap=identity.snap,
            )
            self._identity = identity
            self.steps += 1
            self._compiled_step = self._compiled_given or is_compiled(self.model)
            if self._compiled_step and (self._brackets.wrapped or not self._routers.compiled):
                self._use_hooks()  # compiled some other way: from the next call on (compiled.py)
            if self._compiled_step and not self._sink.graphs_dropped:
                drop_compiled_graphs(self.model)  # e.g. generate's compile_config: compiled after enter
                self._sink.graphs_dropped = True
            # the router writes (eager) or the graph (compiled) write the step's buffers there
            self._sink.begin(batch * seq_len, device, zero=self._compiled_step)
        finally:
            self._overhead += time.perf_counter() - started

    def _allocate_seq_ids(self, batch: int) -> np.ndarray:
        ids = np.arange(self._next_seq_id, self._next_seq_id + batch, dtype=np.int64)
        self._next_seq_id += batch
        return ids

    def _end_step(self, module: nn.Module, args: tuple, output: Any) -> None:
        """A stack's forward ended (also when it raised: `output` None): one call, timed."""
        started = time.perf_counter()
        try:
            if self._depth == 0:
                return
            self._depth -= 1
            if self._depth > 0:
                return
            self._skipping = self._sink.skipping = False
            step, self._step = self._step, None
            if step is None:
                return
            try:
                step.groups = self._sink.end(step.stack, self._compiled_step)
            except Exception as error:  # e.g. a layer ran twice: this step is lost, the run goes on
                self._fail_step(step.step, error)
                return
            if output is not None and self._identity.cache_key is None:  # a forward given no cache
                self._tracker.adopt(self._identity, output)
            if output is None or not step.groups:
                self._empty_forwards += 1
                if not step.groups:
                    self.steps -= 1  # no MoE layer ran (or the forward raised): no step
                return
            if step.valid.shape[1] > 1 and self._tracker.hold(self._identity, step):  # (one token: never)
                return  # candidates on a cache: wait until the cache shows what was kept
            self._submit(step)
        finally:
            self._overhead += time.perf_counter() - started

    def _submit(self, step: StepBuffers) -> None:
        try:
            host = step.finish(self._num_experts, self.with_weights, self.options.rollups)
        except Exception as error:
            self._fail_step(step.step, error)
            return
        host.on_error = self._fail_step  # called on the writer thread if its tables cannot be made
        pending = self._pending
        if not pending:
            self._pending_since = time.monotonic()
        pending.append(host)
        shape = step.valid.shape
        self._pending_tokens += shape[0] * shape[1]
        if (
            host.phase != "decode"  # only decode steps wait for company: a forward's step goes now
            or len(pending) >= BATCH_STEPS
            or self._pending_tokens >= self.options.rows_per_part  # rows >= tokens: parts stay bounded
            or self.observers  # observers are given each step's tables on its own
            or self._pending_tokens >= BATCH_TOKENS
            or time.monotonic() - self._pending_since >= self._batch_seconds
        ):
            self._send()

    def _send(self) -> None:
        """Hand the finished steps to the writer, as one batch (capture/recording/batch.StepBatch)."""
        if self._pending:
            batch, self._pending, self._pending_tokens = StepBatch(self._pending), [], 0
            self.writer.submit(batch)

    def _fail_step(self, step: int, error: BaseException) -> None:
        """One step could not be recorded: count it, keep its message, go on with the next."""
        with self._failures_lock:
            self.skipped.add("steps_failed")
            if len(self.step_errors) < MAX_STEP_ERRORS:
                self.step_errors.append(f"step {step}: {type(error).__name__}: {error}")

    def _submit_held(self, step: StepBuffers, kept: int) -> None:
        """Submit a held multi-token step, without the columns the cache did not keep."""
        if kept < step.valid.shape[1]:
            rejected = step.valid[:, kept:]
            self.skipped.add("rejected_candidates", int(rejected.sum()))
            step.valid = step.valid.clone()
            step.valid[:, kept:] = False
        self._submit(step)

    # -- generate: end-of-text ids, refused paths, compile (capture.generation) -------------
    def _patch_generate(self) -> None:
        self._generate_patch = GeneratePatch(self.model, self._tracker, self._after_generate, self._use_hooks)
        # capture.compiled.check_compilable: otherwise a compile_config call runs eagerly
        self._generate_patch.compile_ok = len(self._stacks) == 1 and not self.router_stats
        self._generate_patch.install(steps=lambda: self.steps)

    def _after_generate(self, steps_before: int) -> None:
        self._tracker.release_all(self._submit_held)
        self._send()
        if self.steps == steps_before:
            self.skipped.add("generate_calls_without_routing")


def record(
    model: nn.Module,
    out_dir: str | Path,
    labels: dict[str, Any] | None = None,
    router_stats: bool = False,
    **options: Any,
) -> Recorder:
    """Record every routing decision of `model` into the run directory `out_dir`.

    Use as a context manager around plain forwards and `model.generate(...)`, compiled or not
    (`record(torch.compile(model))`, `model.compile()` before or inside the block, a `compile_config`: the
    graph records itself, capture/recording/compiled.py). On exit, also on an exception, every hook is removed, recorded steps are
    flushed and the manifest is written (`complete` is true only after a clean exit).

    Options: `mode` ('create' refuses an existing run, 'overwrite', 'append'); `weights` (False drops the
    combine weights, about 3x smaller); `rows_per_part`; `flush_seconds` (a part at least this often, so a
    live run is readable); `max_pending` (steps queued before the model waits for the disk) and
    `max_pending_bytes` (host bytes they may hold, default 256 MiB); `rank`, `world_size`; `sample` (record a
    seeded fraction of sequences, e.g. 0.01, chosen by a hash of (seed, seq_id)) and `seed`; `layers` (record
    only these MoE layers); `wait` (another writer holds the run's lock, store/lock.py: False raises
    RunBusyError naming it, True waits, a number waits that many seconds); `storage_options` (fsspec's, for an
    s3:// or gs:// `out_dir`: docs/spark_and_object_storage.md); `handle_sigterm` (default True: SIGTERM ends
    the block like an exception, so the recorded steps are flushed and the manifest says `complete: false`);
    `observers` (callables given each finished step's tables, dict of table -> column arrays, on the writer
    thread, never on the model's; e.g. `routescope.export.prometheus.RoutingExporter`); `rollups` (default
    True: the writer adds the rollup_* parts; False: `routescope index` later). `router_stats=True` also
    records the router_stats and router_tokens tables."""
    return Recorder(model, out_dir, labels=labels, router_stats=router_stats, **options)
