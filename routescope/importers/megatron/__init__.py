"""Megatron-Core router traces (`--moe-routing-trace-path`): `import_megatron(DIR)` -> ImportedRun."""

from routescope.importers.megatron.importer import import_megatron

__all__ = ["import_megatron"]
