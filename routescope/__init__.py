"""routescope: expert-routing observability for Mixture-of-Experts language models.

import routescope as rs
with rs.record(model, "runs/demo", labels={"domain": "code"}) as rec:
    model(input_ids=ids, attention_mask=mask)
run = rs.open_run("runs/demo")
"""

from routescope.errors import RouteScopeError, RunFormatError, UnsupportedModelError, WriterError

__version__ = "0.1.0"

from routescope.analysis import Run, open_run
from routescope.analysis.compare import compare
from routescope.capture import Recorder, RunExistsError, find_routers, record
from routescope.capture.activations import classify_super_experts, find_super_experts
from routescope.capture.pruning import prune_experts

__all__ = [
    "Recorder",
    "RouteScopeError",
    "Run",
    "RunExistsError",
    "RunFormatError",
    "UnsupportedModelError",
    "WriterError",
    "__version__",
    "classify_super_experts",
    "compare",
    "find_routers",
    "find_super_experts",
    "open_run",
    "prune_experts",
    "record",
]
