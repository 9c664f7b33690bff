"""Per-chunk summary tables: small aggregates written next to every ``routes`` chunk.

Layout (one summary file per chunk, with the chunk's own file name)::

    RUN/summaries/loads/part-r000-c000000.parquet     assignments per phase, layer and expert (summary_loads.sql)
    RUN/summaries/requests/part-r000-c000000.parquet  one row per request of the chunk (summary_requests.sql)

:func:`tracekit.store.write_chunk` writes them (atomically, *before* the chunk itself) for every routes chunk, so
the collector and every importer produce them. The ``loads`` and ``requests`` views read them when every chunk of
every routes run has both (a few kilobytes per chunk instead of every token-layer); otherwise the views derive
the same rows from the routes themselves (runs written before summaries existed). A summary whose chunk is
missing (a writer killed between the two renames) is ignored; the re-written chunk re-writes it.
"""
from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SUMMARY_DIR = "summaries"
TABLES = ("loads", "requests")
SOURCE_COLUMNS = ("run_id", "model", "dataset", "domain", "request_id", "prompt_id", "phase", "position", "step",
                  "layer", "experts")


def summary_path(run_dir: str | Path, table: str, chunk_name: str) -> Path:
    return Path(run_dir) / SUMMARY_DIR / table / chunk_name


def summarize_table(table: pa.Table) -> dict[str, pa.Table]:
    """The summaries of one routes chunk held in memory: {"loads": ..., "requests": ...}."""
    import duckdb

    from .query import sql_text

    con = duckdb.connect(":memory:", config={"threads": 1})
    try:
        # only the columns the summaries read (DuckDB has no float16 for the weights)
        con.register("_tracekit_chunk", table.select([c for c in SOURCE_COLUMNS if c in table.column_names]))
        return {name: con.sql(sql_text(f"summary_{name}").replace("{source}", "_tracekit_chunk")).to_arrow_table()
                for name in TABLES}
    finally:
        con.close()


def write_chunk_summaries(run_dir: str | Path, table: pa.Table, chunk_name: str) -> list[Path]:
    """Compute and write the summaries of the routes chunk ``table`` that will be stored as ``chunk_name``."""
    from .store import atomic_write_bytes

    out = []
    for name, summary in summarize_table(table).items():
        buf = io.BytesIO()
        pq.write_table(summary, buf, compression="zstd")
        path = summary_path(run_dir, name, chunk_name)
        atomic_write_bytes(path, buf.getvalue())
        out.append(path)
    return out


def summary_files(run_dir: str | Path, chunks: list[Path]) -> dict[str, list[Path]] | None:
    """{table: summary files} for the routes ``chunks`` of a run, or None when any chunk lacks a summary."""
    files: dict[str, list[Path]] = {name: [] for name in TABLES}
    for chunk in chunks:
        for name in TABLES:
            p = summary_path(run_dir, name, Path(chunk).name)
            if not p.is_file():
                return None
            files[name].append(p)
    return files


def backfill(run_dir: str | Path) -> int:
    """Write the missing summaries of an existing run from its chunk files; returns how many chunks were done."""
    from .store import list_chunks

    n = 0
    for c in list_chunks(Path(run_dir), "routes"):
        if all(summary_path(run_dir, name, c.path.name).is_file() for name in TABLES):
            continue
        write_chunk_summaries(run_dir, pq.read_table(c.path), c.path.name)
        n += 1
    return n
