"""`routescope.compare(run_a, run_b)`: what changed in routing between two runs.

Per layer and expert the load and share deltas, per layer the balance metrics of both runs
and their change, the experts that died or became hot, and router saturation (OLMoE): how
many of a token's top-k experts stay the same for the same token in both runs, tokens
matched by content (SPEC 4.7, `content.py`), with the exact agreement of the sets and, over
all layers, R3's statistics (`token_agreement`: any_layer_differs, missing_routes). Run B's routing parts are read inside run A's
DuckDB connection, so no routing table is copied.
Used by the `compare` command of the CLI and by notebooks.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from routescope import schema
from routescope.analysis import metrics
from routescope.analysis.content import match_by_content
from routescope.analysis.querying import quiet_selection, selected_nothing, warn_if_empty
from routescope.analysis.run import Run, open_run
from routescope.analysis.saturation import agreement_table, keys_fit
from routescope.store.layout import list_parts

BALANCE_METRICS = ("cv", "max_violation", "balancedness", "norm_entropy", "aux_loss", "aux_loss_step_mean")
CHANGES = ("died", "revived", "became_hot", "cooled")
SATURATION_COLUMNS = ["layer", "top_k", "tokens_matched", "saturation", "top1_agreement", "exact_match"]
AGREEMENT_COLUMNS = ["tokens_matched", "any_layer_differs", "missing_routes", "layers"]


@dataclass
class Comparison:
    """The result of `compare`: DataFrames keyed by layer (and expert), B minus A in `*_delta`."""

    run_a: str
    run_b: str
    load: pd.DataFrame  # layer, expert, tokens_a, tokens_b, tokens_delta, share_a, share_b, share_delta
    balance: pd.DataFrame  # layer, then <metric>_a, <metric>_b, <metric>_delta per balance metric
    expert_changes: pd.DataFrame  # layer, expert, change, share_a, share_b
    saturation: pd.DataFrame  # layer, top_k, tokens_matched, saturation, top1_agreement, exact_match
    notes: list[str] = field(default_factory=list)
    # one row over all common layers: tokens_matched, any_layer_differs, missing_routes, layers
    token_agreement: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=AGREEMENT_COLUMNS))

    def tables(self) -> dict[str, pd.DataFrame]:
        return {
            "balance": self.balance,
            "expert_changes": self.expert_changes,
            "saturation": self.saturation,
            "token_agreement": self.token_agreement,
            "load": self.load,
        }

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready document (NaN becomes None)."""
        return {
            "run_a": self.run_a,
            "run_b": self.run_b,
            "notes": list(self.notes),
            **{name: metrics.to_records(df) for name, df in self.tables().items()},
        }

    def __repr__(self) -> str:
        changes = self.expert_changes["change"].value_counts().to_dict() if len(self.expert_changes) else {}
        sat = self.saturation["saturation"].mean() if len(self.saturation) else math.nan
        differs = self.token_agreement["any_layer_differs"].iloc[0] if len(self.token_agreement) else math.nan
        return (
            f"Comparison({self.run_a!r} -> {self.run_b!r}: {len(self.balance)} layers, "
            f"expert changes {changes or 'none'}, mean saturation {sat:.3f}, "
            f"tokens differing in any layer {differs:.3f})"
        )

    def _repr_html_(self) -> str:
        parts = [f"<h4>routescope compare: {html.escape(self.run_a)} → {html.escape(self.run_b)}</h4>"]
        parts += [f"<p>{html.escape(note)}</p>" for note in self.notes]
        for name, df in self.tables().items():
            if name == "load":
                continue
            parts.append(f"<h5>{html.escape(name.replace('_', ' '))}</h5>")
            parts.append(df.to_html(index=False, max_rows=24, float_format=lambda v: f"{v:.4g}"))
        return "\n".join(parts)


def _open(run: Run | str | Path) -> tuple[Run, bool]:
    if isinstance(run, Run):
        return run, False
    return open_run(run), True


def load_delta(load_a: pd.DataFrame, load_b: pd.DataFrame) -> pd.DataFrame:
    df = load_a.merge(load_b, on=["layer", "expert"], how="outer", suffixes=("_a", "_b"))
    df = df.fillna({"tokens_a": 0, "tokens_b": 0}).astype({"tokens_a": "int64", "tokens_b": "int64"})
    df["tokens_delta"] = df["tokens_b"] - df["tokens_a"]
    df["share_delta"] = df["share_b"] - df["share_a"]
    cols = ["layer", "expert", "tokens_a", "tokens_b", "tokens_delta", "share_a", "share_b", "share_delta"]
    return df[cols].sort_values(["layer", "expert"], ignore_index=True)


def balance_delta(bal_a: pd.DataFrame, bal_b: pd.DataFrame) -> pd.DataFrame:
    names = [m for m in BALANCE_METRICS if m in bal_a.columns and m in bal_b.columns]
    df = bal_a[["layer", "tokens", *names]].merge(
        bal_b[["layer", "tokens", *names]], on="layer", how="outer", suffixes=("_a", "_b")
    )
    cols = ["layer", "tokens_a", "tokens_b"]
    for name in names:
        df[f"{name}_delta"] = df[f"{name}_b"] - df[f"{name}_a"]
        cols += [f"{name}_a", f"{name}_b", f"{name}_delta"]
    return df[cols].sort_values("layer", ignore_index=True)


def expert_changes(
    load: pd.DataFrame, dead_a: pd.DataFrame, dead_b: pd.DataFrame, hot_a: pd.DataFrame, hot_b: pd.DataFrame
) -> pd.DataFrame:
    """Experts dead or hot in exactly one of the runs, named by what happened from A to B."""

    def keys(df: pd.DataFrame) -> set[tuple[int, int]]:
        return {(int(r.layer), int(r.expert)) for r in df.itertuples()}

    sets = {
        "died": keys(dead_b) - keys(dead_a),
        "revived": keys(dead_a) - keys(dead_b),
        "became_hot": keys(hot_b) - keys(hot_a),
        "cooled": keys(hot_a) - keys(hot_b),
    }
    rows = [(layer, expert, change) for change in CHANGES for layer, expert in sets[change]]
    changes = pd.DataFrame(rows, columns=["layer", "expert", "change"])
    shares = load[["layer", "expert", "share_a", "share_b"]].astype({"layer": "int64", "expert": "int64"})
    out = changes.astype({"layer": "int64", "expert": "int64"}).merge(
        shares, on=["layer", "expert"], how="left"
    )
    return out.sort_values(["layer", "expert", "change"], ignore_index=True)


def content_tokens(run: Run, where: str | None) -> dict[str, np.ndarray]:
    """seq_id, pos, token_id of every token of `run`, and `selected` by `where`; an imported
    run's context tokens (prompt ids the server returned no routing for) complete the prefixes."""
    name = "content_tokens_with_context" if run.has_table(schema.CONTEXT_TOKENS) else "content_tokens"
    df = metrics.query(run, name, where=where)
    return {name: df[name].to_numpy() for name in ("seq_id", "pos", "token_id", "selected", "routed")}


def router_saturation(run_a: Run, run_b: Run, where: str | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Per common MoE layer: tokens_matched, saturation, top1_agreement and exact_match over the
    tokens whose content is in both runs (`router_agreement`'s first table)."""
    saturation, _, notes = router_agreement(run_a, run_b, where)
    return saturation, notes


def router_agreement(
    run_a: Run, run_b: Run, where: str | None = None
) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """SPEC 4.7 over the tokens whose content (token ids from position 0 up to them) is in both
    runs. Per common MoE layer: tokens_matched, mean |topk_A ∩ topk_B| / k (saturation), slot-0
    agreement and exact_match (the top-k sets equal). Over all common layers, one row:
    tokens_matched, any_layer_differs (the fraction of matched tokens whose set differs in at
    least one layer), missing_routes (the fraction of B's tokens with no routing: an import's
    context tokens; over all of B's tokens, since `where` cannot select context tokens), layers.

    `where` selects tokens in each run; seq_ids, batch order and batch size do not matter.
    """
    notes = []
    layers = [layer for layer in run_a.moe_layers if layer in set(run_b.moe_layers)]
    skipped = set(run_b.skipped)
    b_routing = [str(p) for p in list_parts(run_b.path, "routing") if p not in skipped]
    empty = pd.DataFrame(columns=SATURATION_COLUMNS)

    def nothing(note: str) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
        return empty, token_agreement(0, 0, math.nan, len(layers)), [note]

    if not layers:
        return nothing("the runs share no MoE layer: no router saturation")
    for run, name in ((run_a, "A"), (run_b, "B")):
        if metrics.counts_only(run):
            return nothing(f"run {name} holds expert counts only: router saturation needs per-token routing")
        if str((run.manifest.get("imported_from") or {}).get("token_ids", "")).startswith("none"):
            return nothing(
                f"run {name} has no token ids (token_id -1): router saturation matches tokens by content"
            )
    if not b_routing or not run_b.has_table("tokens"):
        return nothing(f"{run_b.path} has no tokens or routing parts yet: no router saturation")
    top_k = [min(run_a.top_k(layer), run_b.top_k(layer)) for layer in layers]
    if any(run_a.top_k(layer) != run_b.top_k(layer) for layer in layers):
        notes.append("top-k differs between the runs: saturation divides by the smaller k")
    layer_values = {
        "layers": layers,
        "num_experts": [run_a.num_experts(layer) for layer in layers],
        "top_k": top_k,
    }
    tokens_a, tokens_b = content_tokens(run_a, where), content_tokens(run_b, where)
    pairs, counts = match_by_content(tokens_a, tokens_b)
    slots = max(max(run_a.top_k(layer), run_b.top_k(layer)) for layer in layers)
    # the scan reads rows in file order: not through the joined views of a run with skipped parts
    packed = not run_a.skipped and keys_fit(
        (tokens_a["seq_id"], tokens_a["pos"]), (tokens_b["seq_id"], tokens_b["pos"])
    )
    agreement = agreement_table(
        run_a.con, pairs, layers, layer_values["top_k"], slots, b_routing, scan=packed
    )
    routed_b = tokens_b["routed"].astype(bool)
    missing = float((~routed_b).mean()) if len(routed_b) else math.nan
    summary = token_agreement(agreement.tokens_matched, agreement.tokens_differing, missing, len(layers))
    selected, matched, keyless = counts["selected_a"], counts["matched"], counts["keyless_a"]
    if matched == 0:
        notes.append(
            f"no token of A ({selected} selected) has the same content in B (the same token ids "
            "from position 0 up to it): router saturation is NaN"
        )
    elif matched < selected:
        notes.append(
            f"router saturation covers the {matched} of {selected} selected tokens of A whose content is in B"
        )
    if keyless:
        notes.append(
            f"{keyless} selected tokens of A lack an earlier position of their sequence in the run, "
            "so their content is unknown and they match nothing"
        )
    return agreement.per_layer.astype({"tokens_matched": "int64"}), summary, notes


def token_agreement(matched: int, differing: int, missing_routes: float, layers: int) -> pd.DataFrame:
    """The one-row `token_agreement` table (NaN any_layer_differs when no token matched)."""
    return pd.DataFrame(
        {
            "tokens_matched": np.array([matched], dtype=np.int64),
            "any_layer_differs": [differing / matched if matched else math.nan],
            "missing_routes": [missing_routes],
            "layers": np.array([layers], dtype=np.int64),
        }
    )


def compare(
    run_a: Run | str | Path,
    run_b: Run | str | Path,
    where: str | None = None,
    hot_factor: float = 2.0,
    max_share: float = 0.0,
    saturation: bool = True,
) -> Comparison:
    """Compare run B against run A (paths or open Runs); `where` filters the tokens of both.
    A `where` that selects no token of a run warns and says so in `notes`. `saturation=False`
    leaves out router saturation and token agreement (empty frames): they match every token of
    the two runs by content, which takes longest on large runs, while the load and balance parts
    read the rollup tables (the dashboard draws them first)."""
    a, close_a = _open(run_a)
    try:
        b, close_b = _open(run_b)
        try:
            notes = []
            for run, name in ((a, "A"), (b, "B")):
                if selected_nothing(run, where):
                    warn_if_empty(run, where, f"compare() run {name}")
                    notes.append(
                        f"where={where!r} selects no token of run {name}: its numbers are NaN or zero"
                    )
            if a.moe_layers != b.moe_layers:
                notes.append(f"MoE layers differ: A {a.moe_layers}, B {b.moe_layers}")
            for layer in set(a.moe_layers) & set(b.moe_layers):
                if a.num_experts(layer) != b.num_experts(layer):
                    notes.append(
                        f"layer {layer}: A has {a.num_experts(layer)} experts, B {b.num_experts(layer)}"
                    )
            for run, name in ((a, "A"), (b, "B")):
                if run.skipped:
                    notes.append(
                        f"run {name} ({run.path}) is INCOMPLETE: {len(run.skipped)} corrupt part(s) skipped"
                    )
                elif not run.complete:
                    notes.append(f"run {name} ({run.path}) is INCOMPLETE: still recording or crashed")
            with quiet_selection():  # said once above, not once per metric
                load = load_delta(a.expert_load(where=where), b.expert_load(where=where))
                balance = balance_delta(a.balance(where=where), b.balance(where=where))
                changes = expert_changes(
                    load,
                    a.dead_experts(max_share=max_share, where=where),
                    b.dead_experts(max_share=max_share, where=where),
                    a.hot_experts(factor=hot_factor, where=where),
                    b.hot_experts(factor=hot_factor, where=where),
                )
                if saturation:
                    sat, agreement, more = router_agreement(a, b, where=where)
                else:
                    sat, agreement, more = pd.DataFrame(columns=SATURATION_COLUMNS), None, []
            return Comparison(
                str(a.path),
                str(b.path),
                load,
                balance,
                changes,
                sat,
                notes=notes + more,
                **({"token_agreement": agreement} if agreement is not None else {}),
            )
        finally:
            if close_b:
                b.close()
    finally:
        if close_a:
            a.close()
