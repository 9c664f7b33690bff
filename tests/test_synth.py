"""Synthetic generator options: DeepSeek group-limited routing and latent co-activation topics (real runs on disk)."""
from __future__ import annotations

import numpy as np
import pytest

from tracekit.errors import TracekitError
from tracekit.placement.data.stats import coactivation, expert_load
from tracekit.placement.data.traces import load_traces
from tracekit.store import read_manifest
from tracekit.synth import generate_run

SMALL = dict(num_experts=32, top_k=4, moe_layers=[1, 2], requests=40, prompt_tokens=(20, 30),
             decode_tokens=(10, 20), seed=3, bank_size=64)


def test_group_limited_routing_keeps_tokens_in_topk_groups(tmp_path):
    run = generate_run(tmp_path / "g", n_group=8, topk_group=2, **SMALL)
    tr = load_traces([run])
    groups = np.sort(tr.experts.astype(np.int64) // 4, axis=1)  # 8 groups of 4 experts
    distinct = 1 + (np.diff(groups, axis=1) != 0).sum(axis=1)
    assert distinct.max() <= 2
    assert (distinct == 2).mean() > 0.5  # k = 4 rarely fits in one group of 4 under noise
    assert read_manifest(run)["geometry"]["n_group"] == 8
    plain = load_traces([generate_run(tmp_path / "p", **SMALL)])
    g2 = np.sort(plain.experts.astype(np.int64) // 4, axis=1)
    assert (1 + (np.diff(g2, axis=1) != 0).sum(axis=1)).max() > 2  # without groups, tokens spread wider


def _top_pair_lift(tr, top: int = 20) -> float:
    """Mean lift P(i, j) / (P(i) P(j)) of the most co-selected expert pairs, over layers."""
    out = []
    for m in range(tr.num_layers):
        c = coactivation(tr, m).astype(np.float64)
        n = (tr.layer_pos == m).sum()
        p = np.diag(c) / n
        lift = (c / n) / np.outer(p, p)
        np.fill_diagonal(lift, 0)
        out.append(np.sort(lift[np.triu_indices_from(lift, 1)])[-top:].mean())
    return float(np.mean(out))


def test_topics_make_experts_coselected(tmp_path):
    plain = load_traces([generate_run(tmp_path / "p", **SMALL)])
    topics = load_traces([generate_run(tmp_path / "t", topics=8, topic_size=4, topic_boost=20.0, **SMALL)])
    assert _top_pair_lift(topics) > 1.3 * _top_pair_lift(plain)
    assert (expert_load(topics) > 0).sum() == 2 * 32  # every expert still used
    assert read_manifest(tmp_path / "t")["args"]["topics"] == 8


def test_bad_group_or_topic_options(tmp_path):
    with pytest.raises(TracekitError, match="n_group"):
        generate_run(tmp_path / "a", n_group=5, topk_group=2, **SMALL)
    with pytest.raises(TracekitError, match="topic"):
        generate_run(tmp_path / "b", topics=2, topic_size=99, **SMALL)
