"""The Run object: a recorded run directory opened for analysis through DuckDB.

`open_run` checks the manifest and every Parquet part, then exposes the tables as DuckDB
views (`tokens`, `routing`, and the optional tables). The metric methods bind the named
queries of `routescope/analysis/queries/`; the CLI, dashboard and notebooks call these.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from routescope import schema
from routescope.analysis import metrics
from routescope.analysis.display import run_html
from routescope.analysis.engines import build_views, connect
from routescope.analysis.rollup_build import build_rollups
from routescope.analysis.rollups import has_view
from routescope.errors import RunFormatError
from routescope.store.layout import list_parts, list_tables
from routescope.store.manifest import read_manifest

if TYPE_CHECKING:
    from routescope.analysis.doctor_rules import DoctorThresholds
    from routescope.analysis.verify import Verification

# Ranks other than 0 of a multi-process recording write their own manifest fragment.
RANK_MANIFEST_GLOB = "manifest.rank=*.json"


class Run:
    """A run directory opened for reading. Use `open_run(path)` to make one."""

    def __init__(
        self,
        path: Path,
        skip_corrupt: bool = False,
        threads: int | None = None,
        engine: str = "duckdb",
        spark: Any = None,
    ) -> None:
        self.path = Path(path)
        self.skip_corrupt = skip_corrupt
        # "duckdb" (in process) or "spark" (the same named SQL through sqlglot; engines.py)
        self.engine = engine
        self.con = connect(engine, threads=threads, spark=spark)
        self.skipped: list[Path] = []
        self.damage: list[str] = []  # quick_check's findings, set by open_run (analysis/quick_check.py)
        self.manifest: dict[str, Any] = {}
        self.refresh()

    def refresh(self) -> Run:
        """Re-read the manifest and pick up parts written since the run was opened."""
        self.manifest = merge_rank_manifests(self.path, read_manifest(self.path))
        self.skipped = build_views(self.con, self.path, self.labels, skip_corrupt=self.skip_corrupt)
        if self.skipped:
            self._mark_skipped()
        return self

    def _mark_skipped(self) -> None:
        """After skipped corrupt parts: the manifest view counts what the views hold, says the run
        is not complete and names the parts; one warning says the same."""
        m = self.manifest
        names = [str(p.relative_to(self.path)) for p in self.skipped]
        recorded = m.get("tokens")
        if not m.get("counts_only"):
            m["tokens"] = int(self.con.execute("SELECT count(*) FROM tokens").fetchone()[0])
        m.update(tokens_recorded=recorded, complete=False, skipped_corrupt_parts=names)
        warnings.warn(
            f"routescope: skipped {len(names)} corrupt part(s) of {self.path}: {', '.join(names)}; "
            f"the run reads as {m['tokens']} of {recorded} recorded tokens, their routing and their "
            "steps only (run.skipped lists the parts)",
            RuntimeWarning,
            stacklevel=5,  # the caller of open_run
        )

    # -- manifest facts ----------------------------------------------------------------
    @property
    def labels(self) -> list[str]:
        return list(self.manifest.get("labels", []))

    @property
    def moe_layers(self) -> list[int]:
        return [int(layer) for layer in self.manifest["moe_layers"]]

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete", False))

    def num_experts(self, layer: int) -> int:
        return int(self.manifest["num_experts"][str(layer)])

    def top_k(self, layer: int) -> int:
        return int(self.manifest["top_k"][str(layer)])

    @property
    def tables(self) -> list[str]:
        """Tables with at least one finished part."""
        return list_tables(self.path)

    def has_table(self, table: str) -> bool:
        return bool(list_parts(self.path, table))

    ROLLUP_TABLES = schema.ROLLUP_TABLES  # every rollup table a run can have (SPEC 3.3)

    @property
    def rollups(self) -> list[str]:
        """The rollup tables (SPEC 3.3) that cover every routing part: metrics read them."""
        return [table for table in schema.ROLLUP_TABLES if has_view(self, table)]

    def build_rollups(
        self, force: bool = False, progress: Any = None, builder: str = "numpy"
    ) -> dict[str, int]:
        """Write the rollup parts this run lacks, local or on object storage (`routescope index`;
        `builder="sql"`: the named SQL on this run's engine, DuckDB or Spark); returns parts
        written per table (analysis/rollup_build.py)."""
        return build_rollups(self, force=force, progress=progress, builder=builder)

    # -- queries -----------------------------------------------------------------------
    def sql(self, query: str, params: dict[str, Any] | list[Any] | None = None) -> pd.DataFrame:
        """Run SQL over the run's views and return a DataFrame; values go in `params`."""
        return self.con.execute(query, params).df()

    # -- metrics (SPEC 4; each delegates to routescope.analysis.metrics) ----------------
    # `where` is a SQL predicate over the tokens view, e.g. "phase = 'prefill'".
    def token_count(self, where: str | None = None) -> int:
        """Tokens the predicate selects (all recorded tokens without one)."""
        return metrics.token_count(self, where=where)

    def expert_load(self, where: str | None = None) -> pd.DataFrame:
        """layer, expert, tokens, share: routing rows per expert, zero-load experts included."""
        return metrics.expert_load(self, where=where)

    def balance(
        self,
        where: str | None = None,
        aux_loss: bool | None = None,
        ep_size: int | None = None,
        placement: pd.DataFrame | None = None,
    ) -> pd.DataFrame:
        """Per MoE layer: num_experts, tokens, cv, max_violation, balancedness, norm_entropy
        (+ aux_loss, aux_loss_step_mean with router_stats) (+ ep_size, ep_balancedness,
        ep_balancedness_step_mean with `ep_size=N` for E/N experts per GPU, or `placement=`
        layer, gpu, slot, expert)."""
        return metrics.balance(self, where=where, aux_loss=aux_loss, ep_size=ep_size, placement=placement)

    def dead_experts(self, max_share: float = 0.0, where: str | None = None) -> pd.DataFrame:
        """layer, expert, tokens, share, tokens_seen, p_uniform_miss for experts with share <= max_share."""
        return metrics.dead_experts(self, max_share=max_share, where=where)

    def hot_experts(self, factor: float = 2.0, where: str | None = None) -> pd.DataFrame:
        """layer, expert, tokens, share, ratio for experts with share >= factor / E."""
        return metrics.hot_experts(self, factor=factor, where=where)

    def coactivation(self, layer: int, where: str | None = None) -> pd.DataFrame:
        """expert_a, expert_b, count, p_b_given_a for experts chosen together in `layer`."""
        return metrics.coactivation(self, layer, where=where)

    def entanglement(self, where: str | None = None, seed: int = 0) -> pd.DataFrame:
        """Per consecutive MoE layer pair: mutual information of slot-0 experts and its baseline."""
        return metrics.entanglement(self, where=where, seed=seed)

    def transition(self, layer: int, next_layer: int, where: str | None = None) -> pd.DataFrame:
        """expert_a, expert_b, count, p_b_given_a: slot-0 co-routing between two MoE layers."""
        return metrics.transition(self, layer, next_layer, where=where)

    def pathways(self, top: int = 20, where: str | None = None) -> pd.DataFrame:
        """path, count, share: the most frequent slot-0 expert paths through all MoE layers."""
        return metrics.pathways(self, top=top, where=where)

    def specialization(self, by: str, where: str | None = None) -> pd.DataFrame:
        """<by>, layer, expert, tokens, share, lift per value of the label `by`."""
        return metrics.specialization(self, by, where=where)

    def vocab_specialization(
        self, where: str | None = None, min_occurrences: int = 1, by: str = "token"
    ) -> pd.DataFrame:
        """layer, token_id, occurrences, top_expert, top_share, ties, baseline, lift; by="token"
        or "next_token" (the ground-truth next token, OLMoE); ties go to the expert seen first."""
        return metrics.vocab_specialization(self, where=where, min_occurrences=min_occurrences, by=by)

    def token_specialization(self, where: str | None = None, min_occurrences: int = 1) -> pd.DataFrame:
        """layer, token_ids, specialization, next_token_ids, next_token_specialization, baseline:
        OLMoE's per-layer token specialization (mean top_share) for input and next tokens."""
        return metrics.token_specialization(self, where=where, min_occurrences=min_occurrences)

    def repetition_rate(self, where: str | None = None) -> pd.DataFrame:
        """layer, pairs, repeats, repetition_rate, baseline (1/E), marginal_baseline,
        repeats_top2, repetition_rate_top2, baseline_top2 (Mixtral Table 5)."""
        return metrics.repetition_rate(self, where=where)

    def placement(
        self,
        ep_size: int,
        redundant: int = 0,
        method: str = "lpt",
        where: str | None = None,
        num_groups: int | None = None,
        num_nodes: int = 1,
    ) -> pd.DataFrame:
        """layer, gpu, slot, expert: an expert-parallel plan built from the loads (docs/placement.md)."""
        from routescope.analysis.placement import plan_for_run

        return plan_for_run(self, ep_size, redundant, method, where, num_groups, num_nodes)

    def expert_activations(self) -> pd.DataFrame:
        """layer, expert, shared, max_abs_output, channel, tokens_seen from the Super Experts calibration."""
        return metrics.expert_activations(self)

    def hidden_stats(self) -> pd.DataFrame:
        """layer, max_abs, median_abs, channel, seq_id, pos of the residual stream from the calibration."""
        return metrics.hidden_stats(self)

    def doctor(
        self,
        thresholds: DoctorThresholds | None = None,
        where: str | None = None,
        progress: bool = False,
    ) -> pd.DataFrame:
        """One row per finding (SPEC 4.8): severity, finding, layer, expert, step, evidence, sql,
        suggestion, most severe first; every threshold is a field of `rs.DoctorThresholds`
        (docs/doctor.md). `routescope doctor RUN` prints the same (analysis/doctor.py)."""
        from routescope.analysis.doctor import doctor

        return doctor(self, thresholds=thresholds, where=where, progress=progress)

    def verify(self) -> Verification:
        """Check SPEC 3.2's invariants on every part (unique keys, k rows per token and MoE layer,
        the manifest's counts): a `Verification` with `ok`, `problems` and a printable report.
        `routescope check RUN` prints the same (analysis/verify.py)."""
        from routescope.analysis.verify import verify_run

        return verify_run(self.path)

    def quick_check(self) -> list[str]:
        """The cheap invariants (copied parts, parts against the manifest), from manifests and
        part footers only: one sentence per problem, [] when none. `open_run` runs it and warns;
        `verify()` is the full check (analysis/quick_check.py)."""
        from routescope.analysis.quick_check import quick_check

        self.damage = quick_check(self)
        return self.damage

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _repr_html_(self) -> str:
        return run_html(self)

    def __repr__(self) -> str:
        m = self.manifest
        state = "complete" if self.complete else "INCOMPLETE"
        if self.skipped:
            state = f"PARTIAL: {len(self.skipped)} corrupt part(s) skipped"
        return (
            f"Run({str(self.path)!r}, model_type={m.get('model_type')!r}, "
            f"moe_layers={len(self.moe_layers)}, tokens={m.get('tokens')}, {state})"
        )


def merge_rank_manifests(
    run_dir: Path, manifest: dict[str, Any], fragments: dict[str, str] | None = None
) -> dict[str, Any]:
    """Fold the fragments of ranks 1..W-1 (`manifest.rank=R.json`) into rank 0's manifest.

    `tokens` becomes the sum over ranks, `labels` their union, `complete` is true only when
    every rank of `world_size` left a complete fragment, and `ranks` lists each rank's
    tokens, steps and completeness (a rank that never wrote a fragment shows as missing).
    `fragments` (name -> JSON text) stands for the files of `run_dir` (a run on object storage).
    """
    world_size = int(manifest.get("world_size", 1) or 1)
    paths = sorted(Path(run_dir).glob(RANK_MANIFEST_GLOB)) if fragments is None else sorted(fragments)
    if world_size <= 1 and not paths:
        return manifest
    merged = dict(manifest)
    per_rank = {int(manifest.get("rank", 0)): manifest}
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8") if fragments is None else fragments[path]
            fragment = json.loads(text)
            per_rank[int(fragment["rank"])] = fragment
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RunFormatError(f"{path} is not a valid rank manifest: {exc}") from exc
    expected = range(max(world_size, max(per_rank) + 1))
    ranks, labels = [], list(manifest.get("labels", []))
    for rank in expected:
        part = per_rank.get(rank)
        if part is None:
            ranks.append({"rank": rank, "tokens": 0, "steps": 0, "complete": False, "missing": True})
            continue
        ranks.append(
            {
                "rank": rank,
                "tokens": int(part.get("tokens", 0)),
                "steps": int(part.get("steps", 0)),
                "complete": bool(part.get("complete", False)),
            }
        )
        labels += [name for name in part.get("labels", []) if name not in labels]
    merged.update(
        tokens=sum(r["tokens"] for r in ranks),
        steps=sum(r["steps"] for r in ranks),
        labels=labels,
        complete=all(r["complete"] for r in ranks),
        world_size=len(ranks),
        ranks=ranks,
    )
    return merged


def open_run(path: str | Path, skip_corrupt: bool = False, engine: str = "duckdb", spark: Any = None) -> Run:
    """Open a run directory for analysis, with DuckDB (default) or `engine="spark"` (the active
    SparkSession, `spark=`, or a local one; the same calls give equal results).

    FileNotFoundError when `path` does not exist; RunFormatError (naming the file) when it
    is not a run or holds a corrupt part, unless `skip_corrupt=True`, which reads the rest
    and lists the skipped parts in `Run.skipped` (with a warning; the views then keep only the
    tokens, routing and steps every table still holds, and `run.manifest` says so).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no run at {path}: the path does not exist")
    return Run(path, skip_corrupt=skip_corrupt, engine=engine, spark=spark)
