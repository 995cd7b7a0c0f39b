"""The routescope version, in a base module: the manifest writers (capture, importers) read it
without importing the `routescope` package back (tests/test_architecture.py counts that as a cycle)."""

__version__ = "0.1.0"
