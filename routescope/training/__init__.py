"""Training integration: rs.watch (routing scalars in the Trainer's logs, optional recording).

Sits above capture (device counters, recorder) and analysis (the SPEC 4.1 formulas); imports
transformers and torch, so `routescope/__init__.py` exports `watch` lazily.
"""

from routescope.training.alerts import AlertRules
from routescope.training.watch import Watch, watch

__all__ = ["AlertRules", "Watch", "watch"]
