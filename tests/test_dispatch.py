"""Dispatch models on hand-built cases derived from each engine's code (see tracekit/placement/scoring/dispatch.py).

The SGLang tables marked "checked against SGLang" were compared, entry for entry, with the output of SGLang
0.5.23's own ``compute_logical_to_rank_dispatch_physical_map`` run on the same ``physical_to_logical_map``.
"""
from __future__ import annotations

import numpy as np
import pytest

from tracekit.errors import TracekitError
from tracekit.placement.scoring import dispatch as D


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
    # every pick is a replica of the right expert
    for m in range(2):
        assert (rows[m][got[m]] == np.arange(E)[None, :]).all()


def test_sglang_server_ranks_draw_their_own_streams():
    # 1 node x 4 GPUs, E=4, R=4, 2 slots per GPU; every expert has two copies on two GPUs, so at each expert the
    # two other ranks are left to chance: expert 0 (slots 0, 2 on GPUs 0, 1) -> ranks 2, 3; expert 1 (1, 4) ->
    # ranks 1, 3; expert 2 (3, 6) -> ranks 0, 2; expert 3 (5, 7) -> ranks 0, 1. Each fair draw of 2 from 2 is a
    # shuffle of the pair; random.Random(42)'s first three shuffles of a pair swap, swap, keep. The server builds
    # each rank's table with a fresh Random(42) that advances only where that rank is left over:
    row = np.array([[0, 1, 0, 2, 1, 3, 2, 3]])
    tab = D.sglang_rank_tables(row, num_experts=4, num_gpus=4, gpus_per_node=4)[0].T  # (E, G)
    # rank 0: expert 2 is its 1st draw -> [6, 3], it is first -> 6; expert 3 its 2nd -> [7, 5] -> 7
    # rank 1: expert 1 1st -> [4, 1] -> 4; expert 3 2nd, second of the ranks -> 5
    # rank 2: expert 0 1st -> [2, 0] -> 2; expert 2 2nd, second -> 3; rank 3: expert 0 -> 0, expert 1 -> 1
    assert tab.tolist() == [[0, 2, 2, 0], [1, 4, 4, 1], [6, 3, 3, 6], [7, 5, 5, 7]]
    # one stream for all ranks (the bare function) would draw expert 2 third (keep: [3, 6]) -> rank 0 gets 3


def test_sglang_server_narrowing_keeps_ranks_on_their_node():
    # 2 nodes x 2 GPUs, E=4, R=4, 2 slots per GPU: GPU0 = slots 0, 1 | GPU1 2, 3 | GPU2 4, 5 | GPU3 6, 7
    row = np.array([[1, 1, 0, 2, 3, 2, 0, 3]])
    tab = D.sglang_rank_tables(row, num_experts=4, num_gpus=4, gpus_per_node=2)[0].T  # (E, G)
    # expert 0 at slots 2 (GPU1) and 6 (GPU3), one per node: own GPU, else the copy on the rank's node; no draw
    assert tab[0].tolist() == [2, 2, 6, 6]
    assert tab[2].tolist() == [3, 3, 5, 5]  # expert 2 at 3 (GPU1) and 5 (GPU2): the same
    # expert 1 at slots 0, 1 (both GPU0): rank 0 takes slot 0; node 0 holds every copy, so rank 1 is left to the
    # fair pick (on its node all the same); ranks 2, 3 have none on node 1. All three draw for the first time
    # (nothing before expert 1 left them over): the same list [0, 1] + sample, shuffled -> both copies used
    assert tab[1, 0] == 0 and sorted(set(tab[1, 1:].tolist())) == [0, 1]
    # expert 3 at slots 4 (GPU2) and 7 (GPU3): ranks 2, 3 own GPU; ranks 0, 1 (none on node 0) are left over. For
    # rank 0 it is the first draw (a pair: Random(42)'s first shuffle swaps [4, 7] -> it takes 7); rank 1 drew
    # at expert 1 already, so its stream is elsewhere (it took 4 here)
    assert tab[3, 2:].tolist() == [4, 7]
    assert tab[3, 0] == 7 and tab[3, 1] in (4, 7)


@pytest.mark.parametrize("nodes,gpn,E,R", [(2, 2, 8, 4), (4, 2, 16, 8), (2, 4, 16, 16), (3, 2, 6, 6), (1, 8, 8, 8)])
def test_sglang_server_tables_properties_on_random_maps(nodes, gpn, E, R):
    rng = np.random.default_rng(nodes * 100 + gpn * 10 + R)
    G, S = nodes * gpn, E + R
    spg = S // G
    rows = np.stack([rng.permutation(np.concatenate([np.arange(E), rng.choice(E, R)])) for _ in range(4)])
    tab = D.sglang_rank_tables(rows, num_experts=E, num_gpus=G, gpus_per_node=gpn)
    for m in range(rows.shape[0]):
        for e in range(E):
            cand = np.flatnonzero(rows[m] == e)
            for g in range(G):
                pick = tab[m, g, e]
                assert rows[m, pick] == e
                mine = cand[cand // spg == g]
                on_node = cand[cand // spg // gpn == g // gpn]
                if mine.size:  # a copy on the rank's GPU: the first of them
                    assert pick == mine[0]
                elif 0 < on_node.size < cand.size:  # some copies on its node: the first of them
                    assert pick == on_node[0]
                elif on_node.size:  # every copy on its node: a fair pick, on the node all the same
                    assert pick // spg // gpn == g // gpn
    # a rank's random picks come from its own stream: dropping the other ranks' left-over draws (the bare
    # function's one shared stream) changes some picks on these maps, so the two models are told apart here too
    assert not np.array_equal(tab, _one_stream(rows, E, G, gpn))


def _one_stream(rows, E, G, gpn):
    """SGLang's bare ``compute_logical_to_rank_dispatch_physical_map``: one Random(42) for all ranks."""
    import random

    near, slots, count = D.sglang_nearest(rows, num_experts=E, num_gpus=G, gpus_per_node=gpn)
    out, rng = near.copy(), random.Random(42)
    for m, e in zip(*np.nonzero((near < 0).any(1))):
        cand = slots[m, e, : count[m, e]].tolist()
        rest = np.flatnonzero(near[m, :, e] < 0)
        q, r = divmod(rest.size, len(cand))
        ch = cand * q + rng.sample(cand, k=r)
        rng.shuffle(ch)
        out[m, rest, e] = ch
    return out


def test_sglang_a2a_backends():
    rows = np.array([[0, 1, 0, 1]])
    kw = dict(engine="sglang", gpus_per_node=1, num_gpus=2, num_experts=2)
    assert np.array_equal(D.dispatch_table(rows, **kw), D.dispatch_table(rows, a2a_backend="mooncake", **kw))
    with pytest.raises(TracekitError, match="moe-a2a-backend none refuses"):
        D.dispatch_table(rows, a2a_backend="none", **kw)
    with pytest.raises(TracekitError, match="unknown --a2a-backend"):
        D.check_a2a_backend("nccl")


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


def test_evaluate_and_score_placement_use_the_server_tables():
    from tests._placement_synth import planted_traces
    from tracekit.placement.scoring import comm
    from tracekit.placement import strategies as strat
    from tracekit.placement.scoring.comm import score_placement
    from tracekit.placement.data.types import Cluster

    traces, _ = planted_traces(num_experts=16, top_k=2, layers=3, requests=30, seed=4)
    cl = Cluster(2, 2, 16, 8)
    p = strat.fit("eplb", traces, cl)
    se = np.asarray(p.slot_expert)
    # the MoE layers as the export places them among the hidden layers (dense rows SGLang's trivial map)
    hidden = int(np.max(traces.layers)) + 1
    full = np.tile(np.arange(cl.num_slots) % 16, (hidden, 1))
    full[np.asarray(p.layers)] = se
    server = D.sglang_rank_tables(full, num_experts=16, num_gpus=4, gpus_per_node=2)[np.asarray(p.layers)]
    table = comm.dispatch_table(p, "sglang")
    assert np.array_equal(table, server)
    # the GPU load per layer that evaluate reports is the one the server tables give, token by token
    home = comm.home_gpus(traces, p)
    h = home[traces.request]
    dest = cl.gpu_of_slot()[server[traces.layer_pos[:, None], h[:, None], traces.experts]]  # (N, k)
    want = []
    for m in range(se.shape[0]):
        load = np.bincount(dest[traces.layer_pos == m].ravel(), minlength=4)
        want.append(load.max() / load.mean())
    got = comm.evaluate(p, traces, engine="sglang", replay=False, home=home)
    assert np.allclose(got["gpu_load_max_over_mean_per_layer"], want)
    assert not np.array_equal(server, _one_stream(full, 16, 4, 2)[np.asarray(p.layers)])
    scored = score_placement(p, traces, engine="sglang", home=home)
    assert np.allclose(scored["gpu_load_max_over_mean_per_layer"], want)
    assert scored["cross_node_bytes_per_step"] == score_placement(p, traces, engine="sglang", home=home,
                                                                  a2a_backend="nixl")["cross_node_bytes_per_step"]
    with pytest.raises(TracekitError, match="none"):
        score_placement(p, traces, engine="sglang", a2a_backend="none")


def test_sglang_launch_flags_name_the_a2a_backend_scored_under():
    from tracekit.placement.export import sglang_flags
    from tracekit.placement.data.types import Cluster, Placement

    p = Placement(Cluster(1, 2, 2, 2), np.array([0]), np.array([[0, 1, 0, 1]]), "eplb")
    assert "--moe-a2a-backend deepep" in sglang_flags(p, "map.json")
    p.meta["a2a_backend"] = "mooncake"
    assert "--moe-a2a-backend mooncake" in sglang_flags(p, "map.json")


def _fresh_rank_tables(se, **kw):
    """sglang_rank_tables with its memo emptied: computed from layer 0, every stream from random.Random(42)."""
    D._RANK_TABLES.done.clear()
    D._RANK_TABLES.last.clear()
    return D.sglang_rank_tables(se, **kw)


@pytest.mark.parametrize("nodes,gpn,E,R", [(2, 4, 24, 8), (4, 2, 16, 24), (1, 3, 7, 2)])
def test_sglang_memo_and_resume_equal_a_fresh_computation(nodes, gpn, E, R):
    # the balance hold re-scores a placement after changing a few layers: a table resumed from the first changed
    # layer (stream states kept per layer) or returned from the memo must equal one computed from scratch
    rng = np.random.default_rng(nodes * 100 + E)
    kw = {"num_experts": E, "num_gpus": nodes * gpn, "gpus_per_node": gpn}
    new_row = lambda: rng.permutation(np.concatenate([np.arange(E), rng.choice(E, R)]))  # noqa: E731
    base = np.stack([new_row() for _ in range(9)])
    variants = [base]
    for changed in ([8], [4, 6], [0], [3, 4, 5, 6, 7, 8], []):
        v = variants[-1].copy()
        for m in changed:
            v[m] = new_row()
        variants.append(v)
    fresh = [_fresh_rank_tables(v, **kw) for v in variants]
    D._RANK_TABLES.done.clear()
    D._RANK_TABLES.last.clear()
    for v, want in zip(variants + variants[::-1], fresh + fresh[::-1]):  # resumes going forward, memo hits back
        got = D.sglang_rank_tables(v, **kw)
        assert np.array_equal(got, want)
        got[:] = -1  # a caller writing into its copy does not reach the memo
    assert np.array_equal(D.sglang_rank_tables(variants[2], **kw), fresh[2])
    # a one-layer map in between (validation's per-layer scores) does not evict the whole-model state
    D.sglang_rank_tables(base[:1], **kw)
    assert np.array_equal(D.sglang_rank_tables(variants[3], **kw), fresh[3])


def test_sglang_table_computes_no_layer_after_the_last_moe_layer():
    rng = np.random.default_rng(5)
    E, R, G = 12, 4, 4
    rows = np.stack([rng.permutation(np.concatenate([np.arange(E), rng.choice(E, R)])) for _ in range(2)])
    full = np.tile(np.arange(E + R) % E, (9, 1))
    full[[2, 4]] = rows
    want = _fresh_rank_tables(full, num_experts=E, num_gpus=G, gpus_per_node=2)[[2, 4]]
    got = D.sglang_table(rows, num_experts=E, num_gpus=G, gpus_per_node=2, layers=np.array([2, 4]),
                         num_hidden_layers=9)
    assert np.array_equal(got, want)
    with pytest.raises(IndexError):
        D.sglang_table(rows, num_experts=E, num_gpus=G, gpus_per_node=2, layers=np.array([2, 9]), num_hidden_layers=9)
