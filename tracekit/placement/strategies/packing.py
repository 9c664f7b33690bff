"""Steps 4-5 of ``locality``: fill each node's free slots and pack its copies onto its GPUs, and the load model
they share (see :mod:`tracekit.placement.strategies.locality`)."""
from __future__ import annotations

import numpy as np

from ..data.types import Cluster


def node_parts(W: np.ndarray, present: np.ndarray) -> np.ndarray:
    """(E, N) load carried by node n's copies of expert e: its home requests' use of e, plus an even share of
    the use by nodes that hold no copy."""
    has = present > 0  # (E, N)
    local = np.where(has, W.T, 0.0)
    remote = np.where(has, 0.0, W.T).sum(axis=1)
    share = remote / np.maximum(has.sum(axis=1), 1)
    return local + has * share[:, None]


def fill_and_pack(W: np.ndarray, present: np.ndarray, cluster: Cluster, target: float,
                   ) -> tuple[list[np.ndarray], np.ndarray]:
    """Fill every node's free slots by splitting its heaviest copy, then pack its copies onto its GPUs.

    When a node cannot pack under ``target`` (its heaviest copy plus the slots that must share a GPU with it
    overflow), its lightest copy of an expert that has another copy gives its slot to the heaviest expert, and
    the node is packed again. Returns (one (slots_per_gpu,) expert array per GPU in GPU order, final present).
    """
    N, g, spg = cluster.nodes, cluster.gpus_per_node, cluster.slots_per_gpu
    spn = g * spg
    present = fit_slot_budget(W, present.copy(), spn)
    part = node_parts(W, present)
    for n in range(N):
        while present[:, n].sum() < spn:
            per = np.where(present[:, n] > 0, part[:, n] / np.maximum(present[:, n], 1), -1.0)
            present[int(np.argmax(per)), n] += 1
    best: tuple[float, list[np.ndarray], np.ndarray] | None = None
    for _ in range(2 * spn):
        part = node_parts(W, present)
        out: list[np.ndarray] = []
        worst, worst_node = -1.0, 0
        for n in range(N):
            cnt = present[:, n]
            experts = np.repeat(np.arange(len(cnt)), cnt)
            per = part[:, n] / np.maximum(cnt, 1)
            bins = pack(experts, per[experts], g, spg)
            top = max(float(per[b].sum()) for b in bins)
            if top > worst:
                worst, worst_node = top, n
            out.extend(bins)
        if best is None or worst < best[0]:
            best = (worst, out, present.copy())
        if worst <= target:
            break
        n = worst_node
        cnt = present[:, n]
        per = part[:, n] / np.maximum(cnt, 1)
        heavy = int(np.argmax(np.where(cnt > 0, per, -1.0)))
        spare = (cnt > 0) & (present.sum(axis=1) >= 2)
        spare[heavy] = False
        if not spare.any():
            break
        drop = int(np.argmin(np.where(spare, per, np.inf)))
        present[drop, n] -= 1
        present[heavy, n] += 1
    return best[1], best[2]


def fit_slot_budget(W: np.ndarray, present: np.ndarray, spn: int) -> np.ndarray:
    """``present`` (E, N) copies per node brought within ``spn`` slots per node (in place, returned).

    The earlier steps keep the budget when they can; on a cramped geometry (few slots per node, experts spread
    over every node) a node can end up over it. Its lightest redundant copy (the expert has another copy
    somewhere) is dropped first; with none, its lightest expert moves to the node with the most free slots."""
    while True:
        over = np.flatnonzero(present.sum(axis=0) > spn)
        if over.size == 0:
            return present
        n = int(over[0])
        part = node_parts(W, present)[:, n] / np.maximum(present[:, n], 1)
        here = present[:, n] > 0
        redundant = here & (present.sum(axis=1) >= 2)
        if redundant.any():
            present[int(np.argmin(np.where(redundant, part, np.inf))), n] -= 1
            continue
        e = int(np.argmin(np.where(here, part, np.inf)))
        free = spn - present.sum(axis=0)
        free[n] = -1
        present[e, n] -= 1
        present[e, int(np.argmax(free))] += 1


def pack(experts: np.ndarray, loads: np.ndarray, bins: int, per_bin: int, sweeps: int = 200) -> list[np.ndarray]:
    """Balanced packing of len(experts) == bins * per_bin items, exactly per_bin per bin.

    Longest-processing-time first, then swaps between the busiest bin and any other while that lowers the pair's
    maximum. Copies of one expert avoid sharing a bin when possible. Returns ``bins`` arrays of expert ids.
    """
    order = np.argsort(-loads, kind="stable")
    bin_of = np.empty(len(loads), dtype=np.int64)
    bl = np.zeros(bins)
    bc = np.zeros(bins, dtype=np.int64)
    holds: list[set[int]] = [set() for _ in range(bins)]
    for i in order:
        open_ = bc < per_bin
        dup = np.array([experts[i] in s for s in holds])
        pick = open_ & ~dup if (open_ & ~dup).any() else open_
        b = int(np.argmin(np.where(pick, bl, np.inf)))
        bin_of[i] = b
        bl[b] += loads[i]
        bc[b] += 1
        holds[b].add(int(experts[i]))
    for _ in range(sweeps):
        hi = int(np.argmax(bl))
        mine = np.flatnonzero(bin_of == hi)
        other = np.flatnonzero(bin_of != hi)
        if other.size == 0:  # one bin (one GPU per node): nothing to swap with
            break
        d = loads[mine][:, None] - loads[other][None, :]  # moving load d from hi to the other bin
        new_hi = bl[hi] - d
        new_other = bl[bin_of[other]][None, :] + d
        worst = np.maximum(new_hi, new_other)
        worst[d <= 0] = np.inf
        i, j = np.unravel_index(int(np.argmin(worst)), worst.shape)
        if worst[i, j] >= bl[hi] - 1e-12:
            break
        a, b = mine[i], other[j]
        ob = bin_of[b]
        bl[hi] -= d[i, j]
        bl[ob] += d[i, j]
        bin_of[a], bin_of[b] = ob, hi
    return [experts[bin_of == b] for b in range(bins)]


def gpu_loads(slot_expert: np.ndarray, part: np.ndarray, present: np.ndarray, cluster: Cluster) -> np.ndarray:
    """(G,) planned load per GPU under the even-split load model."""
    spn = cluster.gpus_per_node * cluster.slots_per_gpu
    node = np.arange(cluster.num_slots) // spn
    cnt = np.zeros_like(present)
    np.add.at(cnt, (slot_expert, node), 1)
    per_slot = part[slot_expert, node] / np.maximum(cnt[slot_expert, node], 1)
    return np.bincount(cluster.gpu_of_slot(), weights=per_slot, minlength=cluster.num_gpus)
