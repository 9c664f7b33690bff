"""The communication model: what a placement costs when these traces run through an expert-parallel cluster.

Model (pure functions over numpy arrays; every quantity below is computed exactly from the traces):

1. **Home GPU.** A request lives on one GPU (data-parallel attention); its node is the *home node* and every one
   of its tokens starts there. :func:`home_gpus` models the router: the placement's :class:`GroupingRule` names
   the nodes a request may go to (:func:`tracekit.placement.strategies.grouping.allowed_nodes`: ``none`` every node;
   ``domain`` the nodes listed for its domain; ``signature`` the node of the centroid nearest to its prefill
   routing signature), and among those nodes' GPUs the request goes to the least-loaded one, requests taken in
   arrival (index) order, load = token-layers of the *evaluated* rows (``mask``) sent there so far.
2. **Dispatch.** Per token-layer, each of its k experts goes to one replica, chosen the way ``engine`` chooses
   (:mod:`tracekit.placement.scoring.dispatch`): ``sglang`` SGLang 0.5.23's static table, ``vllm`` / ``trtllm`` their
   per-token rules (which need the step layout of :mod:`tracekit.placement.scoring.replay`), or ``ideal`` (the default
   here, an upper bound no engine implements): a replica on the home GPU, else one on the home node, else a
   remote one; among several, the one with the fewest source GPUs mapped to it so far (ties: lowest slot).
3. **Copies.** ``normal`` mode (DeepEP high-throughput kernels): a token crosses once to each *distinct remote
   node* among its destinations, landing on the GPU with the home GPU's local rank, then fans out over NVLink
   (``nvlink_forward_copies_per_token``: distinct remote destination GPUs other than the landing GPU).
   ``low-latency`` mode (DeepEP decode kernels): one copy per remote (token, expert) pair, straight to its GPU.
   Intra-node copies: distinct other GPUs of the home node a token is sent to (normal), and (token, expert) pairs
   on other GPUs of the home node (low-latency). Copies "per token" are per token-layer (one token at one MoE
   layer); bytes = copies x ``hidden_size`` x ``bytes_per_elem`` (1 = FP8 dispatch), for the whole evaluated set.
4. **Load.** (token, expert) assignments landing on each GPU per layer; imbalance = max/mean over GPUs per layer
   (the slowest GPU sets the step time), reported as the mean over layers and the worst layer; same per node.
5. **Weight reads.** Decode tokens in (decode step, request) order are cut into micro-batches of
   ``microbatch_tokens``; per (micro-batch, layer): distinct logical experts touched, and the largest number of
   distinct slots touched on one GPU (that GPU reads that many experts' weights).
6. **Time estimate** (optional, rough): per MoE layer and micro-batch, dispatch bytes through the busiest node's
   NICs (``internode_gbps`` GB/s per GPU, ``gpus_per_node`` NICs per node) and into the busiest GPU over NVLink
   (``nvlink_gbps`` GB/s); the two overlap (max), and combine mirrors dispatch (x2). Bandwidths are in
   gigabytes per second, from the hardware profile (:mod:`tracekit.placement.scoring.hardware`) unless overridden.
   The per-step estimate that the placement table leads with is :mod:`tracekit.placement.scoring.replay`'s.

Zero-computation choices (the sentinel id E of :class:`~tracekit.placement.data.types.TraceArrays`) are computed in
place: they go to no replica, send nothing, add no GPU load and read no weights; their token-layers still count
as token-layers (a row whose experts are all zero-computation crosses the layer with no copy).

Everything is vectorised over token-layers in row chunks (no Python loop per row); chunks run on a few threads
(numpy releases the GIL in its kernels) with one accumulator each, merged at the end. Distinct destinations per row
come from per-row GPU bitmasks when the cluster has at most 64 GPUs, else from sorting each row's k GPUs; both
paths give identical numbers (``force_sort``).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ...errors import TracekitError
from ..data.stats import CHUNK_ROWS, decode_step, row_chunks
from ..data.types import Cluster, GroupingRule, Placement, TraceArrays, real_choices
from . import replay as rp
from .copies import Counts, count_chunk_bits, count_chunk_sorted
from .hardware import get_profile

DEFAULTS = {
    "bytes_per_elem": 1,  # FP8 dispatch
    "microbatch_tokens": 256,
}
EVAL_THREADS = min(4, os.cpu_count() or 1)  # threads over row chunks in evaluate()
# token-layers per chunk of evaluate(): every accumulator is an integer count, so the chunking changes no number
# (except under trtllm, whose per-batch arbitration sees one chunk: it keeps stats.CHUNK_ROWS); 1M rows keep each
# thread's (n, k) temporaries near 60 MB at k = 8 (two threads run at once)
EVAL_CHUNK_ROWS = 1 << 20
MB_CHUNK_ROWS = 1 << 18  # token-layers per chunk of microbatch_stats (a set of flags: the chunking changes nothing)
MAX_MB_BITMAP = 1 << 28  # cap on micro-batch x layer x slot flags (bytes): beyond it only the first micro-batches count, said in the result ('microbatches' of 'microbatches_total')


def check_placement(placement: Placement) -> None:
    """Raise TracekitError unless slot_expert is (M, S) with every expert 0..E-1 in every layer."""
    c = placement.cluster
    se = np.asarray(placement.slot_expert)
    if se.ndim != 2 or se.shape[1] != c.num_slots or se.shape[0] != len(placement.layers):
        raise TracekitError(
            f"placement has slot_expert {se.shape}; expected ({len(placement.layers)}, {c.num_slots}) for this cluster"
        )
    if se.size and (se.min() < 0 or se.max() >= c.num_experts):
        raise TracekitError(f"placement holds expert ids outside 0..{c.num_experts - 1}")
    for m in range(se.shape[0]):
        if np.unique(se[m]).size != c.num_experts:
            missing = sorted(set(range(c.num_experts)) - set(se[m].tolist()))
            raise TracekitError(
                f"placement layer {int(placement.layers[m])} lacks experts {missing[:5]}; every expert needs a slot"
            )


def dispatch_table(placement: Placement, engine: str = "ideal", seed: int = 42,
                   num_hidden_layers: int | None = None, a2a_backend: str = "deepep") -> np.ndarray:
    """(M, G, E) int32: the slot a token homed on GPU g uses for logical expert e at layer position m, under a
    static engine's dispatch (:mod:`tracekit.placement.scoring.dispatch`: ``ideal`` the nearest-replica upper bound,
    ``sglang`` SGLang's own table, placed among the model's hidden layers as the SGLang export writes them:
    ``num_hidden_layers``, else the placement's ``meta['num_hidden_layers']``, else last MoE layer + 1; the table
    SGLang's server builds on each EP rank under ``--moe-a2a-backend a2a_backend``)."""
    from .dispatch import dispatch_table as _table

    check_placement(placement)
    c = placement.cluster
    n_hidden = num_hidden_layers or (placement.meta.get("num_hidden_layers") if placement.meta else None)
    return _table(np.asarray(placement.slot_expert), engine=engine, gpus_per_node=c.gpus_per_node,
                  num_gpus=c.num_gpus, num_experts=c.num_experts, seed=seed,
                  layers=np.asarray(placement.layers), num_hidden_layers=n_hidden, a2a_backend=a2a_backend)


def home_gpus(traces: TraceArrays, placement: Placement, cluster: Cluster | None = None,
              mask: np.ndarray | None = None) -> np.ndarray:
    """(R_n,) int64: the home GPU of every request under ``placement.grouping`` (see :func:`route_requests`)."""
    c = cluster or placement.cluster
    rule = placement.grouping if placement.grouping is not None else GroupingRule()
    return route_requests(rule, traces, c, mask)


def route_requests(rule: GroupingRule, traces: TraceArrays, cluster: Cluster,
                   mask: np.ndarray | None = None) -> np.ndarray:
    """(R_n,) int64 home GPU of every request: what a data-parallel-attention router does.

    Requests arrive in index order; each goes to the least-loaded GPU (ties: lowest index) among the GPUs of the
    nodes its grouping rule allows (:func:`tracekit.placement.strategies.grouping.allowed_nodes`: every GPU for ``none``).
    A GPU's load is the token-layers of the requests sent to it so far, counting only the rows selected by
    ``mask`` (N,) bool (default all): the requests being evaluated are balanced among themselves, as a router
    balances the traffic it actually serves. Requests with no selected rows still get a GPU (the least loaded).
    """
    from ..strategies.grouping import allowed_nodes

    c = cluster
    allow = allowed_nodes(rule, traces, c)  # (R_n, nodes)
    R = traces.num_requests
    rows = traces.request if mask is None else traces.request[np.asarray(mask, dtype=bool)]
    weight = np.bincount(rows, minlength=R).astype(np.float64)
    gpu_allow = np.repeat(allow, c.gpus_per_node, axis=1)  # (R_n, G)
    patterns, pat_of = np.unique(gpu_allow, axis=0, return_inverse=True)
    pat_of = np.asarray(pat_of).reshape(-1)
    cand = [np.flatnonzero(p) for p in patterns]
    load = np.zeros(c.num_gpus)
    out = np.empty(R, dtype=np.int64)
    for r in range(R):
        g_ok = cand[pat_of[r]]
        g = int(g_ok[np.argmin(load[g_ok])])
        out[r] = g
        load[g] += weight[r]
    return out


def _ratio(load: np.ndarray) -> np.ndarray:
    """(M, X) loads -> (M',) max/mean of the layers that carry any load."""
    mean = load.mean(axis=1)
    ok = mean > 0
    return load[ok].max(axis=1) / mean[ok]


def evaluate(
    placement: Placement,
    traces: TraceArrays,
    mask: np.ndarray | None = None,
    *,
    engine: str = "ideal",
    profile: str = "h200",
    decode_batch: int | None = None,
    prefill_chunk: int | None = None,
    replay: bool = True,
    hidden_size: int | None = None,
    bytes_per_elem: float = DEFAULTS["bytes_per_elem"],
    moe_intermediate_size: int | None = None,
    expert_dtype: str | None = None,
    microbatch_tokens: int = DEFAULTS["microbatch_tokens"],
    nvlink_gbps: float | None = None,
    internode_gbps: float | None = None,
    tflops: float | None = None,
    hbm_gbps: float | None = None,
    seed: int = 42,
    home: np.ndarray | None = None,
    force_sort: bool = False,
    a2a_backend: str = "deepep",
) -> dict:
    """Score ``placement`` on the token-layers of ``traces`` selected by ``mask`` (N,) bool (default all).

    ``engine``: whose replica choice sends each (token, expert) to a slot (:mod:`tracekit.placement.scoring.dispatch`:
    sglang, vllm, trtllm, ideal). ``replay``: also replay the rows as deployment steps
    (:mod:`tracekit.placement.scoring.replay`: ``decode_batch``, ``prefill_chunk``, the hardware ``profile`` with
    ``tflops``/``hbm_gbps``/``nvlink_gbps``/``internode_gbps`` overrides) and add its per-step keys; per-token
    engines (vllm, trtllm) always lay out the steps, since their choice depends on a token's place in its rank's
    batch. The model's sizes (``hidden_size``, ``moe_intermediate_size``, ``expert_dtype``) come from the
    arguments, else the traces' geometry, else :mod:`tracekit.placement.scoring.sizes`' defaults (DeepSeek V3, BF16). ``home`` (R_n,) overrides :func:`home_gpus`.
    ``force_sort`` uses the general per-row sort path even when the cluster has <= 64 GPUs (where per-row GPU
    bitmasks are faster); both give identical numbers. ``a2a_backend``: SGLang's ``--moe-a2a-backend`` for
    ``engine="sglang"`` (:func:`tracekit.placement.scoring.dispatch.check_a2a_backend`). Returns a flat dict of floats (JSON-ready) plus
    ``gpu_load_max_over_mean_per_layer`` (list, one per loaded layer). See the module docstring for definitions;
    the weight-read columns use the ``ideal`` table for per-token engines.
    """
    from .dispatch import STATIC_ENGINES, check_engine, choose_replicas, replica_lists

    check_engine(engine)
    from .sizes import model_sizes

    prof = get_profile(profile, tflops=tflops, nvlink_gbps=nvlink_gbps, rdma_gbps=internode_gbps,
                          hbm_gbps=hbm_gbps)
    sizes = model_sizes(traces.geometry, hidden_size=hidden_size, moe_intermediate_size=moe_intermediate_size,
                        expert_dtype=expert_dtype)
    hidden_size = sizes.hidden_size
    nvlink_gbps, internode_gbps = prof.nvlink_gbps, prof.rdma_gbps
    decode_batch = rp.DEFAULT_DECODE_BATCH if decode_batch is None else int(decode_batch)
    prefill_chunk = rp.DEFAULT_PREFILL_CHUNK if prefill_chunk is None else int(prefill_chunk)
    c = placement.cluster
    if traces.num_experts != c.num_experts:
        raise TracekitError(f"traces have {traces.num_experts} experts but the placement {c.num_experts}")
    if len(placement.layers) != traces.num_layers or not np.array_equal(np.asarray(placement.layers), traces.layers):
        raise TracekitError("placement layers differ from the traces' MoE layers; place with traces of this model")
    if len(traces) == 0:
        raise TracekitError("evaluation needs per-token routes; a loads-only run cannot be scored")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (len(traces),):
            raise ValueError(f"mask must be (N,) with N={len(traces)}")
    static = engine in STATIC_ENGINES
    n_hidden = placement.meta.get("num_hidden_layers") or (traces.geometry or {}).get("num_layers")
    table = dispatch_table(placement, engine if static else "ideal", seed=seed, num_hidden_layers=n_hidden,
                           a2a_backend=a2a_backend)
    M, G, E = table.shape
    gpn, nodes = c.gpus_per_node, c.nodes
    gpu_of_slot = c.gpu_of_slot()
    if home is None:
        home = home_gpus(traces, placement, c, mask)
    home = np.asarray(home, dtype=np.int64)
    layout = rp.step_layout(traces, mask, home, decode_batch=decode_batch, prefill_chunk=prefill_chunk) \
        if (replay or not static) else None
    reps = None if static else replica_lists(np.asarray(placement.slot_expert), E)
    se = np.asarray(placement.slot_expert)

    slot_table = table.reshape(-1)  # (M*G*E,) slot per (m, g, e)
    gpu_table = gpu_of_slot.astype(np.int16)  # (S,) GPU per slot
    chunk_fn = count_chunk_bits if (G <= 64 and not force_sort) else count_chunk_sorted
    # TRT-LLM arbitrates among a batch's items inside the chunk that holds them: its chunks stay as they were
    chunks = list(row_chunks(len(traces), CHUNK_ROWS if engine == "trtllm" else EVAL_CHUNK_ROWS))

    def work(part: list[slice]) -> tuple:
        acc_ = Counts(M, G, nodes)
        steps_ = rp.StepCounts(layout.num_steps, M, G, gpn, c.slots_per_gpu) if (replay and layout is not None) \
            else None
        for sl in part:
            sel = slice(None) if mask is None else mask[sl]
            lp = traces.layer_pos[sl][sel].astype(np.int32)
            if lp.size == 0:
                continue
            h = home[traces.request[sl][sel]].astype(np.int32)
            ex = traces.experts[sl][sel].astype(np.int32)
            real = real_choices(traces, ex)  # None: no zero-computation choice in these traces
            if static:
                look = ex if real is None else np.where(real, ex, 0)
                slots = slot_table[((lp * G + h) * E)[:, None] + look]  # (n, k) slot of every (token, expert)
                dg = gpu_table[slots]  # (n, k) its GPU
            else:
                st = layout.step[sl][sel].astype(np.int64)
                slots = choose_replicas(se, lp, h, ex, engine=engine, gpus_per_node=gpn, num_gpus=G, num_experts=E,
                                        batch=st * G + h, index_in_batch=layout.index[sl][sel], replicas=reps)
                dg = gpu_of_slot[slots].astype(np.int16)
            if real is not None:  # computed in place: "sent" to the home GPU, i.e. no copy anywhere; no load
                dg = np.where(real, dg, h[:, None]).astype(np.int16, copy=False)
            chunk_fn(acc_, lp, h, dg, G, gpn, nodes, real)
            if steps_ is not None:
                steps_.add(layout.step[sl][sel], lp, h, dg, traces.phase[sl][sel] == 1, real, slots)
        return acc_, steps_

    # numpy releases the GIL in its kernels: chunks (and the micro-batch statistics) run on EVAL_THREADS threads
    n_thr = max(1, min(EVAL_THREADS, len(chunks)))
    with ThreadPoolExecutor(max_workers=n_thr + 1) as pool:
        mb_future = pool.submit(microbatch_stats, placement, traces, mask, table=table, home=home,
                                microbatch_tokens=microbatch_tokens)
        parts = list(pool.map(work, [chunks[i::n_thr] for i in range(n_thr)]))
        mb = mb_future.result()
    acc, step_acc = parts[0]
    for other, other_steps in parts[1:]:
        acc.merge(other)
        if step_acc is not None:
            step_acc.merge(other_steps)
    rows = acc.rows
    cn_norm, cn_ll, intra_norm, intra_ll, fwd_norm = acc.cn_norm, acc.cn_ll, acc.intra_norm, acc.intra_ll, acc.fwd_norm
    node_eg_norm, node_in_norm, node_eg_ll, node_in_ll = acc.node_eg_norm, acc.node_in_norm, acc.node_eg_ll, acc.node_in_ll
    nvl_in_norm, nvl_in_ll, gpu_load = acc.nvl_in_norm, acc.nvl_in_ll, acc.gpu_load
    if rows == 0:
        raise TracekitError("no token-layers selected to evaluate (empty split); use more requests or --split tokens")

    gpu_load = gpu_load.reshape(M, G)
    node_load = gpu_load.reshape(M, nodes, gpn).sum(2)
    g_ratio = _ratio(gpu_load)
    n_ratio = _ratio(node_load)
    elem = hidden_size * bytes_per_elem

    # time per MoE layer for one micro-batch of `microbatch_tokens` token-layers, dispatch + combine
    scale = microbatch_tokens / rows * elem
    nic = internode_gbps * 1e9 * gpn

    def est_ms(eg, ing, nvl):
        t_net = max(eg.max(), ing.max()) * scale / nic
        t_nvl = nvl.max() * scale / (nvlink_gbps * 1e9)
        return float(2e3 * max(t_net, t_nvl))

    out = {
        "token_layers": rows,
        "cross_node_copies_per_token_normal": cn_norm / rows,
        "cross_node_copies_per_token_lowlat": cn_ll / rows,
        "intra_node_copies_per_token": intra_norm / rows,
        "intra_node_copies_per_token_lowlat": intra_ll / rows,
        "nvlink_forward_copies_per_token_normal": fwd_norm / rows,
        "bytes_normal": float(cn_norm * elem),
        "bytes_lowlat": float(cn_ll * elem),
        "bytes_intra_node": float((intra_norm + fwd_norm) * elem),
        "gpu_load_max_over_mean": float(g_ratio.mean()),
        "gpu_load_max_over_mean_worst": float(g_ratio.max()),
        "node_load_max_over_mean": float(n_ratio.mean()),
        "node_load_max_over_mean_worst": float(n_ratio.max()),
        **mb,
        "est_alltoall_ms": est_ms(node_eg_norm, node_in_norm, nvl_in_norm),
        "est_alltoall_ms_lowlat": est_ms(node_eg_ll, node_in_ll, nvl_in_ll),
        "gpu_load_max_over_mean_per_layer": [float(x) for x in g_ratio],
        "cross_node_copies_per_token_normal_per_layer": [
            float(x) for x in acc.cn_norm_layer / np.maximum(acc.rows_layer, 1)
        ],
        "engine": engine,
    }
    if step_acc is not None:
        out.update(step_acc.summary(layout, prof, hidden_size=hidden_size, bytes_per_elem=bytes_per_elem,
                                    moe_intermediate_size=sizes.moe_intermediate_size,
                                    weight_bytes=sizes.weight_bytes))
        out.update(profile=prof.name, decode_batch=decode_batch, prefill_chunk=prefill_chunk,
                   hidden_size=hidden_size, moe_intermediate_size=sizes.moe_intermediate_size,
                   expert_dtype=sizes.expert_dtype, sizes_assumed=list(sizes.assumed))
    return out


def microbatch_stats(
    placement: Placement,
    traces: TraceArrays,
    mask: np.ndarray | None = None,
    *,
    table: np.ndarray | None = None,
    home: np.ndarray | None = None,
    microbatch_tokens: int = DEFAULTS["microbatch_tokens"],
) -> dict:
    """Decode weight reads: mean over (micro-batch, layer) of distinct experts touched, and of the largest number
    of distinct slots touched on one GPU. NaN when the selection holds no decode tokens."""
    c = placement.cluster
    if microbatch_tokens < 1:
        raise TracekitError("--microbatch-tokens must be at least 1")
    nan = {"distinct_experts_per_microbatch": float("nan"), "gpu_distinct_slots_per_microbatch_max": float("nan"),
           "microbatches": 0, "microbatches_total": 0}
    step = decode_step(traces)
    sel = step >= 0
    if mask is not None:
        sel &= mask
    if not sel.any():
        return nan
    table = dispatch_table(placement) if table is None else table
    home = home_gpus(traces, placement, c, mask) if home is None else home
    M, G, E = table.shape
    S, spg = c.num_slots, c.slots_per_gpu
    R = traces.num_requests
    r = traces.request[sel].astype(np.int64)
    key = step[sel].astype(np.int64) * R + r  # (decode step, request) order
    present = np.zeros(int(key.max()) + 1, dtype=bool)
    present[key] = True
    rank = np.cumsum(present) - 1
    mb_of = rank[key] // microbatch_tokens
    n_mb = int(mb_of.max()) + 1
    n_keep = max(1, min(n_mb, MAX_MB_BITMAP // max(1, M * S)))
    keep = mb_of < n_keep
    mb_of, r = mb_of[keep], r[keep]
    rows = np.flatnonzero(sel)[keep]
    touched = np.zeros(n_keep * M * S, dtype=bool)
    flat = table.reshape(-1)
    for part in row_chunks(rows.size, MB_CHUNK_ROWS):  # (n, k) int64 temporaries a chunk at a time (it runs
        at = rows[part]  # beside evaluate's own chunks: their peaks add up)
        lp = traces.layer_pos[at].astype(np.int64)
        ex = traces.experts[at].astype(np.int64)
        real = real_choices(traces, ex)
        slot = flat[((lp * G + home[r[part]]) * E)[:, None] + (ex if real is None else np.where(real, ex, 0))]
        flags = ((mb_of[part] * M + lp) * S)[:, None] + slot
        touched[flags if real is None else flags[real]] = True  # a zero-computation choice reads no weights
    touched = touched.reshape(n_keep, M, S)
    # logical experts touched = distinct experts among touched slots
    se = np.asarray(placement.slot_expert)
    logical = np.zeros((n_keep, M, E), dtype=bool)
    mi = np.broadcast_to(np.arange(M)[None, :, None], touched.shape)
    bi = np.broadcast_to(np.arange(n_keep)[:, None, None], touched.shape)
    ei = np.broadcast_to(se[None, :, :], touched.shape)
    logical[bi[touched], mi[touched], ei[touched]] = True
    any_tok = touched.any(axis=2)
    n_logical = logical.sum(2)[any_tok]
    per_gpu = touched.reshape(n_keep, M, G, spg).sum(3).max(2)[any_tok]
    return {
        "distinct_experts_per_microbatch": float(n_logical.mean()),
        "gpu_distinct_slots_per_microbatch_max": float(per_gpu.mean()),
        "microbatches": int(n_keep),
        "microbatches_total": int(n_mb),  # more than "microbatches": the cap (MAX_MB_BITMAP) cut the rest
    }


def score_placement(placement, traces: TraceArrays, mask: np.ndarray | None = None, *, engine: str = "sglang",
                    **options) -> dict:
    """:func:`evaluate` with the product's defaults: SGLang's server tables, replayed step by step (the keys are in
    :mod:`tracekit.placement.scoring.replay`'s docstring). ``options``: any :func:`evaluate` option (profile,
    decode_batch, prefill_chunk, home, hidden_size, bytes_per_elem, moe_intermediate_size, tflops, nvlink_gbps,
    internode_gbps = RDMA GB/s, seed, ...)."""
    return evaluate(placement, traces, mask, engine=engine, **options)
