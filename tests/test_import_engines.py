"""Serving-engine importers on files built here in the exact layouts the engines write.

Layouts (see each importer's docstring for the upstream source): SGLang ``torch.save`` dicts of the expert
distribution recorder (per_token, stat), SGLang/vLLM JSONL responses with routed experts, TensorRT-LLM
``meta_info.json`` + ``rank{r}.safetensors`` keyed ``"{iter}_{layer}"``.
"""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch

from tracekit.errors import TracekitError
from tracekit.importers.geometry import parse_layers, resolve_model
from tracekit.importers.sglang import slots_to_logical
from tracekit.store import open_run

from _cli import cli

NUM_LAYERS, MOE, E, K = 4, [1, 2, 3], 16, 2
GEO_FLAGS = ["--num-experts", str(E), "--top-k", str(K), "--moe-layers", "1-3", "--num-layers", str(NUM_LAYERS)]
REC_K = 8  # SGLang's _DetailSinglePassGatherer._TOP_K_NUM


def q(run: Path, sql: str, kind: str = "routes"):
    con = duckdb.connect()
    con.execute(f"create view t as select * from read_parquet('{run}/{kind}/*.parquet')")
    return con.execute(sql).fetchall()


def assert_failed_cleanly(code: int, err: str, out_dir: Path, needle: str) -> None:
    assert code == 2
    assert err.strip().count("\n") == 0 and "Traceback" not in err, err
    assert needle in err, err
    assert not out_dir.exists()
    assert not any(p.name.startswith(f".{out_dir.name}.") for p in out_dir.parent.iterdir())


# ------------------------------------------------------------------------------------------------------------
# SGLang per_token
# ------------------------------------------------------------------------------------------------------------
class PerTokenDump:
    """Builds SGLang per_token dumps and remembers the logical experts behind every physical slot it writes."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        # 20 physical slots: a shuffled copy of the 16 logical experts + 4 redundant replicas, per layer
        self.p2l = np.zeros((NUM_LAYERS, E + 4), dtype=np.int64)
        for layer in range(NUM_LAYERS):
            self.p2l[layer, :E] = self.rng.permutation(E)
            self.p2l[layer, E:] = self.rng.choice(E, 4, replace=False)
        self.truth: dict[tuple[int, int], np.ndarray] = {}  # (fp_id, token index) -> (nMoE, K) logical ids

    def record(self, fp_id: int, mode: int, positions: list[int], extend_seq_lens, rank: int = 0) -> dict:
        t = len(positions)
        topk = torch.full((NUM_LAYERS, t, REC_K), -1, dtype=torch.int32)
        for i in range(t):
            logical = np.stack([self.rng.choice(E, K, replace=False) for _ in MOE])
            self.truth[(fp_id, i)] = logical
            for li, layer in enumerate(MOE):
                for j, e in enumerate(logical[li]):
                    slots = np.flatnonzero(self.p2l[layer] == e)  # any replica serves the expert
                    topk[layer, i, j] = int(self.rng.choice(slots))
        return dict(forward_pass_id=fp_id, rank=rank, gatherer_key="primary",
                    input_ids=[int(x) for x in self.rng.integers(0, 1000, t)], positions=positions,
                    extend_seq_lens=extend_seq_lens, forward_mode=mode, topk_ids_of_layer=topk, misc_objects=[],
                    global_physical_count=torch.zeros((NUM_LAYERS, E + 4), dtype=torch.int32))

    def save(self, path: Path, records: list[dict]) -> Path:
        torch.save({"records": records, "last_physical_to_logical_map": torch.from_numpy(self.p2l)}, str(path))
        return path


def standard_records(d: PerTokenDump, rank: int = 0) -> list[dict]:
    return [
        # extend: request A (3 tokens) and the first chunk of B (4 tokens, chunked prefill)
        d.record(0, 1, [0, 1, 2, 0, 1, 2, 3], [3, 4], rank),
        d.record(1, 2, [3], None, rank),                     # decode: A's first decode token
        # extend: the rest of B (positions 4-5) and C, a prefix-cache hit starting at position 5
        d.record(2, 1, [4, 5, 5, 6], [2, 2], rank),
        d.record(3, 2, [4, 6, 7], None, rank),               # decode: A, B, C
        d.record(4, 4, [], None, rank),                      # idle
    ]


def test_slots_to_logical_maps_every_replica():
    p2l = np.array([[0, 1, 2, 1], [2, 0, 1, 0]])  # (L=2, P=4): slot 3 replicates expert 1 / 0
    slots = np.array([[[3, 0], [1, 2]], [[3, 1], [0, 2]]], dtype=np.int32)  # (L, T=2, K=2)
    out = slots_to_logical(slots, p2l, [0, 1], 2, 3, "t")
    assert out.shape == (2, 2, 2)
    np.testing.assert_array_equal(out[0], [[1, 0], [0, 0]])  # token 0: layer 0, layer 1
    np.testing.assert_array_equal(out[1], [[1, 2], [2, 1]])


def test_sglang_per_token_maps_slots_splits_phases_and_recovers_requests(tmp_path, capsys):
    d = PerTokenDump()
    f = d.save(tmp_path / "expert_distribution_recorder_1700000000.5_0.pt", standard_records(d))
    out = tmp_path / "run"
    code, stdout, err = cli(capsys, "import", "sglang-per-token", str(f), "--out", str(out), *GEO_FLAGS)
    assert code == 0, err
    run = open_run(out)
    assert run.kind == "routes" and run.manifest["source"] == "import:sglang-per-token"
    assert run.manifest["geometry"]["moe_layers"] == MOE

    tokens = {"prefill": 7 + 4, "decode": 1 + 3}
    rows = dict(q(out, "select phase, count(*) from t group by phase"))
    assert rows == {p: n * len(MOE) for p, n in tokens.items()}
    assert sorted(r[0] for r in q(out, "select distinct layer from t")) == MOE
    table = run.table()
    assert table.num_rows == sum(tokens.values()) * len(MOE)
    req = table["request_id"].to_numpy()
    # requests: A, B (two chunks joined), C, then 4 one-token decode requests
    assert len(set(req.tolist())) == 7
    b_rows = q(out, "select distinct position from t where request_id = "
                    "(select distinct request_id from t where phase='prefill' and position=3)")
    assert sorted(r[0] for r in b_rows) == [0, 1, 2, 3, 4, 5]
    # slot -> logical: every row equals the logical experts the dump was built from (token-major order)
    order = [(0, i) for i in range(7)] + [(1, 0)] + [(2, i) for i in range(4)] + [(3, i) for i in range(3)]
    expected = np.concatenate([d.truth[key] for key in order]).reshape(-1, K)
    experts = np.array(table["experts"].to_pylist())
    np.testing.assert_array_equal(experts, expected)
    assert table["weights"].null_count == table.num_rows
    assert table["step"].null_count == table.num_rows
    notes = " ".join(run.manifest["notes"])
    assert "cannot be tied" in notes and "1 chunked-prefill continuations" in notes and "1 prefill requests start" in notes
    totals = run.manifest["totals"]["routes"]
    assert totals["prompt_tokens"] == 11 and totals["generated_tokens"] == 4


def test_sglang_per_token_tensor_parallel_ranks_kept_once(tmp_path, capsys):
    d = PerTokenDump(seed=1)
    recs = standard_records(d)
    f0 = d.save(tmp_path / "expert_distribution_recorder_1700000000.5_0.pt", recs)
    f1 = d.save(tmp_path / "expert_distribution_recorder_1700000000.5_1.pt", [{**r, "rank": 1} for r in recs])
    out = tmp_path / "run"
    code, _, err = cli(capsys, "import", "sglang-per-token", str(f1), str(f0), "--out", str(out), *GEO_FLAGS)
    assert code == 0, err
    assert q(out, "select count(*) from t")[0][0] == 15 * len(MOE)
    assert "kept once" in " ".join(open_run(out).manifest["notes"])


@pytest.mark.parametrize("case", ["truncated", "bad_shape", "slot_out_of_range", "dense_layer_routed", "stat_dump",
                                  "lens_mismatch"])
def test_sglang_per_token_malformed(tmp_path, capsys, case):
    d = PerTokenDump(seed=2)
    good = d.save(tmp_path / "expert_distribution_recorder_1.0_0.pt", standard_records(d))
    bad = tmp_path / "expert_distribution_recorder_2.0_0.pt"
    recs = standard_records(d)
    needle = ""
    if case == "truncated":
        bad.write_bytes(good.read_bytes()[:-200])
        needle = "truncated"
    elif case == "bad_shape":
        recs[0]["topk_ids_of_layer"] = recs[0]["topk_ids_of_layer"][0]
        d.save(bad, recs)
        needle = "expected 3 dimensions"
    elif case == "slot_out_of_range":
        recs[0]["topk_ids_of_layer"][2, 0, 0] = 99
        d.save(bad, recs)
        needle = "slot ids outside"
    elif case == "dense_layer_routed":
        recs[0]["topk_ids_of_layer"][0, 0, 0] = 3
        d.save(bad, recs)
        needle = "layer 0 routed tokens"
    elif case == "stat_dump":
        torch.save({"rank": 0, "logical_count": torch.zeros((2, NUM_LAYERS, E), dtype=torch.int32)}, str(bad))
        needle = "sglang-stat"
    elif case == "lens_mismatch":
        recs[2]["extend_seq_lens"] = [2, 3]
        d.save(bad, recs)
        needle = "extend_seq_lens sum to 5"
    out = tmp_path / "run"
    # the good file is read (and staged) first: the failure must still leave nothing behind
    code, _, err = cli(capsys, "import", "sglang-per-token", str(good), str(bad), "--out", str(out), *GEO_FLAGS)
    assert_failed_cleanly(code, err, out, needle)


# ------------------------------------------------------------------------------------------------------------
# SGLang stat
# ------------------------------------------------------------------------------------------------------------
def test_sglang_stat_into_loads(tmp_path, capsys):
    rng = np.random.default_rng(3)
    lc = rng.integers(0, 50, (5, NUM_LAYERS, E)).astype(np.int32)
    lc[:, 0] = 0  # dense layer
    lc[2] = 0  # a buffer slot never filled
    f = tmp_path / "expert_distribution_recorder_1700000000.25.pt"
    torch.save({"rank": 0, "logical_count": torch.from_numpy(lc), "average_utilization_rate_over_window": None}, str(f))
    out = tmp_path / "run"
    code, _, err = cli(capsys, "import", "sglang-stat", str(f), "--out", str(out), "--model",
                       f"experts={E},top_k={K},moe_layers=1-3,num_layers={NUM_LAYERS},name=tiny")
    assert code == 0, err
    run = open_run(out)
    assert run.kind == "loads" and run.manifest["model"]["name"] == "tiny"
    assert sorted(r[0] for r in q(out, "select distinct \"window\" from t", "loads")) == [0, 1, 3, 4]
    assert q(out, "select count(*) from t", "loads")[0][0] == 4 * len(MOE) * E
    got = q(out, "select \"window\", layer, expert, count from t", "loads")
    for w, layer, e, c in got:
        assert c == lc[w, layer, e]
    assert q(out, "select sum(count) from t", "loads")[0][0] == int(lc.sum())
    assert {r[0] for r in q(out, "select distinct phase from t", "loads")} == {"mixed"}


@pytest.mark.parametrize("case", ["experts", "truncated", "per_token"])
def test_sglang_stat_malformed(tmp_path, capsys, case):
    f = tmp_path / "expert_distribution_recorder_1.0.pt"
    if case == "experts":
        torch.save({"rank": 0, "logical_count": torch.ones((2, NUM_LAYERS, E + 1), dtype=torch.int32)}, str(f))
        needle = "17 experts"
    elif case == "truncated":
        torch.save({"rank": 0, "logical_count": torch.ones((2, NUM_LAYERS, E), dtype=torch.int32)}, str(f))
        f.write_bytes(f.read_bytes()[:100])
        needle = "not a readable torch.save dump"
    else:
        d = PerTokenDump()
        d.save(f, standard_records(d))
        needle = "sglang-per-token"
    out = tmp_path / "run"
    code, _, err = cli(capsys, "import", "sglang-stat", str(f), "--out", str(out), *GEO_FLAGS)
    assert_failed_cleanly(code, err, out, needle)


# ------------------------------------------------------------------------------------------------------------
# routed experts (SGLang and vLLM responses)
# ------------------------------------------------------------------------------------------------------------
def sglang_response(rng, prompt_len: int, gen: int, layers: int = NUM_LAYERS) -> tuple[dict, np.ndarray]:
    arr = rng.random((prompt_len + gen - 1, layers, E)).argsort(-1)[..., :K].astype(np.int32)  # k distinct ids
    resp = {"text": "x" * gen, "output_ids": [int(x) for x in rng.integers(0, 999, gen)],
            "meta_info": {"id": f"sg-{prompt_len}", "prompt_tokens": prompt_len, "completion_tokens": gen,
                          "cached_tokens": 0, "finish_reason": {"type": "length", "length": gen},
                          "routed_experts": base64.b64encode(arr.tobytes()).decode()}}
    return resp, arr


def vllm_response(rng, prompt_len: int, gen: int, encoding: str) -> tuple[dict, np.ndarray]:
    arr = rng.random((prompt_len + gen - 1, len(MOE), E)).argsort(-1)[..., :K].astype(np.int32)  # k distinct ids
    if encoding == "list":
        payload = arr.tolist()
    else:
        buf = io.BytesIO()
        np.save(buf, arr.astype(np.uint8))
        payload = base64.b64encode(buf.getvalue()).decode()
    resp = {"id": "cmpl-1", "object": "text_completion", "model": "m",
            "choices": [{"index": 0, "text": "y", "finish_reason": "length", "token_ids": list(range(500, 500 + gen)),
                         "prompt_token_ids": list(range(100, 100 + prompt_len)), "routed_experts": payload}],
            "usage": {"prompt_tokens": prompt_len, "completion_tokens": gen, "total_tokens": prompt_len + gen}}
    return resp, arr


def test_routed_experts_sglang_and_vllm_split_prefill_decode(tmp_path, capsys):
    rng = np.random.default_rng(4)
    s1, a1 = sglang_response(rng, 5, 4)
    s2, a2 = sglang_response(rng, 3, 1)
    v1, a3 = vllm_response(rng, 6, 3, "list")
    v2, a4 = vllm_response(rng, 2, 5, "npy")
    f = tmp_path / "responses.jsonl"
    lines = [{"prompt_id": "gsm8k_0", "domain": "math", "response": s1}, s2,
             {"prompt_id": "HumanEval/1", "domain": "code", "response": v1}, v2]
    f.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "run"
    code, _, err = cli(capsys, "import", "routed-experts", str(f), "--out", str(out), *GEO_FLAGS)
    assert code == 0, err
    got = q(out, "select request_id, phase, count(*) / 3, min(position), max(position), min(step), max(step) "
                 "from t group by all order by request_id, phase")
    assert got == [(0, "decode", 3, 5, 7, 1, 3), (0, "prefill", 5, 0, 4, None, None),
                   (1, "prefill", 3, 0, 2, None, None),
                   (2, "decode", 2, 6, 7, 1, 2), (2, "prefill", 6, 0, 5, None, None),
                   (3, "decode", 4, 2, 5, 1, 4), (3, "prefill", 2, 0, 1, None, None)]
    table = open_run(out).table()
    experts = np.array(table["experts"].to_pylist())
    expected = np.concatenate([a1[:, MOE].reshape(-1, K), a2[:, MOE].reshape(-1, K), a3.reshape(-1, K),
                               a4.reshape(-1, K)])
    np.testing.assert_array_equal(experts, expected)
    doms = dict(q(out, "select request_id, any_value(domain) from t group by 1"))
    assert doms == {0: "math", 1: "unknown", 2: "code", 3: "unknown"}
    pids = dict(q(out, "select request_id, any_value(prompt_id) from t group by 1"))
    assert pids[0] == "gsm8k_0" and pids[1] == "sg-3"
    # token ids: decode step s of request 0 fed output_ids[s-1]; vLLM prompt ids come from prompt_token_ids
    toks = q(out, "select step, token_id from t where request_id = 0 and phase = 'decode' and layer = 1 order by step")
    assert [t for _, t in toks] == s1["output_ids"][:3]
    ptoks = q(out, "select token_id from t where request_id = 2 and phase = 'prefill' and layer = 1 order by position")
    assert [t for (t,) in ptoks] == list(range(100, 106))


@pytest.mark.parametrize("case", ["truncated_line", "rows_mismatch", "no_routed", "bad_base64", "ids_out_of_range"])
def test_routed_experts_malformed(tmp_path, capsys, case):
    rng = np.random.default_rng(5)
    good, _ = sglang_response(rng, 4, 3)
    bad, arr = sglang_response(rng, 4, 3)
    text = json.dumps(good) + "\n"
    needle = ""
    if case == "truncated_line":
        text += json.dumps(bad)[:-40] + "\n"
        needle = ":2: malformed JSON"
    elif case == "rows_mismatch":
        bad["meta_info"]["routed_experts"] = base64.b64encode(arr[:-1].tobytes()).decode()
        text += json.dumps(bad) + "\n"
        needle = "not 6 tokens"
    elif case == "no_routed":
        del bad["meta_info"]["routed_experts"]
        text += json.dumps(bad) + "\n"
        needle = "--enable-return-routed-experts"
    elif case == "bad_base64":
        bad["meta_info"]["routed_experts"] = bad["meta_info"]["routed_experts"][:-3]
        text += json.dumps(bad) + "\n"
        needle = "not valid base64"
    elif case == "ids_out_of_range":
        arr[0, 1, 0] = E
        bad["meta_info"]["routed_experts"] = base64.b64encode(arr.tobytes()).decode()
        text += json.dumps(bad) + "\n"
        needle = "expert ids outside"
    f = tmp_path / "r.jsonl"
    f.write_text(text)
    out = tmp_path / "run"
    code, _, err = cli(capsys, "import", "routed-experts", str(f), "--out", str(out), *GEO_FLAGS)
    assert_failed_cleanly(code, err, out, needle)


# ------------------------------------------------------------------------------------------------------------
# TensorRT-LLM expert statistics
# ------------------------------------------------------------------------------------------------------------
def trtllm_dump(directory: Path, rng, iters=range(100, 103), layers=MOE, ranks=2) -> dict:
    from safetensors.torch import save_file

    directory.mkdir()
    (directory / "meta_info.json").write_text(json.dumps({"num_experts": E, "num_experts_per_token": K}))
    total = {}
    for r in range(ranks):
        recs = {}
        for it in iters:
            for layer in layers:
                ids = torch.from_numpy(rng.integers(0, E, (7, K)))
                c = torch.bincount(ids.flatten(), minlength=E)
                recs[f"{it}_{layer}"] = c
                total[(it, layer)] = total.get((it, layer), 0) + c.numpy()
        save_file(recs, str(directory / f"rank{r}.safetensors"))
    # raw token ids are dumped beside the statistics by newer versions; they are not counts
    save_file({"100_1": torch.zeros((7, K), dtype=torch.int32)}, str(directory / "rank0_raw.safetensors"))
    return total


def test_trtllm_stats_into_loads(tmp_path, capsys):
    rng = np.random.default_rng(6)
    d = tmp_path / "expert_statistic"
    total = trtllm_dump(d, rng)
    out = tmp_path / "run"
    code, _, err = cli(capsys, "import", "trtllm-stats", str(d), "--out", str(out), *GEO_FLAGS)
    assert code == 0, err
    assert open_run(out).kind == "loads"
    got = q(out, "select \"window\", layer, expert, count from t order by all", "loads")
    assert len(got) == 3 * len(MOE) * E
    for w, layer, e, c in got:
        assert c == total[(100 + w, layer)][e]
    assert open_run(out).manifest["trtllm_iterations"][0]["start"] == 100


def test_trtllm_layer_ordinals_map_to_moe_layers(tmp_path, capsys):
    d = tmp_path / "stats"
    trtllm_dump(d, np.random.default_rng(7), iters=[5], layers=[0, 1, 2], ranks=1)
    out = tmp_path / "run"
    code, _, err = cli(capsys, "import", "trtllm-stats", str(d), "--out", str(out), *GEO_FLAGS)
    assert code == 0, err
    assert sorted(r[0] for r in q(out, "select distinct layer from t", "loads")) == MOE


@pytest.mark.parametrize("case", ["truncated_rank", "bad_meta", "bad_key", "experts"])
def test_trtllm_malformed(tmp_path, capsys, case):
    from safetensors.torch import save_file

    d = tmp_path / "stats"
    trtllm_dump(d, np.random.default_rng(8))
    if case == "truncated_rank":
        p = d / "rank1.safetensors"
        p.write_bytes(p.read_bytes()[:-16])
        needle = "not a readable safetensors file"
    elif case == "bad_meta":
        (d / "meta_info.json").write_text('{"num_experts": 16, "num_exp')
        needle = "not valid JSON"
    elif case == "bad_key":
        save_file({"100-1": torch.zeros(E, dtype=torch.int64)}, str(d / "rank2.safetensors"))
        needle = "is not '{iter}_{layer}'"
    else:
        (d / "meta_info.json").write_text(json.dumps({"num_experts": 32, "num_experts_per_token": K}))
        needle = "32 experts"
    out = tmp_path / "run"
    code, _, err = cli(capsys, "import", "trtllm-stats", str(d), "--out", str(out), *GEO_FLAGS)
    assert_failed_cleanly(code, err, out, needle)


# ------------------------------------------------------------------------------------------------------------
# model / geometry resolution, --out safety
# ------------------------------------------------------------------------------------------------------------
def test_resolve_model_registry_string_and_flags():
    name, geo = resolve_model("deepseek-v3")
    assert name == "deepseek-v3" and geo["moe_layers"] == list(range(3, 61)) and geo["num_experts"] == 256
    name, geo = resolve_model("experts=64,top_k=6,moe_layers=1-26,num_layers=27,name=dsv2-lite")
    assert (name, geo["num_experts"], geo["top_k"], len(geo["moe_layers"])) == ("dsv2-lite", 64, 6, 26)
    _, geo = resolve_model("deepseek-v3", top_k=4)
    assert geo["top_k"] == 4
    assert parse_layers("1-47:2") == list(range(1, 48, 2))
    with pytest.raises(TracekitError, match="--num-experts --top-k --moe-layers"):
        resolve_model("org/unknown-moe")
    with pytest.raises(TracekitError, match="bad layer list"):
        parse_layers("3-x")


def test_import_refuses_non_empty_out(tmp_path, capsys):
    rng = np.random.default_rng(9)
    resp, _ = sglang_response(rng, 3, 2)
    f = tmp_path / "r.jsonl"
    f.write_text(json.dumps(resp) + "\n")
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = cli(capsys, "import", "routed-experts", str(f), "--out", str(out), *GEO_FLAGS)
    assert code == 2 and "not empty" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_request_assembler_mixed_pass():
    from tracekit.importers.sglang import MIXED, RequestAssembler, segments

    asm = RequestAssembler()
    # extend: request 0 whole (positions 0-1), request 1 chunked (positions 0-2, continues next pass)
    pos = np.array([0, 1, 0, 1, 2])
    req, phase, _ = asm.assign(0, 0, 1, segments(1, [2, 3], 5, "t"), pos)
    assert req.tolist() == [0, 0, 1, 1, 1] and phase.tolist() == [0] * 5
    # mixed: the rest of request 1 (3-4), a new prompt (0-1), and request 0's decode token at position 2
    pos = np.array([3, 4, 0, 1, 2])
    req, phase, _ = asm.assign(0, 1, MIXED, segments(MIXED, [2, 2, 1], 5, "t"), pos)
    assert req.tolist() == [1, 1, 2, 2, 3] and phase.tolist() == [0, 0, 0, 0, 1]
    assert asm.counts["chunk_continuations"] == 1 and asm.counts["mixed_decode_tokens"] == 1


def test_routed_experts_physical_slots_map_back_with_slot_map(tmp_path, capsys):
    """A server with redundant experts returns physical slots; the map it ran with turns them back into experts."""
    rng = np.random.default_rng(11)
    slots = E + 4  # 4 redundant slots per layer
    table = np.stack([np.concatenate([rng.permutation(E), rng.integers(0, E, slots - E)]) for _ in range(NUM_LAYERS)])
    (tmp_path / "location.json").write_text(json.dumps({"physical_to_logical_map": table.tolist()}))
    resp, logical = sglang_response(rng, 4, 3)
    physical = np.empty_like(logical)
    for layer in range(NUM_LAYERS):  # pick a slot holding each logical expert, replicas included
        for idx in np.ndindex(logical[:, layer].shape):
            holders = np.flatnonzero(table[layer] == logical[:, layer][idx])
            physical[(idx[0], layer, idx[1])] = rng.choice(holders)
    assert physical.max() >= E  # some tokens were served by a replica slot
    resp["meta_info"]["routed_experts"] = base64.b64encode(physical.astype(np.int32).tobytes()).decode()
    f = tmp_path / "r.jsonl"
    f.write_text(json.dumps(resp) + "\n")

    out = tmp_path / "unmapped"
    code, _, err = cli(capsys, "import", "routed-experts", str(f), "--out", str(out), *GEO_FLAGS)
    assert_failed_cleanly(code, err, out, "--slot-map")

    out = tmp_path / "run"
    code, _, err = cli(capsys, "import", "routed-experts", str(f), "--out", str(out), *GEO_FLAGS,
                       "--slot-map", str(tmp_path / "location.json"))
    assert code == 0, err
    got = np.array(open_run(out).table()["experts"].to_pylist())
    np.testing.assert_array_equal(got, logical[:, MOE].reshape(-1, K))

    code, _, err = cli(capsys, "import", "trtllm-stats", str(tmp_path), "--out", str(tmp_path / "x"), *GEO_FLAGS,
                       "--slot-map", str(tmp_path / "location.json"))
    assert_failed_cleanly(code, err, tmp_path / "x", "--slot-map applies to routed-experts only")
