"""Paths inside a run directory: RUN/<table>/rank=R/part-NNNNN.parquet (SPEC section 3)."""

from __future__ import annotations

from pathlib import Path

PART_GLOB = "rank=*/part-*.parquet"
TMP_SUFFIX = ".tmp"


def table_dir(run_dir: Path, table: str, rank: int) -> Path:
    return Path(run_dir) / table / f"rank={rank}"


def part_path(run_dir: Path, table: str, rank: int, index: int) -> Path:
    return table_dir(run_dir, table, rank) / f"part-{index:05d}.parquet"


def list_parts(run_dir: Path, table: str) -> list[Path]:
    """Finished parts of `table`, all ranks, in a stable order. Temporary files never match."""
    return sorted((Path(run_dir) / table).glob(PART_GLOB))


def list_tables(run_dir: Path) -> list[str]:
    """Names of the tables that have at least one finished part."""
    root = Path(run_dir)
    return sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob(PART_GLOB)))


def next_part_index(run_dir: Path, table: str, rank: int) -> int:
    """The index after the highest part already on disk (used when appending to a run)."""
    existing = sorted(table_dir(run_dir, table, rank).glob("part-*.parquet"))
    if not existing:
        return 0
    return int(existing[-1].stem.split("-")[1]) + 1


def lock_path(run_dir: Path, rank: int) -> Path:
    """The writer lock of one rank (store/lock.py): RUN/.lock, or RUN/.lock.rank=R beside
    manifest.rank=R.json. Not a table directory and not a part, so readers never see it."""
    return Path(run_dir) / (".lock" if rank == 0 else f".lock.rank={rank}")
