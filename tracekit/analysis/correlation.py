"""Finding 3: does a request's decode route like its own prefill? (vs another request's decode)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from .data import RequestCounts
from .result import AnalysisResult


def pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation along the last axis: (..., E), (..., E) -> (...); NaN where either is constant."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    da = a - a.mean(-1, keepdims=True)
    db = b - b.mean(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (da * db).sum(-1) / np.sqrt((da * da).sum(-1) * (db * db).sum(-1))


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks along the last axis, ties get their average rank (as scipy.stats.rankdata 'average')."""
    from scipy.stats import rankdata

    return rankdata(x, method="average", axis=-1)


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation along the last axis: Pearson of average ranks; (..., E), (..., E) -> (...)."""
    return pearson_rows(average_ranks(a), average_ranks(b))


def topn_overlap(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    """|top-n(a) & top-n(b)| / n along the last axis (ties: lower expert id first); (..., E) -> (...)."""
    ta = np.argsort(-a, axis=-1, kind="stable")[..., :n]
    tb = np.argsort(-b, axis=-1, kind="stable")[..., :n]
    E = a.shape[-1]
    ma = np.zeros(a.shape, dtype=bool)
    mb = np.zeros(b.shape, dtype=bool)
    np.put_along_axis(ma, ta, True, axis=-1)
    np.put_along_axis(mb, tb, True, axis=-1)
    return (ma & mb).sum(-1) / min(n, E)


def shuffled_partners(subjects: np.ndarray, pool: np.ndarray, seed: int = 0) -> np.ndarray:
    """For each subject request index, a different request drawn uniformly from ``pool`` (indices).

    subjects: (S,) request indices; pool: (P,) request indices with a decode. Returns (S,) partner indices,
    partner != subject; -1 where the pool holds no other request.
    """
    rng = np.random.default_rng(seed)
    pool = np.asarray(pool)
    out = np.full(len(subjects), -1, dtype=np.int64)
    for i, s in enumerate(subjects):
        others = pool[pool != s]
        if len(others):
            out[i] = others[rng.integers(len(others))]
    return out


def analyze_correlation(rc: RequestCounts, by: str = "domain", top_n: int | None = None,
                        seed: int = 0) -> AnalysisResult:
    """Per request with both phases and per layer: Pearson and Spearman correlation of its prefill and decode
    expert histograms and the overlap of their top-n experts (default n = top-k), against a shuffled baseline
    that pairs the prefill with another request's decode. Distributions summarised per ``by`` group."""
    res = AnalysisResult("correlation")
    n = int(top_n or rc.top_k)
    pre_tok = rc.counts[:, 0].sum(axis=(1, 2))
    dec_tok = rc.counts[:, 1].sum(axis=(1, 2))
    subjects = np.flatnonzero((pre_tok > 0) & (dec_tok > 0))
    pool = np.flatnonzero(dec_tok > 0)
    key = "domain" if by == "phase" else by
    lab = rc.labels(key)
    if len(subjects) == 0:
        res.notes.append("no request has both prefill and decode routing: nothing to correlate")
        return res
    partners = shuffled_partners(subjects, pool, seed)
    has_partner = partners >= 0
    safe = np.where(has_partner, partners, subjects)  # placeholder rows, masked to NaN below
    pre = rc.counts[subjects, 0]  # (S, L, E)
    dec = rc.counts[subjects, 1]
    base_dec = rc.counts[safe, 1]
    # rank each histogram once: Spearman = Pearson of average ranks
    rank_dec_all = np.zeros(rc.counts.shape[:1] + rc.counts.shape[2:])
    rank_dec_all[pool] = average_ranks(rc.counts[pool, 1])
    rank_pre = average_ranks(pre)
    real = {"pearson": pearson_rows(pre, dec), "spearman": pearson_rows(rank_pre, rank_dec_all[subjects]),
            "overlap": topn_overlap(pre, dec, n)}
    base = {"pearson": pearson_rows(pre, base_dec), "spearman": pearson_rows(rank_pre, rank_dec_all[safe]),
            "overlap": topn_overlap(pre, base_dec, n).astype(np.float64)}
    for v in base.values():
        v[~has_partner] = np.nan
    if not has_partner.any():
        res.notes.append("shuffled baseline needs a second request with decode routing")
    S, L = real["pearson"].shape
    reqs = rc.requests
    res.tables["per_request_layer"] = pa.table({
        "run_id": np.repeat(np.asarray(reqs["run_id"].to_pylist(), dtype=object)[subjects], L),
        "request_id": np.repeat(np.asarray(reqs["request_id"].to_pylist())[subjects], L),
        "group": np.repeat(lab[subjects], L).astype(str),
        "layer": np.tile(rc.layers, S),
        "pearson": real["pearson"].reshape(-1),
        "spearman": real["spearman"].reshape(-1),
        f"top{n}_overlap": real["overlap"].reshape(-1),
        "baseline_run_id": np.repeat(np.asarray(reqs["run_id"].to_pylist(), dtype=object)[np.maximum(partners, 0)], L),
        "baseline_request_id": np.repeat(np.where(has_partner, np.asarray(reqs["request_id"].to_pylist())[np.maximum(partners, 0)], -1), L),
        "baseline_pearson": base["pearson"].reshape(-1),
        "baseline_spearman": base["spearman"].reshape(-1),
        f"baseline_top{n}_overlap": base["overlap"].reshape(-1),
    })
    summ = {k: [] for k in ("group", "requests", "pearson", "baseline_pearson", "spearman", "baseline_spearman",
                            f"top{n}_overlap", f"baseline_top{n}_overlap")}
    groups = ["all"] + sorted(set(lab[subjects]))
    for g in groups:
        m = np.ones(S, dtype=bool) if g == "all" else lab[subjects] == g
        summ["group"].append(g)
        summ["requests"].append(int(m.sum()))
        for name in ("pearson", "spearman"):
            summ[name].append(float(np.nanmean(real[name][m])) if np.isfinite(real[name][m]).any() else float("nan"))
            summ[f"baseline_{name}"].append(float(np.nanmean(base[name][m])) if np.isfinite(base[name][m]).any() else float("nan"))
        summ[f"top{n}_overlap"].append(float(np.nanmean(real["overlap"][m])))
        summ[f"baseline_top{n}_overlap"].append(float(np.nanmean(base["overlap"][m])) if np.isfinite(base["overlap"][m]).any() else float("nan"))
    res.summaries[f"prefill-decode correlation, mean over requests and layers (by {key})"] = pa.table(summ)
    res.arrays.update(real_spearman=real["spearman"], base_spearman=base["spearman"],
                      real_pearson=real["pearson"], base_pearson=base["pearson"], groups=lab[subjects])
    return res
