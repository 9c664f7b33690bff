"""Synthetic routing traces with planted structure, built directly as TraceArrays (tests of placement only).

Per layer, the E experts are split into ``clusters`` planted co-activation groups (a random permutation per
layer). Every domain prefers a few clusters; each token picks one cluster (from its request's domain
preference) and draws ``top_k - noise_k`` distinct experts from it (Zipf-skewed within the cluster) and
``noise_k`` uniformly. Requests have a prefill (same mixture) and decode tokens.
"""
from __future__ import annotations

import numpy as np

from tracekit.placement.data.types import TraceArrays


def planted_traces(
    *,
    num_experts: int = 32,
    top_k: int = 4,
    layers: int = 3,
    clusters: int = 4,
    domains: tuple[str, ...] = ("code", "math", "chat", "general"),
    requests: int = 80,
    prefill: int = 16,
    decode: int = 24,
    noise_k: int = 1,
    domain_focus: float = 0.8,
    skew: float = 0.6,
    seed: int = 0,
) -> tuple[TraceArrays, np.ndarray]:
    """Returns (traces, groups) with groups (layers, E) the planted cluster id of each expert per layer.

    Domain d prefers cluster d % clusters with probability ``domain_focus``, else a uniform cluster.
    """
    rng = np.random.default_rng(seed)
    E, k, C = num_experts, top_k, clusters
    size = E // C
    groups = np.empty((layers, E), dtype=np.int64)
    members = []
    for m in range(layers):
        perm = rng.permutation(E)
        groups[m, perm] = np.arange(E) // size
        members.append([perm[c * size:(c + 1) * size] for c in range(C)])
    zipf = 1.0 / np.arange(1, size + 1) ** skew
    zipf /= zipf.sum()
    logp = np.log(zipf)
    dom_of_req = rng.permutation(np.arange(requests) % len(domains))
    n_tok = prefill + decode
    req = np.repeat(np.arange(requests), n_tok)
    pref = dom_of_req[req] % C
    focus = rng.random(req.size) < domain_focus
    cl = np.where(focus, pref, rng.integers(0, C, size=req.size))
    rows = {k_: [] for k_ in ("request", "layer_pos", "experts", "phase", "token")}
    for m in range(layers):
        table = np.stack(members[m])  # (C, size) expert ids of each cluster
        gumbel = logp[None, :] - np.log(-np.log(rng.random((req.size, size))))
        top = np.argsort(-gumbel, axis=1)[:, : k - noise_k]
        inside = table[cl[:, None], top]
        score = rng.random((req.size, E))
        np.put_along_axis(score, inside, -1.0, axis=1)
        rest = np.argpartition(-score, noise_k, axis=1)[:, :noise_k]
        rows["experts"].append(np.concatenate([inside, rest], axis=1))
        rows["request"].append(req)
        rows["layer_pos"].append(np.full(req.size, m))
        rows["phase"].append((np.tile(np.arange(n_tok), requests) >= prefill).astype(np.int8))
        rows["token"].append(np.tile(np.arange(n_tok), requests))
    traces = TraceArrays(
        layers=np.arange(layers) + 1,
        num_experts=E,
        request=np.concatenate(rows["request"]).astype(np.int32),
        layer_pos=np.concatenate(rows["layer_pos"]).astype(np.int16),
        experts=np.concatenate(rows["experts"]).astype(np.uint8 if E <= 256 else np.uint16),
        phase=np.concatenate(rows["phase"]),
        token=np.concatenate(rows["token"]).astype(np.int32),
        request_domain=np.array([domains[d] for d in dom_of_req], dtype=object),
    )
    return traces, groups
