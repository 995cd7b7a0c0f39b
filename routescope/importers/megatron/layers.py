"""Run layer ids for Megatron's (block, mtp_idx, layer) router keys, across pipeline stages.

Megatron numbers `layer` from the module name (`decoder.layers.<n>`), which restarts at 0 on
every pipeline stage, and MTP layers restart at 0 too (their own `mtp_idx`). The run needs one
id per router, so:

- decoder layer `n` of pipeline stage `s` becomes `s * S + n`, where S (layers per stage) is
  `--layers-per-stage` or one more than the highest decoder `layer` any rank wrote; stage
  `s` of rank `r` is `r // (ranks / P)` (Megatron's default rank order tp-cp-ep-dp-pp puts
  the pipeline stage outermost). With even stages this is the model's own layer number.
- MTP layer `m` of MTP head `h` comes after every decoder layer: `P * S + h * M + m`, where M
  is one more than the highest MTP `layer`.

The manifest's `imported_from.layers` maps each run layer id back to its block, Megatron
layer, mtp_idx and stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from routescope.importers.core.errors import ImportFormatError
from routescope.importers.megatron.trace import LayerKey, TraceRecord, describe


@dataclass
class LayerMap:
    """(stage, block, mtp_idx, layer) -> run layer id, and the ranks' pipeline stages."""

    stages: int
    ranks_per_stage: int
    layers_per_stage: int
    mtp_layers: int
    ids: dict[tuple[int, str, int | None, int], int]

    def stage(self, rank: int) -> int:
        return rank // self.ranks_per_stage

    def owner(self, rank: int) -> int:
        """The first-stage rank that feeds `rank` (same data-parallel slot): tokens are kept on it."""
        return rank % self.ranks_per_stage

    def layer_id(self, record: TraceRecord) -> int:
        return self.ids[(self.stage(record.rank), *record.key)]

    def manifest(self) -> dict[str, Any]:
        """{run layer id: {block, layer, mtp_idx, stage}} for the manifest."""
        out = {}
        for (stage, block, mtp_idx, layer), layer_id in sorted(self.ids.items(), key=lambda item: item[1]):
            entry: dict[str, Any] = {"block": block, "layer": layer, "stage": stage}
            if mtp_idx is not None:
                entry["mtp_idx"] = mtp_idx
            out[str(layer_id)] = entry
        return out


def build_layer_map(
    keys_by_rank: dict[int, set[LayerKey]],
    world: int,
    stages: int = 1,
    layers_per_stage: int | None = None,
) -> LayerMap:
    """Run layer ids for every key the ranks wrote; refuses ranks of one stage that disagree."""
    if stages < 1 or world % stages:
        raise ImportFormatError(f"--pipeline-stages {stages} does not divide the {world} ranks of the trace")
    per_stage = world // stages
    decoder = [key[2] for keys in keys_by_rank.values() for key in keys if key[0] == "decoder"]
    mtp = [key[2] for keys in keys_by_rank.values() for key in keys if key[0] == "mtp"]
    highest = max(decoder, default=-1)
    if layers_per_stage is not None and layers_per_stage <= highest:
        raise ImportFormatError(
            f"--layers-per-stage {layers_per_stage}: the trace has decoder layer {highest} on one stage"
        )
    size = layers_per_stage if layers_per_stage is not None else highest + 1
    mtp_size = max(mtp, default=-1) + 1
    _check_stages_agree(keys_by_rank, per_stage, stages)
    ids: dict[tuple[int, str, int | None, int], int] = {}
    for rank, keys in keys_by_rank.items():
        stage = rank // per_stage
        for block, mtp_idx, layer in keys:
            if block == "decoder":
                ids[(stage, block, mtp_idx, layer)] = stage * size + layer
            else:
                ids[(stage, block, mtp_idx, layer)] = stages * size + (mtp_idx or 0) * mtp_size + layer
    return LayerMap(stages, per_stage, size, mtp_size, ids)


def _check_stages_agree(keys_by_rank: dict[int, set[LayerKey]], per_stage: int, stages: int) -> None:
    """Ranks of one pipeline stage run the same layers; different decoder layers mean stages."""
    by_stage: dict[int, tuple[int, set[LayerKey]]] = {}
    for rank in sorted(keys_by_rank):
        keys = {key for key in keys_by_rank[rank] if key[0] == "decoder"}
        if not keys:
            continue
        stage = rank // per_stage
        first = by_stage.setdefault(stage, (rank, keys))
        if first[1] != keys:
            hint = (
                "these look like pipeline stages (Megatron restarts `layer` at 0 on each): pass --pipeline-stages P"
                if stages == 1
                else f"with --pipeline-stages {stages} they should be one stage; check P"
            )
            only = sorted(first[1] ^ keys)
            raise ImportFormatError(
                f"ranks {first[0]} and {rank} traced different decoder layers (e.g. {describe(only[0])}); {hint}"
            )
