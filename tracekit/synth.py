"""A synthetic routing-trace generator: writes a ``routes`` run directory at scale, with known structure.

What it models (all seeded, all vectorised numpy; rows go to disk in chunks through :func:`store.write_chunk`):

* **Skew per layer.** Expert popularity in MoE layer ``l`` is Zipf-like, ``p_l(e) ~ 1 / rank_l(e)^s_l``, over a
  random permutation of experts, with an exponent that varies across layers:
  ``s_l = skew * (1 + layer_skew_spread * sin(2 pi l / L))`` (some layers far more imbalanced than others).
* **Domain shift.** Each domain multiplies the popularity of a random ``domain_shift_frac`` of the experts by
  ``domain_shift`` (a different subset per domain and layer), then renormalises.
* **Request profiles and prefill->decode affinity.** Each request belongs to one of ``profiles_per_domain``
  profiles of its domain; a profile perturbs the domain's distribution by log-normal noise (``profile_sigma``).
  A token routes by its request's profile with probability ``affinity`` and by the plain domain distribution
  otherwise, in prefill and in decode alike, so a request's prefill and decode histograms correlate more with
  each other than with another request's.
* **Group-limited routing** (``n_group``, ``topk_group``; off by default). DeepSeek V3's router splits the E
  experts into ``n_group`` contiguous groups, scores each group by the sum of its two best expert scores, keeps the
  ``topk_group`` best groups and takes the top-k experts inside them. The generator does the same with the
  Gumbel-perturbed log-probabilities as the router's scores (``log p + Gumbel``; without groups this is exact
  sampling without replacement), so a token's k experts always lie in at most ``topk_group`` groups.
* **Token-level co-activation through latent topics** (``topics``, off by default). Per MoE layer, ``topics``
  clusters of ``topic_size`` experts (random subsets, different per layer). Each request profile has a topic
  mixture (Dirichlet with concentration ``topic_alpha``); every token draws one topic from its request's mixture
  (the same topic at every layer: a token's meaning persists through the network) and routes by its distribution
  with that topic's experts multiplied by ``topic_boost`` (renormalised), so the experts of one topic are chosen
  together by the same tokens, and recurring expert sets follow the request mix.
* **Top-k without replacement.** Every distribution gets a bank of ``bank_size`` top-k sets drawn exactly by
  Gumbel-top-k (Plackett-Luce sampling without replacement); each token-layer then picks one set of its
  distribution's bank uniformly. This keeps 100M-row runs to a few minutes: the per-row cost is one random
  index and a gather, not E random numbers. With topics, every (distribution, topic) pair has its own bank
  (drawn in float32 to keep the larger bank set fast).

Row order follows the collector: requests in order, prefill tokens then decode steps, every MoE layer of a token
together. Weights, when requested, are a sorted random split of 1 over the k experts.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import TracekitError
from .schema import build_routes_table, expert_numpy_dtype, routes_schema
from .store import base_manifest, finalize, new_run_id, write_chunk, write_manifest

DOMAINS = ("code", "math", "chat", "general")
DATASET_OF_DOMAIN = {"code": "synth-code", "math": "synth-math", "chat": "synth-chat", "general": "synth-general"}


def _lengths(spec: int | tuple[int, int], n: int, rng: np.random.Generator) -> np.ndarray:
    if isinstance(spec, (int, np.integer)):
        return np.full(n, int(spec), dtype=np.int64)
    lo, hi = spec
    return rng.integers(int(lo), int(hi) + 1, size=n)


def layer_popularity(num_experts: int, num_layers: int, skew: float, layer_skew_spread: float,
                     rng: np.random.Generator) -> np.ndarray:
    """(L, E) Zipf-like expert probabilities, exponent varying over layers, random expert order per layer."""
    ranks = np.arange(1, num_experts + 1, dtype=np.float64)
    s = skew * (1.0 + layer_skew_spread * np.sin(2 * np.pi * np.arange(num_layers) / max(num_layers, 1)))
    p = ranks[None, :] ** -np.maximum(s, 0.0)[:, None]
    for l in range(num_layers):
        p[l] = p[l, rng.permutation(num_experts)]
    return p / p.sum(axis=1, keepdims=True)


def gumbel_topk_bank(p: np.ndarray, k: int, bank_size: int, rng: np.random.Generator, *,
                     n_group: int | None = None, topk_group: int | None = None, float32: bool = False) -> np.ndarray:
    """Samples of k distinct experts from distributions ``p``.

    p: (..., E) probabilities. Returns (..., bank_size, k) expert ids, each row a draw without replacement
    (Gumbel-top-k), ordered by decreasing perturbed score (the router's order). With ``n_group`` and
    ``topk_group``, group-limited selection as in DeepSeek V3: the scores ``log p + Gumbel`` of each of the
    ``n_group`` contiguous expert groups are summarised by the sum of the group's top-2 scores, only the
    ``topk_group`` best groups stay eligible, and the top-k is taken inside them. ``float32`` draws the Gumbel
    noise in single precision (faster; a different random stream).
    """
    E = p.shape[-1]
    shape = p.shape[:-1] + (bank_size, E)
    if float32:
        u = rng.random(shape, dtype=np.float32)
        noise = -np.log(-np.log(np.maximum(u, np.float32(1e-30))))
        keys = np.log(np.maximum(p, 1e-30)).astype(np.float32)[..., None, :] + noise
    else:
        keys = np.log(np.maximum(p, 1e-300))[..., None, :] + rng.gumbel(size=shape)
    if n_group and topk_group and topk_group < n_group:
        gs = E // n_group
        grouped = keys.reshape(shape[:-1] + (n_group, gs))
        score = np.partition(grouped, gs - 2, axis=-1)[..., gs - 2:].sum(-1) if gs >= 2 else grouped[..., 0]
        drop = np.argpartition(score, n_group - topk_group - 1, axis=-1)[..., : n_group - topk_group]
        np.put_along_axis(grouped, drop[..., None], -np.inf, axis=-2)  # keys is a view of the same memory
    top = np.argpartition(-keys, k - 1, axis=-1)[..., :k]
    order = np.argsort(-np.take_along_axis(keys, top, axis=-1), axis=-1)
    return np.take_along_axis(top, order, axis=-1)


def generate_run(
    out: str | os.PathLike,
    *,
    num_experts: int = 256,
    top_k: int = 8,
    moe_layers: Sequence[int] = range(3, 61),
    num_layers: int | None = None,
    requests: int = 1000,
    prompt_tokens: int | tuple[int, int] = (128, 1024),
    decode_tokens: int | tuple[int, int] = (32, 512),
    domains: Sequence[str] = DOMAINS,
    seed: int = 0,
    skew: float = 0.4,
    layer_skew_spread: float = 0.5,
    domain_shift: float = 2.0,
    domain_shift_frac: float = 0.1,
    profiles_per_domain: int = 8,
    profile_sigma: float = 1.0,
    affinity: float = 0.5,
    bank_size: int = 512,
    n_group: int | None = None,
    topk_group: int | None = None,
    topics: int = 0,
    topic_size: int | None = None,
    topic_boost: float = 4.0,
    topic_alpha: float = 0.5,
    weights: bool = False,
    weight_dtype: str = "float16",
    model: str = "synthetic",
    rows_per_chunk: int = 1 << 22,
    run_id: str | None = None,
) -> Path:
    """Write a synthetic ``routes`` run to ``out`` and return its path (see the module docstring).

    Geometry: ``num_experts`` routed experts, ``top_k`` per token, MoE layers ``moe_layers`` (absolute indices)
    of ``num_layers`` (default last MoE layer + 1). Requests cycle through ``domains``; prompt and decode lengths
    are ints or inclusive (lo, hi) ranges. Rows = sum over requests of (prompt + decode) * len(moe_layers).
    ``n_group``/``topk_group``: group-limited routing (DeepSeek V3: 8 and 4); ``topics`` > 0: latent co-activation
    topics of ``topic_size`` experts (default 2 * top_k) boosted by ``topic_boost``, per-profile mixtures
    Dirichlet(``topic_alpha``). The defaults (no groups, no topics) reproduce the plain generator exactly.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise TracekitError(f"{out} already exists and is not empty; choose a new output directory")
    moe_layers = np.asarray(list(moe_layers), dtype=np.int16)
    L, E, k = len(moe_layers), int(num_experts), int(top_k)
    if L == 0 or k < 1 or k > E or requests < 1:
        raise TracekitError("need at least one MoE layer, one request and 1 <= top_k <= num_experts")
    grouped = bool(n_group) and bool(topk_group)
    if grouped and (E % int(n_group) or not 1 <= int(topk_group) <= int(n_group)
                    or int(topk_group) * (E // int(n_group)) < k):
        raise TracekitError(
            f"group-limited routing needs num_experts ({E}) divisible by n_group ({n_group}), 1 <= topk_group "
            f"({topk_group}) <= n_group and topk_group * experts per group >= top_k ({k})"
        )
    T = int(topics)
    t_size = int(topic_size or 2 * k)
    if T < 0 or (T and not 1 <= t_size <= E) or topic_boost <= 0 or topic_alpha <= 0:
        raise TracekitError("need topics >= 0, 1 <= topic_size <= num_experts, topic_boost > 0 and topic_alpha > 0")
    domains = list(domains)
    D = len(domains)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()

    base = layer_popularity(E, L, skew, layer_skew_spread, rng)  # (L, E)
    boost = np.ones((D, L, E))
    n_boost = max(1, int(round(domain_shift_frac * E)))
    for d in range(D):
        for l in range(L):
            boost[d, l, rng.choice(E, n_boost, replace=False)] = domain_shift
    dom_p = base[None] * boost
    dom_p /= dom_p.sum(-1, keepdims=True)  # (D, L, E)
    P = max(1, int(profiles_per_domain))
    prof_p = dom_p[:, None] * rng.lognormal(0.0, profile_sigma, size=(D, P, L, E))
    prof_p /= prof_p.sum(-1, keepdims=True)  # (D, P, L, E)
    # banks: index 0..D-1 domain distributions, D + d*P + j the profiles
    dists = np.concatenate([dom_p, prof_p.reshape(D * P, L, E)], axis=0)  # (B, L, E)
    e_dtype = expert_numpy_dtype(E)
    group_kw = {"n_group": int(n_group), "topk_group": int(topk_group)} if grouped else {}
    if T:
        # topic j of layer l: t_size random experts; bank (b * T + j) = distribution b boosted on topic j
        topic_boost_mask = np.ones((T, L, E))
        for j in range(T):
            for l in range(L):
                topic_boost_mask[j, l, rng.choice(E, t_size, replace=False)] = topic_boost
        banks = np.empty((dists.shape[0] * T, L, bank_size, k), dtype=e_dtype)
        for b in range(dists.shape[0]):
            for j in range(T):
                pj = dists[b] * topic_boost_mask[j]
                pj /= pj.sum(-1, keepdims=True)
                banks[b * T + j] = gumbel_topk_bank(pj, k, bank_size, rng, float32=True, **group_kw)
        topic_mix = rng.dirichlet(np.full(T, float(topic_alpha)), size=D * P)  # (D * P,) profile mixtures
    else:
        banks = np.empty(dists.shape[:2] + (bank_size, k), dtype=e_dtype)
        for b in range(dists.shape[0]):  # one distribution at a time bounds memory to L * bank_size * E floats
            banks[b] = gumbel_topk_bank(dists[b], k, bank_size, rng, **group_kw)
        topic_mix = None

    req_domain = np.arange(requests) % D
    req_profile = D + req_domain * P + rng.integers(0, P, size=requests)
    n_prompt = _lengths(prompt_tokens, requests, rng)
    n_decode = _lengths(decode_tokens, requests, rng)
    tokens = n_prompt + n_decode

    run_id = run_id or new_run_id()
    schema = routes_schema(E, weight_dtype)
    out.mkdir(parents=True, exist_ok=True)
    geometry = {
        "family": "synthetic", "num_layers": int(num_layers or int(moe_layers.max()) + 1),
        "moe_layers": [int(x) for x in moe_layers], "num_experts": E, "top_k": k,
        "n_group": int(n_group) if grouped else None, "topk_group": int(topk_group) if grouped else None, "n_shared_experts": None, "scoring": None, "hidden_size": None,
    }
    args = {k_: v for k_, v in dict(
        requests=requests, prompt_tokens=prompt_tokens, decode_tokens=decode_tokens, domains=domains, seed=seed,
        skew=skew, layer_skew_spread=layer_skew_spread, domain_shift=domain_shift,
        domain_shift_frac=domain_shift_frac, profiles_per_domain=P, profile_sigma=profile_sigma,
        affinity=affinity, bank_size=bank_size, weights=weights).items()}
    if grouped:
        args.update(n_group=int(n_group), topk_group=int(topk_group))
    if T:
        args.update(topics=T, topic_size=t_size, topic_boost=topic_boost, topic_alpha=topic_alpha)
    write_manifest(out, base_manifest(
        run_id=run_id, kind="routes", source="synthetic", model={"name": model, "id": model, "revision": None},
        geometry=geometry,
        dataset={"name": "synthetic", "domain": domains[0] if D == 1 else "mixed", "prompts": requests},
        args=args,
    ))

    chunk, r0 = 0, 0
    while r0 < requests:
        # requests of this chunk: all rows of a request stay in one chunk
        r1 = r0 + 1
        while r1 < requests and (tokens[r0:r1 + 1].sum() * L) <= rows_per_chunk:
            r1 += 1
        _write_requests(out, schema, run_id, model, domains, banks, moe_layers, req_domain, req_profile,
                        n_prompt, n_decode, r0, r1, affinity, weights, rng, chunk, topic_mix)
        chunk += 1
        r0 = r1
    finalize(out, generator_seconds=round(time.perf_counter() - t0, 2))
    return out


def _write_requests(out, schema, run_id, model, domains, banks, moe_layers, req_domain, req_profile,
                    n_prompt, n_decode, r0, r1, affinity, weights, rng, chunk, topic_mix=None) -> None:
    L = len(moe_layers)
    B, _, S, k = banks.shape
    D = len(domains)
    reqs = np.arange(r0, r1)
    tok_per_req = n_prompt[r0:r1] + n_decode[r0:r1]
    T = int(tok_per_req.sum())
    tok_req = np.repeat(reqs, tok_per_req)  # (T,)
    starts = np.repeat(np.cumsum(tok_per_req) - tok_per_req, tok_per_req)
    pos = (np.arange(T) - starts).astype(np.int32)  # position within the request
    is_dec = pos >= n_prompt[tok_req]
    step = np.where(is_dec, pos - n_prompt[tok_req] + 1, -1).astype(np.int32)

    n = T * L
    row_tok = np.repeat(np.arange(T), L)
    layer_idx = np.tile(np.arange(L), T)
    use_profile = rng.random(n) < affinity
    bank = np.where(use_profile, req_profile[tok_req][row_tok], req_domain[tok_req][row_tok])
    if topic_mix is not None:  # one topic per token from its profile's mixture, shared by all its layers
        n_topics = topic_mix.shape[1]
        cdf = np.cumsum(topic_mix[req_profile[tok_req] - D], axis=1)  # (tokens, topics)
        topic = np.minimum((rng.random(len(tok_req))[:, None] > cdf).sum(1), n_topics - 1)
        bank = bank * n_topics + topic[row_tok]
    pick = rng.integers(0, S, size=n)
    flat = (bank.astype(np.int64) * L + layer_idx) * S + pick
    experts = banks.reshape(-1, k)[flat]  # (n, k)
    w = None
    if weights:
        w = -np.sort(-rng.dirichlet(np.ones(k), size=n), axis=1)
    # one domain per dataset name: domain labels index into `domains`
    dom = req_domain[tok_req][row_tok]
    prompt_names = np.array([f"synth-{i}" for i in reqs], dtype=object)
    table = build_routes_table(
        schema=schema, run_id=run_id, model=model, dataset="synthetic",
        domain=dom.astype(np.int32), domains=list(domains),
        request_id=tok_req[row_tok].astype(np.int32),
        prompt_id=prompt_names[(tok_req - r0)[row_tok]],
        phase=is_dec[row_tok].astype(np.int8), position=pos[row_tok], step=step[row_tok],
        layer=moe_layers[layer_idx], token_id=None, experts=experts, weights=w,
    )
    write_chunk(out, table, chunk=chunk, requests=reqs.tolist(), prompt_tokens=int(n_prompt[r0:r1].sum()),
                generated_tokens=int(n_decode[r0:r1].sum()))
