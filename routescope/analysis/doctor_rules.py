"""The doctor's rules: thresholds with their sources, and the tests that judge one layer's loads.

One set of rules for every place that judges routing: `run.doctor()` (analysis/doctor.py) runs
them on a recorded run, `rs.watch` alerts (training/alerts.py) on the counts of a training
window, and the report and the dashboard show what the doctor found. Each rule has two parts:
an **evidence bar** (how unlikely the observation is under a router that picks its k experts
uniformly at random; a finding needs probability below `alpha` divided by the number of tests,
Bonferroni) and a **band** (how far from uniform it must be to matter). A uniform router
therefore raises nothing above `info`, however many experts and steps a run holds.
Pure NumPy/SciPy (scipy imported where a test runs, so `import routescope` stays light): no
torch, no DuckDB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

SEVERITIES = ("ok", "info", "warning", "critical")  # SPEC 4.8, mildest first
SEVERITY_RANK = {name: i for i, name in enumerate(SEVERITIES)}


@dataclass(frozen=True)
class DoctorThresholds:
    """Every threshold of the doctor, with its default and the source of the default
    (docs/doctor.md lists them)."""

    # Evidence bar: the probability, under uniform top-k routing, that the whole run raises a
    # false alarm of one kind (family-wise; each test gets alpha / number of tests, Bonferroni).
    alpha: float = 1e-3
    # SPEC 4.2: an expert is dead when its share is at most this (0: no token at all).
    dead_share: float = 0.0
    # Megatron-Core's healthy band for dead experts (0-5 %): a layer above it is critical.
    dead_fraction_band: float = 0.05
    # SPEC 4.2: hot when share >= hot_factor / E.
    hot_factor: float = 2.0
    # Megatron-Core's healthy bands: coefficient of variation and Gini of expert loads < 0.3.
    cv_band: float = 0.3
    gini_band: float = 0.3
    # Collapse: the effective number of experts exp(H) (NeMo Automodel's expert_diversity times
    # E) measured between its least, k (every token to the same k experts), and E (uniform):
    # spread = (exp(H) - k) / (E - k); at or below this a layer is collapsed. Our choice (no
    # published band): 0.1 leaves 2.6 of 8 experts (k = 2) or 20 of 128 (k = 8) in use.
    collapse_spread: float = 0.1
    # Drift: a change point needs this many steps on each side, and the pooled cv must move by
    # at least cv_band (the width of the healthy band) across it.
    drift_min_steps: int = 2
    # Near-ties: a top-1 minus top-2 probability below bf16's resolution (2^-7: 8 significand
    # bits) can flip between a bf16 and an fp32 forward; warn when this share of tokens is one.
    near_tie_margin: float = 2.0**-7
    near_tie_warning: float = 0.5
    # Capacity drops (slots recorded with weight 0): any is info, this share of slots a warning.
    capacity_drop_warning: float = 0.01
    # Findings shown before "N more" in the report and the Overview.
    top_findings: int = 10

    def __post_init__(self) -> None:
        for name in ("alpha", "dead_fraction_band", "near_tie_warning", "capacity_drop_warning"):
            value = getattr(self, name)
            if not 0.0 < float(value) <= 1.0:
                raise ValueError(f"DoctorThresholds.{name} must lie in (0, 1], got {value!r}")
        if not 0.0 <= float(self.dead_share) < 1.0:
            raise ValueError(f"DoctorThresholds.dead_share must lie in [0, 1), got {self.dead_share!r}")
        for name in ("hot_factor", "cv_band", "gini_band", "collapse_spread", "near_tie_margin"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"DoctorThresholds.{name} must be positive, got {getattr(self, name)!r}")
        if int(self.drift_min_steps) < 1 or int(self.top_findings) < 1:
            raise ValueError("DoctorThresholds.drift_min_steps and top_findings must be >= 1")


# -- statistics of one layer's loads --------------------------------------------------------
def uniform_miss_probability(top_k: int, num_experts: int, tokens: float) -> float:
    """SPEC 4.2: the probability that a uniform top-k router never picks one expert in T tokens."""
    if tokens <= 0:
        return 1.0
    return float((1.0 - top_k / num_experts) ** tokens)


def hot_tail_probability(load: Any, tokens: float, top_k: int, num_experts: int) -> Any:
    """P(L_e >= load) for L_e ~ Binomial(T, k/E): how often a uniform router gives this much
    (`load` a number or an array of them)."""
    if tokens <= 0:
        return np.ones_like(np.asarray(load, dtype=np.float64))
    from scipy.special import betainc  # scipy.special: a fifth of scipy.stats' import time

    n, p = float(round(tokens)), min(1.0, top_k / num_experts)
    loads = np.clip(np.rint(np.asarray(load, dtype=np.float64)), 0, None)
    # P(X >= m) = I_p(m, n - m + 1), the regularized incomplete beta function; 1 for m = 0
    inside = (loads > 0) & (loads <= n)
    safe = np.where(inside, loads, 1.0)
    tail = betainc(safe, np.maximum(n - safe + 1, 1.0), p)
    return np.where(loads <= 0, 1.0, np.where(loads > n, 0.0, tail))


def gini(loads: np.ndarray) -> float:
    """The Gini coefficient of expert loads (0 = equal, 1 - 1/E = one expert takes all)."""
    x = np.sort(np.asarray(loads, dtype=np.float64))
    n, total = len(x), x.sum()
    if n == 0 or total <= 0:
        return math.nan
    index = np.arange(1, n + 1)
    return float((2.0 * np.sum(index * x)) / (n * total) - (n + 1.0) / n)


def diversity(loads: np.ndarray) -> float:
    """exp(H) / E over the shares (NeMo Automodel's expert_diversity; 1 = every expert equally)."""
    x = np.asarray(loads, dtype=np.float64)
    total = x.sum()
    if total <= 0:
        return math.nan
    p = x[x > 0] / total
    return float(np.exp(-np.sum(p * np.log(p))) / len(x))


def cv(loads: np.ndarray) -> float:
    """SPEC 4.1's cv: population standard deviation over the mean."""
    x = np.asarray(loads, dtype=np.float64)
    mean = x.mean() if len(x) else 0.0
    return float(x.std() / mean) if mean > 0 else math.nan


def uniformity_p_value(loads: np.ndarray, top_k: int) -> float:
    """How likely loads at least this uneven are under a uniform router (chi-square goodness of
    fit on the slots; each token's k slots are distinct, which only narrows the spread)."""
    x = np.asarray(loads, dtype=np.float64)
    if x.sum() <= 0 or len(x) < 2:
        return 1.0
    expected = x.sum() / len(x)
    return chi2_survival(float(((x - expected) ** 2 / expected).sum()), len(x) - 1)


def change_p_value(before: np.ndarray, after: np.ndarray) -> float:
    """Chi-square test that two pooled load vectors come from one distribution."""
    table = np.vstack([before, after]).astype(np.float64)
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2 or (table.sum(axis=1) <= 0).any():
        return 1.0
    expected = np.outer(table.sum(axis=1), table.sum(axis=0)) / table.sum()
    statistic = float(((table - expected) ** 2 / expected).sum())
    return chi2_survival(statistic, (table.shape[0] - 1) * (table.shape[1] - 1))


def chi2_survival(statistic: float, dof: int) -> float:
    """P(chi2(dof) >= statistic) = Q(dof / 2, statistic / 2), the regularized upper gamma."""
    from scipy.special import gammaincc

    return float(gammaincc(dof / 2.0, statistic / 2.0))


def in_words(p: float) -> str:
    """A probability as evidence text: '3.2e-12'."""
    return f"{p:.2g}"


# -- judging one layer's loads (the doctor and the alerts share this) -----------------------
def judge_layer(
    layer: int,
    loads: np.ndarray,
    top_k: int,
    th: DoctorThresholds,
    tests: int,
    layers: int,
    step: int | None = None,
) -> list[dict[str, Any]]:
    """Findings about one layer's loads (routing slots per expert 0..E-1): dead experts, hot
    experts, an unbalanced or collapsed layer. `tests` is the number of expert tests in the
    family (Bonferroni), `layers` the number of layer tests. Each finding is a dict with
    severity, finding, layer, expert, step, evidence, suggestion and magnitude (for ranking)."""
    x = np.asarray(loads, dtype=np.float64)
    num_experts = len(x)
    slots = x.sum()
    tokens = slots / top_k if top_k else 0.0
    if tokens <= 0 or num_experts < 2:
        return []
    out: list[dict[str, Any]] = []
    share = x / slots
    dead = np.flatnonzero(share <= th.dead_share)
    p_miss = uniform_miss_probability(top_k, num_experts, tokens)
    bar = th.alpha / max(tests, 1)
    proven_dead = dead if p_miss < bar else np.array([], dtype=int)
    dead_fraction = len(proven_dead) / num_experts
    for expert in dead:
        proven = p_miss < bar
        severity = ("critical" if dead_fraction > th.dead_fraction_band else "warning") if proven else "info"
        out.append(
            finding(
                severity,
                "dead_expert",
                layer,
                int(expert),
                step,
                f"{int(x[expert])} of {int(slots):,} routing slots over {tokens:,.0f} tokens; a uniform "
                f"router misses one expert that often with probability (1 - {top_k}/{num_experts})^"
                f"{tokens:.0f} = {in_words(p_miss)}"
                + ("" if proven else f", above the evidence bar {in_words(bar)}: too few tokens to tell")
                + f"; {len(proven_dead)} of {num_experts} experts of this layer dead "
                f"(healthy band 0-{th.dead_fraction_band:.0%})",
                "check the router's bias or load-balancing loss for this layer; an expert no token "
                "reaches is wasted memory and can be pruned (rs.prune_experts) or re-initialised"
                if proven
                else "record more tokens before drawing a conclusion",
                magnitude=dead_fraction + (1.0 if proven else 0.0),
            )
        )
    hot = np.flatnonzero(share >= th.hot_factor / num_experts)
    tails = np.atleast_1d(hot_tail_probability(x[hot], tokens, top_k, num_experts)) if len(hot) else []
    for expert, p in zip(hot, tails):
        if p >= bar:
            continue
        ratio = share[expert] * num_experts
        out.append(
            finding(
                "warning",
                "hot_expert",
                layer,
                int(expert),
                step,
                f"share {share[expert]:.4f} = {ratio:.2f}x the uniform 1/{num_experts} (hot from "
                f"{th.hot_factor:g}x); a uniform router gives {int(x[expert]):,} or more of "
                f"{tokens:,.0f} tokens with probability {in_words(p)}",
                "an expert this hot bounds expert-parallel throughput: raise the load-balancing "
                "loss coefficient, or replicate it (routescope placement --redundant)",
                magnitude=ratio,
            )
        )
    layer_cv, layer_gini, layer_div = cv(x), gini(x), diversity(x)
    p_uniform = uniformity_p_value(x, top_k)
    if p_uniform < th.alpha / max(layers, 1):
        effective = layer_div * num_experts
        spread = (effective - top_k) / (num_experts - top_k) if num_experts > top_k else 1.0
        if spread <= th.collapse_spread:
            out.append(
                finding(
                    "critical",
                    "layer_collapse",
                    layer,
                    None,
                    step,
                    f"about {effective:.2f} of {num_experts} experts effectively used (exp(H), expert "
                    f"diversity {layer_div:.3f}), k = {top_k}: spread (exp(H) - k)/(E - k) = {spread:.3f}, "
                    f"collapsed at or below {th.collapse_spread:g}; cv {layer_cv:.3f}, Gini {layer_gini:.3f}; "
                    f"uniform routing gives loads this uneven with probability {in_words(p_uniform)}",
                    "the router sends most tokens to a few experts: check the load-balancing loss "
                    "(is it on, is its coefficient > 0) and the router's learning rate",
                    magnitude=1.0 + (1.0 - spread),
                )
            )
        elif layer_cv >= th.cv_band or layer_gini >= th.gini_band:
            out.append(
                finding(
                    "warning",
                    "layer_imbalance",
                    layer,
                    None,
                    step,
                    f"cv {layer_cv:.3f} and Gini {layer_gini:.3f} (healthy below {th.cv_band:g} and "
                    f"{th.gini_band:g}); uniform routing gives loads this uneven with probability "
                    f"{in_words(p_uniform)}",
                    "watch this layer's balance over steps (dashboard Time page); raise the "
                    "load-balancing loss coefficient if it keeps growing",
                    magnitude=max(layer_cv, layer_gini),
                )
            )
    return out


def finding(
    severity: str,
    name: str,
    layer: int | None,
    expert: int | None,
    step: int | None,
    evidence: str,
    suggestion: str,
    sql: str | None = None,
    magnitude: float = 0.0,
) -> dict[str, Any]:
    """One row of `run.doctor()` (SPEC 4.8)."""
    return {
        "severity": severity,
        "finding": name,
        "layer": layer,
        "expert": expert,
        "step": step,
        "evidence": evidence,
        "sql": sql,
        "suggestion": suggestion,
        "magnitude": float(magnitude),
    }
