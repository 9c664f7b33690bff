"""Co-activation: experts chosen together by one token in a layer, and from one layer to the next."""
from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa

from ..errors import TracekitError
from ..query import registered_files, run_sql, sql_text, stream_batches
from .data import Geometry, geometry
from .result import AnalysisResult


TOP1_NOTE = ("co-activation within a layer: not applicable to top-1 routing (one expert per token), so it is "
             "undefined; inter-layer affinity is still shown")
PAIRS_SCHEMA = pa.schema([("layer", pa.int64()), ("expert_a", pa.int64()), ("expert_b", pa.int64()),
                          ("count", pa.int64()), ("lift", pa.float64())])


def experts_matrix(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """An Arrow list column of expert ids, all of length k -> (N, k) int64 array (no Python loop)."""
    if isinstance(col, pa.ChunkedArray):
        parts = [experts_matrix(c) for c in col.chunks]
        return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.int64)
    n = len(col)
    if n == 0:
        return np.zeros((0, 0), dtype=np.int64)
    offsets = col.offsets.to_numpy()
    lens = np.diff(offsets)
    if lens.min() != lens.max():
        raise TracekitError("expert lists of different lengths in one layer; co-activation needs a fixed top-k")
    values = col.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    return values.reshape(n, int(lens[0]))


def pair_counts(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """Co-activation counts within a layer.

    experts: (N, k) distinct expert ids per token. Returns (E, E) symmetric int64 counts: [a, b] = tokens that
    chose both a and b (a != b); the diagonal is 0.
    """
    E = num_experts
    N, k = experts.shape
    out = np.zeros(E * E, dtype=np.int64)
    for i in range(k):
        for j in range(i + 1, k):
            out += np.bincount(experts[:, i] * E + experts[:, j], minlength=E * E)
    m = out.reshape(E, E)
    return m + m.T


def transition_counts(experts_a: np.ndarray, experts_b: np.ndarray, num_experts: int) -> np.ndarray:
    """Inter-layer counts for the same tokens: experts_a (N, k) at layer l, experts_b (N, k) at layer l+1.

    Returns (E, E) int64: [i, j] = tokens with expert i at layer l and expert j at layer l+1.
    """
    E = num_experts
    out = np.zeros(E * E, dtype=np.int64)
    for i in range(experts_a.shape[1]):
        for j in range(experts_b.shape[1]):
            out += np.bincount(experts_a[:, i] * E + experts_b[:, j], minlength=E * E)
    return out.reshape(E, E)


def conditional(counts: np.ndarray) -> np.ndarray:
    """(E, E) transition counts -> P(j at l+1 | i at l), rows summing to 1 (NaN rows for unused i)."""
    c = counts.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return c / c.sum(1, keepdims=True)


def lift(pairs: np.ndarray, loads: np.ndarray, tokens: int, top_k: int) -> np.ndarray:
    """Observed / expected pair counts, expected = tokens * C(k,2) * 2 * s_a * s_b / (1 - sum s^2) with s the load
    shares (pairs drawn independently in proportion to load, no repeats); (E, E) -> (E, E)."""
    s = loads / max(loads.sum(), 1)
    pairs_per_token = top_k * (top_k - 1) / 2
    norm = max(1.0 - float((s * s).sum()), 1e-12)
    expected = tokens * pairs_per_token * 2 * np.outer(s, s) / norm
    np.fill_diagonal(expected, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        return pairs / expected


def _layer_lut(layers: np.ndarray) -> np.ndarray:
    lut = np.full(int(layers.max()) + 1, -1, dtype=np.int64)
    lut[layers] = np.arange(len(layers))
    return lut


def layer_pair_counts(con: duckdb.DuckDBPyConnection, geo: Geometry, layers=None) -> dict[int, np.ndarray]:
    """(E, E) pair counts per MoE layer (or per layer of ``layers``), in one streamed pass: every record batch adds
    all its C(k, 2) pairs with one bincount; memory is the (L, E, E) counts plus one record batch."""
    E = geo.num_experts
    want = geo.layers if layers is None else np.asarray(sorted(int(l) for l in layers))
    lut = _layer_lut(want)
    acc = np.zeros(len(want) * E * E, dtype=np.int64)
    params = {"layer": int(want[0]) if layers is not None and len(want) == 1 else None}
    for b in stream_batches(run_sql(con, sql_text("layer_experts_all"), params), 1 << 18):
        layer = b.column(0).to_numpy().astype(np.int64)
        x = experts_matrix(b.column(1))
        if x.shape[1] < 2:
            continue
        li = np.where(layer < len(lut), lut[np.minimum(layer, len(lut) - 1)], -1)
        ok = li >= 0
        i, j = np.triu_indices(x.shape[1], 1)
        cells = (li[ok, None] * E + x[ok][:, i]) * E + x[ok][:, j]
        acc += np.bincount(cells.reshape(-1), minlength=acc.size)
    m = acc.reshape(len(want), E, E)
    m = m + m.transpose(0, 2, 1)
    return {int(l): m[i] for i, l in enumerate(want)}


def transition_counts_all(con: duckdb.DuckDBPyConnection, geo: Geometry, slices, starts: list[int]) -> np.ndarray:
    """Inter-layer counts for the MoE layers ``starts`` and each one's next MoE layer, in one query per batch of
    whole requests (``slices``, see :mod:`.stream`) for all layer pairs at once. Returns (P, E, E) int64:
    [p, i, j] = tokens with expert i at ``starts[p]`` and expert j at the next MoE layer."""
    E = geo.num_experts
    layers = geo.layers.tolist()
    nxt = pa.table({"layer": pa.array(starts, pa.int16()),
                    "next_layer": pa.array([layers[layers.index(l) + 1] for l in starts], pa.int16())})
    lut = _layer_lut(np.asarray(starts))
    acc = np.zeros(len(starts) * E * E, dtype=np.int64)
    if not starts:
        return acc.reshape(0, E, E)
    con.register("_tracekit_next_layer", nxt)
    try:
        for sl in slices:
            params = {"lo": int(sl.request_ids[0]), "hi": int(sl.request_ids[-1])}
            with registered_files(con, sl.files):
                for b in stream_batches(run_sql(con, sql_text("interlayer_all"), params), 1 << 16):
                    li = lut[b.column(0).to_numpy().astype(np.int64)]
                    a, c = experts_matrix(b.column(1)), experts_matrix(b.column(2))
                    if len(a):
                        cells = (li[:, None, None] * E + a[:, :, None]) * E + c[:, None, :]
                        acc += np.bincount(cells.reshape(-1), minlength=acc.size)
    finally:
        con.unregister("_tracekit_next_layer")
    return acc.reshape(len(starts), E, E)


def analyze_coactivation(con: duckdb.DuckDBPyConnection, layer: int | None = None, geo: Geometry | None = None,
                         slices=None) -> AnalysisResult:
    """Pair counts for every MoE layer (or only ``layer``) and inter-layer affinity from each (or that) layer
    to the next MoE layer. ``slices``: batches of whole requests for the affinity join (default: planned here
    with the default memory budget). Top-1 routing has no pairs: co-activation within a layer is undefined and
    said so; the inter-layer affinity is still computed."""
    geo = geo or geometry(con)
    if slices is None:
        from .budget import MemoryBudget
        from .stream import plan_slices, request_index, rows_per_slice

        index = request_index(con)
        slices = plan_slices(con, index, len(index), rows_per_slice(geo, MemoryBudget.of(None)))
    res = AnalysisResult("coactivation")
    layers = geo.layers.tolist()
    if layer is not None and layer not in layers:
        raise TracekitError(f"layer {layer} is not a MoE layer of these traces; MoE layers: {layers[0]}..{layers[-1]}")
    E, k = geo.num_experts, geo.top_k
    want = layers if layer is None else [layer]
    iu = np.triu_indices(E, 1)
    P = len(iu[0])
    if k < 2:
        # top-1: a token never uses two experts of a layer, so co-activation is undefined (not zero): no pairs
        res.notes.append(TOP1_NOTE)
        pairs = {}
        res.tables["pairs"] = PAIRS_SCHEMA.empty_table()
    else:
        pairs = layer_pair_counts(con, geo, None if layer is None else [layer])
        stack = np.stack([pairs[l] for l in want])  # (L', E, E)
        tokens = np.rint(stack.sum(axis=(1, 2)) / (k * (k - 1))).astype(np.int64)
        lifts = np.stack([lift(m, m.sum(1) / (k - 1), int(t), k) for m, t in zip(stack, tokens)])
        counts_u, lift_u = stack[:, iu[0], iu[1]], lifts[:, iu[0], iu[1]]  # (L', P)
        res.tables["pairs"] = pa.table({
            "layer": np.repeat(np.asarray(want, dtype=np.int64), P),
            "expert_a": np.tile(iu[0], len(want)), "expert_b": np.tile(iu[1], len(want)),
            "count": counts_u.reshape(-1), "lift": lift_u.reshape(-1)})
        top = np.argmax(counts_u, axis=1)
        top_n = counts_u[np.arange(len(want)), top]
        with np.errstate(invalid="ignore", divide="ignore"):
            res.summaries["co-activation within a layer"] = pa.table({
                "layer": want, "tokens": tokens,
                "top_pair": [f"{iu[0][t]}+{iu[1][t]}" for t in top],
                "top_pair_tokens": top_n,
                "top_pair_share": np.where(tokens > 0, top_n / np.maximum(tokens, 1), np.nan),
                "max_lift": [float(np.nanmax(r)) if t and np.isfinite(r).any() else float("nan")
                             for r, t in zip(lift_u, tokens)]})
    res.arrays["pairs"] = pairs

    starts = [l for l in want if layers.index(l) + 1 < len(layers)]
    if layer is not None and not starts:
        res.notes.append(f"layer {layer} is the last MoE layer: no next layer for inter-layer affinity")
    c = transition_counts_all(con, geo, slices, starts)  # (P', E, E)
    nexts = [layers[layers.index(l) + 1] for l in starts]
    p = conditional(c.reshape(-1, E)).reshape(c.shape) if len(starts) else c.astype(np.float64)
    S = len(starts)
    res.tables["affinity"] = pa.table({
        "layer": np.repeat(np.asarray(starts, dtype=np.int64), E * E),
        "next_layer": np.repeat(np.asarray(nexts, dtype=np.int64), E * E),
        "expert": np.tile(np.repeat(np.arange(E), E), S), "next_expert": np.tile(np.arange(E), S * E),
        "count": c.reshape(-1), "probability": p.reshape(-1)})
    w = c.sum(2)  # (S, E) tokens with expert i at the layer (times k)
    conc = []
    for s in range(S):
        ok = w[s] > 0
        conc.append(float((np.nanmax(p[s][ok], axis=1) * w[s][ok]).sum() / w[s][ok].sum()) if ok.any() else float("nan"))
    marg = c.sum(1) / np.maximum(c.sum(axis=(1, 2)), 1)[:, None] if S else np.zeros((0, E))
    res.summaries["inter-layer affinity: weighted mean of max P(next expert | expert)"] = pa.table({
        "layer": pa.array(starts, pa.int64()), "next_layer": pa.array(nexts, pa.int64()),
        "tokens": pa.array((c.sum(axis=(1, 2)) // max(k * k, 1)).tolist(), pa.int64()),
        "concentration": pa.array(conc, pa.float64()),
        "independent_concentration": pa.array(marg.max(1).tolist() if S else [], pa.float64())})
    res.arrays["transitions"] = {(l, nl): c[i] for i, (l, nl) in enumerate(zip(starts, nexts))}
    return res
