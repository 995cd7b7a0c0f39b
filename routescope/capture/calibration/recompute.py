"""One expert's down-projection recomputed from a fused experts module's own weights.

A hook on the fused module never sees one expert's output, so the calibrator
(`capture/calibration/calibrator.py`) recomputes it here for the tokens routed to that expert, in the
layout the module declares (`ExpertsLayout`: transposed, bias, gated).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from routescope.capture.experts import ExpertsLayout


def _linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool
) -> torch.Tensor:
    out = x @ weight if transposed else F.linear(x, weight)
    return out + bias if bias is not None else out


def _bias(module: nn.Module, name: str, expert: int, layout: ExpertsLayout) -> torch.Tensor | None:
    if not layout.has_bias:
        return None
    bias = getattr(module, name, None)
    return bias[expert] if bias is not None else None


def expert_down_output(
    module: nn.Module, layout: ExpertsLayout, expert: int, x: torch.Tensor
) -> torch.Tensor:
    """Output of expert `expert`'s down-projection (+ bias) for tokens `x`, before any router weight."""
    if layout.has_gate:
        h = _linear(
            x,
            module.gate_up_proj[expert],
            _bias(module, "gate_up_proj_bias", expert, layout),
            layout.transposed,
        )
        h = module._apply_gate(h) if hasattr(module, "_apply_gate") else _default_gate(module, h)
    else:
        h = module.act_fn(
            _linear(
                x, module.up_proj[expert], _bias(module, "up_proj_bias", expert, layout), layout.transposed
            )
        )
    return _linear(
        h, module.down_proj[expert], _bias(module, "down_proj_bias", expert, layout), layout.transposed
    )


def _default_gate(module: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return module.act_fn(gate) * up
