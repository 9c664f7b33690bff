"""Step 2 of ``locality``: partition one layer's experts over nodes (see :mod:`tracekit.placement.strategies.locality`).

The objective is the normal-mode cross-node cost of a sample of token-layers, ``sum_t w_t * |nodes(t) - {home(t)}|``
(hypergraph connectivity with the home node pinned), under a node load cap and a slot budget per node.
:class:`Layer` holds the mutable state; :func:`greedy` and :func:`seed` build a start, :func:`repair` brings node
loads under the cap, :func:`refine` improves the cost with moves and swaps whose gains are exact on the sample.
"""
from __future__ import annotations

import numpy as np
from scipy import sparse as sp

from ..data.types import Cluster


class Layer:
    """Mutable state of one layer's partition: token hyperedges, node counts, loads.

    X (T, k) experts of each sampled token-layer (ids >= E: zero-computation choices, in no hyperedge),
    h (T,) home node, wt (T,) weight (tokens represented). ``pair_token``, ``pair_expert`` (P,): the sample's
    (token, real expert) pairs. cnt (T, N): copies-in-use of token t's experts on node n. ``node_of`` (E,) the
    node each expert's primary lives on.
    """

    def __init__(self, X: np.ndarray, h: np.ndarray, W: np.ndarray, cluster: Cluster, copies: np.ndarray):
        self.N, self.E = cluster.nodes, cluster.num_experts
        self.X, self.h = X, h
        T, k = X.shape
        real = X.ravel() < self.E
        self.pair_token, self.pair_expert = np.repeat(np.arange(T), k)[real], X.ravel()[real]
        total = W.sum()
        P = self.pair_expert.size
        # each token-layer stands for this many: total / (real pairs per token) / T (total / k / T without zeros)
        self.wt = np.full(T, total / (P / T) / T if P else 0.0)
        self.W = W  # (N, E) load by home node
        self.w = W.sum(axis=0)  # (E,)
        self.copies = copies  # (E,) copies of each expert on its primary node
        self.inc = sp.csr_matrix(
            (np.ones(P), (self.pair_token, self.pair_expert)), shape=(T, self.E)
        ).T.tocsr()  # (E, T): tokens of each expert
        self.not_home = np.ones((T, self.N), dtype=bool)
        self.not_home[np.arange(T), h] = False
        self.node_of = np.full(self.E, -1, dtype=np.int64)
        self.cnt = np.zeros((T, self.N), dtype=np.int32)
        self.nload = np.zeros(self.N)
        self.nslots = np.zeros(self.N, dtype=np.int64)

    def tokens(self, e: int) -> np.ndarray:
        return self.inc.indices[self.inc.indptr[e]: self.inc.indptr[e + 1]]

    # Every sampled token weighs the same (``w0``), so each cost is ``w0`` x an exact integer count: no float dot
    # product whose rounding depends on how BLAS splits it over threads (the placement is a pure function of its
    # inputs, whatever OMP_NUM_THREADS or the machine's load; near-ties between moves cannot flip).

    @property
    def w0(self) -> float:
        return float(self.wt[0]) if self.wt.size else 0.0

    def cost(self) -> float:
        """Sum over sampled tokens of remote nodes touched, weighted (normal-mode cross-node copies)."""
        return self.w0 * int(np.count_nonzero((self.cnt > 0) & self.not_home))

    def add_cost(self, e: int, b: int) -> float:
        t = self.tokens(e)
        return self.w0 * int(np.count_nonzero((self.cnt[t, b] == 0) & self.not_home[t, b]))

    def remove_gain(self, e: int, a: int) -> float:
        t = self.tokens(e)
        return self.w0 * int(np.count_nonzero((self.cnt[t, a] == 1) & self.not_home[t, a]))

    def place(self, e: int, b: int) -> None:
        self.node_of[e] = b
        self.cnt[self.tokens(e), b] += 1
        self.nload[b] += self.w[e]
        self.nslots[b] += self.copies[e]

    def move(self, e: int, b: int) -> None:
        a = self.node_of[e]
        t = self.tokens(e)
        self.cnt[t, a] -= 1
        self.cnt[t, b] += 1
        self.node_of[e] = b
        self.nload[a] -= self.w[e]
        self.nload[b] += self.w[e]
        self.nslots[a] -= self.copies[e]
        self.nslots[b] += self.copies[e]

    def gain_matrix(self) -> np.ndarray:
        """(E, N) exact gain (cost decrease) of moving each expert alone to each node; 0 on its own node."""
        # integer counts (exact in float64, whatever the summation order), scaled once
        add = self.w0 * np.asarray(self.inc @ ((self.cnt == 0) & self.not_home).astype(np.float64))
        rem_all = self.w0 * np.asarray(self.inc @ ((self.cnt == 1) & self.not_home).astype(np.float64))
        placed = self.node_of >= 0  # experts on every node (node_of -1) never move
        rem = np.where(placed, rem_all[np.arange(self.E), self.node_of], 0.0)
        g = rem[:, None] - add
        g[np.arange(self.E), self.node_of] = 0.0
        g[~placed] = 0.0
        return g


def greedy(L: Layer, spn: int, cap: float, rng: np.random.Generator, skip: np.ndarray) -> None:
    """Heaviest expert first, into the feasible node where it adds the fewest new remote nodes (``skip``: experts
    already on every node)."""
    order = np.lexsort((rng.random(L.E), -L.w))
    for e in order[~skip[order]]:
        costs = np.array([L.add_cost(e, b) for b in range(L.N)])
        room = L.nslots + L.copies[e] <= spn
        fits = room & (L.nload + L.w[e] <= cap)
        if fits.any():  # ties (e.g. the first experts) go to the lightest node
            b = int(np.argmin(np.where(fits, costs + 1e-9 * L.nload, np.inf)))
        else:
            b = int(np.argmin(np.where(room, L.nload, np.inf)))
        L.place(int(e), b)


def start_from(L: Layer, init: np.ndarray, spn: int, skip: np.ndarray) -> None:
    """Place every expert (heaviest first) on its ``init`` node while that node has slots, else on the least
    loaded node with room (``skip``: experts already on every node)."""
    for e in np.argsort(-L.w, kind="stable"):
        if skip[e]:
            continue
        b = int(init[e])
        if L.nslots[b] + L.copies[e] > spn:
            room = L.nslots + L.copies[e] <= spn
            b = int(np.argmin(np.where(room, L.nload, np.inf))) if room.any() else int(np.argmin(L.nslots))
        L.place(int(e), b)


def repair(L: Layer, spn: int, cap: float, max_steps: int = 400) -> None:
    """Bring node loads under ``cap``: move an expert off the busiest node, or swap it with a lighter one, choosing
    the step with the smallest cost increase (single-move gains from :meth:`Layer.gain_matrix`)."""
    for _ in range(max_steps):
        a = int(np.argmax(L.nload))
        if L.nload[a] <= cap:
            return
        G = L.gain_matrix()
        mine = np.flatnonzero(L.node_of == a)
        if mine.size == 0:  # the busiest node holds only experts spread over every node: nothing to move
            return
        # plain moves: (len(mine), N); landing under cap is preferred, else at least below the current max
        land = L.nload[None, :] + L.w[mine][:, None]
        ok = (L.nslots[None, :] + L.copies[mine][:, None] <= spn) & (land < L.nload[a])
        ok[:, a] = False
        score = np.where(ok, -G[mine] + np.where(land <= cap, 0.0, 1e12), np.inf)
        i, b = np.unravel_index(int(np.argmin(score)), score.shape)
        best = (score[i, b], int(mine[i]), int(b), -1)
        # swaps with a lighter expert f of another node b
        others = np.flatnonzero((L.node_of != a) & (L.node_of >= 0))
        if others.size == 0:  # every placed expert sits on the busiest node: plain moves only
            if not np.isfinite(best[0]):
                return
            L.move(best[1], best[2])
            continue
        dw = L.w[mine][:, None] - L.w[others][None, :]
        bn = L.node_of[others]
        land = L.nload[bn][None, :] + dw
        ok = (dw > 0) & (land < L.nload[a])
        ok &= (L.nslots[bn][None, :] - L.copies[others][None, :] + L.copies[mine][:, None]) <= spn
        ok &= (L.nslots[a] - L.copies[mine][:, None] + L.copies[others][None, :]) <= spn
        score = np.where(ok, -G[mine][:, bn] - G[others, a][None, :] + np.where(land <= cap, 0.0, 1e12), np.inf)
        i, j = np.unravel_index(int(np.argmin(score)), score.shape)
        if score[i, j] < best[0]:
            best = (score[i, j], int(mine[i]), int(bn[j]), int(others[j]))
        if not np.isfinite(best[0]):
            return
        _, e, b, f = best
        L.move(e, b)
        if f >= 0:
            L.move(f, a)


def refine(L: Layer, spn: int, cap: float, max_candidates: int | None = None) -> bool:
    """One round of moves and swaps, best estimated gain first, each re-checked exactly before applying."""
    G = L.gain_matrix()
    limit = max_candidates or 2 * L.E
    flat = np.argsort(-G, axis=None)[:limit]
    improved = False
    touched = np.zeros(L.E, dtype=bool)
    for idx in flat:
        e, b = divmod(int(idx), L.N)
        if G[e, b] <= 1e-9:
            break
        if touched[e]:
            continue
        a = int(L.node_of[e])
        gain = L.remove_gain(e, a) - L.add_cost(e, b)
        if gain <= 1e-9:
            continue
        load_ok = L.nload[b] + L.w[e] <= max(cap, L.nload[a])
        if load_ok and L.nslots[b] + L.copies[e] <= spn:
            L.move(e, b)
            touched[e] = improved = True
            continue
        # swap with a partner on b whose move to a helps most (stale estimate picks the candidates)
        partners = np.flatnonzero((L.node_of == b) & ~touched)
        if partners.size == 0:
            continue
        partners = partners[np.argsort(-G[partners, a])[:6]]
        L.move(e, b)
        best, best_gain = -1, 0.0
        for f in partners:
            if L.nslots[b] - L.copies[f] > spn or L.nslots[a] + L.copies[f] > spn:
                continue
            if L.nload[b] - L.w[f] > max(cap, L.nload[b] - L.w[e]) or L.nload[a] + L.w[f] > max(cap, L.nload[a] + L.w[e]):
                continue
            gf = gain + L.remove_gain(int(f), b) - L.add_cost(int(f), a)
            if gf > best_gain + 1e-9:
                best, best_gain = int(f), gf
        if best >= 0:
            L.move(best, a)
            touched[e] = touched[best] = improved = True
        else:
            L.move(e, a)
    return improved
