"""routescope: expert-routing observability for Mixture-of-Experts language models.

import routescope as rs
with rs.record(model, "runs/demo", labels={"domain": "code"}) as rec:
    model(input_ids=ids, attention_mask=mask)
run = rs.open_run("runs/demo")
"""

from routescope.errors import RouteScopeError, RunFormatError, UnsupportedModelError, WriterError

__version__ = "0.1.0"

from routescope.analysis import Run, open_run
from routescope.capture import Recorder, RunExistsError, find_routers, record

__all__ = [
    "Recorder",
    "RouteScopeError",
    "Run",
    "RunExistsError",
    "RunFormatError",
    "UnsupportedModelError",
    "WriterError",
    "__version__",
    "find_routers",
    "open_run",
    "record",
]
