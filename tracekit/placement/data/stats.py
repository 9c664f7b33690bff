"""Routing statistics that the strategies, the grouping and the communication model share.

All functions are pure, take a :class:`~tracekit.placement.data.types.TraceArrays` and an optional row mask (N,) bool,
and return numpy arrays. Shapes use M MoE-layer positions, E experts, k experts per token-layer, R_n requests.
Large traces (tens of millions of token-layers) are processed in row chunks so that no (N * k) int64 temporary
is ever built whole. A zero-computation choice (the sentinel id E, see :class:`TraceArrays`) counts nowhere: the
counts run over E + 1 columns and the sentinel's column is dropped.
"""
from __future__ import annotations

import numpy as np
from scipy import sparse as sp

from ...errors import TracekitError
from .types import TraceArrays

CHUNK_ROWS = 1 << 21  # token-layers per chunk: (2M x k) int64 temporaries stay ~100 MB for k = 8


def row_chunks(n: int, size: int = CHUNK_ROWS):
    """Yield slices covering range(n) in chunks of ``size`` rows."""
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _rows(traces: TraceArrays, mask: np.ndarray | None) -> np.ndarray | None:
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.dtype != bool or mask.shape != (len(traces),):
        raise ValueError(f"mask must be (N,) bool with N={len(traces)}, got {mask.dtype} {mask.shape}")
    return mask


def _masked(arr: np.ndarray, mask: np.ndarray | None, sl: slice) -> np.ndarray:
    a = arr[sl]
    return a if mask is None else a[mask[sl]]


def _width(traces: TraceArrays) -> int:
    """Columns of a per-expert count: E, or E + 1 when the sentinel id E (zero-computation choices) occurs."""
    return traces.num_experts + (1 if traces.zero_choices else 0)


def expert_load(traces: TraceArrays, mask: np.ndarray | None = None) -> np.ndarray:
    """(M, E) int64: (token, expert) assignments per layer position and expert.

    Without a mask, the aggregated counts of loads-kind runs (``traces.loads``) are added; with a mask only the
    selected token rows count (a loads run cannot be split).
    """
    mask = _rows(traces, mask)
    M, E = traces.num_layers, traces.num_experts
    W = _width(traces)
    out = np.zeros(M * W, dtype=np.int64)
    for sl in row_chunks(len(traces)):
        lp = _masked(traces.layer_pos, mask, sl).astype(np.int64)
        ex = _masked(traces.experts, mask, sl).astype(np.int64)
        out += np.bincount((lp[:, None] * W + ex).ravel(), minlength=M * W)
    out = np.ascontiguousarray(out.reshape(M, W)[:, :E])
    if mask is None and traces.loads is not None:
        out = out + traces.loads
    return out


def coactivation(traces: TraceArrays, layer_pos: int, mask: np.ndarray | None = None) -> np.ndarray:
    """(E, E) int64 symmetric: C[i, j] = token-layers of position ``layer_pos`` that chose both i and j (i != j);
    the diagonal C[i, i] is expert i's load at that layer."""
    mask = _rows(traces, mask)
    E = traces.num_experts
    sel = traces.layer_pos == layer_pos
    if mask is not None:
        sel &= mask
    ex = traces.experts[sel].astype(np.int64)
    n, k = ex.shape
    if n == 0:
        return np.zeros((E, E), dtype=np.int64)
    W = _width(traces)
    x = sp.csr_matrix((np.ones(n * k, dtype=np.int64), ex.ravel(), np.arange(0, n * k + 1, k)), shape=(n, W))
    c = (x.T @ x).toarray()
    return np.ascontiguousarray(c[:E, :E])


def request_histograms(
    traces: TraceArrays,
    phase: int | None = None,
    mask: np.ndarray | None = None,
    layer_pos: np.ndarray | list[int] | None = None,
    sparse: bool = False,
):
    """Per-request, per-layer expert counts.

    ``phase``: 0 prefill, 1 decode, None both. ``layer_pos``: optional subset of M' layer positions (default all).
    Returns float32 (R_n, M', E), or with ``sparse=True`` a scipy CSR matrix (R_n, M' * E) (column m' * E + e),
    which is the right choice for thousands of requests on 58 x 256 experts.
    """
    mask = _rows(traces, mask)
    E, R = traces.num_experts, traces.num_requests
    lps = np.arange(traces.num_layers) if layer_pos is None else np.asarray(layer_pos, dtype=np.int64)
    lut = np.full(traces.num_layers, -1, dtype=np.int64)
    lut[lps] = np.arange(lps.size)
    Mp = lps.size
    acc = None
    for sl in row_chunks(len(traces)):
        keep = lut[traces.layer_pos[sl]] >= 0
        if phase is not None:
            keep &= traces.phase[sl] == phase
        if mask is not None:
            keep &= mask[sl]
        r = traces.request[sl][keep].astype(np.int64)
        ex = traces.experts[sl][keep].astype(np.int64)
        col = lut[traces.layer_pos[sl][keep]][:, None] * E + ex
        k = col.shape[1]
        rows, col = np.repeat(r, k), col.ravel()
        if traces.zero_choices:  # zero-computation choices are no expert of the histogram
            real = ex.ravel() < E
            rows, col = rows[real], col[real]
        m = sp.csr_matrix(
            (np.ones(col.size, dtype=np.float32), (rows, col)), shape=(R, Mp * E)
        )
        acc = m if acc is None else acc + m
    if acc is None:
        acc = sp.csr_matrix((R, Mp * E), dtype=np.float32)
    acc.sum_duplicates()
    if sparse:
        return acc
    return acc.toarray().reshape(R, Mp, E)


def load_by_group(
    traces: TraceArrays, group_of_request: np.ndarray, num_groups: int, mask: np.ndarray | None = None
) -> np.ndarray:
    """(M, num_groups, E) int64: expert load split by the group (e.g. home node) of each row's request.

    ``group_of_request`` (R_n,) int in [0, num_groups); requests with a negative group are skipped.
    Tells a locality strategy which node's requests use an expert most (where its replica saves the most sends).
    """
    mask = _rows(traces, mask)
    M, E = traces.num_layers, traces.num_experts
    W = _width(traces)
    grp = np.asarray(group_of_request, dtype=np.int64)
    out = np.zeros(M * num_groups * W, dtype=np.int64)
    for sl in row_chunks(len(traces)):
        g = grp[_masked(traces.request, mask, sl)]
        ok = g >= 0
        lp = _masked(traces.layer_pos, mask, sl).astype(np.int64)[ok]
        ex = _masked(traces.experts, mask, sl).astype(np.int64)[ok]
        idx = ((lp * num_groups + g[ok])[:, None]) * W + ex
        out += np.bincount(idx.ravel(), minlength=out.size)
    return np.ascontiguousarray(out.reshape(M, num_groups, W)[:, :, :E])


def decode_step(traces: TraceArrays) -> np.ndarray:
    """(N,) int32: 0-based decode step of each row (position minus the request's first decode position);
    -1 for prefill rows. Cached on ``traces`` (computed once per TraceArrays; do not mutate its arrays)."""
    cached = getattr(traces, "_decode_step_cache", None)
    if cached is not None and cached.shape == (len(traces),):
        return cached
    out = _decode_step(traces)
    object.__setattr__(traces, "_decode_step_cache", out)
    return out


def _decode_step(traces: TraceArrays) -> np.ndarray:
    out = np.full(len(traces), -1, dtype=np.int32)
    dec = traces.phase == 1
    if not dec.any():
        return out
    r = traces.request[dec]
    t = traces.token[dec].astype(np.int64)
    first = np.full(traces.num_requests, np.iinfo(np.int64).max)
    np.minimum.at(first, r, t)
    out[dec] = (t - first[r]).astype(np.int32)
    return out


def feature_layer_positions(traces: TraceArrays, feature_layers) -> np.ndarray:
    """Absolute layer indices (as in ``GroupingRule.feature_layers``) -> layer positions; empty/None = all."""
    if feature_layers is None or len(feature_layers) == 0:
        return np.arange(traces.num_layers)
    pos = np.searchsorted(traces.layers, np.asarray(feature_layers))
    pos = np.clip(pos, 0, traces.num_layers - 1)
    if not np.array_equal(traces.layers[pos], np.asarray(feature_layers)):
        raise TracekitError(
            f"grouping feature layers {list(feature_layers)} are not all MoE layers of these traces "
            f"({traces.layers.tolist()[:8]}...); refit the grouping on traces of this model"
        )
    return pos


def signature_features(traces: TraceArrays, feature_layers=None, first_tokens: int = 16) -> np.ndarray:
    """(R_n, M' * E) float32 routing signature of every request, the feature the ``signature`` grouping clusters.

    The request's prefill expert histogram over ``feature_layers`` (absolute layer indices; empty = all MoE
    layers), each layer's histogram normalised to sum 1, concatenated. A request without prefill rows uses its
    first ``first_tokens`` decode tokens instead (what a router has seen early on). All-zero rows (a request
    with no rows at the chosen layers) stay zero.
    """
    lps = feature_layer_positions(traces, feature_layers)
    E = traces.num_experts
    has_prefill = np.zeros(traces.num_requests, dtype=bool)
    has_prefill[traces.request[traces.phase == 0]] = True
    step = decode_step(traces)
    early = (traces.phase == 0) | ((step >= 0) & (step < first_tokens) & ~has_prefill[traces.request])
    h = request_histograms(traces, phase=None, mask=early, layer_pos=lps, sparse=False)
    s = h.sum(axis=2, keepdims=True)
    np.divide(h, s, out=h, where=s > 0)
    return h.reshape(traces.num_requests, lps.size * E).astype(np.float32, copy=False)
