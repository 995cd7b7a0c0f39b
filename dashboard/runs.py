"""The runs a dashboard may open: the paths named on the command line, nothing else.

`RunRegistry` maps run keys ("0", "1", ...) to those paths, opens each lazily through the
public API (`routescope.open_run`; a URI such as `s3://bucket/run` opens the run on object
storage with the environment's credentials, `AWS_*` for S3, as `routescope report` does), serialises access to its DuckDB connection with a lock,
and caches query results per (run, version, query, arguments). Page callbacks call
`registry.query(key, name, *args)`; an unknown key raises `RunUnavailable`.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import routescope as rs


class RunUnavailable(Exception):
    """A run key that is not one of the served runs, or a run that cannot be opened."""


def run_location(path: str | Path) -> str | Path:
    """A URI (s3://, gs://, file://, ...) stays text, as `rs.open_run` takes it (a Path would fold
    its "//"); anything else is a local directory."""
    text = str(path)
    return text if "://" in text else Path(text)


@dataclass
class RunSlot:
    """One served run: its path or URI, the opened Run (or why it could not be opened), a lock."""

    path: str | Path
    run: rs.Run | None = None
    error: str | None = None
    lock: threading.RLock = None  # type: ignore[assignment]
    rollups: str | None = None  # "building", "ready" or "failed: ..." once a build was started

    def __post_init__(self) -> None:
        self.lock = threading.RLock()

    @property
    def name(self) -> str:
        """The directory's (or the URI's last key part's) name."""
        if isinstance(self.path, Path):
            return self.path.name or str(self.path)
        return PurePosixPath(self.path.split("://", 1)[1]).name or self.path


def describe_open_error(path: str | Path, exc: BaseException) -> str:
    """One line naming what is wrong with a run path, for a page message or the CLI."""
    if isinstance(exc, FileNotFoundError):
        return f"{path}: no such directory" if isinstance(path, Path) else str(exc)
    if isinstance(exc, rs.RunFormatError):
        return str(exc)
    return f"{path}: cannot be opened ({type(exc).__name__}: {exc})"


def check_run_path(path: str | Path, skip_corrupt: bool = False) -> str | None:
    """None when `path` opens as a run, else one line saying why not (used by the CLI)."""
    path = run_location(path)
    if isinstance(path, Path) and not path.exists():
        return f"{path}: no such directory"
    if isinstance(path, Path) and not path.is_dir():
        return f"{path}: not a directory"
    try:
        rs.open_run(path, skip_corrupt=skip_corrupt).close()
    except Exception as exc:
        return describe_open_error(path, exc)
    return None


class RunRegistry:
    """The served runs, keyed by their index on the command line as a string."""

    def __init__(
        self,
        paths: Sequence[str | Path],
        cache_size: int = 512,
        skip_corrupt: bool = False,
        build_rollups: bool = False,
    ) -> None:
        self.skip_corrupt = skip_corrupt  # open every run with open_run(..., skip_corrupt=True)
        self.build_rollups = build_rollups  # build missing rollups of finished runs on first open
        self.slots: dict[str, RunSlot] = {str(i): RunSlot(run_location(p)) for i, p in enumerate(paths)}
        self._cached = functools.lru_cache(maxsize=cache_size)(self._compute)
        self._queries: dict[str, Callable[..., Any]] = {}
        self._apart: set[str] = set()  # queries run on connections of their own (register_query)

    # -- what may be opened ------------------------------------------------------------
    @property
    def keys(self) -> list[str]:
        return list(self.slots)

    def name(self, key: str) -> str:
        return f"{key}: {self._slot(key).name}"

    def options(self) -> list[dict[str, str]]:
        """Dropdown options: one per served run, labelled by index and directory name."""
        return [{"label": self.name(key), "value": key} for key in self.slots]

    def _slot(self, key: Any) -> RunSlot:
        slot = self.slots.get(key) if isinstance(key, str) else None
        if slot is None:
            raise RunUnavailable(f"unknown run {key!r}: pick one of the runs in the list")
        return slot

    # -- opening -----------------------------------------------------------------------
    def run(self, key: str) -> rs.Run:
        """The opened Run for `key`; RunUnavailable with a clear message when it cannot open."""
        slot = self._slot(key)
        if slot.run is not None:  # no lock: a cached answer need not wait for a running query
            return slot.run
        with slot.lock:
            if slot.run is None:
                try:
                    slot.run = rs.open_run(slot.path, skip_corrupt=self.skip_corrupt)
                    slot.error = None
                except Exception as exc:
                    slot.error = describe_open_error(slot.path, exc)
                else:
                    self._start_rollups(slot)
            if slot.run is None:
                raise RunUnavailable(slot.error)
            return slot.run

    def _start_rollups(self, slot: RunSlot) -> None:
        """On the first open of a finished run whose rollups (SPEC 3.3) are missing, build them
        on a thread with a connection of its own (a run on object storage too, with the same
        credentials it was opened with, as `routescope index s3://...`); the pages read routing
        meanwhile, and the run's views are refreshed (and caches dropped, through `version`) when
        they are in."""
        run = slot.run
        if not self.build_rollups or slot.rollups is not None:
            return
        if (
            not run.complete
            or run.skipped
            or run.manifest.get("counts_only")
            or len(run.rollups) == len(rs.Run.ROLLUP_TABLES)
        ):
            return
        slot.rollups = "building"

        def build() -> None:
            try:
                with rs.open_run(slot.path) as own:
                    own.build_rollups()
                with slot.lock:
                    slot.run.refresh()
                slot.rollups = "ready"
            except Exception as exc:  # the pages keep reading routing
                slot.rollups = f"failed: {exc}"

        threading.Thread(target=build, name="routescope-rollups", daemon=True).start()

    def rollup_state(self, key: str) -> str | None:
        """None (nothing built here), "building", "ready" or "failed: ..."."""
        return self._slot(key).rollups

    def version(self, key: str) -> tuple:
        """What identifies the data of a run now: changes when a live run grows (or its
        rollups come in)."""
        run = self.run(key)
        m = run.manifest
        slot = self._slot(key)
        return (m.get("tokens"), m.get("updated_at"), m.get("complete"), len(run.tables), slot.rollups)

    def refresh(self, key: str) -> tuple:
        """Re-read a run that is still being written; returns its new version."""
        slot = self._slot(key)
        run = self.run(key)
        if not run.complete:
            with slot.lock:
                try:
                    run.refresh()
                except Exception as exc:
                    raise RunUnavailable(describe_open_error(slot.path, exc)) from exc
        return self.version(key)

    # -- cached queries ----------------------------------------------------------------
    def register_query(self, name: str, func: Callable[..., Any], apart: bool = False) -> None:
        """Make `func(run, *args)` (or `func(run_a, run_b, *args)`) callable by name, cached.
        `apart`: a long query, run on the runs opened afresh (connections of its own) without
        the runs' locks, so the pages' other queries on those runs do not wait for it."""
        self._queries[name] = func
        if apart:
            self._apart.add(name)

    def query(self, key: str, name: str, *args: Any) -> Any:
        """`func(run, *args)` for the named query, cached per (run, version, name, args).

        Arguments must be hashable (filters are frozen dataclasses). Results are shared
        between callers, so callers must not modify them in place.
        """
        if name not in self._queries:
            raise KeyError(f"unknown dashboard query {name!r}")
        version = self.version(key)
        return self._cached(key, version, name, args)

    def _compute(self, key: str | tuple[str, str], version: tuple, name: str, args: tuple) -> Any:
        keys = key if isinstance(key, tuple) else (key,)
        runs = [self.run(k) for k in keys]
        if name in self._apart:
            with contextlib.ExitStack() as stack:
                own = [
                    stack.enter_context(rs.open_run(self._slot(k).path, skip_corrupt=self.skip_corrupt))
                    for k in keys
                ]
                return self._queries[name](*own, *args)
        with contextlib.ExitStack() as stack:  # one DuckDB connection per run: one query at a time
            for k in sorted(set(keys)):
                stack.enter_context(self._slot(k).lock)
            return self._queries[name](*runs, *args)

    def query_pair(self, key_a: str, key_b: str, name: str, *args: Any) -> Any:
        """`func(run_a, run_b, *args)` over two runs, cached per both versions.

        Both runs' locks are taken in key order, so two callbacks comparing (A, B) and (B, A)
        at once cannot deadlock.
        """
        if name not in self._queries:
            raise KeyError(f"unknown dashboard query {name!r}")
        versions = (self.version(key_a), self.version(key_b))
        return self._cached((key_a, key_b), versions, name, args)

    def clear_cache(self) -> None:
        self._cached.cache_clear()

    def close(self) -> None:
        for slot in self.slots.values():
            with slot.lock:
                if slot.run is not None:
                    slot.run.close()
                    slot.run = None
        self.clear_cache()


_CURRENT: RunRegistry | None = None


def set_registry(registry: RunRegistry) -> None:
    """Install the registry the page callbacks use (create_app calls this)."""
    global _CURRENT
    _CURRENT = registry


def get_registry() -> RunRegistry:
    if _CURRENT is None:
        raise RunUnavailable("no runs are being served: start the dashboard with create_app(run_paths)")
    return _CURRENT
