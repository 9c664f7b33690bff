"""Run the analyses over a set of runs: the library side of ``tracekit analyze``."""
from __future__ import annotations

import os
from typing import Iterable, Sequence

import duckdb

from ..errors import TracekitError
from ..query import connect
from .coactivation import analyze_coactivation
from .correlation import analyze_correlation
from .data import GROUP_KEYS, geometry, request_counts
from .domain import analyze_domain
from .imbalance import analyze_imbalance
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
