"""`tracekit place RUNS --from DEPLOYED.json`: will re-placing help, and which moves would it take?

Prints the judgement in one line, the moves (the first 20), and with ``-o`` writes the proposed placement and its
move plan beside it (``NAME.moves.json``). Called by :func:`tracekit.cli.place_cmd.place_cmd`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import TracekitError


def moves_path(out: Path) -> Path:
    """The move plan's file beside a placement written to ``out``."""
    return out.with_name(f"{out.stem}.moves.json")


def place_from(traces, deployed_path: Path, *, engine: str, eval_opts: dict[str, Any], max_moves: int | None,
               max_move_gb: float | None, min_gain: float, strategy: str, objective: str, holdout: float, seed: int,
               out: Path | None, json_out: Path | None, force: bool, topology: Path | None) -> None:
    from rich.console import Console

    from ..outputs import check_file
    from ..placement.export import jsonable, load_placement, save_placement
    from ..placement.moves import judgement, replace_within_budget
    from ..atomic import atomic_write_json

    con = Console(width=200, soft_wrap=True)
    deployed = load_placement(deployed_path)
    plan_out = moves_path(out) if out is not None else None
    if plan_out is not None:
        check_file(plan_out, force=force, option="-o (its move plan)")
    cost = None
    if topology is not None:
        from ..placement.scoring.topology import load_topology

        cost = load_topology(topology, deployed.cluster.num_gpus)
    if len(traces) == 0:
        raise TracekitError("--from needs per-token routes to score placements; these runs hold loads only")
    rep = replace_within_budget(deployed, traces, max_moves=max_moves, max_move_gb=max_move_gb, engine=engine,
                                objective=objective, holdout=holdout, seed=seed, strategy=strategy, **eval_opts)
    go, line = judgement(rep, min_gain)
    con.print(line, markup=False)
    con.print(f"unconstrained pick: {100 * rep.proposed_gain:+.1f}% with {rep.proposed_moves} moves "
              f"({rep.proposed_moves * rep.plan.expert_bytes / 1e9:.1f} GB); {rep.metric} deployed "
              f"{rep.deployed_value:.4g}, budgeted {rep.candidate_value if rep.kept else rep.value:.4g}", markup=False)
    extra: dict[str, Any] = {}
    if cost is not None:
        from ..placement.data.traces import make_split
        from ..placement.scoring.topology import weighted_traffic

        _, test = make_split(traces, "request", holdout, seed)
        w_dep = weighted_traffic(deployed, traces, cost, test, engine=engine)
        w_new = weighted_traffic(rep.placement, traces, cost, test, engine=engine)
        extra = {"topology": {"deployed": w_dep, "chosen": w_new}}
        con.print(f"topology cost per token-layer ({topology}): deployed {w_dep['topology_cost_per_token']:.3g}, "
                  f"{'kept' if rep.kept else 'budgeted'} {w_new['topology_cost_per_token']:.3g}", markup=False)
    if go:
        for ln in rep.plan.lines():
            con.print(ln, markup=False)
    if json_out is not None:
        atomic_write_json(json_out, jsonable({"judgement": line, "re_place": go, **rep.to_json(), **extra}))
        con.print(f"wrote {json_out}")
    if out is not None:
        from ..placement.moves import plan_between

        p = rep.placement if go else deployed  # below --min-gain nothing moves
        plan = rep.plan if go else plan_between(deployed, deployed, rep.plan.expert_bytes)
        p.meta["judgement"] = {"re_place": go, "line": line, "min_gain": min_gain, **rep.to_json()}
        p.meta["engine"] = engine
        save_placement(p, out)
        atomic_write_json(plan_out, json.loads(json.dumps(plan.to_json())))
        con.print(f"saved {'the proposed' if go else 'the deployed (kept)'} placement to {out} and its "
                  f"{plan.moves} moves to {plan_out}", markup=False)
