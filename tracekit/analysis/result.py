"""The result every analysis returns: compact summary tables to print, full tables to write."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ..errors import TracekitError
from ..atomic import atomic_write_path

FORMATS = ("parquet", "csv")


@dataclass
class AnalysisResult:
    """``summaries``: small tables a person reads (name -> table); ``tables``: the full results;
    ``arrays``: dense arrays the report plots (not written); ``notes``: caveats (too few requests, ...)."""

    name: str
    summaries: dict[str, pa.Table] = field(default_factory=dict)
    tables: dict[str, pa.Table] = field(default_factory=dict)
    arrays: dict[str, object] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def write(self, out_dir: str | os.PathLike, fmt: str = "parquet") -> list[Path]:
        """Write every full table as ``<out_dir>/<name>_<table>.<fmt>`` (each file atomically)."""
        if fmt not in FORMATS:
            raise TracekitError(f"unknown format {fmt!r}; use parquet or csv")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for tname, table in self.tables.items():
            path = out_dir / f"{self.name}_{tname}.{fmt}"
            if fmt == "parquet":
                atomic_write_path(path, lambda tmp, t=table: pq.write_table(t, tmp, compression="zstd"))
            else:
                atomic_write_path(path, lambda tmp, t=table: pacsv.write_csv(_csv_safe(t), str(tmp)))
            written.append(path)
        return written


def _csv_safe(table: pa.Table) -> pa.Table:
    """CSV has no lists: write list columns as their JSON-like text."""
    cols = []
    for name in table.column_names:
        col = table[name]
        if pa.types.is_dictionary(col.type):
            col = col.cast(col.type.value_type)
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            col = pa.array([None if v is None else str(v) for v in col.to_pylist()], pa.string())
        cols.append(col)
    return pa.Table.from_arrays(cols, names=table.column_names)
