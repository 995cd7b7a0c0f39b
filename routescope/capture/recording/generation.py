"""`generate` while recording: end-of-text ids for finished rows, refused paths.

`record` puts a thin wrapper on the model instance's `generate` (removed on exit, like the
hooks). The wrapper refuses beam search before the first forward, tells the sequence
tracker the call's end-of-text ids, and releases held steps when the call returns. A
`compile_config` call runs compiled, recorded by the graph itself (`capture.compiled`),
except for encoder-decoder models, whose compiled decode runs eagerly while recording.
`generate_batch` (continuous batching) is refused. `model.compile()` inside the block, and a
`compile_config` call, first swap the recording's step wraps for hooks and mark its routers
for dynamo's guards (`before_compile`, capture/recording/compiled.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from routescope.capture.recording.identity import SequenceTracker
from routescope.errors import RouteScopeError


class GeneratePatch:
    """The wrappers `record` puts on a model's generation entry points."""

    def __init__(
        self,
        model: nn.Module,
        tracker: SequenceTracker,
        after: Callable[[int], None],
        before_compile: Callable[[], None] = lambda: None,
    ) -> None:
        self.model = model
        self.tracker = tracker
        self.after = after  # called with the step count before the call, when it returns
        self.before_compile = before_compile  # called before the model is compiled in the block
        self.steps: Callable[[], int] = lambda: 0
        self._patched: dict[str, Any] = {}
        self.compile_ok = False  # False: a compile_config call runs eagerly (capture.compiled)

    def install(self, steps: Callable[[], int] | None = None) -> None:
        if steps is not None:
            self.steps = steps
        for name in ("generate", "generate_batch", "init_continuous_batching", "compile"):
            original = getattr(self.model, name, None)
            if original is None or name in vars(self.model):
                continue
            if name == "compile":
                wrapper = self._wrap_compile(original)
            else:
                wrapper = self._wrap_generate(original) if name == "generate" else _refuse(name)
            setattr(self.model, name, wrapper)
            self._patched[name] = wrapper

    def remove(self) -> None:
        for name, wrapper in self._patched.items():
            if vars(self.model).get(name) is wrapper:
                delattr(self.model, name)
        self._patched.clear()

    def _wrap_generate(self, original: Any) -> Any:
        patch = self

        def generate(*args: Any, **kwargs: Any) -> Any:
            config = kwargs.get("generation_config") or getattr(patch.model, "generation_config", None)
            check_generate_kwargs(kwargs, config)
            compiles = kwargs.get("compile_config") is not None or getattr(config, "compile_config", None)
            if compiles and not patch.compile_ok:
                kwargs["disable_compile"] = True  # the steps could not be bracketed outside the graph
            elif compiles:
                patch.before_compile()
            eos = kwargs.get("eos_token_id", getattr(config, "eos_token_id", None))
            previous = patch.tracker.eos_ids, patch.tracker.generating
            patch.tracker.eos_ids, patch.tracker.generating = _eos_tensor(eos), True
            steps_before = patch.steps()
            try:
                return original(*args, **kwargs)
            finally:
                patch.tracker.eos_ids, patch.tracker.generating = previous
                patch.after(steps_before)

        generate.__wrapped__ = original  # type: ignore[attr-defined]
        generate.__doc__ = original.__doc__
        return generate

    def _wrap_compile(self, original: Any) -> Any:
        patch = self

        def compile(*args: Any, **kwargs: Any) -> Any:  # `model.compile()` inside the block
            patch.before_compile()
            return original(*args, **kwargs)

        compile.__wrapped__ = original  # type: ignore[attr-defined]
        compile.__doc__ = original.__doc__
        return compile


def check_generate_kwargs(kwargs: dict[str, Any], config: Any) -> None:
    """generate() modes whose tokens cannot be tied to one returned sequence: refused up front."""
    beams = kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1
    if int(beams) > 1:
        raise RouteScopeError(
            f"beam search (num_beams={beams}) reorders cache rows between steps, so a recorded "
            "sequence would not be the returned one; routescope refuses it: record greedy or "
            "sampled generate, or re-run the returned sequences through the model in a plain forward"
        )


def _refuse(name: str) -> Any:
    def refused(*args: Any, **kwargs: Any) -> Any:
        raise RouteScopeError(
            f"model.{name} (continuous batching) packs several requests into one sequence; routescope "
            "cannot tell them apart yet: use model.generate with a padded batch while recording"
        )

    return refused


def _eos_tensor(eos: Any) -> torch.Tensor | None:
    if eos is None:
        return None
    if isinstance(eos, torch.Tensor):
        return eos.reshape(-1).long()
    values = [eos] if isinstance(eos, int) else [int(e) for e in eos]
    return torch.tensor(values, dtype=torch.long) if values else None
