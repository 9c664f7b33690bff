"""The place speed-ups change no number: evaluate's and microbatch_stats' row chunks (integer counts), and the
validation that builds each fold subset once and one layer's rows at a time (issue 18's speed target)."""
from __future__ import annotations

import numpy as np
import pytest

from tests._placement_synth import planted_traces
from tracekit.placement.scoring import comm
from tracekit.placement import strategies as strat
from tracekit.placement.data.traces import make_split
from tracekit.placement.data.types import make_cluster
from tracekit.placement.scoring.comm import score_placement
from tracekit.placement.select import validate
from tracekit.placement.data.traces import subset


@pytest.fixture(scope="module")
def fitted():
    tr, _ = planted_traces(num_experts=16, top_k=4, layers=3, clusters=4, requests=60, prefill=12, decode=40, seed=7)
    cl = make_cluster(tr, nodes=2, gpus_per_node=2, redundant=4)
    train, test = make_split(tr, "request", 0.3, 0)
    return tr, cl, train, test


@pytest.mark.parametrize("engine", ["sglang", "vllm", "trtllm"])
def test_evaluate_chunks_change_no_number(fitted, monkeypatch, engine):
    tr, cl, train, test = fitted
    te = subset(tr, test)
    p = strat.fit("eplb", subset(tr, train), cl, seed=0)
    whole = score_placement(p, te, engine=engine, decode_batch=8, prefill_chunk=64)
    monkeypatch.setattr(comm, "EVAL_CHUNK_ROWS", 97)  # many uneven chunks over both threads
    monkeypatch.setattr(comm, "MB_CHUNK_ROWS", 13)
    assert len(te) > 20 * 97  # the small chunks do split the rows
    chunked = score_placement(p, te, engine=engine, decode_batch=8, prefill_chunk=64)
    assert chunked.keys() == whole.keys()
    for k, v in whole.items():
        if isinstance(v, float) and np.isnan(v):
            assert np.isnan(chunked[k]), k
        else:
            assert chunked[k] == v, k  # exact: every accumulator is an integer count


def test_validation_values_equal_a_per_fold_fresh_subset(fitted, monkeypatch):
    # validate builds each fold's subsets once (the two request folds swap them); a fresh subset per use must give
    # the same values, per-layer eplb fallback and pick
    tr, cl, train, _ = fitted
    shared = validate(tr, cl, ["linear", "eplb", "locality"], train, seed=0)
    import tracekit.placement.select as sel

    folds = sel.validation_folds
    built = []

    def distinct_masks(*a, **kw):  # the same folds, but no mask object shared between them
        out = [(f.copy(), v.copy()) for f, v in folds(*a, **kw)]
        built.append(len(out))
        return out

    monkeypatch.setattr(sel, "validation_folds", distinct_masks)
    again = validate(tr, cl, ["linear", "eplb", "locality"], train, seed=0)
    assert built == [2]
    assert again.values == shared.values and again.balance == shared.balance
    assert again.eplb_layers == shared.eplb_layers and again.pick == shared.pick
