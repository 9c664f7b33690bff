"""Export formats (SGLang, TensorRT-LLM, vLLM, neutral JSON, grouping rule) and their validation."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from tests._cli import cli as _cli
from tracekit.errors import TracekitError
from tracekit.placement import export
from tracekit.placement.strategies import baselines
from tracekit.placement.data.types import Cluster, GroupingRule, Placement


def deepseek_like() -> Placement:
    """DeepSeek V3 geometry (61 hidden layers, MoE layers 3..60, 256 experts) on 4 x 8 GPUs with R=32."""
    c = Cluster(4, 8, 256, 32)
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(58):
        row = np.concatenate([rng.permutation(256), rng.integers(0, 256, 32)])
        rows.append(rng.permutation(row))
    rule = GroupingRule(kind="signature", feature_layers=[3, 4], centroids=np.ones((4, 512), np.float32) / 256,
                        centroid_node=np.array([0, 1, 2, 3]))
    return Placement(c, np.arange(3, 61), np.array(rows), "test", grouping=rule, meta={"num_hidden_layers": 61})


def test_sglang_rows_cover_every_hidden_layer(tmp_path):
    p = deepseek_like()
    notes = export.export(p, "sglang", tmp_path / "s.json")
    d = json.loads((tmp_path / "s.json").read_text())
    assert list(d) == ["physical_to_logical_map"]
    m = np.array(d["physical_to_logical_map"])
    assert m.shape == (61, 288) and 288 % 32 == 0
    assert (m[3:] == p.slot_expert).all()
    assert (m[:3] == np.arange(288) % 256).all()  # dense rows: SGLang's trivial map
    flags = notes[0]
    for f in ("--ep-num-redundant-experts 32", "--ep-size 32", "--nnodes 4", "--init-expert-location"):
        assert f in flags


def test_trtllm_yaml_exact(tmp_path):
    p = deepseek_like()
    export.export(p, "trtllm", tmp_path / "t.yaml")
    d = yaml.safe_load((tmp_path / "t.yaml").read_text())
    assert set(d) == {"num_slots", "layer_updates_per_iter", "initial_global_assignments"}
    assert d["num_slots"] == 288 and d["layer_updates_per_iter"] == 0
    assert sorted(d["initial_global_assignments"]) == list(range(3, 61))
    assert d["initial_global_assignments"][3] == p.slot_expert[0].tolist()
    assert all(len(v) == 288 for v in d["initial_global_assignments"].values())


def test_vllm_picks_closest_strategy_and_says_what_it_cannot_take(tmp_path):
    c = Cluster(2, 2, 8, 4)
    rr = Placement(c, np.array([0, 1]), np.tile(baselines.round_robin_row(c, strict=False), (2, 1)), "round-robin")
    notes = export.export(rr, "vllm", tmp_path / "v.json")
    d = json.loads((tmp_path / "v.json").read_text())
    # closest to round_robin, but vLLM falls back to linear with redundant experts (EPLB on): say so, flag linear
    assert d["closest_strategy"] == "round_robin" and d["expert_placement_strategy"] == "linear"
    assert d["eplb_config"]["num_redundant_experts"] == 4
    assert "--expert-placement-strategy linear" in notes[0]
    assert "loads no static expert map" in d["cannot_take"]
    assert "falls back to linear" in d["cannot_take"]
    c0 = Cluster(2, 2, 8, 0)
    rr0 = Placement(c0, np.array([0, 1]), baselines.round_robin(c0, 2), "round-robin", meta={"n_group": 4})
    assert export.vllm_config(rr0)["expert_placement_strategy"] == "round_robin"
    rr0.meta["n_group"] = 1  # no expert groups: vLLM runs linear
    assert export.vllm_config(rr0)["expert_placement_strategy"] == "linear"
    lin = Placement(c, np.array([0, 1]), baselines.linear(c, 2), "linear")
    assert export.vllm_config(lin)["expert_placement_strategy"] == "linear"


def test_export_to_another_engine_warns_in_one_line(tmp_path):
    c = Cluster(2, 2, 8, 4)
    p = Placement(c, np.array([0, 1]), baselines.linear(c, 2), "linear", meta={"engine": "sglang"})
    assert export.export(p, "sglang", tmp_path / "s.json")[0].startswith("sglang server flags")
    warn = export.export(p, "trtllm", tmp_path / "t.yaml")[0]
    assert warn.startswith("warning:") and "sglang" in warn and "\n" not in warn
    assert export.engine_warning(p, "json") is None


def test_neutral_json_round_trip_and_grouping(tmp_path):
    p = deepseek_like()
    export.save_placement(p, tmp_path / "p.json")
    q = export.load_placement(tmp_path / "p.json")
    assert (q.slot_expert == p.slot_expert).all() and (q.layers == p.layers).all()
    assert q.cluster == p.cluster and q.grouping.kind == "signature"
    assert np.allclose(q.grouping.centroids, p.grouping.centroids)
    export.export(p, "grouping", tmp_path / "g.json")
    g = json.loads((tmp_path / "g.json").read_text())
    assert g["kind"] == "signature" and g["centroid_node"] == [0, 1, 2, 3] and g["feature_layers"] == [3, 4]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda se: se.__setitem__((0, 5), 300), "outside 0..255"),
        (lambda se: se.__setitem__((1, slice(None)), 0), "no slot for expert"),
    ],
)
def test_validation_errors_write_nothing(tmp_path, mutate, message):
    p = deepseek_like()
    mutate(p.slot_expert)
    for fmt in ("sglang", "trtllm", "vllm", "json"):
        with pytest.raises(TracekitError, match=message):
            export.export(p, fmt, tmp_path / f"x.{fmt}")
        assert not (tmp_path / f"x.{fmt}").exists()
    assert list(tmp_path.iterdir()) == []


def test_width_and_layer_checks(tmp_path):
    p = deepseek_like()
    p.slot_expert = p.slot_expert[:, :280]
    with pytest.raises(TracekitError, match="expected 58 MoE layers x 288 slots"):
        export.validate(p)
    q = deepseek_like()
    with pytest.raises(TracekitError, match="beyond the model's 40 hidden layers"):
        export.sglang_map(q, num_hidden_layers=40)


def test_bad_placement_file(tmp_path):
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(TracekitError, match="not a placement"):
        export.load_placement(tmp_path / "bad.json")
    d = export.placement_to_dict(deepseek_like())
    d["cluster"]["nodes"] = 6
    d["cluster"]["gpus_per_node"] = 8
    d["cluster"]["redundant"] = 0
    (tmp_path / "p.json").write_text(json.dumps(d))
    with pytest.raises(TracekitError, match="do not divide over 48 GPUs"):
        export.load_placement(tmp_path / "p.json")




def test_export_json_default_name_is_not_json_json(tmp_path, capsys):
    pl = tmp_path / "placement.json"
    export.save_placement(deepseek_like(), pl)
    code, out, err = _cli(capsys, "export", pl, "--format", "json")
    assert code == 0, err
    assert (tmp_path / "placement.neutral.json").is_file() and not (tmp_path / "placement.json.json").exists()
    assert export.load_placement(tmp_path / "placement.neutral.json").cluster == deepseek_like().cluster
    code, _, err = _cli(capsys, "export", pl, "--format", "sglang")
    assert code == 0 and (tmp_path / "placement.sglang.json").is_file()


def test_export_of_a_run_manifest_says_not_a_placement(tmp_path, capsys):
    from tracekit.synth import generate_run

    run = generate_run(tmp_path / "run", num_experts=8, top_k=2, moe_layers=[0], requests=2, prompt_tokens=2,
                       decode_tokens=1)
    (tmp_path / "run" / "manifest.sglang.json").write_text("{}")  # the default output exists: still the real reason
    for fmt in ("sglang", "json"):
        code, out, err = _cli(capsys, "export", run / "manifest.json", "--format", fmt)
        assert code == 2 and len(err.strip().splitlines()) == 1
        assert "manifest.json: not a placement (a run's manifest" in err and "tracekit place" in err
    assert not (tmp_path / "run" / "manifest.json.json").exists() and not (tmp_path / "run" / "manifest.neutral.json").exists()
    other = tmp_path / "other.json"
    other.write_text('{"format": "something-else"}')
    code, _, err = _cli(capsys, "export", other, "--format", "vllm")
    assert code == 2 and "other.json: not a placement (format 'something-else'" in err


@pytest.mark.parametrize("nodes,gpus,redundant,near", [(2, 2, 3, [0, 4]), (2, 8, 30, [16, 32]), (1, 3, 0, [1])])
def test_a_non_dividing_redundant_suggests_the_nearest_valid_values(nodes, gpus, redundant, near):
    with pytest.raises(TracekitError) as exc:
        Cluster(nodes, gpus, 8 if redundant != 30 else 256, redundant)
    assert str(exc.value).endswith(f"(nearest: --redundant {' or '.join(map(str, near))})")
    for r in near:  # every suggestion is accepted
        Cluster(nodes, gpus, 8 if redundant != 30 else 256, r)


def test_options_named_in_issue_20_have_help():
    from typer.main import get_command

    from tracekit.cli import app

    commands = get_command(app).commands
    for cmd, option in (("info", "--json"), ("place", "--seed"), ("export", "--format")):
        param = next(p for p in commands[cmd].params if option in p.opts)
        assert param.help and len(param.help.split()) >= 5, (cmd, option, param.help)
