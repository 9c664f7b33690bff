"""Per-chunk summary tables: small aggregates written next to every ``routes`` chunk.

Layout (one summary file per chunk, with the chunk's own file name)::

    RUN/summaries/loads/part-r000-c000000.parquet     assignments per phase, layer and expert (summary_loads.sql)
    RUN/summaries/requests/part-r000-c000000.parquet  one row per request of the chunk (summary_requests.sql)
    RUN/summaries/loads.parquet                       the chunks' load summaries summed (written when the run is
                                                      finalised): one row per key for the whole run

The per-chunk load summaries repeat every (phase, layer, expert) key once per chunk (2.9M rows for a 24-chunk
DeepSeek-width run), which made the load query take seconds; the run-level file holds each key once (119K rows).
It names the chunks it sums, with their sizes, and is used only while those are exactly the chunks read.

:func:`tracekit.store.write_chunk` writes them (atomically, *before* the chunk itself) for every routes chunk, so
the collector and every importer produce them. The ``loads`` and ``requests`` views read them when every chunk of
every routes run has both (a few kilobytes per chunk instead of every token-layer); otherwise the views derive
the same rows from the routes themselves (runs written before summaries existed). A summary whose chunk is
missing (a writer killed between the two renames) is ignored; the re-written chunk re-writes it.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SUMMARY_DIR = "summaries"
TABLES = ("loads", "requests")
REQUEST_COLUMNS = ("run_id", "model", "dataset", "domain", "request_id", "prompt_id", "phase", "position", "step")


def summary_path(run_dir: str | Path, table: str, chunk_name: str) -> Path:
    return Path(run_dir) / SUMMARY_DIR / table / chunk_name


def summarize_table(table: pa.Table) -> dict[str, pa.Table]:
    """The summaries of one routes chunk held in memory: {"loads": ..., "requests": ...}."""
    import duckdb

    from .query import _no_progress_bar, sql_text

    con = duckdb.connect(":memory:", config={"threads": 1})
    try:
        _no_progress_bar(con)
        # only the columns the summary reads (DuckDB has no float16 for the weights)
        con.register("_tracekit_chunk", table.select([c for c in REQUEST_COLUMNS if c in table.column_names]))
        requests = con.sql(sql_text("summary_requests").replace("{source}", "_tracekit_chunk")).to_arrow_table()
    finally:
        con.close()
    return {"loads": load_summary(table), "requests": requests}


def _codes(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, pa.Array]:
    """(N,) integer codes and the distinct values of a string column (dictionary-encoded or not)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if not pa.types.is_dictionary(col.type):
        col = pc.dictionary_encode(col)
    return col.indices.to_numpy(zero_copy_only=False).astype(np.int64), col.dictionary.cast(pa.string())


def _dense_unique(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.unique(x, return_inverse=True) for small non-negative integers, by counting instead of sorting."""
    if x.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    present = np.flatnonzero(np.bincount(x))
    lut = np.zeros(int(present[-1]) + 1, dtype=np.int64)
    lut[present] = np.arange(len(present))
    return present, lut[x]


def load_summary(table: pa.Table) -> pa.Table:
    """The rows of summary_loads.sql computed with numpy (one bincount; DuckDB's unnest and group-by took 20 s per
    million rows here): (token, expert) assignments per run, model, dataset, domain, phase, layer and expert."""
    n = table.num_rows
    keys = [_codes(table[c]) for c in ("run_id", "model", "dataset", "domain", "phase")]
    flat = np.zeros(n, dtype=np.int64)
    for codes, values in keys:  # one integer per (run, model, dataset, domain, phase) combination
        flat = flat * max(len(values), 1) + codes
    uniq, inverse = _dense_unique(flat)
    combo = np.zeros((len(uniq), len(keys)), dtype=np.int64)
    rest_key = uniq.copy()
    for i in range(len(keys) - 1, -1, -1):
        rest_key, combo[:, i] = np.divmod(rest_key, max(len(keys[i][1]), 1))
    layers, li = _dense_unique(table["layer"].to_numpy().astype(np.int64))
    experts = table["experts"].combine_chunks() if n else pa.array([], pa.list_(pa.int32()))
    lens = np.diff(experts.offsets.to_numpy()) if n else np.zeros(0, dtype=np.int64)
    vals = experts.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    E = int(vals.max()) + 1 if vals.size else 1
    row_cell = (inverse.reshape(-1).astype(np.int64) * len(layers) + li) * E
    k = int(lens[0]) if n else 0
    if n and (lens == k).all():  # fixed top-k: a broadcast instead of a repeat
        cells = (row_cell[:, None] + vals.reshape(n, k)).reshape(-1)
    else:
        cells = np.repeat(row_cell, lens) + vals
    counts = np.bincount(cells, minlength=len(combo) * len(layers) * E)
    cell = np.flatnonzero(counts)
    g, rest = np.divmod(cell, len(layers) * E)
    l, e = np.divmod(rest, E)
    cols = {name: keys[i][1].take(pa.array(combo[g, i])) for i, name in enumerate(("run_id", "model", "dataset",
                                                                                  "domain", "phase"))}
    window = np.where(pc.equal(cols["phase"], "prefill").to_numpy(zero_copy_only=False), 0, -1) if len(cell) else \
        np.zeros(0, dtype=np.int32)
    return pa.table({**cols, "window": pa.array(window, pa.int32()), "layer": pa.array(layers[l], pa.int16()),
                     "expert": pa.array(e, pa.int32()), "count": pa.array(counts[cell], pa.int64())})


RUN_LOADS = "loads.parquet"
META_CHUNKS = b"tracekit.summary_of"
LOAD_KEYS = ("run_id", "model", "dataset", "domain", "phase", "window", "layer", "expert")


def chunk_identity(chunks: list[Path]) -> dict[str, int]:
    """{chunk file name: size in bytes}: what a run-level summary was computed from."""
    return {Path(c).name: Path(c).stat().st_size for c in chunks}


def compact_loads(run_dir: str | Path, chunks: list[Path]) -> Path | None:
    """Sum the load summaries of ``chunks`` (a run's routes chunk files) into RUN/summaries/loads.parquet; None
    (nothing written) when a chunk lacks its summary."""
    from .store import atomic_write_bytes

    files = summary_files(run_dir, chunks)
    if files is None or not chunks:
        return None
    table = pa.concat_tables([pq.read_table(f) for f in files["loads"]], promote_options="permissive")
    summed = table.group_by(list(LOAD_KEYS)).aggregate([("count", "sum")]).rename_columns(
        [*LOAD_KEYS, "count"]).sort_by([(k, "ascending") for k in LOAD_KEYS])
    summed = summed.select([*LOAD_KEYS[:5], "window", "layer", "expert", "count"])
    import json

    summed = summed.replace_schema_metadata({META_CHUNKS: json.dumps(chunk_identity(chunks), sort_keys=True).encode()})
    buf = io.BytesIO()
    pq.write_table(summed, buf, compression="zstd")
    path = Path(run_dir) / SUMMARY_DIR / RUN_LOADS
    atomic_write_bytes(path, buf.getvalue())
    return path


def run_loads_file(run_dir: str | Path, chunks: list[Path]) -> Path | None:
    """RUN/summaries/loads.parquet when it sums exactly ``chunks`` as they are now, else None."""
    import json

    path = Path(run_dir) / SUMMARY_DIR / RUN_LOADS
    if not path.is_file():
        return None
    try:
        meta = pq.read_schema(path).metadata or {}
        return path if json.loads(meta.get(META_CHUNKS, b"null")) == chunk_identity(chunks) else None
    except (OSError, ValueError, pa.ArrowException):
        return None  # unreadable: the per-chunk summaries answer instead


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
    chunks = [c.path for c in list_chunks(Path(run_dir), "routes")]
    if run_loads_file(run_dir, chunks) is None:
        compact_loads(run_dir, chunks)
    return n
