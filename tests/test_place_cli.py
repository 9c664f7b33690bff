"""End to end on the real Mixtral-8x7B traces: import -> tracekit place -> tracekit export, plus bad requests."""
from __future__ import annotations

import json
import re

import pytest

from tracekit.importers.jsonl import import_jsonl
from tracekit.placement.data.traces import load_traces, split_requests, split_tokens

from _cli import run_cli

FILES = {  # analysis_deep_analysis_humaneval_1 duplicates the decode rows of routing_raw, so it is left out
    "decode": ["routing_data_collected_humaneval_2_routing.jsonl", "routing_data_collected_gsm8k_2_routing.jsonl"],
    "raw": ["analysis_deep_analysis_routing_raw.jsonl"],
}


@pytest.fixture(scope="module")
def mixtral_runs(shared_data, tmp_path_factory):
    d = shared_data / "traces" / "mixtral-8x7b"
    root = tmp_path_factory.mktemp("mixtral")
    return [
        import_jsonl([d / f for f in files], model="mixtral-8x7b", out=root / name)
        for name, files in FILES.items()
    ]


def test_load_traces_from_real_runs(mixtral_runs):
    tr = load_traces(mixtral_runs)
    assert tr.num_experts == 8 and tr.top_k == 2 and tr.layers.tolist() == list(range(32))
    assert tr.num_requests == 5
    assert sorted(set(tr.request_domain.tolist())) == ["code", "math"]
    assert (tr.phase == 0).sum() > 0 and (tr.phase == 1).sum() > 0  # the raw file carries a prefill
    assert tr.experts.max() < 8 and (tr.experts[:, 0] != tr.experts[:, 1]).all()
    train, test = split_requests(tr, 0.3, seed=0)
    assert not (train & test).any() and (train | test).all()
    assert not set(tr.request[train].tolist()) & set(tr.request[test].tolist())
    a, b = split_tokens(tr)
    assert not (a & b).any() and (tr.phase[b] == 1).all()
    for r in range(tr.num_requests):  # every request is scored on its end, fitted on its beginning
        dec = (tr.request == r) & (tr.phase == 1)
        assert tr.token[dec & a].max() < tr.token[dec & b].min()


def test_place_and_export_end_to_end(mixtral_runs, tmp_path, capsys):
    out, js = tmp_path / "placement.json", tmp_path / "cmp.json"
    rc = run_cli(["place", *mixtral_runs, "--nodes", 2, "--gpus-per-node", 2, "--redundant", 4,
                  "--strategy", "all", "--split", "tokens", "--hidden-size", 4096, "--max-imbalance", 1.3,
                  "--json", js, "-o", out])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "eplb" in printed and "linear" in printed
    assert max(len(line) for line in printed.splitlines()) <= 120  # details behind --wide / --json
    cmp = json.loads(js.read_text())
    names = [r["strategy"] for r in cmp["rows"]]
    assert {"linear", "eplb", "locality"} <= set(names) and "round-robin" not in names  # R=4: no round-robin
    pick = cmp["meta"]["pick"]
    # the pick is never worse than eplb on validation, is marked, and is what -o saved
    assert pick["values"][pick["pick"]] <= pick["values"]["eplb"]
    assert f"* pick: {pick['pick']}" in printed
    assert json.loads(out.read_text())["strategy"] == pick["pick"]
    assert not [ln for ln in printed.splitlines() if "share a GPU" in ln and "locality" in ln]  # no stacked copies
    # locality held --max-imbalance on its fit rows, layer by layer, with no expert twice on one GPU
    loc = next(r for r in cmp["rows"] if r["strategy"] == "locality")
    assert max(loc["fitted"]["gpu_load_max_over_mean_per_layer"]) <= 1.3 + 1e-9 or pick["locality_eplb_layers"]
    for r in cmp["rows"]:
        h = r["heldout"]
        assert 0 < h["cross_node_copies_per_token_normal"] <= h["cross_node_copies_per_token_lowlat"] <= 2
        assert h["gpu_load_max_over_mean"] >= 1.0 and h["bytes_normal"] > 0
        assert r["fitted"]["token_layers"] + h["token_layers"] <= 25445
    assert cmp["rows"][names.index("linear")]["vs_linear"]["cross_node_copies_per_token_normal"] == 0.0
    placed = json.loads(out.read_text())
    assert placed["format"] == "tracekit-placement" and len(placed["slot_expert"]) == 32
    assert all(sorted(set(row)) == list(range(8)) and len(row) == 12 for row in placed["slot_expert"])

    assert run_cli(["export", out, "--format", "sglang", "-o", tmp_path / "s.json"]) == 0
    m = json.loads((tmp_path / "s.json").read_text())["physical_to_logical_map"]
    assert len(m) == 32 and all(len(r) == 12 for r in m)  # Mixtral: 32 hidden layers, all MoE
    assert "--ep-num-redundant-experts 4" in capsys.readouterr().out
    for fmt in ("trtllm", "vllm", "json", "grouping"):
        assert run_cli(["export", out, "--format", fmt, "-o", tmp_path / f"e.{fmt}"]) == 0
        assert (tmp_path / f"e.{fmt}").stat().st_size > 0


def test_locality_stops_when_the_bound_cannot_hold(mixtral_runs, capsys):
    # 5 requests on 4 GPUs: no layout keeps every layer within 1.02 of the mean on the fit rows
    rc = run_cli(["place", *mixtral_runs, "--nodes", 2, "--gpus-per-node", 2, "--redundant", 4,
                  "--strategy", "locality", "--split", "tokens", "--max-imbalance", 1.02])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "cannot hold --max-imbalance 1.02 on its fit rows" in err and "\n" not in err
    need = float(re.search(r"use --max-imbalance ([0-9.]+)", err).group(1))
    assert need > 1.02
    # the bound the refusal names is accepted, and so is every larger one (monotone)
    for bound in (need, need + 0.07):
        assert run_cli(["place", *mixtral_runs, "--nodes", 2, "--gpus-per-node", 2, "--redundant", 4,
                        "--strategy", "locality", "--split", "tokens", "--max-imbalance", bound]) == 0


def test_default_bound_answers_on_real_traces(mixtral_runs, capsys):
    """No --max-imbalance: a placement comes back on every geometry of the real runs (eplb when nothing better
    holds), with the held-out outcome and its step count in the pick line."""
    for nodes, gpn, r in ((2, 2, 4), (4, 2, 0), (4, 1, 4), (2, 4, 8)):
        for split in ("request", "tokens"):
            rc = run_cli(["place", *mixtral_runs, "--nodes", nodes, "--gpus-per-node", gpn, "--redundant", r,
                          "--split", split])
            out = " ".join(capsys.readouterr().out.split())  # the pick line wraps at 120 columns
            assert rc == 0, (nodes, gpn, r, split)
            assert "* pick:" in out and "held out vs eplb" in out and "full " in out


def test_a2a_backend_none_is_one_line(mixtral_runs, capsys):
    rc = run_cli(["place", *mixtral_runs, "--nodes", 2, "--gpus-per-node", 2, "--redundant", 4,
                  "--a2a-backend", "none"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--moe-a2a-backend none refuses --ep-dispatch-algorithm static" in err and "\n" not in err


def test_wide_table_and_objectives(mixtral_runs, tmp_path, capsys):
    for objective in ("traffic", "balance"):
        js = tmp_path / f"{objective}.json"
        assert run_cli(["place", *mixtral_runs, "--nodes", 2, "--gpus-per-node", 2, "--redundant", 4,
                        "--split", "tokens", "--max-imbalance", 1.3, "--objective", objective, "--json", js]) == 0
        pick = json.loads(js.read_text())["meta"]["pick"]
        assert pick["objective"] == objective and pick["values"][pick["pick"]] <= pick["values"]["eplb"]
    capsys.readouterr()
    assert run_cli(["place", *mixtral_runs, "--nodes", 2, "--gpus-per-node", 2, "--redundant", 4,
                    "--split", "tokens", "--max-imbalance", 1.3, "--wide"]) == 0
    assert "intra/tok" in capsys.readouterr().out  # the full metric set


def test_request_split_with_grouping(mixtral_runs, tmp_path):
    js = tmp_path / "cmp.json"
    rc = run_cli(["place", *mixtral_runs, "--nodes", 2, "--gpus-per-node", 2, "--redundant", 4,
                  "--strategy", "eplb", "--grouping", "domain", "--baseline-grouping", "--json", js])
    assert rc == 0
    cmp = json.loads(js.read_text())
    assert cmp["meta"]["test_requests"] >= 1 and cmp["meta"]["train_requests"] >= 1
    assert {r["grouping"] for r in cmp["rows"]} == {"domain"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--nodes", 6, "--gpus-per-node", 8, "--redundant", 0], "do not divide over 48 GPUs"),
        (["--nodes", 2, "--gpus-per-node", 2, "--redundant", 4, "--strategy", "magic"], "unknown strategy"),
        (["--nodes", 2, "--gpus-per-node", 2, "--redundant", 4, "--holdout", 1.5], "--holdout"),
        (["--nodes", 2, "--gpus-per-node", 2, "--redundant", 4, "--grouping", "astrology"], "unknown grouping"),
        (["--nodes", 2, "--gpus-per-node", 2, "--redundant", 4, "--objective", "speed"], "unknown objective"),
        (["--nodes", 2, "--gpus-per-node", 2, "--redundant", 4, "--strategy", "round-robin"], "no redundant slots"),
    ],
)
def test_invalid_requests_exit_2_with_one_line(mixtral_runs, capsys, args, message):
    rc = run_cli(["place", *mixtral_runs, *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and "\n" not in err and "Traceback" not in err


def test_export_of_missing_placement(tmp_path, capsys):
    assert run_cli(["export", tmp_path / "none.json", "--format", "sglang"]) == 2
    assert "no such placement file" in capsys.readouterr().err
