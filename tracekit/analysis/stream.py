"""Per-request expert counts in batches whose size the memory budget sets, independent of the run's size.

Every chunk file holds whole requests (the store writes a request's rows into one chunk; its footer lists them),
so a batch is a few chunk files and a range of their request ids: one streamed query
(``tracekit/sql/request_batch_rows.sql``) counted into a dense array with numpy. Chunks that share a request (an
importer that split one) are read together. When the requests of a chunk do not fit the budget, the chunk is
read once per request range (row-group statistics on ``request_id`` keep that cheap).

Global request numbers ``r`` follow :data:`RequestIndex` (ordered by run and request id); batches come in
increasing ``r`` of their first request, so consecutive windows of requests close early.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import duckdb
import numpy as np
import pyarrow as pa

from ..errors import TracekitError
from ..query import registered_files, run_sql, sql_file, sql_text, stream_batches
from ..store import list_chunks
from .budget import MemoryBudget
from .data import Geometry

ROWS_PER_RECORD_BATCH = 1 << 15  # small batches: the cell range a bincount touches stays in cache (2.7x, measured)
_BINCOUNT_SPAN = 1 << 23  # widest cell range counted with one bincount; wider batches are sorted instead


@dataclass
class RequestIndex:
    """One row per request: ``table`` (run_id, request_id, prompt_id, dataset, domain, prompt_tokens,
    generated_tokens, prefill_rows, decode_rows), row r <-> global request number r."""

    table: pa.Table

    def __post_init__(self) -> None:
        self.run_ids = np.asarray(self.table["run_id"].to_pylist(), dtype=object)
        self.request_ids = self.table["request_id"].to_numpy().astype(np.int64)
        self.prefill_rows = self.table["prefill_rows"].to_numpy().astype(np.int64)
        self.decode_rows = self.table["decode_rows"].to_numpy().astype(np.int64)
        runs, starts = np.unique(self.run_ids, return_index=True) if len(self.run_ids) else ([], [])
        ends = list(starts[1:]) + [len(self.run_ids)] if len(starts) else []
        self.run_range = {str(r): (int(s), int(e)) for r, s, e in zip(runs, starts, ends)}

    def __len__(self) -> int:
        return self.table.num_rows

    def labels(self, key: str) -> np.ndarray:
        """(R,) request label for ``key`` in domain/dataset."""
        if key not in ("domain", "dataset"):
            raise TracekitError(f"cannot label requests by {key!r}; use domain or dataset")
        return np.asarray(self.table[key].to_pylist(), dtype=object)

    def lookup(self, run_id: str, request_ids: np.ndarray) -> np.ndarray:
        """Global numbers of ``request_ids`` of run ``run_id`` (-1 for ids without rows)."""
        lo, hi = self.run_range.get(run_id, (0, 0))
        ids = self.request_ids[lo:hi]
        pos = np.searchsorted(ids, request_ids)
        ok = (pos < len(ids)) & (ids[np.minimum(pos, max(len(ids) - 1, 0))] == request_ids) if len(ids) else \
            np.zeros(len(request_ids), dtype=bool)
        return np.where(ok, pos + lo, -1)


def request_index(con: duckdb.DuckDBPyConnection) -> RequestIndex:
    idx = RequestIndex(sql_file(con, "request_index"))
    if len(idx) == 0:
        raise TracekitError("the runs hold no routes rows yet")
    return idx


@dataclass
class Slice:
    """Requests of one run read together: ``files`` hold them whole; ``index`` (n,) their global numbers (sorted),
    ``request_ids`` (n,) their ids."""

    run_id: str
    files: list[str]
    request_ids: np.ndarray
    index: np.ndarray


@dataclass
class RequestBatch:
    """Expert counts of the requests ``index`` (n,): ``counts`` (L, 2, n, E), layer-major (phase 0 prefill,
    1 decode), uint16 or int32."""

    index: np.ndarray
    counts: np.ndarray


def count_dtype(max_rows: int) -> np.dtype:
    """A cell counts tokens of one request, phase and layer: at most the request's rows in that phase."""
    return np.dtype(np.uint16) if max_rows < (1 << 16) else np.dtype(np.int32)


def requests_per_batch(geo: Geometry, budget: MemoryBudget, itemsize: int, share: float = 0.5) -> int:
    """Requests whose dense counts fit ``share`` of the budget's array memory (at least 1)."""
    per_request = 2 * len(geo.layers) * geo.num_experts * itemsize
    return max(1, int(budget.arrays * share) // per_request)


def plan_slices(con: duckdb.DuckDBPyConnection, index: RequestIndex, per_slice: int) -> list[Slice]:
    """Split every routes run into slices of at most ``per_slice`` requests held whole by their files."""
    out: list[Slice] = []
    for run in sql_file(con, "routes_runs").to_pylist():
        chunks = [c for c in list_chunks(run["path"], "routes", only=run["chunks"]) if c.rows]
        if not chunks:
            continue
        for files, ids in _chunk_groups(chunks, index, run["run_id"]):
            r = index.lookup(run["run_id"], ids)
            keep = r >= 0
            ids, r = ids[keep], r[keep]
            for s in range(0, len(ids), per_slice):
                out.append(Slice(run["run_id"], files, ids[s:s + per_slice], r[s:s + per_slice]))
    out.sort(key=lambda s: int(s.index[0]) if len(s.index) else -1)
    return [s for s in out if len(s.index)]


def _chunk_groups(chunks, index: RequestIndex, run_id: str) -> list[tuple[list[str], np.ndarray]]:
    """Chunks grouped so that no request spans two groups: [(files, sorted request ids)]."""
    if any(not c.requests for c in chunks):  # a footer without its request list: read the run as one group
        lo, hi = index.run_range.get(run_id, (0, 0))
        return [([str(c.path) for c in chunks], index.request_ids[lo:hi].copy())]
    parent = list(range(len(chunks)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[int, int] = {}
    for i, c in enumerate(chunks):
        for q in c.requests:
            j = owner.setdefault(int(q), i)
            if j != i:
                parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(chunks)):
        groups.setdefault(find(i), []).append(i)
    out = []
    for members in groups.values():
        ids = np.unique(np.concatenate([np.asarray(chunks[i].requests, dtype=np.int64) for i in members]))
        out.append(([str(chunks[i].path) for i in members], ids))
    return out


def count_slice(con: duckdb.DuckDBPyConnection, geo: Geometry, sl: Slice, dtype: np.dtype,
                only: np.ndarray | None = None, decode_only: bool = False) -> np.ndarray:
    """Dense (L, 2, n, E) counts of the slice's requests (or of ``only``, a sorted subset of its ids).

    DuckDB computes each row's cell index (tracekit/sql/request_batch_rows.sql) and numpy counts them. The
    array's memory order follows the files' row order (probed on their first rows), so that each record batch
    touches a narrow range of cells and is counted with one small bincount: layer-major for the collector's
    chunks, request-major for synthetic and imported runs; the result is a (L, 2, n, E) view either way.
    """
    ids = sl.request_ids if only is None else only
    L, E, n = len(geo.layers), geo.num_experts, len(ids)
    dense = np.zeros(L * 2 * n * E, dtype=dtype)
    with registered_files(con, sl.files):
        probe = sql_file(con, "row_order_probe").to_pylist()[0]
    layer_major = bool(probe["layers"] and probe["layers"] == 1 and (probe["requests"] or 0) > 1)
    if n:
        con.register("_tracekit_batch", pa.table({"request_id": pa.array(ids, pa.int32()),
                                                  "slot": pa.array(np.arange(n), pa.int64())}))
        con.register("_tracekit_layers", pa.table({"layer": pa.array(geo.layers, pa.int16()),
                                                   "li": pa.array(np.arange(L), pa.int64())}))
        try:
            params = {"lo": int(ids[0]), "hi": int(ids[-1]), "decode_only": bool(decode_only),
                      "layer_major": layer_major, "n": n, "L": L, "E": E}
            with registered_files(con, sl.files):
                for b in stream_batches(run_sql(con, sql_text("request_batch_rows"), params), ROWS_PER_RECORD_BATCH):
                    add_rows(dense, b.column(0).to_numpy(), b.column(1), E)
        finally:
            con.unregister("_tracekit_batch")
            con.unregister("_tracekit_layers")
    if layer_major:
        return dense.reshape(L, 2, n, E)
    return dense.reshape(n, 2, L, E).transpose(2, 1, 0, 3)


def add_rows(dense: np.ndarray, base: np.ndarray, experts: pa.Array | pa.ChunkedArray, num_experts: int) -> None:
    """dense[base[i] + e] += 1 for every expert e in row i's list (ids >= num_experts are dropped)."""
    if isinstance(experts, pa.ChunkedArray):
        experts = experts.combine_chunks()
    if len(experts) == 0:
        return
    offsets = experts.offsets.to_numpy()
    vals = experts.flatten().to_numpy(zero_copy_only=False)
    k = int(offsets[1] - offsets[0])
    if offsets[-1] - offsets[0] == k * len(experts) and vals.size == k * len(experts):  # fixed top-k: no repeat
        cells = (base.astype(np.int64)[:, None] + vals.reshape(-1, k)).reshape(-1)
        bad = vals >= num_experts
    else:
        cells = np.repeat(base.astype(np.int64), np.diff(offsets)) + vals
        bad = vals >= num_experts
    if bad.any():
        cells = cells[~bad.reshape(-1)]
    add_cells(dense, cells)


def group_sums(per_request: np.ndarray, codes: np.ndarray, groups: int) -> np.ndarray:
    """(L, n, E) per-request counts, (n,) group code of each request -> (groups, L, E) int64 sums."""
    out = np.zeros((groups, per_request.shape[0], per_request.shape[2]), dtype=np.int64)
    for g in np.unique(codes):
        out[g] = per_request[:, codes == g, :].sum(axis=1, dtype=np.int64)
    return out


def add_cells(dense: np.ndarray, cells: np.ndarray) -> None:
    """dense[c] += 1 for every c in ``cells`` (repeats add up), with memory bounded by the batch, not ``dense``."""
    if cells.size == 0:
        return
    lo, hi = int(cells.min()), int(cells.max())
    if hi - lo < max(_BINCOUNT_SPAN, 4 * cells.size):
        part = dense[lo:hi + 1]
        np.add(part, np.bincount(cells - lo, minlength=hi - lo + 1), out=part, casting="unsafe")
    else:
        u, c = np.unique(cells, return_counts=True)
        dense[u] += c.astype(dense.dtype, copy=False)


def iter_batches(con: duckdb.DuckDBPyConnection, geo: Geometry, index: RequestIndex,
                 budget: MemoryBudget) -> Iterator[RequestBatch]:
    """Every request's counts, batch by batch (see the module docstring)."""
    dtype = count_dtype(int(max(index.prefill_rows.max(initial=0), index.decode_rows.max(initial=0))))
    for sl in plan_slices(con, index, requests_per_batch(geo, budget, dtype.itemsize)):
        yield RequestBatch(sl.index, count_slice(con, geo, sl, dtype))
