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
