"""Token and sequence identity of one forward, read from the model's own inputs.

For every forward the recorder needs, per batch row and column: is this a real token
(`valid`), its absolute position in its sequence (`positions`, padding not counted), which
sequence it belongs to (`seq_ids`), and whether the forward extends a cache (`decode`) or
starts one (`prefill`). transformers passes what settles each of these:

- the cache, as `cache` (5.24 and later) or `past_key_values` (earlier 5.x);
- the attention mask when it covers the whole row (its running count of real tokens),
  else `position_ids` (generate always passes them; 3-D multimodal rope ids are not
  positions), else the row's own count kept since its prefill;
- the attention mask, 2-D (dynamic caches) or 4-D (static, compileable caches: the
  query's own key slot is allowed exactly when the query is a real token).

A decode forward continues the sequences whose cache it extends: the tracker keys its
state by the cache object and its rows, never by batch size, so an unrelated forward of
the same batch size cannot take over a sequence, and (seq_id, pos) is never reused.

A forward that feeds several tokens into a cache (a prefill, assisted or prompt-lookup
candidates, chunked prefill) is held back until the cache shows how many of them were
kept: the next forward on that cache, the end of `generate`, or the end of recording
reads the cache length, and tokens past it (rejected candidates) are dropped and counted.

Inside `generate` the tracker also knows the end-of-text ids: a row that has been fed one
is finished, and the pad tokens that `generate` keeps feeding it are not recorded.

A one-token decode step (`_decode`, once per generated token) copies its token ids,
positions and own-slot column in one op; which of its tokens count is made from them later
on a CPU, many steps at once (capture/recording/decoded.py, which also holds a cache's state).
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from routescope import schema
from routescope.capture.recording.decoded import CacheState, StepValid
from routescope.capture.recording.skipped import Skipped
from routescope.errors import RouteScopeError

# kwargs of packed (varlen) forwards: several sequences share one batch row
PACKED_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "cu_seqlens_q", "cu_seqlens_k")
PACKED = frozenset(PACKED_KWARGS)


@dataclass
class ForwardInputs:
    """What one forward call was given, whatever the argument names."""

    input_ids: torch.Tensor | None
    inputs_embeds: torch.Tensor | None
    attention_mask: Any
    position_ids: torch.Tensor | None
    cache: Any


def bind_inputs(signature: inspect.Signature, args: tuple, kwargs: dict) -> ForwardInputs:
    """Read a forward's inputs by name (positional or keyword, or inside **kwargs)."""
    if args:
        bound = signature.bind_partial(*args, **kwargs).arguments
        inner = next(
            (v for k, v in bound.items() if signature.parameters[k].kind is inspect.Parameter.VAR_KEYWORD), {}
        )

        def get(name: str) -> Any:
            return bound.get(name, inner.get(name))

    else:  # keywords only (generate's calls): the same names, without binding
        get = kwargs.get

    maybe = args or not PACKED.isdisjoint(kwargs)  # no packed name among the keywords: none bound either
    packed = [name for name in PACKED_KWARGS if get(name) is not None] if maybe else ()
    if packed:
        raise RouteScopeError(
            f"packed (varlen) inputs ({', '.join(packed)}) put several sequences in one batch row; "
            "routescope cannot tell them apart yet: record padded batches instead"
        )
    cache = get("cache")
    if cache is None:
        cache = get("past_key_values")
    return ForwardInputs(
        input_ids=get("input_ids"),
        inputs_embeds=get("inputs_embeds"),
        attention_mask=get("attention_mask"),
        position_ids=get("position_ids"),
        cache=cache,
    )


@dataclass
class Identity:
    """The identity of one forward's tokens (device tensors; seq_ids on the host)."""

    phase: str
    seq_ids: np.ndarray  # [B] int64
    positions: torch.Tensor | None  # [B, S] int64; None in a one-token decode step: `snap` holds them
    valid: torch.Tensor | StepValid  # [B, S] bool; a CPU decode step's is made when read (decoded.py)
    labels: dict[str, str | None]
    cache_key: int | None = None  # the tracker state the forward extends
    past: int = 0  # cache length before the forward
    state: Any = None  # the tracker's state of these sequences
    # a one-token decode step's [B, 3] token ids, positions, real token (decoded.py)
    snap: torch.Tensor | None = None


class SequenceTracker:
    """Gives each forward its token identity and keeps sequences across decode steps."""

    def __init__(
        self,
        next_seq_id: Callable[[int], np.ndarray],
        skipped: Skipped,
        sample: float | None = None,
        seed: int = 0,
    ) -> None:
        self._new_ids = next_seq_id
        self.skipped = skipped
        self.sample = sample
        self.seed = seed
        self._states: dict[int, CacheState] = {}
        self.holding = 0  # steps held (`hold`) and not released yet: 0, none to look for
        self.eos_ids: torch.Tensor | None = None  # set while inside generate
        # inside generate, whose mask gives each new token a real slot (capture/recording/generation.py)
        self.generating = False
        self._eos_moved: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- per forward -------------------------------------------------------------------
    def identify(
        self, inputs: ForwardInputs, labels: dict[str, str | None], short_path: bool = True
    ) -> Identity | None:
        """The identity of a forward's tokens; `short_path=False` takes the general path for a
        decode step too (the tests check that both give the same answer)."""
        reference = inputs.input_ids if inputs.input_ids is not None else inputs.inputs_embeds
        if reference is None:
            return None
        batch, seq_len = int(reference.shape[0]), int(reference.shape[1])
        device = reference.device
        past = self._cache_length(inputs.cache)
        mask = inputs.attention_mask
        dims = mask.dim() if isinstance(mask, torch.Tensor) else 0
        if dims == 2:
            # some caches (linear-attention hybrids) report no length: the 2-D mask still does
            past = max(past, int(mask.shape[1]) - seq_len)
        state = self._state(inputs.cache)
        if state is not None and past == 0:
            state = None  # the cache was reset: new sequences
        if state is not None and len(state.seq_ids) != batch:
            self.skipped.add("decode_batch_mismatch")
            state = None
        if (
            short_path
            and seq_len == 1
            and state is not None
            and state.alive.device == device
            and state.next_pos.device == device
        ):  # a one-token decode step: the short path, where its inputs have a layout it knows
            pos_ids = inputs.position_ids
            if mask is None:
                short = _column(pos_ids, batch, device)
            elif dims == 2:  # its whole 2-D mask
                short = mask.shape[1] == past + 1 and mask.device == device
            elif dims == 4:  # a static cache's 4-D mask (compiled generate), with its position_ids
                shape = mask.shape
                short = (
                    shape[-1] > past
                    and shape[-2] == 1
                    and shape[0] in (1, batch)
                    and mask.device == device
                    and pos_ids is not None
                    and _column(pos_ids, batch, device)
                )
            else:
                short = False
            if short:
                return self._decode(inputs, mask, state, past)
        valid = valid_tokens(inputs.attention_mask, batch, seq_len, past, device)
        positions = _positions(inputs, state, valid, batch, seq_len, past, device)
        if past == 0 or state is None:
            phase = schema.PHASE_PREFILL if past == 0 else schema.PHASE_DECODE
            seq_ids = self._new_ids(batch)
            state = CacheState(
                seq_ids=seq_ids,
                next_pos=torch.zeros(batch, 1, dtype=torch.long, device=device),
                alive=self._sampled(seq_ids, device),
                labels=dict(labels),
                slots=past,
            )
            if inputs.cache is not None:
                self._remember(inputs.cache, state)
        else:
            phase = schema.PHASE_DECODE
        alive = state.live()
        alive = alive if alive.device == device else alive.to(device)
        valid = valid & alive  # not finished, not left out by sample=
        if phase == schema.PHASE_DECODE and self.eos_ids is not None and inputs.input_ids is not None:
            fed = self._fed_end_of_text(inputs.input_ids, valid)
            state.alive = alive & ~(fed if seq_len == 1 else fed.any(1, keepdim=True))
        next_pos = state.next_positions()
        next_pos = next_pos if next_pos.device == device else next_pos.to(device)
        state.advance(
            torch.where(
                valid.any(1, keepdim=True),
                positions.masked_fill(~valid, -1).amax(1, keepdim=True) + 1,
                next_pos,
            )
        )
        state.slots = past + seq_len
        return Identity(
            phase=phase,
            seq_ids=state.seq_ids,
            positions=positions,
            valid=valid,
            labels=state.labels,
            cache_key=id(inputs.cache) if inputs.cache is not None else None,
            past=past,
            state=state,
        )

    def _decode(
        self, inputs: ForwardInputs, mask: torch.Tensor | None, state: CacheState, past: int
    ) -> Identity:
        """`identify` of a one-token decode step, given its whole 2-D mask, or none (generate gives
        none when every token is real), or a static cache's 4-D mask with position_ids (a compiled
        generate's): the same answer in fewer tensor ops, as this runs once per token. The step's
        token ids, positions and own-slot column are copied in one op (the caller may reuse its
        tensors); which tokens count is made from them later on a CPU (decoded.py)."""
        pos_ids, ids = inputs.position_ids, inputs.input_ids
        eos = self.eos_ids
        if eos is not None and eos.device != state.alive.device:
            eos = self._eos_on(state.alive.device)
        if mask is None and pos_ids is None:  # every row has a real token: its next position
            valid, positions = state.live(), state.next_positions()
            if eos is not None and ids is not None:  # a row ends where it feeds an end-of-text id
                state.alive = valid & torch.isin(ids, eos, invert=True)
            state.advance(positions + 1)  # (a finished row's next position is never read)
            snap = None
        else:
            if mask is None:  # generate's position_ids: every row has a real token
                own = state.ones()
            elif self.generating and mask.dim() == 4:  # generate extends its mask by a 1 per new token
                own = state.ones()  # so its own slot is allowed: not read (the slice and a cast cost more)
            elif mask.dim() == 4:  # a query is a real token exactly when it may attend to its own slot
                own = mask[:, 0, :, past]  # [B or 1, 1] (one query)
                own = own if own.dtype == torch.bool else own == 0
            else:
                own = mask[:, past:]
                own = own != 0 if own.dtype.is_floating_point else own
                pos_ids = mask.sum(1, keepdim=True, dtype=torch.long) - 1  # real tokens so far, less one
            batch = state.alive.shape[0]
            columns = (
                ids if ids is not None else torch.full_like(state.ones(), -1),
                pos_ids if pos_ids.shape[0] == batch else pos_ids.expand(batch, 1),
                own if own.shape[0] == batch else own.expand(batch, 1),
            )
            snap = torch.cat(columns, dim=1)  # [B, 3] int64: token id, position, real token
            valid, positions = state.add(snap, eos), None
        state.slots = past + 1
        return Identity(
            phase=schema.PHASE_DECODE,
            seq_ids=state.seq_ids,
            positions=positions,
            valid=valid,
            labels=state.labels,
            cache_key=id(inputs.cache) if inputs.cache is not None else None,
            past=past,
            state=state,
            snap=snap,
        )

    def _eos_on(self, device: torch.device) -> torch.Tensor:
        """The end-of-text ids on `device` (moved once per generate call)."""
        eos = self.eos_ids
        if eos.device == device:
            return eos
        moved = self._eos_moved
        if moved is None or moved[0] is not eos or moved[1].device != device:
            moved = self._eos_moved = (eos, eos.to(device))
        return moved[1]

    def _fed_end_of_text(self, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """[B, S] bool: the real tokens fed to the model that end their row's text."""
        eos = self.eos_ids if self.eos_ids.device == ids.device else self.eos_ids.to(ids.device)
        return torch.isin(ids, eos) & valid

    def adopt(self, identity: Identity, output: Any) -> None:
        """A forward given no cache that made one (returned in its output): later forwards on that
        cache continue these sequences."""
        if identity.cache_key is not None or identity.state is None:
            return
        cache = output_cache(output)
        if cache is None or isinstance(cache, (tuple, list)) or self._state(cache) is not None:
            return
        self._remember(cache, identity.state)

    def _sampled(self, seq_ids: np.ndarray, device: torch.device) -> torch.Tensor:
        """[B, 1] bool: rows in the `sample=` sample; the others are treated like finished rows,
        never recorded."""
        if self.sample is None:
            return torch.ones(len(seq_ids), 1, dtype=torch.bool, device=device)
        keep = sampled(seq_ids, self.sample, self.seed)
        return torch.from_numpy(keep[:, None]).to(device)

    # -- held multi-token steps ----------------------------------------------------------
    def hold(self, identity: Identity, step: Any) -> bool:
        """Keep a multi-token step on a cache until the cache shows how many of its tokens it kept."""
        state = self._states.get(identity.cache_key) if identity.cache_key is not None else None
        if state is None or identity.valid.shape[1] < 2:
            return False
        if state.held is None:
            self.holding += 1
        state.held = (identity.past, step)
        return True

    def release(self, cache: Any, submit: Callable[[Any, int], None]) -> None:
        """Hand the held step of `cache` (if any) to `submit(step, kept_columns)`."""
        state = self._state(cache)
        if state is None or state.held is None:
            return
        past, step = state.held
        state.held = None
        self.holding -= 1
        kept = self._cache_length(cache) - past
        if kept <= 0:  # the cache does not report a length (or was reset): it kept them all
            kept = step.valid.shape[1]
        if kept < step.valid.shape[1]:  # candidates were rejected: the row goes on after the kept ones
            state.advance(step.positions[:, kept - 1 : kept] + 1)
        submit(step, kept)

    def release_all(self, submit: Callable[[Any, int], None]) -> None:
        for key, state in list(self._states.items()):
            if state.held is None:
                continue
            cache = state.ref() if state.ref is not None else None
            past, step = state.held
            state.held = None
            self.holding -= 1
            kept = self._cache_length(cache) - past if cache is not None else 0
            kept = kept if kept > 0 else step.valid.shape[1]
            submit(step, kept)
            if cache is None:
                self._states.pop(key, None)

    # -- state by cache object -----------------------------------------------------------
    def _state(self, cache: Any) -> CacheState | None:
        if cache is None:
            return None
        state = self._states.get(id(cache))
        if state is None:
            return None
        if state.ref is not None and state.ref() is not cache:  # id reused by a new object
            self._states.pop(id(cache), None)
            return None
        return state

    def _remember(self, cache: Any, state: CacheState) -> None:
        key = id(cache)
        try:
            state.ref = weakref.ref(cache, lambda _, key=key: self._forget(key))
        except TypeError:
            state.ref = None
        self._states[key] = state

    def _forget(self, key: int) -> None:
        state = self._states.get(key)
        if state is not None and state.held is None:
            self._states.pop(key, None)

    def _cache_length(self, cache: Any) -> int:
        if cache is None:
            return 0
        get = getattr(cache, "get_seq_length", None)
        if get is None:
            if isinstance(cache, (tuple, list)) and cache and isinstance(cache[0], (tuple, list)):
                return int(cache[0][0].shape[-2])  # legacy tuple cache
            self.skipped.add("cache_length_unknown")
            return 0
        try:
            return int(get())
        except Exception:
            self.skipped.add("cache_length_unknown")
            return 0


def output_cache(output: Any) -> Any:
    """The cache a forward returned, under either name. Only names the output holds are read:
    on 5.24+ outputs both the `past_key_values` attribute and the key (`get`, `[]`) log a
    deprecation warning, also when the cache is None (`use_cache=False`)."""
    if output is None:
        return None
    if hasattr(output, "keys") and hasattr(output, "get"):
        held = output.keys()
        name = next((n for n in ("cache", "past_key_values") if n in held), None)
        return output[name] if name is not None else None
    return getattr(output, "cache", None)


def sampled(seq_ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Whether each sequence is in a seeded `fraction` sample: a hash of (seed, seq_id), so the
    choice does not depend on batch order and is the same on every rank."""
    x = (seq_ids.astype(np.uint64) ^ np.uint64(seed * 0x9E3779B97F4A7C15 % 2**64)) + np.uint64(
        0x9E3779B97F4A7C15
    )
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


def _column(position_ids: Any, batch: int, device: torch.device) -> bool:
    """No position_ids, or one position per row of a one-token step, on the step's device."""
    if position_ids is None:
        return True
    return (
        isinstance(position_ids, torch.Tensor)
        and position_ids.dim() == 2
        and position_ids.shape[1] == 1
        and position_ids.shape[0] in (1, batch)
        and position_ids.device == device
    )


def valid_tokens(mask: Any, batch: int, seq_len: int, past: int, device: torch.device) -> torch.Tensor:
    """Which (row, column) of the forward are real tokens."""
    if isinstance(mask, dict):  # per-attention-type masks: the full-attention one
        mask = mask.get("full_attention", next(iter(mask.values()), None))
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] >= seq_len:
        valid = mask[:, mask.shape[1] - seq_len :] != 0
        return valid if valid.device == device else valid.to(device)
    if isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[-1] >= past + seq_len:
        # a query is a real token exactly when it may attend to its own key slot
        own = torch.diagonal(mask[:, 0, -seq_len:, past : past + seq_len], dim1=1, dim2=2)
        allowed = own if own.dtype == torch.bool else own == 0
        return allowed.to(device).expand(batch, seq_len).clone()
    return torch.ones(batch, seq_len, dtype=torch.bool, device=device)


def _positions(
    inputs: ForwardInputs,
    state: CacheState | None,
    valid: torch.Tensor,
    batch: int,
    seq_len: int,
    past: int,
    device: torch.device,
) -> torch.Tensor:
    """Absolute positions, padding not counted."""
    mask = inputs.attention_mask
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] == past + seq_len:
        # the whole row's mask: count its real tokens (also right for right padding, where
        # generate's own position_ids repeat a position)
        mask = mask if mask.device == device else mask.to(device)
        if seq_len == 1:  # a decode step: the count, no running sum
            return mask.sum(1, keepdim=True, dtype=torch.long) - 1
        return (mask.long().cumsum(1) - 1)[:, past:]
    pos_ids = inputs.position_ids
    if isinstance(pos_ids, torch.Tensor) and pos_ids.dim() == 2 and pos_ids.shape[-1] == seq_len:
        # a copy: the caller may reuse its position_ids tensor before the writer reads this one
        return pos_ids.to(device=device, dtype=torch.long, copy=True).expand(batch, seq_len)
    running = valid.long().cumsum(1) - 1
    if state is not None and past > 0:
        return state.next_positions().to(device) + running
    if past == 0:
        return running
    return torch.arange(past, past + seq_len, device=device).expand(batch, seq_len)
