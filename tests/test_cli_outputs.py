"""Output targets (tracekit.outputs) and the CLI surface around them: --force, atomic writes, plain help text."""
from __future__ import annotations

import json
import os
import re

import pytest

from tests._cli import cli
from tracekit.errors import TracekitError
from tracekit.outputs import atomic_write, check_file, check_folder, distinct, enclosing_run, is_run_dir


def run_cli(args, capsys):
    return cli(capsys, *args)


@pytest.fixture
def small_run(tmp_path, capsys):
    """A real run directory imported from a few JSONL routing records (no model needed)."""
    src = tmp_path / "r.jsonl"
    with open(src, "w") as f:
        for pid in range(3):
            for t in range(4):
                for layer in range(2):
                    f.write(json.dumps({"experts": [(t + layer) % 8, (t + layer + 1) % 8], "gating_probs": [0.6, 0.4],
                                        "problem_id": pid, "layer": layer, "token_idx": t, "dataset": "humaneval"}) + "\n")
    run = tmp_path / "run"
    code, _, err = run_cli(["import", "jsonl", src, "--model", "m", "--out", run], capsys)
    assert code == 0, err
    return run


def test_run_directory_detection(tmp_path, small_run):
    assert is_run_dir(small_run) and enclosing_run(small_run / "routes" / "x.parquet") == small_run
    assert enclosing_run(small_run) == small_run and enclosing_run(tmp_path / "elsewhere.csv") is None
    # a run interrupted before its first manifest write is still a run: its chunks are there
    bare = tmp_path / "bare"
    (bare / "routes").mkdir(parents=True)
    (bare / "routes" / "part-r000-c000000.parquet").write_bytes(b"x")
    assert is_run_dir(bare)
    # a symlink that points into a run is judged by where it points
    link = tmp_path / "link"
    link.symlink_to(small_run / "routes")
    assert enclosing_run(link / "new.parquet") == small_run
    with pytest.raises(TracekitError, match="inside the run directory"):
        check_file(link / "new.parquet", force=True, option="-o")


def test_check_file_rules(tmp_path):
    f = tmp_path / "a.csv"
    assert check_file(f, force=False, option="-o") == f  # new file: fine
    f.write_text("x")
    with pytest.raises(TracekitError, match="pass --force"):
        check_file(f, force=False, option="-o")
    assert check_file(f, force=True, option="-o") == f
    with pytest.raises(TracekitError, match="is a folder"):
        check_file(tmp_path, force=True, option="-o")
    with pytest.raises(TracekitError, match="is a file, not a folder"):
        check_file(f / "b.csv", force=True, option="-o")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(TracekitError, match="dangling"):
        check_file(dangling, force=True, option="-o")


def test_check_folder_rules(tmp_path):
    d = tmp_path / "out"
    check_folder(d, force=False, option="--out")  # new folder
    d.mkdir()
    check_folder(d, force=False, option="--out")  # empty folder
    (d / "x.png").write_text("x")
    with pytest.raises(TracekitError, match="already holds files"):
        check_folder(d, force=False, option="--out")
    check_folder(d, force=True, option="--out")
    check_folder(d, force=False, option="--out", names=["y.png"])  # only the files it will write count
    with pytest.raises(TracekitError, match="is a file"):
        check_folder(d / "x.png", force=True, option="--out")
    with pytest.raises(TracekitError, match="same path"):
        distinct(("-o", tmp_path / "a"), ("--json", tmp_path / "." / "a"))


def test_atomic_write_leaves_no_temporary_and_keeps_the_old_file(tmp_path):
    f = tmp_path / "result.csv"
    f.write_text("old")
    for exc in (RuntimeError("disk full"), KeyboardInterrupt()):
        def failing(tmp, exc=exc):
            with open(tmp, "w") as fh:
                fh.write("half")
            raise exc

        with pytest.raises(type(exc)):
            atomic_write(f, failing)
        assert f.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["result.csv"]


def test_atomic_write_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        p = atomic_write(tmp_path / "a" / "b.txt", lambda tmp: open(tmp, "w").write("x"))
    finally:
        os.umask(old)
    assert p.read_text() == "x" and (p.stat().st_mode & 0o777) == 0o644


def test_query_output_needs_force_to_replace(small_run, tmp_path, capsys):
    out = tmp_path / "n.csv"
    sql = "select count(*) as n from routes"
    assert run_cli(["query", small_run, sql, "-f", "csv", "-o", out], capsys)[0] == 0
    assert out.read_text().splitlines() == ['"n"', "24"]
    out.write_text("mine")
    code, _, err = run_cli(["query", small_run, sql, "-f", "csv", "-o", out], capsys)
    assert code == 2 and "--force" in err and out.read_text() == "mine"
    assert run_cli(["query", small_run, sql, "-f", "csv", "-o", out, "--force"], capsys)[0] == 0
    assert out.read_text().splitlines() == ['"n"', "24"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n.csv", "r.jsonl", "run"]  # no temporaries


def test_query_sql_starting_with_a_comment_after_double_dash(small_run, capsys):
    code, out, err = run_cli(["query", "-f", "csv", "--", small_run, "-- how many\nselect count(*) as n from routes"],
                             capsys)
    assert code == 0 and out.splitlines() == ['"n"', "24"], err


def test_analyze_out_folder_rules(small_run, tmp_path, capsys):
    out = tmp_path / "tables"
    assert run_cli(["analyze", small_run, "--what", "imbalance", "--out", out, "--format", "csv"], capsys)[0] == 0
    written = sorted(p.name for p in out.iterdir())
    assert written and all(n.startswith("imbalance_") and n.endswith(".csv") for n in written)
    code, _, err = run_cli(["analyze", small_run, "--what", "imbalance", "--out", out, "--format", "csv"], capsys)
    assert code == 2 and "--force" in err
    assert run_cli(["analyze", small_run, "--what", "imbalance", "--out", out, "--format", "csv", "--force"], capsys)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == written


def _help(args, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run_cli([*args, "--help"], capsys)
    assert code == 0
    return out


def test_flags_show_no_value_placeholder(capsys, monkeypatch):
    for args in (["collect"], ["place"], ["query"], ["info"]):
        text = _help(args, capsys, monkeypatch)
        assert "--help" in text and "<bool>" not in text, args
    text = _help(["collect"], capsys, monkeypatch)
    assert re.search(r"--limit\s+<int range>", text)  # options that take a value keep their type


def test_slot_map_is_shown_only_where_it_applies(capsys, monkeypatch):
    assert "--slot-map" in _help(["import", "routed-experts"], capsys, monkeypatch)
    for fmt in ("sglang-per-token", "sglang-stat", "trtllm-stats"):
        assert "--slot-map" not in _help(["import", fmt], capsys, monkeypatch), fmt


def test_datasets_table_prints_templates_verbatim(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    code, out, _ = run_cli(["datasets"], capsys)
    assert code == 0 and "{conversations[0][value]}" in out and "{turns[0]}" in out


def test_query_table_prints_markup_like_text_verbatim(small_run, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    code, out, err = run_cli(["query", small_run, "select '[bold]x[/bold] [value]' as t"], capsys)
    assert code == 0 and "[bold]x[/bold] [value]" in out, err
