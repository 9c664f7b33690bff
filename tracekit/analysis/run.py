"""Run the analyses over a set of runs: the library side of ``tracekit analyze``."""
from __future__ import annotations

import os
from typing import Iterable, Sequence

import duckdb
import numpy as np

from ..errors import TracekitError
from ..query import connect, sql_file
from .budget import MemoryBudget
from .coactivation import CoactivationAccumulator
from .correlation import POOL_SHARE, CorrelationAccumulator
from .data import GROUP_KEYS, Geometry, geometry
from .domain import DomainAccumulator, classifier_sample
from .imbalance import ImbalanceAccumulator, analyze_loads_imbalance
from .result import AnalysisResult
from .scan import SliceReader
from .stream import RequestIndex, plan_slices, request_index, rows_per_slice

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
    memory_budget: MemoryBudget | str | int | None = None,
) -> dict[str, AnalysisResult]:
    """Run the chosen analyses (default all) and return {name: AnalysisResult}.

    ``by``: domain, phase or dataset (how imbalance, domain and correlation results are grouped);
    ``layer``: restrict co-activation and inter-layer affinity to one MoE layer (default: every layer);
    ``window``: requests per window for hot-set stability; ``top_n``: experts compared in the overlap metric;
    ``memory_budget``: working memory of the analyses ("2GB" by default; DuckDB gets part of it as its
    ``memory_limit`` when this function opens the runs), whatever the number of requests and rows.
    """
    if by not in GROUP_KEYS:
        raise TracekitError(f"--by {by!r} unknown; use one of {', '.join(GROUP_KEYS)}")
    if window is not None and window < 1:
        raise TracekitError(f"--window {window}: give at least 1 request per window")
    names = parse_what(what)
    budget = MemoryBudget.of(memory_budget)
    from threadpoolctl import threadpool_limits

    # BLAS in one thread: the analyses' matrix products (the classifier) are small, and OpenBLAS threads made a
    # (4 x 2000) @ (2000 x 256) product 50x slower on a loaded 2-core machine (measured)
    with threadpool_limits(limits=1, user_api="blas"):
        return _analyze(runs, names, what, by, layer, window, top_n, seed, budget)


def _analyze(runs, names, what, by, layer, window, top_n, seed, budget) -> dict[str, AnalysisResult]:
    own = not isinstance(runs, duckdb.DuckDBPyConnection)
    con = connect(runs, memory_limit=budget.duckdb_limit) if own else runs
    try:
        if sql_file(con, "manifest_geometry").num_rows == 0:
            return {"imbalance": _loads_imbalance(con, names, what, by, window)}
        geo = geometry(con)
        index = request_index(con)
        slices = plan_slices(con, index, len(index), rows_per_slice(geo, budget, BATCH_SHARE))
        out = analyze_requests(con, geo, index, slices, names, by=by, window=window, top_n=top_n, seed=seed,
                               budget=budget, layer=layer)
        return {n: out[n] for n in names}
    finally:
        if own:
            con.close()


BATCH_SHARE = 0.55  # of the budget's array memory: one slice being read and counted (and the next, read ahead)
CLASSIFIER_SHARE = 0.25  # the classifier's sampled routing signatures


def analyze_requests(con, geo: Geometry, index: RequestIndex, slices: list, names: list[str], *,
                     by: str, window: int | None, top_n: int | None, seed: int,
                     budget: MemoryBudget, layer: int | None = None) -> dict[str, AnalysisResult]:
    """Imbalance, domain, correlation and co-activation in one pass over the request slices, each read as sparse
    per-request histograms (and its rows, for co-activation), plus the correlation's pass over its partners'
    decode rows."""
    if not names:
        return {}
    R, L, E = len(index), len(geo.layers), geo.num_experts
    labels = None if by == "phase" else index.labels(by)
    accs: dict = {}
    with SliceReader(geo, memory_limit=budget.duckdb_limit, threads=duckdb_threads(con),
                     positions="coactivation" in names, histograms=names != ["coactivation"]) as reader:
        for name in names:
            if name == "coactivation":
                accs[name] = CoactivationAccumulator(geo, layer)
            if name == "imbalance":
                accs[name] = ImbalanceAccumulator(labels if labels is not None else np.zeros(R, dtype=object), by,
                                                  geo.layers, E, geo.top_k, window or max(1, R // 10))
            elif name == "domain":
                per = 2 if by == "phase" else 1
                sample = classifier_sample(R, L * E, int(budget.arrays * CLASSIFIER_SHARE), per, seed)
                accs[name] = DomainAccumulator(labels, by, geo.layers, E, sample, R, seed)
            elif name == "correlation":
                cap = CorrelationAccumulator.pool_capacity(budget.arrays * POOL_SHARE, index, L, geo.top_k)
                acc = CorrelationAccumulator(index, labels, by, geo.layers, E, geo.top_k, top_n, cap, seed)
                acc.fill_pool(slices, reader, rows_per_slice(geo, budget, BATCH_SHARE))
                accs[name] = acc
        from ..progress import current, numba_note

        bar = current()
        numba_note()
        bar.total(float(sum(len(sl.request_ids) for sl in slices)))
        first = True
        for batch in reader.each(slices):
            for acc in accs.values():
                acc.add(batch)
            if first:
                bar.describe("analysing requests")
                first = False
            bar.advance(batch.n)
    out = {name: acc.result() for name, acc in accs.items()}
    encoder = int(index.table["rows"].to_numpy().sum() - index.prefill_rows.sum() - index.decode_rows.sum()) \
        if "rows" in index.table.column_names else 0
    for res in out.values():
        if encoder > 0:
            res.notes.append(f"{encoder:,} encoder rows left out (an encoder-decoder's encoder layers carry their "
                             "own layer numbers and experts; the analyses cover the decoder)")
    return out


def duckdb_threads(con: duckdb.DuckDBPyConnection) -> int | None:
    """The thread count the user's connection was opened with (the analyses' reader uses the same)."""
    try:
        return int(con.sql("SELECT current_setting('threads')").fetchall()[0][0])
    except (duckdb.Error, TypeError, ValueError):
        return None


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
