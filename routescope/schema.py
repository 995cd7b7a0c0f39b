"""Column names and Arrow types of every run table: the one place they are spelled out.

The capture layer builds tables with these schemas, the store writes them and the
analysis layer reads them; SPEC section 3 is the contract behind this module.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

FORMAT_VERSION = 1

TOKENS = "tokens"
ROUTING = "routing"
ROUTER_STATS = "router_stats"
ROUTER_TOKENS = "router_tokens"
EXPERT_ACTIVATIONS = "expert_activations"
HIDDEN_STATS = "hidden_stats"
EXPERT_COUNTS = "expert_counts"
CONTEXT_TOKENS = "context_tokens"
# Rollup tables (SPEC 3.3, docs/run_format.md): small summaries of `routing`; rollup part N
# summarises routing part N of the same rank. Their key columns are the token *dimensions*:
# every tokens column except ROLLUP_NON_DIMENSIONS (step, phase, modality, stack, train_step
# when present, the labels), typed as in tokens.
ROLLUP_EXPERT_COUNTS = "rollup_expert_counts"
ROLLUP_TOP1_PAIRS = "rollup_top1_pairs"
ROLLUP_REPETITION = "rollup_repetition"
ROLLUP_COACTIVATION = "rollup_coactivation"
ROLLUP_NON_DIMENSIONS = frozenset({"seq_id", "pos", "token_id", "rank"})
# Measure columns after the dimensions (rollup_repetition also has prev_<dimension> columns:
# the dimensions of the earlier token of each pair).
ROLLUP_MEASURES: dict[str, dict[str, pa.DataType]] = {
    ROLLUP_EXPERT_COUNTS: {
        "layer": pa.int16(),
        "expert": pa.int16(),
        "tokens": pa.int64(),
        "first": pa.int64(),
    },
    ROLLUP_TOP1_PAIRS: {
        "layer": pa.int16(),
        "next_layer": pa.int16(),
        "expert_a": pa.int16(),
        "expert_b": pa.int16(),
        "count": pa.int64(),
    },
    ROLLUP_REPETITION: {
        "layer": pa.int16(),
        "pairs": pa.int64(),
        "repeats": pa.int64(),
        "repeats_top2": pa.int64(),
    },
    ROLLUP_COACTIVATION: {
        "layer": pa.int16(),
        "expert_a": pa.int16(),
        "expert_b": pa.int16(),
        "count": pa.int64(),
    },
}
ROLLUP_TABLES: tuple[str, ...] = tuple(ROLLUP_MEASURES)
ROLLUP_PREVIOUS = "prev_"  # prefix of rollup_repetition's earlier-token dimension columns

TOKEN_COLUMNS: dict[str, pa.DataType] = {
    "seq_id": pa.int64(),
    "pos": pa.int32(),
    "token_id": pa.int32(),
    "step": pa.int32(),
    "phase": pa.string(),
}

# Token columns added within format 1: the recorder writes them, and readers give a part
# without them (recorded earlier, or imported) the default value. Each groups tokens like a
# label does: where="modality = 'image'", specialization(by="stack").
TOKEN_EXTRA_COLUMNS: dict[str, pa.DataType] = {
    "modality": pa.string(),  # text, image, video, audio (capture/recording/modality.py)
    "stack": pa.string(),  # encoder or decoder (encoder-decoder models have both)
}
TOKEN_EXTRA_DEFAULTS: dict[str, str] = {"modality": "text", "stack": "decoder"}
# Token columns only some runs have: `train_step`, the optimizer step (1-based) whose gradients
# a token's forward went into, in runs recorded by rs.watch(..., out_dir=...).
TRAIN_STEP = "train_step"
TOKEN_OPTIONAL_COLUMNS: dict[str, pa.DataType] = {TRAIN_STEP: pa.int32()}
# Built-in token columns that specialization(by=...) accepts besides the run's labels.
GROUPING_COLUMNS: tuple[str, ...] = ("phase", *TOKEN_EXTRA_COLUMNS)

ROUTING_COLUMNS: dict[str, pa.DataType] = {
    "seq_id": pa.int64(),
    "pos": pa.int32(),
    "layer": pa.int16(),
    "slot": pa.int8(),
    "expert": pa.int16(),
    "weight": pa.float32(),
}

ROUTER_STATS_COLUMNS: dict[str, pa.DataType] = {
    "step": pa.int32(),
    "layer": pa.int16(),
    "expert": pa.int16(),
    "prob_sum": pa.float64(),
    "tokens": pa.int64(),
}

ROUTER_TOKENS_COLUMNS: dict[str, pa.DataType] = {
    "seq_id": pa.int64(),
    "pos": pa.int32(),
    "layer": pa.int16(),
    "entropy": pa.float32(),
    "margin": pa.float32(),
}

EXPERT_ACTIVATIONS_COLUMNS: dict[str, pa.DataType] = {
    "layer": pa.int16(),
    "expert": pa.int16(),
    "shared": pa.bool_(),
    "max_abs_output": pa.float32(),
    "channel": pa.int32(),
    "tokens_seen": pa.int64(),
}

HIDDEN_STATS_COLUMNS: dict[str, pa.DataType] = {
    "layer": pa.int16(),
    "max_abs": pa.float32(),
    "median_abs": pa.float32(),
    "channel": pa.int32(),
    "seq_id": pa.int64(),
    "pos": pa.int32(),
}

# Counts-only runs (imported from serving engines that keep per-expert counters, manifest
# `counts_only: true`): routing rows per (step, layer, expert), no per-token rows.
EXPERT_COUNTS_COLUMNS: dict[str, pa.DataType] = {
    "step": pa.int32(),
    "layer": pa.int16(),
    "expert": pa.int16(),
    "tokens": pa.int64(),
}

# Token ids without routing (imported runs): prompt positions whose routing the source never
# returned (a server asked to skip a known prefix, rows never computed). Not tokens of the run
# (SPEC 3.2 holds: every `tokens` row has k routing rows per MoE layer); they complete the
# sequences' content, so later tokens still match by content (replay, compare).
CONTEXT_TOKENS_COLUMNS: dict[str, pa.DataType] = {
    "seq_id": pa.int64(),
    "pos": pa.int32(),
    "token_id": pa.int32(),
}

TABLE_COLUMNS: dict[str, dict[str, pa.DataType]] = {
    TOKENS: TOKEN_COLUMNS,
    ROUTING: ROUTING_COLUMNS,
    ROUTER_STATS: ROUTER_STATS_COLUMNS,
    ROUTER_TOKENS: ROUTER_TOKENS_COLUMNS,
    EXPERT_ACTIVATIONS: EXPERT_ACTIVATIONS_COLUMNS,
    HIDDEN_STATS: HIDDEN_STATS_COLUMNS,
    EXPERT_COUNTS: EXPERT_COUNTS_COLUMNS,
    CONTEXT_TOKENS: CONTEXT_TOKENS_COLUMNS,
}

# Label columns live in `tokens` beside the fixed columns, so their names must not clash
# with any column a query joins on or reads.
RESERVED_LABELS = frozenset(
    set(TOKEN_COLUMNS)
    | set(TOKEN_EXTRA_COLUMNS)
    | set(TOKEN_OPTIONAL_COLUMNS)
    | set(ROUTING_COLUMNS)
    | set(ROUTER_TOKENS_COLUMNS)
    | {"rank", "tokens", "share"}
)

PHASE_PREFILL = "prefill"
PHASE_DECODE = "decode"
PHASE_UNKNOWN = "unknown"  # an imported file that cannot tell prefill from decode (SPEC 3.2)
STACK_ENCODER = "encoder"
STACK_DECODER = "decoder"


def schema_for(table: str, labels: tuple[str, ...] = ()) -> pa.Schema:
    """The Arrow schema of `table`; `tokens` gets one string column per label (and per extra
    column of TOKEN_EXTRA_COLUMNS named in `labels`)."""
    fields = [pa.field(name, dtype, nullable=False) for name, dtype in TABLE_COLUMNS[table].items()]
    if table == TOKENS:
        typed = {**TOKEN_EXTRA_COLUMNS, **TOKEN_OPTIONAL_COLUMNS}
        fields += [pa.field(label, typed.get(label, pa.string())) for label in labels]
    return pa.schema(fields)


def check_labels(labels: dict[str, Any]) -> dict[str, str | None]:
    """Label names must be identifiers and not clash with a column; values become strings."""
    checked: dict[str, str | None] = {}
    for name, value in labels.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"label name {name!r} is not allowed: use a Python identifier such as 'domain'")
        if name in RESERVED_LABELS or name.lower() in RESERVED_LABELS:
            allowed = "any identifier except " + ", ".join(sorted(RESERVED_LABELS))
            raise ValueError(
                f"label name {name!r} is reserved (a column of the run tables); allowed: {allowed}"
            )
        checked[name] = None if value is None else str(value)
    return checked
