"""`tracekit place RUNS...` (fit and compare placements on held-out traffic) and `tracekit export PLACEMENT`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Literal, Optional

import typer

from ..outputs import check_file, distinct
from . import app
from ._params import MAX_EXPERTS, MAX_LAYERS, MAX_SEED, check_runs, force_option, positive_float

#: default --max-rows: ~16M token-layer rows are ~300 MB of placement arrays (k=8) and fit the fit, the validation
#: folds and the replay in a few GB; a larger run is placed from a random sample of whole requests (stated)
MAX_ROWS = 16_000_000


@app.command("place")
def place_cmd(
    runs: List[Path] = typer.Argument(..., help="Run directories (routes; loads runs only for load-only strategies)."),
    nodes: int = typer.Option(4, "--nodes", min=1, max=4096, help="Nodes in the cluster."),
    gpus_per_node: int = typer.Option(8, "--gpus-per-node", min=1, max=64, help="GPUs per node (EP size = nodes x this)."),
    redundant: int = typer.Option(32, "--redundant", min=0, max=MAX_EXPERTS, help="Redundant expert slots per layer (R); E + R must divide by the EP size."),
    strategy: Literal["linear", "round-robin", "eplb", "locality", "all"] = typer.Option("all", "--strategy", help="Placement strategy."),
    grouping: Literal["none", "domain", "signature"] = typer.Option("none", "--grouping", help="Request grouping."),
    holdout: float = typer.Option(0.3, "--holdout", callback=positive_float("--holdout", 0.99), help="Share of requests held out (split request), in (0, 0.99]."),
    split: Literal["request", "tokens"] = typer.Option("request", "--split", help="request (hold out whole requests) or tokens (fit on each request's first half)."),
    seed: int = typer.Option(0, "--seed", min=0, max=MAX_SEED, help="Seed of the train/held-out split, the row sample (--max-rows) and the strategies' own randomness: the same seed gives the same placement."),
    max_rows: int = typer.Option(MAX_ROWS, "--max-rows", min=1, max=1 << 40, help="Read at most this many token-layer rows: beyond it, a seeded random sample of whole requests (said in the output)."),
    max_imbalance: Optional[float] = typer.Option(None, "--max-imbalance", min=1.0, max=1e6, help="Absolute GPU load bound (max/mean per layer, fit rows, the engine's tables) for locality. Default: relative to eplb (each layer within 2.5% of eplb's on the same fit rows, the pick within 2.5% of eplb's p99 on validation), so that held out it stays within 5%."),
    hidden_size: Optional[int] = typer.Option(None, "--hidden-size", min=1, max=1 << 20, help="Model hidden size (default: the runs' geometry, else 7168, said in an 'assumed' line)."),
    bytes_per_elem: float = typer.Option(1.0, "--bytes-per-elem", callback=positive_float("--bytes-per-elem", 16.0), help="1 = FP8 dispatch, 2 = BF16."),
    microbatch_tokens: int = typer.Option(256, "--microbatch-tokens", min=1, max=1 << 24, help="Decode tokens per micro-batch."),
    phase: Literal["all", "decode", "prefill"] = typer.Option("all", "--phase", help="Rows to score."),
    baseline_grouping: bool = typer.Option(False, "--baseline-grouping", help="Score baselines under the fitted grouping too."),
    engine: Literal["sglang", "vllm", "trtllm", "ideal"] = typer.Option("sglang", "--engine", help="Whose replica choice scores the placements: sglang, vllm, trtllm or ideal (upper bound)."),
    a2a_backend: str = typer.Option("deepep", "--a2a-backend", help="SGLang's --moe-a2a-backend (--engine sglang): deepep and every other a2a backend build the same per-rank tables; none is refused (no per-token dispatch)."),
    profile: Literal["h100", "h200", "b200"] = typer.Option("h200", "--profile", help="Hardware profile for the step time: h100, h200 or b200."),
    gpu_spec: Optional[Path] = typer.Option(None, "--gpu-spec", help='Another GPU as JSON {"name", "tflops", "hbm_gbps", "nvlink_gbps", "rdma_gbps"} (replaces --profile).'),
    decode_batch: int = typer.Option(128, "--decode-batch", min=1, max=1 << 20, help="Decode tokens per DP rank per step (replay)."),
    prefill_chunk: int = typer.Option(4096, "--prefill-chunk", min=1, max=1 << 24, help="Prefill tokens per DP rank per step (replay)."),
    moe_intermediate_size: Optional[int] = typer.Option(None, "--moe-intermediate-size", min=1, max=1 << 20, help="Expert FFN width (default: the runs' geometry, else 2048, said in an 'assumed' line)."),
    expert_dtype: Optional[str] = typer.Option(None, "--expert-dtype", help="Dtype of the expert weights (bfloat16, float8_e4m3fn, mxfp4, ...; default: the runs' geometry, else bfloat16)."),
    tflops: Optional[float] = typer.Option(None, "--tflops", callback=positive_float("--tflops", 1e6), help="Override the profile's dense BF16 TFLOP/s per GPU."),
    hbm_gbps: Optional[float] = typer.Option(None, "--hbm-gbps", callback=positive_float("--hbm-gbps", 1e6), help="Override the profile's HBM GB/s per GPU."),
    nvlink_gbps: Optional[float] = typer.Option(None, "--nvlink-gbps", callback=positive_float("--nvlink-gbps", 1e6), help="Override the profile's NVLink GB/s per GPU (one way)."),
    rdma_gbps: Optional[float] = typer.Option(None, "--rdma-gbps", callback=positive_float("--rdma-gbps", 1e6), help="Override the profile's RDMA GB/s per GPU (one way)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the whole comparison as JSON."),
    force: bool = force_option("the -o and --json files"),
    allow_partial: bool = typer.Option(False, "--allow-partial", help="Read the intact chunks of a damaged run (one warning per skipped chunk)."),
    classifier_data: Optional[List[str]] = typer.Option(None, "--classifier-data", help="FILE:FIELD:DOMAIN prompt sets for the grouping classifier when the runs' prompts are not readable (repeatable)."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Save the picked placement (or --strategy's) as neutral JSON."),
    objective: Literal["step-time", "traffic", "balance"] = typer.Option("step-time", "--objective", help="What the pick minimises on validation: step-time, traffic or balance."),
    wide: bool = typer.Option(False, "--wide", help="Print every metric (a table about 210 columns wide)."),
    deployed: Optional[Path] = typer.Option(None, "--from", help="The deployed placement (JSON of place -o): judge re-placing it on these runs' rows, within --max-moves / --max-move-gb."),
    max_moves: Optional[int] = typer.Option(None, "--max-moves", min=0, max=1 << 20, help="With --from: at most this many slots changed per layer."),
    max_move_gb: Optional[float] = typer.Option(None, "--max-move-gb", min=0.0, max=1e9, help="With --from: at most this many GB of expert copies in all."),
    min_gain: float = typer.Option(0.05, "--min-gain", min=0.0, max=1.0, help="With --from: re-place only when the predicted step time drops by at least this share."),
    topology: Optional[Path] = typer.Option(None, "--topology", help='GPU-to-GPU costs {"rank_cost_matrix": [[...]]} (SGLang\'s topology JSON): report the traffic they weight.'),
) -> None:
    """Fit placements on a train split, pick one on a validation part of it, score all on held-out requests,
    print the table, save the pick."""
    from rich.console import Console

    from ..errors import TracekitError
    from ..placement.comparison import render
    from ..placement.export import save_placement
    from ..placement.data.traces import load_traces
    from ..atomic import atomic_write_json

    for option, target in (("-o", out), ("--json", json_out)):
        if target is not None:
            check_file(target, force=force, option=option)
    distinct(("-o", out), ("--json", json_out))
    check_runs(runs)
    runs = expand_runs(runs)
    if topology is not None:  # one line for a bad file before any work
        from ..placement.scoring.topology import load_topology

        load_topology(topology)
    from ..progress import task
    from .query_cmd import partial_reads_cli

    with partial_reads_cli(allow_partial), task(f"place: reading {len(runs)} run{'s' if len(runs) != 1 else ''}"):
        traces = load_traces(runs, max_rows=max_rows, seed=seed)
    cluster = {"nodes": nodes, "gpus_per_node": gpus_per_node, "redundant": redundant}
    eval_opts = {"bytes_per_elem": bytes_per_elem, "microbatch_tokens": microbatch_tokens, "profile": profile,
                 "decode_batch": decode_batch, "prefill_chunk": prefill_chunk, "moe_intermediate_size": moe_intermediate_size,
                 "expert_dtype": expert_dtype, "tflops": tflops, "hbm_gbps": hbm_gbps, "nvlink_gbps": nvlink_gbps,
                 "internode_gbps": rdma_gbps}
    from ..placement.scoring.dispatch import check_a2a_backend, check_engine
    from ..placement.scoring.hardware import get_profile, load_gpu_spec
    from ..placement.scoring.sizes import assumed_line, model_sizes

    check_engine(engine)
    if engine == "sglang":
        eval_opts["a2a_backend"] = check_a2a_backend(a2a_backend)
    if gpu_spec is not None:  # the file's GPU, every rate given (so the name needs no built-in profile)
        spec = load_gpu_spec(gpu_spec)
        eval_opts.update(profile=spec.name, tflops=tflops or spec.tflops, hbm_gbps=hbm_gbps or spec.hbm_gbps,
                         nvlink_gbps=nvlink_gbps or spec.nvlink_gbps, internode_gbps=rdma_gbps or spec.rdma_gbps)
    get_profile(eval_opts["profile"], tflops=eval_opts["tflops"], hbm_gbps=eval_opts["hbm_gbps"],
                nvlink_gbps=eval_opts["nvlink_gbps"], rdma_gbps=eval_opts["internode_gbps"])  # one-line error early
    sizes = model_sizes(traces.geometry, hidden_size=hidden_size, moe_intermediate_size=moe_intermediate_size,
                        expert_dtype=expert_dtype)  # one-line error for a bad --expert-dtype, before any work
    if hidden_size is not None:
        eval_opts["hidden_size"] = hidden_size
    from ..placement.data.traces import describe_zero

    zero_line = describe_zero(traces)
    if zero_line:
        Console().print(zero_line, markup=False, soft_wrap=True)  # one line, whatever the terminal's width
    if deployed is not None:  # re-placement of a running deployment (tracekit/cli/place_from.py)
        from .place_from import place_from

        return place_from(traces, deployed, engine=engine, eval_opts=eval_opts, max_moves=max_moves,
                          max_move_gb=max_move_gb, min_gain=min_gain, strategy=strategy, objective=objective,
                          holdout=holdout, seed=seed, out=out, json_out=json_out, force=force, topology=topology)
    if max_moves is not None or max_move_gb is not None:
        raise TracekitError("--max-moves and --max-move-gb need --from DEPLOYED.json (the placement to move from)")
    if len(traces) == 0:  # loads-only: fit, no scoring
        from ..placement import strategies as strat
        from ..placement.data.types import make_cluster

        if strategy == "all" or strategy not in ("linear", "round-robin", "eplb"):
            raise TracekitError("loads-only runs have no token routes: choose --strategy linear, round-robin or eplb")
        p = strat.fit(strategy, traces, make_cluster(traces, **cluster), seed=seed, max_imbalance=max_imbalance)
        p.meta["engine"] = engine
        Console().print(f"{strategy}: fitted on aggregated loads (no per-token routes, so no held-out scoring)")
        if out:
            save_placement(p, out)
            Console().print(f"saved placement to {out}")
        return
    from ..placement.data.traces import describe_input

    Console().print(describe_input(traces), markup=False)
    assumed = assumed_line(sizes, traces.geometry)
    if assumed:
        Console().print(assumed, markup=False, soft_wrap=True)  # one line, whatever the terminal's width
    from ..placement.select import place
    from ..placement.scoring.table import WIDTH, duplicate_lines, pick_line, render_narrow

    from threadpoolctl import threadpool_limits

    from ..placement.strategies.classifier import attach_classifiers, describe

    with task("place: splitting the requests") as bar:  # place() says each stage on this bar
        comp, val = place(traces, cluster, strategy, objective=objective, engine=engine, grouping=grouping,
                          holdout=holdout, split=split, seed=seed, max_imbalance=max_imbalance, phase=phase,
                          baseline_grouping=baseline_grouping, **eval_opts)
        bar.describe("place: fitting the grouping classifiers")
        with threadpool_limits(limits=1, user_api="blas"):  # as in place(): the same bytes whatever OMP_NUM_THREADS
            clf_summary = attach_classifiers(comp, traces, runs, classifier_data or [], seed=seed)
    if wide:
        Console(width=max(220, Console().width)).print(render(comp))
    else:
        Console(width=WIDTH).print(render_narrow(comp, val.to_json()))
    con = Console(width=WIDTH)
    for line in comp.meta.get("notes") or []:
        con.print(line, markup=False, soft_wrap=True)  # one line each, whatever the terminal's width
    con.print(pick_line(val.to_json(), comp), markup=False)
    for name, err in val.errors.items():
        con.print(f"  {name} left out of the pick: {err}", markup=False)
    for line in duplicate_lines(comp):
        con.print(line, markup=False)
    from ..placement.notes import grouping_line

    chosen = strategy if strategy != "all" else val.pick
    vanished = grouping_line(grouping, comp.placements[chosen])
    if vanished:
        con.print(vanished, markup=False, soft_wrap=True)
    for line in describe(clf_summary):
        con.print(line, markup=False)
    if topology is not None:
        from ..placement.scoring.topology import topology_lines

        for line in topology_lines(comp, traces, topology, engine):
            con.print(line, markup=False)
    if json_out:
        from ..placement.export import jsonable, without_timings  # NaN/inf -> null: the file stays strict JSON

        atomic_write_json(json_out, without_timings(jsonable(json.loads(json.dumps(comp.to_json(), default=float)))))
        con.print(f"wrote {json_out}")
    if out:
        p = comp.placements[chosen]
        p.meta["heldout"] = {k: v for k, v in comp.row(chosen)["heldout"].items() if not isinstance(v, list)}
        p.meta["pick"] = val.to_json()
        p.meta["engine"] = engine
        if engine == "sglang":
            p.meta["a2a_backend"] = a2a_backend
        if grouping != "none":
            p.meta["grouping_asked"] = grouping
        save_placement(p, out)
        con.print(f"saved {chosen} placement to {out}" + (" (the pick)" if chosen == val.pick else
                                                          f" (--strategy; the pick was {val.pick})"))


def expand_runs(runs: List[Path]) -> List[Path]:
    """The run directories named by ``runs`` as ``query``/``analyze``/``report`` read them (globs, folders of runs:
    :func:`tracekit.query.resolve_runs`), in the order given (a glob's matches sorted), each once. A name that is a
    run directory stays as typed; one that matches nothing is the same one line as in those commands."""
    import glob

    from ..query import resolve_runs
    from ..store import MANIFEST

    out: List[Path] = []
    for r in runs:
        if not glob.has_magic(str(r)) and ((r / MANIFEST).is_file() or not r.is_dir()):
            found = [r]  # a run directory as typed (a missing one: load_traces's own line, as before)
        else:
            found = [run.path for run in resolve_runs(r)]
        out += [f for f in found if f not in out]
    return out


@app.command("export")
def export_cmd(
    placement: Path = typer.Argument(..., help="Placement JSON written by tracekit place -o."),
    fmt: Literal["sglang", "trtllm", "vllm", "json", "grouping"] = typer.Option(..., "--format", help="Target format (json: the neutral placement, validated and compact)."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Output file (default: beside the placement, e.g. placement.sglang.json; json: placement.neutral.json)."),
    force: bool = force_option("the output file"),
    num_layers: Optional[int] = typer.Option(None, "--num-layers", min=1, max=MAX_LAYERS, help="Hidden layers of the model (SGLang rows; default from the traces' geometry)."),
) -> None:
    """Write a placement in a serving engine's format (validated first, written atomically) and print its flags."""
    from rich.console import Console

    from ..placement.export import default_export_path, export, load_placement

    p = load_placement(placement)  # first: a file that is no placement says so, whatever the output path
    out = out or default_export_path(placement, fmt)
    check_file(out, force=force, option="-o")
    notes = export(p, fmt, out, num_hidden_layers=num_layers)
    con = Console(width=200, soft_wrap=True)
    con.print(f"wrote {out}")
    for n in notes:
        con.print(n, markup=False)
