"""Requests in slices whose size the memory budget sets, independent of the run's size.

Every chunk file holds whole requests (the store writes a request's rows into one chunk; its footer lists them),
so a slice is a few chunk files and a range of their request ids, read by :mod:`.scan` as sparse per-request
histograms. Chunks that share a request (an importer that split one) are read together. When the requests of a
chunk do not fit the budget, the chunk is read once per request range (row-group statistics on ``request_id``
keep that cheap).

Global request numbers ``r`` follow :data:`RequestIndex` (ordered by run and request id); batches come in
increasing ``r`` of their first request, so consecutive windows of requests close early.
"""
from __future__ import annotations

from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow as pa

from ..errors import TracekitError
from ..query import sql_file
from ..store import list_chunks
from .budget import MemoryBudget
from .data import Geometry


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


def rows_per_slice(geo: Geometry, budget: MemoryBudget, share: float = 0.5) -> int:
    """Token-layer rows whose arrays fit ``share`` of the budget's array memory while a slice is read and counted
    (:mod:`.scan`): the Arrow rows of this slice and of the next (read ahead), the row order and keys, and the
    sparse histograms (one int32 id and two counts per choice, twice: counted, then compacted), about 64 + 28 * k
    bytes a row (at least 1 row)."""
    return max(1, int(budget.arrays * share) // (64 + 28 * geo.top_k))


def plan_slices(con: duckdb.DuckDBPyConnection, index: RequestIndex, per_slice: int,
                max_rows: int | None = None) -> list[Slice]:
    """Split every routes run into slices of at most ``per_slice`` requests held whole by their files, and of at
    most ``max_rows`` token-layer rows (a single larger request gets a slice of its own)."""
    out: list[Slice] = []
    for run in sql_file(con, "routes_runs").to_pylist():
        chunks = [c for c in list_chunks(run["path"], "routes", only=run["chunks"]) if c.rows]
        if not chunks:
            continue
        for files, ids in _chunk_groups(chunks, index, run["run_id"]):
            r = index.lookup(run["run_id"], ids)
            keep = r >= 0
            ids, r = ids[keep], r[keep]
            for a, b in _split(index.prefill_rows[r] + index.decode_rows[r], per_slice, max_rows):
                out.append(Slice(run["run_id"], files, ids[a:b], r[a:b]))
    out.sort(key=lambda s: int(s.index[0]) if len(s.index) else -1)
    return [s for s in out if len(s.index)]


def _split(rows: np.ndarray, per_slice: int, max_rows: int | None) -> list[tuple[int, int]]:
    """[start, end) ranges over requests with ``rows`` (n,) each: at most ``per_slice`` requests and ``max_rows``
    rows per range, at least one request."""
    out, a, n = [], 0, len(rows)
    cum = np.concatenate([[0], np.cumsum(rows)])
    while a < n:
        b = min(n, a + per_slice)
        if max_rows is not None:
            b = max(a + 1, min(b, int(np.searchsorted(cum, cum[a] + max_rows, side="right")) - 1))
        out.append((a, b))
        a = b
    return out


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


