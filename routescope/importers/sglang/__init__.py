"""SGLang: expert-distribution recorder dumps (per token and `stat` counts) and the routed
experts of server responses (`responses.py`)."""

from __future__ import annotations

from routescope.importers.sglang.importer import import_sglang

__all__ = ["import_sglang"]
