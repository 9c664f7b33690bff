"""Placement benchmark: optimiser wall time and held-out communication per strategy, one table per data set.

Data sets:

1. **dsv3-synth**: synthetic DeepSeek V3 geometry (58 MoE layers 3..60 of 61, E=256, k=8) from
   :func:`tracekit.synth.generate_run` with its default structure (per-layer Zipf skew, domain shift, request
   profiles with prefill->decode affinity; a token's k experts are one draw from one marginal).
2. **dsv3-synth-groups-topics**: the same plus DeepSeek V3's group-limited routing (n_group=8, topk_group=4,
   the model's real values) and latent co-activation topics (16 topics of 16 experts per layer, boost 8,
   per-profile Dirichlet(0.5) mixtures; see ``SYNTH_TOPICS``). These topic parameters were chosen before any
   placement was run on them, to give a moderate co-activation (about a third of a token's 8 experts come from
   its topic) and were not tuned afterwards.
   Both: at least ``--tokens`` tokens (prefill + decode), 4 nodes x 8 GPUs, R=32, split by request (30% held
   out); every strategy with grouping ``none``, then ``locality`` with ``domain`` and ``signature`` grouping.
   Targets from the issue: every fit of the 58 layers <= 60 s on this 2-core machine; locality with grouping
   >= 25% fewer normal-mode cross-node copies than eplb at held-out GPU max/mean <= 1.10.
3. **Real traces** (``../shared/data``; only real routing counts here): the Mixtral-8x7B decode runs
   (``traces/mixtral-8x7b``, E=8, k=2, fitted on the first half of each request's decode tokens and scored on the
   rest: 5 requests are too few to hold whole ones out; 16 decode tokens per DP rank per step) and the
   DeepSeek-V2-Lite-Chat prefill routing of 1,999 Puffin prompts (``traces/deepseek-v2-lite``, E=64, k=6, imported
   with ``tracekit import jsonl --phase prefill``; place's default request split; prefill steps of
   ``DSV2_PREFILL_CHUNK`` tokens per DP rank so that even 32 ranks get >= 10 held-out steps). Per geometry (Mixtral
   2x2, 4x2, 4x1, 2x4; DeepSeek-V2-Lite those and 2x8, 4x4, 4x8; R the smallest positive count making E + R
   divide over the GPUs) the bench runs what ``tracekit place RUNS --strategy all`` runs with its defaults
   (:func:`tracekit.placement.select.place`: engine sglang = the SGLang server's per-rank tables, objective
   step-time, the relative bound, grouping none) and reports the pick against eplb held out: cross-node copies
   per token-layer and bytes per step, step time, p99 per-step GPU max/mean, full steps. Targets (issue 18): the
   pick's cross-node traffic <= eplb's at p99 within 5% of eplb's, or the pick is eplb, on every real geometry;
   default place never refuses a real data set.
4. **random-init** (``--random-init``, off by default; not a real-trace set): traces collected from the
   random-init tiny DeepSeek-V3 preset (humaneval, 64 prompts, 32 new tokens; cached under benchmarks/out/), 2 nodes
   x 4 GPUs, R the smallest positive count making E + R divide over the GPUs, split by request. A random router
   has no real structure: it checks the pipeline, never the targets.

Scoring (every data set): each strategy's held-out rows are scored under SGLang 0.5.23's own dispatch
(``--engine sglang``, the default of ``tracekit place``) and under the ``ideal`` nearest-replica bound, replayed
as deployment steps (:mod:`tracekit.placement.scoring.replay`, H200 profile, 128 decode tokens and 4096 prefill tokens
per DP rank per step): ``step ms`` is the estimated MoE time of a decode step (sum over MoE layers; the prefill
step time is in the JSON), ``step max/mean p50/p99`` the per-step GPU max/mean over the decode steps, ``x-node``
the whole-set cross-node copies per token-layer (normal / low-latency), all under SGLang's dispatch unless the
column says ``ideal``.

Headroom reference (synthetic sets): ``oracle-no-balance:top-use`` and ``oracle-no-balance:partition`` rows, one
per grouping, are NOT strategies (never registered, excluded from the targets): they see the held-out rows and
ignore GPU balance (see :func:`oracle_no_balance`), to show how far placement alone could go on this data.

Usage: ``python benchmarks/bench_placement.py [--tokens 1000000] [--quick] [--only dsv3-synth] [--skip-synth]
[--skip-real] [--dsv2-rows N] [--random-init]``; prints tables, writes
benchmarks/out/bench_placement.json. Generated and collected runs are cached under benchmarks/out/ and reused
when their parameters match.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tracekit.placement import strategies as strat# noqa: E402
from tracekit.placement.scoring.comm import evaluate, route_requests  # noqa: E402
from tracekit.placement.comparison import compare, resolve_strategies  # noqa: E402
from tracekit.placement.data.traces import make_split  # noqa: E402
from tracekit.placement.data.types import make_cluster  # noqa: E402
from tracekit.placement.select import choose, default_scorer, validate  # noqa: E402
from tracekit.placement.data.stats import load_by_group  # noqa: E402
from tracekit.placement.data.types import Placement  # noqa: E402
from tracekit.placement.data.traces import load_traces  # noqa: E402
from tracekit.store import read_manifest  # noqa: E402

OUT = ROOT / "benchmarks" / "out"
SHARED = ROOT.parent / "shared" / "data"
MIXTRAL_FILES = {
    "decode": ["routing_data_collected_humaneval_2_routing.jsonl", "routing_data_collected_gsm8k_2_routing.jsonl"],
    "raw": ["analysis_deep_analysis_routing_raw.jsonl"],
}
EPLB_DSV3 = {"eplb": {"num_groups": 8}}  # DeepSeek V3's n_group: 8 groups on 4 nodes -> hierarchical EPLB
KEYS = ("cross_node_copies_per_token_normal", "cross_node_copies_per_token_lowlat", "gpu_load_max_over_mean",
        "gpu_load_max_over_mean_worst", "node_load_max_over_mean", "distinct_experts_per_microbatch",
        "est_alltoall_ms", "step_time_ms", "step_time_p99_ms", "imbalance_p50", "imbalance_p99",
        "cross_node_bytes_per_step", "tokens_per_step", "full_steps", "prefill_step_time_ms", "prefill_imbalance_p99")
# real-trace geometries (nodes, GPUs per node): Mixtral's 8 experts, then DeepSeek-V2-Lite's 64 (issue 18)
MIXTRAL_GEOS = ((2, 2), (4, 2), (4, 1), (2, 4))
DSV2_GEOS = MIXTRAL_GEOS + ((2, 8), (4, 4), (4, 8))
DSV2_DIR = SHARED / "traces" / "deepseek-v2-lite"
DSV2_SIZES = {"hidden_size": 2048, "moe_intermediate_size": 1408}  # DeepSeek-V2-Lite's config.json
# prefill tokens per DP rank per replay step: the ~58K held-out prompt tokens give 12 full steps on 32 ranks
# (measured; place's default 4096 would leave 4x8 with none)
DSV2_PREFILL_CHUNK = 128
MIXTRAL_OPTS = {"split": "tokens", "hidden_size": 4096, "moe_intermediate_size": 14336,
                "decode_batch": 16}  # ~330 held-out decode tokens: 16 per rank gives a few decode steps
BALANCE_MARGIN = 0.05  # the target's "p99 GPU balance within 5% of eplb's"
ENGINE, OBJECTIVE = "sglang", "step-time"  # what the benchmark scores with and picks by (place's defaults)
ENGINES = ("sglang", "ideal")  # every row is scored under SGLang's own dispatch (compare) and the ideal bound


def ideal_scores(tr, comp, placement) -> dict:
    """The same held-out rows scored under the ``ideal`` dispatch (upper bound): KEYS only."""
    m = comp.meta
    _, test = make_split(tr, m["split"], m["holdout"] or 0.3, m["seed"], m["token_frac"] or 0.5)
    if m["score_phase"] != "all":
        test = test & (tr.phase == {"prefill": 0, "decode": 1}[m["score_phase"]])
    h = evaluate(placement, tr, test, engine="ideal", **dict(m.get("eval_opts") or {}))
    return {k: h.get(k) for k in KEYS}


SYNTH_TOPICS = {"n_group": 8, "topk_group": 4, "topics": 16, "topic_size": 16, "topic_boost": 8.0,
                "topic_alpha": 0.5, "bank_size": 128}


def synth_run(tokens: int, seed: int, extra: dict | None = None) -> tuple[Path, float]:
    from tracekit.store import write_manifest
    from tracekit.synth import generate_run

    extra = extra or {}
    prompt, decode = (64, 512), (32, 512)
    requests = int(np.ceil(tokens / (np.mean(prompt) + np.mean(decode))))
    params = {"requests": requests, "prompt_tokens": list(prompt), "decode_tokens": list(decode), "seed": seed}
    if extra:
        params["extra"] = extra
    path = OUT / (f"synth-dsv3-{requests}r-s{seed}" + ("-groups-topics" if extra else ""))
    m = read_manifest(path) if path.exists() else None
    if m and m.get("status") == "complete" and m.get("args", {}).get("bench_params") == params:
        return path, 0.0
    shutil.rmtree(path, ignore_errors=True)
    t0 = time.perf_counter()
    generate_run(path, num_experts=256, top_k=8, moe_layers=range(3, 61), num_layers=61, requests=requests,
                 prompt_tokens=prompt, decode_tokens=decode, seed=seed, **extra)
    m = read_manifest(path)
    m.setdefault("args", {})["bench_params"] = params
    write_manifest(path, m)
    return path, time.perf_counter() - t0


def tiny_run() -> Path:
    from tracekit.collect import CollectOptions, collect

    path = OUT / "tiny-deepseek-v3-humaneval"
    m = read_manifest(path) if path.exists() else None
    if not (m and m.get("status") == "complete"):
        shutil.rmtree(path, ignore_errors=True)
        collect(CollectOptions(model="tiny-deepseek-v3", dataset="humaneval", limit=64, max_new_tokens=32, out=path))
    return path


def mixtral_runs(tmp: Path) -> list[Path]:
    from tracekit.importers.jsonl import import_jsonl

    d = SHARED / "traces" / "mixtral-8x7b"
    shutil.rmtree(tmp, ignore_errors=True)
    return [import_jsonl([d / f for f in files], model="mixtral-8x7b", out=tmp / name)
            for name, files in MIXTRAL_FILES.items()]


def dsv2_run() -> Path:
    """The DeepSeek-V2-Lite prefill routing imported once (as its README says) and cached under benchmarks/out/."""
    from tracekit.importers.jsonl import import_jsonl

    path = OUT / "dsv2-lite-puffin"
    m = read_manifest(path) if path.exists() else None
    if not (m and m.get("status") == "complete"):
        shutil.rmtree(path, ignore_errors=True)
        import_jsonl([DSV2_DIR / "puffin_2000_prefill_routing.jsonl.gz"], model="deepseek-v2-lite", out=path,
                     phase="prefill", field_map={"weights": ""})
    return path


def redundant_for(num_experts: int, gpus: int) -> int:
    """The smallest positive R making E + R divide over the GPUs."""
    return (-num_experts) % gpus or gpus


def _side(h: dict) -> dict:
    """The held-out numbers the real-trace table reports for one placement."""
    return {"x_node_per_token": h.get("cross_node_copies_per_token_normal"),
            "x_node_bytes_per_step": h.get("cross_node_bytes_per_step"), "step_ms": h.get("step_time_ms"),
            "p99": h.get("imbalance_p99"), "full_steps": int(h.get("full_steps") or 0),
            "step_phase": h.get("step_phase")}


def real_geometry(tr, label: str, nodes: int, gpus_per_node: int, **place_opts) -> dict:
    """``tracekit place RUN --strategy all`` with its defaults at one geometry; the pick against eplb held out.

    ``met``: the pick is eplb, or its held-out cross-node copies per token-layer are <= eplb's with its held-out
    p99 per-step GPU max/mean within ``BALANCE_MARGIN`` of eplb's. A refusal (TracekitError) is recorded, not
    raised: the target says default place never refuses."""
    from tracekit.errors import TracekitError
    from tracekit.placement.select import place

    cluster = {"nodes": nodes, "gpus_per_node": gpus_per_node,
               "redundant": redundant_for(tr.num_experts, nodes * gpus_per_node)}
    out = {"set": label, "geometry": f"{nodes}x{gpus_per_node}", **cluster}
    t0 = time.perf_counter()
    try:
        comp, val = place(tr, cluster, "all", **place_opts)
    except TracekitError as exc:
        return {**out, "refused": str(exc), "met": False, "place_s": time.perf_counter() - t0}
    out["place_s"] = time.perf_counter() - t0
    pick, eplb = _side(comp.row(val.pick)["heldout"]), _side(comp.row("eplb")["heldout"])
    out.update(pick=val.pick, reason=val.reason, pick_heldout=pick, eplb_heldout=eplb,
               validation=val.values, validation_balance=val.balance, refused=None)
    out["vs_eplb"] = {k: _ratio(pick[k], eplb[k]) for k in ("x_node_per_token", "x_node_bytes_per_step", "step_ms")}
    out["x_node_le_eplb"] = bool(pick["x_node_per_token"] <= eplb["x_node_per_token"] * (1 + 1e-12))
    out["p99_within_margin"] = bool(pick["p99"] <= eplb["p99"] * (1 + BALANCE_MARGIN))
    out["met"] = val.pick == "eplb" or (out["x_node_le_eplb"] and out["p99_within_margin"])
    return out


def real_table(rows: list[dict], title: str) -> Table:
    t = Table(title=title)
    for c in ("set", "geom", "R", "pick", "x-node/tok pick", "eplb", "vs", "step ms pick", "eplb", "vs",
              "p99 pick", "eplb", "steps", "met", "place s"):
        t.add_column(c)
    for r in rows:
        if r.get("refused"):
            t.add_row(r["set"], r["geometry"], str(r["redundant"]), "[red]refused[/]", *["-"] * 10, "[red]no[/]",
                      f"{r['place_s']:.0f}")
            continue
        p, e, v = r["pick_heldout"], r["eplb_heldout"], r["vs_eplb"]
        steps = f"{p['full_steps']} {p['step_phase']}" + (" (noisy)" if p["full_steps"] < 10 else "")
        t.add_row(r["set"], r["geometry"], str(r["redundant"]), r["pick"], _f(p["x_node_per_token"], ".4f"),
                  _f(e["x_node_per_token"], ".4f"), _pct(v["x_node_per_token"]), _f(p["step_ms"], ".4f"),
                  _f(e["step_ms"], ".4f"), _pct(v["step_ms"]), _f(p["p99"], ".3f"), _f(e["p99"], ".3f"), steps,
                  "[green]yes[/]" if r["met"] else "[red]no[/]", f"{r['place_s']:.0f}")
    return t


def real_sets(con, result: dict, dsv2_rows: int | None, seed: int) -> None:
    """Every real-trace set at every geometry (see the module docstring); rows, targets into ``result``."""
    sets = []
    if (SHARED / "traces" / "mixtral-8x7b").is_dir():
        sets.append(("mixtral-8x7b", lambda: load_traces(mixtral_runs(OUT / "mixtral-runs")), MIXTRAL_GEOS,
                     {**MIXTRAL_OPTS, "seed": seed}))
    if DSV2_DIR.is_dir():
        sets.append(("deepseek-v2-lite", lambda: load_traces([dsv2_run()], max_rows=dsv2_rows, seed=seed),
                     DSV2_GEOS, {**DSV2_SIZES, "prefill_chunk": DSV2_PREFILL_CHUNK, "seed": seed}))
    rows = []
    for label, load, geos, opts in sets:
        t0 = time.perf_counter()
        tr = load()
        con.print(f"{label}: {len(tr):,} token-layers, {tr.num_requests} requests, E={tr.num_experts}, "
                  f"k={tr.top_k}, loaded in {time.perf_counter() - t0:.1f} s" + (f" (a sample: {tr.sample})"
                                                                                  if tr.sample else ""))
        for nodes, gpn in geos:
            r = real_geometry(tr, label, nodes, gpn, **opts)
            con.print(f"  {label} {r['geometry']} R={r['redundant']}: " + (f"refused: {r['refused']}" if r["refused"]
                      else f"pick {r['pick']} ({r['reason']}), {r['place_s']:.0f} s"), markup=False)
            rows.append(r)
        del tr
    if not rows:
        return
    con.print(real_table(rows, "real traces: tracekit place --strategy all, defaults (engine sglang = the server's "
                               "per-rank tables), the pick vs eplb held out"))
    result["real"] = rows
    result["targets"]["real"] = {
        "pick_x_node_le_eplb_at_p99_within_5pct_or_eplb_every_geometry": all(r["met"] for r in rows),
        "default_place_never_refuses": not any(r["refused"] for r in rows),
        "geometries": len(rows), "met": sum(bool(r["met"]) for r in rows),
        "not_met": [f"{r['set']} {r['geometry']}" for r in rows if not r["met"]],
    }


def summarize(comp, label: str, tr=None) -> list[dict]:
    rows = []
    for r in comp.rows:
        h = r["heldout"]
        rows.append({
            "workload": label, "strategy": r["strategy"], "grouping": r["grouping"],
            "fit_seconds": r["fit_seconds"], "eval_seconds": r.get("eval_seconds"),
            "engine": comp.meta.get("engine"), **{k: h.get(k) for k in KEYS},
            "ideal": ideal_scores(tr, comp, comp.placements[r["strategy"]]) if tr is not None else None,
            "fitted_gpu_load_max_over_mean": (r["fitted"] or {}).get("gpu_load_max_over_mean"),
            "vs_eplb_step_time": r["vs_eplb"].get("step_time_ms"),
            "fitted_gpu_load_max_over_mean_worst": (r["fitted"] or {}).get("gpu_load_max_over_mean_worst"),
            "vs_eplb_normal": r["vs_eplb"]["cross_node_copies_per_token_normal"],
            "vs_linear_normal": r["vs_linear"]["cross_node_copies_per_token_normal"],
        })
    return rows


def _f(x, fmt: str) -> str:
    return "-" if x is None or not np.isfinite(x) else format(x, fmt)


def table(rows: list[dict], title: str) -> Table:
    t = Table(title=title)
    for c in ("", "strategy", "grouping", "fit s", "step ms sglang", "vs eplb", "step ms ideal",
              "p50/p99 sglang", "p50/p99 ideal", "x-node normal", "x-node LL", "fitted worst", "val " + OBJECTIVE):
        t.add_column(c)
    for r in rows:
        i = r.get("ideal") or {}
        t.add_row("*" if r.get("recommended") else "", r["strategy"], r["grouping"], f"{r['fit_seconds']:.2f}",
                  _f(r.get("step_time_ms"), ".4f"), _pct(r.get("vs_eplb_step")) if r.get("vs_eplb_step") is not None else "-",
                  _f(i.get("step_time_ms"), ".4f"),
                  f"{_f(r.get('imbalance_p50'), '.3f')}/{_f(r.get('imbalance_p99'), '.3f')}",
                  f"{_f(i.get('imbalance_p50'), '.3f')}/{_f(i.get('imbalance_p99'), '.3f')}",
                  _f(r["cross_node_copies_per_token_normal"], ".3f"), _f(r["cross_node_copies_per_token_lowlat"], ".3f"),
                  _f(r.get("fitted_gpu_load_max_over_mean_worst"), ".3f"), _f(r.get("validation"), ".4g"))
    return t


def _pct(x) -> str:
    return "-" if x is None or not np.isfinite(x) else f"{100 * x:+.1f}%"


def oracle_layer(U: np.ndarray, slots_per_node: int) -> np.ndarray:
    """(N * slots_per_node,) slot -> expert of one layer from U (N, E) expert use by the requests homed on node n.

    Node n takes the ``slots_per_node`` experts its own requests use most; then each expert on no node (most used
    first) replaces, on the node that loses least by it, that node's least-used entry of an expert held elsewhere
    too, so that every expert appears at least once. Slots of node n: [n * slots_per_node, (n + 1) * ...).
    """
    N, E = U.shape
    on = np.zeros((N, E), dtype=bool)
    on[np.arange(N)[:, None], np.argsort(-U, axis=1, kind="stable")[:, :slots_per_node]] = True
    missing = np.flatnonzero(~on.any(axis=0))
    for e in missing[np.argsort(-U[:, missing].sum(axis=0), kind="stable")]:
        spare = np.where(on & (on.sum(axis=0) > 1)[None, :], U, np.inf)  # (N, E) droppable duplicate entries
        drop = spare.argmin(axis=1)  # (N,) cheapest duplicate of each node
        n = int(np.argmax(U[:, e] - spare[np.arange(N), drop]))
        on[n, drop[n]] = False
        on[n, e] = True
    return np.concatenate([np.flatnonzero(on[n]) for n in range(N)])


def oracle_no_balance(tr, cluster, test: np.ndarray, rule, method: str = "top-use", seed: int = 0) -> Placement:
    """REFERENCE, not a strategy (never registered): how far placement alone could go on this data when it sees
    the held-out rows and ignores balance. Under ``rule`` (the grouping the compared locality row was scored
    with), the held-out requests get the home nodes :func:`comm.evaluate` gives them. Per layer:

    - ``top-use``: each node holds the experts those requests use most (:func:`oracle_layer`); blind to which
      experts a token uses together.
    - ``partition``: locality's own per-layer optimiser (:func:`tracekit.placement.strategies.locality.place_layer`, the
      hypergraph objective with the home node pinned, then locality replicas) run on a sample of the *held-out*
      rows with the load bound and the hot-expert copies switched off, started from ``top-use``'s layout.

    GPU load is not balanced at all in either."""
    from tracekit.placement.strategies.locality import _sample_rows, place_layer
    from tracekit.placement.data.traces import subset

    home_node = route_requests(rule, tr, cluster, test) // cluster.gpus_per_node
    U = load_by_group(tr, home_node, cluster.nodes, mask=test).astype(np.float64)  # (M, N, E)
    spn = cluster.num_slots // cluster.nodes
    se = np.stack([oracle_layer(U[m], spn) for m in range(tr.num_layers)])
    if method == "partition":
        rng = np.random.default_rng(seed)
        held = subset(tr, test)
        samples = _sample_rows(held, 20_000, rng)
        node_of_slot = np.arange(cluster.num_slots) // spn
        for m in range(tr.num_layers):
            init = np.zeros(cluster.num_experts, dtype=np.int64)
            init[se[m][::-1]] = node_of_slot[::-1]  # the first node holding each expert
            X = held.experts[samples[m]].astype(np.int64)
            h = home_node[held.request[samples[m]]].astype(np.int64)
            se[m], _ = place_layer(X, h, U[m], cluster, slack=1e9, item_cap=1e9, rounds=8, rng=rng, init=init)
    elif method != "top-use":
        raise ValueError(method)
    return Placement(cluster, np.asarray(tr.layers), se, f"oracle-no-balance:{method}", grouping=rule,
                     meta={"reference": "sees the held-out rows; ignores GPU balance; not a strategy"})


def oracle_rows(tr, comps: dict, label: str, **kw) -> list[dict]:
    """``oracle-no-balance`` rows (both methods) per grouping, scored on the held-out rows like the strategies."""
    rows = []
    for g, comp in comps.items():
        p_loc = comp.placements["locality"]
        _, test = make_split(tr, kw.get("split", "request"), kw.get("holdout", 0.3), kw.get("seed", 0))
        for method in ("top-use", "partition"):
            t0 = time.perf_counter()
            p = oracle_no_balance(tr, p_loc.cluster, test, p_loc.grouping, method, seed=kw.get("seed", 0))
            build_s = time.perf_counter() - t0
            opts = dict(comp.meta.get("eval_opts") or {})
            h = evaluate(p, tr, test, engine=comp.meta.get("engine", "sglang"), **opts)
            eplb = comp.row("eplb")["heldout"]["cross_node_copies_per_token_normal"]
            lin = comp.row("linear")["heldout"]["cross_node_copies_per_token_normal"]
            eplb_step = comp.row("eplb")["heldout"].get("step_time_ms")
            rows.append({
                "workload": label, "strategy": p.strategy, "grouping": g, "reference_only": True,
                "fit_seconds": build_s, "eval_seconds": None, "engine": comp.meta.get("engine"),
                **{k: h.get(k) for k in KEYS},
                "ideal": ideal_scores(tr, comp, p),
                "vs_eplb_step_time": h["step_time_ms"] / eplb_step - 1 if eplb_step else None,
                "fitted_gpu_load_max_over_mean": None,
                "vs_eplb_normal": h["cross_node_copies_per_token_normal"] / eplb - 1,
                "vs_linear_normal": h["cross_node_copies_per_token_normal"] / lin - 1,
                "vs_eplb_step": _ratio(h.get("step_time_ms"), comp.row("eplb")["heldout"].get("step_time_ms")),
            })
    return rows


def _ratio(x, ref):
    return None if x is None or not ref else x / ref - 1


def run_set(con, result: dict, label: str, tr, cluster: dict, groupings=("domain", "signature"), oracle: bool = False,
            strategy_opts: dict | None = None, max_imbalance: float | None = None, **kw) -> list[dict]:
    """What ``tracekit place`` does, per grouping: validate (fit on part of the train rows, score on the rest,
    per-layer eplb fallback for locality), fit on the train rows, score on the held-out rows under ``ENGINE``;
    every strategy with grouping none, then locality with each grouping. The recommended placement is the pick
    over all of them on validation (:func:`tracekit.placement.select.choose`), marked ``*``; it and eplb are also
    scored under the ``ideal`` dispatch. With ``oracle``, the oracle-no-balance reference rows per grouping."""
    t0 = time.perf_counter()
    cl = make_cluster(tr, **cluster)
    split = {k: kw[k] for k in ("split", "holdout", "seed") if k in kw}
    train, test = make_split(tr, split.get("split", "request"), split.get("holdout", 0.3), split.get("seed", 0))
    eval_opts = {k: v for k, v in kw.items() if k not in split}
    if "hidden_size" not in eval_opts and (tr.geometry or {}).get("hidden_size"):
        eval_opts["hidden_size"] = int(tr.geometry["hidden_size"])
    scorer = default_scorer(ENGINE, **eval_opts)
    base = dict(strategy_opts or {})
    rows, comps, values, balance, where = [], {}, {}, {}, {}
    for g in ("none", *(groupings if "locality" in strat.available() else ())):
        names = resolve_strategies("all", cl) if g == "none" else ["eplb", "locality"]
        opts = {**base, "locality": {**base.get("locality", {}), "engine": ENGINE}}
        tv = time.perf_counter()
        val = validate(tr, cl, names, train, objective=OBJECTIVE, split=split.get("split", "request"),
                       seed=split.get("seed", 0), grouping=g, scorer=scorer, strategy_opts=opts,
                       max_imbalance=max_imbalance)
        result["timings"][f"{label}_validate_{g}_s"] = time.perf_counter() - tv
        opts["locality"]["eplb_layers"] = val.eplb_layers
        comp = compare(tr, cl, names if g == "none" else ["locality"], grouping=g, engine=ENGINE,
                       strategy_opts=opts, max_imbalance=max_imbalance, **split, **eval_opts)
        if g == "none":
            ref_comp = comp
        else:
            comps[g] = comp
        for r in summarize(comp, label, tr):
            if g != "none" and r["strategy"] != "locality":
                continue
            key = r["strategy"] if g == "none" else f"locality+{g}"
            r["validation"] = val.values.get(r["strategy"])
            r["validation_balance"] = val.balance.get(r["strategy"])
            r["locality_eplb_layers"] = len(val.eplb_layers) if r["strategy"] == "locality" else None
            if r["validation"] is not None:
                values[key], balance[key] = r["validation"], val.balance[r["strategy"]]
            where[key] = (comp, r["strategy"])
            rows.append(r)
    pick, reason = choose(values, balance, OBJECTIVE)
    eplb_step = ref_comp.row("eplb")["heldout"].get("step_time_ms")
    for key, r in zip(list(where), rows):
        r["vs_eplb_step"] = _ratio(r.get("step_time_ms"), eplb_step)
        r["recommended"] = key == pick
    result["timings"][f"{label}_compare_s"] = time.perf_counter() - t0
    if oracle and comps:
        t0 = time.perf_counter()
        rows += oracle_rows(tr, comps, label, **split)
        result["timings"][f"{label}_oracle_s"] = time.perf_counter() - t0
    con.print(table(rows, f"{label}: {cluster['nodes']} nodes x {cluster['gpus_per_node']} GPUs, E={tr.num_experts} "
                          f"R={cluster['redundant']}, held-out ({ref_comp.meta['split']} split, "
                          f"{ref_comp.meta['test_token_layers']:,} token-layers), {ENGINE} dispatch"))
    con.print(f"* recommended ({OBJECTIVE}, on validation): {reason}")
    result["rows"] += rows
    result.setdefault("picks", {})[label] = {"pick": pick, "reason": reason, "validation": values,
                                             "validation_balance": balance}
    return rows


def targets(rows: list[dict]) -> dict:
    strategies = [r for r in rows if not r.get("reference_only")]
    rec = next(r for r in strategies if r.get("recommended"))
    eplb = next(r for r in strategies if r["strategy"] == "eplb")
    out = {
        "all_fit_within_60s": all(r["fit_seconds"] <= 60 for r in strategies),
        "max_fit_seconds": max(r["fit_seconds"] for r in strategies),
        "recommended": f"{rec['strategy']}+{rec['grouping']}",
        "recommended_step_ms": rec.get("step_time_ms"), "eplb_step_ms": eplb.get("step_time_ms"),
        "recommended_vs_eplb_step": rec.get("vs_eplb_step"),
        "step_le_eplb": bool(rec["step_time_ms"] <= eplb["step_time_ms"] * (1 + 1e-9)),
        "step_lt_eplb": bool(rec["step_time_ms"] < eplb["step_time_ms"] * (1 - 1e-9)),
        "recommended_p99": rec.get("imbalance_p99"), "eplb_p99": eplb.get("imbalance_p99"),
        "p99_within_5pct": bool(rec["imbalance_p99"] <= 1.05 * eplb["imbalance_p99"]),
    }
    loc = [r for r in strategies if r["strategy"] == "locality" and r["grouping"] != "none"
           and r.get("validation") is not None]
    if loc:  # chosen on validation (objective value, balance within 5% of eplb's); only then read held out
        limit = (1 + BALANCE_MARGIN) * (eplb.get("validation_balance") or np.inf)
        fair = [r for r in loc if (r.get("validation_balance") or np.inf) <= limit] or loc
        best = min(fair, key=lambda r: r["validation"])
        out.update({"best_locality_grouping_on_validation": best["grouping"],
                    "locality_vs_eplb_normal": best["vs_eplb_normal"],
                    "locality_gpu_max_over_mean": best["gpu_load_max_over_mean"]})
    oracle = [r for r in rows if r["strategy"].startswith("oracle-no-balance")]
    if oracle:
        o = min(oracle, key=lambda r: r["step_time_ms"] if r.get("step_time_ms") is not None else np.inf)
        out["oracle_no_balance"] = {"strategy": o["strategy"], "grouping": o["grouping"],
                                    "vs_eplb_normal": o["vs_eplb_normal"], "vs_eplb_step": o.get("vs_eplb_step"),
                                    "gpu_max_over_mean": o["gpu_load_max_over_mean"]}
    return out


def print_targets(con, label: str, t: dict) -> None:
    ok = lambda b: "[green]met[/]" if b else "[red]NOT met[/]"  # noqa: E731
    con.print(f"{label}: recommended {t['recommended']}: held-out step {t['recommended_step_ms']:.4f} ms vs eplb "
              f"{t['eplb_step_ms']:.4f} ({100 * t['recommended_vs_eplb_step']:+.1f}%): <= eplb {ok(t['step_le_eplb'])}; "
              f"p99 step max/mean {t['recommended_p99']:.3f} vs eplb {t['eplb_p99']:.3f} (within 5%: "
              f"{ok(t['p99_within_5pct'])}); fits <= 60 s (max {t['max_fit_seconds']:.1f} s): {ok(t['all_fit_within_60s'])}")
    o = t.get("oracle_no_balance")
    if o:
        con.print(f"  headroom reference {o['strategy']}+{o['grouping']} (sees the held-out rows, ignores balance; "
                  f"not a strategy): step {100 * (o['vs_eplb_step'] or float('nan')):+.1f}%, cross-node "
                  f"{100 * o['vs_eplb_normal']:+.1f}% vs eplb at GPU max/mean {o['gpu_max_over_mean']:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--quick", action="store_true", help="50K tokens, for a smoke run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-synth", action="store_true")
    ap.add_argument("--skip-real", action="store_true", help="skip the real-trace sets (Mixtral, DeepSeek-V2-Lite)")
    ap.add_argument("--dsv2-rows", type=int, default=None,
                    help="read at most this many DeepSeek-V2-Lite token-layers (place's --max-rows: a seeded "
                         "sample of whole prompts); default all 4,992,598")
    ap.add_argument("--random-init", action="store_true",
                    help="also run the random-init tiny model (its own category, not a real-trace set)")
    ap.add_argument("--only", choices=("dsv3-synth", "dsv3-synth-groups-topics"), help="run just this synthetic set")
    args = ap.parse_args()
    tokens = 50_000 if args.quick else args.tokens
    OUT.mkdir(parents=True, exist_ok=True)
    con = Console(width=200)
    result: dict = {"strategies": strat.available(), "rows": [], "timings": {}, "targets": {}, "synthetic": {}}
    split = {"holdout": 0.3, "split": "request", "seed": args.seed}

    sets = () if args.skip_synth else (("dsv3-synth", {}), ("dsv3-synth-groups-topics", SYNTH_TOPICS))
    for label, extra in (s for s in sets if args.only in (None, s[0])):
        path, gen_s = synth_run(tokens, args.seed, extra)
        t0 = time.perf_counter()
        tr = load_traces([path])
        load_s = time.perf_counter() - t0
        n_tok = int(len(tr) / tr.num_layers)
        result["synthetic"][label] = {"run": str(path), "tokens": n_tok, "token_layers": len(tr),
                                      "requests": tr.num_requests, "generator_extra": extra,
                                      "generate_s": gen_s, "load_traces_s": load_s}
        con.print(f"{label}: {n_tok:,} tokens, {len(tr):,} token-layers, {tr.num_requests} requests, "
                  f"generator options {extra or 'default'}; generated in {gen_s:.1f} s (0 = cached), "
                  f"loaded in {load_s:.1f} s")
        rows = run_set(con, result, label, tr, {"nodes": 4, "gpus_per_node": 8, "redundant": 32},
                       strategy_opts=EPLB_DSV3, oracle=True, **split)
        result["targets"][label] = targets(rows)
        print_targets(con, label, result["targets"][label])
        del tr

    if SHARED.is_dir() and not (args.skip_real or args.only):
        real_sets(con, result, args.dsv2_rows, args.seed)

    if args.random_init and not args.only:  # not a real-trace set: its own category, never in the real targets
        tr = load_traces([tiny_run()])
        gpus = 8
        red = (-tr.num_experts) % gpus or gpus
        rows = run_set(con, result, "random-init:tiny-deepseek-v3", tr,
                       {"nodes": 2, "gpus_per_node": 4, "redundant": red},
                       **split, moe_intermediate_size=16,  # the tiny preset's expert FFN width
                       decode_batch=16)  # ~600 held-out decode tokens on 8 ranks: 16 per rank gives ~5 decode steps
        result["random_init_targets"] = targets(rows)

    for label, t in result["targets"].items():
        if label != "real":
            print_targets(con, label, t)
    real = result["targets"].get("real")
    if real:
        ok = lambda b: "[green]met[/]" if b else "[red]NOT met[/]"  # noqa: E731
        con.print(f"real traces ({real['met']}/{real['geometries']} geometries): the pick's held-out cross-node "
                  f"traffic <= eplb's at p99 within 5% of eplb's, or the pick is eplb, on every real geometry: "
                  f"{ok(real['pick_x_node_le_eplb_at_p99_within_5pct_or_eplb_every_geometry'])}"
                  + (f" (not on {', '.join(real['not_met'])})" if real["not_met"] else "")
                  + f"; default place never refuses a real data set: {ok(real['default_place_never_refuses'])}")
    synth = {k: t for k, t in result["targets"].items() if k != "real"}
    result["targets_overall"] = {
        "synthetic_step_le_eplb_every_set": all(t["step_le_eplb"] for t in synth.values()),
        "synthetic_p99_within_5pct_every_set": all(t["p99_within_5pct"] for t in synth.values()),
        "synthetic_all_fit_within_60s": all(t["all_fit_within_60s"] for t in synth.values()),
        **({k: v for k, v in real.items() if k not in ("geometries", "met", "not_met")} if real else {}),
    }
    con.print(f"overall: {result['targets_overall']}")
    (OUT / "bench_placement.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    con.print(f"wrote {OUT / 'bench_placement.json'}")


if __name__ == "__main__":
    main()
