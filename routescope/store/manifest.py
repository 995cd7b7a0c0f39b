"""manifest.json of a run: read it, and write it atomically so a reader never sees half of one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from routescope.errors import RunFormatError

MANIFEST_NAME = "manifest.json"
REQUIRED_KEYS = ("format_version", "model_type", "num_hidden_layers", "moe_layers", "num_experts", "top_k")


def write_manifest(run_dir: Path, manifest: dict[str, Any], name: str = MANIFEST_NAME) -> Path:
    """Write `manifest` under a temporary name, fsync it, then rename it into place."""
    path = Path(run_dir) / name
    tmp = path.with_name(f".{name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def read_manifest(run_dir: Path) -> dict[str, Any]:
    """Parse RUN/manifest.json; RunFormatError names the file when it is missing or broken."""
    path = Path(run_dir) / MANIFEST_NAME
    if not path.is_file():
        raise RunFormatError(f"{run_dir} is not a routescope run: {path} does not exist")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunFormatError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise RunFormatError(f"{path} must hold a JSON object")
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise RunFormatError(f"{path} lacks required keys: {', '.join(missing)}")
    return manifest
