"""Every analysis on the real Mixtral traces, checked against numpy/scipy over the raw JSONL; plus the
synthetic generator's planted structure found by the analyses."""
from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon
from scipy.stats import pearsonr, rankdata, spearmanr

from tracekit.analysis.run import analyze
from tracekit.errors import TracekitError
from tracekit.importers.jsonl import import_jsonl
from tracekit.synth import generate_run

from mixtral_raw import FILES, records

E, L = 8, 32


@pytest.fixture(scope="module")
def raw(shared_data):
    return records(shared_data / "traces" / "mixtral-8x7b")


@pytest.fixture(scope="module")
def results(shared_data, tmp_path_factory):
    run = import_jsonl([shared_data / "traces" / "mixtral-8x7b" / f for f in FILES], model="mixtral-8x7b",
                       out=tmp_path_factory.mktemp("a") / "mixtral")
    return analyze(run, by="domain", window=1, seed=3)


def hist(rows, **where) -> np.ndarray:
    """(L, E) expert counts over the raw rows matching ``where``."""
    h = np.zeros((L, E))
    for r in rows:
        if all(r[k] == v for k, v in where.items()):
            for e in r["experts"]:
                h[r["layer"], e] += 1
    return h


def table(res, name):
    return res.tables[name].to_pylist()


def test_imbalance_matches_numpy(results, raw):
    got = {(r["group"], r["layer"]): r for r in table(results["imbalance"], "layers")}
    for group, where in [("all", {}), ("prefill", {"phase": "prefill"}), ("decode", {"phase": "decode"}),
                         ("code", {"domain": "code"}), ("math", {"domain": "math"})]:
        h = hist(raw, **where)
        for l in range(L):
            x = h[l]
            g = got[(group, l)]
            gini = np.abs(x[:, None] - x[None, :]).sum() / (2 * E * E * x.mean())  # mean-difference form
            assert g["max_mean"] == pytest.approx(x.max() / x.mean())
            assert g["cv"] == pytest.approx(np.std(x) / x.mean())
            assert g["gini"] == pytest.approx(gini)
            assert g["hot_share"] == pytest.approx(np.sort(x)[-1] / x.sum())  # ceil(10% of 8) = 1 expert


def test_hot_set_stability_matches_numpy(results, raw):
    n_req = 1 + max(r["request"] for r in raw)
    per_req = [hist(raw, request=q) for q in range(n_req)]
    got = {(r["window"], r["layer"]): r["jaccard"] for r in table(results["imbalance"], "stability")}
    assert len(got) == (n_req - 1) * L
    for w in range(n_req - 1):
        for l in range(L):
            a = int(np.argmax(per_req[w][l]))  # argmax: first (lowest id) among ties
            b = int(np.argmax(per_req[w + 1][l]))
            assert got[(w, l)] == (1.0 if a == b else 0.0)


def test_domain_distances_and_rank_shifts_match_scipy(results, raw):
    code, math = hist(raw, domain="code"), hist(raw, domain="math")
    d = {r["layer"]: r for r in table(results["domain"], "distances")}
    for l in range(L):
        p, q = code[l] / code[l].sum(), math[l] / math[l].sum()
        assert d[l]["js"] == pytest.approx(jensenshannon(p, q, base=2) ** 2, abs=1e-12)
        assert d[l]["tv"] == pytest.approx(0.5 * np.abs(p - q).sum())
    shifts = {(r["group"], r["layer"], r["expert"]): r for r in table(results["domain"], "rank_shifts")}
    for group, mine, rest in [("code", code, math), ("math", math, code)]:
        for l in range(L):
            rg = rankdata(-mine[l], method="ordinal") - 1  # ordinal: ties broken by expert id
            rr = rankdata(-rest[l], method="ordinal") - 1
            for e in range(E):
                s = shifts[(group, l, e)]
                assert (s["rank_in_group"], s["rank_in_rest"], s["rank_shift"]) == (rg[e], rr[e], rr[e] - rg[e])


def test_domain_classifier_matches_sklearn_on_raw_features(results, raw):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    n_req = 1 + max(r["request"] for r in raw)
    X = np.stack([(lambda h: (h / h.sum(1, keepdims=True)).reshape(-1))(hist(raw, request=q)) for q in range(n_req)])
    y = np.array([next(r["domain"] for r in raw if r["request"] == q) for q in range(n_req)])
    pred = np.empty(n_req, dtype=object)
    base = np.empty(n_req, dtype=object)
    for tr, te in StratifiedKFold(2, shuffle=True, random_state=3).split(X, y):  # smallest class: 2 math requests
        pred[te] = LogisticRegression(max_iter=2000).fit(X[tr], y[tr]).predict(X[te])
        vals, cnt = np.unique(y[tr], return_counts=True)
        base[te] = vals[np.argmax(cnt)]
    cls = table(results["domain"], "classifier")[0]
    assert cls["n"] == 5 and cls["folds"] == 2
    assert cls["accuracy"] == pytest.approx((pred == y).mean())
    assert cls["baseline"] == pytest.approx((base == y).mean())


def test_prefill_decode_correlation_matches_scipy(results, raw):
    rows = table(results["correlation"], "per_request_layer")
    assert {r["request_id"] for r in rows} == {4}  # only the raw file has both phases
    pre, dec = hist(raw, request=4, phase="prefill"), hist(raw, request=4, phase="decode")
    partner = {r["baseline_request_id"] for r in rows}
    assert len(partner) == 1 and partner != {4}
    base = hist(raw, request=partner.pop(), phase="decode")
    for r in rows:
        l = r["layer"]
        assert r["pearson"] == pytest.approx(pearsonr(pre[l], dec[l])[0])
        assert r["spearman"] == pytest.approx(spearmanr(pre[l], dec[l])[0])
        assert r["baseline_pearson"] == pytest.approx(pearsonr(pre[l], base[l])[0])
        assert r["baseline_spearman"] == pytest.approx(spearmanr(pre[l], base[l])[0])
        top = lambda v: set(np.argsort(-v, kind="stable")[:2])
        assert r["top2_overlap"] == len(top(pre[l]) & top(dec[l])) / 2


def test_coactivation_and_interlayer_affinity_match_counting(results, raw):
    pairs = Counter()
    for r in raw:
        a, b = sorted(r["experts"])
        pairs[(r["layer"], a, b)] += 1
    got = {(r["layer"], r["expert_a"], r["expert_b"]): r["count"] for r in table(results["coactivation"], "pairs")}
    assert len(got) == L * E * (E - 1) // 2
    for key, n in got.items():
        assert n == pairs.get(key, 0)
    tokens = defaultdict(dict)
    for r in raw:
        tokens[(r["request"], r["phase"], r["token"])][r["layer"]] = r["experts"]
    trans = Counter()
    for layers in tokens.values():
        for l in range(L - 1):
            if l in layers and l + 1 in layers:
                for i in layers[l]:
                    for j in layers[l + 1]:
                        trans[(l, i, j)] += 1
    aff = table(results["coactivation"], "affinity")
    assert len(aff) == (L - 1) * E * E
    for r in aff:
        assert r["count"] == trans.get((r["layer"], r["expert"], r["next_expert"]), 0)
        assert r["next_layer"] == r["layer"] + 1


def test_planted_structure_is_found_in_synthetic_traces(tmp_path):
    run = generate_run(tmp_path / "s", num_experts=32, top_k=4, moe_layers=range(1, 5), requests=48,
                       prompt_tokens=(40, 60), decode_tokens=(20, 30), seed=5, affinity=0.9, domain_shift=6.0)
    res = analyze(run, what="imbalance,domain,correlation", by="domain", seed=0)
    corr = res["correlation"].summaries[next(iter(res["correlation"].summaries))].to_pylist()[0]
    assert corr["spearman"] > corr["baseline_spearman"] + 0.1
    assert corr["top4_overlap"] > corr["baseline_top4_overlap"]
    cls = res["domain"].tables["classifier"].to_pylist()[0]
    assert cls["accuracy"] > cls["baseline"] + 0.3
    imb = {(r["group"], r["layer"]): r for r in res["imbalance"].tables["layers"].to_pylist()}
    assert min(imb[("all", l)]["max_mean"] for l in range(1, 5)) > 1.2


def test_imbalance_from_engine_counts_matches_numpy(tmp_path):
    """Count-only runs (SGLang stat dumps -> loads table) get the load analysis, equal to numpy over the raw dump."""
    import torch

    from tracekit.importers.engines import import_engine_run

    rng = np.random.default_rng(7)
    lc = rng.integers(0, 40, (6, 4, 16)).astype(np.int32)  # (forward passes, layers, experts)
    lc[:, 0] = 0  # layer 0 is dense
    lc[:, 2, :3] *= 5  # a few hot experts in layer 2
    torch.save({"rank": 0, "logical_count": torch.from_numpy(lc)}, tmp_path / "expert_distribution_recorder_1.pt")
    run = tmp_path / "run"
    import_engine_run("sglang-stat", [tmp_path / "expert_distribution_recorder_1.pt"], run,
                      model="experts=16,top_k=2,moe_layers=1-3,num_layers=4,name=t")
    res = analyze(run)
    assert list(res) == ["imbalance"] and any("per-token routes" in n for n in res["imbalance"].notes)
    load = lc[:, 1:].sum(0).astype(float)  # (3 MoE layers, E)
    np.testing.assert_allclose(res["imbalance"].arrays["max_mean"], load.max(1) / load.mean(1))
    np.testing.assert_array_equal(res["imbalance"].arrays["load"], load)
    with pytest.raises(TracekitError, match="needs per-token routes"):
        analyze(run, what="imbalance,domain")
