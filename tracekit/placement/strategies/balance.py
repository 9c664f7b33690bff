"""Hold a GPU load bound on the fit data, under the engine's own replica choice.

The strategies plan balance with a load model (an expert's load splits evenly over its copies). Engines do not
split evenly: a static dispatch maps every source GPU to *one* replica of an expert (SGLang: a replica on the same
GPU, else the first on the same node, else one elsewhere), so an expert's load follows the home loads of the GPUs
mapped to each replica. This module measures one layer's GPU loads exactly under such a rule, from the fit rows'
load per (home GPU, expert), and moves slots until the layer meets the bound:

1. **Duplicates.** A second copy of an expert on the same GPU splits nothing; it becomes a copy of the expert
   whose extra copy lowers the busiest GPU most (or swaps with a slot of another GPU of the node).
2. **Free swaps.** Swaps of two slots on different GPUs of one node: the set of experts on each node stays the
   same, so cross-node traffic does not change; taken while they lower the busiest GPU's load.
3. **Paid moves** (only while the layer is above the bound): a redundant copy re-pointed to the busiest GPU's
   heaviest expert, or swaps across nodes; they can cost cross-node traffic, which the bound outranks.

Every move is checked exactly (both experts' replica choices recomputed). No move puts a second copy of an expert
on a GPU. :func:`hold_layer` returns the new row and what it reached; the caller decides what to do when the bound
is out of reach.

Rules (``rule``, named after the engines of :mod:`tracekit.placement.scoring.dispatch`): ``sglang`` (the first replica on
the source GPU, else the first on its node when that narrows the candidates, else an even share: SGLang's seeded
fair random pick, modelled here as the least-used replica), ``ideal`` (same GPU, same node, any; least-used in
every tier) and ``vllm``/``trtllm`` (a per-token hash or round-robin: every replica takes an even share). SGLang's
random draws run over all layers in one stream, so its per-layer loads here are a close model, not exact; the
caller re-scores with the engine's own table.
"""
from __future__ import annotations

import numpy as np

from ..data.types import Cluster

RULES = ("sglang", "ideal", "vllm", "trtllm")
PER_TOKEN = ("vllm", "trtllm")  # replica picked per token: each replica takes an even share


def _tiers(slot_gpu: np.ndarray, cluster: Cluster, rule: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(on_gpu (G, r), on_node (G, r), tier (G,)): 0 a replica on the source GPU, 1 one on its node (for sglang
    only when the node narrows the candidates: some, not all, replicas on it), 2 neither."""
    gpn = cluster.gpus_per_node
    r = slot_gpu.shape[0]
    src = np.arange(cluster.num_gpus)
    on_gpu = slot_gpu[None, :] == src[:, None]
    on_node = (slot_gpu // gpn)[None, :] == (src // gpn)[:, None]
    if rule == "sglang":
        n_node = on_node.sum(1)
        on_node &= ((n_node > 0) & (n_node < r))[:, None]
    tier = np.where(on_gpu.any(1), 0, np.where(on_node.any(1), 1, 2))
    return on_gpu, on_node, tier


def replica_choice(slot_gpu: np.ndarray, cluster: Cluster, rule: str = "ideal",
                   pattern: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """(G,) index into the replicas (slot_gpu (r,), GPU of each replica, in slot order) each source GPU uses
    (static rules ``sglang`` and ``ideal``).

    ``sglang``: the first replica on the GPU, else the first on the node when it narrows; the other ranks get
    SGLang's seeded fair pick, taken from ``pattern`` (remaining ranks (n,), replica index of each (n,), read off
    the engine's table for the same layer) when the remaining ranks are the same, else an even round-robin.
    """
    G = cluster.num_gpus
    r = slot_gpu.shape[0]
    if r == 1:
        return np.zeros(G, dtype=np.int64)
    on_gpu, on_node, tier = _tiers(slot_gpu, cluster, rule)
    out = np.empty(G, dtype=np.int64)
    if rule == "sglang":
        out[tier == 0] = on_gpu[tier == 0].argmax(1)
        out[tier == 1] = on_node[tier == 1].argmax(1)
        rest = np.flatnonzero(tier == 2)
        if pattern is not None and np.array_equal(pattern[0], rest) and pattern[1].max(initial=-1) < r:
            out[rest] = pattern[1]
        else:
            out[rest] = np.arange(rest.size) % r
        return out
    used = np.zeros(r, dtype=np.int64)
    for g in np.argsort(tier, kind="stable"):
        cand = on_gpu[g] if tier[g] == 0 else (on_node[g] if tier[g] == 1 else np.ones(r, dtype=bool))
        idx = np.flatnonzero(cand)
        pick = idx[np.argmin(used[idx])]
        used[pick] += 1
        out[g] = pick
    return out


class LayerLoads:
    """One layer's slot row and its exact GPU loads under ``rule``.

    ``row`` (S,) slot -> expert; ``A`` (G, E) load of each expert from requests homed on each GPU (fit rows);
    ``table`` (G, E) the engine's own dispatch table of this layer (sglang: its seeded picks are reused for
    every expert whose remaining ranks a move leaves unchanged).
    """

    def __init__(self, row: np.ndarray, A: np.ndarray, cluster: Cluster, rule: str = "ideal",
                 table: np.ndarray | None = None):
        if rule not in RULES:
            raise ValueError(f"unknown dispatch rule {rule!r}")
        self.c, self.A, self.rule = cluster, np.asarray(A, dtype=np.float64), rule
        self.row = np.asarray(row, dtype=np.int64).copy()
        self.gpu_of = cluster.gpu_of_slot()
        self.patterns: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        if table is not None and rule == "sglang":
            cnt = np.bincount(self.row, minlength=cluster.num_experts)
            for e in np.flatnonzero(cnt > 1):
                slots = np.flatnonzero(self.row == e)
                _, _, tier = _tiers(self.gpu_of[slots], cluster, rule)
                rest = np.flatnonzero(tier == 2)
                self.patterns[int(e)] = (rest, np.searchsorted(slots, table[rest, e]))
        self.slot_load = np.zeros(cluster.num_slots)
        for e in range(cluster.num_experts):
            s = np.flatnonzero(self.row == e)
            self.slot_load[s] = self.expert_loads(e, s)
        self.gpu_load = np.bincount(self.gpu_of, weights=self.slot_load, minlength=cluster.num_gpus)

    def expert_loads(self, e: int, slots: np.ndarray) -> np.ndarray:
        """(len(slots),) load of each replica of ``e`` when it sits in ``slots`` (sorted slot order)."""
        slots = np.sort(slots)
        if self.rule in PER_TOKEN:
            return np.full(slots.size, self.A[:, e].sum() / max(slots.size, 1))
        pick = replica_choice(self.gpu_of[slots], self.c, self.rule, self.patterns.get(int(e)))
        return np.bincount(pick, weights=self.A[:, e], minlength=slots.size)

    def ratio(self) -> float:
        m = self.gpu_load.mean()
        return float(self.gpu_load.max() / m) if m > 0 else 1.0

    def trial(self, changes: dict[int, int]) -> tuple[np.ndarray, dict[int, tuple[np.ndarray, np.ndarray]]]:
        """GPU loads after setting ``row[slot] = expert`` for each item of ``changes`` (exact), plus the new
        (slots, loads) of every touched expert."""
        row = self.row.copy()
        for s, e in changes.items():
            row[s] = e
        touched = {int(self.row[s]) for s in changes} | set(changes.values())
        gpu = self.gpu_load.copy()
        new = {}
        for e in touched:
            old = np.flatnonzero(self.row == e)
            gpu -= np.bincount(self.gpu_of[old], weights=self.slot_load[old], minlength=gpu.size)
            s = np.flatnonzero(row == e)
            ld = self.expert_loads(e, s)
            gpu += np.bincount(self.gpu_of[s], weights=ld, minlength=gpu.size)
            new[e] = (s, ld)
        return gpu, new

    def apply(self, changes: dict[int, int], new: dict[int, tuple[np.ndarray, np.ndarray]], gpu: np.ndarray) -> None:
        for s, e in changes.items():
            self.row[s] = e
        for e, (s, ld) in new.items():
            self.slot_load[s] = ld
        self.gpu_load = gpu

    def makes_duplicate(self, changes: dict[int, int]) -> bool:
        """True when the changes put a second copy of an expert on a GPU that had at most one."""
        row = self.row.copy()
        for s, e in changes.items():
            row[s] = e
        for e in {int(self.row[s]) for s in changes} | set(changes.values()):
            before = np.bincount(self.gpu_of[self.row == e], minlength=self.c.num_gpus)
            after = np.bincount(self.gpu_of[row == e], minlength=self.c.num_gpus)
            if ((after > 1) & (after > before)).any():
                return True
        return False


def duplicates(row: np.ndarray, cluster: Cluster) -> int:
    """Number of extra copies sitting on a GPU that already holds that expert."""
    gpu = cluster.gpu_of_slot()
    key = gpu * cluster.num_experts + np.asarray(row)
    return int(key.size - np.unique(key).size)


def _best(L: LayerLoads, moves: list[dict[int, int]]) -> tuple[float, dict, dict, np.ndarray] | None:
    """The move with the lowest exact max GPU load (ties: lower sum of squares), or None."""
    best = None
    for ch in moves:
        if L.makes_duplicate(ch):
            continue
        gpu, new = L.trial(ch)
        key = (float(gpu.max()), float((gpu ** 2).sum()))
        if best is None or key < best[0]:
            best = (key, ch, new, gpu)
    return best


def _swaps(L: LayerLoads, h: int, same_node: bool, top: int) -> list[dict[int, int]]:
    """Swap candidates between the busiest GPU ``h`` and other GPUs (same node or other nodes), ranked by the
    max of the two GPUs after moving the slot-load difference, ``top`` best."""
    c = L.c
    gpn = c.gpus_per_node
    mine = np.flatnonzero(L.gpu_of == h)
    node_of = L.gpu_of // gpn
    other = np.flatnonzero((L.gpu_of != h) & ((node_of == h // gpn) == same_node))
    if other.size == 0:
        return []
    d = L.slot_load[mine][:, None] - L.slot_load[other][None, :]
    est = np.maximum(L.gpu_load[h] - d, L.gpu_load[L.gpu_of[other]][None, :] + d)
    est[(d <= 0) | (L.row[mine][:, None] == L.row[other][None, :])] = np.inf
    flat = np.argsort(est, axis=None)[:top]
    out = []
    for f in flat:
        i, j = divmod(int(f), other.size)
        if not np.isfinite(est[i, j]):
            break
        out.append({int(mine[i]): int(L.row[other[j]]), int(other[j]): int(L.row[mine[i]])})
    return out


def _repoints(L: LayerLoads, h: int, top: int) -> list[dict[int, int]]:
    """A redundant copy elsewhere (its expert has another copy) re-pointed to one of the busiest GPU's experts."""
    cnt = np.bincount(L.row, minlength=L.c.num_experts)
    spare = np.flatnonzero((cnt[L.row] > 1) & (L.gpu_of != h))
    if spare.size == 0:
        return []
    spare = spare[np.argsort(L.gpu_load[L.gpu_of[spare]] + L.slot_load[spare], kind="stable")][:top]
    heavy = np.flatnonzero(L.gpu_of == h)
    heavy = heavy[np.argsort(-L.slot_load[heavy], kind="stable")][:3]
    return [{int(t): int(L.row[s])} for s in heavy for t in spare if L.row[t] != L.row[s]]


def _dedupe(L: LayerLoads, top: int) -> None:
    """Give every same-GPU duplicate copy a useful job (a copy of another expert, or a swap within its node)."""
    for _ in range(L.row.size):
        key = L.gpu_of * L.c.num_experts + L.row
        _, first = np.unique(key, return_index=True)
        dup = np.setdiff1d(np.arange(L.row.size), first)
        if dup.size == 0:
            return
        s = int(dup[0])
        g = int(L.gpu_of[s])
        here = set(L.row[L.gpu_of == g].tolist())
        moves = [{s: e} for e in range(L.c.num_experts) if e not in here]
        gpn = L.c.gpus_per_node
        for t in np.flatnonzero((L.gpu_of // gpn == g // gpn) & (L.gpu_of != g)):
            if int(L.row[t]) not in here:
                moves.append({s: int(L.row[t]), int(t): int(L.row[s])})
        b = _best(L, moves)
        if b is None:
            return  # nothing else fits on this GPU: the duplicate stays (reported by the caller)
        L.apply(b[1], b[2], b[3])


def hold_layer(row: np.ndarray, A: np.ndarray, cluster: Cluster, bound: float, *, rule: str = "ideal",
               paid: bool = True, max_moves: int = 400, top: int = 16,
               table: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """One layer: row (S,), A (G, E) fit load by home GPU -> (new row (S,), info).

    ``info``: ``ratio`` (GPU max/mean reached on the fit load), ``before``, ``met`` (ratio <= bound),
    ``duplicates`` (copies left on a GPU that already holds the expert), ``paid_moves``.
    """
    L = LayerLoads(row, A, cluster, rule, table)
    before = L.ratio()
    _dedupe(L, top)
    paid_moves = 0
    for _ in range(max_moves):
        h = int(np.argmax(L.gpu_load))
        cur = float(L.gpu_load[h])
        b = _best(L, _swaps(L, h, True, top)) if cluster.gpus_per_node > 1 else None
        if b is not None and b[0][0] < cur * (1 - 1e-6):
            L.apply(b[1], b[2], b[3])
            continue
        if not paid or L.ratio() <= bound:
            break
        b = _best(L, _repoints(L, h, top) + (_swaps(L, h, False, top) if cluster.nodes > 1 else []))
        if b is None or b[0][0] >= cur * (1 - 1e-6):
            break
        L.apply(b[1], b[2], b[3])
        paid_moves += 1
    ratio = L.ratio()
    return L.row, {"before": before, "ratio": ratio, "met": ratio <= bound + 1e-9,
                   "duplicates": duplicates(L.row, cluster), "paid_moves": paid_moves}


def fit_load_by_gpu(traces, grouping, cluster: Cluster) -> np.ndarray:
    """(M, G, E) float: each expert's load from the requests the router homes on each GPU (rows of ``traces``).

    A loads-only run (no rows) spreads its aggregated loads evenly over the GPUs (the expectation)."""
    from ..scoring.comm import route_requests
    from ..data.stats import expert_load, load_by_group

    if len(traces) == 0:
        w = expert_load(traces).astype(np.float64)
        return np.repeat(w[:, None, :] / cluster.num_gpus, cluster.num_gpus, axis=1)
    home = route_requests(grouping, traces, cluster)
    return load_by_group(traces, home, cluster.num_gpus).astype(np.float64)


def engine_ratios(slot_expert: np.ndarray, A: np.ndarray, cluster: Cluster, engine: str, *, layers,
                  num_hidden_layers: int | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """((M,) GPU max/mean per layer of the fit load A (M, G, E), (M, G, E) table) under a static engine's own
    table (:func:`tracekit.placement.scoring.dispatch.dispatch_table`); None for per-token engines."""
    from ..scoring.dispatch import STATIC_ENGINES, dispatch_table

    if engine not in STATIC_ENGINES:
        return None
    t = dispatch_table(slot_expert, engine=engine, gpus_per_node=cluster.gpus_per_node, num_gpus=cluster.num_gpus,
                       num_experts=cluster.num_experts, layers=np.asarray(layers), num_hidden_layers=num_hidden_layers)
    gpu = cluster.gpu_of_slot()[t]  # (M, G, E) destination GPU
    out = np.ones(t.shape[0])
    for m in range(t.shape[0]):
        gl = np.bincount(gpu[m].ravel(), weights=A[m].ravel(), minlength=cluster.num_gpus)
        if gl.mean() > 0:
            out[m] = gl.max() / gl.mean()
    return out, t


def layout_ratios(slot_expert: np.ndarray, A: np.ndarray, cluster: Cluster, engine: str, *, layers,
                  num_hidden_layers: int | None = None) -> np.ndarray:
    """(M,) GPU max/mean per layer of slot_expert (M, S) on the fit load A (M, G, E) under ``engine``: a static
    engine's own table (:func:`engine_ratios`), else the per-token rule's even split (:class:`LayerLoads`)."""
    res = engine_ratios(slot_expert, A, cluster, engine, layers=layers, num_hidden_layers=num_hidden_layers)
    if res is not None:
        return res[0]
    return np.array([LayerLoads(row, A[m], cluster, engine).ratio() for m, row in enumerate(slot_expert)])


def hold_placement(slot_expert: np.ndarray, A: np.ndarray, cluster: Cluster, bound, *, layers,
                   fallback: np.ndarray | None = None, rule: str = "ideal", strategy: str = "locality",
                   num_hidden_layers: int | None = None, rounds: int = 4,
                   strict: bool = True) -> tuple[np.ndarray, dict]:
    """Every layer of slot_expert (M, S) brought within ``bound`` on the fit load A (M, G, E).

    ``bound``: one GPU max/mean for every layer, or (M,) one per layer (the relative default: each layer within a
    margin of EPLB's own ratio on the same rows, see :func:`tracekit.placement.strategies.locality.place_locality`).

    A layer that cannot reach the bound tries ``fallback`` (M, S) (EPLB's layout) the same way and takes it when
    that one does better. A static engine's own table is computed for the whole placement (SGLang's seeded picks
    run over all layers in one stream), each layer is held against it, and the placement is scored again; layers
    still above the bound are held again against the new table, up to ``rounds`` times, keeping each layer's best.
    When a layer stays above the bound, raises one TracekitError naming the layer, the ratio reached and the bound
    that would hold (with ``strict=False`` it returns the best it reached instead, ``info['met']`` False).
    Returns (new slot_expert, info).
    """
    from ...errors import TracekitError

    out = np.array(slot_expert, dtype=np.int64, copy=True)
    M = out.shape[0]
    bounds = np.broadcast_to(np.asarray(bound, dtype=np.float64), (M,))
    score = lambda se: engine_ratios(se, A, cluster, rule, layers=layers, num_hidden_layers=num_hidden_layers)  # noqa: E731
    fell_back, paid = [], 0
    first = score(out)
    tab = first[1] if first is not None else None
    model = np.ones(M)
    for m in range(M):
        tm = tab[m] if tab is not None else None
        row, info = hold_layer(out[m], A[m], cluster, bounds[m], rule=rule, table=tm)
        if not info["met"]:  # a wider search before giving up
            row, info = hold_layer(row, A[m], cluster, bounds[m], rule=rule, top=96, table=tm)
        if not info["met"] and fallback is not None:
            row2, info2 = hold_layer(fallback[m], A[m], cluster, bounds[m], rule=rule, top=96)
            if info2["ratio"] < info["ratio"]:
                row, info = row2, info2
                fell_back.append(int(layers[m]))
        out[m], model[m] = row, info["ratio"]
        paid += info["paid_moves"]
    res = score(out)
    if res is not None:
        real, tab = res
        best, best_real = out.copy(), real.copy()
        for _ in range(rounds):
            bad = np.flatnonzero(real > bounds + 1e-9)
            if bad.size == 0:
                break
            for m in bad:
                out[m], info = hold_layer(out[m], A[m], cluster, bounds[m], rule=rule, top=96, table=tab[m])
                paid += info["paid_moves"]
            real, tab = score(out)
            better = real < best_real
            best[better], best_real[better] = out[better], real[better]
            out = best.copy()
        # the engine's draws for one layer depend on the layers before it: score the kept mix once more
        real, _ = score(best)
        out = best
        ratios = real
    else:
        ratios = model
    over = ratios - bounds
    worst = int(np.argmax(over)) if M else 0
    if strict and M and over[worst] > 1e-9:
        need = np.ceil(ratios.max() * 100) / 100
        raise TracekitError(
            f"{strategy} cannot hold --max-imbalance {bounds[worst]:.2f} on its fit data under {rule}'s dispatch: "
            f"layer {int(layers[worst])} stays at GPU max/mean {ratios[worst]:.3f} "
            f"({100 * (ratios[worst] / bounds[worst] - 1):+.1f}% over), eplb's layout included; use "
            f"--max-imbalance {need:.2f} or more --redundant slots"
        )
    dups = sum(duplicates(r, cluster) for r in out)
    return out, {"fit_gpu_max_over_mean_per_layer": [round(float(r), 4) for r in ratios],
                 "fit_gpu_max_over_mean_worst": float(ratios.max()) if M else 1.0,
                 "met": bool(not M or over[worst] <= 1e-9),
                 "eplb_layers_for_balance": fell_back, "duplicates_on_one_gpu": int(dups), "paid_moves": paid,
                 "dispatch": rule}
