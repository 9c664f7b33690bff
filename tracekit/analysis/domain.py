"""Finding 2: domain-specific expert popularity (code, math, chat, general)."""
from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa

from .data import PHASES
from . import kernels
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


def pairwise_js(group_loads: np.ndarray) -> np.ndarray:
    """group_loads: (..., G, L, E) counts -> (..., L): mean Jensen-Shannon divergence (bits) over the group pairs
    (a group with no load in a layer is left out of that layer's pairs)."""
    p = normalize(group_loads)
    G = group_loads.shape[-3]
    vals = [js_divergence(p[..., a, :, :], p[..., b, :, :]) for a in range(G) for b in range(a + 1, G)]
    if not vals:
        return np.full(group_loads.shape[:-3] + group_loads.shape[-2:-1], np.nan)
    with np.errstate(invalid="ignore"):
        return np.nanmean(np.stack(vals), axis=0)


def shuffled_group_js(X: np.ndarray, codes: np.ndarray, groups: int, permutations: int = 100,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """X: (N, L, E) per-request counts, codes: (N,) group of each request -> (real (L,), shuffled (P, L)): the mean
    pairwise JS divergence of the groups' summed distributions, with the true labels and with ``permutations``
    random permutations of them (same group sizes, same requests)."""
    N, L, E = X.shape
    flat = X.reshape(N, L * E)
    rng = np.random.default_rng(seed)

    def stat(c):
        onehot = np.zeros((groups, N))
        onehot[c, np.arange(N)] = 1.0
        return pairwise_js((onehot @ flat).reshape(groups, L, E))

    return stat(codes), np.stack([stat(rng.permutation(codes)) for _ in range(permutations)]) if permutations \
        else np.zeros((0, L))


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
    Returns {accuracy, baseline, folds, n}; accuracy is NaN when a class has fewer than 2 requests. The model is
    fitted on :func:`row_space_features` by Newton-CG to a tight tolerance (1e-8): the optimum that sklearn's
    default (L-BFGS, tolerance 1e-4) approximates on the raw features; predictions at the optimum are equal (checked
    on 1,000 x 14,848), and Newton-CG gets there in ~10 iterations where L-BFGS needs ~230.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(labels)
    classes, sizes = np.unique(labels, return_counts=True)
    n = len(labels)
    if len(classes) < 2 or sizes.min() < 2:
        return {"accuracy": float("nan"), "baseline": float("nan"), "folds": 0, "n": n}
    folds = int(min(max_folds, sizes.min()))
    features = row_space_features(np.asarray(features, dtype=np.float64))
    correct = base = 0
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(features, labels):
        clf = LogisticRegression(solver="newton-cg", max_iter=1000, tol=1e-8).fit(features[train], labels[train])
        correct += int((clf.predict(features[test]) == labels[test]).sum())
        vals, cnt = np.unique(labels[train], return_counts=True)
        base += int((labels[test] == vals[np.argmax(cnt)]).sum())
    return {"accuracy": correct / n, "baseline": base / n, "folds": folds, "n": n}


def row_space_features(X: np.ndarray) -> np.ndarray:
    """(R, F) -> (R, r) features Z = X Q, Q (F, r) orthonormal spanning X's rows (r = rank <= R), when F > R.

    An L2-penalised linear model's weights lie in the span of its training rows, and rotating the features by an
    orthonormal Q changes neither the penalty nor any inner product, so a logistic regression on Z fits the same
    model as on X (same predictions, up to the solver's tolerance) while it optimises R instead of F = layers x
    experts weights per class (14,848 for DeepSeek V3: the fit went from ~20 s to well under a second). Z comes
    from the Gram matrix: X X^T = U diag(w) U^T, Z = U diag(sqrt(w))."""
    R, F = X.shape
    if F <= R:
        return X
    w, U = np.linalg.eigh(X @ X.T)
    keep = w > max(float(w.max(initial=0.0)), 1e-300) * R * np.finfo(np.float64).eps
    return U[:, keep] * np.sqrt(w[keep])


CLASSIFIER_MAX_SAMPLES = 1000  # beyond this the classifier is trained on a seeded random sample (time, memory)


def classifier_sample(R: int, features: int, budget_bytes: int, per_request: int = 1, seed: int = 0) -> np.ndarray:
    """Sorted global numbers of the requests whose routing signature the classifier sees: all ``R`` when their
    features (``per_request`` rows of ``features`` float64 each) fit ``budget_bytes`` and
    :data:`CLASSIFIER_MAX_SAMPLES`; else a seeded uniform sample of that many."""
    n = min(CLASSIFIER_MAX_SAMPLES, max(2, budget_bytes // (8 * features * per_request)))
    if R <= n:
        return np.arange(R)
    return np.sort(np.random.default_rng(seed).choice(R, n, replace=False))


class DomainAccumulator:
    """Domain specificity from request batches: the (G, L, E) loads of the ``by`` groups (request labels, or the
    two phases for ``by='phase'``) and the routing signatures of the ``sample`` requests for the classifier."""

    def __init__(self, labels: np.ndarray | None, by: str, layers: np.ndarray, num_experts: int,
                 sample: np.ndarray, total_requests: int, seed: int = 0):
        L, E = len(layers), num_experts
        self.by, self.layers, self.seed, self.total = by, layers, seed, total_requests
        self.names = list(PHASES) if by == "phase" else sorted(set(labels))
        self.group_of = None if by == "phase" else np.searchsorted(np.asarray(self.names, dtype=object), labels)
        self.loads = np.zeros((len(self.names), L, E), dtype=np.int64)
        self.sample = sample
        per = 2 if by == "phase" else 1
        self.X = np.zeros((len(sample) * per, L * E))  # expert counts, normalised per layer in result()
        self.y = np.full(len(sample) * per, None, dtype=object)
        self.filled = np.zeros(len(sample) * per, dtype=bool)

    def add(self, batch) -> None:
        """``batch``: a :class:`.scan.SparseBatch`."""
        L, E = len(self.layers), self.loads.shape[2]
        groups = np.full(batch.n, -1, dtype=np.int64) if self.by == "phase" else self.group_of[batch.index]
        by_phase = np.zeros((2, L, E), dtype=np.int64)
        kernels.add_loads(batch.ptr, batch.expert, batch.prefill, batch.decode, groups, L, by_phase,
                          self.loads if self.by != "phase" else by_phase[:0])
        if self.by == "phase":
            self.loads += by_phase
        pos = np.searchsorted(self.sample, batch.index)
        hit = (pos < len(self.sample)) & (self.sample[np.minimum(pos, len(self.sample) - 1)] == batch.index)
        if not hit.any():
            return
        kernels.add_rows_of_slots(batch.ptr, batch.expert, batch.prefill, batch.decode,
                                  np.where(hit, pos, -1).astype(np.int64), L, E, self.by == "phase", self.X)
        p = pos[hit]
        if self.by == "phase":
            for ph in range(2):
                self.y[2 * p + ph] = PHASES[ph]
                self.filled[2 * p + ph] = self.X[2 * p + ph].sum(axis=1) > 0
        else:
            self.y[p] = np.asarray(self.names, dtype=object)[self.group_of[batch.index[hit]]]
            self.filled[p] = True

    def result(self, top: int = 10) -> AnalysisResult:
        res = domain_result(self.loads, self.names, self.layers, self.by, top)
        if len(self.names) < 2 or res.notes:
            return res
        L, E = len(self.layers), self.loads.shape[2]
        X = routing_signature(self.X[self.filled].reshape(-1, L, E))  # counts -> each layer's expert shares
        y = self.y[self.filled].astype(str)
        cls = classify(X, y, seed=self.seed)
        unit = "request histograms (one per request and phase)" if self.by == "phase" else "requests"
        res.tables["classifier"] = pa.table({k: [v] for k, v in cls.items()})
        res.arrays["classifier"] = cls
        self._shuffled_baseline(res, X.reshape(-1, L, E), y)
        res.summaries[f"predict a request's {self.by} from its routing"] = pa.table(
            {"requests": [cls["n"]], "folds": [cls["folds"]], "accuracy": [cls["accuracy"]],
             "majority_baseline": [cls["baseline"]]})
        if len(self.sample) < self.total:
            res.notes.append(f"classifier trained and scored on a random sample of {len(self.sample)} of "
                             f"{self.total} requests (seed {self.seed}; memory budget and time)")
        if self.by == "phase":
            res.notes.append(f"--by phase: the classifier predicts the phase of each of {cls['n']} {unit}")
        if cls["folds"] == 0:
            res.notes.append(f"classifier skipped: every {self.by} needs at least 2 requests")
        return res


    PERMUTATION_WORK = 2_000_000_000  # multiply-adds the shuffled-label baseline may spend (about a second or two)

    def _shuffled_baseline(self, res: AnalysisResult, shares: np.ndarray, y: np.ndarray) -> None:
        """The domain statistic on the classifier's sample with the true and with shuffled labels (the baseline of
        the report's finding): ``shares`` (N, L, E) per-request expert shares, ``y`` (N,) labels."""

        names = sorted(set(y))
        if len(names) < 2:
            return
        codes = np.searchsorted(np.asarray(names, dtype=object), y.astype(object))
        N, L, E = shares.shape
        perms = int(np.clip(self.PERMUTATION_WORK // max(1, len(names) * N * L * E), 20, 200))
        real, shuffled = shuffled_group_js(shares, codes, len(names), perms, self.seed)
        res.arrays.update(js_sample=real, js_shuffled=shuffled, js_requests=N, js_groups=names)


def domain_result(loads: np.ndarray, names: list[str], layers: np.ndarray, key: str, top: int = 10) -> AnalysisResult:
    """Distances between the groups' expert distributions per layer and the experts whose popularity rank
    shifts most between a group and the rest; ``loads`` (G, L, E) of the groups ``names``."""
    res = AnalysisResult("domain")
    keep = loads.sum(axis=(1, 2)) > 0
    names = [n for n, k in zip(names, keep) if k]
    loads = loads[keep]
    res.arrays["groups"] = names
    res.arrays["loads"] = loads
    res.arrays["layers"] = layers
    if len(names) < 2:
        res.notes.append(f"only one {key} ({names[0] if names else 'none'}): nothing to compare")
        return res
    p = normalize(loads)
    pair_rows = {k: [] for k in ("layer", "group_a", "group_b", "js", "tv")}
    summ = {k: [] for k in ("group_a", "group_b", "mean_js", "max_js", "max_js_layer", "mean_tv")}
    for a, b in itertools.combinations(range(len(names)), 2):
        js, tv = js_divergence(p[a], p[b]), tv_distance(p[a], p[b])
        pair_rows["layer"] += layers.tolist()
        pair_rows["group_a"] += [names[a]] * len(layers)
        pair_rows["group_b"] += [names[b]] * len(layers)
        pair_rows["js"] += js.tolist()
        pair_rows["tv"] += tv.tolist()
        i = int(np.nanargmax(js))
        for k, v in (("group_a", names[a]), ("group_b", names[b]), ("mean_js", float(np.nanmean(js))),
                     ("max_js", float(js[i])), ("max_js_layer", int(layers[i])), ("mean_tv", float(np.nanmean(tv)))):
            summ[k].append(v)
    res.tables["distances"] = pa.table(pair_rows)
    res.summaries[f"{key} distance per pair (over layers)"] = pa.table(summ)

    total = loads.sum(0)
    L, E = total.shape
    G = len(names)
    rg = np.stack([popularity_rank(loads[d]) for d in range(G)])
    rr = np.stack([popularity_rank(total - loads[d]) for d in range(G)])
    shift = rr - rg  # > 0: more popular in the group than in the rest
    shifts = pa.table({
        "group": pa.DictionaryArray.from_arrays(np.repeat(np.arange(G, dtype=np.int32), L * E), pa.array(names)),
        "layer": np.tile(np.repeat(layers, E), G),
        "expert": np.tile(np.arange(E), G * L),
        "rank_in_group": rg.reshape(-1),
        "rank_in_rest": rr.reshape(-1),
        "rank_shift": shift.reshape(-1),
        "share_in_group": normalize(loads).reshape(-1),
        "share_in_rest": normalize(total[None] - loads).reshape(-1),
    })
    res.tables["rank_shifts"] = shifts
    order = np.argsort(-np.abs(shift.reshape(-1)), kind="stable")[:top]
    res.summaries[f"experts whose rank shifts most ({key} vs the rest)"] = shifts.take(order).select(
        ["group", "layer", "expert", "rank_in_group", "rank_in_rest", "rank_shift", "share_in_group", "share_in_rest"])
    res.arrays["share_diff"] = normalize(loads) - normalize(total)[None]
    return res
