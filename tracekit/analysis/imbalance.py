"""Finding 1: expert load imbalance, per MoE layer and phase, and whether the hot experts stay hot."""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from ..errors import TracekitError
from .data import PHASES
from . import kernels
from .result import AnalysisResult

HOT_FRACTION = 0.10


def imbalance_metrics(load: np.ndarray, hot_fraction: float = HOT_FRACTION) -> dict[str, np.ndarray]:
    """Imbalance of loads over experts.

    load: (..., E) non-negative counts. Returns arrays of shape (...):
    ``max_mean`` (max / mean load), ``cv`` (population std / mean), ``gini`` (0 = equal, 1 - 1/E = one expert
    takes all), ``hot_share`` (share of the load on the ceil(hot_fraction * E) most loaded experts).
    Rows with zero total load give NaN.
    """
    x = np.asarray(load, dtype=np.float64)
    E = x.shape[-1]
    total = x.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / E
        s = np.sort(x, axis=-1)
        i = np.arange(1, E + 1, dtype=np.float64)
        gini = (2.0 * (s * i).sum(-1)) / (E * total) - (E + 1.0) / E
        n_hot = hot_count(E, hot_fraction)
        return {
            "max_mean": x.max(-1) / mean,
            "cv": x.std(-1) / mean,
            "gini": gini,
            "hot_share": s[..., E - n_hot:].sum(-1) / total,
        }


def hot_count(num_experts: int, hot_fraction: float = HOT_FRACTION) -> int:
    return max(1, math.ceil(hot_fraction * num_experts - 1e-9))


def hot_sets(load: np.ndarray, hot_fraction: float = HOT_FRACTION) -> np.ndarray:
    """(..., E) loads -> (..., E) bool mask of the hottest ceil(hot_fraction * E) experts (ties: lower id)."""
    E = load.shape[-1]
    order = np.argsort(-np.asarray(load), axis=-1, kind="stable")[..., : hot_count(E, hot_fraction)]
    mask = np.zeros(load.shape, dtype=bool)
    np.put_along_axis(mask, order, True, axis=-1)
    return mask


def hot_set_stability(window_loads: np.ndarray, hot_fraction: float = HOT_FRACTION) -> np.ndarray:
    """Do hot experts stay hot? window_loads: (W, L, E) loads per window of requests.

    Returns (W-1, L): Jaccard overlap |H_w & H_w+1| / |H_w | H_w+1| of the hot sets of consecutive windows.
    """
    h = hot_sets(window_loads, hot_fraction)
    inter = (h[1:] & h[:-1]).sum(-1)
    union = (h[1:] | h[:-1]).sum(-1)
    return inter / union


class ImbalanceAccumulator:
    """Imbalance from request batches: loads of all tokens, per phase and per ``by`` group, summed as batches
    arrive; hot-set stability from windows of ``window`` consecutive requests (global request order), each
    window's loads kept only until it is complete, then only its hot set until both neighbours are compared."""

    def __init__(self, labels: np.ndarray, by: str, layers: np.ndarray, num_experts: int, top_k: int,
                 window: int, hot_fraction: float = HOT_FRACTION):
        R, L, E = len(labels), len(layers), num_experts
        self.by, self.layers, self.top_k, self.E, self.hot_fraction = by, layers, top_k, E, hot_fraction
        self.window = window
        self.names = sorted(set(labels)) if by != "phase" else []
        self.group_of = np.searchsorted(np.asarray(self.names, dtype=object), labels) if self.names else None
        self.phase = np.zeros((2, L, E), dtype=np.int64)
        self.groups = np.zeros((len(self.names), L, E), dtype=np.int64)
        self.n_windows = -(-R // window) if R else 0
        self.win_size = np.minimum(window, R - np.arange(self.n_windows) * window)
        self.open: dict[int, list] = {}  # window -> [(L, E) loads, requests seen]
        self.hot: dict[int, np.ndarray] = {}
        self.jaccard = np.full((max(self.n_windows - 1, 0), L), np.nan)
        self.compared = np.zeros(max(self.n_windows - 1, 0), dtype=bool)

    def add(self, batch) -> None:
        """``batch``: a :class:`.scan.SparseBatch` (requests in increasing global order)."""
        L, E = len(self.layers), self.E
        groups = self.group_of[batch.index] if self.names else np.full(batch.n, -1, dtype=np.int64)
        kernels.add_loads(batch.ptr, batch.expert, batch.prefill, batch.decode, groups, L, self.phase, self.groups)
        w = batch.index // self.window
        starts = np.flatnonzero(np.r_[True, w[1:] != w[:-1]]) if batch.n else np.zeros(0, dtype=np.int64)
        for s0 in range(0, len(starts), self.WINDOWS_AT_ONCE):  # window sums a bounded number of windows at a time
            first = starts[s0]
            last = starts[s0 + self.WINDOWS_AT_ONCE] if s0 + self.WINDOWS_AT_ONCE < len(starts) else batch.n
            run_of = np.full(batch.n, -1, dtype=np.int64)
            run_of[first:last] = np.searchsorted(starts, np.arange(first, last), side="right") - 1 - s0
            sums = np.zeros((min(self.WINDOWS_AT_ONCE, len(starts) - s0), L * E), dtype=np.int64)
            kernels.add_rows_of_slots(batch.ptr, batch.expert, batch.prefill, batch.decode, run_of, L, E, False, sums)
            for j in range(len(sums)):
                i0 = starts[s0 + j]
                i1 = starts[s0 + j + 1] if s0 + j + 1 < len(starts) else batch.n
                wi = int(w[i0])
                acc = self.open.setdefault(wi, [np.zeros((L, E), dtype=np.int64), 0])
                acc[0] += sums[j].reshape(L, E)
                acc[1] += int(i1 - i0)
                if acc[1] == self.win_size[wi]:
                    self._close(wi, self.open.pop(wi)[0])

    WINDOWS_AT_ONCE = 64

    def _close(self, w: int, load: np.ndarray) -> None:
        """Window ``w`` is complete: compare its hot set with its completed neighbours, drop what is no longer
        needed (a hot set lives until both neighbours were compared with it)."""
        self.hot[w] = hot_sets(load, self.hot_fraction)
        for a in (w - 1, w):
            if a in self.hot and a + 1 in self.hot:
                h0, h1 = self.hot[a], self.hot[a + 1]
                self.jaccard[a] = (h0 & h1).sum(-1) / (h0 | h1).sum(-1)
                self.compared[a] = True
        for a in (w - 1, w, w + 1):
            if a in self.hot and (a == 0 or self.compared[a - 1]) and (a == self.n_windows - 1 or self.compared[a]):
                del self.hot[a]

    def result(self) -> AnalysisResult:
        if self.open:
            raise TracekitError(f"internal: {len(self.open)} windows of requests never completed")
        groups: list[tuple[str, str, np.ndarray]] = [("all", "all", self.phase.sum(0))]
        groups += [("phase", n, self.phase[i]) for i, n in enumerate(PHASES)]
        groups += [(self.by, n, self.groups[i]) for i, n in enumerate(self.names)]
        return imbalance_result(groups, self.layers, self.top_k, self.E, self.jaccard, self.n_windows,
                                f"{self.window} request{'s' if self.window != 1 else ''}", self.hot_fraction)


def analyze_loads_imbalance(loads: pa.Table, layers: np.ndarray, num_experts: int, top_k: int, by: str = "phase",
                            window: int | None = None, hot_fraction: float = HOT_FRACTION) -> AnalysisResult:
    """The same imbalance analysis from aggregated counts (runs of kind ``loads``: engine statistics).

    ``loads``: table with columns phase, domain, dataset, step_window, layer, expert, count. Stability is measured over
    windows of ``window`` consecutive recorded forward passes (default: passes / 10), since there are no requests.
    """
    lpos = np.full(int(layers.max()) + 1, -1, dtype=np.int64)
    lpos[layers] = np.arange(len(layers))
    layer = lpos[loads.column("layer").to_numpy()]
    expert = loads.column("expert").to_numpy().astype(np.int64)
    count = loads.column("count").to_numpy().astype(np.int64)
    ok = (layer >= 0) & (expert < num_experts)
    L, E = len(layers), num_experts

    def dense(mask: np.ndarray) -> np.ndarray:
        m = mask & ok
        return np.bincount(layer[m] * E + expert[m], weights=count[m], minlength=L * E).astype(np.int64).reshape(L, E)

    everything = np.ones(len(count), dtype=bool)
    groups: list[tuple[str, str, np.ndarray]] = [("all", "all", dense(everything))]
    for key in ["phase"] + ([by] if by != "phase" else []):
        labels = np.asarray(loads.column(key).to_pylist(), dtype=object)
        for name in sorted(set(labels)):
            groups.append((key, str(name), dense(labels == name)))
    passes = np.unique(loads.column("step_window").to_numpy())
    window = window or max(1, len(passes) // 10)
    chunk = np.searchsorted(passes, loads.column("step_window").to_numpy()) // window
    per_window = np.stack([dense(chunk == w) for w in range(int(chunk.max()) + 1)]) if len(count) else np.zeros((0, L, E))
    jac = hot_set_stability(per_window, hot_fraction) if len(per_window) >= 2 else np.zeros((0, L))
    return imbalance_result(groups, layers, top_k, num_experts, jac, len(per_window), f"{window} forward passes",
                            hot_fraction)


def imbalance_result(groups: list[tuple[str, str, np.ndarray]], layers: np.ndarray, top_k: int, num_experts: int,
                     jac: np.ndarray, n_windows: int, window_label: str,
                     hot_fraction: float = HOT_FRACTION) -> AnalysisResult:
    """Tables and summaries of imbalance for ``groups`` [(group_by, name, (L, E) loads)] and hot-set stability:
    ``jac`` (W-1, L) Jaccard overlaps of the hot sets of ``n_windows`` consecutive windows."""
    res = AnalysisResult("imbalance")
    rows = {k: [] for k in ("group_by", "group", "layer", "tokens", "max_mean", "cv", "gini", "hot_share")}
    summary = {k: [] for k in ("group_by", "group", "mean_max_mean", "worst_layer", "worst_max_mean",
                               "mean_cv", "mean_gini", "mean_hot_share")}
    for key, name, load in groups:
        if load.sum() == 0:
            continue
        m = imbalance_metrics(load, hot_fraction)
        L = len(layers)
        rows["group_by"] += [key] * L
        rows["group"] += [name] * L
        rows["layer"] += layers.tolist()
        rows["tokens"] += (load.sum(-1) // max(top_k, 1)).tolist()
        for k in ("max_mean", "cv", "gini", "hot_share"):
            rows[k] += m[k].tolist()
        worst = int(np.nanargmax(m["max_mean"])) if np.isfinite(m["max_mean"]).any() else 0
        summary["group_by"].append(key)
        summary["group"].append(name)
        summary["mean_max_mean"].append(float(np.nanmean(m["max_mean"])))
        summary["worst_layer"].append(int(layers[worst]))
        summary["worst_max_mean"].append(float(m["max_mean"][worst]))
        summary["mean_cv"].append(float(np.nanmean(m["cv"])))
        summary["mean_gini"].append(float(np.nanmean(m["gini"])))
        summary["mean_hot_share"].append(float(np.nanmean(m["hot_share"])))
        if key == "all":
            res.arrays["load"] = load
            res.arrays["max_mean"] = m["max_mean"]
        if key == "phase":
            res.arrays[f"max_mean_{name}"] = m["max_mean"]
    res.tables["layers"] = pa.table(rows)
    res.summaries["imbalance by group (means over layers)"] = pa.table(summary)

    if n_windows < 2:
        res.notes.append(f"stability needs at least 2 windows of {window_label}; {n_windows} given")
        res.tables["stability"] = pa.table({"window": pa.array([], pa.int32()), "layer": pa.array([], pa.int32()),
                                            "jaccard": pa.array([], pa.float64())})
    else:
        W1, L = jac.shape
        res.tables["stability"] = pa.table({
            "window": np.repeat(np.arange(W1, dtype=np.int32), L),
            "layer": np.tile(layers.astype(np.int32), W1),
            "jaccard": jac.reshape(-1),
        })
        res.summaries[f"hot-set stability between consecutive windows of {window_label}"] = pa.table({
            "windows": [int(n_windows)], "hot_experts": [hot_count(num_experts, hot_fraction)],
            "mean_jaccard": [float(jac.mean())], "min_layer_mean_jaccard": [float(jac.mean(0).min())],
            "min_layer": [int(layers[int(np.argmin(jac.mean(0)))])],
        })
        res.arrays["stability"] = jac
    return res
