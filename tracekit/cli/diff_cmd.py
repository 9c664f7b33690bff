"""`tracekit diff A B`: two run sets compared, load shift per layer and expert against bootstrap noise."""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import typer

from ..outputs import check_folder
from . import app
from ._params import MAX_SEED, force_option


@app.command("diff")
def diff_cmd(
    a: str = typer.Argument(..., metavar="A", help="First run set: a run directory, a glob, or several separated by commas."),
    b: str = typer.Argument(..., metavar="B", help="Second run set, compared against A (same forms)."),
    by: Literal["domain", "dataset"] = typer.Option("domain", "--by", help="Grouping of the domain-shift comparison."),
    bootstrap: int = typer.Option(200, "--bootstrap", min=20, max=10_000, help="Bootstrap resamples over requests (noise level)."),
    loads_only: bool = typer.Option(False, "--loads-only", help="Compare the load shift only (skip domain and correlation: one pass less)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the full tables (per layer, per expert) into this folder."),
    force: bool = force_option("files in the --out folder"),
    fmt: Literal["parquet", "csv"] = typer.Option("parquet", "--format", help="File format for --out."),
    seed: int = typer.Option(0, "--seed", min=0, max=MAX_SEED, help="Seed of the bootstrap and the shuffled baselines."),
    memory_budget: str = typer.Option("2GB", "--memory-budget", help="Working memory (DuckDB gets part of it)."),
) -> None:
    """How run set B routes differently from A: load shift per layer and expert, imbalance, domain shift and
    prefill-decode correlation, each against its noise level (a bootstrap over requests)."""
    from rich.console import Console

    from ..analysis.result import AnalysisResult
    from ..diff import diff_runs
    from ..progress import status
    from .query_cmd import print_table, utf8_runs

    sets = [[p for p in s.split(",") if p] for s in (a, b)]
    for s in sets:
        utf8_runs(s)
    if out is not None:
        check_folder(out, force=force, option="--out")
    with status("comparing the run sets (reading both, bootstrap over requests)"):
        res = diff_runs(sets[0], sets[1], by=by, draws=bootstrap, seed=seed, findings=not loads_only,
                        memory_budget=memory_budget)
    console = Console()
    print(f"A: {', '.join(sets[0])}\nB: {', '.join(sets[1])}")
    for line in res.lines:
        print(line)
    for title, table in res.summaries.items():
        print_table(table, title=title, max_rows=40, console=console)
    if out is not None:
        for p in AnalysisResult("diff", tables=res.tables).write(out, fmt):
            console.print(f"wrote {p}", markup=False)
