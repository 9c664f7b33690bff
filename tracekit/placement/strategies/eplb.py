"""DeepSeek's Expert Parallelism Load Balancer (EPLB), implemented from its published description.

Input: per-layer expert loads (M, E). Output: slot_expert (M, S), S = E + R, slot p on GPU p // (S / G).

Published method (github.com/deepseek-ai/EPLB), reproduced step by step:

- ``replicate_experts``: start with one replica per logical expert; add the R redundant replicas one at a time,
  each to the expert with the largest load per replica (load / replica count).
- ``balanced_packing``: sort items by weight, heaviest first; put each into the lightest pack that still has room
  (every pack takes exactly items / packs items). When every pack takes one item, item i goes to pack i unsorted
  (the published shortcut: ``eplb([[1, 5, 3, 2]], 4 slots, 1 node, 4 GPUs)`` gives ``[[0, 1, 2, 3]]``).
- Hierarchical policy (used when the expert-group count divides by the node count, e.g. DeepSeek V3's 8 groups on
  4 nodes): (1) pack whole expert groups onto nodes by group load (balanced packing, groups/nodes groups a node);
  (2) inside each node, replicate that node's experts into S / nodes physical slots; (3) pack the node's replicas
  (weight = expert load / its replica count) onto the node's GPUs.
- Global policy otherwise: the hierarchical steps with one group and one node (replicate over all experts, pack
  onto all GPUs). Replicas of one expert may share a GPU, as in the published code.

The rank of a replica inside its pack follows the order the packing filled it (as published), so the layout of
slots inside one GPU is deterministic but carries no meaning.
"""
from __future__ import annotations

import numpy as np

from ...errors import TracekitError


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """weight (n,) -> (pack (n,), rank_in_pack (n,)); n must divide by num_packs; every pack gets n / num_packs."""
    n = weight.shape[0]
    if n % num_packs:
        raise TracekitError(f"cannot pack {n} items evenly into {num_packs} packs")
    per = n // num_packs
    pack = np.empty(n, dtype=np.int64)
    rank = np.empty(n, dtype=np.int64)
    if per == 1:  # as published: item i alone in pack i (no sort; the weights decide nothing here)
        return np.arange(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    pw = np.zeros(num_packs)
    cnt = np.zeros(num_packs, dtype=np.int64)
    for i in np.argsort(-weight, kind="stable"):
        avail = np.flatnonzero(cnt < per)
        p = avail[np.argmin(pw[avail])]
        pack[i] = p
        rank[i] = cnt[p]
        pw[p] += weight[i]
        cnt[p] += 1
    return pack, rank


def replicate_experts(weight: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """weight (n,) -> (phy2log (num_phy,), replica rank (num_phy,), count per logical (n,)): greedy max load/replica."""
    n = weight.shape[0]
    if num_phy < n:
        raise TracekitError(f"{num_phy} physical slots cannot hold {n} experts")
    phy2log = np.concatenate([np.arange(n), np.zeros(num_phy - n, dtype=np.int64)])
    rank = np.zeros(num_phy, dtype=np.int64)
    cnt = np.ones(n, dtype=np.int64)
    w = weight.astype(np.float64)
    for i in range(n, num_phy):
        e = int(np.argmax(w / cnt))
        phy2log[i] = e
        rank[i] = cnt[e]
        cnt[e] += 1
    return phy2log, rank, cnt


def rebalance_layer(weight: np.ndarray, num_phy: int, num_groups: int, num_nodes: int, num_gpus: int) -> np.ndarray:
    """One layer, hierarchical policy: weight (E,) -> slot_expert (num_phy,)."""
    E = weight.shape[0]
    if E % num_groups or num_groups % num_nodes or num_gpus % num_nodes or num_phy % num_gpus:
        raise TracekitError(
            f"hierarchical EPLB needs experts ({E}) % groups ({num_groups}) == 0, groups % nodes ({num_nodes}) == 0 "
            f"and slots ({num_phy}) % GPUs ({num_gpus}) == 0"
        )
    group_size = E // num_groups
    groups_per_node = num_groups // num_nodes
    phy_per_gpu = num_phy // num_gpus
    # step 1: expert groups -> nodes
    gpack, grank = balanced_packing(weight.reshape(num_groups, group_size).sum(1), num_nodes)
    log2mlog = ((gpack * groups_per_node + grank) * group_size)[:, None] + np.arange(group_size)[None, :]
    log2mlog = log2mlog.reshape(-1)
    mlog2log = np.empty(E, dtype=np.int64)
    mlog2log[log2mlog] = np.arange(E)
    # step 2: replicate within each node
    per_node_log = E // num_nodes
    per_node_phy = num_phy // num_nodes
    gpus_per_node = num_gpus // num_nodes
    out = np.empty(num_phy, dtype=np.int64)
    for nd in range(num_nodes):
        mlogs = mlog2log[nd * per_node_log:(nd + 1) * per_node_log]
        w = weight[mlogs].astype(np.float64)
        phy2m, _, cnt = replicate_experts(w, per_node_phy)
        # step 3: replicas -> GPUs of this node
        pack, rank = balanced_packing(w[phy2m] / cnt[phy2m], gpus_per_node)
        pphy = pack * phy_per_gpu + rank
        node_row = np.empty(per_node_phy, dtype=np.int64)
        node_row[pphy] = mlogs[phy2m]
        out[nd * per_node_phy:(nd + 1) * per_node_phy] = node_row
    return out


def eplb(loads: np.ndarray, num_slots: int, num_nodes: int, num_gpus: int, num_groups: int | None = None) -> np.ndarray:
    """loads (M, E) -> slot_expert (M, num_slots). Hierarchical when ``num_groups`` divides by ``num_nodes``,
    else global (one group, one node)."""
    loads = np.asarray(loads, dtype=np.float64)
    M, E = loads.shape
    hierarchical = bool(num_groups) and num_groups % num_nodes == 0 and E % num_groups == 0
    if hierarchical and num_slots % num_nodes:
        hierarchical = False
    g, n = (num_groups, num_nodes) if hierarchical else (1, 1)
    return np.stack([rebalance_layer(loads[m], num_slots, g, n, num_gpus) for m in range(M)])
