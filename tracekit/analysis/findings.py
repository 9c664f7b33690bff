"""The three findings stated as sentences: each measured value against its baseline, and whether it holds.

* Imbalance: max / mean expert load per layer against uniform routing of the same token count (a dispersion
  band from simulated uniform top-k loads); holds when most layers lie above the band.
* Domain shift: the mean Jensen-Shannon divergence between the groups' expert distributions against the same
  statistic with the group labels shuffled over the same requests; holds above the shuffled 95th percentile.
* Prefill-decode correlation: a request's decode against its own prefill vs another request's decode (Spearman);
  holds when a bootstrap interval over requests of the difference lies above 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BAND = (5.0, 95.0)  # percentiles of the uniform-routing dispersion band
UNIFORM_DRAWS = 400


@dataclass
class Finding:
    """One finding: ``name``, its ``sentence``, ``holds`` (True/False, None when it cannot be tested)."""

    name: str
    sentence: str
    holds: bool | None

    @property
    def verdict(self) -> str:
        return {True: "holds", False: "does not hold", None: "not tested"}[self.holds]


def uniform_max_mean(tokens: np.ndarray, num_experts: int, top_k: int, draws: int = UNIFORM_DRAWS,
                     seed: int = 0) -> np.ndarray:
    """max / mean expert load under uniform top-k routing: tokens (L,) token counts per layer -> (draws, L).

    Each token picks ``top_k`` distinct experts uniformly. The count vector of T such tokens has the covariance of
    a multinomial of T * top_k draws over E equal cells scaled by (E - k) / (E - 1), so a multinomial draw with its
    deviations from the mean shrunk by sqrt((E - k) / (E - 1)) has the same first two moments (exact in the
    Gaussian limit, which is where T is large)."""
    E, k = int(num_experts), int(top_k)
    tokens = np.asarray(tokens, dtype=np.int64)
    out = np.full((draws, len(tokens)), np.nan)
    rng = np.random.default_rng(seed)
    shrink = np.sqrt((E - k) / (E - 1)) if E > 1 else 0.0
    for t in np.unique(tokens):
        if t <= 0 or E < 1:
            continue
        n = int(t) * k
        m = rng.multinomial(n, np.full(E, 1.0 / E), size=draws).astype(np.float64)
        mean = n / E
        loads = mean + (m - mean) * shrink
        out[:, tokens == t] = (loads.max(1) / mean)[:, None]
    return out


def imbalance_finding(load: np.ndarray, layers: np.ndarray, top_k: int, seed: int = 0) -> tuple[Finding, dict]:
    """load: (L, E) assignments of all tokens -> (Finding, {"median", "lo", "hi": (L,) uniform band})."""
    load = np.asarray(load, dtype=np.float64)
    L, E = load.shape
    tokens = np.round(load.sum(1) / max(top_k, 1)).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        measured = load.max(1) / (load.sum(1) / E)
    sim = uniform_max_mean(tokens, E, top_k, seed=seed)
    band = {"median": np.nanmedian(sim, 0), "lo": np.nanpercentile(sim, BAND[0], 0),
            "hi": np.nanpercentile(sim, BAND[1], 0)}
    ok = np.isfinite(measured) & np.isfinite(band["hi"])
    if not ok.any():
        return Finding("imbalance", "Load imbalance: no layer has any token; nothing to measure.", None), band
    above = int((measured[ok] > band["hi"][ok]).sum())
    worst = int(np.nanargmax(np.where(ok, measured, np.nan)))
    holds = above > ok.sum() / 2
    s = (f"Load imbalance: the busiest expert carries {np.nanmean(measured[ok]):.2f}x the mean load on average over "
         f"{int(ok.sum())} MoE layer{'s' if ok.sum() != 1 else ''} (worst {measured[worst]:.2f}x, layer "
         f"{int(layers[worst])}), against {np.nanmean(band['median'][ok]):.2f}x for uniform routing of the same "
         f"token count ({BAND[1] - BAND[0]:.0f}% band {np.nanmean(band['lo'][ok]):.2f}-"
         f"{np.nanmean(band['hi'][ok]):.2f}x); {above} of {int(ok.sum())} layers lie above the band: "
         f"{'holds' if holds else 'does not hold'}.")
    return Finding("imbalance", s, bool(holds)), band


def domain_finding(real: np.ndarray | None, shuffled: np.ndarray | None, key: str, groups: list[str], n: int,
                   classifier: dict | None = None) -> Finding:
    """real (L,), shuffled (P, L) from :func:`tracekit.analysis.domain.shuffled_group_js` on ``n`` requests of ``groups``."""
    if real is None or shuffled is None or len(groups) < 2 or not np.isfinite(real).any():
        return Finding("domain", f"Domain shift: only one {key} ({', '.join(groups) or 'none'}); nothing to compare.",
                       None)
    m = float(np.nanmean(real))
    sh = np.nanmean(shuffled, axis=1)
    p95 = float(np.nanpercentile(sh, 95)) if sh.size else float("nan")
    holds = bool(sh.size and m > p95)
    s = (f"Domain shift: the expert distributions of the {len(groups)} {key}s ({', '.join(groups)}) differ by a mean "
         f"Jensen-Shannon divergence of {m:.4f} bits per layer over {n} requests, against {float(np.mean(sh)):.4f} "
         f"(95th percentile {p95:.4f}) with the {key} labels shuffled over the same requests")
    if classifier and np.isfinite(classifier.get("accuracy", np.nan)):
        s += (f"; a classifier tells a request's {key} from its routing {classifier['accuracy']:.0%} of the time "
              f"(majority guess {classifier['baseline']:.0%})")
    return Finding("domain", s + f": {'holds' if holds else 'does not hold'}.", holds)


def bootstrap_mean_interval(v: np.ndarray, draws: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """(N,) values -> the ``level`` percentile interval of their mean over ``draws`` bootstrap resamples."""
    v = np.asarray(v, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.size, size=(draws, v.size)) if v.size * draws <= 20_000_000 else None
    if idx is not None:
        means = v[idx].mean(1)
    else:  # large N: the mean's sampling distribution is normal
        se = v.std() / np.sqrt(v.size)
        means = v.mean() + se * rng.standard_normal(draws)
    a = (1 - level) / 2 * 100
    return float(np.percentile(means, a)), float(np.percentile(means, 100 - a))


def correlation_finding(real: np.ndarray | None, base: np.ndarray | None, note: str = "", seed: int = 0) -> Finding:
    """real, base: (S, L) Spearman correlations of each request's prefill with its own decode and with another
    request's decode."""
    if real is None or base is None or real.size == 0:
        return Finding("correlation", "Prefill-decode correlation: " + (note or "no request has both phases") + ".",
                       None)
    with np.errstate(invalid="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            r, b = np.nanmean(real, 1), np.nanmean(base, 1)
    paired = np.isfinite(r) & np.isfinite(b)
    if not paired.any():
        return Finding("correlation", f"Prefill-decode correlation: mean Spearman {np.nanmean(r):.2f} between a "
                       "request's prefill and its own decode; no shuffled baseline (too few requests with decode).",
                       None)
    d = r[paired] - b[paired]
    lo, hi = bootstrap_mean_interval(d, seed=seed)
    holds = bool(lo > 0)
    s = (f"Prefill-decode correlation: a request's decode routes like its own prefill with mean Spearman "
         f"{r[paired].mean():.2f} over {int(paired.sum())} requests, against {b[paired].mean():.2f} for another "
         f"request's decode (difference {d.mean():+.2f}, 95% bootstrap interval over requests {lo:+.2f} to "
         f"{hi:+.2f}): {'holds' if holds else 'does not hold'}.")
    return Finding("correlation", s, holds)
