"""`tracekit query`, `sql`, `analyze`, `report`: SQL and the three findings over run directories."""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

import pyarrow as pa
import typer

from ..errors import TracekitError
from . import app

FORMATS = ("table", "csv", "json", "parquet")


def partial_reads_cli(allow: bool):
    """``--allow-partial``: damaged runs are read without their damaged chunks, one warning line per chunk."""
    from ..store import partial_reads

    seen: set[str] = set()  # a command may open a run twice (report: resolve, then connect): warn once

    def warn(line: str) -> None:
        if line not in seen:
            seen.add(line)
            print(f"warning: {line}", file=sys.stderr)

    return partial_reads(allow, on_skip=warn)


def _fmt(v) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}" if abs(v) < 1e6 else f"{v:.6g}"
    return str(v)


def print_table(table: pa.Table, title: str | None = None, max_rows: int | None = None, console=None) -> None:
    """An Arrow table as an aligned rich table (numbers right-aligned)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(title=title, title_justify="left", header_style="bold")
    numeric = []
    for f in table.schema:
        num = pa.types.is_integer(f.type) or pa.types.is_floating(f.type)
        numeric.append(num)
        t.add_column(f.name, justify="right" if num else "left")
    shown = table if max_rows is None else table.slice(0, max_rows)
    cells = [[_fmt(v) for v in row.values()] for row in shown.to_pylist()]
    for row in cells:
        t.add_row(*row)
    # wide enough that headers and cells are never truncated (a terminal wraps long lines instead)
    needed = sum(max([len(f.name)] + [len(r[i]) for r in cells]) + 3 for i, f in enumerate(table.schema)) + 1
    Console(width=max(console.width, needed)).print(t)
    if max_rows is not None and table.num_rows > max_rows:
        console.print(f"... {table.num_rows - max_rows} more rows (use --format csv|json|parquet -o FILE for all)")


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def emit(table: pa.Table, fmt: str, out: Optional[Path], max_rows: int | None = 200) -> None:
    """Write a query result: aligned table on the terminal, or csv/json (stdout or file), or parquet (file)."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if fmt not in FORMATS:
        raise TracekitError(f"--format {fmt!r} unknown; use one of {', '.join(FORMATS)}")
    if fmt == "table":
        if out is not None:
            raise TracekitError("-o needs --format csv, json or parquet")
        print_table(table, max_rows=max_rows)
        return
    if fmt == "parquet":
        if out is None:
            raise TracekitError("--format parquet needs -o FILE")
        _atomic_write(out, lambda p: pq.write_table(table, p, compression="zstd"))
        return
    if fmt == "csv":
        from ..analysis.result import _csv_safe

        if out is None:
            buf = pa.BufferOutputStream()
            pacsv.write_csv(_csv_safe(table), buf)
            sys.stdout.write(buf.getvalue().to_pybytes().decode())
        else:
            _atomic_write(out, lambda p: pacsv.write_csv(_csv_safe(table), p))
        return
    text = "\n".join(json.dumps(r, default=str) for r in table.to_pylist()) + ("\n" if table.num_rows else "")
    if out is None:
        sys.stdout.write(text)
    else:
        _atomic_write(out, lambda p: Path(p).write_text(text))


@app.command("query")
def query_cmd(
    args: List[str] = typer.Argument(..., metavar="RUNS... SQL", help="Run directories (or globs), then one SQL query."),
    fmt: str = typer.Option("table", "--format", "-f", help="table, csv, json or parquet."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Write the result to this file."),
    max_rows: int = typer.Option(200, "--max-rows", help="Rows shown by --format table."),
    allow_partial: bool = typer.Option(False, "--allow-partial", help="Read the intact chunks of a damaged run (one warning per skipped chunk)."),
) -> None:
    """Run one read-only SQL query over the views routes, choices, requests, runs, loads."""
    from ..query import connect, fetch_arrow, run_sql

    if len(args) < 2:
        raise TracekitError('give one or more run directories and then the SQL, e.g. tracekit query RUN "SELECT * FROM requests"')
    *runs, sql = args
    with partial_reads_cli(allow_partial):
        con = connect(runs)
    try:
        emit(fetch_arrow(run_sql(con, sql)), fmt, out, max_rows)
    finally:
        con.close()


@app.command("sql")
def sql_cmd(
    runs: List[str] = typer.Argument(..., help="Run directories (or globs)."),
    max_rows: int = typer.Option(200, "--max-rows", help="Rows shown per result."),
    allow_partial: bool = typer.Option(False, "--allow-partial", help="Read the intact chunks of a damaged run (one warning per skipped chunk)."),
) -> None:
    """Interactive SQL shell over the same views (reads statements ending in ';' from stdin; piping works)."""
    from ..query import VIEWS, connect, fetch_arrow, run_sql

    with partial_reads_cli(allow_partial):
        con = connect(runs)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"tracekit sql: views {', '.join(VIEWS)}; end statements with ';'; .tables, .schema VIEW, .quit")
    failed = 0
    buf: list[str] = []

    def run(text: str) -> None:
        nonlocal failed
        try:
            emit(fetch_arrow(run_sql(con, text)), "table", None, max_rows)
        except TracekitError as exc:
            failed += 1
            print(f"error: {exc}", file=sys.stderr)

    try:
        while True:
            if interactive:
                sys.stdout.write("tracekit> " if not buf else "     ...> ")
                sys.stdout.flush()
            line = sys.stdin.readline()
            if not line:
                break
            stripped = line.strip()
            if not buf and stripped.startswith("."):
                cmd, _, arg = stripped.partition(" ")
                if cmd in (".quit", ".exit"):
                    break
                if cmd == ".tables":
                    print("  ".join(VIEWS))
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


@app.command("analyze")
def analyze_cmd(
    runs: List[str] = typer.Argument(..., help="Run directories (or globs)."),
    by: str = typer.Option("domain", "--by", help="Group results by domain, phase or dataset."),
    what: Optional[str] = typer.Option(
        None, "--what", help="Comma-separated: imbalance, domain, correlation, coactivation (default: all that the "
        "runs support; count-only runs support imbalance)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write every full result table into this folder."),
    fmt: str = typer.Option("parquet", "--format", help="parquet or csv for --out."),
    layer: Optional[int] = typer.Option(None, "--layer", help="Co-activation and inter-layer affinity for this MoE layer only."),
    window: Optional[int] = typer.Option(None, "--window", help="Requests per window for hot-set stability (default R/10)."),
    top_n: Optional[int] = typer.Option(None, "--top-n", help="Experts compared in the top-n overlap (default top-k)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the shuffled baseline and the classifier folds."),
    allow_partial: bool = typer.Option(False, "--allow-partial", help="Read the intact chunks of a damaged run (one warning per skipped chunk)."),
) -> None:
    """Load imbalance, domain specificity, prefill-decode correlation and co-activation, as summary tables."""
    from rich.console import Console

    from ..analysis.run import analyze

    if fmt not in ("parquet", "csv"):
        raise TracekitError(f"--format {fmt!r} unknown; use parquet or csv")
    with partial_reads_cli(allow_partial):
        results = analyze(runs, what=what, by=by, layer=layer, window=window, top_n=top_n, seed=seed)
    console = Console()
    for name, res in results.items():
        console.rule(f"[bold]{name}")
        for title, table in res.summaries.items():
            print_table(table, title=title, max_rows=40, console=console)
        for note in res.notes:
            console.print(f"note: {note}")
        if out is not None:
            for p in res.write(out, fmt):
                console.print(f"wrote {p}")


@app.command("report")
def report_cmd(
    runs: List[str] = typer.Argument(..., help="Run directories (or globs)."),
    out: Path = typer.Option(..., "-o", "--out", help="HTML file to write."),
    png: Optional[Path] = typer.Option(None, "--png", help="Also write each figure as a PNG into this folder."),
    layer: Optional[int] = typer.Option(None, "--layer", help="MoE layer of the co-activation heatmap (default: the middle one)."),
    by: str = typer.Option("domain", "--by", help="Group the domain-shift figure by domain or dataset."),
    allow_partial: bool = typer.Option(False, "--allow-partial", help="Read the intact chunks of a damaged run (one warning per skipped chunk)."),
) -> None:
    """One self-contained HTML page with the load, imbalance, domain-shift, correlation and co-activation plots."""
    from ..report import write_report

    with partial_reads_cli(allow_partial):
        path = write_report(runs, out, png_dir=png, layer=layer, by=by)
    print(f"wrote {path}")
