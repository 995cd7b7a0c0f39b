"""The two dashboard figures no rollup answers, read through a bounded sample of routing.

Pathways need every token's whole path, and co-activation under a step range needs pairs per
step (`rollup_coactivation` keeps none). On a run with more than SAMPLE_ROWS routing rows (or
a selection spread over more) they are counted over evenly spaced whole recording parts
(`routescope.analysis.sampling`), and the figure says so; a smaller run is read whole. The
Run API itself never samples: `run.pathways()` and `run.coactivation()` stay exact.
"""

from __future__ import annotations

from typing import Any

import routescope as rs
from routescope.dashboard.filters import TokenFilter

PATHWAYS_MAX = 30
# routing rows read at most (about 0.5 s of reading on a busy 2-core machine)
SAMPLE_ROWS = 12_000_000
ALL = TokenFilter()


def coactivation_view(run: rs.Run, layer: int, flt: TokenFilter = ALL) -> dict[str, Any]:
    """{"frame": run.coactivation(layer) under `flt`, "sample": None, or the PartSample it was
    counted over when the rollups cannot answer `flt` and routing exceeds SAMPLE_ROWS}."""
    from routescope.analysis.sampling import answers_from_rollups

    exact = flt.call_with_where(run, lambda where=None: answers_from_rollups(run, "coactivation", where))
    return maybe_sampled(run, flt, None if exact else SAMPLE_ROWS, "coactivation", layer)


def pathways(run: rs.Run, top: int, flt: TokenFilter = ALL) -> dict[str, Any]:
    """{"frame": the `top` pathways, "sample": None, or the PartSample they were counted over}."""
    top = max(1, min(int(top), PATHWAYS_MAX))
    return maybe_sampled(run, flt, SAMPLE_ROWS, "pathways", top=top)


def maybe_sampled(
    run: rs.Run, flt: TokenFilter, max_rows: int | None, method: str, *args: Any, **kw: Any
) -> dict[str, Any]:
    """{"frame": run.<method>(*args, **kw) under `flt`, "sample": the PartSample read, or None
    when every routing row was read}: a sample when `max_rows` is set and routing exceeds it."""
    from routescope.analysis.sampling import SampledRun, can_sample, choose_parts

    sample = None
    if max_rows is not None and can_sample(run):
        where, params = flt.sql(run)
        sample = choose_parts(run, max_rows, None if flt.is_empty else where, params)
        sample = None if sample.complete else sample
    if sample is None:
        return {"frame": flt.call_with_where(run, getattr(run, method), *args, **kw), "sample": None}
    with SampledRun(run, sample) as part:
        return {"frame": flt.call_with_where(part, getattr(part, method), *args, **kw), "sample": sample}
