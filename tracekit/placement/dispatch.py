"""Dispatch models: which physical replica of a logical expert a serving engine sends a token to.

A placement puts E logical experts into S = E + R physical slots per MoE layer (slot p on GPU
``p // (S / G)``, GPU g on node ``g // gpus_per_node``). When an expert has several replicas, the engine picks one
per token; each engine has its own rule, reproduced here from its source (same rules, same tie-breaks, same seed). The SGLang model was checked entry for
entry against SGLang 0.5.23's own functions on random maps (1-4 nodes, R = 0..32, 5 hidden layers each):

- ``sglang`` (SGLang 0.5.23, ``--ep-dispatch-algorithm static``; ``compute_logical_to_rank_dispatch_physical_map``
  and ``_find_nearest_expert`` in ``python/sglang/srt/eplb/expert_location.py``): a static table per (layer,
  source EP rank, logical expert). Candidates are the expert's slots in ascending slot order. One candidate -> it;
  else the first candidate on the rank's own GPU; else, only when it *narrows* the set (some but not all
  candidates on the rank's node), the first candidate on the rank's node; else the rank is left for a fair random
  pick: per (layer, expert), in that loop order over *every hidden layer of the model* (dense layers included:
  SGLang keeps a trivial ``arange(S) % E`` row for them and draws for them too), the remaining ranks get
  ``_fair_choices(candidates, k)`` from one ``random.Random(42)``: ``candidates * (k // n) +
  sample(candidates, k % n)``, then shuffled, handed out to the remaining ranks in rank order.
- ``vllm`` (vLLM 0.33, ``_eplb_map_and_record_i32_kernel`` behind ``eplb_map_to_physical_and_record`` in
  ``vllm/model_executor/layers/fused_moe/router/base_router.py``; replica lists from ``compute_logical_maps`` in
  ``vllm/distributed/eplb/eplb_state.py``): per token, replica index ``((t * 2654435769) mod 2**32) mod count``
  into the expert's slots in ascending slot order, ``t`` the token's index in the rank's forward batch (the router
  runs on each DP rank's own tokens before the all-to-all).
- ``trtllm`` (TensorRT-LLM, ``moeComputeRouteKernel`` in ``cpp/tensorrt_llm/kernels/moeLoadBalance/
  moeLoadBalanceKernels.cu``; replica lists from ``prepareGpuPlacementInfo`` in ``moeLoadBalancer.cpp``): the
  rank's (token, k) items flattened token-major are cut into blocks of 1024 (256 threads x 4 items); an item whose
  expert has more than one replica gets key ``block + n + ep_rank`` (``n`` = earlier items of the same expert in
  the same block; ``ep_rank`` added because attention DP sets ``offset_by_ep_rank``), replica ``key mod count`` in
  ascending slot order. Experts with one replica go straight to it. (Read from TensorRT-LLM's repository source;
  not checked line by line against the 1.2.1 wheel.)
- ``ideal``: the upper bound tracekit used before (not an engine): a replica on the source GPU, else on its node,
  else any; among several, the one with the fewest source GPUs mapped so far (ties: lowest slot).

Static engines (``sglang``, ``ideal``) give a table (:func:`dispatch_table`); per-token engines (``vllm``,
``trtllm``) need the token's place in its rank's batch (:func:`choose_replicas`, which handles every engine).
"""
from __future__ import annotations

import random

import numpy as np

ENGINES = ("sglang", "vllm", "trtllm", "ideal")
STATIC_ENGINES = ("sglang", "ideal")
SGLANG_SEED = 42  # compute_logical_to_rank_dispatch_physical_map(seed=42)
VLLM_HASH = 2654435769  # floor(2**32 / golden ratio), vLLM's Knuth multiplier
TRTLLM_BLOCK_ITEMS = 1024  # kThreadCount 256 x kEltPerThread 4 items per CUDA block


def check_engine(engine: str) -> str:
    from ..errors import TracekitError

    if engine not in ENGINES:
        raise TracekitError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    return engine


def replica_lists(slot_expert: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """Every expert's slots in ascending slot order (the order SGLang, vLLM and TRT-LLM all build).

    ``slot_expert`` (M, S) -> ``slots`` (M, E, Rmax) int32 padded with -1, ``count`` (M, E) int32.
    """
    se = np.asarray(slot_expert, dtype=np.int64)
    M, S = se.shape
    count = np.zeros((M, num_experts), dtype=np.int32)
    for m in range(M):
        count[m] = np.bincount(se[m], minlength=num_experts)
    rmax = max(1, int(count.max()) if count.size else 1)
    slots = np.full((M, num_experts, rmax), -1, dtype=np.int32)
    for m in range(M):
        order = np.argsort(se[m], kind="stable")  # slots grouped by expert, ascending within each expert
        e_sorted = se[m][order]
        start = np.searchsorted(e_sorted, np.arange(num_experts))
        rank = np.arange(S) - start[e_sorted]
        slots[m, e_sorted, rank] = order
    return slots, count


def sglang_rank_tables(slot_expert_all: np.ndarray, *, num_experts: int, num_gpus: int, gpus_per_node: int,
                       seed: int = SGLANG_SEED, prefer_same_node: bool = True) -> np.ndarray:
    """SGLang's static dispatch map for every hidden layer: (L, G, E) int32 physical slot.

    ``slot_expert_all`` (L, S) is the ``physical_to_logical_map`` SGLang loads, one row per *hidden* layer (dense
    rows included: they consume random draws in SGLang's loop, so they must be here for the same seeded picks).
    ``prefer_same_node`` is SGLang's ``_prefer_same_node_experts()`` (True unless elastic EP scales the world).
    """
    se = np.asarray(slot_expert_all, dtype=np.int64)
    L, S = se.shape
    spg = S // num_gpus
    spn = spg * gpus_per_node
    rng = random.Random(seed)
    out = np.full((L, num_gpus, num_experts), -1, dtype=np.int32)
    slots, count = replica_lists(se, num_experts)
    ranks = np.arange(num_gpus)
    for layer in range(L):
        for e in range(num_experts):
            cand = slots[layer, e, : count[layer, e]].tolist()
            if len(cand) == 1:
                out[layer, :, e] = cand[0]
                continue
            cand_arr = np.asarray(cand)
            gpu = cand_arr // spg
            node = cand_arr // spn
            # first candidate on the rank's GPU (argmax of a bool row = first True)
            on_gpu = gpu[None, :] == ranks[:, None]  # (G, n)
            pick = np.where(on_gpu.any(1), cand_arr[on_gpu.argmax(1)], -1)
            if prefer_same_node:
                on_node = node[None, :] == (ranks // gpus_per_node)[:, None]
                n_node = on_node.sum(1)
                narrows = (pick < 0) & (n_node > 0) & (n_node < len(cand))
                pick = np.where(narrows, cand_arr[on_node.argmax(1)], pick)
            remaining = np.flatnonzero(pick < 0)
            if remaining.size:
                q, rem = divmod(int(remaining.size), len(cand))
                choices = cand * q + rng.sample(cand, k=rem)
                rng.shuffle(choices)
                pick[remaining] = choices
            out[layer, :, e] = pick
    return out


def sglang_table(slot_expert: np.ndarray, *, num_experts: int, num_gpus: int, gpus_per_node: int,
                 layers: np.ndarray | None = None, num_hidden_layers: int | None = None,
                 seed: int = SGLANG_SEED) -> np.ndarray:
    """(M, G, E) SGLang static dispatch for the M MoE layers of ``slot_expert`` (M, S).

    ``layers`` (M,) absolute layer ids and ``num_hidden_layers`` place them among the model's hidden layers the
    way ``tracekit export --format sglang`` writes the map (other rows: SGLang's trivial ``arange(S) % E``);
    without them the M rows are taken as the whole model.
    """
    se = np.asarray(slot_expert, dtype=np.int64)
    M, S = se.shape
    if layers is None:
        full, rows = se, np.arange(M)
    else:
        rows = np.asarray(layers, dtype=np.int64)
        n = int(num_hidden_layers) if num_hidden_layers else int(rows.max()) + 1
        full = np.tile(np.arange(S) % num_experts, (n, 1))
        full[rows] = se
    tab = sglang_rank_tables(full, num_experts=num_experts, num_gpus=num_gpus, gpus_per_node=gpus_per_node,
                             seed=seed)
    return tab[rows]


def ideal_table(slot_expert: np.ndarray, *, num_experts: int, num_gpus: int, gpus_per_node: int) -> np.ndarray:
    """(M, G, E) the nearest-replica, load-spreading upper bound (see the module docstring)."""
    se = np.asarray(slot_expert, dtype=np.int64)
    M, S = se.shape
    G, E, gpn = num_gpus, num_experts, gpus_per_node
    gpu = np.arange(S) // (S // G)
    node = gpu // gpn
    table = np.empty((M, G, E), dtype=np.int32)
    g_all = np.arange(G)
    for m in range(M):
        row = se[m]
        first = np.full(E, -1, dtype=np.int64)
        first[row[::-1]] = np.arange(S)[::-1]  # lowest slot of each expert
        table[m] = first[None, :]
        counts = np.bincount(row, minlength=E)
        for e in np.flatnonzero(counts > 1):
            slots = np.flatnonzero(row == e)
            used = np.zeros(slots.size, dtype=np.int64)
            on_gpu = gpu[slots][None, :] == g_all[:, None]  # (G, r)
            on_node = node[slots][None, :] == (g_all // gpn)[:, None]
            # sources with a local replica first, then same-node, then remote ones
            tier = np.where(on_gpu.any(1), 0, np.where(on_node.any(1), 1, 2))
            for g in np.argsort(tier, kind="stable"):
                cand = on_gpu[g] if tier[g] == 0 else (on_node[g] if tier[g] == 1 else np.ones(slots.size, bool))
                idx = np.flatnonzero(cand)
                pick = idx[np.argmin(used[idx])]
                used[pick] += 1
                table[m, g, e] = slots[pick]
    return table


def dispatch_table(placement_slots: np.ndarray, *, engine: str, gpus_per_node: int, num_gpus: int,
                   num_experts: int | None = None, seed: int = SGLANG_SEED, layers: np.ndarray | None = None,
                   num_hidden_layers: int | None = None) -> np.ndarray:
    """(M, G, E) int32: the slot a token on GPU g uses for logical expert e at MoE layer m, for a static engine.

    ``placement_slots`` (M, S) logical expert per physical slot. ``engine``: ``sglang`` or ``ideal`` (``vllm``
    and ``trtllm`` decide per token: use :func:`choose_replicas`). ``num_experts`` defaults to max id + 1.
    ``layers``/``num_hidden_layers``: see :func:`sglang_table`; ``seed`` SGLang's (42).
    """
    check_engine(engine)
    se = np.asarray(placement_slots, dtype=np.int64)
    E = int(num_experts) if num_experts is not None else int(se.max()) + 1
    if engine == "sglang":
        return sglang_table(se, num_experts=E, num_gpus=num_gpus, gpus_per_node=gpus_per_node, layers=layers,
                            num_hidden_layers=num_hidden_layers, seed=seed)
    if engine == "ideal":
        return ideal_table(se, num_experts=E, num_gpus=num_gpus, gpus_per_node=gpus_per_node)
    raise ValueError(f"{engine} picks a replica per token, not from a static table; use choose_replicas")


def choose_replicas(placement_slots: np.ndarray, layer_pos: np.ndarray, src_gpu: np.ndarray, experts: np.ndarray,
                    *, engine: str, gpus_per_node: int, num_gpus: int, num_experts: int | None = None,
                    batch: np.ndarray | None = None, index_in_batch: np.ndarray | None = None,
                    table: np.ndarray | None = None, replicas: tuple[np.ndarray, np.ndarray] | None = None,
                    seed: int = SGLANG_SEED, _skip: np.ndarray | None = None) -> np.ndarray:
    """(n, k) int32 physical slot of each (token, expert) of n token-layers, as ``engine`` picks it.

    ``layer_pos`` (n,) MoE-layer position, ``src_gpu`` (n,) the token's GPU (its DP rank), ``experts`` (n, k).
    Per-token engines need the token's place in its rank's forward batch: ``batch`` (n,) an id of (step, rank)
    and ``index_in_batch`` (n,) the token's index in that batch (0-based; the same for a token at every layer).
    ``table`` (M, G, E) reuses a static engine's :func:`dispatch_table`; ``replicas`` reuses
    :func:`replica_lists`.

    An id >= E is a zero-computation choice (computed in place, see
    :class:`~tracekit.placement.types.TraceArrays`): its slot is -1, and it takes no part in TRT-LLM's per-expert
    arbitration (it keeps its item position in the flattened (token, k) array, as a masked id does there).
    """
    check_engine(engine)
    se = np.asarray(placement_slots, dtype=np.int64)
    E = int(num_experts) if num_experts is not None else int(se.max()) + 1
    lp = np.asarray(layer_pos, dtype=np.int64)
    h = np.asarray(src_gpu, dtype=np.int64)
    ex = np.asarray(experts, dtype=np.int64)
    zero = ex >= E
    if zero.any():
        out = choose_replicas(se, lp, h, np.where(zero, 0, ex), engine=engine, gpus_per_node=gpus_per_node,
                              num_gpus=num_gpus, num_experts=E, batch=batch, index_in_batch=index_in_batch,
                              table=table, replicas=replicas, seed=seed, _skip=zero)
        return np.where(zero, -1, out).astype(out.dtype, copy=False)
    if engine in STATIC_ENGINES:
        if table is None:
            table = dispatch_table(se, engine=engine, gpus_per_node=gpus_per_node, num_gpus=num_gpus, num_experts=E,
                                   seed=seed)
        G = table.shape[1]
        return table.reshape(-1)[((lp * G + h) * E)[:, None] + ex]
    if index_in_batch is None:
        raise ValueError(f"{engine} picks replicas per token: pass index_in_batch (and batch for trtllm)")
    slots, count = replicas if replicas is not None else replica_lists(se, E)
    rmax = slots.shape[2]
    base = (lp * E)[:, None] + ex  # (n, k) flat (layer, expert)
    cnt = count.reshape(-1)[base].astype(np.int64)
    t = np.asarray(index_in_batch, dtype=np.int64)
    if engine == "vllm":
        idx = ((t * VLLM_HASH) & 0xFFFFFFFF)[:, None] % cnt
        return slots.reshape(-1)[base * rmax + idx]
    # trtllm: arbitration inside blocks of 1024 flattened (token, k) items of one rank's batch, per layer
    if batch is None:
        raise ValueError("trtllm arbitrates within a rank's batch: pass batch")
    n, k = ex.shape
    b = np.asarray(batch, dtype=np.int64)
    p = t[:, None] * k + np.arange(k)[None, :]  # flattened item index in the batch
    block = p // TRTLLM_BLOCK_ITEMS
    key = np.zeros((n, k), dtype=np.int64)
    rep = cnt > 1 if _skip is None else (cnt > 1) & ~_skip
    if rep.any():
        # n = earlier items with the same expert in the same (batch, layer, block): rank within a stable sort
        rows, cols = np.nonzero(rep)
        nb = int(block.max()) + 1
        group = ((b[rows] * (int(lp.max()) + 1) + lp[rows]) * nb + block[rows, cols]) * E + ex[rows, cols]
        order = np.lexsort((p[rows, cols], group))
        g_sorted = group[order]
        start = np.ones(order.size, dtype=bool)
        start[1:] = g_sorted[1:] != g_sorted[:-1]
        first = np.maximum.accumulate(np.where(start, np.arange(order.size), 0))
        occ = np.empty(order.size, dtype=np.int64)
        occ[order] = np.arange(order.size) - first
        key[rows, cols] = block[rows, cols] + occ + h[rows]
    idx = key % cnt
    return slots.reshape(-1)[base * rmax + idx]
