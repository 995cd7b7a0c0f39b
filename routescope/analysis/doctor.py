"""`run.doctor()` (SPEC 4.8): the run's numbers turned into findings, each with its evidence,
a query that shows it, and a suggestion. `routescope doctor`, the verdict at the top of
`routescope report` and of the dashboard's Overview all read this.

The checks run in a fixed order (`CHECKS`), each a function of one `Context` (the run, the
thresholds, the selection and the loads they share) returning finding dicts. The load rules are
`doctor_rules.judge_layer`, the same rules `rs.watch` alerts apply to a training window; drift
over steps is `doctor_drift`. A check that found nothing adds one `ok` row, so the table also
says what was checked; one that cannot run on this run (no router_tokens, no weights) says so
as `info`. SQL lives in `queries/doctor.sql`; nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from routescope import schema
from routescope.analysis import metrics
from routescope.analysis.doctor_drift import drift_findings
from routescope.analysis.doctor_rules import SEVERITY_RANK, DoctorThresholds, finding, judge_layer
from routescope.analysis.querying import counts_only, query
from routescope.analysis.quick_check import quick_check
from routescope.analysis.runview import RunView as Run
from routescope.analysis.sqlfiles import get_query
from routescope.analysis.superexperts import classify_super_experts

COLUMNS = ["severity", "finding", "layer", "expert", "step", "evidence", "sql", "suggestion", "magnitude"]
# Skipped-work reasons the recorder leaves out by design (capture/recording/recorder.py).
QUIET_SKIPS = {"rows_finished", "rejected_candidates"}


@dataclass
class Context:
    """What the checks share: computed once per doctor() call."""

    run: Run
    th: DoctorThresholds
    where: str | None
    loads: pd.DataFrame = field(default_factory=pd.DataFrame)
    step_loads: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def layers(self) -> dict[int, tuple[int, int]]:
        return {layer: (self.run.num_experts(layer), self.run.top_k(layer)) for layer in self.run.moe_layers}


def show_sql(name: str, **values: int | float) -> str:
    """The text of `show_*` query `name` with its parameters written in (ints and floats only),
    for the user to paste into run.sql(); the doctor's own passes bind their parameters."""
    text = get_query(name).sql
    for key, value in sorted(values.items(), key=lambda kv: -len(kv[0])):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise TypeError(f"show_sql({name!r}): {key} must be a number, got {type(value).__name__}")
        literal = str(int(value)) if isinstance(value, (int, np.integer)) else repr(float(value))
        text = text.replace(f"${key}", literal)
    return " ".join(text.split())


def step_loads(run: Run, where: str | None) -> pd.DataFrame:
    """step, layer, expert, tokens: `metrics.step_expert_loads` (from `rollup_expert_counts`
    when the run has it), or without rollups the same counts joined by seq_id alone when nothing
    is filtered and no sequence spans steps (a prefill-only run): the join on (seq_id, pos) is
    most of the doctor's time on a large run without rollups."""
    one_step = (
        where is None
        and not counts_only(run)
        and schema.ROLLUP_EXPERT_COUNTS not in getattr(run, "rollups", ())
    )
    if one_step and int(query(run, "doctor_sequences_over_steps")["sequences"].iloc[0]) == 0:
        return query(run, "doctor_step_loads_by_sequence")
    return metrics.step_expert_loads(run, where=where)


# -- the checks -----------------------------------------------------------------------------
def damage_findings(ctx: Context) -> list[dict[str, Any]]:
    """Cheap invariants (the full check is `routescope check`): skipped corrupt parts, an
    incomplete manifest, and `quick_check` (parts against the manifest, copied parts, from
    Parquet footers only), the check `open_run`, `report` and the dashboard share."""
    run, m, out = ctx.run, ctx.run.manifest, []
    check = "run `routescope check RUN` for the full invariant check"
    skipped = m.get("skipped_corrupt_parts") or []
    if skipped:
        out.append(
            finding(
                "critical",
                "damaged_run",
                None,
                None,
                None,
                f"{len(skipped)} corrupt part(s) skipped ({', '.join(skipped)}); the numbers leave out "
                "their tokens and steps",
                f"re-record, or accept the partial run; {check}",
            )
        )
    if not m.get("complete", False):
        out.append(
            finding(
                "warning",
                "incomplete_run",
                None,
                None,
                None,
                "the manifest says complete = false: the run is still being written, or its recording "
                "stopped before a clean exit",
                f"wait for the recording to finish, or {check}",
            )
        )
    if not skipped:
        # parts against the manifest and copied parts, from footers only (analysis/quick_check.py)
        problems = run.damage if getattr(run, "damage", None) else quick_check(run)
        for problem in problems:
            out.append(
                finding(
                    "critical",
                    "damaged_run",
                    None,
                    None,
                    None,
                    problem,
                    check,
                    sql="SELECT count(*) FROM tokens",
                )
            )
    lost = {k: int(v) for k, v in (m.get("skipped") or {}).items() if k not in QUIET_SKIPS and int(v)}
    if lost:
        out.append(
            finding(
                "warning",
                "unrecorded_work",
                None,
                None,
                None,
                "the recorder could not record: "
                + ", ".join(f"{k} = {v:,}" for k, v in sorted(lost.items())),
                "docs/capture.md explains each reason; the numbers leave that work out",
            )
        )
    return out


def verified_findings(ctx: Context) -> list[dict[str, Any]]:
    m = ctx.run.manifest
    verified = m.get("verified")
    if verified is True:
        return []
    if verified is False:
        why = m.get("unverified_reason") or "the model type is not in the verified table"
        version = (m.get("versions") or {}).get("transformers") or "?"
        return [
            finding(
                "warning",
                "unverified_model",
                None,
                None,
                None,
                f"model type {m.get('model_type')!r} with transformers {version}: {why}",
                "check a few routing rows against the model's own router output before trusting the "
                "numbers (docs/models.md), or record with a verified transformers version",
            )
        ]
    return [
        finding(
            "info",
            "unverified_model",
            None,
            None,
            None,
            "the manifest does not say whether the model type was verified (an imported or older run)",
            "nothing to do unless the numbers look wrong",
        )
    ]


def load_findings(ctx: Context) -> list[dict[str, Any]]:
    """Dead and hot experts and unbalanced or collapsed layers over the selected tokens."""
    layers = ctx.layers
    tests = sum(e for e, _ in layers.values())
    first_step = int(ctx.step_loads["step"].min()) if len(ctx.step_loads) else None
    out = []
    for layer, (num_experts, top_k) in sorted(layers.items()):
        part = ctx.loads[ctx.loads["layer"] == layer].sort_values("expert")
        loads = np.zeros(num_experts)
        loads[part["expert"].to_numpy(dtype=np.int64)] = part["tokens"].to_numpy(dtype=np.float64)
        for row in judge_layer(layer, loads, top_k, ctx.th, tests, len(layers)):
            if row["finding"] == "dead_expert":
                row["step"] = first_step  # dead from the first step recorded
                row["evidence"] = f"dead from step {first_step}: " + row["evidence"]
            row["sql"] = show_sql("show_expert_load", layer=layer)
            out.append(row)
    return out


def drift_check(ctx: Context) -> list[dict[str, Any]]:
    return drift_findings(ctx.step_loads, ctx.layers, ctx.th, show_sql)


def near_tie_findings(ctx: Context) -> list[dict[str, Any]]:
    """Tokens whose top-1 and top-2 router probabilities nearly tie (router_tokens margins)."""
    run, th = ctx.run, ctx.th
    if counts_only(run) or not run.has_table("router_tokens"):
        return [
            finding(
                "info",
                "near_ties",
                None,
                None,
                None,
                "not measured: the run has no router_tokens table (router margins)",
                "record with rs.record(..., router_stats=True) to see how close the router's choices are",
            )
        ]
    df = query(run, "doctor_near_ties", where=ctx.where, margin=float(th.near_tie_margin))
    out = []
    for row in df.itertuples(index=False):
        if not row.near_ties:
            continue
        share = row.near_ties / row.tokens
        k = run.top_k(int(row.layer))
        boundary = (
            "the top-1 boundary, where k = 1 chooses"
            if k == 1
            else f"the order of the first two choices (slot 0; with k = {k} the set changes only at "
            "the k-th choice, which router_tokens does not record)"
        )
        out.append(
            finding(
                "warning" if share >= th.near_tie_warning else "info",
                "near_ties",
                int(row.layer),
                None,
                None,
                f"{int(row.near_ties):,} of {int(row.tokens):,} tokens ({share:.1%}) have a top-1 minus "
                f"top-2 probability below {th.near_tie_margin:.4g} (bf16's resolution), median margin "
                f"{row.median_margin:.4g}: {boundary} can flip between a bf16 and an fp32 forward",
                "expect rollout/trainer routing mismatches (R3) on these tokens; compare runs with "
                "rs.compare(...).saturation, or replay the rollout's routing (rs.replay)",
                sql=show_sql("show_near_ties", layer=int(row.layer), margin=float(th.near_tie_margin)),
                magnitude=share,
            )
        )
    return out


def _has_weights(run: Run) -> bool:
    """Whether routing holds combine weights (weights=False recordings and imports have none)."""
    m = run.manifest
    if m.get("weights") is False or m.get("weights_recorded") is False:
        return False
    return "weight" in run.sql("SELECT * FROM routing LIMIT 0").columns


def capacity_findings(ctx: Context) -> list[dict[str, Any]]:
    """Slots recorded with weight 0: the expert capacity dropped them (Switch, NLLB-MoE adapters)."""
    run, th = ctx.run, ctx.th
    if counts_only(run) or not _has_weights(run):
        return [
            finding(
                "info",
                "capacity_drops",
                None,
                None,
                None,
                "not measured: the run records no combine weights (a dropped slot is recorded with "
                "weight 0), and no engine import records dropped tokens",
                "record with weights to see capacity drops",
            )
        ]
    df = query(run, "doctor_capacity_drops", where=ctx.where, uses=("expert_counts",))
    out = []
    for row in df.itertuples(index=False):
        if not row.dropped:
            continue
        share = row.dropped / row.slots
        out.append(
            finding(
                "warning" if share >= th.capacity_drop_warning else "info",
                "capacity_drops",
                int(row.layer),
                None,
                None,
                f"{int(row.dropped):,} of {int(row.slots):,} routing slots ({share:.2%}) recorded with "
                "weight 0: the expert capacity dropped them (no expert ran for that slot)",
                "raise the capacity factor, or balance the load so fewer experts overflow",
                sql=show_sql("show_dropped_slots", layer=int(row.layer)),
                magnitude=share,
            )
        )
    return out


def super_expert_findings(ctx: Context) -> list[dict[str, Any]]:
    run = ctx.run
    if not run.has_table("expert_activations"):
        return []
    acts = metrics.expert_activations(run)
    classified = classify_super_experts(acts, int(run.manifest.get("num_hidden_layers") or 0))
    th = classified.attrs.get("thresholds", {})
    out = []
    for row in classified[classified["is_super"]].itertuples(index=False):
        out.append(
            finding(
                "info",
                "super_experts",
                int(row.layer),
                int(row.expert),
                None,
                f"{'shared' if row.shared else 'routed'} expert with max |output| {row.max_abs_output:.4g} "
                f"(above P{th.get('quantile', 99.5)} = {th.get('percentile_threshold', float('nan')):.4g} and "
                f"max/10 = {th.get('max_threshold', float('nan')):.4g}) in channel {row.channel}",
                "keep it when pruning, merging or quantizing experts: Super Experts carry the "
                "massive activations (arXiv 2507.23279)",
                sql=show_sql("show_super_experts"),
                magnitude=float(row.max_abs_output),
            )
        )
    return out


Check = Callable[[Context], list[dict[str, Any]]]
# name -> (check, the findings it can raise, for the `ok` row when it raised none)
CHECKS: dict[str, tuple[Check, tuple[str, ...]]] = {
    "run integrity": (damage_findings, ("damaged_run",)),
    "model verification": (verified_findings, ("unverified_model",)),
    "expert loads": (load_findings, ("dead_expert", "hot_expert", "layer_collapse", "layer_imbalance")),
    "drift over steps": (drift_check, ("routing_drift",)),
    "router margins": (near_tie_findings, ("near_ties",)),
    "capacity": (capacity_findings, ("capacity_drops",)),
    "Super Experts": (super_expert_findings, ()),
}
OK_TEXT = {
    "damaged_run": "no part was skipped, and a complete run's manifest counts the tokens its parts hold",
    "unverified_model": "the model type and transformers version are in the verified table",
    "dead_expert": "every expert received tokens (or too few tokens to tell)",
    "hot_expert": "no expert's share stands above {hot:g}x uniform beyond chance",
    "layer_collapse": "no layer's spread of effective experts is at or below {collapse:g}",
    "layer_imbalance": "every layer's cv and Gini are below {cv:g} and {gini:g}, or within chance",
    "routing_drift": "no expert dies and no layer's balance changes between steps beyond chance",
    "near_ties": "no token's top-1 and top-2 probabilities are within {margin:.4g}",
    "capacity_drops": "no routing slot was recorded with weight 0",
}


def doctor(
    run: Run,
    thresholds: DoctorThresholds | None = None,
    where: str | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """One row per finding (SPEC 4.8): severity, finding, layer, expert, step, evidence, sql,
    suggestion (+ magnitude, for ranking within a finding), most severe first."""
    th = thresholds or DoctorThresholds()
    if not isinstance(th, DoctorThresholds):
        raise ValueError(f"thresholds must be a DoctorThresholds, not {type(th).__name__}")
    where = metrics.check_where(run, where)
    ctx = Context(run, th, where)
    ctx.loads = metrics.expert_load(run, where=where)
    ctx.step_loads = step_loads(run, where)
    rows: list[dict[str, Any]] = []
    from tqdm.auto import tqdm

    for name, (check, names) in tqdm(CHECKS.items(), desc="doctor", unit="check", disable=not progress):
        found = check(ctx)
        rows += found
        raised = {r["finding"] for r in found}
        for kind in names:
            if kind not in raised:
                text = OK_TEXT[kind].format(
                    hot=th.hot_factor,
                    collapse=th.collapse_spread,
                    cv=th.cv_band,
                    gini=th.gini_band,
                    margin=th.near_tie_margin,
                )
                rows.append(finding("ok", kind, None, None, None, f"{name}: {text}", ""))
    return sort_findings(pd.DataFrame(rows, columns=COLUMNS))


# Within a severity, kinds in this order; the ranking takes each kind's largest first, then each
# kind's second, ... so ten lines show every kind of trouble before the tenth hot expert.
KIND_ORDER = (
    "damaged_run",
    "layer_collapse",
    "dead_expert",
    "routing_drift",
    "layer_imbalance",
    "hot_expert",
    "capacity_drops",
    "near_ties",
    "unverified_model",
    "incomplete_run",
    "unrecorded_work",
    "super_experts",
)


def sort_findings(df: pd.DataFrame) -> pd.DataFrame:
    """Most severe first; within a severity, round-robin over the kinds (each kind's largest
    magnitude first, kinds in KIND_ORDER), so the top of the table covers every kind."""
    out = df.astype({"layer": "Int64", "expert": "Int64", "step": "Int64", "magnitude": "float64"})
    kind = out["finding"].map({name: i for i, name in enumerate(KIND_ORDER)}).fillna(len(KIND_ORDER))
    within = out.groupby(["severity", "finding"])["magnitude"].rank(method="first", ascending=False)
    order = pd.DataFrame(
        {
            "rank": -out["severity"].map(SEVERITY_RANK),
            "within": within,
            "kind": kind,
            "magnitude": -out["magnitude"],
        }
    ).sort_values(["rank", "within", "kind", "magnitude"], kind="stable")
    return out.loc[order.index].reset_index(drop=True)


# -- verdict and grouping (report, dashboard, CLI) -------------------------------------------
def verdict(findings: pd.DataFrame) -> dict[str, Any]:
    """severity (the worst found), counts per severity and a one-line headline."""
    counts = {s: int((findings["severity"] == s).sum()) for s in SEVERITY_RANK}
    worst = max((s for s, n in counts.items() if n), key=SEVERITY_RANK.get, default="ok")
    serious = findings[findings["severity"].isin(["warning", "critical"])]
    if worst in ("ok", "info"):
        headline = "healthy: nothing above info" + (f" ({counts['info']} notes)" if counts["info"] else "")
    else:
        kinds = serious.groupby("finding", sort=False).size()
        parts = ", ".join(f"{name} x{n}" for name, n in kinds.items())
        headline = f"{worst}: {counts['critical']} critical, {counts['warning']} warning finding(s): {parts}"
    return {"severity": worst, "counts": counts, "headline": headline}


def group_findings(findings: pd.DataFrame) -> pd.DataFrame:
    """finding, severity, count, layers (how many), worst first: the alerts grouped."""
    shown = findings[findings["severity"] != "ok"]
    if shown.empty:
        return pd.DataFrame(columns=["finding", "severity", "count", "layers"])
    groups = (
        shown.groupby(["finding", "severity"], sort=False)
        .agg(count=("finding", "size"), layers=("layer", "nunique"))
        .reset_index()
    )
    groups["rank"] = groups["severity"].map(SEVERITY_RANK)
    return groups.sort_values(["rank", "count"], ascending=False).drop(columns="rank").reset_index(drop=True)


def exit_code(findings: pd.DataFrame) -> int:
    """`routescope doctor`'s exit code: 0 healthy, 1 warnings, 3 critical."""
    return {"critical": 3, "warning": 1}.get(verdict(findings)["severity"], 0)
