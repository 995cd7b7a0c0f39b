"""Super Expert calibration (SPEC 4.6) and residual-stream statistics (massive activations).

`find_super_experts` runs the model over a few calibration batches with scoped hooks: a
pre-hook on each fused experts module recomputes every hit expert's down-projection from
the module's own inputs and weights (a module hook never sees one expert's output), a
forward hook on each shared expert's `down_proj` and one on each decoder layer. Results
are DataFrames, and with `out=` the `expert_activations` and `hidden_stats` tables of a run.
Called by `rs.find_super_experts`, the `super-experts` command and `rs.prune_experts`
(which shares the expert discovery below).
"""

from __future__ import annotations

import inspect
import math
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from routescope import schema
from routescope.capture.adapters import _arg
from routescope.capture.discovery import RouterSite, find_routers, text_config
from routescope.errors import RouteScopeError, UnsupportedModelError
from routescope.store.layout import table_dir
from routescope.store.manifest import MANIFEST_NAME, read_manifest, write_manifest
from routescope.store.writer import PartWriter

# Thresholds of SPEC 4.6: their one default each.
DEFAULT_QUANTILE = 99.5
DEFAULT_RATIO = 0.1
MASSIVE_LAYER_FRACTION = 0.75
MASSIVE_ABS = 100.0  # Sun et al. 2024: |h| > 100 ...
MASSIVE_MEDIAN_RATIO = 1000.0  # ... and > 1000 x median |h|

# Attribute names of a MoE block that hold its shared expert(s): an MLP, or a ModuleList of them.
SHARED_EXPERT_NAMES = ("shared_expert", "shared_experts")
# Where the fused experts module sits in a MoE block whose router is a separate module.
EXPERTS_NAMES = ("experts",)
# |h| values kept per layer for the median: exact below this, a uniform random sample of
# between this and twice this many values above it.
MEDIAN_SAMPLE_CAP = 1 << 20
MEDIAN_SAMPLE_SEED = 0

_DECODER_LAYER_RE = re.compile(r"^(.*?(?:^|\.)(?:layers|h|blocks|block))\.(\d+)(?:\.|$)")


# -- which experts a model has -----------------------------------------------------------
@dataclass(frozen=True)
class ExpertsLayout:
    """How a fused experts module stores its weights (transformers' use_experts_implementation flags)."""

    transposed: bool
    has_bias: bool
    has_gate: bool

    @classmethod
    def of(cls, module: nn.Module) -> ExpertsLayout:
        has_gate = bool(getattr(module, "has_gate", hasattr(module, "gate_up_proj")))
        transposed = getattr(module, "is_transposed", None)
        if transposed is None:  # an undecorated module: [E, out, in] unless the shapes say otherwise
            down = module.down_proj
            transposed = down.shape[1] != down.shape[2] and down.shape[2] == _hidden_of(module)
        has_bias = getattr(module, "has_bias", None)
        if has_bias is None:
            has_bias = getattr(module, "down_proj_bias", None) is not None
        return cls(bool(transposed), bool(has_bias), has_gate)


@dataclass
class SharedExpert:
    index: int  # 0.. within its layer's shared experts
    name: str  # module path of the shared expert
    output: nn.Module  # the module whose output is its down-projection (down_proj, or the MLP itself)


@dataclass
class ExpertSite:
    """One MoE layer: its routed experts (fused module) and shared experts."""

    layer: int
    router: RouterSite
    experts: nn.Module
    experts_name: str
    num_experts: int
    layout: ExpertsLayout
    shared: list[SharedExpert] = field(default_factory=list)


def _hidden_of(module: nn.Module) -> int | None:
    for attr in ("hidden_dim", "hidden_size"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    return None


def _is_3d(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == 3


def is_recomputable_experts(module: nn.Module) -> bool:
    """3-D expert weights and a forward(hidden_states, top_k_index, top_k_weights) signature."""
    up = getattr(module, "gate_up_proj", None)
    if up is None:
        up = getattr(module, "up_proj", None)
    if not (_is_3d(getattr(module, "down_proj", None)) and _is_3d(up)):
        return False
    try:
        params = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return False
    return len(params) >= 3


def _block_of(model: nn.Module, name: str) -> tuple[str, nn.Module]:
    parent = name.rsplit(".", 1)[0] if "." in name else ""
    return parent, model.get_submodule(parent)


def _find_experts(model: nn.Module, site: RouterSite) -> tuple[str, nn.Module]:
    if is_recomputable_experts(site.module):
        return site.name, site.module
    block_name, block = _block_of(model, site.name)
    for attr in EXPERTS_NAMES:
        module = getattr(block, attr, None)
        if isinstance(module, nn.Module) and is_recomputable_experts(module):
            return f"{block_name}.{attr}", module
    raise UnsupportedModelError(
        f"the routed experts of layer {site.layer} (router {site.name}, {type(site.module).__name__}) are not "
        "a fused experts module with 3-D gate_up_proj/down_proj called as (hidden_states, top_k_index, "
        "top_k_weights); Super Expert calibration cannot recompute them (see docs/super_experts.md)"
    )


def _find_shared(block_name: str, block: nn.Module) -> list[SharedExpert]:
    found: list[SharedExpert] = []
    for attr in SHARED_EXPERT_NAMES:
        module = getattr(block, attr, None)
        if not isinstance(module, nn.Module):
            continue
        members = list(module) if isinstance(module, nn.ModuleList) else [module]
        for i, member in enumerate(members):
            name = f"{block_name}.{attr}" + (f".{i}" if isinstance(module, nn.ModuleList) else "")
            down = getattr(member, "down_proj", None)
            output = down if isinstance(down, nn.Module) else member
            found.append(SharedExpert(len(found), name, output))
    return found


def find_expert_sites(model: nn.Module) -> list[ExpertSite]:
    """Every MoE layer's routed and shared experts; UnsupportedModelError for dense models."""
    sites = []
    for router in find_routers(model):
        experts_name, experts = _find_experts(model, router)
        block_name, block = _block_of(model, experts_name)
        num_experts = int(experts.down_proj.shape[0])
        layout = ExpertsLayout.of(experts)
        sites.append(
            ExpertSite(
                router.layer,
                router,
                experts,
                experts_name,
                num_experts,
                layout,
                _find_shared(block_name, block),
            )
        )
    return sites


def decoder_layers(model: nn.Module, sites: list[ExpertSite]) -> list[tuple[int, nn.Module]]:
    """(index, module) of each decoder layer: the ModuleList that holds the MoE layers."""
    match = _DECODER_LAYER_RE.match(sites[0].experts_name)
    if match is None:
        return []
    container = model.get_submodule(match.group(1))
    return [(int(name), module) for name, module in container.named_children() if name.isdigit()]


def massive_layer_count(num_hidden_layers: int) -> int:
    """round(0.75 * L) with Python's round (halves to even), as the paper's code does.

    The layers that may build massive activations; 6 layers -> 4 (0..3), 10 -> 8.
    """
    return round(MASSIVE_LAYER_FRACTION * num_hidden_layers)


# -- recomputing one expert's down-projection --------------------------------------------
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


# -- running statistics, kept on the model's device ---------------------------------------
class ExpertMaxima:
    """Per expert of one layer: running max |output|, its channel, tokens seen."""

    def __init__(self, count: int, device: torch.device) -> None:
        self.max = torch.zeros(count, dtype=torch.float32, device=device)
        self.channel = torch.full((count,), -1, dtype=torch.int64, device=device)
        self.tokens = torch.zeros(count, dtype=torch.int64, device=device)

    def update(self, experts: torch.Tensor, outputs: list[torch.Tensor]) -> None:
        """`experts`: ids [n] (on device); `outputs`: one [tokens, hidden] output per id."""
        per_channel = torch.stack([o.detach().abs().float().amax(dim=0) for o in outputs])
        values, channels = per_channel.max(dim=1)
        current = self.max[experts]
        better = values > current
        self.max[experts] = torch.where(better, values, current)
        self.channel[experts] = torch.where(better, channels, self.channel[experts])
        counts = torch.tensor([o.shape[0] for o in outputs], dtype=torch.int64, device=self.tokens.device)
        self.tokens[experts] += counts


class MedianSample:
    """A bounded uniform random sample of |h| values for a median; every value while they fit.

    Each value draws a uniform key (seeded generator); the sample is every value whose key
    lies below `threshold`. While `cap` values or fewer were seen the threshold is 1 and the
    median is exact. Past 2 * cap kept values the threshold drops to the cap-th smallest
    key, so the sample stays a uniform one of cap..2*cap values: no channel or position is
    favoured, whatever the hidden size (a fixed stride would keep whole channels only).
    """

    def __init__(self, cap: int = MEDIAN_SAMPLE_CAP, seed: int = MEDIAN_SAMPLE_SEED) -> None:
        self.cap = cap
        self.seed = seed
        self.threshold = 1.0
        self.seen = 0
        self.values: list[torch.Tensor] = []
        self.keys: list[torch.Tensor] = []
        self.kept = 0
        self._generator: torch.Generator | None = None

    @property
    def exact(self) -> bool:
        return self.threshold >= 1.0

    def add(self, values: torch.Tensor) -> None:
        values = values.reshape(-1)
        if self._generator is None:
            self._generator = torch.Generator(device=values.device).manual_seed(self.seed)
        keys = torch.rand(values.numel(), generator=self._generator, device=values.device)
        self.seen += values.numel()
        if not self.exact:
            keep = keys < self.threshold
            values, keys = values[keep], keys[keep]
        self.values.append(values)
        self.keys.append(keys)
        self.kept += values.numel()
        if self.kept > 2 * self.cap:
            keys = torch.cat(self.keys)
            smallest, index = torch.topk(keys, self.cap, largest=False, sorted=False)
            self.values, self.keys = [torch.cat(self.values)[index]], [smallest]
            self.kept = self.cap
            self.threshold = float(smallest.max())

    def median(self) -> float:
        if not self.kept:
            return math.nan
        # the lower median for an even count, as torch.median gives
        return float(torch.cat(self.values).median())


class HiddenMaxima:
    """Per decoder layer: running max |h| with its channel, sequence and position; a median sample."""

    def __init__(self, device: torch.device) -> None:
        self.max = torch.zeros((), dtype=torch.float32, device=device)
        self.channel = torch.full((), -1, dtype=torch.int64, device=device)
        self.seq = torch.full((), -1, dtype=torch.int64, device=device)
        self.pos = torch.full((), -1, dtype=torch.int64, device=device)
        self.sample = MedianSample(MEDIAN_SAMPLE_CAP)

    def update(
        self, hidden: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor, seq_offset: int
    ) -> None:
        a = hidden.detach().abs().float() * valid.unsqueeze(-1)
        width = a.shape[-1]
        value, flat = a.reshape(-1).max(dim=0)
        row = flat // width
        better = value > self.max
        self.max = torch.where(better, value, self.max)
        self.channel = torch.where(better, flat % width, self.channel)
        self.seq = torch.where(better, row // a.shape[1] + seq_offset, self.seq)
        self.pos = torch.where(better, positions.reshape(-1)[row], self.pos)
        self.sample.add(a[valid].reshape(-1))


# -- the calibration pass ----------------------------------------------------------------
class _Calibrator:
    """Scoped hooks of one calibration pass; every handle lives in `handles`, removed in `close`."""

    def __init__(
        self, model: nn.Module, sites: list[ExpertSite], layers: list[tuple[int, nn.Module]]
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

    def __enter__(self) -> _Calibrator:
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
                self.hidden[index] = HiddenMaxima(hidden.device)
            self.hidden[index].update(hidden, self.valid, self.positions, self.seq_offset)

        return hook


@dataclass
class Calibration:
    """The result of one calibration pass: per-expert maxima and per-layer hidden statistics."""

    experts: pd.DataFrame
    hidden: pd.DataFrame
    tokens: int
    sequences: int
    batches: int
    seconds: float
    thresholds: dict[str, Any]


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def iter_model_inputs(
    batches: Iterable[Any], tokenizer: Any = None, max_length: int = 512, device: torch.device | None = None
) -> Iterator[dict[str, Any]]:
    """Model-input dicts from dicts (passed through) or strings / lists of strings (tokenized)."""
    for number, batch in enumerate(batches):
        if isinstance(batch, str) or (
            isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], str)
        ):
            if tokenizer is None:
                raise ValueError(
                    f"calibration batch {number} is text; pass tokenizer= to tokenize it, or give dicts with input_ids"
                )
            texts = [batch] if isinstance(batch, str) else list(batch)
            if getattr(tokenizer, "pad_token", None) is None:
                tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
            batch = tokenizer(
                texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length
            )
            batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        elif not isinstance(batch, dict) and hasattr(batch, "keys"):
            batch = dict(batch)
        if not isinstance(batch, dict) or ("input_ids" not in batch and "inputs_embeds" not in batch):
            raise ValueError(
                f"calibration batch {number} must be a dict of model inputs with input_ids "
                f"(or a string with tokenizer=), got {type(batch).__name__}"
            )
        if device is not None:
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        yield batch


def _token_shape(batch: dict[str, Any]) -> tuple[int, int]:
    ids = batch.get("input_ids")
    if ids is None:
        ids = batch["inputs_embeds"][..., 0]
    if ids.dim() == 1:
        raise ValueError("calibration input_ids must be 2-D [batch, sequence]")
    return int(ids.shape[0]), int(ids.shape[1])


def _allowed_layers(layers: Iterable[int] | int | None, num_hidden_layers: int) -> list[int]:
    if layers is None:
        return list(range(massive_layer_count(num_hidden_layers)))
    if isinstance(layers, int):
        return list(range(layers))
    return sorted(int(layer) for layer in layers)


def classify_super_experts(
    acts: pd.DataFrame,
    num_hidden_layers: int,
    quantile: float = DEFAULT_QUANTILE,
    ratio: float = DEFAULT_RATIO,
    layers: Iterable[int] | int | None = None,
) -> pd.DataFrame:
    """`acts` (layer, expert, shared, max_abs_output[, tokens_seen]) with `is_super` and `ratio_to_median`.

    SPEC 4.6: a > percentile(A, quantile, linear) and a > max(A) * ratio and layer in `layers`
    (default: the first round(0.75 * num_hidden_layers)). A holds the experts of the searched
    layers only that saw at least one token, as the paper's code pools only the searched
    layers: a giant in a later layer never raises the thresholds. An expert that saw no
    token is never super. `ratio_to_median` divides by the median of the same pool A.
    """
    out = acts.copy()
    values = out["max_abs_output"].to_numpy(dtype=np.float64)
    seen = out["tokens_seen"].to_numpy() > 0 if "tokens_seen" in out.columns else np.ones(len(out), bool)
    allowed = _allowed_layers(layers, num_hidden_layers)
    searched = out["layer"].isin(allowed).to_numpy()
    pool = values[seen & searched]
    if pool.size:
        p = float(np.percentile(pool, quantile, method="linear"))
        top = float(pool.max()) * ratio
        median = float(np.median(pool))
    else:
        p = top = median = math.nan
    out["is_super"] = seen & searched & (values > p) & (values > top)
    out["ratio_to_median"] = values / median if median and median > 0 else math.nan
    out.attrs["thresholds"] = {
        "quantile": quantile,
        "ratio": ratio,
        "percentile_threshold": p,
        "max_threshold": top,
        "median": median,
        "pooled_experts": int(pool.size),
        "layers": allowed,
    }
    return out


def classify_massive(
    hidden: pd.DataFrame, abs_threshold: float = MASSIVE_ABS, median_ratio: float = MASSIVE_MEDIAN_RATIO
) -> pd.DataFrame:
    """`hidden` with `ratio_to_median` and `is_massive` (|h| > 100 and > 1000 x median |h|)."""
    out = hidden.copy()
    ratio = out["max_abs"] / out["median_abs"].where(out["median_abs"] > 0)
    out["ratio_to_median"] = ratio
    out["is_massive"] = (out["max_abs"] > abs_threshold) & (ratio > median_ratio).fillna(out["max_abs"] > 0)
    return out


def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    tokenizer: Any = None,
    quantile: float = DEFAULT_QUANTILE,
    ratio: float = DEFAULT_RATIO,
    layers: Iterable[int] | int | None = None,
    out: str | Path | None = None,
    *,
    max_length: int = 512,
    progress: bool = True,
) -> Calibration:
    """One calibration pass: the per-expert maxima with `is_super`, and the hidden-state statistics."""
    sites = find_expert_sites(model)
    config = text_config(model)
    num_hidden_layers = int(getattr(config, "num_hidden_layers", 0) or 0) or max(s.layer for s in sites) + 1
    device = _model_device(model)
    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    started = time.perf_counter()
    tokens = sequences = count = 0
    with _Calibrator(model, sites, decoder_layers(model, sites)) as cal, torch.no_grad():
        bar = tqdm(
            iter_model_inputs(batches, tokenizer, max_length, device),
            total=total,
            desc="calibrating",
            unit="batch",
            disable=not progress,
        )
        for batch in bar:
            rows, length = _token_shape(batch)
            mask = batch.get("attention_mask")
            valid = (
                mask.to(device).bool()
                if mask is not None
                else torch.ones(rows, length, dtype=torch.bool, device=device)
            )
            if valid.shape != (rows, length):
                raise ValueError(f"attention_mask has shape {tuple(valid.shape)}, input_ids {(rows, length)}")
            cal.valid = valid
            cal.positions = valid.long().cumsum(dim=1) - 1
            cal.seq_offset = sequences
            model(**batch)
            sequences += rows
            tokens += int(valid.sum())
            count += 1
            bar.set_postfix(tokens=tokens)
        bar.close()
    if tokens == 0:
        raise ValueError(
            "calibration data is empty: the batches held no tokens; pass at least one batch of "
            "input_ids (or text with tokenizer=) with a nonzero attention_mask"
        )
    experts = _experts_frame(sites, cal)
    experts = classify_super_experts(experts, num_hidden_layers, quantile, ratio, layers)
    thresholds = experts.attrs["thresholds"]
    experts = experts.sort_values(
        ["max_abs_output", "layer", "shared", "expert"], ascending=[False, True, True, True], kind="stable"
    ).reset_index(drop=True)
    experts.attrs["thresholds"] = thresholds
    hidden = classify_massive(_hidden_frame(cal))
    result = Calibration(experts, hidden, tokens, sequences, count, time.perf_counter() - started, thresholds)
    if out is not None:
        write_calibration(model, sites, result, out)
    return result


def _experts_frame(sites: list[ExpertSite], cal: _Calibrator) -> pd.DataFrame:
    parts = []
    for site in sites:
        for shared, stats in ((False, cal.routed.get(site.layer)), (True, cal.shared.get(site.layer))):
            if stats is None:
                continue
            parts.append(
                pd.DataFrame(
                    {
                        "layer": site.layer,
                        "expert": np.arange(stats.max.numel()),
                        "shared": shared,
                        "max_abs_output": stats.max.cpu().numpy(),
                        "channel": stats.channel.cpu().numpy(),
                        "tokens_seen": stats.tokens.cpu().numpy(),
                    }
                )
            )
    df = pd.concat(parts, ignore_index=True)
    return df.astype(
        {"layer": "int64", "expert": "int64", "shared": bool, "channel": "int64", "tokens_seen": "int64"}
    )


def _hidden_frame(cal: _Calibrator) -> pd.DataFrame:
    rows = [
        {
            "layer": layer,
            "max_abs": float(stats.max),
            "median_abs": stats.sample.median(),
            "channel": int(stats.channel),
            "seq_id": int(stats.seq),
            "pos": int(stats.pos),
        }
        for layer, stats in sorted(cal.hidden.items())
    ]
    columns = list(schema.HIDDEN_STATS_COLUMNS)
    return pd.DataFrame(rows, columns=columns)


def find_super_experts(
    model: nn.Module,
    batches: Iterable[Any],
    tokenizer: Any = None,
    quantile: float = DEFAULT_QUANTILE,
    ratio: float = DEFAULT_RATIO,
    layers: Iterable[int] | int | None = None,
    out: str | Path | None = None,
    *,
    max_length: int = 512,
    progress: bool = True,
) -> pd.DataFrame:
    """Super Experts of `model` (SPEC 4.6) from a calibration pass over `batches`.

    One row per routed and shared expert of every MoE layer: layer, expert, shared,
    max_abs_output, channel, tokens_seen, ratio_to_median, is_super; sorted by
    max_abs_output, largest first. `attrs["thresholds"]` holds the two thresholds and the
    layers searched, `attrs["hidden_stats"]` the per-layer residual-stream statistics as
    records (layer, max_abs, median_abs, channel, seq_id, pos, ratio_to_median, is_massive;
    `calibrate` returns them as a DataFrame). With `out=` the
    `expert_activations` and `hidden_stats` tables are written into that run directory.
    """
    result = calibrate(
        model, batches, tokenizer, quantile, ratio, layers, out, max_length=max_length, progress=progress
    )
    experts = result.experts
    # records, not a DataFrame: pandas compares attrs with == when concatenating frames
    experts.attrs["hidden_stats"] = result.hidden.to_dict("records")
    experts.attrs["tokens"] = result.tokens
    return experts


# -- storage -------------------------------------------------------------------------------
@dataclass
class _Tables:
    tables: dict[str, dict[str, np.ndarray]]

    def to_tables(self) -> dict[str, dict[str, np.ndarray]]:
        return self.tables


def _columns(df: pd.DataFrame, table: str) -> dict[str, np.ndarray]:
    types = schema.TABLE_COLUMNS[table]
    return {name: df[name].to_numpy(dtype=dtype.to_pandas_dtype()) for name, dtype in types.items()}


def write_calibration(
    model: nn.Module, sites: list[ExpertSite], result: Calibration, out: str | Path
) -> Path:
    """Write `expert_activations` and `hidden_stats` (rank 0) into run `out`, replacing earlier ones.

    A directory that is not a run yet gets a manifest (tokens 0, complete) so `open_run` reads it.
    """
    run_dir = Path(out)
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = run_dir / MANIFEST_NAME
    manifest = read_manifest(run_dir) if manifest_path.exists() else _new_manifest(model, sites)
    tables = {
        schema.EXPERT_ACTIVATIONS: _columns(result.experts, schema.EXPERT_ACTIVATIONS),
        schema.HIDDEN_STATS: _columns(result.hidden, schema.HIDDEN_STATS),
    }
    old = {name: sorted(table_dir(run_dir, name, 0).glob("part-*")) for name in tables}
    writer = PartWriter(run_dir, rank=0)
    try:
        writer.submit(_Tables(tables))
    finally:
        writer.close()
    for paths in old.values():  # the new parts are in place: drop the previous calibration's
        for path in paths:
            path.unlink(missing_ok=True)
    thresholds = {k: v for k, v in result.thresholds.items() if not (isinstance(v, float) and math.isnan(v))}
    manifest["super_experts"] = {
        **thresholds,
        "tokens": result.tokens,
        "sequences": result.sequences,
        "batches": result.batches,
        "super_experts": [
            [int(r.layer), "shared" if r.shared else int(r.expert)]
            for r in result.experts[result.experts["is_super"]].itertuples()
        ],
        "massive_abs": MASSIVE_ABS,
        "massive_median_ratio": MASSIVE_MEDIAN_RATIO,
    }
    write_manifest(run_dir, manifest)
    return run_dir


def _new_manifest(model: nn.Module, sites: list[ExpertSite]) -> dict[str, Any]:
    import transformers

    import routescope

    config = text_config(model)
    return {
        "format_version": schema.FORMAT_VERSION,
        "model_type": getattr(config, "model_type", type(model).__name__),
        "model_name": getattr(config, "_name_or_path", "") or type(model).__name__,
        "model_class": type(model).__name__,
        "num_hidden_layers": int(getattr(config, "num_hidden_layers", 0) or 0),
        "moe_layers": [s.layer for s in sites],
        "num_experts": {str(s.layer): s.router.num_experts for s in sites},
        "top_k": {str(s.layer): s.router.top_k for s in sites},
        "router_kind": {str(s.layer): s.router.adapter.name for s in sites},
        "num_shared_experts": max(len(s.shared) for s in sites),
        "labels": [],
        "tokens": 0,
        "steps": 0,
        "complete": True,
        "rank": 0,
        "world_size": 1,
        "versions": {
            "routescope": routescope.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


__all__ = [
    "SHARED_EXPERT_NAMES",
    "Calibration",
    "ExpertSite",
    "ExpertsLayout",
    "calibrate",
    "classify_massive",
    "classify_super_experts",
    "expert_down_output",
    "find_expert_sites",
    "find_super_experts",
    "write_calibration",
]
