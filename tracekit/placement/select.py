"""Pick the placement to deploy on a validation split of the train data, never one worse than EPLB.

:func:`validate` is what ``tracekit place`` runs before the final fit:

1. Split the train rows again (:func:`validation_folds`: by request, two folds of half the train requests each
   way; or by token position inside each request, one fold, as the outer split) into *fit* and *validation*
   rows. The test rows are never touched.
2. Fit every strategy on the fit rows and score it on the validation rows with the scorer (the engine's dispatch);
   values are means over the folds.
3. **Per layer, locality against EPLB.** Both layouts are scored layer by layer on the validation rows, under the
   same router (locality's grouping rule); the layers where locality does not beat EPLB's layout on the objective
   take EPLB's layout (``eplb_layers``, passed to the final fit). The mixed placement is scored again.
4. **The pick**: the strategy with the best validation value of the objective (ties go to the reference, eplb),
   among those whose validation balance (p99 per-step GPU max/mean) is within ``balance_margin`` (2.5%) of EPLB's,
   so that a traffic win never buys an overloaded GPU, and that beat EPLB in every fold (a win that flips
   between halves of the train requests is noise). EPLB is always a candidate, so the pick is never worse than
   EPLB on validation. The margin is half of the 5% promised held out (:data:`BALANCE_MARGIN`): validation rows
   are a sample too, and a pick at +4% on validation read +7.6% held out on the real DeepSeek-V2-Lite traces (4x2).

Objectives (lower is better): ``step-time`` (estimated MoE time per step), ``traffic`` (cross-node bytes per
step) and ``balance`` (p99 over steps of GPU max/mean). A scorer is ``fn(placement, traces, home=None) -> dict``;
:func:`default_scorer` replays the rows per step under the engine's replica choice
(:func:`tracekit.placement.scoring.comm.score_placement`). A scorer without the replay's keys is read through
:data:`METRIC_KEYS`' stand-ins (comm.evaluate's all-to-all estimate, copies per token, worst-layer max/mean).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..errors import TracekitError
from . import strategies as strat
from .scoring.comm import route_requests
from .scoring.table import FEW_STEPS, change_text
from .data.traces import split_requests, split_tokens, subset
from .data.types import Cluster, Placement, TraceArrays

OBJECTIVES = ("step-time", "traffic", "balance")
# objective -> metric keys, first one a score dict has wins: the replay's, then comm.evaluate's stand-ins
METRIC_KEYS = {
    "step-time": ("step_time_ms", "est_alltoall_ms"),
    "traffic": ("cross_node_bytes_per_step", "cross_node_copies_per_token_normal"),
    "balance": ("imbalance_p99", "gpu_load_max_over_mean_worst"),
}
REFERENCE = "eplb"
#: a candidate's validation p99 balance may exceed eplb's by this share at most (half the 5% promised held out)
BALANCE_MARGIN = 0.025
Scorer = Callable[..., dict]


def check_objective(objective: str) -> str:
    if objective not in OBJECTIVES:
        raise TracekitError(f"unknown objective {objective!r}; use {', '.join(OBJECTIVES)}")
    return objective


def metric_key(scores: dict, objective: str) -> str:
    """The key of ``scores`` that measures ``objective``."""
    for k in METRIC_KEYS[check_objective(objective)]:
        if k in scores:
            return k
    raise TracekitError(f"the scores carry no metric for objective {objective!r}")


def default_scorer(engine: str = "sglang", **score_opts) -> Scorer:
    """``fn(placement, traces, home=None) -> dict``: the per-step replay under ``engine``'s replica choice
    (:func:`tracekit.placement.scoring.comm.score_placement`; ``score_opts``: profile, decode_batch, hidden_size, ...)."""
    from .scoring.comm import score_placement

    def replay(p: Placement, tr: TraceArrays, home=None) -> dict:
        return score_placement(p, tr, engine=engine, home=home, **score_opts)
    return replay


def validation_split(traces: TraceArrays, train: np.ndarray, split: str = "request", *, seed: int = 0,
                     share: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """(fit, validation) masks (N,) bool inside ``train``: ``share`` of the train requests (split request), or the
    last ``share`` of each request's train decode tokens (split tokens)."""
    sub = subset(traces, train)
    if split == "tokens":
        a, b = split_tokens(sub, frac=1.0 - share)
    else:
        a, b = split_requests(sub, holdout=share, seed=seed + 1)
    idx = np.flatnonzero(train)
    fit = np.zeros(len(traces), dtype=bool)
    val = np.zeros(len(traces), dtype=bool)
    fit[idx[a]] = True
    val[idx[b]] = True
    return fit, val


def validation_folds(traces: TraceArrays, train: np.ndarray, split: str = "request", *, seed: int = 0,
                     ) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (fit, validation) pairs :func:`validate` uses: split request -> two folds (half the train requests
    each way, so every train request validates once); split tokens -> one fold (the last quarter of each
    request's train decode tokens: validation stays later in time than the fit)."""
    if split == "tokens":
        return [validation_split(traces, train, "tokens", seed=seed, share=0.25)]
    fit, val = validation_split(traces, train, "request", seed=seed, share=0.5)
    return [(fit, val), (val, fit)]


def one_layer(traces: TraceArrays, m: int) -> TraceArrays:
    """The rows of MoE-layer position ``m`` as a one-layer model (requests keep their indices).

    Its one layer is numbered 0, so that a static engine's table is built for that layer alone (SGLang's seeded
    picks then start the stream at this layer: per-layer values are a close model of the whole placement's)."""
    sel = traces.layer_pos == m
    sub = subset(traces, sel)
    sub.layers = np.zeros(1, dtype=traces.layers.dtype)
    sub.layer_pos = np.zeros(int(sel.sum()), dtype=traces.layer_pos.dtype)
    sub.geometry = traces.geometry
    return sub


def layer_values(ps: list[Placement], traces: TraceArrays, scorer: Scorer, objective: str,
                 home: np.ndarray) -> np.ndarray:
    """(P, M) objective value of each layer of each placement of ``ps``, each layer scored on its own rows
    (:func:`one_layer`) under the same ``home``; NaN where a layer has no rows. One layer's rows are built at a
    time (all of them at once would copy the rows once more)."""
    out = np.full((len(ps), traces.num_layers), np.nan)
    for m in range(traces.num_layers):
        tr = one_layer(traces, m)
        if len(tr) == 0:
            continue
        for i, p in enumerate(ps):
            meta = {k: v for k, v in p.meta.items() if k != "num_hidden_layers"}
            q = Placement(p.cluster, tr.layers, p.slot_expert[m:m + 1], p.strategy, p.grouping, meta)
            s = scorer(q, tr, home=home)
            out[i, m] = float(s[metric_key(s, objective)])
    return out


@dataclass
class Validation:
    """What :func:`validate` found: the pick, why, the validation value per strategy, locality's EPLB layers."""

    pick: str
    objective: str
    metric: str
    values: dict[str, float]
    reason: str
    balance: dict[str, float] = field(default_factory=dict)
    eplb_layers: list[int] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"pick": self.pick, "objective": self.objective, "metric": self.metric, "values": self.values,
                "balance": self.balance, "reason": self.reason, "locality_eplb_layers": self.eplb_layers, "errors": self.errors}


def validate(traces: TraceArrays, cluster: Cluster, names: list[str], train: np.ndarray, *,
             objective: str = "step-time", split: str = "request", seed: int = 0, max_imbalance: float | None = None,
             grouping: str = "none", scorer: Scorer | None = None, strategy_opts: dict[str, dict] | None = None,
             balance_margin: float = BALANCE_MARGIN) -> Validation:
    """Fit ``names`` on the fit part of each fold of ``train``, score them on its validation part, pick (see the
    module docstring). Values are means over the folds; a strategy other than eplb must beat eplb in every fold."""
    check_objective(objective)
    scorer = scorer or default_scorer()
    if REFERENCE not in names:
        names = [REFERENCE, *names]
    folds = validation_folds(traces, train, split, seed=seed)
    if any(not f.any() or not v.any() for f, v in folds):
        raise TracekitError("the train split is too small to hold out a validation part; use more requests")
    opts = strategy_opts or {}
    errors: dict[str, str] = {}
    metric = None
    per_fold: list[dict[str, tuple[float, float]]] = []  # fold -> name -> (value, balance)
    steps: list[float] = []  # full replay steps per fold (the replay's sample size)
    fitted_folds, v_loc, v_ref = [], np.zeros(traces.num_layers), np.zeros(traces.num_layers)
    parts: dict[int, TraceArrays] = {}  # the request folds swap the same two masks: each subset is built once

    def part(mask: np.ndarray) -> TraceArrays:
        if id(mask) not in parts:
            parts[id(mask)] = subset(traces, mask)
        return parts[id(mask)]

    for fit_mask, val_mask in folds:
        fit_tr, val_tr = part(fit_mask), part(val_mask)
        scores: dict[str, tuple[float, float]] = {}
        fitted: dict[str, Placement] = {}
        for name in names:
            if name in errors:
                continue
            try:
                # a fold fits on part of the train rows: the bound binds the final fit, not this one
                p = strat.fit(name, fit_tr, cluster, seed=seed, max_imbalance=max_imbalance, grouping=grouping,
                              attach_grouping=name not in ("linear", "round-robin", "eplb"),
                              **{"strict_bound": False, **opts.get(name, {})})
            except TracekitError as exc:  # e.g. a bound this part of the data cannot hold: not a candidate
                if name == REFERENCE:
                    raise
                errors[name] = str(exc)
                continue
            sc = scorer(p, val_tr)
            metric = metric or metric_key(sc, objective)
            if name == REFERENCE and "full_steps" in sc:
                steps.append(float(sc["full_steps"]))
            fitted[name] = p
            scores[name] = (float(sc[metric]), float(sc[metric_key(sc, "balance")]))
        if "locality" in fitted:  # per-layer values under the same router, summed over the folds
            loc, ref = fitted["locality"], fitted[REFERENCE]
            home = route_requests(loc.grouping, val_tr, cluster)
            ref_same_router = Placement(cluster, ref.layers, ref.slot_expert, REFERENCE, loc.grouping, dict(ref.meta))
            both = np.nan_to_num(layer_values([loc, ref_same_router], val_tr, scorer, objective, home), nan=np.inf)
            v_loc += both[0]
            v_ref += both[1]
        per_fold.append(scores)
        fitted_folds.append((fitted, val_tr))
    eplb_layers: list[int] = []
    if any("locality" in f for f, _ in fitted_folds) and "locality" not in errors:
        lose = ~(v_loc < v_ref)  # ties and unscored layers keep the reference layout
        eplb_layers = [int(x) for x in traces.layers[lose]]
        if lose.any():
            for (fitted, val_tr), scores in zip(fitted_folds, per_fold):
                loc, ref = fitted["locality"], fitted[REFERENCE]
                mixed = Placement(cluster, loc.layers, np.where(lose[:, None], ref.slot_expert, loc.slot_expert),
                                  "locality", loc.grouping, dict(loc.meta))
                sc = scorer(mixed, val_tr)
                scores["locality"] = (float(sc[metric]), float(sc[metric_key(sc, "balance")]))
    common = [n for n in names if all(n in f for f in per_fold)]
    values = {n: float(np.mean([f[n][0] for f in per_fold])) for n in common}
    balance = {n: float(np.mean([f[n][1] for f in per_fold])) for n in common}
    steady = {n: all(f[n][0] < f[REFERENCE][0] for f in per_fold) for n in common}
    pick, reason = choose(values, balance, objective, balance_margin, steady=steady)
    if "locality" in values and eplb_layers:
        reason += f"; locality on eplb layout in {len(eplb_layers)}/{traces.num_layers} layers"
    if steps and min(steps) < FEW_STEPS:
        reason += f"; noisy: {int(min(steps))} step/fold"
    return Validation(pick, objective, metric, values, reason, balance, eplb_layers, errors)


def choose(values: dict[str, float], balance: dict[str, float], objective: str,
           balance_margin: float = BALANCE_MARGIN, steady: dict[str, bool] | None = None) -> tuple[str, str]:
    """(pick, one line of why) from validation ``values`` (lower is better) and ``balance`` (p99 per-step GPU
    max/mean) per candidate; ``eplb`` must be among them. Candidates whose balance exceeds eplb's by more than
    ``balance_margin``, or that do not beat eplb in every validation fold (``steady`` False), are skipped; ties
    go to eplb."""
    limit = balance[REFERENCE] * (1 + balance_margin)
    steady = steady or {}
    eligible = [n for n in values if n == REFERENCE or (balance[n] <= limit and steady.get(n, True))]
    pick = sorted(eligible, key=lambda n: (values[n], n != REFERENCE))[0]
    ref_v = values[REFERENCE]
    if pick == REFERENCE:
        reason = f"eplb: best {objective} on validation"
    else:
        reason = f"{pick}: {objective} {change_text(values[pick], ref_v)} vs eplb on validation"
    unsteady = [n for n in values if n not in eligible and values[n] < values[pick] and not steady.get(n, True)]
    skipped = [n for n in values if n not in eligible and values[n] < values[pick] and n not in unsteady]
    if skipped:
        reason += f"; {', '.join(skipped)} skipped (balance > eplb +{100 * balance_margin:g}%)"
    if unsteady:
        reason += f"; {', '.join(unsteady)} skipped (not better than eplb in every fold)"
    return pick, reason


#: the GPU max/mean levels an absolute ``--max-imbalance`` b is fitted at: locality is fitted (validation and final
#: fit) at the largest level <= b, then the next lower one, ..., until one whose fit rows read <= b under the
#: engine's tables. A level's placement depends on the level alone, never on b, so acceptance is monotone in b (the
#: levels tried for a larger b include every level a smaller one tried) and the bound a refusal suggests (the lowest
#: ratio reached, rounded up) is accepted: its own walk reaches that level at the latest.
LEVELS = (1.0, 1.05, 1.10, 1.15, 1.20, 1.25, 1.30, 1.40, 1.50, 1.60, 1.75, 2.0, 2.25, 2.5, 3.0, 4.0, 5.0, 7.5,
          10.0, 20.0, 50.0, 100.0, 1e3, 1e4, 1e6)


def bound_levels(bound: float) -> list[float]:
    """The levels an absolute bound walks, largest first (see :data:`LEVELS`)."""
    return [lv for lv in LEVELS if lv <= bound + 1e-12][::-1]


@dataclass
class Bounded:
    """Locality under an absolute bound: the validation and final fit of the accepted level, or why none held."""

    validation: Validation
    placement: Placement | None
    level: float | None
    tried: list[tuple[float, float]]  # (level, worst-layer GPU max/mean on the fit rows)
    refusal: str | None = None


def hold_absolute(traces: TraceArrays, cluster: Cluster, names: list[str], train: np.ndarray, bound: float, *,
                  engine: str, grouping: str, seed: int, validate_opts: dict) -> Bounded:
    """Walk :func:`bound_levels` (see :data:`LEVELS`): per level, :func:`validate` every strategy with locality at
    that level, fit locality on the whole train split at that level (with the layers validation gave to EPLB's
    layout) and accept it when its worst layer's GPU max/mean on the train rows, under ``engine``'s tables, is
    <= ``bound``. None accepted: ``refusal`` names the lowest ratio reached, rounded up to 0.01 (accepted, by
    construction, when asked for)."""
    fit_traces = subset(traces, train)
    tried: list[tuple[float, float]] = []
    first: Validation | None = None
    for level in bound_levels(bound):
        val = validate(traces, cluster, names, train, max_imbalance=level, grouping=grouping, seed=seed,
                       strategy_opts={"locality": {"engine": engine}}, **validate_opts)
        first = first or val
        if "locality" in val.errors:
            continue
        p = strat.fit("locality", fit_traces, cluster, seed=seed, max_imbalance=level, grouping=grouping,
                      engine=engine, eplb_layers=val.eplb_layers, strict_bound=False)
        ratio = float(p.meta["balance"]["fit_gpu_max_over_mean_worst"])
        tried.append((level, ratio))
        if ratio <= bound + 1e-9:
            p.meta["bound_level"] = level
            return Bounded(val, p, level, tried)
    best = min(r for _, r in tried) if tried else float("nan")
    need = np.ceil(best * 100 - 1e-6) / 100
    refusal = (f"locality cannot hold --max-imbalance {bound:g} on its fit rows under {engine}'s dispatch (lowest "
               f"worst-layer GPU max/mean reached: {best:.3f}, eplb's layout included); use --max-imbalance "
               f"{need:.2f}, more --redundant slots, or no --max-imbalance (balance relative to eplb's)")
    return Bounded(first, None, None, tried, refusal)


def place(traces: TraceArrays, cluster: dict, strategy: str = "all", *, objective: str = "step-time",
          engine: str = "sglang", grouping: str = "none", holdout: float = 0.3, split: str = "request", seed: int = 0,
          max_imbalance: float | None = None, phase: str = "all", baseline_grouping: bool = False, **eval_opts):
    """What ``tracekit place`` does, for notebooks: validate every strategy on a part of the train split and pick
    one on ``objective`` (never worse than eplb), then fit on the whole train split and score every strategy on
    the held-out requests under ``engine``'s dispatch. ``cluster``: {"nodes", "gpus_per_node", "redundant"}.
    ``max_imbalance``: None (default) holds locality within 5% of EPLB's GPU balance, layer by layer, on the same
    rows and engine; a number is an absolute bound (:func:`hold_absolute`): with ``strategy="all"`` a locality that
    cannot hold it leaves the pick (eplb or another strategy is picked, ``validation.errors`` says why), with
    ``strategy="locality"`` it is refused in one line. ``eval_opts``: the replay's options (profile, decode_batch,
    prefill_chunk, hidden_size, ...).

    Returns ``(comparison, validation)``: ``comparison.placements[validation.pick]`` is the placement to deploy.
    The result is a pure function of (traces, arguments, seed): BLAS runs in one thread here (a multi-threaded
    BLAS splits a float sum differently with OMP_NUM_THREADS, and a near-tie could then flip), and no decision
    reads the clock.
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        return _place(traces, cluster, strategy, objective=objective, engine=engine, grouping=grouping,
                      holdout=holdout, split=split, seed=seed, max_imbalance=max_imbalance, phase=phase,
                      baseline_grouping=baseline_grouping, **eval_opts)


def _place(traces: TraceArrays, cluster: dict, strategy: str, *, objective: str, engine: str, grouping: str,
           holdout: float, split: str, seed: int, max_imbalance: float | None, phase: str, baseline_grouping: bool,
           **eval_opts):
    from ..progress import current
    from .comparison import compare, resolve_strategies
    from .data.traces import make_split
    from .data.types import make_cluster
    from .notes import candidates

    check_objective(objective)
    cl = make_cluster(traces, **cluster)
    names, notes = candidates(resolve_strategies(strategy, cl), strategy, cl, engine,
                              (traces.geometry or {}).get("n_group"))
    train, _ = make_split(traces, split, holdout, seed)
    opts = {"locality": {"engine": engine}}
    score_opts = dict(eval_opts)
    if "hidden_size" not in score_opts and (traces.geometry or {}).get("hidden_size"):
        score_opts["hidden_size"] = int(traces.geometry["hidden_size"])
    validate_opts = {"objective": objective, "split": split, "scorer": default_scorer(engine, **score_opts)}
    fitted: dict[str, Placement] = {}
    say = current().describe  # the progress line of the command around (a no-op without one)
    if isinstance(strategy, str) and strategy not in ("all", "locality"):
        # one baseline named: nothing to pick, and no per-layer fallback to validate (only locality has one);
        # the references (linear, eplb) are still scored beside it
        val = Validation(pick=strategy, objective=objective, metric="-", values={},
                         reason=f"{strategy} (named by --strategy: nothing to pick, no validation run)")
    elif max_imbalance is None or "locality" not in names:
        say(f"place: validating {len(names)} strategies on a part of the train split")
        val = validate(traces, cl, names, train, max_imbalance=max_imbalance, grouping=grouping, seed=seed,
                       strategy_opts=opts, **validate_opts)
    else:
        say(f"place: fitting locality to hold GPU max/mean {max_imbalance:g}, validating {len(names)} strategies")
        held = hold_absolute(traces, cl, names, train, max_imbalance, engine=engine, grouping=grouping, seed=seed,
                             validate_opts=validate_opts)
        val = held.validation
        if held.placement is None:
            if strategy == "locality":
                raise TracekitError(held.refusal)
            names = [n for n in names if n != "locality"]
            val = _without(val, "locality", held.refusal)
        else:
            fitted["locality"] = held.placement
            if held.level != bound_levels(max_imbalance)[0]:
                val.reason += f"; locality fitted at GPU max/mean {held.level:g} to hold {max_imbalance:g}"
    opts["locality"]["eplb_layers"] = val.eplb_layers
    say(f"place: fitting {len(names)} strategies on the train split, scoring them on the held-out requests")
    comp = compare(traces, cl, names, grouping=grouping, holdout=holdout, split=split, seed=seed,
                   max_imbalance=max_imbalance, score_phase=phase, baseline_grouping=baseline_grouping,
                   strategy_opts=opts, engine=engine, prefitted=fitted, **eval_opts)
    comp.meta["pick"] = val.to_json()
    comp.meta["engine"] = engine
    comp.meta["notes"] = notes
    return comp, val


def _without(val: Validation, name: str, why: str) -> Validation:
    """``val`` with ``name`` out of the candidates (``errors[name]`` = why) and the pick made again."""
    values = {k: v for k, v in val.values.items() if k != name}
    balance = {k: v for k, v in val.balance.items() if k != name}
    pick, reason = choose(values, balance, val.objective) if values else (val.pick, val.reason)
    return Validation(pick, val.objective, val.metric, values, reason, balance, [],
                      {**val.errors, name: why})
