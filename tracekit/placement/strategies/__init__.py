"""The strategy registry: name -> function that fits a placement on training traces.

Every strategy has the signature ``fn(fit_traces: TraceArrays, cluster: Cluster, *, seed=0, max_imbalance=None,
**opts) -> Placement`` and must return slot_expert (M, S) covering every expert in every layer. Load-only
strategies (linear, round-robin, eplb) also accept loads-kind runs (``fit_traces.loads``).

``locality`` lives in :mod:`tracekit.placement.strategies.locality` (``place_locality``) and is registered on first use (a
lazy import: that module imports this package's scoring, which imports the registry). Options a strategy does not use are ignored, so one
``**opts`` dict (e.g. ``grouping="domain"``) can be passed to all of them. ``max_imbalance`` binds locality only
(None: within a margin of EPLB's layout on the same rows; a number: held on its fit rows under ``engine``'s
dispatch or one line); the baselines are what the engines or DeepSeek publish, unbounded. ``round-robin`` refuses redundant slots (no engine runs it with them).
"""
from __future__ import annotations

import importlib
import time
from typing import Callable

import numpy as np

from ...errors import TracekitError
from . import baselines
from .eplb import eplb as _eplb
from ..data.stats import expert_load
from ..data.types import Cluster, GroupingRule, Placement, TraceArrays

Strategy = Callable[..., Placement]
#: with no absolute --max-imbalance: the node load the grouping rules balance against, and the node balance
#: locality's partition plans against (an absolute bound serves as both itself)
GROUPING_BOUND = 1.10


def _check_fit(fit_traces: TraceArrays, cluster: Cluster) -> None:
    if fit_traces.num_experts != cluster.num_experts:
        raise TracekitError(f"traces have {fit_traces.num_experts} experts but the cluster was given {cluster.num_experts}")


def place_linear(fit_traces: TraceArrays, cluster: Cluster, *, seed: int = 0, max_imbalance: float | None = None, **opts) -> Placement:
    """Contiguous blocks (engine default); see :mod:`tracekit.placement.strategies.baselines`."""
    _check_fit(fit_traces, cluster)
    return Placement(cluster, np.asarray(fit_traces.layers), baselines.linear(cluster, fit_traces.num_layers), "linear")


def place_round_robin(fit_traces: TraceArrays, cluster: Cluster, *, seed: int = 0, max_imbalance: float | None = None, **opts) -> Placement:
    """Strided layout (vLLM round_robin); see :mod:`tracekit.placement.strategies.baselines`."""
    _check_fit(fit_traces, cluster)
    return Placement(cluster, np.asarray(fit_traces.layers), baselines.round_robin(cluster, fit_traces.num_layers), "round-robin")


def place_eplb(
    fit_traces: TraceArrays,
    cluster: Cluster,
    *,
    seed: int = 0,
    max_imbalance: float | None = None,
    num_groups: int | None = None,
    **opts,
) -> Placement:
    """DeepSeek EPLB on the fitted loads; ``num_groups`` defaults to the geometry's ``n_group`` (hierarchical
    when it divides by the node count, global otherwise)."""
    _check_fit(fit_traces, cluster)
    groups = num_groups if num_groups is not None else (fit_traces.geometry or {}).get("n_group")
    loads = expert_load(fit_traces)
    se = _eplb(loads, cluster.num_slots, cluster.nodes, cluster.num_gpus, int(groups) if groups else None)
    hier = bool(groups) and int(groups) % cluster.nodes == 0 and cluster.num_experts % int(groups) == 0
    return Placement(cluster, np.asarray(fit_traces.layers), se, "eplb",
                     meta={"eplb_mode": "hierarchical" if hier else "global", "num_groups": groups})


STRATEGIES: dict[str, Strategy] = {
    "linear": place_linear,
    "round-robin": place_round_robin,
    "eplb": place_eplb,
}

_OPTIONAL = {"locality": ("tracekit.placement.strategies.locality", "place_locality")}


def _load_optional() -> None:
    for name, (mod, fn) in _OPTIONAL.items():
        if name in STRATEGIES:
            continue
        STRATEGIES[name] = getattr(importlib.import_module(mod), fn)  # an import error is a bug: let it show


def available() -> list[str]:
    """Names of all strategies that can run here (optional ones included once importable)."""
    _load_optional()
    return list(STRATEGIES)


def get(name: str) -> Strategy:
    _load_optional()
    if name not in STRATEGIES:
        raise TracekitError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)} or 'all'")
    return STRATEGIES[name]


def fit(name: str, fit_traces: TraceArrays, cluster: Cluster, *, seed: int = 0, max_imbalance: float | None = None,
        grouping: str = "none", attach_grouping: bool = True, **opts) -> Placement:
    """Run one strategy; records ``meta['fit_seconds']`` and checks the result covers every expert.

    ``grouping`` (none|domain|signature) is passed to the strategy: locality fits the rule jointly with the
    placement. A strategy that returns no rule of its own gets the rule of
    :func:`tracekit.placement.strategies.grouping.fit_grouping` when ``attach_grouping`` (so baselines can be scored under the
    same router); with ``attach_grouping=False`` it keeps grouping ``none`` (what engines do today).
    """
    from ..scoring.comm import check_placement

    fn = get(name)
    t0 = time.perf_counter()
    p = fn(fit_traces, cluster, seed=seed, max_imbalance=max_imbalance, grouping=grouping, **opts)
    if grouping != "none" and attach_grouping and (p.grouping is None or p.grouping.kind == "none"):
        p.grouping = fit_grouping_rule(fit_traces, cluster, grouping, seed=seed,
                                       max_imbalance=max_imbalance or GROUPING_BOUND)
    if p.grouping is None:
        p.grouping = GroupingRule()
    p.meta["fit_seconds"] = time.perf_counter() - t0
    p.meta.setdefault("seed", seed)
    nhl = (fit_traces.geometry or {}).get("num_layers")
    if nhl:
        p.meta.setdefault("num_hidden_layers", int(nhl))  # export (SGLang) writes one row per hidden layer
    zero = (fit_traces.geometry or {}).get("zero_computation_experts")
    if zero:  # the model's ids the placement leaves out on purpose (computed in place, never placed)
        p.meta.setdefault("zero_computation_experts", [int(x) for x in zero])
    check_placement(p)
    return p


def fit_grouping_rule(fit_traces: TraceArrays, cluster: Cluster, kind: str, **kw) -> GroupingRule:
    """The grouping rule of ``kind`` (none|domain|signature) from tracekit.placement.strategies.grouping."""
    if kind == "none":
        return GroupingRule()
    from .grouping import fit_grouping

    return fit_grouping(fit_traces, cluster, kind, **kw)
