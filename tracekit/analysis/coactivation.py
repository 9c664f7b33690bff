"""Co-activation: experts chosen together by one token in a layer, and from one layer to the next."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from ..errors import TracekitError
from . import kernels
from .data import Geometry
from .result import AnalysisResult


TOP1_NOTE = ("co-activation within a layer: not applicable to top-1 routing (one expert per token), so it is "
             "undefined; inter-layer affinity is still shown")
PAIRS_SCHEMA = pa.schema([("layer", pa.int64()), ("expert_a", pa.int64()), ("expert_b", pa.int64()),
                          ("count", pa.int64()), ("lift", pa.float64())])


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


class CoactivationAccumulator:
    """Pair counts per MoE layer (or only ``layer``) and transition counts from each (or that) layer to the next
    MoE layer, from request batches read with positions (:class:`.scan.SliceReader` ``positions=True``).
    Memory: two (layers, E, E) int64 arrays, whatever the run's size."""

    def __init__(self, geo: Geometry, layer: int | None = None):
        layers = geo.layers.tolist()
        if layer is not None and layer not in layers:
            raise TracekitError(f"layer {layer} is not a MoE layer of these traces; MoE layers: {layers[0]}..{layers[-1]}")
        self.geo, self.layer = geo, layer
        E, L = geo.num_experts, len(layers)
        self.want = layers if layer is None else [layer]
        self.starts = [l for l in self.want if layers.index(l) + 1 < L]
        self.pair_of = np.full(L, -1, dtype=np.int64)
        if geo.top_k >= 2:
            for i, l in enumerate(self.want):
                self.pair_of[layers.index(l)] = i
        self.next_of = np.full(L, -1, dtype=np.int64)
        for i, l in enumerate(self.starts):
            self.next_of[layers.index(l)] = i
        self.pairs = np.zeros((len(self.want) if geo.top_k >= 2 else 0, E, E), dtype=np.int64)
        self.trans = np.zeros((len(self.starts), E, E), dtype=np.int64)

    def add(self, batch) -> None:
        r = batch.rows
        if r is None:
            raise TracekitError("internal: co-activation needs batches read with token positions")
        kernels.coactivation_counts(r.li, r.offsets, r.values, r.token, self.geo.num_experts, self.pair_of,
                                    self.next_of, self.pairs, self.trans)

    def result(self) -> AnalysisResult:
        pairs = self.pairs + self.pairs.transpose(0, 2, 1)
        return coactivation_result(self.geo, self.layer, {int(l): pairs[i] for i, l in enumerate(self.want)}
                                   if len(pairs) else None, self.trans)


def coactivation_result(geo: Geometry, layer: int | None, pairs: dict[int, np.ndarray] | None,
                        c: np.ndarray) -> AnalysisResult:
    """The co-activation tables from ``pairs`` {layer: (E, E) symmetric counts} (None for top-1 routing) and
    ``c`` (S, E, E) transition counts from each start layer to the next MoE layer."""
    res = AnalysisResult("coactivation")
    layers = geo.layers.tolist()
    E, k = geo.num_experts, geo.top_k
    want = layers if layer is None else [layer]
    iu = np.triu_indices(E, 1)
    P = len(iu[0])
    if k < 2 or pairs is None:
        # top-1: a token never uses two experts of a layer, so co-activation is undefined (not zero): no pairs
        res.notes.append(TOP1_NOTE)
        pairs = {}
        res.tables["pairs"] = PAIRS_SCHEMA.empty_table()
    else:
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
