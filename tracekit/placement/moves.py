"""Re-placement under a move budget: which slots change between a deployed placement and a proposed one, what the
copies cost, and the best placement reachable from the deployed one within a budget of moves.

A *move* is one physical slot whose expert changes (ARCHITECTURE.md): the engine loads one expert copy into that
slot, ``3 * hidden * moe_intermediate * weight_bytes`` bytes (:attr:`tracekit.placement.scoring.sizes.ModelSizes.expert_bytes`),
whether the weights come from another GPU or from another slot of the same one.

- :func:`align` permutes a proposal's experts within each GPU so that an expert the GPU already holds stays in its
  slot (the same layout for the engine's dispatch up to slot order, and fewer moves).
- :func:`move_plan` lists the moves of (deployed -> proposed), per layer, with the bytes they copy.
- :func:`move_units` splits one layer's moves into the smallest groups that can be applied alone without leaving
  an expert with no slot (a unique expert that changes GPU needs its new slot written in the same step).
- :func:`replace_within_budget` walks, per layer, from the deployed layout toward the proposed one, the unit of
  largest predicted gain first (a load surrogate ranks the units, the engine's replay scores the candidates), keeps
  the deployed layout where a layer gains nothing, spends a global byte budget on the layers of best gain per
  move, and returns the deployed placement itself when the result does not beat it on the rows given.

Every layout array is (M, S) (MoE-layer position, physical slot) of logical expert ids; see
:mod:`tracekit.placement.data.types` for the conventions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..errors import TracekitError
from .data.types import Placement, TraceArrays

PLAN_FORMAT = "tracekit-move-plan"
PLAN_VERSION = 1
DEFAULT_MIN_GAIN = 0.05


# ------------------------------------------------------------------------------------------------------------
# the plan
# ------------------------------------------------------------------------------------------------------------
def align(deployed: np.ndarray, proposed: np.ndarray, slots_per_gpu: int) -> np.ndarray:
    """(M, S) ``proposed`` with each GPU's experts reordered among that GPU's slots so that every expert the GPU
    holds in ``deployed`` (M, S) at a slot keeps that slot (as many copies as both hold). The multiset of experts
    per (layer, GPU) is unchanged, so the placement is the same up to slot order within a GPU."""
    dep = np.asarray(deployed)
    prop = np.asarray(proposed)
    if dep.shape != prop.shape:
        raise TracekitError(f"deployed placement is {dep.shape}, the proposal {prop.shape}: not the same cluster")
    out = prop.copy()
    M, S = prop.shape
    for m in range(M):
        for g0 in range(0, S, slots_per_gpu):
            d = dep[m, g0:g0 + slots_per_gpu]
            want = list(prop[m, g0:g0 + slots_per_gpu])
            row: list[int | None] = [None] * slots_per_gpu
            for i, e in enumerate(d):  # experts already in place keep their slot
                if e in want:
                    want.remove(e)
                    row[i] = int(e)
            it = iter(want)
            out[m, g0:g0 + slots_per_gpu] = [x if x is not None else next(it) for x in row]
    return out


@dataclass
class MovePlan:
    """The moves from a deployed layout to a proposed one.

    Per move (n,): ``layer_pos`` MoE-layer position, ``layer`` absolute layer, ``slot``, ``gpu``, ``src`` the
    expert leaving the slot, ``dst`` the expert loaded into it. ``per_layer`` (M,) moves per layer;
    ``expert_bytes`` bytes of one expert copy; ``bytes`` their total."""

    layer_pos: np.ndarray
    layer: np.ndarray
    slot: np.ndarray
    gpu: np.ndarray
    src: np.ndarray
    dst: np.ndarray
    per_layer: np.ndarray
    expert_bytes: float
    gpus_per_node: int = 1

    @property
    def moves(self) -> int:
        return int(self.slot.size)

    @property
    def bytes(self) -> float:
        return float(self.moves * self.expert_bytes)

    def to_json(self) -> dict[str, Any]:
        gpn = self.gpus_per_node
        return {
            "format": PLAN_FORMAT, "version": PLAN_VERSION,
            "moves_total": self.moves, "bytes": self.bytes, "gb": self.bytes / 1e9,
            "expert_bytes": float(self.expert_bytes),
            "moves_per_layer": {str(int(lay)): int(n) for lay, n in zip(np.unique(self.layer), _counts(self.layer))},
            "moves": [{"layer": int(a), "slot": int(s), "gpu": int(g), "node": int(g) // gpn, "from_expert": int(f),
                       "to_expert": int(t)}
                      for a, s, g, f, t in zip(self.layer, self.slot, self.gpu, self.src, self.dst)],
        }

    def lines(self, limit: int = 20) -> list[str]:
        """One line per move (the first ``limit``), then a count of the rest."""
        out = [f"  layer {int(a)} slot {int(s)} (GPU {int(g)}): expert {int(f)} -> {int(t)}"
               for a, s, g, f, t in zip(self.layer[:limit], self.slot[:limit], self.gpu[:limit], self.src[:limit],
                                        self.dst[:limit])]
        if self.moves > limit:
            out.append(f"  ... and {self.moves - limit} more moves (write them all with -o)")
        return out


def _counts(layer: np.ndarray) -> np.ndarray:
    return np.unique(layer, return_counts=True)[1] if layer.size else np.zeros(0, dtype=np.int64)


def move_plan(deployed: np.ndarray, proposed: np.ndarray, *, slots_per_gpu: int, expert_bytes: float,
              layers: np.ndarray | None = None, gpus_per_node: int = 1) -> MovePlan:
    """The moves of ``deployed`` -> ``proposed`` ((M, S) each, taken as they are: :func:`align` first to drop
    moves that only reorder a GPU's slots). ``layers`` (M,) absolute layer ids (default 0..M-1)."""
    dep, prop = np.asarray(deployed), np.asarray(proposed)
    if dep.shape != prop.shape:
        raise TracekitError(f"deployed placement is {dep.shape}, the proposal {prop.shape}: not the same cluster")
    lay = np.arange(dep.shape[0]) if layers is None else np.asarray(layers)
    m, s = np.nonzero(dep != prop)
    return MovePlan(m, lay[m], s, s // slots_per_gpu, dep[m, s], prop[m, s],
                    np.bincount(m, minlength=dep.shape[0]), float(expert_bytes), gpus_per_node)


def plan_between(deployed: Placement, proposed: Placement, expert_bytes: float) -> MovePlan:
    """:func:`move_plan` of two placements of one cluster."""
    c = deployed.cluster
    return move_plan(deployed.slot_expert, proposed.slot_expert, slots_per_gpu=c.slots_per_gpu,
                     expert_bytes=expert_bytes, layers=deployed.layers, gpus_per_node=c.gpus_per_node)


# ------------------------------------------------------------------------------------------------------------
# the walk of one layer
# ------------------------------------------------------------------------------------------------------------
def move_units(current: np.ndarray, target: np.ndarray, num_experts: int) -> list[np.ndarray]:
    """The smallest groups of one layer's changed slots that can each be applied to ``current`` (S,) alone.

    For each changed slot s (``current[s] != target[s]``): start from {s}; while applying the group would leave some
    expert with no slot, add a changed slot whose target is that expert. Every expert of ``target`` has a slot,
    so this ends. Returns distinct groups (arrays of slot ids), in the order of their first slot."""
    cur, tgt = np.asarray(current), np.asarray(target)
    changed = [int(s) for s in np.flatnonzero(cur != tgt)]
    base = np.bincount(cur, minlength=num_experts)
    seen: set[frozenset] = set()
    units: list[np.ndarray] = []
    for s in changed:
        unit = [s]
        counts = base.copy()
        counts[cur[s]] -= 1
        counts[tgt[s]] += 1
        while True:
            lost = np.flatnonzero(counts[:num_experts] <= 0)
            if not lost.size:
                break
            e = int(lost[0])
            nxt = next((t for t in changed if t not in unit and tgt[t] == e), None)
            if nxt is None:  # cannot happen when target holds every expert
                raise TracekitError("the proposal leaves an expert with no slot")
            unit.append(nxt)
            counts[cur[nxt]] -= 1
            counts[tgt[nxt]] += 1
        key = frozenset(unit)
        if key not in seen:
            seen.add(key)
            units.append(np.asarray(sorted(unit)))
    return units


def gpu_loads(layout: np.ndarray, load: np.ndarray, slots_per_gpu: int) -> np.ndarray:
    """(G,) predicted GPU load of one layer: expert ``load`` (E,) split evenly over its replicas in ``layout`` (S,)."""
    lay = np.asarray(layout)
    reps = np.bincount(lay, minlength=load.size)
    per_slot = load[lay] / np.maximum(reps[lay], 1)
    return per_slot.reshape(-1, slots_per_gpu).sum(1)


def _surrogate(layout: np.ndarray, load: np.ndarray, spg: int) -> tuple[float, float]:
    g = gpu_loads(layout, load, spg)
    return float(g.max()), float((g * g).sum())


def greedy_walk(current: np.ndarray, target: np.ndarray, load: np.ndarray, *, slots_per_gpu: int,
                max_moves: int | None = None) -> list[np.ndarray]:
    """Layouts (S,) reached one unit at a time from ``current`` toward ``target``, the unit that most lowers the
    predicted busiest GPU (then the sum of squared GPU loads; :func:`gpu_loads` with expert ``load`` (E,)) first,
    while the moves stay within ``max_moves``. Element i holds the layout after i + 1 units (the last one is
    ``target`` when the budget allows every move)."""
    E = load.size
    lay = np.asarray(current).copy()
    tgt = np.asarray(target)
    used = 0
    out: list[np.ndarray] = []
    cap = np.inf if max_moves is None else max_moves
    while True:
        units = [u for u in move_units(lay, tgt, E) if used + u.size <= cap]
        if not units:
            return out
        best, best_key = None, None
        for u in units:
            cand = lay.copy()
            cand[u] = tgt[u]
            key = (*_surrogate(cand, load, slots_per_gpu), u.size)
            if best_key is None or key < best_key:
                best, best_key = u, key
        lay = lay.copy()
        lay[best] = tgt[best]
        used += best.size
        out.append(lay)


# ------------------------------------------------------------------------------------------------------------
# the budgeted re-placement
# ------------------------------------------------------------------------------------------------------------
@dataclass
class Replacement:
    """What :func:`replace_within_budget` decided: ``placement`` (the deployed one when ``kept``), its move
    ``plan``, the metric on the judged rows for the deployed and the chosen placement, and the unconstrained
    proposal's (``proposed_value``, ``proposed_moves``)."""

    placement: Placement
    plan: MovePlan
    metric: str
    deployed_value: float
    value: float
    proposed_value: float
    proposed_moves: int
    kept: bool
    reason: str
    rows: str = "held-out"
    scores: dict[str, dict] = field(default_factory=dict)
    candidate_value: float = float("nan")  # the budgeted placement's value before the never-worse guard

    @property
    def candidate_gain(self) -> float:
        """The budgeted placement's predicted cut, also when the deployed one was kept (0 when none was scored)."""
        v = self.value if not self.kept else self.candidate_value
        if not np.isfinite(v) or not np.isfinite(self.deployed_value) or self.deployed_value <= 0:
            return 0.0
        return float(1.0 - v / self.deployed_value)

    @property
    def gain(self) -> float:
        """Predicted relative cut of the metric (0.072 = 7.2% lower); 0 when the deployed placement is kept."""
        if self.kept or not np.isfinite(self.deployed_value) or self.deployed_value <= 0:
            return 0.0
        return float(1.0 - self.value / self.deployed_value)

    @property
    def proposed_gain(self) -> float:
        if not np.isfinite(self.deployed_value) or self.deployed_value <= 0:
            return 0.0
        return float(1.0 - self.proposed_value / self.deployed_value)

    def to_json(self) -> dict[str, Any]:
        return {"metric": self.metric, "deployed": self.deployed_value, "chosen": self.value,
                "gain": self.gain, "unconstrained": self.proposed_value, "unconstrained_gain": self.proposed_gain,
                "unconstrained_moves": self.proposed_moves, "kept": self.kept, "reason": self.reason,
                "judged_on": self.rows, "candidate_gain": self.candidate_gain, "moves": self.plan.moves, "gb": self.plan.bytes / 1e9}


def judgement(rep: Replacement, min_gain: float = DEFAULT_MIN_GAIN) -> tuple[bool, str]:
    """(re-place?, one line): re-place when the budgeted placement cuts the metric by at least ``min_gain``."""
    what = "step time" if rep.metric.startswith("step_time") else rep.metric
    if not rep.kept and rep.gain >= min_gain:
        return True, (f"re-place: {what} {-100 * rep.gain:+.1f}% with {rep.plan.moves} moves "
                      f"({rep.plan.bytes / 1e9:.1f} GB), on the {rep.rows} rows")
    gain = rep.candidate_gain
    extra = f"; {rep.reason}" if rep.reason else ""
    return False, (f"keep the deployed placement: predicted gain {100 * gain:.1f}% < {100 * min_gain:.0f}%"
                   f"{extra}")


def _budget_moves(max_move_gb: float | None, expert_bytes: float) -> int | None:
    if max_move_gb is None:
        return None
    return int(np.floor(max_move_gb * 1e9 / expert_bytes + 1e-9))


def _ladder(n_options: int, moves: list[int]) -> list[int]:
    """Indices of walk options to score exactly: moves 1, 2, 4, ... and the last one."""
    if not n_options:
        return []
    pick, lim = set(), 1
    for i, mv in enumerate(moves):
        if mv >= lim:
            pick.add(i)
            while lim <= mv:
                lim *= 2
    pick.add(n_options - 1)
    return sorted(pick)


def replace_within_budget(deployed: Placement, traces: TraceArrays, proposed: Placement | None = None, *,
                          max_moves: int | None = None, max_move_gb: float | None = None,
                          engine: str = "sglang", objective: str = "step-time", holdout: float = 0.3,
                          seed: int = 0, strategy: str = "all", expert_bytes: float | None = None,
                          scorer: Callable[..., dict] | None = None, **eval_opts) -> Replacement:
    """The best placement reachable from ``deployed`` within the budget (``max_moves`` slots changed per layer,
    ``max_move_gb`` GB of expert copies in all), scored like every other placement (the per-step replay under
    ``engine``'s dispatch, :func:`tracekit.placement.select.default_scorer`).

    The traces' requests are split (``holdout``, ``seed``, as ``place`` splits them). ``proposed`` (the
    unconstrained pick) defaults to :func:`tracekit.placement.select.place`'s pick on the train requests
    (``strategy``). Per layer the walk of :func:`greedy_walk` offers layouts; each offered layout of the ladder (1,
    2, 4, ... moves and the last) is scored on the train rows, that layer alone (the deployed router's home GPUs);
    a layer keeps the deployed layout unless one gains. The byte budget goes to the layers of the best gain per move
    first. The result is judged on the held-out requests and on every row: unless it beats ``deployed`` on the
    held-out rows and is not worse on all rows, ``deployed`` is returned (``kept``). The deployed grouping rule
    (the router) is kept: only slots move. ``eval_opts``: the replay's options (profile, hidden_size, ...)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        return _replace(deployed, traces, proposed, max_moves=max_moves, max_move_gb=max_move_gb, engine=engine,
                        objective=objective, holdout=holdout, seed=seed, strategy=strategy,
                        expert_bytes=expert_bytes, scorer=scorer, **eval_opts)


def _replace(deployed, traces, proposed, *, max_moves, max_move_gb, engine, objective, holdout, seed, strategy,
             expert_bytes, scorer, **eval_opts) -> Replacement:
    from .scoring.comm import check_placement, route_requests
    from .data.traces import make_split
    from .select import default_scorer, metric_key, one_layer
    from .scoring.sizes import model_sizes
    from .data.traces import subset

    c = deployed.cluster
    check_placement(deployed)
    if traces.num_experts != c.num_experts:
        raise TracekitError(f"the runs have {traces.num_experts} experts per layer, the deployed placement "
                            f"{c.num_experts}: not this model's placement")
    if len(deployed.layers) != traces.num_layers or not np.array_equal(np.asarray(deployed.layers), traces.layers):
        raise TracekitError("the deployed placement's MoE layers differ from the runs'; place with traces of this "
                            "model")
    if len(traces) == 0:
        raise TracekitError("re-placement needs per-token routes; a loads-only run cannot be scored")
    if max_moves is not None and max_moves < 0 or max_move_gb is not None and max_move_gb < 0:
        raise TracekitError("--max-moves and --max-move-gb must be >= 0")
    if expert_bytes is None:
        sz = model_sizes(traces.geometry, hidden_size=eval_opts.get("hidden_size"),
                         moe_intermediate_size=eval_opts.get("moe_intermediate_size"),
                         expert_dtype=eval_opts.get("expert_dtype"))
        expert_bytes = sz.expert_bytes
    score_opts = dict(eval_opts)
    if "hidden_size" not in score_opts and (traces.geometry or {}).get("hidden_size"):
        score_opts["hidden_size"] = int(traces.geometry["hidden_size"])
    scorer = scorer or default_scorer(engine, **score_opts)
    train, test = make_split(traces, "request", holdout, seed)
    if not test.any() or not train.any():
        raise TracekitError("too few requests to fit on some and judge on others; give more rows")
    if proposed is None:
        from .select import place

        cluster = {"nodes": c.nodes, "gpus_per_node": c.gpus_per_node, "redundant": c.redundant}
        comp, val = place(traces, cluster, strategy, objective=objective, engine=engine, holdout=holdout,
                          seed=seed, **eval_opts)
        proposed = comp.placements[strategy if strategy != "all" else val.pick]
    if proposed.cluster != c:
        raise TracekitError(f"the proposal's cluster {proposed.cluster} differs from the deployed {c}")
    spg, M = c.slots_per_gpu, traces.num_layers
    dep = np.asarray(deployed.slot_expert)
    prop = align(dep, np.asarray(proposed.slot_expert), spg)
    meta = {k: v for k, v in deployed.meta.items() if k not in ("pick", "heldout", "balance")}

    def as_placement(se: np.ndarray, name: str) -> Placement:
        return Placement(c, deployed.layers, se, name, deployed.grouping, dict(meta))

    tr_fit, tr_test = subset(traces, train), subset(traces, test)
    home_fit = route_requests(deployed.grouping, tr_fit, c)
    E = c.num_experts
    # per layer: the options of the walk, scored on the fit rows (that layer alone)
    options: list[list[tuple[int, float, np.ndarray]]] = []  # layer -> [(moves, gain, layout)], gain > 0 only
    cap_layer = max_moves
    cap_total = _budget_moves(max_move_gb, expert_bytes)
    if cap_total is not None:
        cap_layer = cap_total if cap_layer is None else min(cap_layer, cap_total)
    metric = None
    for m in range(M):
        opts: list[tuple[int, float, np.ndarray]] = []
        options.append(opts)
        if np.array_equal(dep[m], prop[m]) or cap_layer == 0:
            continue
        lt = one_layer(tr_fit, m)
        if len(lt) == 0:
            continue
        ex = lt.experts[lt.experts < E] if tr_fit.zero_choices else lt.experts
        load = np.bincount(np.asarray(ex).ravel(), minlength=E).astype(np.float64)
        walk = greedy_walk(dep[m], prop[m], load, slots_per_gpu=spg, max_moves=cap_layer)
        if not walk:
            continue
        moves = [int((w != dep[m]).sum()) for w in walk]

        def value(layout: np.ndarray) -> float:
            nonlocal metric
            q = Placement(c, lt.layers, layout[None, :], "candidate", deployed.grouping, {})
            s = scorer(q, lt, home=home_fit)
            metric = metric or metric_key(s, objective)
            return float(s[metric])

        base = value(dep[m])
        for i in _ladder(len(walk), moves):
            v = value(walk[i])
            if base - v > 0:
                opts.append((moves[i], base - v, walk[i]))
    # per layer the best option; a byte budget goes to the best gain per move first
    chosen = dep.copy()
    if cap_total is None:
        for m, opts in enumerate(options):
            if opts:
                chosen[m] = max(opts, key=lambda o: (o[1], -o[0]))[2]
    else:
        left = cap_total
        pick: dict[int, tuple[int, float, np.ndarray]] = {}
        while True:
            best = None
            for m, opts in enumerate(options):
                have = pick.get(m, (0, 0.0, None))
                for mv, g, lay in opts:
                    extra = mv - have[0]
                    if g > have[1] and 0 < extra <= left:
                        key = ((g - have[1]) / extra, g)
                        if best is None or key > best[0]:
                            best = (key, m, (mv, g, lay), extra)
            if best is None:
                break
            _, m, opt, extra = best
            pick[m] = opt
            left -= extra
        for m, (_, _, lay) in pick.items():
            chosen[m] = lay
    dep_p = as_placement(dep, deployed.strategy)
    prop_p = as_placement(prop, proposed.strategy)
    cand = as_placement(chosen, f"{proposed.strategy}-within-budget")
    s_dep, s_prop = scorer(dep_p, tr_test), scorer(prop_p, tr_test)
    metric = metric_key(s_dep, objective)
    full_plan = move_plan(dep, prop, slots_per_gpu=spg, expert_bytes=expert_bytes)
    scores = {"deployed": s_dep, "unconstrained": s_prop}
    kept, reason = True, ""
    if np.array_equal(chosen, dep):
        s_c = s_dep
        reason = "no layer gains within the budget" if full_plan.moves else "the proposal is the deployed placement"
    else:
        s_c = scorer(cand, tr_test)
        scores["chosen"] = s_c
        if not s_c[metric] < s_dep[metric]:
            reason = "the budgeted placement does not beat the deployed one on the held-out requests"
        else:
            s_all_c, s_all_d = scorer(cand, traces), scorer(dep_p, traces)
            if s_all_c[metric] > s_all_d[metric]:
                reason = "the budgeted placement is worse than the deployed one on all the rows"
            else:
                kept = False
    cand_value = float(s_c[metric])
    if kept:
        cand, s_c, chosen = dep_p, s_dep, dep
    plan = move_plan(dep, chosen, slots_per_gpu=spg, expert_bytes=expert_bytes, layers=deployed.layers,
                     gpus_per_node=c.gpus_per_node)
    cand.meta["moves"] = {"from": deployed.strategy, "moves": plan.moves, "gb": plan.bytes / 1e9,
                          "max_moves": max_moves, "max_move_gb": max_move_gb}
    return Replacement(cand, plan, metric, float(s_dep[metric]), float(s_c[metric]), float(s_prop[metric]),
                       full_plan.moves, kept, reason, scores=scores, candidate_value=cand_value)
