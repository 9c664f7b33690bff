"""Dispatch models: which physical replica of a logical expert a serving engine sends a token to.

A placement puts E logical experts into S = E + R physical slots per MoE layer (slot p on GPU
``p // (S / G)``, GPU g on node ``g // gpus_per_node``). When an expert has several replicas, the engine picks one
per token; each engine has its own rule, reproduced here from its source (same rules, same tie-breaks, same seed).

- ``sglang`` (SGLang 0.5.23 server, ``--init-expert-location`` = the map ``tracekit export --format sglang``
  writes, ``--ep-dispatch-algorithm static``, ``python/sglang/srt/eplb/expert_location.py``): every EP rank's
  ModelRunner calls ``compute_initial_expert_location_metadata(model_config, moe_ep_rank)`` ->
  ``init_by_mapping`` and builds *its own* table. Candidates are an expert's slots in ascending slot order.
  ``_find_nearest_expert`` pins the rank: one candidate -> it; else the first candidate on the rank's GPU; else,
  only when it *narrows* the set (some but not all candidates on the rank's node), the first on its node. With an
  a2a backend, ``_compute_logical_to_all_physical_map`` first cuts each list the rank has a pinned copy for down
  to that copy, so ``compute_logical_to_rank_dispatch_physical_map`` (``random.Random(42)``, loop over every
  *hidden layer* -- dense layers too, whose rows are SGLang's trivial ``arange(S) % E`` -- then every expert)
  draws only where *this* rank is left over: there the ranks left over on the full list get
  ``_fair_choices(candidates, k)`` = ``candidates * (k // n) + sample(candidates, k % n)``, shuffled, in rank
  order, and this rank keeps its own entry. Each rank's stream therefore advances at different (layer, expert)s,
  and the ranks' picks together are no longer one fair split. Consequence: a rank with a copy on its node never
  dispatches off-node. :func:`sglang_rank_tables` builds all G tables at once; checked entry for entry against
  SGLang 0.5.23's own code (``benchmarks/check_sglang_tables.py``: 0 of 366,336 entries differ over random, eplb
  and locality maps, nodes 1-4 x 2-8 GPUs, R = 0..32, dense layers between MoE layers).
  *a2a backends* (``--moe-a2a-backend``, argument ``a2a_backend``): every backend other than ``none`` (deepep,
  deepep_v2, mooncake, nixl, mori, flashinfer, megamoe, pplx, ascend_*) takes the same path (the code tests only
  ``!= "none"``), so they give the same tables. With ``none`` SGLang refuses ``static`` (and ``lp``) dispatch
  at start-up, defaults to ``dynamic`` with a rank-invariant pick (token row mod replica count over the full
  list) and runs every token on every EP rank, summing partial outputs: no token is dispatched to one replica, so
  tracekit's per-token traffic model does not apply and ``a2a_backend="none"`` is refused (one line).
  *Not modelled*: ``--ep-dispatch-algorithm dynamic``/``fake`` with an a2a backend (a ``torch.randint`` pick
  per token among the rank's narrowed list: pinned ranks as here, others uniform over all copies), ``lp`` (a
  CUDA LP solver), elastic EP scale-up (``_prefer_same_node_experts()`` False: the ``prefer_same_node``
  argument, not exposed), ``--init-expert-location`` with ``logical_count`` and SGLang's own ``--enable-eplb``
  rebalancing (``init_by_eplb``: no narrowing, the bare function's one shared stream, rank = global rank % EP).
- ``vllm`` (vLLM 0.34.0, ``eplb_map_and_record`` in ``vllm/model_executor/layers/fused_moe/eplb_triton.py``
  called from ``base_router.py``; replica lists from ``vllm/distributed/eplb/eplb_state.py``, ascending slot
  order by a stable sort): per token, replica index ``((t * 2654435769) mod 2**32) mod count``, ``t`` the token's
  row in the router's ``topk_ids`` (``offs // top_k``). Modelled: the router runs on each DP rank's own batch
  (EP with an all-to-all modular kernel: DeepEP, pplx, NIXL...). Not modelled: the naive dispatch path
  (``do_naive_dispatch_combine``: DP > 1 with a quant method without an internal modular kernel), where the
  router runs after an all-gather and ``t`` counts over every DP rank's tokens; and vLLM's online EPLB moving
  replicas (released vLLM cannot load a static map at all, see :mod:`tracekit.placement.export`).
- ``trtllm`` (TensorRT-LLM, ``moeComputeRouteKernel`` in ``cpp/tensorrt_llm/kernels/moeLoadBalance/
  moeLoadBalanceKernels.cu``, launched by ``moeComputeRouteDevice`` whenever there are redundant slots; replica
  lists from ``prepareGpuPlacementInfo`` in ``moeLoadBalancer.cpp``, rank-major = ascending global slot): the
  rank's (token, k) items flattened token-major are cut into blocks of 1024 (256 threads x 4 items); an item
  whose expert has more than one replica gets key ``block + n + ep_rank`` (``n`` = earlier items of the same
  expert in the same block, counted in flattened order by warp 0; ``ep_rank`` added because attention DP sets
  ``offset_by_ep_rank``), replica ``key mod count``. Experts with one replica go straight to it. Not modelled:
  TP attention (no ``offset_by_ep_rank``, every rank routing the same tokens) and online rebalancing
  (``layer_updates_per_iter`` > 0). (Read from the repository's source, not run.)
- ``ideal``: the upper bound tracekit used before (not an engine): a replica on the source GPU, else on its node,
  else any; among several, the one with the fewest source GPUs mapped so far (ties: lowest slot).

Static engines (``sglang``, ``ideal``) give a table (:func:`dispatch_table`); per-token engines (``vllm``,
``trtllm``) need the token's place in its rank's batch (:func:`choose_replicas`, which handles every engine).
"""
from __future__ import annotations

import array
import random

import numpy as np

ENGINES = ("sglang", "vllm", "trtllm", "ideal")
STATIC_ENGINES = ("sglang", "ideal")
# SGLang 0.5.23's --moe-a2a-backend choices; every one but "none" builds the same per-rank tables
SGLANG_A2A_BACKENDS = ("deepep", "deepep_v2", "mooncake", "nixl", "mori", "flashinfer", "flashinfer_megamoe",
                       "megamoe", "pplx", "ascend_fuseep", "ascend_tp", "none")
SGLANG_SEED = 42  # compute_logical_to_rank_dispatch_physical_map(seed=42)
VLLM_HASH = 2654435769  # floor(2**32 / golden ratio), vLLM's Knuth multiplier
TRTLLM_BLOCK_ITEMS = 1024  # kThreadCount 256 x kEltPerThread 4 items per CUDA block


def check_engine(engine: str) -> str:
    from ...errors import TracekitError

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


def check_a2a_backend(a2a_backend: str) -> str:
    """``a2a_backend`` if tracekit models SGLang's dispatch under it, else one line (TracekitError)."""
    from ...errors import TracekitError

    if a2a_backend == "none":
        raise TracekitError(
            "SGLang 0.5.23 with --moe-a2a-backend none refuses --ep-dispatch-algorithm static and runs every token "
            "on every EP rank (summing partial outputs), so no token is dispatched to one replica; use an a2a "
            "backend (deepep, as the export's launch flags say)")
    if a2a_backend not in SGLANG_A2A_BACKENDS:
        raise TracekitError(f"unknown --a2a-backend {a2a_backend!r}; use one of "
                            f"{', '.join(b for b in SGLANG_A2A_BACKENDS if b != 'none')}")
    return a2a_backend


def sglang_nearest(slot_expert_all: np.ndarray, *, num_experts: int, num_gpus: int, gpus_per_node: int,
                   prefer_same_node: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SGLang's ``_find_nearest_expert`` for every (layer, rank, expert).

    ``slot_expert_all`` (L, S) -> ``near`` (L, G, E) int32 the slot the rank is pinned to, -1 where it is left to
    the fair random pick (only experts with several replicas), plus :func:`replica_lists` ``slots``, ``count``.
    """
    se = np.asarray(slot_expert_all, dtype=np.int64)
    L, S = se.shape
    G, E = num_gpus, num_experts
    spg = S // G
    slots, count = replica_lists(se, E)
    rmax = slots.shape[2]
    valid = np.arange(rmax)[None, None, :] < count[:, :, None]  # (L, E, r)
    cand_gpu = np.where(valid, slots // spg, -1)
    ranks = np.arange(G)
    near = np.full((L, G, E), -1, dtype=np.int32)
    first = slots[:, :, 0]  # (L, E)
    near[:] = np.where(count == 1, first, -1)[:, None, :]
    on_gpu = cand_gpu[:, None, :, :] == ranks[None, :, None, None]  # (L, G, E, r)
    has = on_gpu.any(3)
    pick = np.take_along_axis(slots[:, None, :, :], on_gpu.argmax(3)[..., None], axis=3)[..., 0]
    multi = (count > 1)[:, None, :]
    near = np.where(multi & has, pick, near)
    if prefer_same_node:
        on_node = np.where(valid[:, None], (cand_gpu // gpus_per_node)[:, None, :, :]
                           == (ranks // gpus_per_node)[None, :, None, None], False)
        n_node = on_node.sum(3)
        narrows = multi & ~has & (n_node > 0) & (n_node < count[:, None, :])
        pick = np.take_along_axis(slots[:, None, :, :], on_node.argmax(3)[..., None], axis=3)[..., 0]
        near = np.where(narrows, pick, near)
    return near.astype(np.int32), slots, count


def sglang_rank_tables(slot_expert_all: np.ndarray, *, num_experts: int, num_gpus: int, gpus_per_node: int,
                       seed: int = SGLANG_SEED, prefer_same_node: bool = True) -> np.ndarray:
    """The static dispatch map SGLang 0.5.23's server builds on every EP rank: (L, G, E) int32 physical slot.

    ``slot_expert_all`` (L, S) is the ``physical_to_logical_map`` SGLang loads, one row per *hidden* layer (dense
    rows included: they take random draws too). Row ``[:, g]`` is what rank g's server computes for itself (see
    the module docstring): pinned to :func:`sglang_nearest` where that finds a replica; elsewhere the fair random
    pick of the ranks left over, drawn from rank g's own ``random.Random(seed)``, which advances only at the
    (layer, expert)s where rank g itself is left over. ``prefer_same_node`` is SGLang's
    ``_prefer_same_node_experts()`` (True unless elastic EP scales the world).

    Pure, and memoised (:class:`_RankTables`): the same map again returns the stored tables, and a map that equals
    the last one computed up to layer l replays the random streams from layer l only (each rank's stream state at
    every layer start is kept), the way the balance hold re-scores a placement after changing a few layers.
    """
    return _RANK_TABLES.get(np.asarray(slot_expert_all, dtype=np.int64), num_experts=num_experts, num_gpus=num_gpus,
                            gpus_per_node=gpus_per_node, seed=seed, prefer_same_node=prefer_same_node)


class _RankTables:
    """Memo of :func:`sglang_rank_tables` (results never differ from a fresh computation).

    - ``done``: the last ``keep`` results, keyed by the whole input (map bytes and parameters).
    - ``last``: per input shape and parameters, the last computed map with each rank's ``random.Random`` state at the start of every layer
      ((L, G, 625) uint32, about 5 MB for 61 layers x 32 ranks), so a map differing from it first at layer l
      starts the streams there with layers < l copied (a layer's pins depend on its own row only)."""

    def __init__(self, keep: int = 8, shapes: int = 4):
        self.keep, self.shapes = keep, shapes
        self.done: dict[tuple, np.ndarray] = {}
        self.last: dict[tuple, dict] = {}  # per (shape, parameters): one-layer maps do not evict whole-model ones

    def get(self, se: np.ndarray, **kw) -> np.ndarray:
        params = (se.shape, *sorted(kw.items()))
        key = (params, se.tobytes())
        hit = self.done.get(key)
        if hit is not None:
            self.done[key] = self.done.pop(key)  # most recently used last
            return hit.copy()
        start = 0
        prev = self.last.pop(params, None)
        if prev is not None:
            differ = np.flatnonzero((prev["se"] != se).any(axis=1))
            start = int(differ[0]) if differ.size else se.shape[0]
        out, states = _rank_tables_from(se, start, prev, **kw)
        self.last[params] = {"se": se.copy(), "out": out, "states": states}
        self.done[key] = out
        for memo, n in ((self.done, self.keep), (self.last, self.shapes)):
            while len(memo) > n:
                memo.pop(next(iter(memo)))
        return out.copy()


def _rank_tables_from(se: np.ndarray, start: int, prev: dict | None, *, num_experts: int, num_gpus: int,
                      gpus_per_node: int, seed: int, prefer_same_node: bool) -> tuple[np.ndarray, np.ndarray]:
    """(tables (L, G, E) int32, stream states (L, G, 625) uint32 at each layer start) of map ``se`` (L, S), layers
    < ``start`` taken from ``prev`` (a ``_RankTables.last`` whose map equals ``se`` there)."""
    L = se.shape[0]
    G = num_gpus
    states = np.zeros((L, G, 625), dtype=np.uint32)
    out = np.zeros((L, G, num_experts), dtype=np.int32)
    rngs = [random.Random(seed) for _ in range(G)]
    if start:
        out[:start] = prev["out"][:start]
        states[:start] = prev["states"][:start]
        if start < L:
            for g in range(G):
                rngs[g].setstate((3, tuple(int(x) for x in prev["states"][start, g]), None))
    if start >= L:
        return out, states
    near, slots, count = sglang_nearest(se[start:], num_experts=num_experts, num_gpus=G,
                                        gpus_per_node=gpus_per_node, prefer_same_node=prefer_same_node)
    out[start:] = near
    left = near < 0  # (L - start, G, E)
    todo = left.any(1)  # (L - start, E)
    drew = np.ones(G, dtype=bool)  # (G,) whose stream advanced in the layer before (unknown at the start)
    for i in range(L - start):
        layer = start + i
        for g in range(G):  # a stream that did not advance keeps the state it had one layer up
            states[layer, g] = _state(rngs[g]) if drew[g] else states[layer - 1, g]
        drew = left[i].any(axis=1)
        for e in np.flatnonzero(todo[i]):  # (layer, expert) in SGLang's loop order
            cand = slots[i, e, : count[i, e]].tolist()
            remaining = np.flatnonzero(left[i, :, e])
            q, rem = divmod(int(remaining.size), len(cand))
            for pos, g in enumerate(remaining.tolist()):
                rng = rngs[g]
                choices = cand * q + rng.sample(cand, k=rem)
                rng.shuffle(choices)
                out[layer, g, e] = choices[pos]
    return out, states


def _state(rng: random.Random) -> np.ndarray:
    """(625,) uint32 the Mersenne Twister state of ``rng`` (its key words and position)."""
    return np.frombuffer(array.array("I", rng.getstate()[1]), dtype=np.uint32)


_RANK_TABLES = _RankTables()


def sglang_table(slot_expert: np.ndarray, *, num_experts: int, num_gpus: int, gpus_per_node: int,
                 layers: np.ndarray | None = None, num_hidden_layers: int | None = None,
                 seed: int = SGLANG_SEED, a2a_backend: str = "deepep") -> np.ndarray:
    """(M, G, E) SGLang static dispatch for the M MoE layers of ``slot_expert`` (M, S).

    ``layers`` (M,) absolute layer ids and ``num_hidden_layers`` place them among the model's hidden layers the
    way ``tracekit export --format sglang`` writes the map (other rows: SGLang's trivial ``arange(S) % E``);
    without them the M rows are taken as the whole model. ``a2a_backend``: SGLang's ``--moe-a2a-backend``
    (:func:`check_a2a_backend`).
    """
    check_a2a_backend(a2a_backend)
    se = np.asarray(slot_expert, dtype=np.int64)
    M, S = se.shape
    if layers is None:
        full, rows = se, np.arange(M)
    else:
        rows = np.asarray(layers, dtype=np.int64)
        n = int(num_hidden_layers) if num_hidden_layers else int(rows.max()) + 1
        if M and (rows.min() < 0 or rows.max() >= n):
            raise IndexError(f"MoE layer ids {rows.min()}..{rows.max()} outside the model's {n} hidden layers")
        # a layer's table depends on the layers before it only (the streams run in layer order): the rows after
        # the last MoE layer are never returned, so they are not computed
        full = np.tile(np.arange(S) % num_experts, (int(rows.max()) + 1 if M else 0, 1))
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
                   num_hidden_layers: int | None = None, a2a_backend: str = "deepep") -> np.ndarray:
    """(M, G, E) int32: the slot a token on GPU g uses for logical expert e at MoE layer m, for a static engine.

    ``placement_slots`` (M, S) logical expert per physical slot. ``engine``: ``sglang`` or ``ideal`` (``vllm``
    and ``trtllm`` decide per token: use :func:`choose_replicas`). ``num_experts`` defaults to max id + 1.
    ``layers``/``num_hidden_layers``, ``a2a_backend``: see :func:`sglang_table`; ``seed`` SGLang's (42).
    """
    check_engine(engine)
    se = np.asarray(placement_slots, dtype=np.int64)
    E = int(num_experts) if num_experts is not None else int(se.max()) + 1
    if engine == "sglang":
        return sglang_table(se, num_experts=E, num_gpus=num_gpus, gpus_per_node=gpus_per_node, layers=layers,
                            num_hidden_layers=num_hidden_layers, seed=seed, a2a_backend=a2a_backend)
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
    :class:`~tracekit.placement.data.types.TraceArrays`): its slot is -1, and it takes no part in TRT-LLM's per-expert
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
