"""Running routing totals of a model in training, kept on its device: what rs.watch reads per log.

`rs.record` moves every routing decision to the host; a training run needs far less: per MoE
layer, how many routing slots each expert got (`counts`), the summed softmax probability of
each expert (`prob_sum`, for the load-balancing loss), the summed squared logsumexp of the
router logits (`z_sum`, for the z-loss) and the token counts behind them. The hooks add
one forward's values to a float64 scratch buffer per layer on the layer's own device
(`index_add_` and masked sums, never `.item()`, so there is no host sync per layer per step).
When the model's forward returns, the scratch is folded into the window's buffer, and the
forward's own losses are added to running sums: per layer the aux loss and the z-loss of that
forward, and for the model transformers' `load_balancing_loss_func` over all layers of that
forward (what the model adds to its loss, and what TRL logs as `aux_loss`). A log then
reports the mean of the per-forward values, not a value pooled over the window (SPEC 4.1).
`read()` is the one sync: it concatenates the buffers, sums them over ranks when
torch.distributed is running (one `all_reduce`), copies them to the host and zeroes them.

Precision: the logits are cast to float32 and every product and sum runs with autocast off,
so a bf16 autocast region (TRL's default) changes nothing: no `@` that autocast would run in
bf16. Running sums are float64.

Which tokens count: the recording rule (docs/capture.md): a position counts when its
attention mask is 1 (no mask: every position). Positions whose label is -100 but whose mask
is 1 (prompt tokens under completion-only loss) count: the router routed them and the
experts ran on them. Packed (varlen) batches have no padding, so every position counts.

Which forwards count: the forwards of the model (the outermost call) that train: in training
mode (`model.train()`) or with gradients on (`is_training_forward`), so evaluation inside a
training run (eval mode under `torch.no_grad()`) is not mixed in. Router calls
outside a forward of the model, such as the recomputation of activation checkpointing
during backward, are ignored, so a checkpointed layer is not counted twice.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from routescope.capture.discovery import LogitsSite, RouterSite, find_logits_sites, find_routers
from routescope.capture.recording.identity import bind_inputs
from routescope.errors import RouteScopeError

# layout of a layer's window buffer: the forward part (what one forward adds, also the scratch)
# counts[E], prob_sum[E], z_sum, logit_tokens, tokens; then the per-forward sums
# aux_forward_sum, aux_forwards, z_forward_sum, z_forwards.
FORWARD_TAIL = 4


@dataclass
class LayerTotals:
    """One MoE layer's totals since the previous read (host, summed over ranks)."""

    layer: int
    num_experts: int
    top_k: int
    counts: np.ndarray  # [E] routing slots per expert (every slot counts)
    tokens: float  # tokens routed
    prob_sum: np.ndarray | None  # [E] summed softmax(router logits); None without logits of width E
    z_sum: float | None  # summed logsumexp(router logits)^2; None without logits
    logit_tokens: float  # tokens behind prob_sum and z_sum
    aux_forward_sum: float = 0.0  # sum over forwards of this layer's aux loss in that forward
    aux_forwards: float = 0.0  # forwards behind aux_forward_sum
    z_forward_sum: float = 0.0  # sum over forwards of this layer's z-loss in that forward
    z_forwards: float = 0.0  # forwards behind z_forward_sum


@dataclass
class WindowTotals:
    """What `RoutingCounters.read` returns: per layer, and the model's per-forward aux loss."""

    layers: list[LayerTotals]
    aux_forward_sum: float  # sum over forwards of load_balancing_loss_func over every layer
    aux_forwards: float  # forwards behind it (0: no forward had every layer's logits)
    forwards: float  # forwards counted (summed over ranks)


class RoutingCounters:
    """Context manager: hooks that keep per-layer routing totals on the device.

    `only_training=True` counts only training forwards (`is_training_forward`). `layers` restricts the
    MoE layers (decoder-layer indices).
    """

    def __init__(self, model: nn.Module, layers: Any = None, only_training: bool = True) -> None:
        self.model = model
        self.only_training = only_training
        self.sites: list[RouterSite] = find_routers(model)
        if layers is not None:
            wanted = sorted({int(x) for x in layers})
            found = [site.layer for site in self.sites]
            if not wanted or set(wanted) - set(found):
                raise ValueError(f"layers={wanted} is not allowed: this model's MoE layers are {found}")
            self.sites = [site for site in self.sites if site.layer in wanted]
        self.logits_sites: list[LogitsSite] = find_logits_sites(model, [s.layer for s in self.sites])
        self._experts = {site.layer: site.num_experts for site in self.sites}
        self._width = {site.layer: 2 * site.num_experts + 3 + FORWARD_TAIL for site in self.sites}
        self._buffers: dict[int, torch.Tensor] = {}
        self._scratch: dict[int, torch.Tensor] = {}  # the forward in flight, per layer
        self._with_probs: set[int] = set()  # layers whose logits of width E the forward saw
        self._model_sums: torch.Tensor | None = None  # [aux_forward_sum, aux_forwards, forwards]
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._signature = inspect.signature(model.forward)
        self._depth = 0
        self._active = False
        self._mask: torch.Tensor | None = None  # [tokens] float64 of the forward in flight
        self._mask_by_device: dict[Any, torch.Tensor] = {}  # (device, form) -> mask
        self.forwards = 0  # forwards counted since the last read
        self.mismatched = 0  # layer calls whose token count differed from the mask (all counted)

    # -- hooks ---------------------------------------------------------------------------
    def __enter__(self) -> RoutingCounters:
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._begin, with_kwargs=True))
            self._handles.append(self.model.register_forward_hook(self._end, always_call=True))
            for site in self.sites:
                if site.adapter.hook == "pre":
                    handle = site.module.register_forward_pre_hook(self._pre_hook(site), with_kwargs=True)
                else:
                    handle = site.module.register_forward_hook(self._post_hook(site), with_kwargs=True)
                self._handles.append(handle)
            for logits_site in self.logits_sites:
                self._handles.append(logits_site.module.register_forward_hook(self._logits_hook(logits_site)))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook (the totals stay readable)."""
        while self._handles:
            self._handles.pop().remove()
        self._active, self._depth, self._mask = False, 0, None
        self._scratch, self._with_probs = {}, set()

    def _begin(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._depth += 1
        if self._depth > 1:
            return  # the model called itself: the outer call is the forward
        self._active = not self.only_training or is_training_forward(module)
        if not self._active:
            return
        self.forwards += 1
        self._mask, self._mask_by_device = self._token_mask(args, kwargs), {}
        self._scratch, self._with_probs = {}, set()

    def _end(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._depth = max(0, self._depth - 1)
        if self._depth == 0:
            if self._active:
                with torch.autocast(_device_type(self._scratch), enabled=False):
                    self._fold()
            self._active, self._mask, self._mask_by_device = False, None, {}
            self._scratch, self._with_probs = {}, set()

    def _fold(self) -> None:
        """Add the forward's scratch to the window, and its per-forward losses to their sums.

        Per layer, with L the slots per expert, P the summed probabilities, T the tokens: the
        aux loss E * sum_e (L_e / T) (P_e / T) and the z-loss z_sum / T of this forward. For the
        model, transformers' `load_balancing_loss_func` concatenates every layer's logits of the
        forward: the same formula over the layers' summed L, P and T. All on the device."""
        if not self._scratch:
            return
        pooled: list[torch.Tensor] = []  # per layer [L (E), P (E), T_logits, T]
        anchor = next(iter(self._scratch.values())).device
        for layer, scratch in self._scratch.items():
            e = self._experts[layer]
            buffer = self._buffer(layer, scratch.device)
            buffer[: 2 * e + 3].add_(scratch)
            counts, probs = scratch[:e], scratch[e : 2 * e]
            z_sum, logit_tokens, tokens = scratch[2 * e], scratch[2 * e + 1], scratch[2 * e + 2]
            has_logits = (logit_tokens > 0).to(scratch.dtype)
            z = torch.where(logit_tokens > 0, z_sum / logit_tokens.clamp(min=1e-300), 0.0)
            if layer in self._with_probs:
                seen = ((tokens > 0) & (logit_tokens > 0)).to(scratch.dtype)
                denominator = (tokens * logit_tokens).clamp(min=1e-300)
                aux = e * (counts * probs).sum() / denominator * seen
                buffer[2 * e + 3 :].add_(torch.stack([aux, seen, z, has_logits]))
                pooled.append(torch.cat([counts, probs, logit_tokens[None], tokens[None]]).to(anchor))
            else:
                zero = z.new_zeros(())
                buffer[2 * e + 3 :].add_(torch.stack([zero, zero, z, has_logits]))
        sums = self._model_sums
        if sums is None:
            sums = self._model_sums = torch.zeros(3, dtype=torch.float64, device=anchor)
        experts = {self._experts[layer] for layer in self._scratch}
        if len(pooled) == len(self._scratch) and len(experts) == 1:
            e = experts.pop()
            total = torch.stack(pooled).sum(0)
            counts, probs, logit_tokens, tokens = total[:e], total[e : 2 * e], total[2 * e], total[2 * e + 1]
            seen = ((tokens > 0) & (logit_tokens > 0)).to(total.dtype)
            aux = e * (counts * probs).sum() / (tokens * logit_tokens).clamp(min=1e-300) * seen
            sums.add_(torch.stack([aux, seen, seen.new_ones(())]).to(sums.device))
        else:
            sums[2] += 1

    def _token_mask(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        try:
            inputs = bind_inputs(self._signature, args, kwargs)
        except (RouteScopeError, TypeError):
            return None  # packed inputs: no padding, every position counts
        mask = inputs.attention_mask
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            return mask.detach().reshape(-1).to(torch.float64)
        return None

    def _mask_for(self, rows: int, device: torch.device, kind: Any) -> torch.Tensor | None:
        """The forward's token mask on `device`, float64 or float32, or repeated k times per row
        (kind = ("slots", k)); None: count every row. Each form is built once per forward."""
        mask = self._mask
        if mask is None:
            return None
        if mask.shape[0] != rows:
            self.mismatched += 1
            return None
        key = (device, kind)
        cached = self._mask_by_device.get(key)
        if cached is None:
            on_device = mask.to(device, non_blocking=True)
            if kind == torch.float32:
                cached = on_device.to(torch.float32)
            elif isinstance(kind, tuple):
                cached = on_device[:, None].expand(rows, kind[1]).reshape(-1)
            else:
                cached = on_device
            self._mask_by_device[key] = cached
        return cached

    def _buffer(self, layer: int, device: torch.device) -> torch.Tensor:
        buffer = self._buffers.get(layer)
        if buffer is None:
            buffer = self._buffers[layer] = torch.zeros(
                self._width[layer], dtype=torch.float64, device=device
            )
        return buffer

    def _forward_buffer(self, layer: int, device: torch.device) -> torch.Tensor:
        """This forward's scratch of `layer` (counts, prob_sum, z_sum, logit_tokens, tokens)."""
        scratch = self._scratch.get(layer)
        if scratch is None:
            scratch = self._scratch[layer] = torch.zeros(
                2 * self._experts[layer] + 3, dtype=torch.float64, device=device
            )
        return scratch

    def _add_choice(self, site: RouterSite, indices: torch.Tensor) -> None:
        indices = indices.detach().reshape(indices.shape[0], -1)
        rows, k = indices.shape
        device = indices.device
        buffer = self._forward_buffer(site.layer, device)
        slots = self._mask_for(rows, device, ("slots", k))
        if slots is None:
            buffer[: site.num_experts].index_add_(
                0, indices.reshape(-1).long(), torch.ones(rows * k, dtype=torch.float64, device=device)
            )
            buffer[-1] += rows
        else:
            buffer[: site.num_experts].index_add_(0, indices.reshape(-1).long(), slots)
            buffer[-1] += self._mask_for(rows, device, torch.float64).sum()

    def _pre_hook(self, site: RouterSite):
        extract = site.adapter.extract

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self._active:
                self._add_choice(site, extract(module, args, kwargs, None)[0])

        return hook

    def _post_hook(self, site: RouterSite):
        extract = site.adapter.extract

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if self._active:
                self._add_choice(site, extract(module, args, kwargs, output)[0])

        return hook

    def _logits_hook(self, site: LogitsSite):
        num_experts = self._experts[site.layer]

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if not self._active:
                return
            logits = output[site.index] if isinstance(output, (tuple, list)) else output
            # float32 arithmetic (the router's own precision or better) with autocast off, so no
            # product runs in bf16; float64 running sums
            with torch.autocast(logits.device.type, enabled=False):
                self._add_logits(site.layer, num_experts, logits.detach())

        return hook

    def _add_logits(self, layer: int, num_experts: int, logits: torch.Tensor) -> None:
        logits = logits.reshape(-1, logits.shape[-1]).float()
        rows = logits.shape[0]
        buffer = self._forward_buffer(layer, logits.device)
        mask = self._mask_for(rows, logits.device, torch.float32)
        top = logits.amax(-1, keepdim=True)
        exp = (logits - top).exp_()
        total = exp.sum(-1, keepdim=True)
        squared = (top + total.log()).square_().reshape(-1)  # logsumexp^2
        # one add into the buffer: [prob_sum (E, or nothing), z_sum, tokens]; masked sums as
        # elementwise products (a matmul would run in bf16 under an enclosing autocast)
        if mask is None:
            parts = [squared.sum(0, keepdim=True), squared.new_full((1,), float(rows))]
        else:
            parts = [(squared * mask).sum(0, keepdim=True), mask.sum(0, keepdim=True)]
        if logits.shape[-1] == num_experts:
            probs = exp.div_(total)  # softmax
            parts.insert(0, probs.sum(0) if mask is None else (probs * mask[:, None]).sum(0))
            buffer[num_experts : 2 * num_experts + 2].add_(torch.cat(parts))
            self._with_probs.add(layer)
        else:
            buffer[2 * num_experts : 2 * num_experts + 2].add_(torch.cat(parts))

    # -- reading -------------------------------------------------------------------------
    def read(self, reset: bool = True) -> WindowTotals:
        """The totals since the previous read, summed over ranks; one host sync."""
        devices = [b.device for b in self._buffers.values()]
        device = devices[0] if devices else torch.device("cpu")
        parts = [
            self._buffers[s.layer].to(device)
            if s.layer in self._buffers
            else torch.zeros(self._width[s.layer], dtype=torch.float64, device=device)
            for s in self.sites
        ]
        model_sums = self._model_sums
        parts.append(model_sums.to(device) if model_sums is not None else torch.zeros(3, dtype=torch.float64))
        flat = torch.cat([p.to(device) for p in parts])
        if _distributed():
            import torch.distributed as dist

            if dist.get_backend() == "nccl" and flat.device.type != "cuda":
                flat = flat.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(flat)
        host = flat.cpu().numpy()
        if reset:
            for buffer in self._buffers.values():
                buffer.zero_()
            if model_sums is not None:
                model_sums.zero_()
            self.forwards = 0
        totals, offset = [], 0
        with_logits = {s.layer for s in self.logits_sites}
        for site in self.sites:
            e = site.num_experts
            chunk = host[offset : offset + self._width[site.layer]]
            offset += self._width[site.layer]
            has_logits = site.layer in with_logits
            aux_sum, aux_n, z_sum, z_n = (float(v) for v in chunk[2 * e + 3 :])
            totals.append(
                LayerTotals(
                    layer=site.layer,
                    num_experts=e,
                    top_k=site.top_k,
                    counts=chunk[:e].copy(),
                    tokens=float(chunk[2 * e + 2]),
                    prob_sum=chunk[e : 2 * e].copy() if has_logits and chunk[e : 2 * e].any() else None,
                    z_sum=float(chunk[2 * e]) if has_logits else None,
                    logit_tokens=float(chunk[2 * e + 1]),
                    aux_forward_sum=aux_sum,
                    aux_forwards=aux_n,
                    z_forward_sum=z_sum,
                    z_forwards=z_n,
                )
            )
        aux_sum, aux_n, forwards = (float(v) for v in host[offset : offset + 3])
        return WindowTotals(totals, aux_sum, aux_n, forwards)


def is_training_forward(model: nn.Module) -> bool:
    """A forward that trains: the model is in training mode, or gradients are on (a custom loop
    that never called `model.train()` on a `from_pretrained` model, which loads in eval mode).
    Evaluation runs under `torch.no_grad()` in eval mode, as the Trainer's does."""
    return model.training or torch.is_grad_enabled()


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _device_type(scratch: dict[int, torch.Tensor]) -> str:
    """The device type autocast is switched off for while a forward is folded."""
    return next(iter(scratch.values())).device.type if scratch else "cpu"
