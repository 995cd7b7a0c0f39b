"""routescope: expert-routing observability for Mixture-of-Experts language models.

import routescope as rs
with rs.record(model, "runs/demo", labels={"domain": "code"}) as rec:
    model(input_ids=ids, attention_mask=mask)
run = rs.open_run("runs/demo")

Reading a run needs no torch: the analysis names are imported here, the capture names
(everything that touches a model) on first use through `__getattr__` (PEP 562).
tests/test_torch_free.py checks that `import routescope` and every reader stay torch-free.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from routescope import bundled
from routescope.analysis import Run, open_run
from routescope.analysis.balance_frames import balance_from_loads
from routescope.analysis.compare import compare
from routescope.analysis.doctor import group_findings
from routescope.analysis.doctor import verdict as doctor_verdict
from routescope.analysis.doctor_rules import SEVERITIES, DoctorThresholds, gini
from routescope.analysis.runset import open_runs
from routescope.analysis.superexperts import classify_massive, classify_super_experts
from routescope.errors import (
    EmptySelectionWarning,
    RouteScopeError,
    RunBusyError,
    RunFormatError,
    UnsupportedModelError,
    WriterError,
)
from routescope.store.rundir import RunExistsError
from routescope.version import __version__

# Public names that need torch (or transformers): name -> module that defines it, imported
# when the name is first read. Add a capture-side name here, never as an eager import.
LAZY: dict[str, str] = {
    "Recorder": "routescope.capture.recording.recorder",
    "record": "routescope.capture.recording.recorder",
    "find_routers": "routescope.capture.discovery",
    "find_super_experts": "routescope.capture.calibration.activations",
    "prune_experts": "routescope.capture.control.pruning",
    "replay": "routescope.capture.control.replay",
    "ban_experts": "routescope.capture.control.banning",
    "watch": "routescope.training.watch",
    "AlertRules": "routescope.training.alerts",
}

if TYPE_CHECKING:  # static checkers and IDEs see the lazy names as ordinary imports
    from routescope.capture.calibration.activations import find_super_experts
    from routescope.capture.control.banning import ban_experts
    from routescope.capture.control.pruning import prune_experts
    from routescope.capture.control.replay import replay
    from routescope.capture.discovery import find_routers
    from routescope.capture.recording.recorder import Recorder, record
    from routescope.training.alerts import AlertRules
    from routescope.training.watch import watch


def __getattr__(name: str) -> Any:
    module = LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'routescope' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later reads skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(LAZY))


__all__ = [
    "SEVERITIES",
    "AlertRules",
    "DoctorThresholds",
    "EmptySelectionWarning",
    "Recorder",
    "RouteScopeError",
    "Run",
    "RunBusyError",
    "RunExistsError",
    "RunFormatError",
    "UnsupportedModelError",
    "WriterError",
    "__version__",
    "balance_from_loads",
    "ban_experts",
    "bundled",
    "classify_massive",
    "classify_super_experts",
    "compare",
    "doctor_verdict",
    "find_routers",
    "find_super_experts",
    "gini",
    "group_findings",
    "open_run",
    "open_runs",
    "prune_experts",
    "record",
    "replay",
    "watch",
]
