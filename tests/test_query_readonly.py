"""No SQL text can create, change or delete a file: through `tracekit query`, `tracekit sql`, or a connection from
`tracekit.connect` used directly. Each case snapshots every file under the test's folder (the runs and the working
directory) before and after, byte for byte."""
from __future__ import annotations

import gc
import hashlib
import io
import os
import tempfile
from pathlib import Path

import duckdb
import pytest

import tracekit
from tracekit.cli import main
from tracekit.errors import TracekitError
from tracekit.query import fetch_limited, query
from tracekit.store import open_run
from tracekit.synth import generate_run


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ro")
    generate_run(root / "run", num_experts=16, top_k=2, moe_layers=[0, 1], requests=4, prompt_tokens=5,
                 decode_tokens=3, domains=("code",), weights=True, seed=3)
    (root / "cwd").mkdir()
    return root


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _writers(root: Path) -> list[str]:
    """SQL that would write if DuckDB could touch files: into the run, next to it, and into the working dir."""
    run = root / "run"
    part = open_run(run).files["routes"][0]
    kv = "KV_METADATA {'tracekit.schema_version': '1'}"
    targets = [str(part), str(run / "routes" / "part-r000-c999999.parquet"), str(run / "manifest.json"),
               str(root / "cwd" / "x.parquet"), "x.csv"]
    sql = []
    for t in targets:
        sql += [
            f"COPY (SELECT * FROM routes) TO '{t}' (FORMAT parquet, {kv})",
            f"EXPLAIN ANALYZE COPY (SELECT * FROM routes) TO '{t}' (FORMAT parquet, {kv})",
            f"COPY routes TO '{t}'",
            f"SELECT 1; COPY (SELECT 1) TO '{t}'",
        ]
    sql += [
        f"ATTACH '{run}/x.db' AS x",
        f"EXPLAIN ANALYZE ATTACH '{run}/y.db'",
        f"EXPORT DATABASE '{run}/export'",
        "EXPORT DATABASE 'exported'",
        "INSTALL httpfs",
        "LOAD httpfs",
        "PRAGMA enable_profiling = 'json'",
        f"SET profiling_output = '{run}/profile.json'",
        f"PRAGMA profile_output = '{run}/profile.json'",
        "SET temp_directory = 'spill_here'",
        "SET enable_external_access = true",
        "SET lock_configuration = false",
        "CHECKPOINT",
        "SELECT * FROM query('COPY (SELECT 1) TO ''q.csv''')",
        f"SELECT * FROM read_csv('{run}/manifest.json')",
        "SELECT * FROM read_text('/etc/passwd')",
        f"SELECT * FROM glob('{run}/*')",
        "CREATE TABLE t AS SELECT * FROM routes",
        "DELETE FROM runs",
        "DROP VIEW routes",
        "-- a comment first\nCOPY (SELECT 1) TO 'c.csv'",
    ]
    return sql


@pytest.mark.parametrize("path", ["cli-query", "cli-sql", "connect"])
def test_no_sql_text_changes_any_file(root, monkeypatch, capsys, path):
    monkeypatch.chdir(root / "cwd")
    before = _snapshot(root)
    for sql in _writers(root):
        if path == "cli-query":
            with pytest.raises(SystemExit) as exc:
                main(["query", str(root / "run"), "--", sql])
            err = capsys.readouterr().err.strip()
            assert exc.value.code == 2, sql
            assert len(err.splitlines()) == 1 and err.startswith("error:"), (sql, err)
        elif path == "cli-sql":
            monkeypatch.setattr("sys.stdin", io.StringIO(sql.rstrip(";") + ";\n"))
            with pytest.raises(SystemExit) as exc:
                main(["sql", str(root / "run")])
            err = capsys.readouterr().err.strip()
            assert exc.value.code == 2 and "Traceback" not in err, (sql, err)
        else:  # a notebook: the raw connection, no statement filter at all
            con = tracekit.connect(root / "run")
            try:
                con.execute(sql)
                if con.description:
                    con.fetchall()
            except duckdb.Error:
                pass
            finally:
                con.close()
        assert _snapshot(root) == before, f"{path}: {sql!r} changed files"


def test_the_raw_connection_still_reads(root):
    con = tracekit.connect(root / "run")
    n = con.sql("SELECT count(*) FROM routes").fetchall()[0][0]
    assert n == open_run(root / "run").table().num_rows > 0
    # weights are float16 on disk and read as float32; both expert widths are fine
    assert con.sql("SELECT typeof(weights) FROM routes LIMIT 1").fetchall()[0][0] == "FLOAT[]"
    con.close()


def test_spill_folder_is_private_and_removed(root, monkeypatch):
    monkeypatch.chdir(root / "cwd")
    con = tracekit.connect(root / "run", memory_limit="64MB")
    spill = Path(con.sql("SELECT current_setting('temp_directory')").fetchall()[0][0])
    assert spill.is_dir() and Path(tempfile.gettempdir()) in spill.parents
    assert root not in spill.parents and Path.cwd() not in spill.parents
    # big enough to spill under 64 MB: DuckDB writes its temp file into the private folder only
    t = fetch_limited(con, "SELECT count(*) AS n FROM (SELECT i % 3000000 AS g, count(*) FROM range(12000000) t(i) "
                           "GROUP BY g)")
    assert t.column("n").to_pylist() == [3000000]
    con.close()
    del con
    gc.collect()
    assert not spill.exists()
    assert list((root / "cwd").iterdir()) == []


def test_timeout_stops_a_query_with_one_line(root, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["query", str(root / "run"), "--timeout", "0.5", "SELECT count(*) FROM range(1000000000000) a"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and "--timeout" in err


@pytest.mark.parametrize("args, message", [
    (["--memory-limit", "lots"], "--memory-limit"),
    (["--timeout", "-1"], "--timeout"),
])
def test_bad_limits_are_one_line(root, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        main(["query", str(root / "run"), *args, "SELECT 1"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and message in err and "Traceback" not in err


def test_library_query_refuses_writes(root):
    with pytest.raises(TracekitError, match="not allowed"):
        query(root / "run", "CREATE TABLE t AS SELECT 1")
    with pytest.raises(TracekitError, match="file system operations are disabled|not allowed"):
        query(root / "run", f"EXPLAIN ANALYZE COPY (SELECT 1) TO '{root}/cwd/x.csv'")
    assert not (root / "cwd" / "x.csv").exists()
    assert os.listdir(root / "cwd") == []


# --- the filter reads DuckDB's parsed statement tree, not the leading keyword (issue 19.4) -----------------------

REWRITES = [
    "WITH x AS (DELETE FROM runs RETURNING 1) SELECT * FROM x",
    "WITH y AS (INSERT INTO runs SELECT * FROM runs RETURNING 1) SELECT count(*) FROM y",
    "WITH z AS (UPDATE runs SET run_id = 'forged' RETURNING 1) SELECT 1",
    "SELECT * FROM (WITH x AS (DELETE FROM runs RETURNING 1) SELECT * FROM x) t",
    "SELECT 1 UNION ALL (WITH x AS (DELETE FROM runs RETURNING 1) SELECT 1 FROM x)",
    "EXPLAIN ANALYZE CREATE OR REPLACE VIEW requests AS SELECT 'forged' AS prompt_id",
    "EXPLAIN ANALYZE DROP VIEW routes",
    "EXPLAIN ANALYZE CREATE MACRO m(a) AS a + 1",
    "EXPLAIN ANALYZE CREATE TABLE t AS SELECT 1",
    "EXPLAIN ANALYZE INSERT INTO runs SELECT * FROM runs",
    "EXPLAIN CREATE TABLE t AS SELECT 1",
    "explain   analyse  (FORMAT json) DELETE FROM runs",
    "EXPLAIN EXPLAIN ANALYZE DROP VIEW routes",
    "EXPLAIN ANALYZE WITH x AS (DELETE FROM runs RETURNING 1) SELECT * FROM x",
    "/* c */ EXPLAIN ANALYZE -- c\n DROP VIEW choices",
    "SELECT 1; EXPLAIN ANALYZE DROP VIEW routes",
]


@pytest.mark.parametrize("sql", REWRITES)
def test_rewrites_inside_ctes_and_explain_are_refused(root, capsys, sql):
    with pytest.raises(TracekitError, match="not allowed|cannot tell|invalid SQL"):
        query(root / "run", sql)
    with pytest.raises(SystemExit) as exc:
        main(["query", str(root / "run"), "--", sql])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error:"), err


@pytest.mark.parametrize("sql", ["SELECT count(*) FROM routes", "EXPLAIN SELECT * FROM routes",
                                 "EXPLAIN ANALYZE SELECT count(*) FROM choices", "DESCRIBE requests",
                                 "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) "
                                 "SELECT sum(n) FROM r", "SELECT (SELECT count(*) FROM runs) AS n",
                                 "FROM requests LIMIT 1", "SUMMARIZE runs"])
def test_reads_still_pass(root, sql):
    assert query(root / "run", sql).num_rows >= 1


def test_sql_shell_keeps_no_forged_view(root, monkeypatch, capsys):
    """Even a statement that got past the filter could not leave anything behind: each runs in a transaction
    that is rolled back. Here the forged statements are refused and the later reads see the real views."""
    real = query(root / "run", "SELECT count(*) AS n FROM requests").column("n")[0].as_py()
    script = ("EXPLAIN ANALYZE CREATE OR REPLACE VIEW requests AS SELECT 'forged' AS x;\n"
              "WITH x AS (DELETE FROM runs RETURNING 1) SELECT * FROM x;\n"
              "SELECT count(*) AS n FROM requests;\nSELECT count(*) AS r FROM runs;\n")
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    with pytest.raises(SystemExit) as exc:
        main(["sql", str(root / "run"), "--max-rows", "5"])
    out, err = capsys.readouterr()
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 2
    assert "forged" not in out and f"│ {real} │" in out


def test_a_statement_that_changes_the_catalog_is_rolled_back(root):
    """The second wall on its own: a change made inside stream_result's transaction does not outlive it."""
    from tracekit.query import connect, stream_result

    con = connect(root / "run")
    try:
        with stream_result(con, "SELECT count(*) FROM runs") as batches:
            list(batches)
            con.execute("CREATE OR REPLACE VIEW requests AS SELECT 'forged' AS x")  # as if it had slipped through
        assert "forged" not in str(con.sql("SELECT * FROM requests LIMIT 1").fetchall())
    finally:
        con.close()
