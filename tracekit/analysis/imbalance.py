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
    res = AnalysisResult("imbalance")
    groups: list[tuple[str, str, np.ndarray]] = [("all", "all", rc.counts.sum(axis=(0, 1), dtype=np.int64))]
    for key in ["phase"] + ([by] if by != "phase" else []):
        names, loads = group_loads(rc, key)
        groups += [(key, n, l) for n, l in zip(names, loads)]
    rows = {k: [] for k in ("group_by", "group", "layer", "tokens", "max_mean", "cv", "gini", "hot_share")}
    summary = {k: [] for k in ("group_by", "group", "mean_max_mean", "worst_layer", "worst_max_mean",
                               "mean_cv", "mean_gini", "mean_hot_share")}
    for key, name, load in groups:
        m = imbalance_metrics(load, hot_fraction)
        L = len(rc.layers)
        rows["group_by"] += [key] * L
        rows["group"] += [name] * L
        rows["layer"] += rc.layers.tolist()
        rows["tokens"] += (load.sum(-1) // max(rc.top_k, 1)).tolist()
        for k in ("max_mean", "cv", "gini", "hot_share"):
            rows[k] += m[k].tolist()
        worst = int(np.nanargmax(m["max_mean"])) if np.isfinite(m["max_mean"]).any() else 0
        summary["group_by"].append(key)
        summary["group"].append(name)
        summary["mean_max_mean"].append(float(np.nanmean(m["max_mean"])))
        summary["worst_layer"].append(int(rc.layers[worst]))
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

    R = rc.counts.shape[0]
    window = window or max(1, R // 10)
    per_req = rc.counts.sum(axis=1)  # (R, L, E)
    wl = window_loads(per_req, window)
    if wl.shape[0] < 2:
        res.notes.append(f"stability needs at least 2 windows of {window} requests; {R} request(s) given")
        res.tables["stability"] = pa.table({"window": pa.array([], pa.int32()), "layer": pa.array([], pa.int32()),
                                            "jaccard": pa.array([], pa.float64())})
    else:
        jac = hot_set_stability(wl, hot_fraction)  # (W-1, L)
        W1, L = jac.shape
        res.tables["stability"] = pa.table({
            "window": np.repeat(np.arange(W1, dtype=np.int32), L),
            "layer": np.tile(rc.layers.astype(np.int32), W1),
            "jaccard": jac.reshape(-1),
        })
        res.summaries["hot-set stability between consecutive request windows"] = pa.table({
            "window_requests": [window], "windows": [int(wl.shape[0])], "hot_experts": [hot_count(rc.num_experts, hot_fraction)],
            "mean_jaccard": [float(jac.mean())], "min_layer_mean_jaccard": [float(jac.mean(0).min())],
            "min_layer": [int(rc.layers[int(np.argmin(jac.mean(0)))])],
        })
        res.arrays["stability"] = jac
    return res
