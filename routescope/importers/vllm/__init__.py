"""vLLM: routed-experts arrays (`.npy` / `.pt` / `.safetensors` / JSONL, `files.py`) and the
routed experts of server responses (`responses.py`)."""

from __future__ import annotations

from routescope.importers.vllm.importer import import_vllm

__all__ = ["import_vllm"]
