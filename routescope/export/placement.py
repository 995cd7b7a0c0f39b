"""Write placement plans and expert loads in the files SGLang and vLLM read, and read them back.

SGLang (`python/sglang/srt/eplb/expert_location.py`, `compute_initial_expert_location_metadata`):
`--init-expert-location FILE` takes a .json (or .pt) dict holding either
`physical_to_logical_map` [num_hidden_layers, num_physical_experts] (a placement) or
`logical_count` [num_hidden_layers, num_logical_experts] (loads; SGLang runs its own EPLB).
Rows are decoder layers (`ModelConfigForExpertLocation.num_layers = config.num_hidden_layers`);
physical expert p lives on GPU p // (num_physical / ep_size).

vLLM (`tools/eplb/generate_static_mapping.py`, `EPLBConfig.initial_mapping_path`): a JSONL mapping
record `{"record_type": "eplb_initial_mapping", "version": 1, "num_redundant_experts", "num_slots",
"initial_global_assignments": {"<moe layer>": [logical id per slot]}}` and load statistics
(`eplb_load_meta`, then `eplb_load_stats` records with `step`, `expert_load` and `p2l_map`, both
[num_moe_layers, num_slots]). vLLM counts MoE layers, not decoder layers.

Called by the `placement` command; torch is imported only to write a .pt file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from routescope.analysis.placement import check_plan

FORMATS = ("sglang", "vllm")
VLLM_VERSION = 1


def plan_matrix(plan: pd.DataFrame, moe_layers: list[int], num_experts: int) -> tuple[int, np.ndarray]:
    """(ep_size, [len(moe_layers), num_physical] logical expert id per physical slot p = gpu * S + slot)."""
    ep_size = check_plan(plan, num_experts)
    missing = sorted(set(moe_layers) - set(int(x) for x in plan["layer"].unique()))
    if missing:
        raise ValueError(f"the plan has no rows for MoE layers {missing}")
    per_gpu = int(plan["slot"].max()) + 1
    matrix = np.empty((len(moe_layers), ep_size * per_gpu), dtype=np.int64)
    for i, layer in enumerate(moe_layers):
        rows = plan[plan["layer"] == layer]
        matrix[i, rows["gpu"].to_numpy() * per_gpu + rows["slot"].to_numpy()] = rows["expert"].to_numpy()
    return ep_size, matrix


def plan_from_matrix(matrix: np.ndarray, moe_layers: list[int], ep_size: int) -> pd.DataFrame:
    """The plan rows of a physical-to-logical matrix (inverse of `plan_matrix`)."""
    matrix = np.asarray(matrix, dtype=np.int64)
    if matrix.ndim != 2 or matrix.shape[0] != len(moe_layers):
        raise ValueError(f"expected a [{len(moe_layers)}, num_physical] map, got shape {matrix.shape}")
    if matrix.shape[1] % ep_size:
        raise ValueError(f"{matrix.shape[1]} physical slots do not split over ep_size={ep_size} GPUs")
    per_gpu = matrix.shape[1] // ep_size
    physical = np.arange(matrix.shape[1])
    return pd.DataFrame(
        {
            "layer": np.repeat(np.asarray(moe_layers, dtype=np.int64), matrix.shape[1]),
            "gpu": np.tile(physical // per_gpu, len(moe_layers)),
            "slot": np.tile(physical % per_gpu, len(moe_layers)),
            "expert": matrix.reshape(-1),
        }
    )


def load_matrix(loads: pd.DataFrame, layers: list[int], num_experts: int) -> np.ndarray:
    """[len(layers), E] integer loads from `layer, expert, tokens` (layers without loads are zero)."""
    out = np.zeros((len(layers), num_experts), dtype=np.int64)
    row = {layer: i for i, layer in enumerate(layers)}
    known = loads[loads["layer"].isin(row)]
    out[known["layer"].map(row).to_numpy(), known["expert"].to_numpy(dtype=np.int64)] = known[
        "tokens"
    ].to_numpy()
    return out


# -- SGLang --------------------------------------------------------------------------------
def sglang_expert_location(
    plan: pd.DataFrame, moe_layers: list[int], num_hidden_layers: int, num_experts: int
) -> dict[str, Any]:
    """`{"physical_to_logical_map": [num_hidden_layers][num_physical]}`; dense layers get SGLang's
    trivial row (physical p -> logical p mod E, as `ExpertLocationMetadata.init_trivial`)."""
    _, matrix = plan_matrix(plan, moe_layers, num_experts)
    full = np.tile(np.arange(matrix.shape[1]) % num_experts, (num_hidden_layers, 1))
    full[np.asarray(moe_layers)] = matrix
    return {"physical_to_logical_map": full.tolist()}


def sglang_logical_count(loads: pd.DataFrame, num_hidden_layers: int, num_experts: int) -> dict[str, Any]:
    """`{"logical_count": [num_hidden_layers][E]}`: routed tokens per logical expert (dense layers 0)."""
    return {"logical_count": load_matrix(loads, list(range(num_hidden_layers)), num_experts).tolist()}


def read_sglang_plan(path: str | Path, moe_layers: list[int], ep_size: int) -> pd.DataFrame:
    """The plan of an SGLang expert-location file, for the given MoE layers and EP size."""
    data = _read_dict(path)
    if "physical_to_logical_map" not in data:
        raise ValueError(f"{path}: no 'physical_to_logical_map' (keys: {', '.join(data) or 'none'})")
    matrix = np.asarray(data["physical_to_logical_map"], dtype=np.int64)
    if matrix.ndim != 2 or matrix.shape[0] <= max(moe_layers):
        raise ValueError(
            f"{path}: physical_to_logical_map has shape {matrix.shape}; expected [num_hidden_layers, P]"
        )
    return plan_from_matrix(matrix[np.asarray(moe_layers)], moe_layers, ep_size)


def read_sglang_loads(path: str | Path, moe_layers: list[int]) -> pd.DataFrame:
    """`layer, expert, tokens` of an SGLang `logical_count` file ([layers, E] or [passes, layers, E])."""
    data = _read_dict(path)
    if "logical_count" not in data:
        raise ValueError(f"{path}: no 'logical_count' (keys: {', '.join(data) or 'none'})")
    counts = np.asarray(data["logical_count"], dtype=np.int64)
    if counts.ndim == 3:
        counts = counts.sum(axis=0)
    return _loads_frame(counts[np.asarray(moe_layers)], moe_layers)


# -- vLLM ----------------------------------------------------------------------------------
def vllm_initial_mapping(plan: pd.DataFrame, moe_layers: list[int], num_experts: int) -> dict[str, Any]:
    """The `eplb_initial_mapping` record; its layer keys count MoE layers from 0, as vLLM does."""
    _, matrix = plan_matrix(plan, moe_layers, num_experts)
    return {
        "record_type": "eplb_initial_mapping",
        "version": VLLM_VERSION,
        "num_redundant_experts": int(matrix.shape[1] - num_experts),
        "num_slots": int(matrix.shape[1]),
        "initial_global_assignments": {str(i): row.tolist() for i, row in enumerate(matrix)},
    }


def vllm_load_stats(
    steps: pd.DataFrame, moe_layers: list[int], num_experts: int, ep_size: int, model: str | None = None
) -> list[dict[str, Any]]:
    """`eplb_load_meta` then one `eplb_load_stats` record per step. The run was recorded without
    replicas, so slots are logical experts (`p2l_map` the identity) and `expert_load` the counts."""
    identity = np.tile(np.arange(num_experts), (len(moe_layers), 1)).tolist()
    records: list[dict[str, Any]] = [
        {
            "record_type": "eplb_load_meta",
            "version": VLLM_VERSION,
            "model": model,
            "num_ranks": int(ep_size),
            "num_groups": 1,
            "num_nodes": 1,
            "num_layers": len(moe_layers),
            "num_redundant_experts": 0,
        }
    ]
    for step, rows in steps.groupby("step", sort=True):
        records.append(
            {
                "record_type": "eplb_load_stats",
                "version": VLLM_VERSION,
                "step": int(step),
                "num_ranks": int(ep_size),
                "expert_load": load_matrix(rows, moe_layers, num_experts).tolist(),
                "p2l_map": identity,
            }
        )
    return records


def read_vllm_plan(path: str | Path, moe_layers: list[int], ep_size: int) -> pd.DataFrame:
    """The plan of a vLLM `eplb_initial_mapping` JSONL file (MoE layer i -> moe_layers[i])."""
    records = [r for r in _read_jsonl(path) if r.get("record_type") == "eplb_initial_mapping"]
    if not records:
        raise ValueError(f"{path}: no eplb_initial_mapping record")
    assignments = records[-1]["initial_global_assignments"]
    matrix = np.asarray([assignments[str(i)] for i in range(len(moe_layers))], dtype=np.int64)
    return plan_from_matrix(matrix, moe_layers, ep_size)


def read_vllm_loads(path: str | Path, moe_layers: list[int]) -> pd.DataFrame:
    """`step, layer, expert, tokens` of a vLLM load-stats JSONL: each slot's load added to its
    logical expert through `p2l_map`, as generate_static_mapping.py aggregates them."""
    frames = []
    for record in _read_jsonl(path):
        if record.get("record_type") != "eplb_load_stats":
            continue
        load = np.asarray(record["expert_load"], dtype=np.int64)
        p2l = np.asarray(record["p2l_map"], dtype=np.int64)
        if load.shape != p2l.shape or load.shape[0] != len(moe_layers):
            raise ValueError(
                f"{path}: step {record.get('step')}: expert_load {load.shape} and p2l_map {p2l.shape} disagree"
            )
        logical = np.zeros((load.shape[0], int(p2l.max()) + 1), dtype=np.int64)
        for i in range(load.shape[0]):
            np.add.at(logical[i], p2l[i], load[i])
        frames.append(_loads_frame(logical, moe_layers).assign(step=int(record["step"])))
    if not frames:
        raise ValueError(f"{path}: no eplb_load_stats record")
    return pd.concat(frames, ignore_index=True)[["step", "layer", "expert", "tokens"]]


# -- files ---------------------------------------------------------------------------------
def write_plan(path: str | Path, fmt: str, plan: pd.DataFrame, facts: dict[str, Any]) -> Path:
    """Write `plan` for engine `fmt`; `facts` holds moe_layers, num_hidden_layers, num_experts."""
    path = Path(path)
    if fmt == "sglang":
        data = sglang_expert_location(
            plan, facts["moe_layers"], facts["num_hidden_layers"], facts["num_experts"]
        )
        return _write_dict(path, data)
    if fmt == "vllm":
        return _write_jsonl(path, [vllm_initial_mapping(plan, facts["moe_layers"], facts["num_experts"])])
    raise ValueError(f"format {fmt!r} is not known; use one of {', '.join(FORMATS)}")


def write_loads(path: str | Path, fmt: str, steps: pd.DataFrame, facts: dict[str, Any]) -> Path:
    """Write per-step loads (`step, layer, expert, tokens`) for engine `fmt` (SGLang: summed)."""
    path = Path(path)
    if fmt == "sglang":
        total = steps.groupby(["layer", "expert"], as_index=False)["tokens"].sum()
        return _write_dict(
            path, sglang_logical_count(total, facts["num_hidden_layers"], facts["num_experts"])
        )
    if fmt == "vllm":
        records = vllm_load_stats(
            steps, facts["moe_layers"], facts["num_experts"], facts["ep_size"], facts.get("model")
        )
        return _write_jsonl(path, records)
    raise ValueError(f"format {fmt!r} is not known; use one of {', '.join(FORMATS)}")


def _loads_frame(counts: np.ndarray, layers: list[int]) -> pd.DataFrame:
    num_experts = counts.shape[1]
    return pd.DataFrame(
        {
            "layer": np.repeat(np.asarray(layers, dtype=np.int64), num_experts),
            "expert": np.tile(np.arange(num_experts), len(layers)),
            "tokens": counts.reshape(-1),
        }
    )


def _write_dict(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".pt":  # SGLang also reads torch.save'd dicts of tensors
        import torch

        torch.save({k: torch.tensor(v) for k, v in data.items()}, path)
    else:
        path.write_text(json.dumps(data) + "\n", encoding="utf-8")
    return path


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _read_dict(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if path.suffix == ".pt":
        import torch

        return {k: v.tolist() for k, v in torch.load(path, weights_only=True).items()}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON ({exc})") from None
    return records
