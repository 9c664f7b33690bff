"""Finding 1: expert load imbalance, per MoE layer and phase, and whether the hot experts stay hot."""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from .data import RequestCounts, group_loads
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


def window_loads(counts: np.ndarray, window: int) -> np.ndarray:
    """(R, ..., E) per-request counts -> (ceil(R / window), ..., E) sums over consecutive windows of requests."""
    R = counts.shape[0]
    starts = np.arange(0, R, window)
    return np.add.reduceat(counts.astype(np.int64), starts, axis=0)


def analyze_imbalance(rc: RequestCounts, by: str = "phase", window: int | None = None,
                      hot_fraction: float = HOT_FRACTION) -> AnalysisResult:
    """Imbalance per layer for all tokens, per phase, and per ``by`` group; hot-set stability over windows of
    ``window`` consecutive requests (default: R / 10, at least 1)."""
    groups: list[tuple[str, str, np.ndarray]] = [("all", "all", rc.counts.sum(axis=(0, 1), dtype=np.int64))]
    for key in ["phase"] + ([by] if by != "phase" else []):
        names, loads = group_loads(rc, key)
        groups += [(key, n, l) for n, l in zip(names, loads)]
    R = rc.counts.shape[0]
    window = window or max(1, R // 10)
    per_window = window_loads(rc.counts.sum(axis=1), window)  # (W, L, E)
    return imbalance_result(groups, rc.layers, rc.top_k, rc.num_experts, per_window, f"{window} requests",
                            hot_fraction)


def analyze_loads_imbalance(loads: pa.Table, layers: np.ndarray, num_experts: int, top_k: int, by: str = "phase",
                            window: int | None = None, hot_fraction: float = HOT_FRACTION) -> AnalysisResult:
    """The same imbalance analysis from aggregated counts (runs of kind ``loads``: engine statistics).

    ``loads``: table with columns phase, domain, dataset, window, layer, expert, count. Stability is measured over
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
    passes = np.unique(loads.column("window").to_numpy())
    window = window or max(1, len(passes) // 10)
    chunk = np.searchsorted(passes, loads.column("window").to_numpy()) // window
    per_window = np.stack([dense(chunk == w) for w in range(int(chunk.max()) + 1)]) if len(count) else np.zeros((0, L, E))
    return imbalance_result(groups, layers, top_k, num_experts, per_window, f"{window} forward passes", hot_fraction)


def imbalance_result(groups: list[tuple[str, str, np.ndarray]], layers: np.ndarray, top_k: int, num_experts: int,
                     per_window: np.ndarray, window_label: str, hot_fraction: float = HOT_FRACTION) -> AnalysisResult:
    """Tables and summaries of imbalance for ``groups`` [(group_by, name, (L, E) loads)] and hot-set stability
    over ``per_window`` (W, L, E) loads of consecutive windows."""
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

    if per_window.shape[0] < 2:
        res.notes.append(f"stability needs at least 2 windows of {window_label}; {per_window.shape[0]} given")
        res.tables["stability"] = pa.table({"window": pa.array([], pa.int32()), "layer": pa.array([], pa.int32()),
                                            "jaccard": pa.array([], pa.float64())})
    else:
        jac = hot_set_stability(per_window, hot_fraction)  # (W-1, L)
        W1, L = jac.shape
        res.tables["stability"] = pa.table({
            "window": np.repeat(np.arange(W1, dtype=np.int32), L),
            "layer": np.tile(layers.astype(np.int32), W1),
            "jaccard": jac.reshape(-1),
        })
        res.summaries[f"hot-set stability between consecutive windows of {window_label}"] = pa.table({
            "windows": [int(per_window.shape[0])], "hot_experts": [hot_count(num_experts, hot_fraction)],
            "mean_jaccard": [float(jac.mean())], "min_layer_mean_jaccard": [float(jac.mean(0).min())],
            "min_layer": [int(layers[int(np.argmin(jac.mean(0)))])],
        })
        res.arrays["stability"] = jac
    return res
