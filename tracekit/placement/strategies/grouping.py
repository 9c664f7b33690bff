"""Workload-aware request grouping: which node serves which request (its *home node*).

A :class:`~tracekit.placement.data.types.GroupingRule` is what a router applies online to a new request: it names the
node(s) a request may go to (:func:`allowed_nodes`); inside them the router sends the request to the least-loaded
GPU (:func:`tracekit.placement.scoring.comm.home_gpus`). :func:`assign_nodes` is the load-blind variant (round-robin
inside the allowed nodes), kept for callers that need one node per request without loads.

- ``none``: any node.
- ``domain``: ``domain_nodes[domain]`` lists the nodes of that task family. Domains are
  packed onto nodes so that every node carries about the same request token load (a big domain spans several
  nodes, small ones share a node).
- ``signature``: the request's *prefill* expert histogram (one histogram per feature layer, each normalised to
  sum 1, concatenated; :func:`tracekit.placement.data.stats.signature_features`, which falls back to the first decode
  tokens of a request recorded without prefill) goes to the node of its nearest centroid. Centroids come from k-means over the fitted
  requests (``clusters_per_node`` clusters per node, so the clusters are fine enough to balance), and clusters are
  packed onto nodes by load, keeping similar clusters together.

Both fitted rules keep the request token load of every node within ``1 + balance_share * (max_imbalance - 1)``
of the mean when the data allow it (the rest of the GPU load bound is left to the placement).
"""
from __future__ import annotations

import numpy as np

from ...errors import TracekitError
from ..data.stats import signature_features
from ..data.types import Cluster, GroupingRule, TraceArrays

KINDS = ("none", "domain", "signature")
MAX_FEATURES = 4096  # default signature width: evenly spaced MoE layers up to this many histogram bins


def fit_grouping(
    fit_traces: TraceArrays,
    cluster: Cluster,
    kind: str = "none",
    *,
    seed: int = 0,
    max_imbalance: float = 1.10,
    feature_layers: list[int] | None = None,
    clusters_per_node: int = 4,
    balance_share: float = 0.25,
) -> GroupingRule:
    """Fit the rule that assigns requests to nodes. ``feature_layers``: absolute layer indices (signature only)."""
    if kind not in KINDS:
        raise TracekitError(f"unknown grouping {kind!r}; use one of {', '.join(KINDS)}")
    if kind == "none" or cluster.nodes == 1:
        return GroupingRule(kind="none" if kind == "none" else kind)
    if fit_traces.num_requests == 0 or len(fit_traces) == 0:
        raise TracekitError(f"grouping {kind!r} needs per-token routes; this run has no token rows (use --grouping none)")
    load = request_load(fit_traces)
    tol = 1.0 + balance_share * (max_imbalance - 1.0)
    if kind == "domain":
        domains, inv = np.unique(fit_traces.request_domain.astype(str), return_inverse=True)
        dload = np.bincount(inv, weights=load, minlength=len(domains))
        sets = pack_groups(dload, cluster.nodes, tol)
        return GroupingRule(kind="domain", domain_nodes={str(d): s for d, s in zip(domains, sets)})
    layers = _default_feature_layers(fit_traces) if feature_layers is None else [int(x) for x in feature_layers]
    feats = signature_features(fit_traces, layers).astype(np.float64)
    active = load > 0
    n_clusters = int(min(clusters_per_node * cluster.nodes, active.sum()))
    if n_clusters < 1:
        raise TracekitError("grouping 'signature' found no requests with routes to cluster")
    rng = np.random.default_rng(seed)
    centroids, labels = kmeans(feats[active], n_clusters, rng)
    cload = np.bincount(labels, weights=load[active], minlength=n_clusters)
    centroid_node = pack_clusters(centroids, cload, cluster.nodes, tol, rng)
    return GroupingRule(
        kind="signature", feature_layers=layers, centroids=centroids.astype(np.float32), centroid_node=centroid_node
    )


def assign_nodes(rule: GroupingRule, traces: TraceArrays, cluster: Cluster) -> np.ndarray:
    """(R_n,) home node of every request of ``traces`` under ``rule`` (what a router does online)."""
    n_req = traces.num_requests
    rr = np.arange(n_req) % cluster.nodes
    if rule.kind == "none" or cluster.nodes == 1:
        return rr.astype(np.int64)
    if rule.kind == "domain":
        out = np.empty(n_req, dtype=np.int64)
        seen: dict[str, int] = {}
        everyone = list(range(cluster.nodes))
        for r, dom in enumerate(traces.request_domain.astype(str)):
            nodes = rule.domain_nodes.get(dom) or everyone
            i = seen.get(dom, 0)
            out[r] = nodes[i % len(nodes)]
            seen[dom] = i + 1
        return out
    if rule.kind == "signature":
        out, empty = _signature_nodes(rule, traces)
        out[empty] = rr[empty]
        return out
    raise TracekitError(f"unknown grouping {rule.kind!r}; use one of {', '.join(KINDS)}")


def _signature_nodes(rule: GroupingRule, traces: TraceArrays) -> tuple[np.ndarray, np.ndarray]:
    """(R_n,) node of each request's nearest centroid, and (R_n,) bool: the request has an empty signature."""
    if rule.centroids is None or rule.centroid_node is None:
        raise TracekitError("signature grouping rule has no centroids; refit it with --grouping signature")
    feats = signature_features(traces, list(rule.feature_layers)).astype(np.float64)
    if feats.shape[1] != rule.centroids.shape[1]:
        raise TracekitError(
            f"signature rule expects {rule.centroids.shape[1]} features, these traces give {feats.shape[1]}: "
            "the model geometry (experts or MoE layers) differs from the fitted one"
        )
    near = nearest(feats, rule.centroids)
    return np.asarray(rule.centroid_node, dtype=np.int64)[near], feats.sum(axis=1) == 0


def allowed_nodes(rule: GroupingRule, traces: TraceArrays, cluster: Cluster) -> np.ndarray:
    """(R_n, nodes) bool: the nodes a router may send each request to under ``rule``.

    ``none``: every node. ``domain``: the nodes listed for the request's domain (every node for an unknown
    domain). ``signature``: the node of the nearest centroid (every node for a request with an empty signature).
    The GPU inside the allowed nodes is the router's load-balancing choice (:func:`tracekit.placement.scoring.comm.home_gpus`).
    """
    n_req, N = traces.num_requests, cluster.nodes
    out = np.ones((n_req, N), dtype=bool)
    if rule.kind == "none" or N == 1:
        return out
    if rule.kind == "domain":
        doms, inv = np.unique(traces.request_domain.astype(str), return_inverse=True)
        for i, dom in enumerate(doms):
            nodes = [n for n in (rule.domain_nodes.get(str(dom)) or []) if 0 <= n < N]
            if nodes:
                row = np.zeros(N, dtype=bool)
                row[nodes] = True
                out[inv == i] = row
        return out
    if rule.kind != "signature":
        raise TracekitError(f"unknown grouping {rule.kind!r}; use one of {', '.join(KINDS)}")
    node, empty = _signature_nodes(rule, traces)
    if node.size and (node.min() < 0 or node.max() >= N):
        raise TracekitError(f"the grouping rule sends requests to nodes outside 0..{N - 1}; refit it for this cluster")
    out[:] = False
    out[np.arange(n_req), node] = True
    out[empty] = True
    return out


# --------------------------------------------------------------------------------------------------- features


def request_load(traces: TraceArrays) -> np.ndarray:
    """(R_n,) token-layers of every request (its share of the cluster's dispatch work)."""
    return np.bincount(traces.request, minlength=traces.num_requests).astype(np.float64)


def _default_feature_layers(traces: TraceArrays) -> list[int]:
    m = traces.num_layers
    keep = max(1, min(m, MAX_FEATURES // max(traces.num_experts, 1)))
    pos = np.unique(np.linspace(0, m - 1, keep).round().astype(int))
    return [int(traces.layers[p]) for p in pos]


# --------------------------------------------------------------------------------------------------- clustering


def nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(n,) index of the nearest centroid (squared Euclidean) for each row of x (n, D); centroids (C, D)."""
    d = (x * x).sum(1)[:, None] - 2.0 * x @ centroids.T + (centroids * centroids).sum(1)[None, :]
    return d.argmin(axis=1)


def kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iters: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means with k-means++ seeding. x (n, D) -> centroids (k, D), labels (n,)."""
    n = x.shape[0]
    centroids = np.empty((k, x.shape[1]))
    centroids[0] = x[rng.integers(n)]
    d2 = ((x - centroids[0]) ** 2).sum(1)
    for i in range(1, k):
        p = d2 / d2.sum() if d2.sum() > 0 else np.full(n, 1.0 / n)
        centroids[i] = x[rng.choice(n, p=p)]
        d2 = np.minimum(d2, ((x - centroids[i]) ** 2).sum(1))
    labels = nearest(x, centroids)
    for _ in range(iters):
        for c in range(k):
            members = labels == c
            if members.any():
                centroids[c] = x[members].mean(0)
            else:  # re-seed an empty cluster on the point farthest from its centroid
                far = ((x - centroids[labels]) ** 2).sum(1).argmax()
                centroids[c] = x[far]
        new = nearest(x, centroids)
        if np.array_equal(new, labels):
            break
        labels = new
    return centroids, labels


def pack_clusters(centroids: np.ndarray, cload: np.ndarray, nodes: int, tol: float, rng: np.random.Generator,
                  iters: int = 20) -> np.ndarray:
    """(C,) node of each cluster: node loads within ``tol`` x mean where possible, similar clusters together.

    Capacity-constrained k-means over the centroids: node centres are load-weighted means of their clusters;
    clusters (heaviest first) go to the nearest node centre that still has room, else the least loaded node.
    """
    C = len(cload)
    cap = tol * cload.sum() / nodes
    seeds = rng.choice(C, size=min(nodes, C), replace=False)
    centres = centroids[seeds].copy()
    assign = np.full(C, -1)
    order = np.argsort(-cload, kind="stable")
    for _ in range(iters):
        nload = np.zeros(nodes)
        new = np.empty(C, dtype=np.int64)
        dist = ((centroids[:, None, :] - centres[None, :, :]) ** 2).sum(-1) if len(centres) else np.zeros((C, nodes))
        if dist.shape[1] < nodes:
            dist = np.concatenate([dist, np.zeros((C, nodes - dist.shape[1]))], axis=1)
        for c in order:
            fits = nload + cload[c] <= cap
            n = int(np.argmin(np.where(fits, dist[c], np.inf))) if fits.any() else int(np.argmin(nload))
            new[c] = n
            nload[n] += cload[c]
        if np.array_equal(new, assign):
            break
        assign = new
        centres = np.stack([
            np.average(centroids[assign == n], axis=0, weights=cload[assign == n] + 1e-12)
            if (assign == n).any() else centroids[rng.integers(C)]
            for n in range(nodes)
        ])
    return assign.astype(np.int64)


def pack_groups(gload: np.ndarray, nodes: int, tol: float) -> list[list[int]]:
    """Node sets for groups with loads ``gload`` (D,): each group's load splits evenly over its nodes.

    Start from one node per group (largest-remainder shares of the nodes when groups <= nodes, else
    longest-processing-time packing), then repeatedly widen the group that overloads the busiest node onto the
    least loaded node while that lowers the maximum, until max/mean <= ``tol``.
    """
    D = len(gload)
    total = float(gload.sum())
    if total <= 0:
        return [list(range(nodes)) for _ in range(D)]
    sets: list[set[int]] = [set() for _ in range(D)]
    if D <= nodes:
        share = gload / total * nodes
        count = np.maximum(1, np.floor(share)).astype(int)
        while count.sum() > nodes:
            count[np.argmax(np.where(count > 1, count - share, -np.inf))] -= 1
        while count.sum() < nodes:
            count[np.argmax(share - count)] += 1
        nxt = 0
        for d in np.argsort(-gload, kind="stable"):
            sets[d] = set(range(nxt, nxt + count[d]))
            nxt += count[d]
    else:
        nload = np.zeros(nodes)
        for d in np.argsort(-gload, kind="stable"):
            n = int(np.argmin(nload))
            sets[d] = {n}
            nload[n] += gload[d]

    def loads(s: list[set[int]]) -> np.ndarray:
        out = np.zeros(nodes)
        for d, ns in enumerate(s):
            for n in ns:
                out[n] += gload[d] / len(ns)
        return out

    for _ in range(4 * nodes * max(D, 1)):
        nl = loads(sets)
        if nl.max() <= tol * total / nodes:
            break
        busiest = int(np.argmax(nl))
        best, best_max = None, nl.max()
        for d in range(D):
            if busiest not in sets[d]:
                continue
            for n in np.argsort(nl):
                if n in sets[d]:
                    continue
                trial = [set(s) for s in sets]
                trial[d].add(int(n))
                m = loads(trial).max()
                if m < best_max - 1e-9:
                    best, best_max = trial, m
                break
        if best is None:
            break
        sets = best
    return [sorted(int(n) for n in s) for s in sets]


def group_nodes(rule: GroupingRule) -> dict[str, list[int]]:
    """Label -> nodes allowed to serve it: the domain's nodes (``domain``) or the centroid's node (``signature``)."""
    if rule.kind == "domain":
        return {str(k): [int(x) for x in v] for k, v in (rule.domain_nodes or {}).items()}
    if rule.kind == "signature" and rule.centroid_node is not None:
        return {cluster_label(c): [int(n)] for c, n in enumerate(np.asarray(rule.centroid_node))}
    return {}


def cluster_label(c: int) -> str:
    return f"c{int(c)}"
