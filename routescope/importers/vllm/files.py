"""Reading vLLM routed-experts files into plain request records (no conversion yet).

Every reader returns `RequestData`: the routed-experts arrays of one request (either one
array covering prompt and output, as vLLM < 0.21 returns it, or the prompt part and the
generated part separately, as 0.21 and later return them) plus the token ids it carries.
`vllm.py` turns these into tokens and routing. Arrays encoded as strings (the base64
`np.save` of vLLM's `/generate` endpoint, or `{data, shape, dtype}` packs) are decoded
with `allow_pickle=False`.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from routescope.importers.core.errors import ImportFormatError
from routescope.importers.core.files import check_input_file, clean_text, load_torch_file

EXPECTED = (
    "vLLM routed experts: integer arrays [num_tokens, layers, top_k] as .npy / .npz, a .pt of tensors, "
    "arrays or request outputs, or .json / .jsonl responses with 'routed_experts' (and 'prompt_routed_experts')"
)
_PACKED_DTYPES = {"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32"}


@dataclass
class RequestData:
    """One request (one sequence) as found in the file."""

    name: str
    combined: np.ndarray | None = None  # rows for prompt + output - 1 tokens (vLLM < 0.21)
    prompt: np.ndarray | None = None  # vLLM >= 0.21: response-level prompt_routed_experts
    output: np.ndarray | None = None  # vLLM >= 0.21: the choice's routed_experts
    prompt_ids: list[int] | None = None
    output_ids: list[int] | None = None
    prompt_len: int | None = None
    token_ids: list[int] | None = None  # ids of the whole sequence when the prompt/output split is unknown
    shares_prompt_with: int | None = None  # index of the request holding this prompt's routing


def read_requests(path: str | Path) -> tuple[Path, list[RequestData]]:
    """All requests in `path`, in file order."""
    path = check_input_file(path, "a vLLM routed-experts")
    suffix = path.suffix.lower()
    readers = {
        ".npy": _read_npy,
        ".npz": _read_npz,
        ".pt": _read_pt,
        ".json": _read_json,
        ".jsonl": _read_json,
    }
    if suffix not in readers:
        raise ImportFormatError(f"{path}: unknown file type {suffix!r}; use .npy, .npz, .pt, .json or .jsonl")
    requests = readers[suffix](path)
    if not requests:
        raise ImportFormatError(f"{path}: no routed_experts arrays found; expected {EXPECTED}")
    return path, requests


def _read_npy(path: Path) -> list[RequestData]:
    return [RequestData("array", combined=_np_load(path, path.open("rb"), "the .npy array"))]


def _np_load(path: Path, source: Any, what: str) -> np.ndarray:
    try:
        with source as fh:
            array = np.load(fh, allow_pickle=False)
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
            raise ImportFormatError(
                f"{path}: {what} holds Python objects, not integers; expected {EXPECTED}"
            ) from None
        raise ImportFormatError(
            f"{path}: {what} is not a valid .npy array ({clean_text(str(exc), 120)})"
        ) from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ImportFormatError(
            f"{path}: {what} is truncated or not a .npy array ({type(exc).__name__}: {clean_text(str(exc), 120)})"
        ) from None
    if not isinstance(array, np.ndarray):
        raise ImportFormatError(f"{path}: {what} is a .npz archive, not one array; rename it to .npz")
    return array


def _read_npz(path: Path) -> list[RequestData]:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ImportFormatError(f"{path}: not a .npz (zip) archive: {clean_text(str(exc), 120)}") from None
    with archive:
        arrays = {}
        for member in archive.namelist():
            key = member.removesuffix(".npy")
            if not member.endswith(".npy"):
                raise ImportFormatError(f"{path}: member {member!r} is not a .npy array; expected {EXPECTED}")
            try:
                source = archive.open(member)
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                raise ImportFormatError(
                    f"{path}: member {member!r} cannot be read ({type(exc).__name__})"
                ) from None
            arrays[key] = _np_load(path, source, f"member {member!r}")
    out = []
    for key, array in arrays.items():
        if key.endswith(("_token_ids", "_prompt_len")):
            continue
        if array.ndim != 3:
            raise ImportFormatError(
                f"{path}: array {key!r} has shape {tuple(array.shape)}; expected {EXPECTED}"
            )
        req = RequestData(key, combined=array)
        ids = arrays.get(f"{key}_token_ids")
        plen = arrays.get(f"{key}_prompt_len")
        req.prompt_len = int(plen.reshape(-1)[0]) if plen is not None and plen.size else None
        if ids is not None:
            all_ids = [int(x) for x in ids.reshape(-1)]
            if req.prompt_len is not None:
                req.prompt_ids, req.output_ids = all_ids[: req.prompt_len], all_ids[req.prompt_len :]
            else:
                req.token_ids = all_ids
        out.append(req)
    return out


def _read_pt(path: Path) -> list[RequestData]:
    data = load_torch_file(path, "vLLM routed experts", allow_numpy=True)
    items = data if isinstance(data, (list, tuple)) else [data]
    out: list[RequestData] = []
    for i, item in enumerate(items):
        out += _from_object(item, path, f"item {i}", len(out))
    return out


def _read_json(path: Path) -> list[RequestData]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ImportFormatError(f"{path}: not UTF-8 text; expected JSON") from None
    try:
        if path.suffix.lower() == ".jsonl":
            objects = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            loaded = json.loads(text)
            objects = loaded if isinstance(loaded, list) else [loaded]
    except ValueError as exc:
        raise ImportFormatError(f"{path}: not valid JSON: {clean_text(str(exc), 120)}") from None
    out: list[RequestData] = []
    for i, obj in enumerate(objects):
        out += _from_object(obj, path, f"object {i}", len(out))
    return out


def _from_object(obj: Any, path: Path, name: str, first_index: int) -> list[RequestData]:
    """A response / request output (with choices or outputs), a flat request dict, or a bare array."""
    if not isinstance(obj, dict):
        if isinstance(obj, str):
            raise ImportFormatError(
                f"{path}: {name} is a string; expected a JSON object with 'routed_experts'"
            )
        return [RequestData(name, combined=decode_array(obj, path, name))]
    children = obj.get("choices", obj.get("outputs"))
    if children is None:
        if obj.get("routed_experts") is None and obj.get("prompt_routed_experts") is None:
            keys = ", ".join(map(repr, obj)) or "none"
            raise ImportFormatError(
                f"{path}: {name} has no 'routed_experts' (keys: {keys}); expected {EXPECTED}"
            )
        children = [obj]
    if not isinstance(children, list) or not all(isinstance(c, dict) for c in children):
        raise ImportFormatError(f"{path}: {name}: 'choices' / 'outputs' must be a list of objects")
    split = "prompt_routed_experts" in obj
    prompt = _opt_array(obj.get("prompt_routed_experts"), path, f"{name}: prompt_routed_experts")
    out = []
    for j, child in enumerate(children):
        label = f"{name} choice {j}" if len(children) > 1 or child is not obj else name
        experts = _opt_array(child.get("routed_experts"), path, f"{label}: routed_experts")
        req = RequestData(label)
        req.prompt_ids = _ids(child.get("prompt_token_ids", obj.get("prompt_token_ids")), path, label)
        req.output_ids = _ids(child.get("token_ids"), path, label)
        if split:
            req.prompt = prompt if j == 0 else None
            req.output = experts
            req.shares_prompt_with = None if j == 0 else first_index
        else:
            req.combined = experts
        if req.combined is None and req.prompt is None and req.output is None:
            continue
        out.append(req)
    return out


def _opt_array(value: Any, path: Path, what: str) -> np.ndarray | None:
    return None if value is None else decode_array(value, path, what)


def _ids(value: Any, path: Path, what: str) -> list[int] | None:
    if value is None:
        return None
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        raise ImportFormatError(f"{path}: {what}: token ids must be a list of integers")
    return value


def decode_array(value: Any, path: Path, what: str) -> np.ndarray:
    """Nested lists, a tensor / ndarray, a base64 `np.save` string or a {data, shape, dtype} pack -> ndarray."""
    if isinstance(value, str):
        return _from_base64_npy(value, path, what)
    if isinstance(value, dict):
        return _from_pack(value, path, what)
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    try:
        array = np.asarray(value)
    except ValueError:
        raise ImportFormatError(
            f"{path}: {what} is ragged (rows of different lengths); expected {EXPECTED}"
        ) from None
    return array


def _from_base64_npy(text: str, path: Path, what: str) -> np.ndarray:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImportFormatError(
            f"{path}: {what} is a string that is not base64; expected nested lists or a base64 .npy"
        ) from None
    if not raw.startswith(b"\x93NUMPY"):
        raise ImportFormatError(f"{path}: {what} decodes from base64 but is not an np.save (.npy) payload")
    return _np_load(path, io.BytesIO(raw), what)


def _from_pack(pack: dict, path: Path, what: str) -> np.ndarray:
    dtype, shape, data = pack.get("dtype"), pack.get("shape"), pack.get("data")
    if dtype not in _PACKED_DTYPES or not isinstance(shape, list) or not isinstance(data, str):
        raise ImportFormatError(
            f"{path}: {what} is an object; expected nested lists, a base64 .npy string or "
            f"{{'data': base64, 'shape': [...], 'dtype': one of {sorted(_PACKED_DTYPES)}}}"
        )
    try:
        raw = base64.b64decode(data, validate=True)
        return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
    except (binascii.Error, ValueError, TypeError):
        raise ImportFormatError(f"{path}: {what}: 'data' does not hold {shape} values of {dtype}") from None
