"""Every number an importer reads is checked against its column and the geometry: one line naming file:line (or the
record), exit 2, nothing written. Table-driven over the JSONL, routed-experts, SGLang and TensorRT-LLM importers."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from test_import_engines import (E, GEO_FLAGS, K, NUM_LAYERS, PerTokenDump, assert_failed_cleanly, cli,
                                 sglang_response, standard_records, trtllm_dump)
from tracekit.jsonlines import loads_strict

GOOD = {"dataset": "gsm8k", "problem_id": 0, "layer": 3, "experts": [7, 0], "gating_probs": [0.75, 0.25], "token_idx": 5}

# (case id, field -> raw JSON text of its value, extra CLI flags, what the one-line error must say)
JSONL_CASES = [
    ("position_past_uint32", {"token_idx": str(2**32 + 5)}, [], "outside 0..2147483646"),
    ("position_negative", {"token_idx": "-1"}, [], "outside 0..2147483646"),
    ("position_bool", {"token_idx": "true"}, [], "must be an integer"),
    ("position_fraction", {"token_idx": "5.5"}, [], "must be an integer"),
    ("position_huge", {"token_idx": "1" * 400}, [], "outside 0.."),
    ("layer_past_int16", {"layer": "40000"}, [], "outside 0..32767"),
    ("expert_2_40", {"experts": f"[{2**40}, 0]"}, [], "outside 0..65535"),
    ("expert_negative", {"experts": "[-1, 0]"}, [], "outside 0..65535"),
    ("expert_bool", {"experts": "[true, 0]"}, [], "must be an integer"),
    ("expert_past_num_experts", {"experts": "[9, 0]"}, ["--num-experts", "8"], "outside 0..7"),
    ("weight_nan", {"gating_probs": "[NaN, 0.25]"}, [], "NaN is not a JSON number"),
    ("weight_infinity", {"gating_probs": "[0.75, Infinity]"}, [], "Infinity is not a JSON number"),
    ("weight_overflow", {"gating_probs": "[1e999, 0.25]"}, [], "out of range"),
    ("weight_past_float16", {"gating_probs": "[70000.0, 0.25]"}, ["--weight-dtype", "float16"], "not a finite float16"),
    ("weight_string", {"gating_probs": '["0.75", 0.25]'}, [], "must be a number"),
    ("request_list", {"problem_id": "[1, 2, 3]"}, [], "must be a string or an integer"),
    ("request_bool", {"problem_id": "false"}, [], "must be a string or an integer"),
    ("dataset_list", {"dataset": "[1, 2, 3]"}, [], "must be a string or an integer"),
]


def _jsonl_line(fields: dict[str, str]) -> str:
    parts = [f"{json.dumps(k)}: {fields.get(k, json.dumps(v))}" for k, v in GOOD.items()]
    return "{" + ", ".join(parts) + "}"


@pytest.mark.parametrize("case,fields,flags,needle", JSONL_CASES, ids=[c[0] for c in JSONL_CASES])
def test_jsonl_numbers(tmp_path, capsys, case, fields, flags, needle):
    f = tmp_path / "trace.jsonl"
    f.write_text(_jsonl_line({}) + "\n" + _jsonl_line(fields) + "\n")
    out = tmp_path / "run"
    code, _, err = cli(capsys, "import", "jsonl", str(f), "--model", "m", "--out", str(out), *flags)
    assert_failed_cleanly(code, err, out, needle)
    assert f"{f}:2:" in err, err


def test_jsonl_good_line_imports(tmp_path, capsys):
    """The table's base record is valid: the failures above come from the one field each case changes."""
    f = tmp_path / "trace.jsonl"
    f.write_text(_jsonl_line({}) + "\n" + _jsonl_line({"token_idx": str(2**31 - 2)}) + "\n")
    code, _, err = cli(capsys, "import", "jsonl", str(f), "--model", "m", "--out", str(tmp_path / "run"))
    assert code == 0, err


# ------------------------------------------------------------------------------------------------------------
# routed experts (wrapped SGLang responses)
# ------------------------------------------------------------------------------------------------------------
def _wrapped(mutate) -> str:
    resp, _ = sglang_response(np.random.default_rng(1), 4, 3)
    obj = {"prompt_id": "p0", "domain": "code", "response": resp}
    mutate(obj)
    return json.dumps(obj)


ROUTED_CASES = [
    ("prompt_start_2_31", lambda o: o.update(routed_experts_prompt_start=2**31), "outside 0..2147483647"),
    ("prompt_start_bool", lambda o: o.update(routed_experts_prompt_start=True), "must be an integer"),
    ("prompt_start_past_prompt", lambda o: o.update(routed_experts_prompt_start=2**31 - 3), "past the prompt's 4"),
    ("prompt_tokens_string", lambda o: o["response"]["meta_info"].update(prompt_tokens="4"), "must be an integer"),
    ("prompt_tokens_negative", lambda o: o["response"]["meta_info"].update(prompt_tokens=-4), "outside 0.."),
    ("prompt_id_list", lambda o: o.update(prompt_id=[1, 2, 3]), "must be a string or an integer"),
    ("domain_list", lambda o: o.update(domain=["code"]), "must be a string or an integer"),
    ("output_id_past_int32", lambda o: o["response"].update(output_ids=[2**32 + 5, 1, 2]), "outside 0..2147483647"),
    ("output_id_bool", lambda o: o["response"].update(output_ids=[True, 1, 2]), "must be an integer"),
    ("expert_2_40_nested", lambda o: o["response"]["meta_info"].update(
        routed_experts=[[[2**40, 0]] * NUM_LAYERS] * 6), "expert ids outside"),
    ("expert_bool_nested", lambda o: o["response"]["meta_info"].update(
        routed_experts=[[[True, False]] * NUM_LAYERS] * 6), "expected (tokens, layers, top_k) ints"),
]


@pytest.mark.parametrize("case,mutate,needle", ROUTED_CASES, ids=[c[0] for c in ROUTED_CASES])
def test_routed_experts_numbers(tmp_path, capsys, case, mutate, needle):
    f = tmp_path / "r.jsonl"
    f.write_text(_wrapped(lambda o: None) + "\n" + _wrapped(mutate) + "\n")
    out = tmp_path / "run"
    code, _, err = cli(capsys, "import", "routed-experts", str(f), "--out", str(out), *GEO_FLAGS)
    assert_failed_cleanly(code, err, out, needle)
    assert f"{f}:2" in err, err


def test_routed_experts_nan_line(tmp_path, capsys):
    f = tmp_path / "r.jsonl"
    f.write_text(_wrapped(lambda o: None) + "\n" + _wrapped(lambda o: o.update(score=0.5)).replace("0.5", "NaN") + "\n")
    out = tmp_path / "run"
    code, _, err = cli(capsys, "import", "routed-experts", str(f), "--out", str(out), *GEO_FLAGS)
    assert_failed_cleanly(code, err, out, f"{f}:2: NaN is not a JSON number")


# ------------------------------------------------------------------------------------------------------------
# SGLang dumps
# ------------------------------------------------------------------------------------------------------------
def _set(i: int, key: str, value):
    def mutate(recs):
        recs[i][key] = value
    return mutate


SGLANG_CASES = [
    ("forward_mode_string", _set(0, "forward_mode", "1"), "forward_mode must be an integer"),
    ("forward_mode_text", _set(0, "forward_mode", "extend"), "forward_mode must be an integer"),
    ("rank_string", _set(1, "rank", "0"), "rank must be an integer"),
    ("forward_pass_id_float", _set(1, "forward_pass_id", 1.5), "forward_pass_id must be an integer"),
    ("extend_seq_lens_strings", _set(0, "extend_seq_lens", ["3", "4"]), "extend_seq_lens[0] must be an integer"),
    ("extend_seq_lens_negative", _set(0, "extend_seq_lens", [-1, 8]), "outside 0.."),
    ("position_past_uint32", _set(1, "positions", torch.tensor([2**32 + 5])), "positions holds 4294967301"),
    ("position_negative", _set(1, "positions", torch.tensor([-3])), "positions holds -3"),
    ("input_id_past_int32", _set(1, "input_ids", torch.tensor([2**31])), "input_ids holds 2147483648"),
    ("positions_float", _set(1, "positions", torch.tensor([3.0])), "expected integers"),
]


@pytest.mark.parametrize("case,mutate,needle", SGLANG_CASES, ids=[c[0] for c in SGLANG_CASES])
def test_sglang_per_token_numbers(tmp_path, capsys, case, mutate, needle):
    d = PerTokenDump(seed=4)
    recs = standard_records(d)
    mutate(recs)
    f = d.save(tmp_path / "expert_distribution_recorder_1.0_0.pt", recs)
    out = tmp_path / "run"
    code, _, err = cli(capsys, "import", "sglang-per-token", str(f), "--out", str(out), *GEO_FLAGS)
    assert_failed_cleanly(code, err, out, needle)
    assert "record" in err, err


@pytest.mark.parametrize("value,needle", [(-1, "holds -1, outside 0.."), (2**62, "outside 0..9007199254740992")])
def test_sglang_stat_counts(tmp_path, capsys, value, needle):
    lc = torch.ones((2, NUM_LAYERS, E), dtype=torch.int64)
    lc[1, 2, 3] = value
    f = tmp_path / "expert_distribution_recorder_1.0.pt"
    torch.save({"rank": 0, "logical_count": lc}, str(f))
    out = tmp_path / "run"
    code, _, err = cli(capsys, "import", "sglang-stat", str(f), "--out", str(out), *GEO_FLAGS)
    assert_failed_cleanly(code, err, out, needle)


# ------------------------------------------------------------------------------------------------------------
# TensorRT-LLM statistics
# ------------------------------------------------------------------------------------------------------------
def _negative_count(d):
    from safetensors.torch import save_file

    c = torch.ones(E, dtype=torch.int64)
    c[3] = -5
    save_file({"100_1": c}, str(d / "rank2.safetensors"))


def _far_iteration(d):
    from safetensors.torch import save_file

    save_file({f"{2**40}_1": torch.ones(E, dtype=torch.int64)}, str(d / "rank2.safetensors"))


TRTLLM_CASES = [
    ("negative_count", _negative_count, "holds -5, outside 0.."),
    ("far_iteration", _far_iteration, "windows; is a key's iteration number wrong?"),
    ("meta_experts_bool", lambda d: (d / "meta_info.json").write_text('{"num_experts": true}'), "must be an integer"),
    ("meta_experts_2_40", lambda d: (d / "meta_info.json").write_text(json.dumps({"num_experts": 2**40})),
     "outside 1..65536"),
    ("meta_k_string", lambda d: (d / "meta_info.json").write_text(
        json.dumps({"num_experts": E, "num_experts_per_token": str(K)})), "must be an integer"),
    ("meta_nan", lambda d: (d / "meta_info.json").write_text('{"num_experts": NaN}'), "NaN is not a JSON number"),
]


@pytest.mark.parametrize("case,mutate,needle", TRTLLM_CASES, ids=[c[0] for c in TRTLLM_CASES])
def test_trtllm_numbers(tmp_path, capsys, case, mutate, needle):
    d = tmp_path / "stats"
    trtllm_dump(d, np.random.default_rng(9))
    mutate(d)
    out = tmp_path / "run"
    code, _, err = cli(capsys, "import", "trtllm-stats", str(d), "--out", str(out), *GEO_FLAGS)
    assert_failed_cleanly(code, err, out, needle)


# ------------------------------------------------------------------------------------------------------------
# the strict JSON reader and the geometry flags
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["NaN", "[1, -Infinity]", '{"w": Infinity}', "1e999", "[-1e400]"])
def test_loads_strict_refuses_non_finite(text):
    with pytest.raises(ValueError):
        loads_strict(text)


@pytest.mark.parametrize("model,needle", [
    (f"experts={2**40},top_k=2,moe_layers=0-3", "outside 1..65536"),
    ("experts=8,top_k=2,moe_layers=0-1000000000", "bad layer list"),
    ("experts=8,top_k=2,moe_layers=0-3,num_layers=1000000000", "outside 1..32768"),
])
def test_geometry_bounds(tmp_path, capsys, model, needle):
    rng = np.random.default_rng(2)
    resp, _ = sglang_response(rng, 4, 3)
    f = tmp_path / "r.jsonl"
    f.write_text(json.dumps(resp) + "\n")
    out = tmp_path / "run"
    code, _, err = cli(capsys, "import", "routed-experts", str(f), "--out", str(out), "--model", model)
    assert_failed_cleanly(code, err, out, needle)


@pytest.mark.parametrize("record,needle", [
    ({"task_id": "a/1", "prompt": [1, 2, 3]}, "field 'prompt' of template '{prompt}' is a list, not text"),
    ({"task_id": "a/1", "prompt": 12}, "field 'prompt' of template '{prompt}' is a int, not text"),
    ({"task_id": [1, 2], "prompt": "def f():"}, "id field 'task_id' is a list"),
])
def test_data_file_prompt_fields_must_be_text(tmp_path, record, needle):
    from tracekit.datasets import get_dataset, load_prompts
    from tracekit.errors import TracekitError

    f = tmp_path / "prompts.jsonl"
    f.write_text(json.dumps({"task_id": "a/0", "prompt": "def g():"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(TracekitError, match=needle.replace("{", r"\{").replace("}", r"\}").replace("[", r"\[")):
        load_prompts(get_dataset("humaneval"), data_file=f)
