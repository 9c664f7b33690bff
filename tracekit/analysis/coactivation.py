"""Co-activation: experts chosen together by one token in a layer, and from one layer to the next."""
from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa

from ..errors import TracekitError
from ..query import run_sql, sql_text, stream_batches
from .data import Geometry, geometry
from .result import AnalysisResult


TOP1_NOTE = "co-activation: not applicable to top-1 routing (one expert per token)"
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


def layer_pair_counts(con: duckdb.DuckDBPyConnection, geo: Geometry, layers=None) -> dict[int, np.ndarray]:
    """(E, E) pair counts per MoE layer; all layers in one streamed pass when ``layers`` is None."""
    E = geo.num_experts
    if layers is not None:
        out = {}
        for l in layers:
            out[int(l)] = np.zeros((E, E), dtype=np.int64)
            for b in stream_batches(run_sql(con, sql_text("layer_experts"), {"layer": int(l)})):
                x = experts_matrix(b.column(0))
                if len(x):
                    out[int(l)] += pair_counts(x, E)
        return out
    lut = np.full(int(geo.layers.max()) + 1, -1, dtype=np.int64)
    lut[geo.layers] = np.arange(len(geo.layers))
    acc = np.zeros((len(geo.layers), E * E), dtype=np.int64)
    for b in stream_batches(run_sql(con, sql_text("layer_experts_all"))):
        layer = b.column(0).to_numpy()
        x = experts_matrix(b.column(1))
        li = lut[layer]
        for i in range(x.shape[1]):
            for j in range(i + 1, x.shape[1]):
                cell = (li * E + x[:, i]) * E + x[:, j]
                acc += np.bincount(cell, minlength=acc.size).reshape(acc.shape)
    m = acc.reshape(len(geo.layers), E, E)
    m = m + m.transpose(0, 2, 1)
    return {int(l): m[i] for i, l in enumerate(geo.layers)}


def layer_transition_counts(con: duckdb.DuckDBPyConnection, geo: Geometry, layer: int, next_layer: int) -> np.ndarray:
    """(E, E) counts of expert i at ``layer`` -> expert j at ``next_layer`` for the same token."""
    E = geo.num_experts
    out = np.zeros((E, E), dtype=np.int64)
    for b in stream_batches(run_sql(con, sql_text("interlayer_pairs"), {"layer": int(layer), "next_layer": int(next_layer)})):
        a, c = experts_matrix(b.column(0)), experts_matrix(b.column(1))
        if len(a):
            out += transition_counts(a, c, E)
    return out


def analyze_coactivation(con: duckdb.DuckDBPyConnection, layer: int | None = None,
                         geo: Geometry | None = None) -> AnalysisResult:
    """Pair counts for every MoE layer (or only ``layer``) and inter-layer affinity from each (or that) layer
    to the next MoE layer."""
    geo = geo or geometry(con)
    res = AnalysisResult("coactivation")
    layers = geo.layers.tolist()
    if layer is not None and layer not in layers:
        raise TracekitError(f"layer {layer} is not a MoE layer of these traces; MoE layers: {layers[0]}..{layers[-1]}")
    E, k = geo.num_experts, geo.top_k
    # top-1: a token never uses two experts of a layer, so co-activation is undefined (not zero): no pass, no rows
    pairs = layer_pair_counts(con, geo, None if layer is None else [layer]) if k > 1 else {}
    iu = np.triu_indices(E, 1)
    rows = {c: [] for c in ("layer", "expert_a", "expert_b", "count", "lift")}
    summ = {c: [] for c in ("layer", "tokens", "top_pair", "top_pair_tokens", "top_pair_share", "max_lift")}
    for l, m in pairs.items():
        loads = (m.sum(1) / max(k - 1, 1)) if k > 1 else np.zeros(E)
        tokens = int(round(m.sum() / max(k * (k - 1), 1)))
        lf = lift(m, loads, tokens, k)
        rows["layer"] += [l] * len(iu[0])
        rows["expert_a"] += iu[0].tolist()
        rows["expert_b"] += iu[1].tolist()
        rows["count"] += m[iu].tolist()
        rows["lift"] += lf[iu].tolist()
        t = int(np.argmax(m[iu]))
        summ["layer"].append(l)
        summ["tokens"].append(tokens)
        summ["top_pair"].append(f"{iu[0][t]}+{iu[1][t]}")
        summ["top_pair_tokens"].append(int(m[iu][t]))
        summ["top_pair_share"].append(float(m[iu][t] / tokens) if tokens else float("nan"))
        summ["max_lift"].append(float(np.nanmax(lf[iu])) if tokens else float("nan"))
    res.tables["pairs"] = pa.table(rows, schema=PAIRS_SCHEMA)
    if pairs:
        res.summaries["co-activation within a layer"] = pa.table(summ)
    else:
        res.notes.append(TOP1_NOTE)
    res.arrays["pairs"] = pairs

    aff_rows = {c: [] for c in ("layer", "next_layer", "expert", "next_expert", "count", "probability")}
    aff_summ = {c: [] for c in ("layer", "next_layer", "tokens", "concentration", "independent_concentration")}
    starts = [layer] if layer is not None else layers[:-1]
    trans = {}
    for l in starts:
        i = layers.index(l)
        if i + 1 >= len(layers):
            res.notes.append(f"layer {l} is the last MoE layer: no next layer for inter-layer affinity")
            continue
        nl = layers[i + 1]
        c = layer_transition_counts(con, geo, l, nl)
        trans[(l, nl)] = c
        p = conditional(c)
        aff_rows["layer"] += [l] * (E * E)
        aff_rows["next_layer"] += [nl] * (E * E)
        aff_rows["expert"] += np.repeat(np.arange(E), E).tolist()
        aff_rows["next_expert"] += np.tile(np.arange(E), E).tolist()
        aff_rows["count"] += c.reshape(-1).tolist()
        aff_rows["probability"] += p.reshape(-1).tolist()
        w = c.sum(1)
        ok = w > 0
        marg = c.sum(0) / max(c.sum(), 1)
        aff_summ["layer"].append(l)
        aff_summ["next_layer"].append(nl)
        aff_summ["tokens"].append(int(c.sum() // max(k * k, 1)))
        aff_summ["concentration"].append(float((np.nanmax(p[ok], axis=1) * w[ok]).sum() / w[ok].sum()) if ok.any() else float("nan"))
        aff_summ["independent_concentration"].append(float(marg.max()))
    res.tables["affinity"] = pa.table(aff_rows) if aff_rows["layer"] else pa.table(
        {c: pa.array([], pa.float64() if c == "probability" else pa.int64()) for c in aff_rows})
    res.summaries["inter-layer affinity: weighted mean of max P(next expert | expert)"] = pa.table(aff_summ)
    res.arrays["transitions"] = trans
    return res
