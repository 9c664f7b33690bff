"""Fit strategies on a train split, score them on held-out traffic, and lay the results side by side.

:func:`compare` is the library form of ``tracekit place``: load traces (or take loaded ones), split them
(``request``: hold out whole requests; ``tokens``: fit on each request's first decode tokens, score the rest),
fit every strategy on the train rows only, and score each placement with :func:`tracekit.placement.scoring.comm.evaluate`
on the held-out rows (the numbers that count), under the target ``engine``'s own replica choice
(:mod:`tracekit.placement.scoring.dispatch`, default ``sglang``) and replayed step by step (:mod:`tracekit.placement.scoring.replay`:
estimated MoE step time, per-step GPU max/mean), and on the fitted rows (for contrast, whole-set numbers only:
balance on tokens the optimizer saw is always flattering). Each row also carries the relative change against
``linear`` and ``eplb``. The engine is recorded in every placement's ``meta`` (``export`` warns when a placement
goes to another engine).

Grouping: the strategy fits the rule (locality does it jointly); with ``baseline_grouping=True`` the baselines are
scored under the same fitted rule, otherwise under ``none`` as engines run them today.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..errors import TracekitError
from . import strategies as strat
from .scoring.comm import evaluate
from .scoring.table import DELTA_KEYS, format_change, relative_change
from .data.traces import load_traces, make_split, subset
from .data.types import Cluster, Placement, TraceArrays, make_cluster

BASELINES = ("linear", "round-robin", "eplb")


@dataclass
class Comparison:
    """Result of :func:`compare`: one row per strategy (dicts, JSON-ready) and the fitted placements."""

    rows: list[dict[str, Any]]
    placements: dict[str, Placement]
    meta: dict[str, Any] = field(default_factory=dict)

    def row(self, strategy: str) -> dict[str, Any]:
        for r in self.rows:
            if r["strategy"] == strategy:
                return r
        raise KeyError(strategy)

    def to_json(self) -> dict[str, Any]:
        return {"meta": self.meta, "rows": self.rows}


def resolve_strategies(names: str | Sequence[str], cluster: Cluster | None = None) -> list[str]:
    """``'all'`` or a list of names -> validated list (linear and eplb always included: they are the references).

    ``'all'`` leaves out round-robin when the cluster has redundant slots (it has none; see baselines)."""
    avail = strat.available()
    if isinstance(names, str):
        names = avail if names == "all" else [names]
        if cluster is not None and cluster.redundant and len(names) > 1:
            names = [n for n in names if n != "round-robin"]
    for n in names:
        strat.get(n)
    out = [n for n in ("linear", "eplb") if n not in names] + list(names)
    return sorted(dict.fromkeys(out), key=lambda n: (avail.index(n) if n in avail else 99, n))


def compare(
    runs_or_traces: TraceArrays | Sequence[str | os.PathLike],
    cluster: Cluster | dict,
    strategies: str | Sequence[str] = "all",
    *,
    grouping: str = "none",
    holdout: float = 0.3,
    split: str = "request",
    token_frac: float = 0.5,
    seed: int = 0,
    max_imbalance: float | None = None,
    score_phase: str = "all",
    baseline_grouping: bool = False,
    strategy_opts: dict[str, dict] | None = None,
    engine: str = "sglang",
    prefitted: dict[str, Placement] | None = None,
    **eval_opts,
) -> Comparison:
    """Fit every strategy on the train split and score it on the held-out split (and on the fitted rows).

    ``cluster``: a :class:`Cluster` or ``{"nodes", "gpus_per_node", "redundant"}`` (experts from the traces).
    ``score_phase``: all | decode | prefill rows to score. ``engine``: sglang | vllm | trtllm | ideal, whose
    dispatch scores the placements. ``eval_opts`` go to :func:`comm.evaluate` (hidden_size, bytes_per_elem,
    moe_intermediate_size, microbatch_tokens, profile, decode_batch, prefill_chunk, tflops, nvlink_gbps,
    internode_gbps). ``prefitted``: placements already fitted on this train split (by name), used as they are.
    """
    from .scoring.dispatch import check_engine

    check_engine(engine)
    traces = runs_or_traces if isinstance(runs_or_traces, TraceArrays) else load_traces(list(runs_or_traces))
    if len(traces) == 0:
        raise TracekitError("placement comparison needs per-token routes; loads-only runs can be placed but not scored")
    if isinstance(cluster, dict):
        cluster = make_cluster(traces, **cluster)
    names = resolve_strategies(strategies, cluster)
    n_hidden = (traces.geometry or {}).get("num_layers")
    if "hidden_size" not in eval_opts and (traces.geometry or {}).get("hidden_size"):
        eval_opts["hidden_size"] = int(traces.geometry["hidden_size"])
    train, test = make_split(traces, split, holdout, seed, token_frac)
    if score_phase != "all":
        ph = {"prefill": 0, "decode": 1}.get(score_phase)
        if ph is None:
            raise TracekitError(f"unknown phase {score_phase!r}; use all, decode or prefill")
        test = test & (traces.phase == ph)
        fitted_scored = train & (traces.phase == ph)
    else:
        fitted_scored = train
    if not test.any():
        raise TracekitError("the held-out split is empty; lower --holdout's granularity or use --split tokens")
    fit_traces = subset(traces, train)
    opts = strategy_opts or {}

    placements: dict[str, Placement] = {}
    rows: list[dict[str, Any]] = []
    for name in names:
        p = (prefitted or {}).get(name) or strat.fit(
            name, fit_traces, cluster, seed=seed, max_imbalance=max_imbalance, grouping=grouping,
            attach_grouping=baseline_grouping or name not in BASELINES, **opts.get(name, {}),
        )
        if n_hidden and not p.meta.get("num_hidden_layers"):
            p.meta["num_hidden_layers"] = int(n_hidden)  # the SGLang map's rows, as export writes them
        p.meta["engine"] = engine
        if (traces.geometry or {}).get("n_group") and "n_group" not in p.meta:
            p.meta["n_group"] = int(traces.geometry["n_group"])  # vLLM's round_robin needs expert groups
        placements[name] = p
        t0 = time.perf_counter()
        held = evaluate(p, traces, test, engine=engine, **eval_opts)
        eval_s = time.perf_counter() - t0
        fitted = evaluate(p, traces, fitted_scored, engine=engine, replay=False, **eval_opts) \
            if fitted_scored.any() else {}
        rows.append({
            "strategy": name,
            "grouping": p.grouping.kind,
            "fit_seconds": float(p.meta.get("fit_seconds", float("nan"))),
            "eval_seconds": eval_s,
            "heldout": held,
            "fitted": fitted,
        })
    for ref in ("linear", "eplb"):
        base = next(r["heldout"] for r in rows if r["strategy"] == ref)
        for r in rows:
            r[f"vs_{ref}"] = {k: relative_change(r["heldout"].get(k, float("nan")), base.get(k, float("nan"))) for k in DELTA_KEYS}
    meta = {
        "cluster": {"nodes": cluster.nodes, "gpus_per_node": cluster.gpus_per_node, "num_experts": cluster.num_experts,
                    "redundant": cluster.redundant, "slots_per_gpu": cluster.slots_per_gpu},
        "layers": [int(x) for x in traces.layers],
        "split": split, "holdout": holdout if split == "request" else None,
        "token_frac": token_frac if split == "tokens" else None, "seed": seed,
        "grouping": grouping, "baseline_grouping": baseline_grouping, "max_imbalance": max_imbalance,
        "score_phase": score_phase, "engine": engine,
        "requests": int(traces.num_requests),
        "train_token_layers": int(train.sum()), "test_token_layers": int(test.sum()),
        "train_requests": int(np.unique(traces.request[train]).size),
        "test_requests": int(np.unique(traces.request[test]).size),
        "eval_opts": eval_opts,
    }
    return Comparison(rows=rows, placements=placements, meta=meta)


def render(comp: Comparison):
    """A rich Table of the comparison (held-out numbers; fitted GPU max/mean for contrast)."""
    from rich.table import Table

    m = comp.meta
    title = (f"held-out placement comparison: {m['cluster']['nodes']} nodes x {m['cluster']['gpus_per_node']} GPUs, "
             f"E={m['cluster']['num_experts']} R={m['cluster']['redundant']}, split={m['split']}, "
             f"test {m['test_requests']} requests / {m['test_token_layers']:,} token-layers; "
             f"dispatch {m.get('engine', 'ideal')}, {m['eval_opts'].get('profile', 'h200')} profile")
    t = Table(title=title)
    cols = [
        ("strategy", "left"), ("grouping", "left"), ("fit s", "right"),
        ("step ms", "right"), ("step vs eplb", "right"), ("step max/mean p50/p99", "right"),
        ("x-node/tok normal", "right"), ("x-node/tok LL", "right"), ("intra/tok", "right"),
        ("GB normal", "right"), ("GPU max/mean", "right"), ("worst layer", "right"), ("node max/mean", "right"),
        ("experts/mb", "right"), ("a2a ms", "right"), ("vs linear", "right"), ("vs eplb", "right"),
        ("fitted GPU max/mean", "right"),
    ]
    for c, j in cols:
        t.add_column(c, justify=j)
    for r in comp.rows:
        h = r["heldout"]
        f = r["fitted"] or {}
        t.add_row(
            r["strategy"], r["grouping"], f"{r['fit_seconds']:.2f}",
            f"{h.get('step_time_ms', float('nan')):.4g}", format_change(r["vs_eplb"]["step_time_ms"]),
            f"{h.get('imbalance_p50', float('nan')):.2f}/{h.get('imbalance_p99', float('nan')):.2f}",
            f"{h['cross_node_copies_per_token_normal']:.3f}", f"{h['cross_node_copies_per_token_lowlat']:.3f}",
            f"{h['intra_node_copies_per_token']:.3f}", f"{h['bytes_normal'] / 1e9:.3f}",
            f"{h['gpu_load_max_over_mean']:.3f}", f"{h['gpu_load_max_over_mean_worst']:.3f}",
            f"{h['node_load_max_over_mean']:.3f}", f"{h['distinct_experts_per_microbatch']:.1f}",
            f"{h['est_alltoall_ms']:.4f}",
            format_change(r["vs_linear"]["cross_node_copies_per_token_normal"]),
            format_change(r["vs_eplb"]["cross_node_copies_per_token_normal"]),
            f"{f.get('gpu_load_max_over_mean', float('nan')):.3f}",
        )
    return t
