"""Facts about the model and the process that a run's manifest records, and SIGTERM.

`model_manifest` builds a recording's manifest through the store's one builder
(`store.rundir.base_manifest`) from the model's config and the routers found.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import torch
from torch import nn

from routescope.capture.discovery import RouterSite, stack_layers, text_config
from routescope.capture.verified import warn_if_unverified
from routescope.store.rundir import base_manifest


def model_manifest(model: nn.Module, sites: list[RouterSite], **extra: Any) -> dict[str, Any]:
    """SPEC 3.1 keys for `model` and its router `sites`, plus model facts and `extra`."""
    import transformers

    from routescope.version import __version__

    config = text_config(model)
    stacks = stack_layers(model)  # encoder-decoder: layers of both stacks, encoder first
    if stacks:
        extra["stacks"] = stacks
    # the outer model type (a multimodal wrapper's, not its text model's) is what was tested
    outer_type = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    verified, reason = warn_if_unverified(outer_type, transformers.__version__)
    extra.setdefault("verified", verified)
    if not verified:
        extra.setdefault("unverified_reason", reason)
    # a multimodal wrapper (kimi_k25, qwen3_vl_moe) is named by its own type; its text model's
    # type, whose layers are recorded, is `text_model_type`
    text_type = getattr(config, "model_type", None) or type(model).__name__
    if text_type != outer_type:
        extra.setdefault("text_model_type", text_type)
    return base_manifest(
        model_type=outer_type,
        num_hidden_layers=max(end for _, end in stacks.values())
        if stacks
        else int(getattr(config, "num_hidden_layers", 0) or 0),
        moe_layers=[site.layer for site in sites],
        num_experts={site.layer: site.num_experts for site in sites},
        top_k={site.layer: site.top_k for site in sites},
        model_name=getattr(config, "_name_or_path", "") or type(model).__name__,
        model_class=type(model).__name__,
        router_kind={str(site.layer): site.adapter.name for site in sites},
        router_modules={str(site.layer): site.name for site in sites},
        num_shared_experts=shared_experts(config),
        device=str(model_device(model)),
        dtype=str(model_dtype(model)),
        versions={
            "routescope": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        **extra,
    )


# the SIGTERMs `install_sigterm_exit`'s handler raised SystemExit for: raised inside a weakref
# callback or a `__del__`, the exception is dropped ("Exception ignored in"); the recorder's
# next step raises it again (`raise_pending_sigterm`)
PENDING_SIGTERM: list[int] = []


def raise_pending_sigterm() -> None:
    if PENDING_SIGTERM:
        raise SystemExit(128 + PENDING_SIGTERM[0])


def install_sigterm_exit() -> Any:
    """Turn SIGTERM into SystemExit (unwinding through `record`'s exit: flush, manifest) unless
    the program handles SIGTERM itself; returns the handler to restore, or None."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGTERM)
    if previous not in (signal.SIG_DFL, None):
        return None  # the program handles SIGTERM itself; leave it be

    def on_sigterm(signum: int, frame: Any) -> None:
        PENDING_SIGTERM.append(signum)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    return previous


def restore_sigterm(previous: Any) -> None:
    PENDING_SIGTERM.clear()
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None and torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(rank or 0), int(world_size or 1)


def model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    try:
        return next(model.parameters()).dtype
    except StopIteration:
        return torch.float32


def shared_experts(config: Any) -> int:
    for key in ("n_shared_experts", "num_shared_experts", "shared_expert_intermediate_size"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value if key != "shared_expert_intermediate_size" else 1
    return 0


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
