"""The CLI end to end on a tiny preset with real prompts, and its one-line errors for bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import duckdb
import pytest

from tests._cli import cli


def run_cli(args, capsys):
    return cli(capsys, *args)


def test_collect_info_end_to_end(tmp_path, prompt_data, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run_cli(
        ["collect", "--model", "tiny-llama4", "--dataset", "mt-bench", "--data-file",
         str(prompt_data / "mt_bench_questions.jsonl"), "--limit", "4", "--max-new-tokens", "6",
         "--batch-size", "2", "--out", str(out), "--no-progress"], capsys)
    assert code == 0
    assert "complete" in stdout and "rows (token x layer)" in stdout
    m = json.loads((out / "manifest.json").read_text())
    assert m["model"]["name"] == "tiny-llama4" and m["geometry"]["moe_layers"] == [1, 3]
    assert m["geometry"]["top_k"] == 1 and m["dataset"]["domain"] == "chat"
    con = duckdb.connect()
    rows, reqs, domains = con.execute(
        f"select count(*), count(distinct request_id), list(distinct domain) from '{out}/routes/*.parquet'").fetchone()
    t = m["totals"]["routes"]
    assert rows == t["rows"] == 2 * (t["prompt_tokens"] + t["generated_tokens"]) and reqs == 4 and domains == ["chat"]
    pids = {r[0] for r in con.execute(f"select distinct prompt_id from '{out}/routes/*.parquet'").fetchall()}
    source_ids = {str(json.loads(line)["question_id"]) for line in open(prompt_data / "mt_bench_questions.jsonl")}
    assert pids <= source_ids and len(pids) == 4
    # a fresh run: every row of the summary reads the same for this call as for the whole run (none left blank)
    for label, key in (("prompt tokens", "prompt_tokens"), ("generated tokens", "generated_tokens")):
        line = next(ln for ln in stdout.splitlines() if label in ln)
        assert line.count(f"{t[key]:,}") == 2, line

    code, stdout, _ = run_cli(["info", str(out)], capsys)
    assert code == 0 and "E=128, top-1" in stdout and "4 requests" in stdout
    code, stdout, _ = run_cli(["info", str(out), "--json"], capsys)
    assert json.loads(stdout)["totals"]["routes"]["rows"] == rows


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    "case",
    ["unknown-model", "unknown-dataset", "missing-file", "malformed", "missing-field", "too-long", "limit-0",
     "other-model", "weights-offline"],
)
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, prompt_data, capsys, monkeypatch, case):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never start a real download, even on a machine with network
    out = tmp_path / "run"
    base = ["collect", "--out", str(out), "--no-progress", "--max-new-tokens", "2"]
    gsm = str(prompt_data / "gsm8k_test.jsonl")
    args = {
        "unknown-model": ["--model", "no-such-model"],
        "unknown-dataset": ["--dataset", "no-such-set"],
        "missing-file": ["--dataset", "gsm8k", "--data-file", str(tmp_path / "absent.jsonl")],
        "malformed": ["--dataset", "gsm8k", "--data-file",
                      str(_write(tmp_path / "bad.jsonl", ['{"question": "ok"}', '{"question": "truncated'])) ],
        "missing-field": ["--dataset", "gsm8k", "--data-file", str(_write(tmp_path / "f.jsonl", ['{"text": "no question"}']))],
        "too-long": ["--dataset", "gsm8k", "--data-file",
                     str(_write(tmp_path / "long.jsonl", [json.dumps({"question": "x" * 5000})]))],
        "limit-0": ["--dataset", "gsm8k", "--data-file", gsm, "--limit", "0"],
        "other-model": ["--model", "tiny-qwen3-moe", "--dataset", "gsm8k", "--data-file", gsm, "--limit", "1"],
        "weights-offline": ["--model", "deepseek-v3", "--dataset", "gsm8k", "--data-file", gsm],
    }[case]
    expect = {
        "unknown-model": "unknown model", "unknown-dataset": "unknown dataset", "missing-file": "no such file",
        "malformed": "bad.jsonl:2: malformed JSON", "missing-field": "record 0 has no field", "too-long": "exceeds the model's context",
        "limit-0": "Invalid value for '--limit'", "other-model": "holds another run", "weights-offline": "unreachable",
    }[case]
    if case == "other-model":
        code, _, _ = run_cli(["collect", "--out", str(out), "--no-progress", "--max-new-tokens", "2", "--dataset", "gsm8k",
                              "--data-file", gsm, "--limit", "1"], capsys)
        assert code == 0
        before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    code, stdout, stderr = run_cli(base + args, capsys)
    assert code == 2, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], stderr
    assert "Traceback" not in stderr
    if case == "other-model":
        assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # the existing run is untouched
    else:
        assert not out.exists()


def test_console_script_exit_code_is_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tracekit", "collect", "--model", "nope", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: unknown model 'nope'") and "Traceback" not in proc.stderr


def test_collect_bar_has_an_eta_from_the_first_batch(tmp_path, prompt_data):
    """collect reports a baseline before its first batch, so the bar's ETA is known after one batch (rich's own
    estimate showed -:--:-- until two updates fell within its speed window); a resumed run's requests already done
    do not count as this call's speed."""
    from tracekit.cli.collect_cmd import eta_text
    from tracekit.collect import CollectOptions, collect

    calls = []
    opts = CollectOptions(model="tiny-llama4", dataset="mt-bench", data_file=prompt_data / "mt_bench_questions.jsonl",
                          limit=6, max_new_tokens=2, batch_size=2, chunk_requests=2, out=tmp_path / "run")
    collect(opts, on_progress=lambda *a: calls.append(a), stop_after_chunks=1)
    assert calls[0] == (0, 6, 0) and calls[1][0] == 2
    calls.clear()
    collect(opts, on_progress=lambda *a: calls.append(a))  # resume: 2 of 6 already done
    assert calls[0] == (2, 6, 0) and [c[0] for c in calls[1:]] == [4, 6]
    # the CLI's ETA after the first batch of the resumed call: 2 requests in 8 s, 2 left
    assert eta_text(8.0, calls[1][0] - calls[0][0], 6 - calls[1][0]) == "0:00:08"
    assert eta_text(8.0, 8, 40) == "0:00:40" and eta_text(3.0, 0, 48) == "-:--:--" and eta_text(1.0, 6, 0) == "0:00:00"
