"""Finding 2: domain-specific expert popularity (code, math, chat, general)."""
from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa

from .data import RequestCounts
from .result import AnalysisResult


def normalize(counts: np.ndarray) -> np.ndarray:
    """(..., E) counts -> (..., E) probabilities (NaN rows where the total is 0)."""
    c = np.asarray(counts, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return c / c.sum(-1, keepdims=True)


def js_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence in bits (0..1) between distributions p, q: (..., E) -> (...)."""
    m = 0.5 * (p + q)

    def kl(a, b):
        with np.errstate(invalid="ignore", divide="ignore"):
            t = np.where(a > 0, a * np.log2(a / b), 0.0)
        return t.sum(-1)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def tv_distance(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Total variation distance 0.5 * sum |p - q|: (..., E) -> (...)."""
    return 0.5 * np.abs(p - q).sum(-1)


def popularity_rank(counts: np.ndarray) -> np.ndarray:
    """(..., E) counts -> (..., E) rank of each expert, 0 = most chosen (ties: lower id first)."""
    order = np.argsort(-np.asarray(counts), axis=-1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(counts.shape[-1])[(None,) * (counts.ndim - 1)], axis=-1)
    return ranks


def routing_signature(counts: np.ndarray) -> np.ndarray:
    """(R, L, E) per-request counts -> (R, L * E) features: each layer's expert shares, concatenated."""
    return np.nan_to_num(normalize(counts)).reshape(counts.shape[0], -1)


def classify(features: np.ndarray, labels: np.ndarray, seed: int = 0, max_folds: int = 5) -> dict:
    """Held-out accuracy of a logistic regression predicting ``labels`` (R,) from ``features`` (R, F).

    Stratified k-fold (k = min(max_folds, smallest class size)); every request is predicted once by a model that
    did not see it. ``baseline`` is the same protocol predicting each training fold's majority class.
    Returns {accuracy, baseline, folds, n}; accuracy is NaN when a class has fewer than 2 requests.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(labels)
    classes, sizes = np.unique(labels, return_counts=True)
    n = len(labels)
    if len(classes) < 2 or sizes.min() < 2:
        return {"accuracy": float("nan"), "baseline": float("nan"), "folds": 0, "n": n}
    folds = int(min(max_folds, sizes.min()))
    correct = base = 0
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(features, labels):
        clf = LogisticRegression(max_iter=2000).fit(features[train], labels[train])
        correct += int((clf.predict(features[test]) == labels[test]).sum())
        vals, cnt = np.unique(labels[train], return_counts=True)
        base += int((labels[test] == vals[np.argmax(cnt)]).sum())
    return {"accuracy": correct / n, "baseline": base / n, "folds": folds, "n": n}


def analyze_domain(rc: RequestCounts, by: str = "domain", top: int = 10, seed: int = 0) -> AnalysisResult:
    """Distances between the ``by`` groups' expert distributions per layer, the experts whose popularity rank
    shifts most between a group and the rest, and how well a request's routing signature predicts its group."""
    res = AnalysisResult("domain")
    key = "domain" if by == "phase" else by
    lab = rc.labels(key)
    names = sorted(set(lab))
    per_req = rc.counts.sum(axis=1, dtype=np.int64)  # (R, L, E)
    loads = np.stack([per_req[lab == n].sum(0) for n in names])  # (D, L, E)
    res.arrays["groups"] = names
    res.arrays["loads"] = loads
    res.arrays["layers"] = rc.layers
    if len(names) < 2:
        res.notes.append(f"only one {key} ({names[0]}): nothing to compare")
        return res
    p = normalize(loads)
    pair_rows = {k: [] for k in ("layer", "group_a", "group_b", "js", "tv")}
    summ = {k: [] for k in ("group_a", "group_b", "mean_js", "max_js", "max_js_layer", "mean_tv")}
    for a, b in itertools.combinations(range(len(names)), 2):
        js, tv = js_divergence(p[a], p[b]), tv_distance(p[a], p[b])
        pair_rows["layer"] += rc.layers.tolist()
        pair_rows["group_a"] += [names[a]] * len(rc.layers)
        pair_rows["group_b"] += [names[b]] * len(rc.layers)
        pair_rows["js"] += js.tolist()
        pair_rows["tv"] += tv.tolist()
        i = int(np.nanargmax(js))
        for k, v in (("group_a", names[a]), ("group_b", names[b]), ("mean_js", float(np.nanmean(js))),
                     ("max_js", float(js[i])), ("max_js_layer", int(rc.layers[i])), ("mean_tv", float(np.nanmean(tv)))):
            summ[k].append(v)
    res.tables["distances"] = pa.table(pair_rows)
    res.summaries[f"{key} distance per pair (over layers)"] = pa.table(summ)

    total = loads.sum(0)
    shift_rows = {k: [] for k in ("group", "layer", "expert", "rank_in_group", "rank_in_rest", "rank_shift",
                                  "share_in_group", "share_in_rest")}
    shift = np.zeros(loads.shape, dtype=np.int64)
    for d, name in enumerate(names):
        rest = total - loads[d]
        rg, rr = popularity_rank(loads[d]), popularity_rank(rest)
        sg, sr = normalize(loads[d]), normalize(rest)
        shift[d] = rr - rg  # > 0: more popular in the group than in the rest
        L, E = rg.shape
        shift_rows["group"] += [name] * (L * E)
        shift_rows["layer"] += np.repeat(rc.layers, E).tolist()
        shift_rows["expert"] += np.tile(np.arange(E), L).tolist()
        shift_rows["rank_in_group"] += rg.reshape(-1).tolist()
        shift_rows["rank_in_rest"] += rr.reshape(-1).tolist()
        shift_rows["rank_shift"] += shift[d].reshape(-1).tolist()
        shift_rows["share_in_group"] += sg.reshape(-1).tolist()
        shift_rows["share_in_rest"] += sr.reshape(-1).tolist()
    shifts = pa.table(shift_rows)
    res.tables["rank_shifts"] = shifts
    order = np.argsort(-np.abs(np.asarray(shift_rows["rank_shift"])), kind="stable")[:top]
    res.summaries[f"experts whose rank shifts most ({key} vs the rest)"] = shifts.take(order).select(
        ["group", "layer", "expert", "rank_in_group", "rank_in_rest", "rank_shift", "share_in_group", "share_in_rest"])
    res.arrays["share_diff"] = normalize(loads) - normalize(total)[None]

    cls = classify(routing_signature(per_req), lab.astype(str), seed=seed)
    res.tables["classifier"] = pa.table({k: [v] for k, v in cls.items()})
    res.summaries[f"predict a request's {key} from its routing"] = pa.table(
        {"requests": [cls["n"]], "folds": [cls["folds"]], "accuracy": [cls["accuracy"]],
         "majority_baseline": [cls["baseline"]]})
    if cls["folds"] == 0:
        res.notes.append(f"classifier skipped: every {key} needs at least 2 requests")
    return res
