"""Run the analyses over a set of runs: the library side of ``tracekit analyze``."""
from __future__ import annotations

import os
from typing import Iterable, Sequence

import duckdb
import numpy as np

from ..errors import TracekitError
from ..query import connect, sql_file
from .coactivation import analyze_coactivation
from .correlation import analyze_correlation
from .data import GROUP_KEYS, geometry, request_counts
from .domain import analyze_domain
from .imbalance import analyze_imbalance, analyze_loads_imbalance
from .result import AnalysisResult

ANALYSES = ("imbalance", "domain", "correlation", "coactivation")


def parse_what(what: str | Sequence[str] | None) -> list[str]:
    if what is None:
        return list(ANALYSES)
    items = [w.strip() for w in (what.split(",") if isinstance(what, str) else what) if w.strip()]
    bad = [w for w in items if w not in ANALYSES]
    if bad or not items:
        raise TracekitError(f"unknown analysis {', '.join(bad) or '(none)'}; choose from {', '.join(ANALYSES)}")
    return items


def analyze(
    runs: str | os.PathLike | Iterable | duckdb.DuckDBPyConnection,
    *,
    what: str | Sequence[str] | None = None,
    by: str = "domain",
    layer: int | None = None,
    window: int | None = None,
    top_n: int | None = None,
    seed: int = 0,
) -> dict[str, AnalysisResult]:
    """Run the chosen analyses (default all) and return {name: AnalysisResult}.

    ``by``: domain, phase or dataset (how imbalance, domain and correlation results are grouped);
    ``layer``: restrict co-activation and inter-layer affinity to one MoE layer (default: every layer);
    ``window``: requests per window for hot-set stability; ``top_n``: experts compared in the overlap metric.
    """
    if by not in GROUP_KEYS:
        raise TracekitError(f"--by {by!r} unknown; use one of {', '.join(GROUP_KEYS)}")
    names = parse_what(what)
    own = not isinstance(runs, duckdb.DuckDBPyConnection)
    con = connect(runs) if own else runs
    try:
        if sql_file(con, "manifest_geometry").num_rows == 0:
            return {"imbalance": _loads_imbalance(con, names, what, by, window)}
        geo = geometry(con)
        out: dict[str, AnalysisResult] = {}
        rc = request_counts(con, geo) if set(names) - {"coactivation"} else None
        for name in names:
            if name == "imbalance":
                out[name] = analyze_imbalance(rc, by=by, window=window)
            elif name == "domain":
                out[name] = analyze_domain(rc, by=by, seed=seed)
            elif name == "correlation":
                out[name] = analyze_correlation(rc, by=by, top_n=top_n, seed=seed)
            else:
                out[name] = analyze_coactivation(con, layer=layer, geo=geo)
        return out
    finally:
        if own:
            con.close()


def _loads_imbalance(con: duckdb.DuckDBPyConnection, names: list[str], what, by: str, window: int | None) -> AnalysisResult:
    """Count-only runs (engine statistics) support the load analysis alone."""
    runs = sql_file(con, "manifest_geometry_loads").to_pylist()
    if not runs:
        raise TracekitError("no routes or loads run given; collect or import one first")
    if what is not None and names != ["imbalance"]:
        others = ", ".join(n for n in names if n != "imbalance")
        raise TracekitError(f"{others}: needs per-token routes, and these runs hold aggregated counts only; use --what imbalance")
    layers = np.asarray(sorted({int(x) for r in runs for x in (r["moe_layers"] or [])}), dtype=np.int64)
    if layers.size == 0 or any(r["num_experts"] is None for r in runs):
        raise TracekitError("the loads runs' manifests lack moe_layers or num_experts; re-import them with --model")
    res = analyze_loads_imbalance(sql_file(con, "loads_by_window"), layers, max(r["num_experts"] for r in runs),
                                  max(r["top_k"] or 1 for r in runs), by=by,
                                  window=window)
    if what is None:
        res.notes.append("aggregated counts only: domain, correlation and co-activation need per-token routes")
    return res
