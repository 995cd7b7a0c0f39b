"""rs.replay: make a model's MoE layers follow the routing recorded in a run.

Live tokens are matched to the run by content (`analysis.content.content_keys`: the
sequence's token ids up to and including the token). A pre-hook on each MoE layer's experts
module, the same site `rs.record` reads (`adapters.py`, rows with `replay=True`), swaps the
ids and weights the experts are called with. Used for RL rollout/training consistency (R3)
and counterfactual forwards; docs/replay.md.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from routescope.analysis.content import MISSING_KEY, content_keys
from routescope.analysis.run import Run, open_run
from routescope.analysis.sqlfiles import get_query
from routescope.capture.adapters import WeightRule
from routescope.capture.control.forcing import (
    check_forceable,
    find_weight_rule,
    force_decision,
    logits_of,
    require_logits_sites,
)
from routescope.capture.discovery import LogitsSite, RouterSite, find_routers
from routescope.capture.recording.identity import bind_inputs, output_cache, valid_tokens
from routescope.errors import RouteScopeError

WEIGHTS = ("recorded", "router")
MISSING = ("error", "router")
_MAX_CACHES = 16  # token histories kept for this many live caches (generate calls)


@dataclass
class RunRouting:
    """A run's decisions per token, looked up by content key (host memory)."""

    keys: np.ndarray  # sorted unique content keys of the replayable tokens
    rows: np.ndarray  # token index (replay_tokens order) of each key
    experts: dict[int, torch.Tensor]  # layer -> [tokens, k] int16 (-1: slot missing)
    weights: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [tokens, k] float32

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Token index of each key, -1 where the run has no such token."""
        if not len(self.keys):
            return np.full(len(keys), -1, dtype=np.int64)
        where = np.searchsorted(self.keys, keys).clip(max=len(self.keys) - 1)
        hit = (self.keys[where] == keys) & (keys != MISSING_KEY)
        return np.where(hit, self.rows[where], -1)


def load_run_routing(run: Run, layers: dict[int, int], with_weights: bool) -> RunRouting:
    """Read every token's routing for `layers` (layer -> k) from `run` into RunRouting."""
    tokens = run.con.execute(get_query("replay_tokens").sql).fetchnumpy()
    context = run.con.execute(get_query("replay_context_tokens").sql).fetchnumpy()  # ids only, no routing
    seq, pos, tok = (
        np.concatenate([np.asarray(t[c], dtype=np.int64) for t in (tokens, context)])
        for c in ("seq_id", "pos", "token_id")
    )
    n = len(tokens["seq_id"])
    keys = np.full(len(seq), MISSING_KEY, dtype=np.uint64)
    known = tok >= 0  # imported runs may lack token ids (-1): such tokens cannot be matched
    if known.any():
        keys[known] = content_keys(seq[known], pos[known], tok[known])
    keys = keys[:n]  # the run's tokens; context tokens only completed their sequences' content
    experts = _per_layer(run, "replay_experts", "expert", layers, n, np.int16, -1)  # SMALLINT: 2 bytes
    weights = _per_layer(run, "replay_weights", "weight", layers, n, np.float32, 0) if with_weights else {}
    complete = np.ones(n, dtype=bool)
    for table in experts.values():
        complete &= (table >= 0).all(dim=1).numpy()
    keys[~complete] = MISSING_KEY  # a token without all k choices in every layer cannot be replayed
    usable = np.flatnonzero(keys != MISSING_KEY)
    unique, first = np.unique(keys[usable], return_index=True)  # the same text twice: its first record
    return RunRouting(keys=unique, rows=usable[first], experts=experts, weights=weights)


def _per_layer(
    run: Run, query: str, column: str, layers: dict[int, int], n: int, dtype: type, fill: float
) -> dict[int, torch.Tensor]:
    """One [tokens, k] table per layer from one pass over the routing rows (named `query`)."""
    rows = run.con.execute(get_query(query).sql).fetchnumpy()
    token, layer, slot = (np.asarray(rows[c], dtype=np.int64) for c in ("token", "layer", "slot"))
    numbers = sorted(layers)
    index = np.full(max(max(numbers), int(layer.max(initial=0))) + 1, -1, dtype=np.int64)
    index[numbers] = np.arange(len(numbers))
    width = np.array([layers[number] for number in numbers], dtype=np.int64)
    at = index[layer]  # position of the row's layer among `layers`, -1 for any other layer
    keep = (at >= 0) & (slot < width[at.clip(min=0)])
    table = np.full((len(numbers), n, int(width.max())), fill, dtype=dtype)
    table[at[keep], token[keep], slot[keep]] = np.asarray(rows[column])[keep]
    return {number: torch.from_numpy(table[i, :, : layers[number]]) for i, number in enumerate(numbers)}


@dataclass
class _Histories:
    """The token ids each batch row of a cache has seen, and whether generate fed it an EOS."""

    cache: Any  # the cache object itself: keeps its id valid while the entry lives
    tokens: list[np.ndarray]
    finished: np.ndarray  # [B] bool


@dataclass
class _Step:
    """The forward in flight: the replacement decision of each layer, on the model's device."""

    found: torch.Tensor  # [B*S, 1] bool: the token is replayed (else the model's router decides)
    experts: dict[int, torch.Tensor]  # layer -> [B*S, k]
    weights: dict[int, torch.Tensor]  # layer -> [B*S, k] (weights="recorded" only)


class Replayer:
    """Context manager returned by `routescope.replay`; see its docstring."""

    def __init__(
        self, model: nn.Module, run: Run | str | Path, weights: str = "recorded", missing: str = "error"
    ) -> None:
        if weights not in WEIGHTS:
            raise ValueError(f"weights={weights!r} is not allowed; use one of {', '.join(WEIGHTS)}")
        if missing not in MISSING:
            raise ValueError(f"missing={missing!r} is not allowed; use one of {', '.join(MISSING)}")
        self.model = model
        self.run = run
        self.weights = weights
        self.missing = missing
        self.replayed_tokens = 0  # tokens whose routing came from the run
        self.fallback_tokens = 0  # tokens not in the run, routed by the model (missing="router")
        self.rules: dict[int, WeightRule] = {}  # layer -> weight rule found (weights="router")
        self.sites: list[RouterSite] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._routing: RunRouting | None = None
        self._step: _Step | None = None
        self._depth = 0
        self._logits: dict[int, torch.Tensor] = {}
        self._routers: dict[int, nn.Module] = {}
        self._histories: dict[int, _Histories] = {}
        self._pending: _Histories | None = None
        self._eos = _eos_ids(model)
        self._pad = _pad_ids(model)

    # -- context manager ---------------------------------------------------------------
    def __enter__(self) -> Replayer:
        self.sites = find_routers(self.model)
        check_forceable(self.sites, "routing replay")
        run, opened = (self.run, False) if isinstance(self.run, Run) else (open_run(self.run), True)
        try:
            layers = _check_run(run, self.sites, self.weights)
            self._routing = load_run_routing(run, layers, with_weights=self.weights == "recorded")
        finally:
            if opened:
                run.close()
        try:
            self._add_hooks()
        except BaseException:
            self._remove_hooks()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        self._remove_hooks()
        self._step, self._pending = None, None
        self._logits.clear()
        self._histories.clear()
        if self.fallback_tokens and exc_type is None:
            warnings.warn(
                f"routescope.replay: {self.fallback_tokens} tokens were not in the run and were routed by "
                f"the model's own router (missing='router'); {self.replayed_tokens} tokens were replayed",
                stacklevel=2,
            )

    # -- hooks -------------------------------------------------------------------------
    def _add_hooks(self) -> None:
        self._signature = inspect.signature(self.model.forward)
        self._handles.append(self.model.register_forward_pre_hook(self._begin_step, with_kwargs=True))
        self._handles.append(
            self.model.register_forward_hook(self._end_step, with_kwargs=True, always_call=True)
        )
        for site in self.sites:
            # prepended: any other hook (rs.record's) sees the replayed decision
            self._handles.append(force_decision(site, self._make_decide(site)))
        if self.weights == "router":
            logits_sites = require_logits_sites(self.model, self.sites, "weights='router'")
            for layer, logits_site in logits_sites.items():
                self._routers[layer] = logits_site.module
                # prepended after the forcing hooks: where the router is the forced module
                # (LongCat), its logits are taken before the decision is forced
                self._handles.append(
                    logits_site.module.register_forward_hook(
                        self._make_logits_hook(logits_site), prepend=True
                    )
                )

    def _remove_hooks(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def _make_logits_hook(self, site: LogitsSite):
        layer, index = site.layer, site.index

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if self._step is not None:
                self._logits[layer] = logits_of(output, index)  # not detached: gradients

        return hook

    def _make_decide(self, site: RouterSite):
        layer = site.layer

        def decide(
            own_ids: torch.Tensor, own_weights: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor] | None:
            step = self._step
            if step is None:
                return None  # not inside a forward of the replayed model
            new_ids = step.experts[layer]
            if own_ids.shape[0] != new_ids.shape[0]:
                raise RouteScopeError(
                    f"layer {layer} routed {own_ids.shape[0]} tokens, but the forward had {new_ids.shape[0]} "
                    "(batch x sequence); this layout cannot be replayed"
                )
            ids = torch.where(step.found, new_ids.to(own_ids.dtype), own_ids)
            if self.weights == "recorded":
                chosen = step.weights[layer].to(own_weights.dtype)
            else:
                chosen = self._router_weights(layer, ids, own_ids, own_weights)
            weights = torch.where(step.found, chosen, own_weights)
            return ids, weights

        return decide

    def _router_weights(
        self, layer: int, ids: torch.Tensor, own_ids: torch.Tensor, own_weights: torch.Tensor
    ) -> torch.Tensor:
        logits = self._logits.pop(layer, None)
        if logits is None or logits.shape[0] != ids.shape[0]:
            raise RouteScopeError(
                f"weights='router': layer {layer}'s router logits were not seen for this call; "
                "use weights='recorded'"
            )
        router = self._routers[layer]
        rule = self.rules.get(layer)
        if rule is None:
            try:
                rule = self.rules[layer] = find_weight_rule(router, logits, own_ids, own_weights, layer)
            except RouteScopeError as error:
                raise RouteScopeError(f"weights='router': {error}; use weights='recorded'") from None
        return rule.compute(router, logits, ids).to(own_weights.dtype)

    # -- step bookkeeping --------------------------------------------------------------
    def _begin_step(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._depth += 1
        if self._depth > 1:
            return  # the model called itself: the outer call is the step
        try:
            self._step = self._prepare_step(args, kwargs)
        except BaseException:
            self._depth, self._step, self._pending = 0, None, None
            raise

    def _prepare_step(self, args: tuple, kwargs: dict) -> _Step:
        inputs = bind_inputs(self._signature, args, kwargs)  # the recorder's reading of the inputs
        input_ids, mask, cache = inputs.input_ids, inputs.attention_mask, inputs.cache
        if input_ids is None:
            raise RouteScopeError(
                "routescope.replay matches tokens by their ids, so the model must be called with input_ids "
                "(not inputs_embeds)"
            )
        batch, seq_len = input_ids.shape
        past = _cache_length(cache)
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            past = max(past, int(mask.shape[1]) - seq_len)  # caches that report no length (hybrids)
        # real tokens from a 2-D mask, or from a 4-D one (static caches), as rs.record reads them
        valid = valid_tokens(mask, batch, seq_len, past, input_ids.device).cpu().numpy()
        ids_host = input_ids.detach().cpu().numpy().astype(np.int64)
        state = self._history(cache, batch) if past > 0 else None
        if past > 0 and state is None:  # a decode step whose prefix this replay did not see
            keys = np.full((batch, seq_len), MISSING_KEY, dtype=np.uint64)
            finished = np.zeros(batch, dtype=bool)
            self._pending = None
        else:
            tokens = state.tokens if state else [np.empty(0, dtype=np.int64)] * batch
            finished = state.finished if state else np.zeros(batch, dtype=bool)
            keys, tokens = _live_keys(ids_host, valid, tokens)
            fed_eos = (np.isin(ids_host, self._eos) & valid).any(1) if past > 0 else np.zeros(batch, bool)
            self._pending = _Histories(cache, tokens, finished | fed_eos)
        rows = self._routing.lookup(keys.reshape(-1)).reshape(batch, seq_len)
        # generate keeps feeding pad tokens to a row that was fed an EOS; rs.record skips them,
        # so they are not in the run: the model routes them, as it routes padding
        missing = valid & (rows < 0) & ~finished[:, None]
        if missing.any():
            if self.missing == "error":
                b, s = (int(x) for x in np.argwhere(missing)[0])
                raise RouteScopeError(
                    f"{int(missing.sum())} of {int(valid.sum())} tokens of this forward are not in the run "
                    f"(first: batch row {b}, position {s}, token id {int(ids_host[b, s])}); tokens match "
                    "when their sequence's token ids up to and including them are equal. "
                    f"{_padding_hint(ids_host, missing, mask, self._pad)}Pass "
                    "missing='router' to let the model's own router decide for them"
                )
            self.fallback_tokens += int(missing.sum())
        self.replayed_tokens += int((valid & (rows >= 0)).sum())
        flat = torch.from_numpy(rows.reshape(-1))
        found = torch.from_numpy((rows >= 0).reshape(-1, 1))
        index = flat.clamp(min=0)
        device = input_ids.device
        experts = {layer: table.index_select(0, index) for layer, table in self._routing.experts.items()}
        weights = {layer: table.index_select(0, index) for layer, table in self._routing.weights.items()}
        return _Step(
            found=found.to(device, non_blocking=True),
            experts={k: v.to(device, non_blocking=True) for k, v in experts.items()},
            weights={k: v.to(device, non_blocking=True) for k, v in weights.items()},
        )

    def _history(self, cache: Any, batch: int) -> _Histories | None:
        entry = self._histories.get(id(cache))
        if entry is None or entry.cache is not cache or len(entry.tokens) != batch:
            return None
        return entry

    def _end_step(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self._depth = max(0, self._depth - 1)
        if self._depth > 0:
            return
        self._step = None
        self._logits.clear()
        pending, self._pending = self._pending, None
        cache = output_cache(output)
        if pending is not None and cache is not None:
            pending.cache = cache
            self._histories.pop(id(cache), None)
            self._histories[id(cache)] = pending
            while len(self._histories) > _MAX_CACHES:
                self._histories.pop(next(iter(self._histories)))


def replay(
    model: nn.Module, run: Run | str | Path, weights: str = "recorded", missing: str = "error"
) -> Replayer:
    """Make `model`'s MoE layers follow the routing recorded in `run` (a Run or a run directory).

    Use as a context manager around forwards and `model.generate(...)`. Each token is matched
    to the run by content: its sequence's token ids up to and including it. `weights`:
    'recorded' applies the recorded combine weights (the forward computes what it computed
    when recorded, even after the routers changed); 'router' applies the model's own router
    probabilities at the recorded ids, normalised as the model does, so gradients reach the
    routers (R3). `missing`: 'error' raises RouteScopeError for a token not in the run;
    'router' lets the model's router decide for it and counts it in `fallback_tokens`.
    Every hook is removed on exit, also on an exception. `rs.record` inside the block records
    the replayed decisions.
    """
    return Replayer(model, run, weights=weights, missing=missing)


def _check_run(run: Run, sites: list[RouterSite], weights: str) -> dict[int, int]:
    """The layers to replay (layer -> k) if `run` fits the model; RouteScopeError naming what differs."""
    manifest = run.manifest
    if manifest.get("counts_only") or not run.has_table("routing"):
        raise RouteScopeError(
            f"run {run.path} has no per-token routing (a counts-only import or an empty run); "
            "replay needs the routing table"
        )
    model_layers = [site.layer for site in sites]
    run_layers = run.moe_layers
    if sorted(run_layers) != model_layers:
        hint = ""
        if manifest.get("imported_from"):
            hint = " (an imported run must number layers as the model's decoder layers: import with --moe-layers)"
        raise RouteScopeError(
            f"run {run.path} was recorded with MoE layers {run_layers}, this model has {model_layers}{hint}"
        )
    inferred = bool(manifest.get("imported_from", {}).get("num_experts_inferred"))
    for site in sites:
        run_experts, run_k = run.num_experts(site.layer), run.top_k(site.layer)
        fits = run_experts == site.num_experts or (inferred and run_experts <= site.num_experts)
        if not fits or run_k != site.top_k:
            raise RouteScopeError(
                f"run {run.path} layer {site.layer} has {run_experts} experts and top-k {run_k}; this "
                f"model's layer has {site.num_experts} experts and top-k {site.top_k}: a run from another model?"
            )
    if weights == "recorded" and not manifest.get("weights_recorded", True):
        raise RouteScopeError(
            f"run {run.path} holds no combine weights (an import, or recorded with weights=False); "
            "use weights='router'"
        )
    return {site.layer: site.top_k for site in sites}


def _live_keys(
    ids: np.ndarray, valid: np.ndarray, histories: list[np.ndarray]
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Content keys [B, S] of this forward's tokens (MISSING_KEY at padding) and the new histories."""
    batch, seq_len = ids.shape
    new = [np.concatenate([histories[b], ids[b][valid[b]]]) for b in range(batch)]
    lengths = np.array([len(h) for h in new], dtype=np.int64)
    seq = np.repeat(np.arange(batch, dtype=np.int64), lengths)
    pos = np.concatenate([np.arange(n, dtype=np.int64) for n in lengths]) if batch else np.empty(0, np.int64)
    all_keys = content_keys(seq, pos, np.concatenate(new) if batch else np.empty(0, np.int64))
    keys = np.full((batch, seq_len), MISSING_KEY, dtype=np.uint64)
    ends = np.cumsum(lengths)
    for b in range(batch):
        count = int(valid[b].sum())
        keys[b][valid[b]] = all_keys[ends[b] - count : ends[b]]
    return keys, new


def _eos_ids(model: nn.Module) -> np.ndarray:
    """End-of-text ids from the model's generation config (else its config)."""
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        eos = getattr(getattr(model, "config", None), "eos_token_id", None)
    values = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return np.asarray([int(v) for v in values], dtype=np.int64)


def _pad_ids(model: nn.Module) -> np.ndarray:
    """Padding ids from the model's generation config (else its config)."""
    ids = []
    for config in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        pad = getattr(config, "pad_token_id", None)
        ids += [] if pad is None else [pad] if isinstance(pad, int) else list(pad)
    return np.asarray(sorted({int(v) for v in ids}), dtype=np.int64)


def _padding_hint(ids: np.ndarray, missing: np.ndarray, mask: Any, pad: np.ndarray) -> str:
    """A sentence for the 'not in the run' error when missing tokens are padding ids."""
    padded = int((np.isin(ids, pad) & missing).sum()) if len(pad) else 0
    if not padded:
        return ""
    how = "no attention_mask was passed" if mask is None else "the attention_mask marks them as real tokens"
    return (
        f"{padded} of the missing tokens are the padding id {', '.join(map(str, pad))} and {how}: "
        "padding is never recorded, so call the model with the attention_mask the recording used. "
    )


def _cache_length(cache: Any) -> int:
    if cache is None:
        return 0
    try:
        return int(cache.get_seq_length())
    except Exception:
        return 0
