"""What `place` and `export` say where what runs differs from what was asked: a grouping that vanishes, what vLLM can
deploy (and the pick made among that only), round-robin's absence from --strategy all with R > 0."""
from __future__ import annotations

import json

import numpy as np
import pytest

from _cli import cli
from tracekit.placement import export
from tracekit.placement.notes import candidates
from tracekit.placement.data.types import Cluster, GroupingRule, Placement
from tracekit.synth import generate_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("notes") / "run"
    generate_run(out, num_experts=8, top_k=2, moe_layers=range(1, 3), num_layers=3, requests=40,
                 prompt_tokens=(8, 16), decode_tokens=(16, 32), seed=3)
    return out


GEO = ["--nodes", "2", "--gpus-per-node", "2", "--redundant", "4", "--decode-batch", "8"]


def test_round_robin_absence_is_one_line(run_dir, capsys):
    code, out, _ = cli(capsys, "place", str(run_dir), *GEO)
    assert code == 0
    lines = [ln for ln in out.splitlines() if ln.startswith("round-robin left out of --strategy all")]
    assert len(lines) == 1 and "R=4" in lines[0] and len(lines[0]) <= 120  # the narrow table's width
    code, out, _ = cli(capsys, "place", str(run_dir), "--nodes", "2", "--gpus-per-node", "2", "--redundant", "0",
                       "--decode-batch", "8")
    assert code == 0 and "round-robin left out" not in out
    assert "round-robin" in out  # R = 0: it is a candidate, in the table


def test_vllm_says_what_it_deploys_and_picks_among_that(run_dir, tmp_path, capsys):
    js = tmp_path / "cmp.json"
    code, out, _ = cli(capsys, "place", str(run_dir), *GEO, "--engine", "vllm", "--json", str(js))
    assert code == 0
    line = next(ln for ln in out.splitlines() if ln.startswith("vllm loads no static expert map"))
    assert "deploys linear, eplb only" in line
    cmp = json.loads(js.read_text())
    assert {r["strategy"] for r in cmp["rows"]} == {"linear", "eplb"}  # locality is not fitted as a candidate
    assert cmp["meta"]["pick"]["pick"] in ("linear", "eplb")
    # the same data under sglang does fit locality: the vllm run left it out, not the data
    code, out, _ = cli(capsys, "place", str(run_dir), *GEO, "--json", str(tmp_path / "s.json"))
    assert code == 0 and "vllm loads" not in out
    assert "locality" in {r["strategy"] for r in json.loads((tmp_path / "s.json").read_text())["rows"]}


def test_vllm_candidates_follow_its_round_robin_rule():
    c0 = Cluster(nodes=2, gpus_per_node=2, num_experts=8, redundant=0)
    names, lines = candidates(["linear", "round-robin", "eplb", "locality"], "all", c0, "vllm", n_group=4)
    assert names == ["linear", "round-robin", "eplb"] and "deploys linear, eplb, round-robin only" in lines[0]
    names, _ = candidates(["linear", "round-robin", "eplb", "locality"], "all", c0, "vllm", n_group=1)
    assert names == ["linear", "eplb"]
    names, lines = candidates(["linear", "eplb", "locality"], "locality", c0, "vllm")
    assert "locality" in names and lines[-1] == "vllm cannot load a locality layout: it is scored for reference only"
    names, lines = candidates(["linear", "eplb", "locality"], "all", c0, "sglang")
    assert names == ["linear", "eplb", "locality"] and lines == []


def test_grouping_that_vanishes_says_so_in_place_and_export(run_dir, tmp_path, capsys):
    pl = tmp_path / "p.json"
    code, out, _ = cli(capsys, "place", str(run_dir), *GEO, "--grouping", "domain", "--strategy", "eplb",
                       "-o", str(pl))
    assert code == 0
    lines = [ln for ln in out.splitlines() if "has no request grouping" in ln]
    assert len(lines) == 1 and "--grouping domain asked, but eplb has no request grouping" in lines[0]
    assert len(lines[0]) <= 120
    code, out, _ = cli(capsys, "export", str(pl), "--format", "grouping", "-o", str(tmp_path / "g.json"))
    assert code == 0
    assert json.loads((tmp_path / "g.json").read_text())["kind"] == "none"
    lines = [ln for ln in out.splitlines() if "has no request grouping" in ln]
    assert len(lines) == 1 and "0 groups" in lines[0] and "--grouping domain asked" in lines[0]


def test_a_grouping_that_holds_prints_no_warning(tmp_path):
    c = Cluster(nodes=2, gpus_per_node=2, num_experts=8, redundant=0)
    rows = np.tile(np.arange(8), (2, 1))
    kept = Placement(c, np.arange(1, 3), rows, "locality", grouping=GroupingRule("domain", {"code": [0], "math": [1]}))
    empty = Placement(c, np.arange(1, 3), rows, "locality", grouping=GroupingRule("domain", {}))
    notes = export.export(kept, "grouping", tmp_path / "a.json")
    assert not any("no request grouping" in n for n in notes)
    assert export.grouping_vanished(empty) and "(rule domain): route starts with 0 groups" in export.grouping_vanished(empty)
    assert export.grouping_vanished(Placement(c, np.arange(1, 3), rows, "eplb")) is not None
