"""Step 3 of ``locality``: spend each node's spare slots on replicas that save cross-node sends
(see :mod:`tracekit.placement.strategies.locality`)."""
from __future__ import annotations

import numpy as np

from .packing import node_parts
from .partition import Layer


def locality_replicas(L: Layer, present: np.ndarray, spn: int, cap: float) -> None:
    """Spend each node's free slots on replicas of remote experts its own tokens use alone on their node.

    Gain of a replica of e on node n: sampled tokens homed on n that use e and no other expert on e's node
    (each saves one cross-node send). Accepted while the node loads stay within ``cap`` (or do not get worse).
    """
    N, E = L.N, L.E
    free = spn - present.sum(axis=0)  # (N,) free slots per node
    if free.sum() == 0 or L.pair_expert.size == 0 or N == 1:
        return
    tok, ex = L.pair_token, L.pair_expert  # (token, real expert) pairs: zero-computation choices send nothing
    ht, wt = L.h[tok], L.wt[tok]
    while free.sum() > 0:
        a = np.maximum(L.node_of[ex], 0)
        away = present[ex, ht] == 0  # e is not on the token's home node (never true for experts on every node)
        ca = L.cnt[tok, a]
        remote = L.not_home[tok, a] & away
        saved = (ca == 1) & L.not_home[tok, a]  # e alone on its node: a local copy saves that send
        # credit 1 / (token's experts on e's node): the send is saved once all of them have a local copy, so
        # replicas of experts used together accumulate credit (with 2 nodes, duplicating a co-used set pays)
        credit = np.where(remote, wt / np.maximum(ca, 1), 0.0)
        gain = np.bincount(ex * N + ht, weights=credit, minlength=E * N).reshape(E, N)
        # tokens from third nodes: a share 1 / (nodes holding e) of them now goes to n instead
        share = wt / (present[ex] > 0).sum(axis=1)
        for n in range(N):
            third = away & (ht != n) & (present[ex, n] == 0)
            delta = (L.cnt[tok, n] == 0).astype(np.float64) - saved
            gain[:, n] -= np.bincount(ex[third], weights=(share * delta)[third] / 1.0, minlength=E)
        gain[:, free <= 0] = 0.0
        nload = node_parts(L.W, present).sum(axis=0)
        order = np.argsort(-gain, axis=None)
        order = order[gain.ravel()[order] > 0]
        shift = {}  # (e, n) -> (N,) change of node loads if e gets a copy on n

        def delta(e: int, n: int) -> np.ndarray:
            if (e, n) not in shift:
                trial = present[e:e + 1].copy()
                trial[0, n] += 1
                Wn = L.W[:, e:e + 1]
                shift[(e, n)] = node_parts(Wn, trial)[0] - node_parts(Wn, present[e:e + 1])[0]
            return shift[(e, n)]

        limit = max(cap, nload.max())
        chosen: list[tuple[int, int]] = []
        room = free.copy()
        batch = max(1, int(free.sum()) // 4)  # several replicas per gain update (distinct experts)
        for idx in order:
            e, n = divmod(int(idx), N)
            if room[n] > 0 and all(e != c for c, _ in chosen) and (nload + delta(e, n)).max() <= limit:
                chosen.append((e, n))
                nload = nload + delta(e, n)
                room[n] -= 1
                if len(chosen) >= batch:
                    break
        if not chosen:  # a pair of replicas in opposite directions can keep the balance one alone breaks
            best = 0.0
            for i in order[:16]:
                e, n = divmod(int(i), N)
                for j in order[:32]:
                    f, o = divmod(int(j), N)
                    if f == e or (o == n and free[n] < 2) or gain.flat[i] + gain.flat[j] <= best:
                        continue
                    if (nload + delta(e, n) + delta(f, o)).max() <= limit:
                        chosen, best = [(e, n), (f, o)], gain.flat[i] + gain.flat[j]
        if not chosen:
            break
        for e, n in chosen:
            present[e, n] += 1
            free[n] -= 1
            # tokens homed on n now find e at home: drop it from their count on e's primary node
            t = L.tokens(e)
            t = t[L.h[t] == n]
            L.cnt[t, L.node_of[e]] -= 1
            L.cnt[t, n] += 1
        if free.sum() <= 0:
            break
