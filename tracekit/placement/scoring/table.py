"""The ``tracekit place`` table in 120 columns: one row per strategy, the pick marked, held-out numbers first.

Columns (all held-out unless named otherwise; "vs eplb" is the relative change against the eplb row):

- ``step ms``: estimated MoE time per forward step (the replay's ``step_time_ms``; before the replay is installed,
  comm's all-to-all estimate ``est_alltoall_ms``), and its change against eplb.
- ``p99 max/mean``: p99 over steps of the GPU max/mean of one step (replay), else the worst layer's whole-set
  GPU max/mean.
- ``x-node/tok``: normal-mode cross-node copies per token-layer (one send per remote node), and vs eplb.
- ``fit max/mean``: the worst layer's GPU max/mean on the rows the strategy was fitted on (what
  ``--max-imbalance`` bounds).
- ``val``: the objective on the validation part of the train rows (what the pick ranks), vs eplb.
- ``fit s``: wall time of the fit.

``--wide`` prints :func:`tracekit.placement.comparison.render` (every metric) instead.
"""
from __future__ import annotations

from typing import Any

import numpy as np


WIDTH = 120
#: the metrics every row also gives as a change against the linear and eplb rows
DELTA_KEYS = (
    "step_time_ms",
    "step_time_p99_ms",
    "imbalance_p99",
    "cross_node_copies_per_token_normal",
    "cross_node_copies_per_token_lowlat",
    "intra_node_copies_per_token",
    "gpu_load_max_over_mean",
    "node_load_max_over_mean",
    "distinct_experts_per_microbatch",
    "est_alltoall_ms",
)
FEW_STEPS = 10  # fewer full replay steps than this (a validation fold, the held-out split): flagged as noisy
STEP_KEYS = ("step_time_ms", "est_alltoall_ms")
P99_KEYS = ("imbalance_p99", "gpu_load_max_over_mean_worst")
XNODE_KEYS = ("cross_node_copies_per_token_normal",)


def _metric(scores: dict | None, keys: tuple[str, ...]) -> tuple[str | None, float]:
    for k in keys:
        if scores and k in scores and scores[k] is not None:
            return k, float(scores[k])
    return None, float("nan")


def _held(row: dict) -> dict:
    """The held-out scores of a comparison row (the replay's, merged over comm's, when both are there)."""
    out = dict(row.get("heldout") or {})
    for extra in ("replay", "score"):
        if isinstance(row.get(extra), dict):
            out.update(row[extra])
    return out


def relative_change(x: float, ref: float) -> float:
    """Relative change x / ref - 1 (NaN when the reference is 0 or NaN)."""
    if ref is None or not np.isfinite(ref) or ref == 0 or x is None or not np.isfinite(x):
        return float("nan")
    return float(x / ref - 1.0)


def format_change(x: float) -> str:
    """A relative change as a signed percentage, ``-`` when it is not a number."""
    return "-" if not np.isfinite(x) else f"{100 * x:+.1f}%"


def change_text(x: float, ref: float) -> str:
    """The change of x against ref as the table prints it (one definition of the change: the comparison's)."""
    return format_change(relative_change(x, ref))


def render_narrow(comp, pick: dict | None = None):
    """A rich Table (fits ``WIDTH`` columns) of ``comp`` (:class:`tracekit.placement.comparison.Comparison`)."""
    from rich import box
    from rich.table import Table

    m = comp.meta
    c = m["cluster"]
    t = Table(title=(f"held-out: {c['nodes']}x{c['gpus_per_node']} GPUs, E={c['num_experts']} R={c['redundant']}, "
                     f"split {m['split']}, {m['test_requests']} requests / {m['test_token_layers']:,} token-layers"),
              title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    ref = next((r for r in comp.rows if r["strategy"] == "eplb"), None)
    ref_h = _held(ref) if ref else {}
    n_steps, phase = heldout_steps(ref_h)
    if "full_steps" in ref_h:  # what the p99 column rests on
        t.title += (f"; p99 over {n_steps} full {phase} step{'s' * (n_steps != 1)}"
                    + (f" (noisy: fewer than {FEW_STEPS})" if n_steps < FEW_STEPS else ""))
    step_key, _ = _metric(ref_h, STEP_KEYS)
    p99_key, _ = _metric(ref_h, P99_KEYS)
    values = (pick or {}).get("values", {})
    objective = (pick or {}).get("objective", "")
    for name, just in (("", "left"), ("strategy", "left"), ("grouping", "left"),
                       ("step ms" if step_key == "step_time_ms" else "a2a ms", "right"), ("vs\neplb", "right"),
                       ("p99 step\nmax/mean" if p99_key == "imbalance_p99" else "worst layer\nmax/mean", "right"),
                       ("x-node\n/tok", "right"), ("vs\neplb", "right"), ("fitted\nmax/mean", "right"),
                       (f"val\n{objective}", "right"), ("vs\neplb", "right"), ("fit s", "right")):
        t.add_column(name, justify=just, no_wrap=True)
    for r in comp.rows:
        h = _held(r)
        _, step = _metric(h, STEP_KEYS)
        _, p99 = _metric(h, P99_KEYS)
        _, xn = _metric(h, XNODE_KEYS)
        _, fit_worst = _metric(r.get("fitted"), ("gpu_load_max_over_mean_worst",))
        v = values.get(r["strategy"], float("nan"))
        t.add_row(
            "*" if pick and pick.get("pick") == r["strategy"] else "",
            r["strategy"], r["grouping"],
            f"{step:.3g}", change_text(step, _metric(ref_h, STEP_KEYS)[1]),
            f"{p99:.3f}", f"{xn:.3f}", change_text(xn, _metric(ref_h, XNODE_KEYS)[1]),
            f"{fit_worst:.3f}", f"{v:.3g}" if np.isfinite(v) else "-", change_text(v, values.get("eplb", float("nan"))),
            f"{r['fit_seconds']:.1f}",
        )
    return t


def heldout_steps(h: dict) -> tuple[int, str]:
    """(full replay steps behind the held-out percentiles, their phase) of one held-out score dict."""
    return int(h.get("full_steps") or 0), str(h.get("step_phase", "decode"))


def pick_line(pick: dict[str, Any], comp=None) -> str:
    """One line: which strategy is picked and why (validation), and what it gives held out against eplb, with the
    number of replay steps the held-out percentiles rest on (fewer than ``FEW_STEPS``: flagged as noisy)."""
    line = f"* pick: {pick['reason']}"
    if comp is None:
        return line
    try:
        row, ref = comp.row(pick["pick"]), comp.row("eplb")
    except KeyError:
        return line
    h, e = _held(row), _held(ref)
    key, step = _metric(h, STEP_KEYS)
    _, xn = _metric(h, XNODE_KEYS)
    _, p99 = _metric(h, P99_KEYS)
    _, p99_ref = _metric(e, P99_KEYS)
    n, phase = heldout_steps(h)
    parts = [f"step {change_text(step, _metric(e, STEP_KEYS)[1])}", f"x-node {change_text(xn, _metric(e, XNODE_KEYS)[1])}",
             f"p99 max/mean {p99:.3f} vs {p99_ref:.3f}"]
    if pick["pick"] == "eplb":
        parts = [f"p99 max/mean {p99:.3f}"]
    noisy = f" (noisy: fewer than {FEW_STEPS})" if n < FEW_STEPS else ""
    return line + f"; held out vs eplb: {', '.join(parts)}, from {n} full {phase} step{'s' * (n != 1)}{noisy}"


def duplicate_lines(comp) -> list[str]:
    """One line per strategy that puts two copies of an expert on one GPU (a copy that splits no load)."""
    from ..strategies.balance import duplicates

    out = []
    for name, p in comp.placements.items():
        n = sum(duplicates(row, p.cluster) for row in p.slot_expert)
        if n:
            why = "as DeepSeek's published EPLB places them" if name == "eplb" else "nothing else fitted"
            out.append(f"  {name}: {n} copies share a GPU with another copy of the same expert ({why})")
    return out
