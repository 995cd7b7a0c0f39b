"""Reading engine dump files safely: input checks, a restricted torch.load, output-path checks.

The SGLang and vLLM importers call these so every file is opened the same way: no code
runs while loading (torch.load with weights_only=True, np.load with allow_pickle=False),
and every error is one line that names the file and never carries a loader's own advice.
torch is imported here lazily, inside `load_torch_file`, so reading a run never imports it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from routescope.importers.core.errors import ImportFormatError, one_clean_line

# NumPy's pickle entry points for arrays and scalars, under the module names NumPy 2
# (numpy._core) and NumPy 1 (numpy.core) write; nothing else is added to torch's allowlist.
_NUMPY_GLOBALS = (
    ("_core.multiarray", "_reconstruct"),
    ("_core.multiarray", "scalar"),
)
_INTEGER_DTYPES = (
    "Int8DType",
    "Int16DType",
    "Int32DType",
    "Int64DType",
    "UInt8DType",
    "UInt16DType",
    "UInt32DType",
    "UInt64DType",
    "LongDType",
    "ULongDType",
    "LongLongDType",
    "ULongLongDType",
)
_REFUSED = re.compile(r"Unsupported global: GLOBAL ([A-Za-z0-9_.]+)|but got <class '([A-Za-z0-9_.]+)'>")


def check_input_file(path: str | Path, what: str) -> Path:
    """`path` as a Path when it is a readable file; FileNotFoundError / ImportFormatError otherwise."""
    path = Path(path)
    if path.is_dir():
        raise ImportFormatError(f"{path} is a directory; expected {what} file")
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; expected {what} file")
    if path.stat().st_size == 0:
        raise ImportFormatError(f"{path} is empty (0 bytes); expected {what} file")
    return path


def check_output_dir(out: str | Path) -> Path:
    """Refuse an --out that is a file or lies under a file, before any parsing work."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ImportFormatError(f"--out {out} is an existing file; give a directory for the run")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ImportFormatError(f"--out {out} lies under {parent}, which is a file, not a directory")
            break
    return out


def _numpy_safe_globals() -> list[Any]:
    import numpy as np

    try:
        from numpy._core import multiarray  # NumPy >= 2
    except ImportError:  # NumPy 1.x
        from numpy.core import multiarray

    allowed: list[Any] = [np.ndarray, np.dtype]
    # dtype objects are rebuilt per class; only integer dtypes are let in (routing ids)
    dtypes = getattr(np, "dtypes", None)
    for name in _INTEGER_DTYPES:
        if dtypes is not None and hasattr(dtypes, name):
            allowed.append(getattr(dtypes, name))
    for module, name in _NUMPY_GLOBALS:
        func = getattr(multiarray, name)
        allowed.append((func, f"numpy.{module}.{name}"))
        allowed.append((func, f"numpy.{module.removeprefix('_')}.{name}"))
    return allowed


def load_torch_file(path: Path, what: str, allow_numpy: bool = False) -> Any:
    """torch.load(weights_only=True) on CPU; with `allow_numpy`, NumPy arrays are also accepted.

    The NumPy allowlist is applied through the `safe_globals` context manager for this one
    call only, so it never leaks into the process. A refusal becomes one line naming the file
    and the global that was refused, not torch's multi-line advice.
    """
    import torch

    try:
        if allow_numpy:
            with torch.serialization.safe_globals(_numpy_safe_globals()):
                return torch.load(path, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        found = _REFUSED.search(str(exc))
        if found:
            kind = found.group(1) or found.group(2)
            reason = (
                f"it holds a Python object of type {kind}, not only tensors, integer NumPy arrays, "
                "lists, dicts and numbers; no code from the file was run"
            )
        elif isinstance(exc, EOFError) or "EOF" in str(exc) or "zip archive" in str(exc):
            reason = "the file is truncated or not a torch.save archive"
        else:
            # torch's own text carries advice to switch the safety off: never pass it on
            reason = f"{type(exc).__name__} while unpickling; it is not a torch.save file of plain data"
        raise ImportFormatError(
            f"{path}: could not be read as {what} (torch.load, weights_only=True): {reason}"
        ) from None


def clean_text(text: str, limit: int = 300) -> str:
    """One clean line of at most `limit` characters (for text quoted from a file or a library)."""
    text = one_clean_line(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
