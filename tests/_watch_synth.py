"""Synthetic routing whose hot experts depend on the request's domain (tests and the benchmark of re-placement and
``watch``): per layer and domain a Zipf popularity over its own permutation of the experts, each token drawing
``top_k`` distinct experts from its domain's popularity (Gumbel top-k)."""
from __future__ import annotations

import numpy as np

from tracekit.placement.data.types import TraceArrays

GEOMETRY = {"hidden_size": 1024, "moe_intermediate_size": 512, "expert_dtype": "bfloat16"}


def domain_popularity(num_experts: int, layers: int, domains: tuple[str, ...], skew: float = 1.1,
                      seed: int = 0) -> dict[str, np.ndarray]:
    """domain -> (layers, E) probabilities: Zipf(skew) over a per-(domain, layer) permutation."""
    rng = np.random.default_rng(seed)
    z = 1.0 / np.arange(1, num_experts + 1) ** skew
    z /= z.sum()
    out = {}
    for d in domains:
        p = np.empty((layers, num_experts))
        for m in range(layers):
            p[m, rng.permutation(num_experts)] = z
        out[d] = p
    return out


def draw_tokens(pop: np.ndarray, n: int, top_k: int, rng: np.random.Generator) -> np.ndarray:
    """(n, layers, k) expert ids: per token and layer, k distinct experts drawn from ``pop`` (layers, E)."""
    L, E = pop.shape
    g = np.log(pop)[None] - np.log(-np.log(rng.random((n, L, E))))
    return np.argsort(-g, axis=2)[:, :, :top_k]


def shifted_traces(domains: list[str], *, num_experts: int = 16, top_k: int = 2, layers: int = 2,
                   tokens: int = 48, prefill: int = 16, seed: int = 1, pop_seed: int = 0) -> TraceArrays:
    """One request per entry of ``domains`` (its domain), ``tokens`` tokens each (the first ``prefill`` prefill)."""
    rng = np.random.default_rng(seed)
    pops = domain_popularity(num_experts, layers, tuple(sorted(set(domains) | {"code", "math"})), seed=pop_seed)
    rows = {k: [] for k in ("request", "layer_pos", "experts", "phase", "token")}
    for r, d in enumerate(domains):
        ex = draw_tokens(pops[d], tokens, top_k, rng)  # (T, L, k)
        for m in range(layers):
            rows["request"].append(np.full(tokens, r))
            rows["layer_pos"].append(np.full(tokens, m))
            rows["experts"].append(ex[:, m])
            rows["phase"].append((np.arange(tokens) >= prefill).astype(np.int8))
            rows["token"].append(np.arange(tokens))
    return TraceArrays(
        layers=np.arange(layers) + 1, num_experts=num_experts,
        request=np.concatenate(rows["request"]).astype(np.int32),
        layer_pos=np.concatenate(rows["layer_pos"]).astype(np.int16),
        experts=np.concatenate(rows["experts"]).astype(np.uint8),
        phase=np.concatenate(rows["phase"]), token=np.concatenate(rows["token"]).astype(np.int32),
        request_domain=np.array(domains, dtype=object), geometry=dict(GEOMETRY),
    )


def traces_from_requests(reqs, geometry: dict) -> TraceArrays:
    """TraceArrays of ``[(domain, experts (T, nL, k))]`` (every token prefill, positions 0..T-1)."""
    nl = len(geometry["moe_layers"])
    T = np.array([ex.shape[0] for _, ex in reqs])
    cat = np.concatenate([ex for _, ex in reqs])
    req = np.repeat(np.arange(len(reqs)), T)
    pos = np.concatenate([np.arange(t) for t in T])
    return TraceArrays(
        layers=np.asarray(geometry["moe_layers"]), num_experts=geometry["num_experts"],
        request=np.repeat(req, nl).astype(np.int32), layer_pos=np.tile(np.arange(nl), cat.shape[0]).astype(np.int16),
        experts=cat.reshape(-1, cat.shape[2]).astype(np.int32), phase=np.zeros(cat.shape[0] * nl, dtype=np.int8),
        token=np.repeat(pos, nl).astype(np.int32), request_domain=np.array([d for d, _ in reqs], dtype=object),
        geometry=dict(geometry))
