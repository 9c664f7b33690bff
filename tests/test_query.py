"""DuckDB views over run directories, the query/sql commands, and read-only enforcement."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from tracekit.cli import main
from tracekit.errors import TracekitError
from tracekit.query import connect, fetch_arrow, query, resolve_runs, run_sql
from tracekit.store import open_run
from tracekit.synth import generate_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Two small synthetic runs: E=64 (uint8 ids, float16 weights) and E=300 (uint16 ids, float32 weights)."""
    root = tmp_path_factory.mktemp("runs")
    generate_run(root / "a", num_experts=64, top_k=4, moe_layers=[1, 2, 3], requests=6, prompt_tokens=(5, 9),
                 decode_tokens=(3, 6), domains=("code", "math"), weights=True, seed=1)
    generate_run(root / "b", num_experts=300, top_k=4, moe_layers=[1, 2, 3], requests=4, prompt_tokens=7,
                 decode_tokens=4, domains=("chat",), weights=True, weight_dtype="float32", seed=2)
    return root


def _raw(run: Path):
    return open_run(run).table().to_pylist()


def test_views_match_the_stored_rows(runs):
    a = _raw(runs / "a")
    con = connect(runs / "a")
    routes = fetch_arrow(run_sql(con, "SELECT * FROM routes")).to_pylist()
    assert len(routes) == len(a)
    ch = fetch_arrow(run_sql(con, "SELECT request_id, phase, position, layer, expert, weight, rank FROM choices")).to_pylist()
    assert len(ch) == 4 * len(a)
    by_row = {(r["request_id"], r["phase"], r["position"], r["layer"]): r for r in a}
    for c in ch:
        r = by_row[(c["request_id"], c["phase"], c["position"], c["layer"])]
        assert r["experts"][c["rank"]] == c["expert"]
        assert c["weight"] == pytest.approx(float(r["weights"][c["rank"]]), rel=1e-3)
    req = {r["request_id"]: r for r in fetch_arrow(run_sql(con, "SELECT * FROM requests")).to_pylist()}
    for q, r in req.items():
        mine = [x for x in a if x["request_id"] == q]
        assert r["prompt_tokens"] == len({x["position"] for x in mine if x["phase"] == "prefill"})
        assert r["generated_tokens"] == len({x["step"] for x in mine if x["phase"] == "decode"})
        assert r["domain"] == mine[0]["domain"] and r["rows"] == len(mine)
    loads = fetch_arrow(run_sql(con, "SELECT layer, expert, sum(count) AS n FROM loads GROUP BY ALL")).to_pylist()
    expect = {}
    for r in a:
        for e in r["experts"]:
            expect[(r["layer"], e)] = expect.get((r["layer"], e), 0) + 1
    assert {(x["layer"], x["expert"]): x["n"] for x in loads} == expect
    g = fetch_arrow(run_sql(con, "SELECT kind, num_experts, top_k, moe_layers, rows FROM runs")).to_pylist()
    assert g == [{"kind": "routes", "num_experts": 64, "top_k": 4, "moe_layers": [1, 2, 3], "rows": len(a)}]
    con.close()


def test_runs_with_uint8_and_uint16_ids_mix_via_dirs_globs_and_parents(runs):
    n = len(_raw(runs / "a")) + len(_raw(runs / "b"))
    for spec in ([runs / "a", runs / "b"], str(runs / "*"), runs):
        t = query(spec, "SELECT max(expert) AS m, count(DISTINCT run_id) AS r, count(*) AS c FROM choices")
        assert t.to_pylist()[0]["r"] == 2 and t.to_pylist()[0]["c"] == 4 * n
    assert len(resolve_runs([runs / "a", str(runs / "a")])) == 1
    big = max(max(r["experts"]) for r in _raw(runs / "b"))
    assert query(runs, "SELECT max(expert) AS m FROM choices").to_pylist()[0]["m"] == big > 255


@pytest.mark.parametrize("sql", [
    "COPY routes TO '{part}'",
    "DELETE FROM routes",
    "CREATE TABLE x AS SELECT 1",
    "INSERT INTO runs SELECT * FROM runs",
    "ATTACH '{run}/x.db'",
    "SELECT 1; DROP VIEW routes",
    "SET enable_external_access = true",
])
def test_statements_that_write_are_refused(runs, capsys, sql):
    part = open_run(runs / "a").files["routes"][0]
    before = hashlib.sha256(part.read_bytes()).hexdigest()
    with pytest.raises(SystemExit) as exc:
        main(["query", str(runs / "a"), sql.format(part=part, run=runs / "a")])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and "not allowed" in err
    assert hashlib.sha256(part.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in (runs / "a").iterdir()) == ["manifest.json", "routes", "summaries"]


def test_connection_cannot_touch_files_outside_the_runs(runs, tmp_path):
    con = connect(runs / "a")
    with pytest.raises(duckdb.Error):
        con.execute(f"COPY (SELECT 1) TO '{tmp_path}/x.csv'")
    with pytest.raises(duckdb.Error):
        con.execute("SELECT * FROM read_csv('/etc/passwd')")
    with pytest.raises(duckdb.Error):
        con.execute("SET enable_external_access = true")
    assert not (tmp_path / "x.csv").exists()


@pytest.mark.parametrize("sql, message", [
    ("SELEC 1", "invalid SQL"),
    ("SELECT no_such_column FROM routes", "no_such_column"),
    ("SELECT * FROM no_such_view", "no_such_view"),
])
def test_bad_sql_is_one_line_exit_2(runs, capsys, sql, message):
    with pytest.raises(SystemExit) as exc:
        main(["query", str(runs / "a"), sql])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and message in err


def test_newer_schema_and_missing_runs_are_refused(runs, tmp_path, capsys):
    newer = tmp_path / "newer"
    shutil.copytree(runs / "a", newer)
    m = json.loads((newer / "manifest.json").read_text())
    m["schema_version"] = 99
    (newer / "manifest.json").write_text(json.dumps(m))
    for target, message in ((newer, "newer"), (tmp_path / "nope", "no such run"), (tmp_path, "no tracekit run")):
        if target == tmp_path:
            (tmp_path / "empty").mkdir()
            target = tmp_path / "empty"
        with pytest.raises(SystemExit) as exc:
            main(["query", str(target), "SELECT 1"])
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and len(err.splitlines()) == 1 and message in err
    with pytest.raises(TracekitError):
        connect(newer)


def test_output_formats(runs, tmp_path, capsys):
    sql = "SELECT request_id, domain, generated_tokens FROM requests ORDER BY request_id"
    expect = query(runs / "a", sql).to_pylist()
    main(["query", str(runs / "a"), sql])
    text = capsys.readouterr().out
    assert "request_id" in text and "generated_tokens" in text and expect[-1]["domain"] in text
    main(["query", str(runs / "a"), sql, "--format", "csv", "-o", str(tmp_path / "r.csv")])
    assert pacsv.read_csv(tmp_path / "r.csv").to_pylist() == expect
    main(["query", str(runs / "a"), sql, "--format", "json"])
    assert [json.loads(l) for l in capsys.readouterr().out.splitlines()] == expect
    main(["query", str(runs / "a"), sql, "--format", "parquet", "-o", str(tmp_path / "r.parquet")])
    assert pq.read_table(tmp_path / "r.parquet").to_pylist() == expect


def test_sql_shell_reads_piped_statements(runs, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO(".tables\nSELECT count(*) AS n\nFROM routes;\nSELECT 42 AS answer;\n"))
    main(["sql", str(runs / "a")])
    out = capsys.readouterr().out
    assert "choices" in out and str(len(_raw(runs / "a"))) in out and "42" in out
    monkeypatch.setattr("sys.stdin", io.StringIO("DELETE FROM routes;\nSELECT 7 AS seven;\n"))
    with pytest.raises(SystemExit) as exc:
        main(["sql", str(runs / "a")])
    cap = capsys.readouterr()
    assert exc.value.code == 2 and "not allowed" in cap.err and "7" in cap.out


def test_loads_runs_are_read_as_stored_next_to_routes_runs(runs, tmp_path):
    from tracekit.schema import build_loads_table
    from tracekit.store import base_manifest, finalize, write_chunk, write_manifest

    lr = tmp_path / "loads_run"
    write_manifest(lr, base_manifest(run_id="engine-1", kind="loads", source="test", model={"name": "m"},
                                     geometry={"moe_layers": [1], "num_experts": 4, "top_k": 2},
                                     dataset={"name": "d", "domain": "chat"}, args={}))
    n = np.array([5, 0, 7, 1])
    write_chunk(lr, build_loads_table(run_id="engine-1", model="m", dataset="d", domain="chat", phase="mixed",
                                      window=np.zeros(4), layer=np.ones(4), expert=np.arange(4), count=n),
                kind="loads", chunk=0)
    finalize(lr)
    only = query(lr, "SELECT expert, count FROM loads ORDER BY expert").to_pylist()
    assert [r["count"] for r in only] == n.tolist()
    assert query(lr, "SELECT count(*) AS c FROM routes").to_pylist() == [{"c": 0}]
    both = query([lr, runs / "a"], "SELECT run_id, sum(count) AS s FROM loads GROUP BY run_id").to_pylist()
    assert {r["run_id"]: r["s"] for r in both}["engine-1"] == 13 and len(both) == 2
