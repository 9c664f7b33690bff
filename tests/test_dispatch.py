"""Dispatch models on hand-built cases derived from each engine's code (see tracekit/placement/dispatch.py).

The SGLang tables marked "checked against SGLang" were compared, entry for entry, with the output of SGLang
0.5.23's own ``compute_logical_to_rank_dispatch_physical_map`` run on the same ``physical_to_logical_map``.
"""
from __future__ import annotations

import numpy as np
import pytest

from tracekit.errors import TracekitError
from tracekit.placement import dispatch as D


def test_replica_lists_are_ascending_slots():
    slots, count = D.replica_lists(np.array([[2, 0, 1, 0, 2, 0]]), 3)
    assert count.tolist() == [[3, 1, 2]]
    assert slots[0, 0].tolist() == [1, 3, 5]
    assert slots[0, 1].tolist() == [2, -1, -1]
    assert slots[0, 2].tolist() == [0, 4, -1]


def test_sglang_same_gpu_then_first_on_node_then_seeded_fair_random():
    # 2 nodes x 2 GPUs, E=6, R=2, 2 slots per GPU: slots 0,1 GPU0 | 2,3 GPU1 | 4,5 GPU2 | 6,7 GPU3
    row = np.array([[0, 1, 2, 2, 4, 5, 3, 0]])
    tab = D.sglang_rank_tables(row, num_experts=6, num_gpus=4, gpus_per_node=2)[0].T  # (E, G)
    assert tab[0].tolist() == [0, 0, 7, 7]  # expert 0 on GPU0 and GPU3: own GPU, else the one on the rank's node
    assert tab[1].tolist() == [1, 1, 1, 1]  # one candidate -> it, everywhere
    assert tab[3].tolist() == [6, 6, 6, 6]
    # expert 2 twice on GPU1: rank 1 takes the first (slot 2); rank 0's node holds *every* candidate, so the node
    # rule does not narrow and rank 0 joins ranks 2 and 3 in the seeded fair pick (each slot at least once)
    assert tab[2, 1] == 2
    assert sorted(set(tab[2, [0, 2, 3]].tolist())) == [2, 3]
    assert tab[2].tolist() == [2, 2, 3, 2]  # checked against SGLang 0.5.23 (random.Random(42))


def test_sglang_single_node_never_prefers_the_node():
    # 1 node x 3 GPUs, E=4, R=2: expert 0 at slots 0 (GPU0) and 4 (GPU2); rank 1 has none on its GPU and the node
    # holds both, so it goes to the fair random pick, not "first on node"
    tab = D.sglang_rank_tables(np.array([[0, 1, 2, 3, 0, 1]]), num_experts=4, num_gpus=3, gpus_per_node=3)[0].T
    assert tab.tolist() == [[0, 0, 4], [1, 1, 5], [2, 2, 2], [3, 3, 3]]  # checked against SGLang 0.5.23


def test_sglang_seed_and_dense_layers_change_the_random_picks():
    rng = np.random.default_rng(3)
    E, R, G = 16, 16, 4
    rows = np.stack([rng.permutation(np.concatenate([np.arange(E), rng.choice(E, R)])) for _ in range(2)])
    full = np.tile(np.arange(E + R) % E, (5, 1))
    full[[1, 3]] = rows
    want = D.sglang_rank_tables(full, num_experts=E, num_gpus=G, gpus_per_node=4)[[1, 3]]
    got = D.dispatch_table(rows, engine="sglang", gpus_per_node=4, num_gpus=G, num_experts=E,
                           layers=np.array([1, 3]), num_hidden_layers=5)
    assert np.array_equal(got, want)
    # the dense rows consume draws: without them the same MoE rows get other random picks
    alone = D.dispatch_table(rows, engine="sglang", gpus_per_node=4, num_gpus=G, num_experts=E)
    assert not np.array_equal(alone, got)
    assert not np.array_equal(alone, D.dispatch_table(rows, engine="sglang", gpus_per_node=4, num_gpus=G,
                                                      num_experts=E, seed=7))
    # every pick is a replica of the right expert, and the ranks left to chance (1 node: none on their own GPU)
    # spread over the replicas fairly: no replica gets two more of them than another
    spg = (E + R) // G
    for m in range(2):
        assert (rows[m][got[m]] == np.arange(E)[None, :]).all()
        for e in range(E):
            cand = np.flatnonzero(rows[m] == e)
            if cand.size < 2:
                continue
            chance = [g for g in range(G) if not (cand // spg == g).any()]
            use = np.array([(got[m, chance, e] == c).sum() for c in cand])
            assert use.max() - use.min() <= 1


def test_vllm_knuth_hash_of_the_token_index():
    # expert 0 has replicas at slots 1 and 3, expert 1 three at 0, 2, 5; expert 2 one at 4
    se = np.array([[1, 0, 1, 0, 2, 1]])
    lp = np.zeros(6, dtype=np.int64)
    ex = np.array([[0, 1]] * 6)
    got = D.choose_replicas(se, lp, np.zeros(6, dtype=np.int64), ex, engine="vllm", gpus_per_node=2, num_gpus=2,
                            index_in_batch=np.arange(6))
    # two replicas: 2654435769 is odd, so t * it keeps t's parity -> alternate
    assert got[:, 0].tolist() == [1, 3, 1, 3, 1, 3]
    # three replicas: t=1 -> 2654435769 % 3 = 0; t=2 -> (5308871538 - 2**32) = 1013904242 % 3 = 2
    # t=3 -> 7963307307 - 2**32 = 3668340011 % 3 = 2; t=4 -> 10617743076 - 2 * 2**32 = 2027808484 % 3 = 1
    # t=5 -> 13272178845 - 3 * 2**32 = 387276957 % 3 = 0
    assert got[:, 1].tolist() == [0, 0, 5, 5, 2, 0]
    one = D.choose_replicas(se, lp[:2], np.zeros(2, dtype=np.int64), np.array([[2, 0], [2, 1]]), engine="vllm",
                            gpus_per_node=2, num_gpus=2, index_in_batch=np.array([7, 8]))
    assert one[:, 0].tolist() == [4, 4]


def test_trtllm_round_robin_per_block_offset_by_rank():
    se = np.array([[0, 1, 2, 3, 0, 4]])  # expert 0 at slots 0 and 4; the rest once
    ex = np.array([[0, 2], [0, 1], [3, 0]])
    args = dict(engine="trtllm", gpus_per_node=2, num_gpus=2, batch=np.zeros(3, np.int64),
                index_in_batch=np.arange(3))
    r0 = D.choose_replicas(se, np.zeros(3, np.int64), np.zeros(3, np.int64), ex, **args)
    # expert-0 items are flattened items 0, 2, 5 -> n = 0, 1, 2; key = block 0 + n + rank 0
    assert r0.tolist() == [[0, 2], [4, 1], [3, 0]]
    r1 = D.choose_replicas(se, np.zeros(3, np.int64), np.ones(3, np.int64), ex, **args)
    assert r1.tolist() == [[4, 2], [0, 1], [3, 4]]  # rank 1 shifts every key by one


def test_trtllm_counter_restarts_in_each_block_of_1024_items():
    se = np.array([[0, 1, 0, 2]])
    n = 600  # 600 tokens x k=2 = 1200 items: items 1024.. are block 1
    ex = np.tile([0, 1], (n, 1))
    got = D.choose_replicas(se, np.zeros(n, np.int64), np.zeros(n, np.int64), ex, engine="trtllm", gpus_per_node=1,
                            num_gpus=2, batch=np.zeros(n, np.int64), index_in_batch=np.arange(n))
    # block 0: token t's expert-0 item is the t-th -> replica t % 2; token 512 opens block 1: key = 1 + 0 -> replica 1
    assert got[:512, 0].tolist() == [0, 2] * 256
    assert got[512, 0] == 2 and got[513, 0] == 0
    assert (got[:, 1] == 1).all()
    # two batches (e.g. two steps) count separately
    two = D.choose_replicas(se, np.zeros(4, np.int64), np.zeros(4, np.int64), np.tile([0, 1], (4, 1)),
                            engine="trtllm", gpus_per_node=1, num_gpus=2, batch=np.array([0, 0, 1, 1]),
                            index_in_batch=np.array([0, 1, 0, 1]))
    assert two[:, 0].tolist() == [0, 2, 0, 2]


def test_static_engines_through_choose_replicas_and_errors():
    se = np.array([[0, 1, 0, 1]])
    got = D.choose_replicas(se, np.zeros(2, np.int64), np.array([0, 1]), np.array([[0, 1], [0, 1]]), engine="ideal",
                            gpus_per_node=2, num_gpus=2)
    assert got.tolist() == [[0, 1], [2, 3]]  # each GPU holds both experts: stay local
    with pytest.raises(ValueError, match="per token"):
        D.dispatch_table(se, engine="vllm", gpus_per_node=2, num_gpus=2)
    with pytest.raises(ValueError, match="index_in_batch"):
        D.choose_replicas(se, np.zeros(1, np.int64), np.zeros(1, np.int64), np.array([[0, 1]]), engine="vllm",
                          gpus_per_node=2, num_gpus=2)
    with pytest.raises(TracekitError, match="unknown engine"):
        D.check_engine("tgi")
