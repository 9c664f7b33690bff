"""`tracekit place RUNS...` (fit and compare placements on held-out traffic) and `tracekit export PLACEMENT`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from . import app


@app.command("place")
def place_cmd(
    runs: List[Path] = typer.Argument(..., help="Run directories (routes; loads runs only for load-only strategies)."),
    nodes: int = typer.Option(4, "--nodes", help="Nodes in the cluster."),
    gpus_per_node: int = typer.Option(8, "--gpus-per-node", help="GPUs per node (EP size = nodes x this)."),
    redundant: int = typer.Option(32, "--redundant", help="Redundant expert slots per layer (R); E + R must divide by the EP size."),
    strategy: str = typer.Option("all", "--strategy", help="linear, round-robin, eplb, locality, or all."),
    grouping: str = typer.Option("none", "--grouping", help="Request grouping: none, domain or signature."),
    holdout: float = typer.Option(0.3, "--holdout", help="Share of requests held out (split request)."),
    split: str = typer.Option("request", "--split", help="request (hold out whole requests) or tokens (fit on each request's first half)."),
    seed: int = typer.Option(0, "--seed"),
    max_imbalance: float = typer.Option(1.10, "--max-imbalance", help="GPU load bound (max/mean) for locality."),
    hidden_size: Optional[int] = typer.Option(None, "--hidden-size", help="Hidden size for bytes (default: geometry, else 7168)."),
    bytes_per_elem: float = typer.Option(1.0, "--bytes-per-elem", help="1 = FP8 dispatch, 2 = BF16."),
    microbatch_tokens: int = typer.Option(256, "--microbatch-tokens", help="Decode tokens per micro-batch."),
    phase: str = typer.Option("all", "--phase", help="Rows to score: all, decode or prefill."),
    baseline_grouping: bool = typer.Option(False, "--baseline-grouping", help="Score baselines under the fitted grouping too."),
    engine: str = typer.Option("sglang", "--engine", help="Whose replica choice scores the placements: sglang, vllm, trtllm or ideal (upper bound)."),
    profile: str = typer.Option("h200", "--profile", help="Hardware profile for the step time: h100, h200 or b200."),
    decode_batch: int = typer.Option(128, "--decode-batch", help="Decode tokens per DP rank per step (replay)."),
    prefill_chunk: int = typer.Option(4096, "--prefill-chunk", help="Prefill tokens per DP rank per step (replay)."),
    moe_intermediate_size: Optional[int] = typer.Option(None, "--moe-intermediate-size", help="Expert FFN width for compute time (default: geometry, else 2048)."),
    tflops: Optional[float] = typer.Option(None, "--tflops", help="Override the profile's dense BF16 TFLOP/s per GPU."),
    nvlink_gbps: Optional[float] = typer.Option(None, "--nvlink-gbps", help="Override the profile's NVLink GB/s per GPU (one way)."),
    rdma_gbps: Optional[float] = typer.Option(None, "--rdma-gbps", help="Override the profile's RDMA GB/s per GPU (one way)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the whole comparison as JSON."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Save the picked placement (or --strategy's) as neutral JSON."),
    objective: str = typer.Option("step-time", "--objective", help="What the pick minimises on validation: step-time, traffic or balance."),
    wide: bool = typer.Option(False, "--wide", help="Print every metric (a table about 210 columns wide)."),
) -> None:
    """Fit placements on a train split, pick one on a validation part of it, score all on held-out requests,
    print the table, save the pick."""
    from rich.console import Console

    from ..errors import TracekitError
    from ..placement.evaluate import compare, render
    from ..placement.export import save_placement
    from ..placement.traces import load_traces
    from ..store import atomic_write_json

    traces = load_traces(runs)
    cluster = {"nodes": nodes, "gpus_per_node": gpus_per_node, "redundant": redundant}
    eval_opts = {"bytes_per_elem": bytes_per_elem, "microbatch_tokens": microbatch_tokens, "profile": profile,
                 "decode_batch": decode_batch, "prefill_chunk": prefill_chunk, "moe_intermediate_size": moe_intermediate_size,
                 "tflops": tflops, "nvlink_gbps": nvlink_gbps, "internode_gbps": rdma_gbps}
    from ..placement.dispatch import check_engine
    from ..placement.hardware import get_profile

    check_engine(engine)
    get_profile(profile, tflops=tflops, nvlink_gbps=nvlink_gbps, rdma_gbps=rdma_gbps)  # one-line error early
    if hidden_size is not None:
        eval_opts["hidden_size"] = hidden_size
    if len(traces) == 0:  # loads-only: fit, no scoring
        from ..placement import strategies as strat
        from ..placement.evaluate import make_cluster

        if strategy == "all" or strategy not in ("linear", "round-robin", "eplb"):
            raise TracekitError("loads-only runs have no token routes: choose --strategy linear, round-robin or eplb")
        p = strat.fit(strategy, traces, make_cluster(traces, **cluster), seed=seed, max_imbalance=max_imbalance)
        p.meta["engine"] = engine
        Console().print(f"{strategy}: fitted on aggregated loads (no per-token routes, so no held-out scoring)")
        if out:
            save_placement(p, out)
            Console().print(f"saved placement to {out}")
        return
    from ..placement.evaluate import make_cluster, make_split, resolve_strategies
    from ..placement.select import check_objective, default_scorer, validate
    from ..placement.table import WIDTH, duplicate_lines, pick_line, render_narrow

    check_objective(objective)
    cl = make_cluster(traces, **cluster)
    names = resolve_strategies(strategy, cl)
    train, _ = make_split(traces, split, holdout, seed)
    opts = {"locality": {"engine": engine}}
    score_opts = dict(eval_opts)
    if "hidden_size" not in score_opts and (traces.geometry or {}).get("hidden_size"):
        score_opts["hidden_size"] = int(traces.geometry["hidden_size"])
    val = validate(traces, cl, names, train, objective=objective, split=split, seed=seed,
                   max_imbalance=max_imbalance, grouping=grouping, strategy_opts=opts,
                   scorer=default_scorer(engine, **score_opts))
    opts["locality"]["eplb_layers"] = val.eplb_layers
    comp = compare(traces, cl, names, grouping=grouping, holdout=holdout, split=split, seed=seed,
                   max_imbalance=max_imbalance, score_phase=phase, baseline_grouping=baseline_grouping,
                   strategy_opts=opts, engine=engine, **eval_opts)
    comp.meta["pick"] = val.to_json()
    comp.meta["engine"] = engine
    if wide:
        Console(width=max(220, Console().width)).print(render(comp))
    else:
        Console(width=WIDTH).print(render_narrow(comp, val.to_json()))
    con = Console(width=WIDTH)
    con.print(pick_line(val.to_json()), markup=False)
    for name, err in val.errors.items():
        con.print(f"  {name} left out of the pick: {err}", markup=False)
    for line in duplicate_lines(comp):
        con.print(line, markup=False)
    if json_out:
        atomic_write_json(json_out, json.loads(json.dumps(comp.to_json(), default=float)))
        con.print(f"wrote {json_out}")
    if out:
        chosen = strategy if strategy != "all" else val.pick
        p = comp.placements[chosen]
        p.meta["heldout"] = {k: v for k, v in comp.row(chosen)["heldout"].items() if not isinstance(v, list)}
        p.meta["pick"] = val.to_json()
        p.meta["engine"] = engine
        save_placement(p, out)
        con.print(f"saved {chosen} placement to {out}" + (" (the pick)" if chosen == val.pick else
                                                          f" (--strategy; the pick was {val.pick})"))


@app.command("export")
def export_cmd(
    placement: Path = typer.Argument(..., help="Placement JSON written by tracekit place -o."),
    fmt: str = typer.Option(..., "--format", help="sglang, trtllm, vllm, json or grouping."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Output file (default: beside the placement)."),
    num_layers: Optional[int] = typer.Option(None, "--num-layers", help="Hidden layers of the model (SGLang rows; default from the traces' geometry)."),
) -> None:
    """Write a placement in a serving engine's format (validated first, written atomically) and print its flags."""
    from rich.console import Console

    from ..placement.export import _suffix, export, load_placement

    p = load_placement(placement)
    out = out or placement.with_name(f"{placement.stem}.{fmt}.{_suffix(fmt)}")
    notes = export(p, fmt, out, num_hidden_layers=num_layers)
    con = Console(width=200, soft_wrap=True)
    con.print(f"wrote {out}")
    for n in notes:
        con.print(n, markup=False)
