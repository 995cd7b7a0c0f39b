"""Successive imports into one run (`routescope import ... --append`) and labels on an
imported batch (`--labels rollout_step=12`).

RL frameworks write one file of rollouts per training step; each becomes a batch of the same
run, as successive `rs.record(..., mode="append")` blocks are. The store's `RunDirectory`
holds the writer lock and says where the run stands (`Continuation`); here the batch's
seq_ids and steps are moved past the run's (also past what its parts hold, for runs imported
before the manifest kept `next_seq_id`), the labels become VARCHAR columns of `tokens`, and
the manifest counts the run as a whole, with every batch listed under `imports`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from routescope import schema
from routescope.importers.core.errors import ImportFormatError
from routescope.store.rundir import Continuation, parts_extent


def label_batch(imported: Any, labels: dict[str, str]) -> Any:
    """`imported` with one VARCHAR column per label in its tokens (every row the same value)."""
    if not labels:
        return imported
    if imported.tokens is None:
        raise ImportFormatError("--labels needs a per-token import (this file holds expert counts only)")
    checked = schema.check_labels(labels)
    clash = sorted(set(checked) & set(imported.labels))
    if clash:
        raise ValueError(f"--labels {', '.join(clash)}: the file already sets that label")
    rows = len(imported.tokens["seq_id"])
    tokens = {**imported.tokens, **{k: np.full(rows, v, dtype=object) for k, v in checked.items()}}
    return replace(imported, tokens=tokens, labels=[*imported.labels, *checked])


def continue_batch(imported: Any, start: Continuation, own_parts: dict[str, list[Any]]) -> Any:
    """`imported` moved past the run it is appended to: seq_ids from the run's next_seq_id and
    steps from its step count (the larger of the manifest's and the parts' own, from footers)."""
    if not start.tokens and not any(own_parts.values()):
        return imported
    if imported.tokens is None:
        raise ImportFormatError("--append needs a per-token import (this file holds expert counts only)")
    extent = parts_extent(own_parts)
    first_seq = max(start.next_seq_id, extent.next_seq_id)
    first_step = max(start.steps, extent.next_step)
    moved = {}
    for table in ("tokens", "routing", "context_tokens"):
        columns = getattr(imported, table)
        if columns is None:
            continue
        columns = dict(columns, seq_id=np.asarray(columns["seq_id"], dtype=np.int64) + first_seq)
        if "step" in columns:
            columns["step"] = np.asarray(columns["step"]) + first_step
        moved[table] = columns
    return replace(imported, **moved)


def check_same_model(old: dict[str, Any], imported: Any) -> None:
    """An appended batch must come from the same model: the same experts and top-k per layer."""
    for key, new in (("num_experts", imported.num_experts), ("top_k", imported.top_k)):
        said = {int(k): int(v) for k, v in (old.get(key) or {}).items()}
        if said and said != {int(k): int(v) for k, v in new.items()}:
            raise ValueError(
                f"cannot append: the run has {key} {said}, this file {dict(sorted(new.items()))}"
            )
    if bool(old.get("counts_only")) != bool(imported.counts_only):
        raise ValueError("cannot append a per-token import to a counts-only run, or the reverse")


def appended_manifest(manifest: dict[str, Any], old: dict[str, Any], start: Continuation) -> dict[str, Any]:
    """The manifest of the run after this batch: counts of the whole run, labels united, and
    each batch's `imported_from` under `imports` (oldest first)."""
    earlier = old.get("imports") or ([old["imported_from"]] if "imported_from" in old else [])
    labels = list(start.labels) + [name for name in manifest.get("labels", []) if name not in start.labels]
    return {
        **manifest,
        "tokens": start.tokens + int(manifest.get("tokens", 0)),
        "labels": labels,
        "imports": [*earlier, manifest["imported_from"]],
        "created_at": start.created_at or manifest.get("created_at"),
    }


def counters(imported: Any) -> dict[str, int]:
    """next_seq_id and steps of a run after `imported` (kept in the manifest for the next append)."""
    if imported.tokens is None or not len(imported.tokens["seq_id"]):
        return {}
    seq_ids = [np.asarray(imported.tokens["seq_id"])]
    if imported.context_tokens is not None and len(imported.context_tokens["seq_id"]):
        seq_ids.append(np.asarray(imported.context_tokens["seq_id"]))
    return {
        "next_seq_id": int(max(int(s.max()) for s in seq_ids)) + 1,
        "steps": int(np.asarray(imported.tokens["step"]).max()) + 1,
    }
