"""Baselines: linear / round-robin layouts, DeepSeek EPLB (global and hierarchical), and the strategy registry."""
from __future__ import annotations

import numpy as np
import pytest

from tracekit.errors import TracekitError
from tracekit.placement import strategies
from tracekit.placement.scoring import comm
from tracekit.placement.strategies import baselines
from tracekit.placement.strategies.eplb import balanced_packing, eplb, replicate_experts
from tracekit.placement.data.types import Cluster, TraceArrays


def expected_gpu_load(slot_expert: np.ndarray, loads: np.ndarray, cluster: Cluster) -> np.ndarray:
    """(M, G) load per GPU when each expert's load splits evenly over its replicas."""
    out = []
    for row, w in zip(slot_expert, loads):
        cnt = np.bincount(row, minlength=cluster.num_experts)
        out.append(np.bincount(cluster.gpu_of_slot(), weights=w[row] / cnt[row], minlength=cluster.num_gpus))
    return np.array(out)


def imbalance(gpu_load: np.ndarray) -> float:
    return float((gpu_load.max(1) / gpu_load.mean(1)).mean())


def test_linear_and_round_robin_layouts():
    c = Cluster(2, 2, 8, 4)  # 12 slots, 3 per GPU
    assert baselines.linear_row(c).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]
    c0 = Cluster(2, 2, 8, 0)  # 8 slots, 2 per GPU
    rr = baselines.round_robin_row(c0)
    assert rr.tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert sorted(set(rr[c0.gpu_of_slot() == 1].tolist())) == [1, 5]  # expert e on GPU e % G


def test_round_robin_refuses_redundant_slots():
    # vLLM runs round_robin only without redundant experts; R > 0 used to stack every copy on its original's GPU
    with pytest.raises(TracekitError, match="round-robin has no redundant slots"):
        baselines.round_robin(Cluster(2, 2, 8, 4), 1)
    from tracekit.placement.comparison import resolve_strategies
    assert "round-robin" not in resolve_strategies("all", Cluster(2, 2, 8, 4))
    assert "round-robin" in resolve_strategies("all", Cluster(2, 2, 8, 0))


def test_eplb_matches_published_example():
    # The worked example of github.com/deepseek-ai/EPLB's README (hierarchical: 4 groups on 2 nodes, 8 GPUs).
    w = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                  [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
    out = eplb(w, 16, num_nodes=2, num_gpus=8, num_groups=4)
    assert out.tolist() == [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                            [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]


def test_eplb_one_item_per_pack_keeps_published_order():
    # deepseek-ai/EPLB balanced_packing: with one item per pack, item i goes to pack i (no sort by weight)
    assert eplb([[1, 5, 3, 2]], 4, num_nodes=1, num_gpus=4, num_groups=1).tolist() == [[0, 1, 2, 3]]
    pack, rank = balanced_packing(np.array([1.0, 5, 3, 2]), 4)
    assert pack.tolist() == [0, 1, 2, 3] and rank.tolist() == [0, 0, 0, 0]
    # global policy with replicas, one slot per GPU: physical order is [experts..., replicas in the order added]
    # 5 -> 2.5/copy, then 3 (expert 2), then 2.5 (expert 1 again: 1.67/copy), then 2 (expert 3)
    assert eplb([[1, 5, 3, 2]], 8, num_nodes=1, num_gpus=8, num_groups=1).tolist() == [[0, 1, 2, 3, 1, 2, 1, 3]]
    # hierarchical, 2 groups on 2 nodes, one slot per GPU: group g -> node g, experts in id order on each node
    assert eplb([[1, 5, 3, 2]], 4, num_nodes=2, num_gpus=4, num_groups=2).tolist() == [[0, 1, 2, 3]]
    # two items per pack still sort heaviest first into the lightest open pack, rank = fill order
    pack, rank = balanced_packing(np.array([1.0, 5, 3, 2]), 2)
    assert pack.tolist() == [0, 0, 1, 1] and rank.tolist() == [1, 0, 0, 1]


def test_replicas_go_to_heaviest_and_packing_is_even():
    w = np.array([100.0, 1, 1, 1, 50, 1, 1, 1])
    phy2log, _, cnt = replicate_experts(w, 11)
    # 100 -> 50/copy, then 50 vs 50: tie broken by the lowest id (expert 0 -> 33.3/copy), then expert 4
    assert cnt.tolist() == [3, 1, 1, 1, 2, 1, 1, 1]
    assert sorted(phy2log[8:].tolist()) == [0, 0, 4]
    pack, rank = balanced_packing(np.array([9.0, 1, 8, 2, 7, 3]), 3)
    assert np.bincount(pack).tolist() == [2, 2, 2]
    assert sorted(np.bincount(pack, weights=[9, 1, 8, 2, 7, 3]).tolist()) == [10, 10, 10]


def test_eplb_covers_every_expert_and_beats_linear_on_skew():
    rng = np.random.default_rng(0)
    c = Cluster(4, 8, 256, 32)
    loads = rng.lognormal(0.0, 1.0, size=(3, 256)) * 1000
    se = eplb(loads, c.num_slots, c.nodes, c.num_gpus, num_groups=None)
    assert se.shape == (3, 288)
    for row, w in zip(se, loads):
        cnt = np.bincount(row, minlength=256)
        assert (cnt >= 1).all()
        rep = cnt > 1
        assert rep.any() and np.argmax(w) in np.flatnonzero(rep)
        # greedy by load per replica: each extra copy went to an expert at least as loaded (per copy before it)
        # as any expert left with one copy
        assert (w[rep] / (cnt[rep] - 1)).min() >= w[~rep].max()
    lin = baselines.linear(c, 3)
    assert imbalance(expected_gpu_load(se, loads, c)) < imbalance(expected_gpu_load(lin, loads, c))


def test_eplb_hierarchical_keeps_groups_on_nodes():
    rng = np.random.default_rng(1)
    c = Cluster(4, 2, 32, 8)  # 8 groups of 4 experts over 4 nodes
    loads = rng.integers(1, 100, size=(2, 32)).astype(float)
    se = eplb(loads, c.num_slots, c.nodes, c.num_gpus, num_groups=8)
    node_of_slot = c.gpu_of_slot() // c.gpus_per_node
    for row in se:
        group_nodes = {}
        for slot, e in enumerate(row):
            group_nodes.setdefault(e // 4, set()).add(int(node_of_slot[slot]))
        assert all(len(v) == 1 for v in group_nodes.values())  # every copy of a group's experts on one node
        assert sorted(np.bincount([min(v) for v in group_nodes.values()], minlength=4).tolist()) == [2, 2, 2, 2]


def test_registry_strategies_place_real_sized_layers():
    rng = np.random.default_rng(2)
    n, k, E = 4000, 2, 8
    tr = TraceArrays(
        layers=np.array([0, 1]), num_experts=E,
        request=np.repeat(np.arange(40), n // 40).astype(np.int32),
        layer_pos=(np.arange(n) % 2).astype(np.int16),
        experts=np.stack([rng.choice(E, k, replace=False, p=np.r_[0.4, np.full(7, 0.6 / 7)]) for _ in range(n)]).astype(np.uint8),
        phase=np.ones(n, np.int8), token=np.arange(n, dtype=np.int32) // 2,
        request_domain=np.array(["a"] * 40, dtype=object),
    )
    c = Cluster(2, 2, E, 4)
    res = {}
    for name in ("linear", "round-robin", "eplb"):
        cn = Cluster(2, 2, E, 0) if name == "round-robin" else c
        p = strategies.fit(name, tr, cn)
        assert p.slot_expert.shape == (2, cn.num_slots) and p.strategy == name
        res[name] = comm.evaluate(p, tr)["gpu_load_max_over_mean"]
    assert res["eplb"] < res["linear"]
    with pytest.raises(TracekitError, match="unknown strategy"):
        strategies.get("nope")


def test_indivisible_cluster_is_rejected():
    with pytest.raises(TracekitError, match="do not divide"):
        Cluster(6, 8, 256, 0)
