"""Re-placement under a move budget (tracekit.placement.moves), `place --from`, and the topology file."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tracekit.errors import TracekitError
from tracekit.placement import strategies as strat
from tracekit.placement.moves import align, judgement, move_plan, move_units, replace_within_budget
from tracekit.placement.scoring.comm import score_placement
from tracekit.placement.scoring.sizes import model_sizes
from tracekit.placement.scoring.topology import check_matrix, shorthand_matrix, weighted_traffic
from tracekit.placement.data.types import Cluster

from _cli import cli
from _watch_synth import shifted_traces

OPTS = {"decode_batch": 16, "prefill_chunk": 64}


@pytest.fixture(scope="module")
def shift():
    old = shifted_traces(["code"] * 40, num_experts=32, layers=3, seed=1)
    new = shifted_traces(["math"] * 40, num_experts=32, layers=3, seed=2)
    c = Cluster(2, 4, 32, 8)
    return old, new, c, strat.fit("eplb", old, c)


def test_align_keeps_experts_in_place_and_the_gpu_multisets():
    rng = np.random.default_rng(0)
    dep = np.stack([rng.permutation(np.arange(12) % 8) for _ in range(3)])
    prop = dep.copy()
    for m in range(3):  # shuffle within each GPU (3 slots): the same placement up to slot order
        for g in range(4):
            prop[m, 3 * g:3 * g + 3] = rng.permutation(prop[m, 3 * g:3 * g + 3])
    assert (prop != dep).any()
    assert (align(dep, prop, 3) == dep).all()
    prop[0, 0], prop[0, 5] = prop[0, 5], prop[0, 0]  # one real exchange between GPUs 0 and 1
    al = align(dep, prop, 3)
    for m in range(3):
        for g in range(4):
            assert sorted(al[m, 3 * g:3 * g + 3]) == sorted(prop[m, 3 * g:3 * g + 3])
    assert (al != dep).sum() <= (prop != dep).sum()


def test_move_plan_counts_and_bytes():
    dep = np.array([[0, 1, 2, 3], [0, 1, 2, 3]])
    prop = np.array([[0, 2, 1, 3], [0, 1, 2, 3]])
    sizes = model_sizes({"hidden_size": 4096, "moe_intermediate_size": 1024, "expert_dtype": "bfloat16"})
    plan = move_plan(dep, prop, slots_per_gpu=2, expert_bytes=sizes.expert_bytes, layers=np.array([3, 4]))
    assert plan.moves == 2 and plan.per_layer.tolist() == [2, 0]
    assert plan.bytes == 2 * 3 * 4096 * 1024 * 2
    js = plan.to_json()
    assert [(m["layer"], m["slot"], m["gpu"], m["from_expert"], m["to_expert"]) for m in js["moves"]] == \
        [(3, 1, 0, 1, 2), (3, 2, 1, 2, 1)]


def test_move_units_never_lose_an_expert():
    rng = np.random.default_rng(3)
    E, S = 8, 12
    for _ in range(20):
        cur = rng.permutation(np.concatenate([np.arange(E), rng.integers(0, E, S - E)]))
        tgt = rng.permutation(np.concatenate([np.arange(E), rng.integers(0, E, S - E)]))
        units = move_units(cur, tgt, E)
        covered = np.concatenate(units)
        assert set(covered.tolist()) == set(np.flatnonzero(cur != tgt).tolist())
        for u in units:
            lay = cur.copy()
            lay[u] = tgt[u]
            assert np.unique(lay).size == E


def test_budgeted_replacement_holds_the_budget_and_never_loses(shift):
    old, new, c, dep = shift
    free = replace_within_budget(dep, new, **OPTS)
    assert not free.kept and free.gain > 0.05  # the mix moved: re-placing helps
    for k in (1, 4):
        rep = replace_within_budget(dep, new, max_moves=k, **OPTS)
        assert rep.plan.per_layer.max() <= k
        assert rep.value <= rep.deployed_value
        if not rep.kept:  # judged like any placement: the replay under SGLang's tables, on the held-out rows
            assert rep.value < rep.deployed_value
            np.testing.assert_array_equal(rep.plan.slot.size, (rep.placement.slot_expert != dep.slot_expert).sum())
    e_bytes = model_sizes(new.geometry).expert_bytes
    rep = replace_within_budget(dep, new, max_move_gb=5.5 * e_bytes / 1e9, **OPTS)
    assert rep.plan.moves <= 5 and rep.plan.bytes <= 5.5 * e_bytes
    full = score_placement(rep.placement, new, **OPTS)["step_time_ms"]
    assert full <= score_placement(dep, new, **OPTS)["step_time_ms"] + 1e-12


def test_no_budget_keeps_the_deployed_placement(shift):
    old, new, c, dep = shift
    rep = replace_within_budget(dep, new, max_moves=0, **OPTS)
    assert rep.kept and rep.plan.moves == 0 and (rep.placement.slot_expert == dep.slot_expert).all()
    go, line = judgement(rep, 0.05)
    assert not go and line.startswith("keep the deployed placement: predicted gain 0.0% < 5%")


def test_judgement_line(shift):
    old, new, c, dep = shift
    rep = replace_within_budget(dep, new, max_moves=8, **OPTS)
    go, line = judgement(rep, 0.01)
    assert go and line.startswith("re-place: step time -") and f"with {rep.plan.moves} moves" in line
    go, line = judgement(rep, 0.99)
    assert not go and "< 99%" in line


def test_topology_matrix_checks_and_weighting(shift):
    old, new, c, dep = shift
    with pytest.raises(TracekitError, match="square"):
        check_matrix({"rank_cost_matrix": [[0, 1]]}, "t")
    with pytest.raises(TracekitError, match="diagonal"):
        check_matrix({"rank_cost_matrix": [[1, 1], [1, 0]]}, "t")
    with pytest.raises(TracekitError, match="8 GPUs"):
        check_matrix({"rank_cost_matrix": [[0, 1], [1, 0]]}, "t", 8)
    w1 = weighted_traffic(dep, new, shorthand_matrix(2, 4, across=1.0))
    w9 = weighted_traffic(dep, new, shorthand_matrix(2, 4, across=9.0))
    assert w9["topology_cost_per_token"] > w1["topology_cost_per_token"] > 0
    flat = np.ones((8, 8)) - np.eye(8)  # an NVL72-like domain: every other GPU costs the same
    assert weighted_traffic(dep, new, flat)["topology_cost_per_token"] == pytest.approx(
        w1["topology_cost_per_token"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from tracekit.synth import generate_run

    root = tmp_path_factory.mktemp("moves")
    out = {}
    for name, doms in (("old", ["code"]), ("new", ["math"])):
        out[name] = generate_run(root / name, num_experts=32, top_k=4, moe_layers=range(1, 4), requests=40,
                                 prompt_tokens=(16, 24), decode_tokens=(16, 24), domains=doms, seed=0,
                                 domain_shift=3.0, domain_shift_frac=0.5)
    return root, out


def test_place_from_cli(runs, capsys):
    root, r = runs
    dep = root / "dep.json"
    common = ["--nodes", "2", "--gpus-per-node", "4", "--redundant", "8", "--decode-batch", "16",
              "--prefill-chunk", "64"]
    rc, out, err = cli(capsys, "place", str(r["old"]), "--strategy", "eplb", "-o", str(dep), *common)
    assert rc == 0, err
    topo = root / "topo.json"
    topo.write_text(json.dumps({"rank_cost_matrix": shorthand_matrix(2, 4, 5.0).tolist()}))
    rc, out, err = cli(capsys, "place", str(r["new"]), "--from", str(dep), "--max-moves", "3", "--min-gain", "0",
                       "-o", str(root / "new.json"), "--topology", str(topo), *common[6:])
    assert rc == 0, err
    first = out.splitlines()[0]
    assert first.startswith("re-place: step time") or first.startswith("keep the deployed placement")
    plan = json.loads((root / "new.moves.json").read_text())
    assert plan["format"] == "tracekit-move-plan"
    assert all(v <= 3 for v in plan["moves_per_layer"].values())
    assert "topology cost per token-layer" in out
    rc, out, err = cli(capsys, "place", str(r["new"]), "--max-moves", "3", *common)
    assert rc == 2 and "need --from" in err and len(err.strip().splitlines()) == 1
    bad = root / "bad.json"
    bad.write_text('{"rank_cost_matrix": [[0, 1], [1, 1]]}')
    rc, out, err = cli(capsys, "place", str(r["new"]), "--from", str(dep), "--topology", str(bad), *common[6:])
    assert rc == 2 and "diagonal" in err and len(err.strip().splitlines()) == 1
