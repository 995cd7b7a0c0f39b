"""The scoped hooks of one Super Expert calibration pass (used by `capture/calibration/activations.py`).

A pre-hook on each fused experts module recomputes every hit expert's down-projection
(`capture/calibration/recompute.py`), a forward hook on each shared expert and one on each decoder
layer; all update the device-side maxima of `capture/calibration/maxima.py`. Every handle is removed in
`close`, also when adding hooks fails halfway.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from routescope.capture.adapters import _arg
from routescope.capture.calibration.maxima import ExpertMaxima, HiddenMaxima
from routescope.capture.calibration.recompute import expert_down_output
from routescope.capture.experts import ExpertSite, SharedExpert
from routescope.errors import RouteScopeError


class Calibrator:
    """Scoped hooks of one calibration pass; every handle lives in `handles`, removed in `close`."""

    def __init__(
        self,
        model: nn.Module,
        sites: list[ExpertSite],
        layers: list[tuple[int, nn.Module]],
        median_cap: int | None = None,
    ) -> None:
        self.model = model
        self.sites = sites
        self.layers = layers
        self.handles: list[Any] = []
        self.valid: torch.Tensor | None = None  # [batch, seq] bool of the current forward
        self.positions: torch.Tensor | None = None
        self.seq_offset = 0
        self.routed: dict[int, ExpertMaxima] = {}
        self.shared: dict[int, ExpertMaxima] = {}
        self.hidden: dict[int, HiddenMaxima] = {}
        self.median_cap = median_cap  # |h| values kept per layer for the median (maxima.MedianSample)

    def __enter__(self) -> Calibrator:
        try:
            for site in self.sites:
                device = site.experts.down_proj.device
                self.routed[site.layer] = ExpertMaxima(site.num_experts, device)
                self.handles.append(
                    site.experts.register_forward_pre_hook(self._routed_hook(site), with_kwargs=True)
                )
                if site.shared:
                    self.shared[site.layer] = ExpertMaxima(len(site.shared), device)
                for shared in site.shared:
                    self.handles.append(
                        shared.output.register_forward_hook(self._shared_hook(site.layer, shared))
                    )
            for index, module in self.layers:
                self.handles.append(module.register_forward_hook(self._hidden_hook(index)))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        while self.handles:
            self.handles.pop().remove()

    def _valid_rows(self, rows: int, where: str) -> torch.Tensor:
        assert self.valid is not None
        if self.valid.numel() != rows:
            raise RouteScopeError(
                f"{where} saw {rows} token rows but the batch has {self.valid.numel()} tokens; "
                "Super Expert calibration expects one row per input token"
            )
        return self.valid.reshape(-1)

    def _routed_hook(self, site: ExpertSite):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = _arg(args, kwargs, 0, ("hidden_states",))
            index = _arg(args, kwargs, 1, ("top_k_index", "router_indices", "selected_experts"))
            weights = _arg(args, kwargs, 2, ("top_k_weights", "routing_weights", "router_scores"))
            x = hidden.reshape(-1, hidden.shape[-1])
            valid = self._valid_rows(x.shape[0], site.experts_name)
            index = index.reshape(x.shape[0], -1)
            token = torch.arange(x.shape[0], device=x.device).repeat_interleave(index.shape[1])
            expert = index.reshape(-1)
            # padding and expert-parallel sentinels (ids >= E) do not count
            keep = valid.repeat_interleave(index.shape[1]) & (expert >= 0) & (expert < site.num_experts)
            if weights.numel() == index.numel():
                # a slot sent at weight exactly 0 (ZAYA's skip class, EP masking) never reaches the output
                keep &= weights.reshape(-1) != 0
            expert, token = expert[keep], token[keep]
            order = torch.argsort(expert, stable=True)
            counts = torch.bincount(expert, minlength=site.num_experts).tolist()  # the one sync per layer
            hit, outputs = [], []
            with torch.no_grad():
                for e, tokens in enumerate(torch.split(token[order], counts)):
                    if tokens.numel():
                        hit.append(e)
                        outputs.append(expert_down_output(module, site.layout, e, x[tokens]))
            if hit:
                self.routed[site.layer].update(torch.tensor(hit, device=x.device), outputs)

        return hook

    def _shared_hook(self, layer: int, shared: SharedExpert):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            out = out.reshape(-1, out.shape[-1])
            valid = self._valid_rows(out.shape[0], shared.name)
            out = out[valid]
            if out.shape[0]:
                self.shared[layer].update(torch.tensor([shared.index], device=out.device), [out])

        return hook

    def _hidden_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            if not isinstance(hidden, torch.Tensor) or self.valid is None:
                return
            if hidden.dim() != 3 or hidden.shape[:2] != self.valid.shape:
                return  # not a [batch, seq, hidden] residual state (e.g. hyper-connection streams)
            if index not in self.hidden:
                self.hidden[index] = HiddenMaxima(hidden.device, self.median_cap)
            self.hidden[index].update(hidden, self.valid, self.positions, self.seq_offset)

        return hook
