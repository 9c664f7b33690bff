"""The aggregates analyses start from, pulled out of the DuckDB views by the SQL in ``tracekit/sql``."""
from __future__ import annotations

from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow as pa

from ..errors import TracekitError
from ..query import run_sql, sql_file, sql_text, stream_batches

PHASES = ("prefill", "decode")
GROUP_KEYS = ("domain", "phase", "dataset")


@dataclass
class Geometry:
    layers: np.ndarray  # (L,) absolute indices of the MoE layers present
    num_experts: int
    top_k: int


@dataclass
class RequestCounts:
    """Dense per-request expert counts.

    requests: table with one row per request (run_id, request_id, prompt_id, dataset, domain, prompt_tokens,
    generated_tokens), row r <-> index r of ``counts``.
    counts: (R, 2, L, E) int32, tokens of request r in phase p (0 prefill, 1 decode) choosing expert e at MoE
    layer ``layers[l]``.
    """

    requests: pa.Table
    layers: np.ndarray
    num_experts: int
    top_k: int
    counts: np.ndarray

    def labels(self, key: str) -> np.ndarray:
        """(R,) request label for ``key`` in domain/dataset."""
        if key not in ("domain", "dataset"):
            raise TracekitError(f"cannot label requests by {key!r}; use domain or dataset")
        return np.asarray(self.requests[key].to_pylist(), dtype=object)


def geometry(con: duckdb.DuckDBPyConnection) -> Geometry:
    """MoE layers, E and k of the traces: from the manifests when they agree, else from the rows."""
    g = sql_file(con, "manifest_geometry").to_pylist()
    if not g:
        raise TracekitError("no routes run given: analyses need per-token routes (kind 'routes')")
    layers = sorted({int(x) for r in g for x in (r["moe_layers"] or [])})
    es = {r["num_experts"] for r in g}
    ks = {r["top_k"] for r in g}
    if not layers or None in es or None in ks:
        b = sql_file(con, "geometry_bounds").to_pylist()[0]
        if b["num_layers"] is None:
            raise TracekitError("the runs hold no routes rows yet")
        layers = [int(x) for x in sql_file(con, "layers_present")["layer"].to_pylist()]
        return Geometry(np.asarray(layers), int(b["num_experts"]), int(b["top_k"]))
    if len(ks) > 1:
        raise TracekitError(f"runs with different top-k ({sorted(ks)}) cannot be analysed together; analyse them separately")
    return Geometry(np.asarray(layers), int(max(es)), int(ks.pop()))


def request_counts(con: duckdb.DuckDBPyConnection, geo: Geometry | None = None) -> RequestCounts:
    """Build :class:`RequestCounts` with one aggregate query, streamed into a dense array."""
    geo = geo or geometry(con)
    reqs = sql_file(con, "request_index")
    R = reqs.num_rows
    if R == 0:
        raise TracekitError("the runs hold no routes rows yet")
    Lmax = int(geo.layers.max()) + 1
    E = geo.num_experts
    index = pa.table({"run_id": reqs["run_id"], "request_id": reqs["request_id"],
                      "r": pa.array(np.arange(R, dtype=np.int64))})
    con.register("_tracekit_requests", index)
    try:
        dense = np.zeros(R * 2 * Lmax * E, dtype=np.int32)
        rel = run_sql(con, sql_text("request_expert_counts"), {"L": Lmax, "E": E})
        for batch in stream_batches(rel):
            add_cells(dense, batch.column(0).to_numpy(), batch.column(1))
    finally:
        con.unregister("_tracekit_requests")
    counts = dense.reshape(R, 2, Lmax, E)[:, :, geo.layers, :]
    return RequestCounts(reqs, geo.layers, E, geo.top_k, np.ascontiguousarray(counts))


def add_cells(dense: np.ndarray, base: np.ndarray, experts: pa.ListArray) -> None:
    """dense[base[i] + e] += 1 for every expert e in row i's list. base: (N,) int64; experts: N lists.

    Counts with a bincount over the batch's own cell range (rows arrive grouped by request, so the range is small).
    """
    offsets = experts.offsets.to_numpy()
    cells = np.repeat(base, np.diff(offsets)) + experts.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    if cells.size == 0:
        return
    lo, hi = int(cells.min()), int(cells.max())
    dense[lo:hi + 1] += np.bincount(cells - lo, minlength=hi - lo + 1).astype(dense.dtype, copy=False)


def group_loads(rc: RequestCounts, by: str) -> tuple[list[str], np.ndarray]:
    """Sum request counts into groups: by 'phase' (prefill, decode) or a request label (domain, dataset).

    Returns (group names, (G, L, E) int64 loads); groups with no tokens are dropped.
    """
    if by == "phase":
        names, loads = list(PHASES), rc.counts.sum(axis=0, dtype=np.int64)
    else:
        lab = rc.labels(by)
        names = sorted(set(lab))
        loads = np.stack([rc.counts[lab == n].sum(axis=(0, 1), dtype=np.int64) for n in names])
    keep = loads.sum(axis=(1, 2)) > 0
    return [n for n, k in zip(names, keep) if k], loads[keep]
