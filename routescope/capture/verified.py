"""Which model types and transformers versions routescope has verified: data, not code.

`verified.json` beside this file lists the model types whose recording the test suite checks
exactly (tests/test_model_coverage.py, test_multimodal.py, test_encoder_decoder.py) and the
range of transformers minor versions the suite has passed (pyproject's bound ends just past
the newest). `rs.record` asks `verification` for the manifest's `verified` key and warns once
per process when a model is outside the table: a newer transformers or a `trust_remote_code`
model still records, but nobody has checked that the adapter reads its router exactly.
`scripts/check_transformers.py` compares a newer release against this table.
"""

from __future__ import annotations

import json
import re
import warnings
from functools import cache
from pathlib import Path
from typing import Any

_TABLE = Path(__file__).with_name("verified.json")
_warned: set[tuple[str, str]] = set()


class UnverifiedModelWarning(UserWarning):
    """A model type or transformers version that routescope's tests have not checked."""


@cache
def verified_table() -> dict[str, Any]:
    """{"transformers": {"oldest": "5.23", "newest": "5.25"}, "model_types": [...]}"""
    return json.loads(_TABLE.read_text(encoding="utf-8"))


def _minor(version: str) -> tuple[int, int]:
    found = re.match(r"(\d+)\.(\d+)", version)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


def verification(model_type: str, transformers_version: str) -> tuple[bool, str]:
    """(verified, reason): reason says what is not verified, empty when verified."""
    table = verified_table()
    oldest, newest = table["transformers"]["oldest"], table["transformers"]["newest"]
    if model_type not in table["model_types"]:
        return False, (
            f"model type {model_type!r} is not in routescope's verified table "
            f"(docs/models.md); its routing is recorded by the adapter it matched, unchecked"
        )
    if not _minor(oldest) <= _minor(transformers_version) <= _minor(newest):
        return False, (
            f"transformers {transformers_version} is outside the versions routescope has verified "
            f"({oldest} to {newest}.x); model code may have changed how routers are called"
        )
    return True, ""


def warn_if_unverified(model_type: str, transformers_version: str) -> tuple[bool, str]:
    """`verification`, plus one UnverifiedModelWarning per (type, version) in this process."""
    verified, reason = verification(model_type, transformers_version)
    key = (model_type, transformers_version)
    if not verified and key not in _warned:
        _warned.add(key)
        warnings.warn(
            f'routescope: {reason}; the run is marked "verified": false', UnverifiedModelWarning, stacklevel=3
        )
    return verified, reason
