"""`routescope run --out RUN [--labels k=v] -- python script.py ...`: record a script without changing it.

The parent side (`run_command`) starts the script with `commands/attach_site/` first on its
PYTHONPATH and the recording described in ROUTESCOPE_ATTACH; that folder's sitecustomize.py
builds an `Attachment` in the child, which wraps `PreTrainedModel.from_pretrained` so every
transformers MoE model the script loads is recorded (`routescope.record`) until the script
exits. The exit code is the script's. torch is only imported by the child, with the model.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ENV = "ROUTESCOPE_ATTACH"
SITE_DIR = Path(__file__).resolve().parent / "attach_site"


# -- parent: the command -------------------------------------------------------------------
def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    from routescope.commands.profile import add_wait_argument  # not at top: the child imports this module

    parser.add_argument(
        "--out", required=True, metavar="RUN", help="run directory (a second model: RUN-2, ...)"
    )
    parser.add_argument(
        "--labels", action="append", default=[], metavar="K=V", help="label every recorded token (repeatable)"
    )
    parser.add_argument(
        "--router-stats", action="store_true", help="also record router_stats / router_tokens"
    )
    parser.add_argument("--no-weights", action="store_true", help="record expert choices only (smaller)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true", help="replace an existing run")
    mode.add_argument("--append", action="store_true", help="add to an existing run")
    add_wait_argument(parser)
    parser.add_argument(
        "command", nargs=argparse.REMAINDER, help="-- then the command to run, e.g. python script.py"
    )


def parse_labels(items: list[str]) -> dict[str, str]:
    """`k=v` strings (each may hold several, comma-separated) as a dict; ValueError names a bad one."""
    labels: dict[str, str] = {}
    for item in items:
        for pair in item.split(","):
            name, sep, value = pair.partition("=")
            if not sep or not name.strip():
                raise ValueError(f"--labels {pair!r}: use name=value, e.g. --labels domain=code")
            labels[name.strip()] = value.strip()
    return labels


def attach_config(args: argparse.Namespace) -> dict[str, Any]:
    from routescope.commands.profile import wait_option
    from routescope.schema import check_labels

    labels = parse_labels(args.labels)
    check_labels(labels)  # a reserved or malformed name fails here, not in the child
    mode = "overwrite" if args.overwrite else "append" if args.append else "create"
    options = {"mode": mode, "weights": not args.no_weights, "wait": wait_option(args.wait)}
    return {
        "out": str(Path(args.out).resolve()),
        "labels": labels,
        "router_stats": args.router_stats,
        "options": options,
    }


def child_environment(config: dict[str, Any], base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SITE_DIR), env.get("PYTHONPATH", "")) if p)
    env[ENV] = json.dumps(config)
    return env


def run_command(args: argparse.Namespace) -> int:
    """Run a command; record every transformers MoE model its Python loads (no code change)."""
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise ValueError(
            "no command to run: put it after --, e.g. routescope run --out RUN -- python script.py"
        )
    config = attach_config(args)
    if config["options"]["mode"] == "create" and (Path(config["out"]) / "manifest.json").exists():
        raise ValueError(f"{args.out} already holds a routescope run; pass --overwrite or --append")
    try:
        code = subprocess.call(command, env=child_environment(config))
    except FileNotFoundError:
        raise FileNotFoundError(f"command not found: {command[0]}") from None
    runs = [p for p in recorded_runs(config["out"]) if (p / "manifest.json").exists()]
    if runs:
        print(f"routescope run: recorded {', '.join(map(str, runs))}", file=sys.stderr)
    else:
        print(
            "routescope run: nothing recorded: the command loaded no transformers MoE model through "
            "from_pretrained (or its Python cannot import routescope)",
            file=sys.stderr,
        )
    return code


def recorded_runs(out: str | Path) -> list[Path]:
    """RUN and its siblings RUN-2, RUN-3, ... in order."""
    out = Path(out)
    ordinals = sorted(
        int(p.name[len(out.name) + 1 :])
        for p in out.parent.glob(f"{out.name}-*")
        if p.name[len(out.name) + 1 :].isdigit()
    )
    return [out, *(run_dir_for(out, n) for n in ordinals)]


def run_dir_for(out: str | Path, ordinal: int) -> Path:
    """RUN for the first model, RUN-2, RUN-3, ... for the next ones."""
    return Path(out) if ordinal == 1 else Path(f"{out}-{ordinal}")


# -- child: what sitecustomize.py sets up ------------------------------------------------------
class Attachment:
    """Records the MoE models `from_pretrained` returns; closes every recorder at exit."""

    def __init__(self, out: str, labels: dict[str, str], router_stats: bool, options: dict[str, Any]) -> None:
        self.out = out
        self.labels = labels
        self.router_stats = router_stats
        self.options = options
        self.recorders: list[Any] = []
        self.models = 0
        self.failed: BaseException | None = None
        self._depth = 0
        atexit.register(self.close)
        previous = sys.excepthook

        def excepthook(exc_type, exc, tb):  # the script died: its runs say complete: false
            self.failed = exc
            previous(exc_type, exc, tb)

        sys.excepthook = excepthook

    @classmethod
    def from_env(cls, text: str) -> Attachment:
        config = json.loads(text)
        return cls(
            config["out"],
            config.get("labels", {}),
            bool(config.get("router_stats")),
            config.get("options", {}),
        )

    def patch(self, modeling_utils: Any) -> None:
        """Wrap `PreTrainedModel.from_pretrained` in the freshly imported transformers.modeling_utils."""
        base = modeling_utils.PreTrainedModel
        original = base.__dict__["from_pretrained"].__func__
        attachment = self

        @functools.wraps(original)
        def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
            attachment._depth += 1  # composite models load parts through from_pretrained too
            try:
                model = original(cls, *args, **kwargs)
            finally:
                attachment._depth -= 1
            if attachment._depth == 0:
                attachment.record(model)
            return model

        base.from_pretrained = classmethod(from_pretrained)

    def record(self, model: Any) -> None:
        from routescope.capture.discovery import find_routers
        from routescope.errors import UnsupportedModelError

        try:
            find_routers(model)
        except UnsupportedModelError:
            return  # a dense model (a tokenizer's helper, a draft model): not ours to record
        import routescope as rs

        out = run_dir_for(self.out, len(self.recorders) + 1)
        recorder = rs.record(model, out, labels=self.labels, router_stats=self.router_stats, **self.options)
        try:
            recorder.__enter__()
        except Exception as exc:  # never break the user's script over the recording
            print(f"routescope run: not recording {type(model).__name__}: {exc}", file=sys.stderr)
            return
        self.recorders.append(recorder)
        print(f"routescope run: recording {type(model).__name__} into {out}", file=sys.stderr)

    def close(self) -> None:
        while self.recorders:
            recorder = self.recorders.pop()
            if self.failed is not None:
                recorder.__exit__(type(self.failed), self.failed, None)
            else:
                recorder.__exit__(None, None, None)
