"""``locality``: place experts so that the experts a token uses together share a node, within a GPU load bound.

Per MoE layer, on a sample of the fitted token-layers (each a hyperedge over its k experts, pinned to the
request's home node), in six steps:

1. **Copies.** EPLB's replication rule: extra copies go to the expert with the largest load per copy until no
   copy carries more than ``item_cap`` x the mean GPU load. An expert that needs at least one copy per node is
   spread over every node (each node then serves its own tokens for it: no cross-node traffic, and its load
   follows the home loads); the others keep all their copies on one node (same-node copies split load over
   GPUs without changing cross-node traffic).
2. **Partition.** The other experts go to nodes minimising the normal-mode cost
   ``sum_t w_t * |nodes(t) - {home(t)}|`` (the hypergraph connectivity objective with the home node as a fixed
   pin), subject to node load <= (1 + node_slack) x mean and a slot budget per node that keeps spare slots
   for replicas. Two starts: a greedy construction (heaviest expert first, into the node where it adds the
   fewest new remote nodes) and EPLB's own layout (hierarchical when the geometry's ``n_group`` allows: it
   already keeps DeepSeek's routing groups together); each gets a balance repair (cheapest move or swap off the
   busiest node), then rounds of moves and swaps with exact gains on the sample; the cheaper one is kept. With ``grouping`` the home nodes carry the signal: experts popular with a node's
   request group end up on that node.
3. **Locality replicas.** Each node's spare slots take replicas of remote experts its own tokens use, scored by
   the sends they save (credit 1/m for an expert sharing its remote node with m - 1 of the token's other
   experts, so that sets used together get duplicated together), minus the sends they add for third nodes
   whose traffic now splits over more replicas; accepted while node loads stay within the bound (singly, or
   as a pair of replicas in opposite directions).
4. **Fill.** Slots still free split the node's heaviest copy (balance only).
5. **Pack.** Each node's copies go to its GPUs (slots per GPU fixed): longest-processing-time, then swaps off
   the busiest GPU. A node that still overflows trades its lightest redundant copy for another copy of its
   heaviest expert, and packs again.

Load model (matching :mod:`tracekit.placement.comm`): a token uses the copy on its home node if there is one,
else splits evenly over the expert's nodes; within a node, an expert's load splits evenly over its copies.
Balance is planned against ``1 + node_slack`` (default: a fifth of the ``max_imbalance`` margin) so that
held-out tokens, whose loads drift, keep headroom (measured: planning at half the margin gave held-out GPU
max/mean above the bound on synthetic DeepSeek-V3-geometry traces; a fifth kept it below at the same cross-node
copies). With grouping ``none`` the home node carries no signal, so the
optimiser plans for the expectation (uniform home loads, random homes on the sample).
"""
from __future__ import annotations

import time

import numpy as np
from scipy import sparse as sp

from ..errors import TracekitError
from .comm import route_requests
from .eplb import eplb as _eplb
from .grouping import fit_grouping
from .stats import expert_load, load_by_group
from .types import Cluster, GroupingRule, Placement, TraceArrays

SAMPLE_TOKENS = 12_000  # token-layers per layer the partitioner optimises over (loads always use every row)


def place_locality(
    fit_traces: TraceArrays,
    cluster: Cluster,
    *,
    seed: int = 0,
    max_imbalance: float = 1.10,
    grouping: str | GroupingRule = "none",
    node_slack: float | None = None,
    item_cap: float = 0.8,
    sample_tokens: int = SAMPLE_TOKENS,
    refine_rounds: int = 8,
    **opts,
) -> Placement:
    """Locality-aware placement of every MoE layer (see module docstring). Returns a :class:`Placement`.

    ``grouping``: ``none`` | ``domain`` | ``signature`` (fitted here with :func:`fit_grouping`) or a fitted
    :class:`GroupingRule`. ``node_slack``: planned node load bound above the mean (default
    ``(max_imbalance - 1) / 5``). ``item_cap``: largest single copy as a fraction of the mean GPU load.
    """
    if cluster.num_experts != fit_traces.num_experts:
        raise TracekitError(
            f"cluster has {cluster.num_experts} experts but the traces have {fit_traces.num_experts}"
        )
    if max_imbalance < 1.0:
        raise TracekitError(f"--max-imbalance must be >= 1.0 (max/mean), got {max_imbalance}")
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    N, E, M = cluster.nodes, cluster.num_experts, fit_traces.num_layers
    slack = (max_imbalance - 1.0) / 5.0 if node_slack is None else float(node_slack)
    if isinstance(grouping, GroupingRule):
        rule = grouping
    else:
        rule = fit_grouping(fit_traces, cluster, grouping, seed=seed, max_imbalance=max_imbalance)
    has_rows = len(fit_traces) > 0
    if has_rows:
        home_req = route_requests(rule, fit_traces, cluster) // cluster.gpus_per_node  # the router, on the fit split
        if rule.kind == "none":  # home is unrelated to content: plan for the expectation, not this draw
            home_req = rng.integers(0, N, size=fit_traces.num_requests)
            w_all = expert_load(fit_traces).astype(np.float64)
            by_node = np.repeat(w_all[:, None, :] / N, N, axis=1)
        else:
            by_node = load_by_group(fit_traces, home_req, N).astype(np.float64)  # (M, N, E)
        samples = _sample_rows(fit_traces, sample_tokens, rng)
    else:  # loads-only run: balance from aggregated counts, no co-activation to exploit
        w_all = expert_load(fit_traces).astype(np.float64)
        by_node = np.repeat(w_all[:, None, :] / N, N, axis=1)
        samples = None

    # EPLB's layout as a second starting point of the partition (its node per expert: where most copies sit)
    groups = opts.get("num_groups") or (fit_traces.geometry or {}).get("n_group")
    eplb_rows = _eplb(expert_load(fit_traces), cluster.num_slots, N, cluster.num_gpus, int(groups) if groups else None)
    spn_all = cluster.num_slots // N
    init_nodes = np.stack([
        np.argmax(np.stack([np.bincount(r[n * spn_all:(n + 1) * spn_all], minlength=E) for n in range(N)]), axis=0)
        for r in eplb_rows
    ])  # (M, E)
    slot_expert = np.empty((M, cluster.num_slots), dtype=np.int64)
    stats = []
    for m in range(M):
        if samples is not None and len(samples[m]):
            rows = samples[m]
            X = fit_traces.experts[rows].astype(np.int64)
            h = home_req[fit_traces.request[rows]].astype(np.int64)
        else:
            X = np.zeros((0, max(fit_traces.top_k, 1)), dtype=np.int64)
            h = np.zeros(0, dtype=np.int64)
        slot_expert[m], info = place_layer(
            X, h, by_node[m], cluster, slack=slack, item_cap=item_cap, rounds=refine_rounds, rng=rng,
            init=init_nodes[m],
        )
        stats.append(info)
    meta = {
        "max_imbalance": max_imbalance,
        "node_slack": slack,
        "item_cap": item_cap,
        "sample_tokens": sample_tokens,
        "grouping": rule.kind,
        "seed": seed,
        "fit_seconds": round(time.perf_counter() - t0, 3),
        "fit_estimate": {
            "remote_nodes_per_token": float(np.mean([s["cost"] for s in stats])),
            "remote_nodes_per_token_before_replicas": float(np.mean([s["cost_partition"] for s in stats])),
            "planned_gpu_max_over_mean": float(np.max([s["gpu_imbalance"] for s in stats])),
        },
    }
    return Placement(
        cluster=cluster,
        layers=np.asarray(fit_traces.layers, dtype=np.int64),
        slot_expert=slot_expert,
        strategy="locality",
        grouping=rule,
        meta=meta,
    )


def _sample_rows(traces: TraceArrays, per_layer: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Up to ``per_layer`` row indices of every layer position, drawn uniformly without building an (N,) sort."""
    M, n = traces.num_layers, len(traces)
    draw = min(n, int(per_layer * M * 1.3) + 1)
    if draw >= n:
        idx = np.arange(n)
    else:
        idx = np.unique(rng.integers(0, n, size=draw))
    lp = traces.layer_pos[idx]
    order = np.argsort(lp, kind="stable")
    idx, lp = idx[order], lp[order]
    bounds = np.searchsorted(lp, np.arange(M + 1))
    out = []
    for m in range(M):
        rows = idx[bounds[m]: bounds[m + 1]]
        if len(rows) > per_layer:
            rows = np.sort(rng.choice(rows, size=per_layer, replace=False))
        out.append(rows)
    return out


# ------------------------------------------------------------------------------------------------- one layer


class _Layer:
    """Mutable state of one layer's partition: token hyperedges, node counts, loads.

    X (T, k) experts of each sampled token-layer, h (T,) home node, wt (T,) weight (tokens represented).
    cnt (T, N): copies-in-use of token t's experts on node n. ``node_of`` (E,) the node each expert's
    primary lives on.
    """

    def __init__(self, X: np.ndarray, h: np.ndarray, W: np.ndarray, cluster: Cluster, copies: np.ndarray):
        self.N, self.E = cluster.nodes, cluster.num_experts
        self.X, self.h = X, h
        T, k = X.shape
        total = W.sum()
        self.wt = np.full(T, total / k / T if T else 0.0)  # each token-layer stands for this many
        self.W = W  # (N, E) load by home node
        self.w = W.sum(axis=0)  # (E,)
        self.copies = copies  # (E,) copies of each expert on its primary node
        self.inc = sp.csr_matrix(
            (np.ones(T * k), X.ravel(), np.arange(0, T * k + 1, k)), shape=(T, self.E)
        ).T.tocsr()  # (E, T): tokens of each expert
        self.not_home = np.ones((T, self.N), dtype=bool)
        self.not_home[np.arange(T), h] = False
        self.node_of = np.full(self.E, -1, dtype=np.int64)
        self.cnt = np.zeros((T, self.N), dtype=np.int32)
        self.nload = np.zeros(self.N)
        self.nslots = np.zeros(self.N, dtype=np.int64)

    def tokens(self, e: int) -> np.ndarray:
        return self.inc.indices[self.inc.indptr[e]: self.inc.indptr[e + 1]]

    def cost(self) -> float:
        """Sum over sampled tokens of remote nodes touched, weighted (normal-mode cross-node copies)."""
        return float(((self.cnt > 0) & self.not_home).sum(axis=1) @ self.wt)

    def add_cost(self, e: int, b: int) -> float:
        t = self.tokens(e)
        return float(self.wt[t] @ ((self.cnt[t, b] == 0) & self.not_home[t, b]))

    def remove_gain(self, e: int, a: int) -> float:
        t = self.tokens(e)
        return float(self.wt[t] @ ((self.cnt[t, a] == 1) & self.not_home[t, a]))

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
        A0 = ((self.cnt == 0) & self.not_home) * self.wt[:, None]
        A1 = ((self.cnt == 1) & self.not_home) * self.wt[:, None]
        add = np.asarray(self.inc @ A0)
        rem_all = np.asarray(self.inc @ A1)
        placed = self.node_of >= 0  # experts on every node (node_of -1) never move
        rem = np.where(placed, rem_all[np.arange(self.E), self.node_of], 0.0)
        g = rem[:, None] - add
        g[np.arange(self.E), self.node_of] = 0.0
        g[~placed] = 0.0
        return g


def place_layer(
    X: np.ndarray,
    h: np.ndarray,
    W: np.ndarray,
    cluster: Cluster,
    *,
    slack: float,
    item_cap: float,
    rounds: int,
    rng: np.random.Generator,
    init: np.ndarray | None = None,
) -> tuple[np.ndarray, dict]:
    """One layer: X (T, k) sampled experts, h (T,) home nodes, W (N, E) full fitted load by home node.

    ``init`` (E,): an optional starting node per expert (e.g. EPLB's layout); the partition is then refined from
    both the greedy construction and ``init``, and the cheaper result on the sample is kept.

    Returns (S,) slot -> expert and a dict of fit-time estimates.
    """
    N, E, S = cluster.nodes, cluster.num_experts, cluster.num_slots
    spn = S // N
    w = W.sum(axis=0)
    total = float(w.sum())
    gpu_mean = total / cluster.num_gpus if total > 0 else 1.0
    copies = _hot_copies(w, gpu_mean, item_cap, S - E)
    spread = _spread_global(copies, W, N)  # (E, N) copies of the experts hot enough for every node, else 0
    is_global = spread.sum(axis=1) > 0
    cap = (1.0 + slack) * total / N if total > 0 else np.inf
    # primaries may use up to half of a node's spare slots beyond the even share; the rest stays for replicas
    even = -(-int(copies.sum()) // N)
    slots = min(spn, even + max(1, (spn - even) // 2))
    best = None
    for start in ("greedy", "init") if init is not None else ("greedy",):
        L = _Layer(X, h, W, cluster, np.where(is_global, 0, copies))
        L.nload += np.where(spread > 0, W.T, 0.0).sum(axis=0)  # global experts serve their node's own tokens
        L.nslots += spread.sum(axis=0)
        if start == "greedy":
            _greedy(L, slots, cap, rng, skip=is_global)
        else:
            _seed(L, init, slots, skip=is_global)
        _repair(L, slots, cap)
        for _ in range(rounds):
            if not _refine(L, slots, cap):
                break
        score = L.cost() + 1e12 * max(0.0, L.nload.max() - cap)
        if best is None or score < best[0]:
            best = (score, L, start)
    L = best[1]
    cost_partition = L.cost()
    present = spread.copy()  # copies of expert e on node n
    local = ~is_global
    present[np.flatnonzero(local), L.node_of[local]] = copies[local]
    _locality_replicas(L, present, spn, cap)
    items, present = _fill_and_pack(W, present, cluster, (1.0 + slack) * gpu_mean)
    part = _node_parts(W, present)  # (E, N) load each node's copies of e carry
    slot_expert = np.concatenate(items)
    gpu_load = _gpu_loads(slot_expert, part, present, cluster)
    T = len(X)
    tok = L.wt.sum() if T else 1.0
    info = {
        "cost": L.cost() / tok if T else 0.0,
        "cost_partition": cost_partition / tok if T else 0.0,
        "gpu_imbalance": float(gpu_load.max() / gpu_load.mean()) if gpu_load.mean() > 0 else 1.0,
        "start": best[2],
    }
    return slot_expert, info


def _hot_copies(w: np.ndarray, gpu_mean: float, item_cap: float, spare: int) -> np.ndarray:
    """(E,) copies per expert: one each, plus (at most ``spare``) extra copies for the expert with the largest
    load per copy, until no copy carries more than ``item_cap`` x the mean GPU load (EPLB's replication rule)."""
    copies = np.ones(len(w), dtype=np.int64)
    for _ in range(max(spare, 0)):
        per = w / copies
        e = int(np.argmax(per))
        if per[e] <= item_cap * gpu_mean:
            break
        copies[e] += 1
    return copies


def _spread_global(copies: np.ndarray, W: np.ndarray, N: int) -> np.ndarray:
    """(E, N): experts with at least N copies get them spread over every node (most copies where their home
    load is largest) so that every node serves its own tokens locally; other experts get a zero row."""
    out = np.zeros((len(copies), N), dtype=np.int64)
    if N == 1:
        return out
    for e in np.flatnonzero(copies >= N):
        c = int(copies[e])
        out[e] = c // N
        extra = c - N * (c // N)
        if extra:
            out[e, np.argsort(-W[:, e], kind="stable")[:extra]] += 1
    return out


def _greedy(L: _Layer, spn: int, cap: float, rng: np.random.Generator, skip: np.ndarray) -> None:
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


def _seed(L: _Layer, init: np.ndarray, spn: int, skip: np.ndarray) -> None:
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


def _repair(L: _Layer, spn: int, cap: float, max_steps: int = 400) -> None:
    """Bring node loads under ``cap``: move an expert off the busiest node, or swap it with a lighter one, choosing
    the step with the smallest cost increase (single-move gains from :meth:`_Layer.gain_matrix`)."""
    for _ in range(max_steps):
        a = int(np.argmax(L.nload))
        if L.nload[a] <= cap:
            return
        G = L.gain_matrix()
        mine = np.flatnonzero(L.node_of == a)
        # plain moves: (len(mine), N); landing under cap is preferred, else at least below the current max
        land = L.nload[None, :] + L.w[mine][:, None]
        ok = (L.nslots[None, :] + L.copies[mine][:, None] <= spn) & (land < L.nload[a])
        ok[:, a] = False
        score = np.where(ok, -G[mine] + np.where(land <= cap, 0.0, 1e12), np.inf)
        i, b = np.unravel_index(int(np.argmin(score)), score.shape)
        best = (score[i, b], int(mine[i]), int(b), -1)
        # swaps with a lighter expert f of another node b
        others = np.flatnonzero((L.node_of != a) & (L.node_of >= 0))
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


def _refine(L: _Layer, spn: int, cap: float, max_candidates: int | None = None) -> bool:
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


def _node_parts(W: np.ndarray, present: np.ndarray) -> np.ndarray:
    """(E, N) load carried by node n's copies of expert e: its home requests' use of e, plus an even share of
    the use by nodes that hold no copy."""
    has = present > 0  # (E, N)
    local = np.where(has, W.T, 0.0)
    remote = np.where(has, 0.0, W.T).sum(axis=1)
    share = remote / np.maximum(has.sum(axis=1), 1)
    return local + has * share[:, None]


def _locality_replicas(L: _Layer, present: np.ndarray, spn: int, cap: float) -> None:
    """Spend each node's free slots on replicas of remote experts its own tokens use alone on their node.

    Gain of a replica of e on node n: sampled tokens homed on n that use e and no other expert on e's node
    (each saves one cross-node send). Accepted while the node loads stay within ``cap`` (or do not get worse).
    """
    N, E = L.N, L.E
    free = spn - present.sum(axis=0)  # (N,) free slots per node
    if free.sum() == 0 or len(L.X) == 0 or N == 1:
        return
    T, k = L.X.shape
    tok = np.repeat(np.arange(T), k)
    ex = L.X.ravel()
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
        nload = _node_parts(L.W, present).sum(axis=0)
        order = np.argsort(-gain, axis=None)
        order = order[gain.ravel()[order] > 0]
        shift = {}  # (e, n) -> (N,) change of node loads if e gets a copy on n

        def delta(e: int, n: int) -> np.ndarray:
            if (e, n) not in shift:
                trial = present[e:e + 1].copy()
                trial[0, n] += 1
                Wn = L.W[:, e:e + 1]
                shift[(e, n)] = _node_parts(Wn, trial)[0] - _node_parts(Wn, present[e:e + 1])[0]
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


def _fill_and_pack(W: np.ndarray, present: np.ndarray, cluster: Cluster, target: float,
                   ) -> tuple[list[np.ndarray], np.ndarray]:
    """Fill every node's free slots by splitting its heaviest copy, then pack its copies onto its GPUs.

    When a node cannot pack under ``target`` (its heaviest copy plus the slots that must share a GPU with it
    overflow), its lightest copy of an expert that has another copy gives its slot to the heaviest expert, and
    the node is packed again. Returns (one (slots_per_gpu,) expert array per GPU in GPU order, final present).
    """
    N, g, spg = cluster.nodes, cluster.gpus_per_node, cluster.slots_per_gpu
    spn = g * spg
    present = present.copy()
    part = _node_parts(W, present)
    for n in range(N):
        while present[:, n].sum() < spn:
            per = np.where(present[:, n] > 0, part[:, n] / np.maximum(present[:, n], 1), -1.0)
            present[int(np.argmax(per)), n] += 1
    best: tuple[float, list[np.ndarray], np.ndarray] | None = None
    for _ in range(2 * spn):
        part = _node_parts(W, present)
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


def _gpu_loads(slot_expert: np.ndarray, part: np.ndarray, present: np.ndarray, cluster: Cluster) -> np.ndarray:
    """(G,) planned load per GPU under the even-split load model."""
    spn = cluster.gpus_per_node * cluster.slots_per_gpu
    node = np.arange(cluster.num_slots) // spn
    cnt = np.zeros_like(present)
    np.add.at(cnt, (slot_expert, node), 1)
    per_slot = part[slot_expert, node] / np.maximum(cnt[slot_expert, node], 1)
    return np.bincount(cluster.gpu_of_slot(), weights=per_slot, minlength=cluster.num_gpus)
