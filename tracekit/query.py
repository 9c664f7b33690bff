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
loads      (run, phase, window, layer, expert): assignment counts; stored for runs of kind ``loads``; for runs
           of kind ``routes`` read from the per-chunk summaries (:mod:`tracekit.summaries`; derived from the
           rows for runs without them), window 0 = prefill, -1 = every decode step together; the view
           ``loads_by_step`` has the same per decode step (window s = step s), derived from the rows
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
statements, so ``CREATE``, ``SET`` and the like are refused with one line; :func:`fetch_limited` stops a query
after a time limit (``--timeout``) and ``connect(memory_limit=...)`` bounds DuckDB's memory (``--memory-limit``).

Two internal readers use DuckDB's own ``read_parquet`` on a private connection that runs fixed statements only
(never user text): the analyses' slice reader (:mod:`tracekit.analysis.scan`, ~2.5x faster at decoding the expert
lists than an Arrow dataset scan) and the placement loader (:mod:`tracekit.placement.traces`).
"""
from __future__ import annotations

import glob
import os
import shutil
import tempfile
import threading
import weakref
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from .errors import TracekitError
from .store import MANIFEST, Run, open_run

VIEWS = ("routes", "choices", "requests", "runs", "loads")
_ALLOWED_STATEMENTS = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}
DEFAULT_MEMORY_LIMIT = "4GB"
DEFAULT_TIMEOUT_S = 600.0


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
) -> duckdb.DuckDBPyConnection:
    """A read-only DuckDB connection with the views ``routes``, ``choices``, ``requests``, ``runs``, ``loads``.

    ``runs``: a run directory, a glob of run directories, a folder of run directories, or a list of these.
    ``memory_limit``: DuckDB's memory limit (e.g. ``"4GB"``; ``None`` = DuckDB's default of 80% of RAM); larger
    intermediate results spill to a private temporary folder. The connection cannot touch any file (see the
    module docstring): it is safe to hand to a notebook.
    """
    opened = resolve_runs(runs)
    routes_files = [p for r in opened for p in r.files.get("routes", [])]
    loads_files = [p for r in opened for p in r.files.get("loads", [])]
    spill = tempfile.mkdtemp(prefix="tracekit-duckdb-")
    try:
        con = duckdb.connect(":memory:")
    except duckdb.Error as exc:
        shutil.rmtree(spill, ignore_errors=True)
        raise TracekitError(f"cannot open DuckDB: {first_line(exc)}") from None
    weakref.finalize(con, shutil.rmtree, spill, True)
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
            con.execute(sql_text("loads"))
        else:
            con.execute("CREATE VIEW loads AS SELECT * FROM loads_derived")
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


def _create_summary_views(con: duckdb.DuckDBPyConnection, routes_runs: Sequence[Run]) -> None:
    """``requests`` and ``loads_derived`` from the per-chunk summaries when every routes run has them, else derived
    from the routes rows (same columns, same numbers); ``loads_by_step`` is always derived."""
    from .summaries import run_loads_file, summary_files

    found = [summary_files(r.path, r.files.get("routes", [])) for r in routes_runs]
    if routes_runs and all(f is not None for f in found):
        con.register("request_summary_files", _read_only_dataset([p for f in found for p in f["requests"]]))
        loads = []
        for r, f in zip(routes_runs, found):  # a run's summed file when it sums exactly the chunks read
            whole = run_loads_file(r.path, r.files.get("routes", []))
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


_HINTS = ("Did you mean", "Candidate bindings", "Candidate")


def first_line(exc: BaseException) -> str:
    """The error's first line, with DuckDB's own hint ("Did you mean ...", candidate columns) kept on it."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    lines = text.splitlines()
    hints = [ln.strip() for ln in lines[1:] if ln.strip().startswith(_HINTS)]
    return " ".join([lines[0], *hints])


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Refuse (TracekitError) anything but SELECT / EXPLAIN statements; also catches syntax errors."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise TracekitError(f"invalid SQL: {first_line(exc)}") from None
    if not statements:
        raise TracekitError("empty SQL: give a SELECT statement over routes, choices, requests, runs or loads")
    for st in statements:
        if st.type not in _ALLOWED_STATEMENTS:
            kind = str(st.type).rsplit(".", 1)[-1]
            raise TracekitError(
                f"{kind} statements are not allowed: traces are read-only; use SELECT "
                "(and --format/-o to save a result)"
            )


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


def fetch_limited(con: duckdb.DuckDBPyConnection, sql: str, *, timeout: float | None = DEFAULT_TIMEOUT_S,
                  params: dict | list | None = None) -> pa.Table:
    """Check, run and fetch one read-only query as an Arrow table, stopped after ``timeout`` seconds."""
    with time_limit(con, timeout):
        return fetch_arrow(run_sql(con, sql, params))


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
