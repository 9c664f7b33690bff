"""Collector: padded batches, phases, decode counts, the Parquet it writes, and resume."""
from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tracekit.schema import SCHEMA_VERSION
from tracekit.collect import CollectOptions, collect, encode_prompts, trace_batch
from tracekit.datasets import get_dataset, load_prompts
from tracekit.hooks import RouterTracer, find_routers
from tracekit.models import load_model

COLS = ["request_id", "phase", "position", "step", "layer", "token_id", "experts", "weights"]


@pytest.fixture(scope="module", params=["tiny-deepseek-v3", "tiny-llama4"])
def loaded(request):
    return load_model(request.param)


@pytest.fixture(scope="module")
def gsm8k(prompt_data):
    return load_prompts(get_dataset("gsm8k"), data_file=prompt_data / "gsm8k_test.jsonl", limit=5, seed=3)


def _rows_by_request(rows):
    out = {}
    for r in np.unique(rows.request_id):
        m = rows.request_id == r
        key = np.lexsort((rows.position[m], rows.phase[m], rows.layer[m]))
        out[int(r)] = {
            "phase": rows.phase[m][key], "position": rows.position[m][key], "layer": rows.layer[m][key],
            "token_id": rows.token_id[m][key], "experts": rows.experts[m][key], "weights": rows.weights[m][key],
        }
    return out


def test_padded_batch_equals_requests_run_alone(loaded, gsm8k):
    opts = CollectOptions(max_new_tokens=5, weights="float32")
    ids = encode_prompts(loaded, gsm8k[:3], chat_template=True)
    assert len({len(t) for t in ids}) == 3  # different lengths: the batch is padded
    routers = find_routers(loaded.model)
    with RouterTracer(loaded.model, routers, weight_dtype=torch.float32) as tracer:
        batch = trace_batch(loaded, tracer, ids, np.arange(3), opts)
        alone = [trace_batch(loaded, tracer, [ids[i]], np.array([i]), opts) for i in range(3)]
    got = _rows_by_request(batch)
    L = len(routers)
    pad = loaded.tokenizer.pad_token_id
    for i in range(3):
        want = _rows_by_request(alone[i])[i]
        for col in ("phase", "position", "layer", "token_id", "experts"):
            np.testing.assert_array_equal(got[i][col], want[col], err_msg=f"request {i} column {col}")
        np.testing.assert_allclose(got[i]["weights"], want["weights"], rtol=1e-5, atol=1e-6)
        prefill = got[i]["phase"] == 0
        assert prefill.sum() == len(ids[i]) * L  # every real prompt token at every MoE layer, no pad
        np.testing.assert_array_equal(np.sort(np.unique(got[i]["position"][prefill])), np.arange(len(ids[i])))
        assert (got[i]["token_id"][prefill] != pad).all()
        # decode rows = generated tokens x MoE layers
        assert (~prefill).sum() == batch.generated_per_request[i] * L
    assert batch.prompt_tokens == sum(len(t) for t in ids)


def test_decode_rows_follow_generated_tokens_and_stop_at_eos(gsm8k):
    lm = load_model("tiny-qwen3-moe")
    routers = find_routers(lm.model)
    ids = encode_prompts(lm, gsm8k[:4], chat_template=True)
    eos = lm.tokenizer.eos_token_id
    opts = CollectOptions(max_new_tokens=12)
    with RouterTracer(lm.model, routers) as tracer:
        # force request 1 to emit EOS at its 3rd token: the logits processor sees the batch row
        class ForceEos:
            def __call__(self, input_ids, scores):
                if input_ids.shape[1] - max(len(t) for t in ids) == 2:
                    scores[1, :] = -1e9
                    scores[1, eos] = 0
                return scores

        orig = lm.model.generate

        def generate(*a, **kw):
            return orig(*a, logits_processor=[ForceEos()], **kw)

        lm.model.generate = generate
        try:
            rows = trace_batch(lm, tracer, ids, np.arange(4), opts)
        finally:
            del lm.model.generate
    L = len(routers)
    gen = rows.generated_per_request
    assert gen[1] == 2  # two tokens, then EOS: EOS and what follows are not recorded (as if run alone)
    for r in (0, 2, 3):
        assert gen[r] in range(1, 13)
    dec = rows.phase == 1
    for r, n in gen.items():
        m = dec & (rows.request_id == r)
        assert m.sum() == n * L
        steps = np.unique(rows.step[m])
        np.testing.assert_array_equal(steps, np.arange(1, n + 1))
        # decode positions continue the prompt
        np.testing.assert_array_equal(np.unique(rows.position[m]), len(ids[r]) + np.arange(n))


def _read(run_dir: Path):
    con = duckdb.connect()
    return con.sql(
        f"select {', '.join(COLS)} from read_parquet('{run_dir}/routes/*.parquet') "
        "order by request_id, layer, phase, position"
    ).to_arrow_table()


def test_run_directory_schema_and_manifest(tmp_path, prompt_data):
    out = tmp_path / "run"
    res = collect(CollectOptions(model="tiny-deepseek-v3", dataset="mbpp", data_file=prompt_data / "mbpp.jsonl",
                                 limit=4, max_new_tokens=4, batch_size=2, chunk_requests=2, out=out))
    assert res.complete
    m = json.loads((out / "manifest.json").read_text())
    assert m["schema_version"] == SCHEMA_VERSION and m["status"] == "complete"
    assert m["geometry"]["num_experts"] == 256 and m["geometry"]["top_k"] == 8
    assert m["geometry"]["moe_layers"] == [1, 2, 3] and m["geometry"]["n_group"] == 8
    # the routed experts' width (moe_intermediate_size), not the dense layers' intermediate_size
    cfg = load_model("tiny-deepseek-v3").model.config
    assert cfg.moe_intermediate_size != cfg.intermediate_size
    assert (m["geometry"]["hidden_size"], m["geometry"]["moe_intermediate_size"]) == (cfg.hidden_size,
                                                                                       cfg.moe_intermediate_size)
    assert m["dataset"]["domain"] == "code" and m["args"]["limit"] == 4
    files = sorted((out / "routes").glob("*.parquet"))
    assert len(files) == 2 and not list((out / "routes").glob(".*tmp"))
    schema = pq.read_schema(files[0])
    assert schema.field("experts").type == pa.list_(pa.uint8())  # narrowest type for E=256
    assert schema.field("weights").type == pa.list_(pa.float16())
    t = m["totals"]["routes"]
    assert t["rows"] == (t["prompt_tokens"] + t["generated_tokens"]) * 3
    con = duckdb.connect()
    n, lens, kmin, kmax = con.execute(
        f"select count(*), count(distinct request_id), min(len(experts)), max(len(experts)) from '{out}/routes/*.parquet'"
    ).fetchone()
    assert (n, lens, kmin, kmax) == (t["rows"], 4, 8, 8)
    dup = con.execute(f"select count(*) from (select request_id, phase, position, layer, count(*) c from '{out}/routes/*.parquet' "
                  "group by all having c > 1)").fetchone()[0]
    assert dup == 0


def test_resume_after_interrupt_equals_uninterrupted(tmp_path):
    common = dict(model="tiny-qwen3-moe", dataset="humaneval", limit=6, max_new_tokens=3, batch_size=2, chunk_requests=2)
    full = collect(CollectOptions(out=tmp_path / "full", **common))
    part_dir = tmp_path / "part"
    first = collect(CollectOptions(out=part_dir, **common), stop_after_chunks=1)
    assert not first.complete and json.loads((part_dir / "manifest.json").read_text())["status"] == "running"
    (part_dir / "routes" / ".part-r000-c000001.parquet.x.tmp").write_bytes(b"half-written")  # a killed writer's leftover
    second = collect(CollectOptions(out=part_dir, **common))
    assert second.complete and second.requests_done_now == 4
    assert not list((part_dir / "routes").glob(".*tmp"))
    a, b = _read(tmp_path / "full"), _read(part_dir)
    assert a.num_rows == b.num_rows > 0
    assert a.equals(b)
    third = collect(CollectOptions(out=part_dir, **common))  # nothing left: no duplicate rows
    assert third.requests_done_now == 0 and _read(part_dir).num_rows == a.num_rows
    assert full.manifest["totals"]["routes"]["rows"] == second.manifest["totals"]["routes"]["rows"]
