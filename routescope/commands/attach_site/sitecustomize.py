"""Zero-code recording for `routescope run --out RUN -- python script.py` (routescope/commands/attach.py).

Python imports `sitecustomize` at start-up from the first sys.path entry that has one; `routescope
run` puts this folder first on the child's PYTHONPATH and describes the recording in the
ROUTESCOPE_ATTACH environment variable (JSON: out, labels, options). Without that variable this
file does nothing but hand over to the next sitecustomize on the path. With it, an import hook
waits for `transformers.modeling_utils`, then wraps `PreTrainedModel.from_pretrained` so that
every MoE model it returns is recorded with `routescope.record` (the first into RUN, later ones
into RUN-2, RUN-3, ...); models without a router are left alone. The recorders close at exit,
`complete: false` when the script ended with an uncaught exception.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

ENV = "ROUTESCOPE_ATTACH"
TARGET = "transformers.modeling_utils"
HERE = os.path.dirname(os.path.abspath(__file__))


def _chain_next_sitecustomize() -> None:
    """Run the sitecustomize this one shadows (e.g. a distribution's), so nothing is lost."""
    for entry in sys.path:
        folder = os.path.abspath(entry or os.curdir)
        path = os.path.join(folder, "sitecustomize.py")
        if folder == HERE or not os.path.isfile(path):
            continue
        spec = importlib.util.spec_from_file_location("_routescope_shadowed_sitecustomize", path)
        if spec and spec.loader:
            module = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(module)
            except Exception as exc:  # as Python's own site.py: report and carry on
                print(f"routescope run: error in {path}: {exc!r}", file=sys.stderr)
        return


class _AfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds TARGET through the other finders, then patches it right after it executes."""

    def __init__(self, on_loaded):
        self.on_loaded = on_loaded
        self.spec = None

    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET or self.spec is not None:
            return None
        sys.meta_path.remove(self)  # let the ordinary finders locate the real module
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        self.spec = spec
        self.real_loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self.real_loader.create_module(spec)

    def exec_module(self, module):
        self.real_loader.exec_module(module)
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        self.on_loaded(module)


def _install(config_text: str) -> None:
    from routescope.commands.attach import Attachment  # routescope, not torch, loads here

    attachment = Attachment.from_env(config_text)
    sys.meta_path.insert(0, _AfterImport(attachment.patch))


_config = os.environ.pop(ENV, None)  # popped: processes the script starts are not recorded
if _config:
    try:
        _install(_config)
    except Exception as exc:
        print(f"routescope run: recording disabled: {exc!r}", file=sys.stderr)
_chain_next_sitecustomize()
