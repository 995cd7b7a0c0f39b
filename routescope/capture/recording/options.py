"""The recorder's options: one frozen, validated dataclass (`rs.record(model, out, **options)`).

`RecordOptions.from_kwargs` checks every option once, before anything is opened: an unknown
name or a value out of range is a `ValueError` naming the option and what is allowed.
`manifest()` is what the run's manifest shows under `"options"` (JSON values only: callables
appear by name, and `storage_options` by its keys, never its values, which may be secrets).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from routescope.store.rundir import MODES


def _name(obj: Any) -> str:
    return getattr(obj, "__qualname__", None) or type(obj).__qualname__


@dataclass(frozen=True)
class RecordOptions:
    """Every keyword option of `rs.record` besides `labels` and `router_stats` (see its docstring)."""

    mode: str = "create"
    weights: bool = True
    rows_per_part: int = 4_000_000
    flush_seconds: float = 10.0
    max_pending: int = 8
    max_pending_bytes: int = 256 << 20
    rank: int | None = None
    world_size: int | None = None
    handle_sigterm: bool = True
    observers: tuple[Callable[..., Any], ...] = ()
    sample: float | None = None
    seed: int = 0
    layers: tuple[int, ...] | None = None
    wait: bool | float = False
    train_step: Callable[[], int | None] | None = None
    storage_options: dict[str, Any] | None = None
    rollups: bool = True  # the writer's rollup_* parts (False: build them later with `routescope index`)

    @classmethod
    def from_kwargs(cls, **options: Any) -> RecordOptions:
        """The options given to `rs.record`, checked; unknown names are refused."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"unknown recording option {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(known))}"
            )
        return cls(**options)

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not allowed; use one of {', '.join(MODES)}")
        for name in ("weights", "handle_sigterm", "rollups"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is not allowed: give True or False")
        for name, low in (("rows_per_part", 1), ("max_pending", 1), ("max_pending_bytes", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r} is not allowed: give a whole number >= {low}")
        if isinstance(self.flush_seconds, bool) or not isinstance(self.flush_seconds, (int, float)):
            raise ValueError(f"flush_seconds={self.flush_seconds!r} is not allowed: give seconds > 0")
        if not self.flush_seconds > 0:
            raise ValueError(f"flush_seconds={self.flush_seconds!r} is not allowed: give seconds > 0")
        set_("flush_seconds", float(self.flush_seconds))
        for name in ("rank", "world_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name}={value!r} is not allowed: give a whole number >= 0, or None")
        if self.world_size == 0:
            raise ValueError("world_size=0 is not allowed: give a whole number >= 1, or None")
        if self.sample is not None:
            if isinstance(self.sample, bool) or not isinstance(self.sample, (int, float)):
                raise ValueError(
                    f"sample={self.sample!r} is not allowed: give a fraction of sequences in (0, 1]"
                )
            if not 0.0 < float(self.sample) <= 1.0:
                raise ValueError(
                    f"sample={self.sample!r} is not allowed: give a fraction of sequences in (0, 1]"
                )
            set_("sample", None if float(self.sample) == 1.0 else float(self.sample))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r} is not allowed: give a whole number")
        if self.layers is not None:
            try:
                layers = tuple(sorted({int(x) for x in self.layers}))
            except (TypeError, ValueError):
                raise ValueError(f"layers={self.layers!r} is not allowed: give MoE layer numbers") from None
            if not layers:
                raise ValueError(
                    "layers=[] is not allowed: give at least one MoE layer number, or None for all"
                )
            set_("layers", layers)
        if not isinstance(self.wait, (bool, int, float)) or (
            not isinstance(self.wait, bool) and self.wait < 0
        ):
            raise ValueError(f"wait={self.wait!r} is not allowed: give True, False or seconds >= 0")
        observers = (self.observers,) if callable(self.observers) else self.observers
        try:
            observers = tuple(observers)
        except TypeError:
            raise ValueError(f"observers={self.observers!r} is not allowed: give callables") from None
        if not all(callable(o) for o in observers):
            raise ValueError(f"observers={self.observers!r} is not allowed: every observer must be callable")
        set_("observers", observers)
        if self.train_step is not None and not callable(self.train_step):
            raise ValueError(f"train_step={self.train_step!r} is not allowed: give a callable or None")
        if self.storage_options is not None and not isinstance(self.storage_options, dict):
            raise ValueError(f"storage_options={self.storage_options!r} is not allowed: give a dict or None")

    def replace(self, **changes: Any) -> RecordOptions:
        """These options with some changed, checked like `from_kwargs`."""
        return RecordOptions.from_kwargs(
            **{**{f.name: getattr(self, f.name) for f in fields(self)}, **changes}
        )

    def manifest(self) -> dict[str, Any]:
        """The options as the manifest shows them (JSON; no secret values)."""
        shown: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "observers":
                value = [_name(o) for o in value]
            elif f.name == "train_step":
                value = None if value is None else _name(value)
            elif f.name == "storage_options":
                value = None if value is None else sorted(value)  # the keys only
            elif f.name == "layers":
                value = None if value is None else list(value)
            shown[f.name] = value
        return shown
