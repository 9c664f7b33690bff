"""`tracekit import jsonl` on the real Mixtral traces and on broken files."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tracekit.cli import main
from tracekit.importers.jsonl import import_jsonl
from tracekit.query import connect, fetch_arrow, run_sql
from tracekit.store import open_run

from mixtral_raw import FILES, RAW, records

MIXTRAL = ("traces", "mixtral-8x7b")


@pytest.fixture(scope="module")
def mixtral_dir(shared_data) -> Path:
    return shared_data.joinpath(*MIXTRAL)


@pytest.fixture(scope="module")
def mixtral_run(mixtral_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imp") / "mixtral"
    return import_jsonl([mixtral_dir / f for f in FILES], model="mixtral-8x7b", out=out)


def _rows(run: Path):
    con = connect(run)
    t = fetch_arrow(run_sql(con, "SELECT request_id, phase, position, step, layer, experts, weights, dataset, domain "
                                 "FROM routes ORDER BY request_id, phase, position, layer"))
    con.close()
    return t.to_pylist()


def test_every_record_lands_once_with_its_phase_and_experts(mixtral_run, mixtral_dir):
    raw = records(mixtral_dir)
    rows = _rows(mixtral_run)
    assert len(rows) == len(raw) == 10779 + 7889 + 6777
    # index the raw records the way the README defines tokens; prefill position = token_pos,
    # decode of a request with a 135-token prompt continues at 135 + step - 1
    expect = {}
    prompt_len = {}
    for r in raw:
        if r["phase"] == "prefill":
            prompt_len[r["request"]] = max(prompt_len.get(r["request"], 0), r["token"] + 1)
    for r in raw:
        if r["phase"] == "prefill":
            pos, step = r["token"], None
        elif r["request"] in prompt_len:
            pos, step = prompt_len[r["request"]] + r["token"] - 1, r["token"]
        else:
            pos, step = r["token"], r["token"] + 1
        expect[(r["request"], r["phase"], pos, r["layer"])] = (step, r["experts"], r["weights"], r["domain"])
    got = {(r["request_id"], r["phase"], r["position"], r["layer"]): r for r in rows}
    assert got.keys() == expect.keys()
    for key, (step, experts, weights, domain) in expect.items():
        g = got[key]
        assert g["step"] == step and g["experts"] == experts and g["domain"] == domain
        np.testing.assert_allclose(g["weights"], weights, rtol=1e-6)


def test_raw_file_phases_and_requests_view(mixtral_run):
    con = connect(mixtral_run)
    req = fetch_arrow(run_sql(con, "SELECT * FROM requests ORDER BY request_id")).to_pylist()
    con.close()
    assert [(r["dataset"], r["domain"]) for r in req] == [("humaneval", "code")] * 2 + [("gsm8k", "math")] * 2 + [("humaneval", "code")]
    # decode-only files: generated tokens = the most rows any layer has for the problem (token_idx 0..n-1)
    assert [r["generated_tokens"] for r in req] == [83, 255, 168, 79, 83]
    assert [r["prompt_tokens"] for r in req] == [0, 0, 0, 0, 135]
    m = open_run(mixtral_run).manifest
    assert m["geometry"]["num_experts"] == 8 and m["geometry"]["top_k"] == 2 and m["geometry"]["moe_layers"] == list(range(32))
    assert m["totals"]["routes"]["rows"] == 25445 and m["status"] == "complete"


def test_raw_decode_equals_the_decode_only_file(mixtral_dir, tmp_path):
    """README: the raw file's decode rows equal analysis_deep_analysis_humaneval_1_routing.jsonl per layer in order."""
    a = import_jsonl([mixtral_dir / RAW], model="m", out=tmp_path / "a")
    b = import_jsonl([mixtral_dir / "analysis_deep_analysis_humaneval_1_routing.jsonl"], model="m", out=tmp_path / "b",
                     phase="decode")
    q = "SELECT layer, list(experts ORDER BY step) AS e FROM routes WHERE phase = 'decode' GROUP BY layer ORDER BY layer"
    ra, rb = (fetch_arrow(run_sql(connect(x), q)).to_pylist() for x in (a, b))
    assert ra == rb and len(ra) == 32


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(lines))
    return path


GOOD = '{"dataset": "gsm8k", "problem_id": 0, "layer": %d, "experts": [1, 2], "gating_probs": [0.6, 0.4], "token_idx": %d}\n'


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"dataset": "gsm8k", "problem_id": 0, "layer": 1, "experts": [1, 2], "gating_pr', "malformed JSON"),
        ('{"dataset": "gsm8k", "problem_id": 0, "layer": 1, "experts": "x", "gating_probs": [1], "token_idx": 0}\n', "'experts'"),
        ('{"dataset": "gsm8k", "problem_id": 0, "experts": [1, 2], "gating_probs": [0.5, 0.5], "token_idx": 0}\n', "'layer'"),
        ('{"dataset": "gsm8k", "problem_id": 0, "layer": 1, "experts": [1, 2, 3], "gating_probs": [0.5, 0.3, 0.2], "token_idx": 0}\n', "top-k"),
        ('[1, 2]\n', "JSON object"),
    ],
)
def test_bad_line_is_one_line_error_exit_2_nothing_written(tmp_path, capsys, bad_line, message):
    src = _write(tmp_path / "t.jsonl", [GOOD % (0, 0), GOOD % (0, 1), bad_line])
    out = tmp_path / "runs" / "r"
    with pytest.raises(SystemExit) as exc:
        main(["import", "jsonl", str(src), "--model", "m", "--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{src}:3" in err and message in err
    assert not out.exists()
    assert not (tmp_path / "runs").exists() or list((tmp_path / "runs").iterdir()) == []


def test_duplicate_record_and_existing_out_refused(tmp_path, capsys):
    src = _write(tmp_path / "d.jsonl", [GOOD % (0, 0), GOOD % (0, 0)])
    with pytest.raises(SystemExit) as exc:
        main(["import", "jsonl", str(src), "--model", "m", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"{src}:2" in err and "second record" in err
    ok = _write(tmp_path / "ok.jsonl", [GOOD % (0, 0), GOOD % (1, 0)])
    main(["import", "jsonl", str(ok), "--model", "m", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as exc:
        main(["import", "jsonl", str(ok), "--model", "m", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and "not empty" in capsys.readouterr().err


def test_field_map_geometry_flags_and_no_weights(tmp_path, capsys):
    lines = [json.dumps({"src": "mbpp", "rid": 7, "L": l, "ids": [l, 9], "pos": p}) + "\n" for p in range(3) for l in (1, 3)]
    src = _write(tmp_path / "f.jsonl", lines)
    out = tmp_path / "run"
    main(["import", "jsonl", str(src), "--model", "x", "--out", str(out), "--phase", "prefill",
          "--field-map", "experts=ids,weights=,request=rid,layer=L,position=pos,dataset=src",
          "--num-experts", "300", "--num-layers", "4"])
    run = open_run(out)
    assert run.geometry["num_experts"] == 300 and run.geometry["num_layers"] == 4
    t = pq.read_table(run.files["routes"][0])
    assert t.schema.field("experts").type.value_type == pa.uint16()
    assert t["weights"].null_count == t.num_rows == 6
    assert set(t["phase"].to_pylist()) == {"prefill"} and set(t["domain"].to_pylist()) == {"code"}
    with pytest.raises(SystemExit):
        main(["import", "jsonl", str(src), "--model", "x", "--out", str(tmp_path / "r2"), "--field-map", "experts=ids,weights=,request=rid,layer=L,position=pos",
              "--num-experts", "5"])
    assert f"{src}:" in capsys.readouterr().err
