"""`tracekit diff A B`: how two run sets route differently, against the noise of their own sampling.

Load shift per layer and expert (shares of the expert assignments), with the noise level from a bootstrap over
requests (Poisson(1) weights per request, the requests' tokens moving together); the change of the per-layer
imbalance; and, for routes runs, the change of the domain shift and of the prefill-decode correlation.

An expert is flagged when its share difference exceeds ``z_crit`` bootstrap standard errors, z_crit Bonferroni-
corrected over every (layer, expert) cell (5% family-wise); a layer is flagged when its total variation distance
exceeds the bootstrap's null TV (mean + z_crit(layers) standard deviations), the TV two samples of the same
routing would show.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import pyarrow as pa

from .errors import TracekitError

BOOTSTRAP = 200
ALPHA = 0.05

REQUEST_LOADS_SQL = """
WITH c AS (
    SELECT run_id, request_id, layer, expert::BIGINT AS expert, count(*)::BIGINT AS n
    FROM choices WHERE phase IN ('prefill', 'decode') AND expert IS NOT NULL
    GROUP BY ALL)
SELECT (dense_rank() OVER (ORDER BY run_id, request_id) - 1)::BIGINT AS r, layer::BIGINT AS layer, expert, n FROM c
"""


@dataclass
class RequestLoads:
    """Sparse per-request expert counts of one run set: entry i is ``n[i]`` choices of expert ``expert[i]`` in MoE
    layer ``layers[layer_pos[i]]`` by request ``req[i]`` (0..R-1)."""

    req: np.ndarray
    layer_pos: np.ndarray
    expert: np.ndarray
    n: np.ndarray
    R: int
    layers: np.ndarray
    num_experts: int
    top_k: int
    label: str = ""

    def matrix(self, layers: np.ndarray):
        """(R, len(layers) * E) sparse counts of the given layers (absolute indices)."""
        from scipy.sparse import csr_matrix

        pos = np.full(int(max(self.layers.max(initial=0), layers.max(initial=0))) + 1, -1, dtype=np.int64)
        pos[layers] = np.arange(len(layers))
        lp = pos[self.layers[self.layer_pos]]
        ok = lp >= 0
        E = self.num_experts
        return csr_matrix((self.n[ok].astype(np.float64), (self.req[ok], lp[ok] * E + self.expert[ok])),
                          shape=(self.R, len(layers) * E))


def request_loads(runs, memory_limit: str | None = None, label: str = "") -> RequestLoads:
    """Read a run set's per-request expert counts (one aggregating query)."""
    from .analysis.data import geometry
    from .query import connect, fetch_arrow, run_sql

    con = connect(runs, memory_limit=memory_limit)
    try:
        geo = geometry(con)
        t = fetch_arrow(run_sql(con, REQUEST_LOADS_SQL))
        R = int(fetch_arrow(run_sql(con, "SELECT count(*) AS n FROM requests"))["n"][0].as_py())
    finally:
        con.close()
    layer = t["layer"].to_numpy()
    expert = t["expert"].to_numpy()
    ok = np.isin(layer, geo.layers) & (expert >= 0) & (expert < geo.num_experts)
    return RequestLoads(t["r"].to_numpy()[ok], np.searchsorted(geo.layers, layer[ok]), expert[ok],
                        t["n"].to_numpy()[ok], max(R, int(t["r"].to_numpy().max(initial=-1)) + 1), geo.layers,
                        geo.num_experts, geo.top_k, label)


def bootstrap_loads(m, draws: int, rng: np.random.Generator) -> np.ndarray:
    """m: (R, C) sparse counts -> (draws, C) column sums with Poisson(1) weights per request (row)."""
    w = rng.poisson(1.0, size=(draws, m.shape[0])).astype(np.float64)
    return np.asarray((m.T @ w.T).T)


def _shares(x: np.ndarray, L: int, E: int) -> np.ndarray:
    x = x.reshape(x.shape[:-1] + (L, E))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nan_to_num(x / x.sum(-1, keepdims=True))


def _max_mean(x: np.ndarray, L: int, E: int) -> np.ndarray:
    x = x.reshape(x.shape[:-1] + (L, E))
    with np.errstate(invalid="ignore", divide="ignore"):
        return x.max(-1) / (x.sum(-1) / E)


def compare_loads(a: RequestLoads, b: RequestLoads, draws: int = BOOTSTRAP, seed: int = 0) -> dict:
    """Load shift B - A per shared MoE layer and expert, with bootstrap noise.

    Returns arrays: ``layers`` (L,), ``share_a``/``share_b``/``diff``/``z`` (L, E) (None when the expert counts
    differ: only the imbalance is compared), ``tv``/``tv_null``/``tv_limit`` (L,), ``layer_shifted`` (L,) bool,
    ``expert_flag`` (L, E) bool, ``z_crit``, ``max_mean_a``/``max_mean_b``/``max_mean_z`` (L,), ``tokens_a``/
    ``tokens_b`` (L,)."""
    from scipy.stats import norm

    layers = np.intersect1d(a.layers, b.layers)
    if layers.size == 0:
        raise TracekitError(f"the two run sets share no MoE layer (A: {a.layers.min()}..{a.layers.max()}, "
                            f"B: {b.layers.min()}..{b.layers.max()})")
    L = len(layers)
    rng = np.random.default_rng(seed)
    out: dict = {"layers": layers}
    mm = {}
    for side, s in (("a", a), ("b", b)):
        m = s.matrix(layers)
        load = np.asarray(m.sum(0)).reshape(-1)
        boot = bootstrap_loads(m, draws, rng)
        out[f"tokens_{side}"] = np.round(load.reshape(L, s.num_experts).sum(1) / max(s.top_k, 1)).astype(np.int64)
        out[f"max_mean_{side}"] = _max_mean(load, L, s.num_experts)
        mm[side] = _max_mean(boot, L, s.num_experts)
        out[f"_load_{side}"], out[f"_boot_{side}"] = load, boot
    se = np.sqrt(np.nanvar(mm["a"], 0) + np.nanvar(mm["b"], 0))
    with np.errstate(invalid="ignore", divide="ignore"):
        out["max_mean_z"] = (out["max_mean_b"] - out["max_mean_a"]) / se
    same_e = a.num_experts == b.num_experts
    if not same_e:
        for k in ("share_a", "share_b", "diff", "z", "tv", "tv_null", "tv_limit", "layer_shifted", "expert_flag"):
            out[k] = None
        out["z_crit"] = float("nan")
    else:
        E = a.num_experts
        sa, sb = _shares(out["_load_a"], L, E), _shares(out["_load_b"], L, E)
        ba, bb = _shares(out["_boot_a"], L, E), _shares(out["_boot_b"], L, E)
        d = sb - sa
        se = np.sqrt(ba.var(0) + bb.var(0))
        with np.errstate(invalid="ignore", divide="ignore"):
            z = np.where(se > 0, d / np.where(se > 0, se, 1), np.where(d == 0, 0.0, np.inf))
        z_crit = float(norm.isf(ALPHA / 2 / (L * E)))
        null = 0.5 * np.abs((ba - sa) - (bb - sb)).sum(-1)  # (draws, L): the TV of sampling noise alone
        tv = 0.5 * np.abs(d).sum(-1)
        limit = null.mean(0) + float(norm.isf(ALPHA / L)) * null.std(0)
        out.update(share_a=sa, share_b=sb, diff=d, z=z, z_crit=z_crit, tv=tv, tv_null=null.mean(0), tv_limit=limit,
                   layer_shifted=tv > limit, expert_flag=np.abs(z) > z_crit)
    for k in [k for k in out if k.startswith("_")]:
        del out[k]
    return out


@dataclass
class DiffResult:
    summaries: dict[str, pa.Table] = field(default_factory=dict)
    tables: dict[str, pa.Table] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    arrays: dict = field(default_factory=dict)


def diff_result(c: dict, label_a: str, label_b: str, top: int = 10) -> DiffResult:
    """Tables and sentences of :func:`compare_loads`'s output."""
    res = DiffResult(arrays=c)
    layers = c["layers"]
    L = len(layers)
    cols = {"layer": layers, "tokens_a": c["tokens_a"], "tokens_b": c["tokens_b"],
            "max_mean_a": c["max_mean_a"], "max_mean_b": c["max_mean_b"], "max_mean_z": c["max_mean_z"]}
    if c["tv"] is not None:
        cols.update(tv=c["tv"], tv_noise=c["tv_null"], tv_limit=c["tv_limit"], shifted=c["layer_shifted"],
                    experts_flagged=c["expert_flag"].sum(1))
    res.tables["layers"] = pa.table(cols)
    res.summaries["load shift per layer (B vs A)"] = res.tables["layers"]
    z_l = float(__import__("scipy.stats", fromlist=["norm"]).norm.isf(ALPHA / 2 / L))
    imb = np.abs(c["max_mean_z"]) > z_l
    if c["tv"] is None:
        res.lines.append(f"{label_a} and {label_b} have different expert counts: compared by imbalance only.")
    else:
        E = c["diff"].shape[1]
        res.tables["experts"] = pa.table({
            "layer": np.repeat(layers, E), "expert": np.tile(np.arange(E), L),
            "share_a": c["share_a"].reshape(-1), "share_b": c["share_b"].reshape(-1), "diff": c["diff"].reshape(-1),
            "z": c["z"].reshape(-1), "flagged": c["expert_flag"].reshape(-1)})
        order = np.argsort(-np.abs(np.nan_to_num(c["z"].reshape(-1), posinf=1e300)), kind="stable")[:top]
        res.summaries["experts whose share shifts most (|z| = shift / bootstrap noise)"] = \
            res.tables["experts"].take(order)
        shifted = int(c["layer_shifted"].sum())
        flagged = int(c["expert_flag"].sum())
        res.lines.append(
            f"Load shift: {shifted} of {L} layer{'s' if L != 1 else ''} route differently beyond noise (total variation "
            f"{np.mean(c['tv']):.3f} on average against {np.mean(c['tv_null']):.3f} between two bootstrap samples of "
            f"the same runs); {flagged} of {L * E} (layer, expert) shares differ by more than {c['z_crit']:.1f} "
            "bootstrap standard errors.")
    res.lines.append(f"Imbalance: max/mean load {np.nanmean(c['max_mean_a']):.2f} (A) vs "
                     f"{np.nanmean(c['max_mean_b']):.2f} (B) on average; {int(imb.sum())} of {L} layers differ "
                     "beyond noise.")
    return res


def _finding_values(runs, by: str, seed: int, memory_budget) -> dict:
    from .analysis.run import analyze

    return finding_values(analyze(runs, what="domain,correlation", by=by, seed=seed, memory_budget=memory_budget))


def finding_values(res: dict) -> dict:
    """The domain shift and prefill-decode gap of analysis results (``res["domain"]``, ``res["correlation"]``)."""
    dom, cor = res["domain"], res["correlation"]
    out = {}
    if dom.arrays.get("js_sample") is not None:
        out["js"] = float(np.nanmean(dom.arrays["js_sample"]))
        out["js_shuffled95"] = float(np.nanpercentile(np.nanmean(dom.arrays["js_shuffled"], 1), 95))
    if cor.arrays.get("real_spearman") is not None:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            d = np.nanmean(cor.arrays["real_spearman"], 1) - np.nanmean(cor.arrays["base_spearman"], 1)
        out["gap"] = d[np.isfinite(d)]
    return out


def finding_changes(fa: dict, fb: dict, by: str) -> tuple[pa.Table, list[str]]:
    """Domain shift and prefill-decode correlation of A and B, and whether they changed beyond noise."""
    from scipy.stats import norm

    rows = {k: [] for k in ("finding", "a", "b", "change", "noise", "beyond_noise")}
    lines = []
    if "js" in fa and "js" in fb:
        noise = max(fa["js_shuffled95"], fb["js_shuffled95"])
        ch = fb["js"] - fa["js"]
        beyond = abs(ch) > noise
        rows["finding"].append(f"{by} shift (mean JS, bits)")
        for k, v in (("a", fa["js"]), ("b", fb["js"]), ("change", ch), ("noise", noise), ("beyond_noise", beyond)):
            rows[k].append(v)
        lines.append(f"{by.capitalize()} shift: mean JS divergence between {by}s {fa['js']:.4f} (A) vs {fb['js']:.4f} "
                     f"(B); the shuffled-label level is {noise:.4f}: {'changed' if beyond else 'no change'} beyond noise.")
    if fa.get("gap") is not None and fb.get("gap") is not None and fa["gap"].size > 1 and fb["gap"].size > 1:
        ga, gb = fa["gap"], fb["gap"]
        ch = gb.mean() - ga.mean()
        se = np.sqrt(ga.var(ddof=1) / ga.size + gb.var(ddof=1) / gb.size)
        noise = float(norm.isf(ALPHA / 2) * se)
        beyond = bool(abs(ch) > noise)
        rows["finding"].append("prefill-decode gap (own - other decode, Spearman)")
        for k, v in (("a", ga.mean()), ("b", gb.mean()), ("change", ch), ("noise", noise), ("beyond_noise", beyond)):
            rows[k].append(float(v) if k != "beyond_noise" else v)
        lines.append(f"Prefill-decode correlation: own-minus-other Spearman {ga.mean():+.2f} (A) vs {gb.mean():+.2f} "
                     f"(B), change {ch:+.2f} against a 95% noise level of {noise:.2f}: "
                     f"{'changed' if beyond else 'no change'} beyond noise.")
    return pa.table(rows) if rows["finding"] else pa.table({"finding": pa.array([], pa.string())}), lines


def diff_runs(a: str | os.PathLike | Iterable, b: str | os.PathLike | Iterable, *, by: str = "domain",
              draws: int = BOOTSTRAP, seed: int = 0, findings: bool = True, memory_budget: str | None = None,
              label_a: str = "A", label_b: str = "B", analysed_a: dict | None = None) -> DiffResult:
    """Compare run set ``b`` against run set ``a`` (see the module docstring). ``analysed_a``: ``a``'s analysis
    results when the caller has them already (the report), so its findings are not computed twice."""
    from .analysis.budget import MemoryBudget

    budget = MemoryBudget.of(memory_budget)
    la = request_loads(a, budget.duckdb_limit, label_a)
    lb = request_loads(b, budget.duckdb_limit, label_b)
    res = diff_result(compare_loads(la, lb, draws=draws, seed=seed), label_a, label_b)
    if findings:
        fa = finding_values(analysed_a) if analysed_a is not None else _finding_values(a, by, seed, budget)
        table, lines = finding_changes(fa, _finding_values(b, by, seed, budget), by)
        res.summaries["findings, A vs B"] = table
        res.tables["findings"] = table
        res.lines += lines
    return res
