"""`tracekit query`, `sql`, `analyze`, `report`: SQL and the three findings over run directories."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Literal, Optional

import pyarrow as pa
import typer

from ..errors import TracekitError
from ..formatting import format_cell
from ..outputs import atomic_write, check_file, check_folder, distinct
from . import app
from ._params import MAX_LAYERS, MAX_SEED, check_runs, force_option

FORMATS = ("table", "csv", "json", "parquet")

# Shared by `query` and `sql`: bounds on one statement (see tracekit.query.fetch_limited and connect).
TIMEOUT_OPTION = typer.Option(
    600.0, "--timeout", min=0.0, help="Stop a statement after this many seconds (0 = no limit).")
MEMORY_LIMIT_OPTION = typer.Option(
    "4GB", "--memory-limit", help="DuckDB memory limit, e.g. 512MB or 8GB; larger intermediates spill to a private "
    "temporary folder that is removed afterwards.")


MAX_SPILL_OPTION = typer.Option(
    "8GB", "--max-spill", help="Most disk DuckDB may spill to (its max_temp_directory_size), e.g. 2GB; a statement "
    "that needs more fails with one line.")


def partial_reads_cli(allow: bool):
    """``--allow-partial``: damaged runs are read without their damaged chunks, one warning line per chunk."""
    from ..store import partial_reads

    seen: set[str] = set()  # a command may open a run twice (report: resolve, then connect): warn once

    def warn(line: str) -> None:
        if line not in seen:
            seen.add(line)
            print(f"warning: {line}", file=sys.stderr)

    return partial_reads(allow, on_skip=warn)


def print_table(table: pa.Table, title: str | None = None, max_rows: int | None = None, console=None) -> None:
    """An Arrow table as an aligned rich table (numbers right-aligned)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    t = Table(title=escape(title) if title else title, title_justify="left", header_style="bold")
    numeric = []
    for f in table.schema:
        num = pa.types.is_integer(f.type) or pa.types.is_floating(f.type)
        numeric.append(num)
        t.add_column(escape(f.name), justify="right" if num else "left")
    shown = table if max_rows is None else table.slice(0, max_rows)
    cells = [[format_cell(v) for v in row.values()] for row in shown.to_pylist()]
    for row in cells:
        t.add_row(*(escape(c) for c in row))  # query results are data, never rich markup
    # wide enough that headers and cells are never truncated (a terminal wraps long lines instead)
    needed = sum(max([len(f.name)] + [len(r[i]) for r in cells]) + 3 for i, f in enumerate(table.schema)) + 1
    Console(width=max(console.width, needed)).print(t)
    if max_rows is not None and table.num_rows > max_rows:
        console.print(f"... {table.num_rows - max_rows} more rows (use --format csv|json|parquet -o FILE for all)")


def utf8_text(text: str, what: str) -> str:
    """One line for text that is not valid UTF-8 (Python keeps undecodable bytes of argv/stdin as surrogates, which
    DuckDB refuses with a TypeError)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise TracekitError(f"{what} is not valid UTF-8 text (at character {exc.start}); re-encode it as UTF-8") from None
    return text


def utf8_runs(runs) -> None:
    """Run paths are valid UTF-8 (DuckDB reads them) and name runs whose manifests have the right types."""
    for r in runs:
        utf8_text(str(r), f"run path {str(r)!r}")
    if runs:
        check_runs(runs)


def check_emit(fmt: str, out: Optional[Path], force: bool = False) -> None:
    """Refuse, before the query runs, a format/-o combination or an output path that :func:`emit` cannot write."""
    if fmt not in FORMATS:
        raise TracekitError(f"--format {fmt!r} unknown; use one of {', '.join(FORMATS)}")
    if fmt == "table" and out is not None:
        raise TracekitError("-o needs --format csv, json or parquet")
    if fmt == "parquet" and out is None:
        raise TracekitError("--format parquet needs -o FILE")
    if out is not None:
        check_file(out, force=force, option="-o")


_CSV_PLAIN = (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean, pa.types.is_string,
              pa.types.is_large_string, pa.types.is_date, pa.types.is_timestamp, pa.types.is_time,
              pa.types.is_decimal, pa.types.is_null, pa.types.is_binary, pa.types.is_large_binary)


def _text_of(v) -> str | None:
    if v is None:
        return None
    if isinstance(v, (str, int, float, bool)):
        return str(v)
    return json.dumps(v, default=str, ensure_ascii=False)


def csv_safe(batch: pa.RecordBatch) -> pa.RecordBatch:
    """A batch CSV can hold: a column of any other type (list, fixed-size list, map, struct, union, interval,
    duration, ...) becomes its JSON-like text; dictionaries are decoded first."""
    cols = []
    for col in batch.columns:
        if pa.types.is_dictionary(col.type):
            col = col.cast(col.type.value_type)
        if not any(test(col.type) for test in _CSV_PLAIN):
            col = pa.array([_text_of(v) for v in col.to_pylist()], pa.string())
        cols.append(col)
    return pa.RecordBatch.from_arrays(cols, names=batch.schema.names)


def _write_stream(batches, fmt: str, sink) -> None:
    """Write ``batches`` (an iterable of Arrow record batches with ``.schema``) to ``sink`` (a path or a binary
    stream) as csv, json lines or parquet, batch by batch."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if fmt == "parquet":
        with pq.ParquetWriter(sink, batches.schema, compression="zstd") as w:
            for b in batches:
                w.write_batch(b)
        return
    own = isinstance(sink, str)
    f = open(sink, "wb") if own else sink
    try:
        if fmt == "csv":
            writer = None
            for b in batches:
                b = csv_safe(b)
                if writer is None:
                    writer = pacsv.CSVWriter(f, b.schema)
                writer.write_batch(b)
            if writer is None:  # no rows: the header alone
                empty = csv_safe(pa.RecordBatch.from_pylist([], schema=batches.schema))
                pacsv.write_csv(empty, f)
            else:
                writer.close()
        else:
            for b in batches:
                f.write("".join(json.dumps(r, default=str) + "\n" for r in b.to_pylist()).encode())
        f.flush()
    finally:
        if own:
            f.close()


def emit(batches, fmt: str, out: Optional[Path], max_rows: int | None = 200) -> None:
    """Write a query result (a :class:`tracekit.query.Batches` or an Arrow table): aligned table on the terminal
    (the first ``max_rows`` rows kept, the rest only counted), or csv/json (stdout or file) or parquet (file),
    streamed batch by batch. ``out`` was checked by :func:`check_emit`; files are written atomically."""
    if isinstance(batches, pa.Table):
        batches = _TableBatches(batches)
    if fmt not in FORMATS:
        raise TracekitError(f"--format {fmt!r} unknown; use one of {', '.join(FORMATS)}")
    if fmt == "table":
        if out is not None:
            raise TracekitError("-o needs --format csv, json or parquet")
        kept, n = [], 0
        for b in batches:
            if max_rows is None or n < max_rows:
                kept.append(b if max_rows is None else b.slice(0, max_rows - n))
            n += b.num_rows
        shown = pa.Table.from_batches(kept, batches.schema)
        print_table(shown, max_rows=None)
        if max_rows is not None and n > max_rows:
            from rich.console import Console

            Console().print(f"... {n - max_rows} more rows (use --format csv|json|parquet -o FILE for all)")
        return
    if fmt == "parquet" and out is None:
        raise TracekitError("--format parquet needs -o FILE")
    if out is None:
        sys.stdout.flush()
        _write_stream(batches, fmt, sys.stdout.buffer)
    else:
        atomic_write(out, lambda p: _write_stream(batches, fmt, p))


class _TableBatches:
    def __init__(self, table: pa.Table):
        self.schema = table.schema
        self._table = table

    def __iter__(self):
        return iter(self._table.to_batches())


@app.command("query")
def query_cmd(
    args: List[str] = typer.Argument(..., metavar="RUNS... SQL", help="Run directories (or globs), then one SQL query."),
    fmt: Literal["table", "csv", "json", "parquet"] = typer.Option("table", "--format", "-f", help="Output format."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Write the result to this file (not inside a run)."),
    force: bool = force_option("the -o file"),
    max_rows: int = typer.Option(200, "--max-rows", min=1, max=10_000_000, help="Rows shown by --format table."),
    timeout: float = TIMEOUT_OPTION,
    memory_limit: str = MEMORY_LIMIT_OPTION,
    max_spill: str = MAX_SPILL_OPTION,
    allow_partial: bool = typer.Option(False, "--allow-partial", help="Read the intact chunks of a damaged run (one warning per skipped chunk)."),
) -> None:
    """Run one read-only SQL query over the views routes, choices, requests, runs, loads, loads_by_step."""
    from ..query import connect, stream_result

    if len(args) < 2:
        raise TracekitError('give one or more run directories and then the SQL, e.g. tracekit query RUN "SELECT * FROM requests"')
    *runs, sql = args
    utf8_text(sql, "the SQL")
    utf8_runs(runs)
    check_emit(fmt, out, force)
    with partial_reads_cli(allow_partial):
        con = connect(runs, memory_limit=memory_limit, max_temp_size=max_spill)
    try:
        with stream_result(con, sql, timeout=timeout) as batches:
            emit(batches, fmt, out, max_rows)
    finally:
        con.close()


@app.command("sql")
def sql_cmd(
    runs: List[str] = typer.Argument(..., help="Run directories (or globs)."),
    max_rows: int = typer.Option(200, "--max-rows", min=1, max=10_000_000, help="Rows shown per result."),
    timeout: float = TIMEOUT_OPTION,
    memory_limit: str = MEMORY_LIMIT_OPTION,
    max_spill: str = MAX_SPILL_OPTION,
    allow_partial: bool = typer.Option(False, "--allow-partial", help="Read the intact chunks of a damaged run (one warning per skipped chunk)."),
) -> None:
    """Interactive SQL shell over the views routes, choices, requests, runs, loads, loads_by_step (statements end
    in ';'; several on one line each print their result; piping works; line editing and history in a terminal)."""
    from ..query import VIEWS, connect, stream_result

    views = (*VIEWS, "loads_by_step") if "loads_by_step" not in VIEWS else VIEWS
    utf8_runs(runs)
    with partial_reads_cli(allow_partial):
        con = connect(runs, memory_limit=memory_limit, max_temp_size=max_spill)
    interactive = sys.stdin.isatty()
    if interactive:
        _line_editing()
        print(f"tracekit sql: views {', '.join(views)}; end statements with ';'; .tables, .schema VIEW, .quit")
    failed = 0
    buf: list[str] = []

    def run(text: str) -> None:
        nonlocal failed
        for statement in split_statements(con, text):  # every statement's result, not only the last one's
            try:
                with stream_result(con, utf8_text(statement, "the statement"), timeout=timeout) as batches:
                    emit(batches, "table", None, max_rows)
            except TracekitError as exc:
                failed += 1
                print(f"error: {exc}", file=sys.stderr)

    try:
        while True:
            if interactive:  # input() with readline: line editing, and history across sessions
                try:
                    line = input("tracekit> " if not buf else "     ...> ") + "\n"
                except EOFError:
                    break
            else:
                line = sys.stdin.readline()
            if not line:
                break
            stripped = line.strip()
            if not buf and stripped.startswith("."):
                cmd, _, arg = stripped.partition(" ")
                if cmd in (".quit", ".exit"):
                    break
                if cmd == ".tables":
                    print("  ".join(views))
                elif cmd == ".schema":
                    run(f"DESCRIBE {arg.strip() or 'routes'}")
                else:
                    failed += 1
                    print(f"error: unknown command {cmd}; use .tables, .schema VIEW, .quit", file=sys.stderr)
                continue
            buf.append(line)
            if stripped.endswith(";"):
                run("".join(buf))
                buf = []
        if "".join(buf).strip():
            run("".join(buf))
    finally:
        con.close()
    if failed and not interactive:
        sys.exit(2)  # piped statements: report failure to the caller (each error was printed as one line)


def _line_editing() -> None:
    """Line editing and a history file (~/.tracekit_sql_history, 1000 lines) for the interactive shell, where the
    platform has readline."""
    try:
        import atexit
        import readline
    except ImportError:
        return
    path = Path.home() / ".tracekit_sql_history"
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(1000)

    def save() -> None:
        try:
            readline.write_history_file(path)
        except OSError:
            pass

    atexit.register(save)


def split_statements(con, text: str) -> list[str]:
    """The statements of ``text`` as separate SQL strings (DuckDB's own parser splits them); text that does not
    parse is returned whole, so that running it reports the syntax error."""
    import duckdb

    try:
        parts = [st.query.strip() for st in con.extract_statements(text)]
    except (duckdb.Error, TypeError, UnicodeEncodeError):
        return [text]
    return [p for p in parts if p] or [text]


def _check_what(value: Optional[str]) -> Optional[str]:
    """--what: a comma-separated subset of the analyses, checked at parse time."""
    if value is None:
        return value
    from ..analysis.run import ANALYSES

    items = [w.strip() for w in value.split(",")]
    bad = [w for w in items if w not in ANALYSES]
    if bad or not items:
        raise typer.BadParameter(f"{', '.join(repr(b) for b in bad) or '(none)'} unknown; choose from "
                                 f"{', '.join(ANALYSES)} (comma-separated)", param_hint="'--what'")
    return ",".join(items)


@app.command("analyze")
def analyze_cmd(
    runs: List[str] = typer.Argument(..., help="Run directories (or globs)."),
    by: Literal["domain", "phase", "dataset"] = typer.Option("domain", "--by", help="Group results by this key."),
    what: Optional[str] = typer.Option(
        None, "--what", callback=_check_what, help="Comma-separated: imbalance, domain, correlation, coactivation (default: all that the "
        "runs support; count-only runs support imbalance)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write every full result table into this folder (not inside a run)."),
    force: bool = force_option("files in the --out folder"),
    fmt: Literal["parquet", "csv"] = typer.Option("parquet", "--format", help="File format for --out."),
    layer: Optional[int] = typer.Option(None, "--layer", min=0, max=MAX_LAYERS, help="Co-activation and inter-layer affinity for this MoE layer only."),
    window: Optional[int] = typer.Option(None, "--window", min=1, max=2**31 - 1, help="Requests per window for hot-set stability (default R/10)."),
    top_n: Optional[int] = typer.Option(None, "--top-n", min=1, max=2**31 - 1, help="Experts compared in the top-n overlap (default top-k)."),
    seed: int = typer.Option(0, "--seed", min=0, max=MAX_SEED, help="Seed of the shuffled baseline and the classifier folds."),
    allow_partial: bool = typer.Option(False, "--allow-partial", help="Read the intact chunks of a damaged run (one warning per skipped chunk)."),
    memory_budget: str = typer.Option("2GB", "--memory-budget", help="Working memory of the analyses (DuckDB gets "
                                      "part of it as its memory_limit), whatever the number of requests."),
) -> None:
    """Load imbalance, domain specificity, prefill-decode correlation and co-activation, as summary tables."""
    from rich.console import Console
    from rich.markup import escape

    from ..analysis.run import analyze

    if fmt not in ("parquet", "csv"):
        raise TracekitError(f"--format {fmt!r} unknown; use parquet or csv")
    utf8_runs(runs)
    if out is not None:
        check_folder(out, force=force, option="--out")
    from ..progress import task

    with partial_reads_cli(allow_partial), task("reading the runs"):
        results = analyze(runs, what=what, by=by, layer=layer, window=window, top_n=top_n, seed=seed,
                          memory_budget=memory_budget)
    console = Console()
    for name, res in results.items():
        console.rule(f"[bold]{escape(name)}")
        for title, table in res.summaries.items():
            print_table(table, title=title, max_rows=40, console=console)
        for note in res.notes:
            console.print(f"note: {note}", markup=False)
        if out is not None:
            for p in res.write(out, fmt):
                console.print(f"wrote {p}", markup=False)


@app.command("report")
def report_cmd(
    runs: List[str] = typer.Argument(..., help="Run directories (or globs)."),
    out: Path = typer.Option(..., "-o", "--out", help="HTML file to write (not inside a run)."),
    png: Optional[Path] = typer.Option(None, "--png", help="Also write each figure as a PNG into this folder."),
    force: bool = force_option("the HTML file and PNGs in the --png folder"),
    layer: Optional[int] = typer.Option(None, "--layer", min=0, max=MAX_LAYERS, help="MoE layer of the co-activation heatmap (default: the middle one)."),
    by: Literal["domain", "dataset"] = typer.Option("domain", "--by", help="Group the domain-shift figure by this key."),
    allow_partial: bool = typer.Option(False, "--allow-partial", help="Read the intact chunks of a damaged run (one warning per skipped chunk)."),
    memory_budget: str = typer.Option("2GB", "--memory-budget", help="Working memory of the analyses behind the "
                                      "figures, whatever the number of requests."),
    compare: Optional[List[str]] = typer.Option(None, "--compare", help="A second run set (directories or globs; "
                                                "repeat the option for several): the page adds how it routes "
                                                "differently from RUNS, against bootstrap noise (as tracekit diff)."),
    bootstrap: int = typer.Option(200, "--bootstrap", min=20, max=10_000, help="Bootstrap resamples over requests "
                                  "for --compare's noise level."),
) -> None:
    """One self-contained HTML page with the load, imbalance, domain-shift, correlation and co-activation plots
    (and, with --compare, the differences to a second run set)."""
    from ..report import write_report

    utf8_runs(runs)
    if compare:
        utf8_runs(compare)
    check_file(out, force=force, option="-o")
    if png is not None:
        check_folder(png, force=force, option="--png")
        distinct(("-o", out), ("--png", png))
    from ..progress import task

    with partial_reads_cli(allow_partial), task("reading the runs"):
        path = write_report(runs, out, png_dir=png, layer=layer, by=by, memory_budget=memory_budget,
                            compare=compare or None, draws=bootstrap)
    print(f"wrote {path}")
