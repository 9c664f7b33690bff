"""SQL over run directories: DuckDB views that read the Parquet chunks in place.

``connect(runs)`` opens one or many run directories (paths, globs, or folders holding run directories) and
returns a DuckDB connection with these views:

=========  ===================================================================================================
view       one row per
=========  ===================================================================================================
routes     (request, token, MoE layer), as stored (see :mod:`tracekit.schema`)
choices    (token, layer, rank): ``expert``, ``weight``, ``rank`` (0 = the router's first choice)
requests   request: run_id, request_id, prompt_id, model, dataset, domain, prompt_tokens, generated_tokens, rows
runs       run directory: its manifest, geometry fields as columns
loads      (run, phase, step_window, layer, expert): assignment counts; stored for runs of kind ``loads``; for
           runs of kind ``routes`` read from the per-chunk summaries (:mod:`tracekit.summaries`; derived from
           the rows for runs without them), step_window 0 = prefill, -1 = every decode step together; the view
           ``loads_by_step`` has the same per decode step (step_window s = step s), derived from the rows.
           Both keep ``"window"`` (quoted: a SQL keyword) as a compatibility alias of ``step_window``
=========  ===================================================================================================

Nothing is copied or loaded: every query streams the Parquet files, so traces larger than memory work.

Read-only, always: DuckDB never opens a file itself. The run's Parquet chunks are handed to it as Arrow datasets
(opened by pyarrow, read-only), and then all of DuckDB's file-system access is switched off
(``enable_external_access = false``, configuration locked). No SQL text -- ``COPY``, ``EXPLAIN ANALYZE COPY``,
``ATTACH``, ``EXPORT DATABASE``, ``INSTALL``, table functions such as ``read_csv`` or ``query(...)``, several
statements in one string -- can create, change or delete a file, through the CLI or through a connection from
:func:`connect` used directly in a notebook. Spilling goes to a private temporary folder (not the run, not the
working directory) that is removed when the connection is closed or collected. On top of that :func:`run_sql` -- the
entry point of ``tracekit query``, ``tracekit sql`` and the analyses -- accepts only ``SELECT``/``EXPLAIN``
statements, decided on DuckDB's parsed statement tree: every query node of a SELECT (its CTEs, subqueries and set
operations included) must be a SELECT, and an ``EXPLAIN [ANALYZE]`` is judged by the statement it explains, so
``WITH x AS (DELETE ... RETURNING 1) SELECT ...`` or ``EXPLAIN ANALYZE CREATE VIEW ...`` are refused with one line.
As a second wall (PostgreSQL's read-only transaction), every user statement runs inside a transaction that is rolled
back after its result is fetched: nothing it did to the catalog outlives it.

Bounds (PostgreSQL's ``work_mem`` / ``temp_file_limit`` / ``statement_timeout``): :func:`stream_result` stops a query
after a time limit (``--timeout``), ``connect(memory_limit=...)`` bounds DuckDB's memory (``--memory-limit``) and
``max_temp_size`` what it may spill (``max_temp_directory_size``, ``--max-spill``); results are fetched in batches
(:func:`stream_result`) and an in-memory result is refused past ``max_result_bytes``. Each connection spills into its
own folder, held by an advisory lock; a folder whose owner was killed is removed by the next :func:`connect`.

Two internal readers use DuckDB's own ``read_parquet`` on a private connection that runs fixed statements only
(never user text): the analyses' slice reader (:mod:`tracekit.analysis.scan`, ~2.5x faster at decoding the expert
lists than an Arrow dataset scan) and the placement loader (:mod:`tracekit.placement.data.traces`).
"""
from __future__ import annotations

import fcntl
import glob
import os
import time
import shutil
import tempfile
import threading
import weakref
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from .errors import TracekitError
from .sql_guard import check_read_only, first_line
from .store import MANIFEST, Run, open_run

VIEWS = ("routes", "choices", "requests", "runs", "loads")
DEFAULT_MEMORY_LIMIT = "4GB"
DEFAULT_MAX_TEMP = "8GB"
DEFAULT_TIMEOUT_S = 600.0
DEFAULT_MAX_RESULT_BYTES = 1 << 30  # an Arrow result held in memory (fetch_limited, query)
BATCH_ROWS = 8192  # rows per fetched Arrow batch
SPILL_PREFIX = "tracekit-duckdb-"


def sql_text(name: str) -> str:
    """The text of ``tracekit/sql/<name>.sql`` (package data)."""
    try:
        return resources.files("tracekit.sql").joinpath(f"{name}.sql").read_text()
    except FileNotFoundError:
        raise TracekitError(f"no SQL file named {name!r} in tracekit/sql") from None


def _is_run_dir(p: Path) -> bool:
    return (p / MANIFEST).is_file()


def resolve_runs(runs: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Run]:
    """Open every run named by ``runs``: run directories, glob patterns, or folders whose sub-folders are runs.

    Returns the runs in a stable order (sorted by path), each once; raises TracekitError (one line) when a
    name matches nothing or a run is unreadable or of a newer schema.
    """
    if isinstance(runs, (str, os.PathLike)):
        runs = [runs]
    paths: list[Path] = []
    for item in runs:
        s = str(item)
        matches = [Path(m) for m in sorted(glob.glob(s))] if glob.has_magic(s) else [Path(s)]
        found = []
        for m in matches:
            if _is_run_dir(m):
                found.append(m)
            elif m.is_dir():  # a folder of runs (one or two levels down)
                found += sorted(p.parent for p in m.glob(f"*/{MANIFEST}"))
                found += sorted(p.parent for p in m.glob(f"*/*/{MANIFEST}"))
        if not found:
            if not glob.has_magic(s) and not Path(s).exists():
                raise TracekitError(f"{s}: no such run directory")
            raise TracekitError(f"{s}: no tracekit run directory found (expected {MANIFEST}; collect or import one)")
        paths += found
    unique = sorted({p.resolve() for p in paths})
    return [open_run(p) for p in unique]


def _runs_table(runs: Sequence[Run]) -> pa.Table:
    rows = []
    for r in runs:
        m, g = r.manifest, r.geometry or {}
        model = m.get("model") or {}
        ds = m.get("dataset") or {}
        tot = (m.get("totals") or {}).get(r.kind, {})
        rows.append(
            {
                "run_id": m.get("run_id"),
                "path": str(r.path),
                "kind": r.kind,
                "source": m.get("source"),
                "status": m.get("status"),
                "model": (model.get("name") or model.get("id")) if isinstance(model, dict) else str(model),
                "model_id": model.get("id") if isinstance(model, dict) else None,
                "dataset": ds.get("name") if isinstance(ds, dict) else str(ds),
                "domain": ds.get("domain") if isinstance(ds, dict) else None,
                "family": g.get("family"),
                "num_layers": g.get("num_layers"),
                "moe_layers": g.get("moe_layers"),
                "num_experts": g.get("num_experts"),
                "top_k": g.get("top_k"),
                "n_group": g.get("n_group"),
                "topk_group": g.get("topk_group"),
                "n_shared_experts": g.get("n_shared_experts"),
                "scoring": g.get("scoring"),
                "hidden_size": g.get("hidden_size"),
                "schema_version": m.get("schema_version"),
                "tracekit_version": m.get("tracekit_version"),
                "created_at": m.get("created_at"),
                "files": len(r.files.get(r.kind, [])),
                "chunks": [str(f) for f in r.files.get(r.kind, [])],
                "rows": tot.get("rows"),
                "requests": tot.get("requests"),
            }
        )
    ints = ("num_layers", "num_experts", "top_k", "n_group", "topk_group", "n_shared_experts", "hidden_size",
            "schema_version", "files", "rows", "requests")
    schema = pa.schema(
        [(k, pa.int64()) if k in ints else (k, pa.list_(pa.int32())) if k == "moe_layers"
         else (k, pa.list_(pa.string())) if k == "chunks" else (k, pa.string())
         for k in rows[0]]
    )
    return pa.Table.from_pylist(rows, schema=schema)


def _read_only_dataset(files: Sequence[Path]) -> pads.Dataset:
    """One pyarrow dataset over Parquet ``files`` whose schemas may differ (uint8/uint16 ids, float16/float32
    weights, columns added by a newer schema version): the unified schema promotes integer widths, fills missing
    columns with nulls, and widens float16 to float32 (DuckDB cannot scan Arrow float16)."""
    try:
        schema = pa.unify_schemas([pq.read_schema(f) for f in files], promote_options="permissive")
    except (OSError, pa.ArrowException) as exc:
        raise TracekitError(f"cannot read the runs' Parquet footers: {first_line(exc)}") from None

    def widen(t: pa.DataType) -> pa.DataType:
        if pa.types.is_float16(t):
            return pa.float32()
        if pa.types.is_list(t):
            return pa.list_(widen(t.value_type))
        return t

    schema = pa.schema([pa.field(f.name, widen(f.type), f.nullable) for f in schema])
    return pads.dataset([str(f) for f in files], schema=schema, format="parquet")


def connect(
    runs: str | os.PathLike | Iterable[str | os.PathLike],
    *,
    threads: int | None = None,
    memory_limit: str | None = DEFAULT_MEMORY_LIMIT,
    max_temp_size: str | None = DEFAULT_MAX_TEMP,
) -> duckdb.DuckDBPyConnection:
    """A read-only DuckDB connection with the views ``routes``, ``choices``, ``requests``, ``runs``, ``loads``.

    ``runs``: a run directory, a glob of run directories, a folder of run directories, or a list of these.
    ``memory_limit``: DuckDB's memory limit (e.g. ``"4GB"``; ``None`` = DuckDB's default of 80% of RAM); larger
    intermediate results spill to a private temporary folder, at most ``max_temp_size`` of it (``None``: DuckDB's
    default, 90% of the free disk). The connection cannot touch any file (see the module docstring): it is safe to
    hand to a notebook.
    """
    opened = resolve_runs(runs)
    routes_files = [p for r in opened for p in r.files.get("routes", [])]
    loads_files = [p for r in opened for p in r.files.get("loads", [])]
    spill, owner = _spill_folder()
    try:
        con = duckdb.connect(":memory:")
    except duckdb.Error as exc:
        _drop_spill(spill, owner)
        raise TracekitError(f"cannot open DuckDB: {first_line(exc)}") from None
    weakref.finalize(con, _drop_spill, spill, owner)
    try:
        if threads:
            con.execute(f"SET threads = {int(threads)}")
        if memory_limit:
            try:
                con.execute("SET memory_limit = ?", [str(memory_limit)])
            except duckdb.Error:
                raise TracekitError(f"memory limit {memory_limit!r} (--memory-limit) is not a size; use e.g. 512MB "
                                    "or 4GB") from None
        con.execute("SET temp_directory = ?", [spill])
        if max_temp_size:
            try:
                con.execute("SET max_temp_directory_size = ?", [str(max_temp_size)])
            except duckdb.Error:
                raise TracekitError(f"spill limit {max_temp_size!r} (--max-spill) is not a size; use e.g. 2GB") from None
        no_progress_bar(con)
        if routes_files:
            con.register("routes_files", _read_only_dataset(routes_files))
            con.execute(sql_text("routes"))
        else:
            con.execute(sql_text("routes_empty"))
        con.execute(sql_text("choices"))
        _create_summary_views(con, [r for r in opened if r.kind == "routes"])
        if loads_files:
            con.register("loads_files", _read_only_dataset(loads_files))
            source = "SELECT run_id, model, dataset, domain, phase, \"window\", layer, expert, count FROM loads_files " \
                     "UNION ALL SELECT * FROM loads_derived"
        else:
            source = "SELECT * FROM loads_derived"
        con.execute(sql_text("loads").replace("{source}", source))
        runs_arrow = _runs_table(opened)
        con.register("_tracekit_runs", runs_arrow)
        con.execute("CREATE TABLE runs AS SELECT * FROM _tracekit_runs")
        con.unregister("_tracekit_runs")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    except TracekitError:
        con.close()
        raise
    except duckdb.Error as exc:
        con.close()
        raise TracekitError(f"cannot open the runs: {first_line(exc)}") from None
    return con


def _spill_folder() -> tuple[str, int]:
    """A fresh private spill folder and the fd of its lock (held while the connection lives); folders of killed
    owners (their lock free) are removed first."""
    root = tempfile.gettempdir()
    for stale in glob.glob(os.path.join(root, SPILL_PREFIX + "*")):
        try:
            fd = os.open(os.path.join(stale, ".owner"), os.O_RDONLY)
        except FileNotFoundError:  # no lock file: a folder of an older version, or one being made right now
            try:
                if time.time() - os.stat(stale).st_mtime > 3600:
                    shutil.rmtree(stale, ignore_errors=True)
            except OSError:
                pass
            continue
        except OSError:
            continue  # another user's folder
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live connection's
        finally:
            os.close(fd)
        shutil.rmtree(stale, ignore_errors=True)
    spill = tempfile.mkdtemp(prefix=SPILL_PREFIX)
    owner = os.open(os.path.join(spill, ".owner"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(owner, fcntl.LOCK_SH)
    return spill, owner


def _drop_spill(spill: str, owner: int) -> None:
    shutil.rmtree(spill, ignore_errors=True)
    try:
        os.close(owner)
    except OSError:
        pass


def _create_summary_views(con: duckdb.DuckDBPyConnection, routes_runs: Sequence[Run]) -> None:
    """``requests`` and ``loads_derived`` from the per-chunk summaries when every routes run has them, else derived
    from the routes rows (same columns, same numbers); ``loads_by_step`` is always derived."""
    from .summaries import run_loads_file, summary_files

    from .store import reader_warning

    found = [summary_files(r.path, r.files.get("routes", [])) for r in routes_runs]
    # summaries whose hash differs from the record (or lost it) are never served: a damaged run-level file gives way
    # to the run's per-chunk files, a damaged per-chunk file to the rows themselves; one warning line each
    for i, r in enumerate(routes_runs):
        check = r.integrity.summaries if r.integrity is not None else None
        if check is None or not check.problems:
            continue
        if not check.per_chunk:
            found[i] = None
            reader_warning(f"{r.path}: {check.problems[0]}; the loads and requests views derive from the routes rows")
        elif not check.run_loads:
            reader_warning(f"{r.path}: {check.problems[0]}; the loads view reads the verified per-chunk summaries")
    # an empty run (killed between its manifest and its first chunk) has no summaries: derive (empty) views
    if routes_runs and all(f is not None for f in found) and any(f["requests"] for f in found):
        con.register("request_summary_files", _read_only_dataset([p for f in found for p in f["requests"]]))
        loads = []
        for r, f in zip(routes_runs, found):  # a run's summed file when it sums exactly the chunks read
            ok = r.integrity is None or r.integrity.summaries.run_loads
            whole = run_loads_file(r.path, r.files.get("routes", [])) if ok else None
            loads += [whole] if whole is not None else f["loads"]
        con.register("load_summary_files", _read_only_dataset(loads))
        con.execute(sql_text("requests_summarized"))
        con.execute(sql_text("loads_summarized"))
    else:
        for view, summary in (("requests", "summary_requests"), ("loads_derived", "summary_loads")):
            con.execute(sql_text(view).replace("{select}", sql_text(summary).replace("{source}", "routes")))
    con.execute(sql_text("loads_by_step"))


def no_progress_bar(con: duckdb.DuckDBPyConnection) -> None:
    """Switch DuckDB's progress bar off (it would print to stderr from inside library calls). Under Jupyter without
    ipywidgets DuckDB refuses to change this setting at all; the default is then kept."""
    try:
        con.execute("SET enable_progress_bar = false")
    except duckdb.Error:
        pass


def run_sql(con: duckdb.DuckDBPyConnection, sql: str, params: dict | list | None = None) -> duckdb.DuckDBPyRelation:
    """Bind read-only SQL and return its DuckDB relation (lazy: fetch it with :func:`fetch_arrow` and friends).

    Errors (syntax, unknown column or table, type errors, refused statements) become one-line TracekitErrors.
    """
    check_read_only(con, sql)
    try:
        rel = con.sql(sql, params=params)
    except duckdb.Error as exc:
        raise TracekitError(f"query failed: {first_line(exc)}") from None
    if rel is None:
        raise TracekitError("the SQL returned no result; end it with a SELECT")
    return rel


def query(runs, sql: str, params: dict | list | None = None, *, timeout: float | None = DEFAULT_TIMEOUT_S,
          memory_limit: str | None = DEFAULT_MEMORY_LIMIT) -> pa.Table:
    """Run one read-only query over ``runs`` and return the result as an Arrow table."""
    con = connect(runs, memory_limit=memory_limit)
    try:
        return fetch_limited(con, sql, timeout=timeout, params=params)
    finally:
        con.close()


def fetch_arrow(rel: duckdb.DuckDBPyRelation) -> pa.Table:
    """Execute a relation and return an Arrow table; execution errors become one-line TracekitErrors."""
    try:
        return rel.to_arrow_table()
    except duckdb.Error as exc:
        raise TracekitError(f"query failed: {first_line(exc)}") from None


@contextmanager
def time_limit(con: duckdb.DuckDBPyConnection, seconds: float | None):
    """Interrupt whatever ``con`` executes inside the block once ``seconds`` have passed (``None``/0: no limit)."""
    if not seconds:
        yield
        return
    timer = threading.Timer(float(seconds), con.interrupt)
    timer.daemon = True
    timer.start()
    try:
        yield
    except TracekitError as exc:
        if not timer.is_alive() and "interrupt" in str(exc).lower():
            raise TracekitError(f"the query ran longer than --timeout {seconds:g} s and was stopped; narrow it "
                                "(e.g. WHERE layer = ...) or raise --timeout") from None
        raise
    finally:
        timer.cancel()


@contextmanager
def stream_result(con: duckdb.DuckDBPyConnection, sql: str, *, timeout: float | None = DEFAULT_TIMEOUT_S,
                  params: dict | list | None = None, rows_per_batch: int = BATCH_ROWS) -> Iterator["Batches"]:
    """Check and run one read-only query; yields an iterator of its Arrow record batches (bounded memory however
    large the result), stopped after ``timeout`` seconds. The statement runs in a transaction rolled back at the
    end of the block, so nothing it might have changed in the catalog outlives it."""
    try:
        con.execute("BEGIN TRANSACTION")
    except duckdb.Error as exc:
        raise TracekitError(f"query failed: {first_line(exc)}") from None
    reader = None
    try:
        with time_limit(con, timeout):
            rel = run_sql(con, sql, params)
            try:
                reader = rel.to_arrow_reader(rows_per_batch)
            except duckdb.Error as exc:
                raise TracekitError(f"query failed: {first_line(exc)}") from None
            yield Batches(reader)
    finally:
        if reader is not None:
            reader.close()  # an unfinished result would block the rollback
        try:
            con.execute("ROLLBACK")
        except duckdb.Error as exc:  # the connection cannot be trusted to be clean: say so
            raise TracekitError(f"could not roll back the statement: {first_line(exc)}") from None


class Batches:
    """A query's result as Arrow record batches (``schema``; iterate once); errors are one-line TracekitErrors."""

    def __init__(self, reader: pa.RecordBatchReader):
        self.reader = reader
        self.schema = reader.schema

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        while True:
            try:
                batch = self.reader.read_next_batch()
            except StopIteration:
                return
            except (duckdb.Error, pa.ArrowException) as exc:
                raise TracekitError(f"query failed: {first_line(exc)}") from None
            yield batch


def fetch_limited(con: duckdb.DuckDBPyConnection, sql: str, *, timeout: float | None = DEFAULT_TIMEOUT_S,
                  params: dict | list | None = None, max_bytes: int | None = DEFAULT_MAX_RESULT_BYTES) -> pa.Table:
    """Check, run and fetch one read-only query as an Arrow table, stopped after ``timeout`` seconds and refused
    (one line) once the fetched result passes ``max_bytes`` (``None``: no limit)."""
    with stream_result(con, sql, timeout=timeout, params=params) as batches:
        kept, size = [], 0
        for b in batches:
            size += b.nbytes
            if max_bytes is not None and size > max_bytes:
                raise TracekitError(f"the result is over {max_bytes / 2**20:g} MiB held in memory; aggregate or "
                                    "LIMIT it, or write it with --format csv|json|parquet -o FILE (streamed)")
            kept.append(b)
        return pa.Table.from_batches(kept, batches.schema)


def fetch_numpy(rel: duckdb.DuckDBPyRelation) -> dict:
    """Execute a relation and return {column: numpy array}."""
    try:
        return rel.fetchnumpy()
    except duckdb.Error as exc:
        raise TracekitError(f"query failed: {first_line(exc)}") from None


def stream_batches(rel: duckdb.DuckDBPyRelation, rows_per_batch: int = 1 << 20) -> pa.RecordBatchReader:
    """Execute a relation as a stream of Arrow record batches (bounded memory for large results)."""
    try:
        return rel.to_arrow_reader(rows_per_batch)
    except duckdb.Error as exc:
        raise TracekitError(f"query failed: {first_line(exc)}") from None


def sql_file(con: duckdb.DuckDBPyConnection, name: str, params: dict | None = None) -> pa.Table:
    """Run the packaged query ``tracekit/sql/<name>.sql`` and return an Arrow table."""
    return fetch_arrow(run_sql(con, sql_text(name), params))
