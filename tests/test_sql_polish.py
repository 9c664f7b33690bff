"""`tracekit sql` prints every statement's result and keeps DuckDB's hint on the one error line; polish items."""
from __future__ import annotations

import io
import sys

import pytest

from tracekit.cli import main
from tracekit.synth import generate_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return generate_run(tmp_path_factory.mktemp("s") / "run", num_experts=8, top_k=2, moe_layers=[0, 1], requests=4,
                        prompt_tokens=4, decode_tokens=2, seed=0)


def _sql(run, text, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    code = 0
    try:
        main(["sql", str(run)])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_every_statement_of_a_line_prints_its_result(run, monkeypatch, capsys):
    code, out, err = _sql(run, "select 1 a; select 2 b; select 3 c;\n", monkeypatch, capsys)
    assert code == 0 and err == ""
    assert all(f"┃ {c} ┃" in out for c in "abc")


def test_errors_keep_duckdbs_hint_on_one_line(run, monkeypatch, capsys):
    code, out, err = _sql(run, "select * from route; select requst_id from requests; select 7 ok;\n", monkeypatch,
                          capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 2
    assert 'Did you mean "routes"' in lines[0]
    assert "Candidate bindings" in lines[1] and '"request_id"' in lines[1]
    assert "┃ ok ┃" in out  # the statement after the errors still ran


def test_tables_lists_loads_by_step(run, monkeypatch, capsys):
    code, out, _ = _sql(run, ".tables\n", monkeypatch, capsys)
    assert "loads_by_step" in out.split()


def test_force_help_reads_as_english(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # one help line per option: no phrase broken by the box
    for cmd in (["report"], ["query"], ["analyze"]):
        try:
            main([*cmd, "--help"])
        except SystemExit as exc:
            assert exc.code in (0, None)
        out = " ".join(capsys.readouterr().out.split())
        assert "Replace existing" not in out and "if present" in out


def test_loads_step_window_needs_no_quoting_and_window_stays_as_an_alias(run, tmp_path):
    """`step_window` (not the keyword `window`) in loads and loads_by_step, for routes and loads runs alike; the old
    name still answers when quoted, with the same values."""
    import numpy as np

    from tracekit.query import query
    from tracekit.schema import build_loads_table
    from tracekit.store import base_manifest, finalize, write_chunk, write_manifest

    lr = tmp_path / "loads_run"
    write_manifest(lr, base_manifest(run_id="engine-1", kind="loads", source="test", model={"name": "m"},
                                     geometry={"moe_layers": [1], "num_experts": 4, "top_k": 2},
                                     dataset={"name": "d", "domain": "chat"}, args={}))
    write_chunk(lr, build_loads_table(run_id="engine-1", model="m", dataset="d", domain="chat", phase="mixed",
                                      window=np.array([3, 3, 5, 5]), layer=np.ones(4), expert=np.arange(4),
                                      count=np.array([5, 0, 7, 1])), kind="loads", chunk=0)
    finalize(lr)
    got = query([run, lr], "SELECT run_id, step_window AS w, sum(count) AS n FROM loads "
                           "WHERE step_window IN (0, -1, 5) AND step_window = \"window\" GROUP BY ALL ORDER BY ALL")
    rows = {(r["run_id"], r["w"]): r["n"] for r in got.to_pylist()}
    assert rows[("engine-1", 5)] == 8 and ("engine-1", 3) not in rows
    # the synthetic run: 4 requests x 4 prompt tokens x 2 layers x top-2 in prefill, 4 x 2 decode tokens in decode
    synth = [k for k in rows if k[0] != "engine-1"]
    assert {rows[k] for k in synth if k[1] == 0} == {4 * 4 * 2 * 2} and {rows[k] for k in synth if k[1] == -1} == {4 * 2 * 2 * 2}
    cols = query(run, "SELECT * FROM loads_by_step LIMIT 1").column_names
    assert "step_window" in cols and cols[-1] == "window"
    steps = query(run, "SELECT step_window, sum(count) AS n FROM loads_by_step WHERE step_window > 0 "
                       "AND step_window = \"window\" GROUP BY ALL ORDER BY ALL").to_pylist()
    assert [r["step_window"] for r in steps] == [1, 2] and all(r["n"] == 4 * 2 * 2 for r in steps)
