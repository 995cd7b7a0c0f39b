"""Run directory: the manifest and Parquet parts that capture writes and analysis reads."""

from routescope.store.layout import list_parts, part_path, table_dir
from routescope.store.manifest import MANIFEST_NAME, read_manifest, write_manifest
from routescope.store.writer import PartWriter

__all__ = [
    "MANIFEST_NAME",
    "PartWriter",
    "list_parts",
    "part_path",
    "read_manifest",
    "table_dir",
    "write_manifest",
]
