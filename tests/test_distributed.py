"""Data-parallel collection: two CPU processes under torchrun (gloo), a dead rank, and resume of what is missing."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import duckdb
import numpy as np

ARGS = ["--model", "tiny-qwen3-moe", "--dataset", "humaneval", "--limit", "6", "--max-new-tokens", "3",
        "--batch-size", "2", "--chunk-requests", "2", "--no-progress"]


def _rows(run_dir):
    return duckdb.connect().sql(
        f"select request_id, phase, position, layer, token_id, experts, weights from '{run_dir}/routes/*.parquet' "
        "order by request_id, layer, phase, position").fetchall()


def assert_same_rows(a_dir, b_dir):
    """Same rows and expert ids; weights to float16 rounding (batch shapes change the last bit)."""
    a, b = _rows(a_dir), _rows(b_dir)
    assert len(a) == len(b) > 0
    assert [r[:6] for r in a] == [r[:6] for r in b]
    np.testing.assert_allclose(np.array([r[6] for r in a]), np.array([r[6] for r in b]), rtol=2e-3, atol=1e-4)


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def test_torchrun_two_processes_equals_one(tmp_path):
    single = tmp_path / "single"
    subprocess.run([sys.executable, "-m", "tracekit", "collect", *ARGS, "--out", str(single)], check=True, env=_env(),
                   capture_output=True)
    multi = tmp_path / "multi"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
         "-m", "tracekit", "collect", *ARGS, "--out", str(multi)],
        env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = sorted(p.name for p in (multi / "routes").glob("*.parquet"))
    assert {f[:9] for f in files} == {"part-r000", "part-r001"}  # each rank wrote its own files
    m = json.loads((multi / "manifest.json").read_text())
    assert m["status"] == "complete" and m["world_size"] == 2 and m["totals"]["routes"]["requests"] == 6
    assert_same_rows(multi, single)


def test_dead_rank_leaves_its_shard_missing_and_rerun_fills_it(tmp_path):
    out = tmp_path / "run"
    # rank 1 of 2 runs alone (rank 0 died before writing anything): its shard lands, the run stays incomplete
    subprocess.run([sys.executable, "-m", "tracekit", "collect", *ARGS, "--out", str(out)], check=True,
                   env=_env(RANK="1", WORLD_SIZE="2"), capture_output=True)
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "running"
    names = sorted(p.name for p in (out / "routes").glob("*.parquet"))
    assert names and all(n.startswith("part-r001") for n in names)
    # re-running rank 0 resumes only what is missing and completes the run
    subprocess.run([sys.executable, "-m", "tracekit", "collect", *ARGS, "--out", str(out)], check=True,
                   env=_env(RANK="0", WORLD_SIZE="2"), capture_output=True)
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and m["totals"]["routes"]["requests"] == 6
    single = tmp_path / "single"
    subprocess.run([sys.executable, "-m", "tracekit", "collect", *ARGS, "--out", str(single)], check=True, env=_env(),
                   capture_output=True)
    assert_same_rows(out, single)


def test_ctrl_c_keeps_finished_chunks_and_rerun_completes(tmp_path):
    """A real SIGINT mid-run: exit 130, one line, every finished chunk readable; the same command then completes."""
    import signal
    import time

    out = tmp_path / "run"
    args = ["--model", "tiny-qwen3-moe", "--dataset", "humaneval", "--limit", "40", "--max-new-tokens", "4",
            "--batch-size", "1", "--chunk-requests", "1", "--no-progress", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "tracekit", "collect", *args], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "routes").glob("part-*.parquet"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    from tracekit.cli import INTERRUPTED

    assert err.strip().splitlines() == [INTERRUPTED]
    finished = sorted((out / "routes").glob("part-*.parquet"))
    assert 2 <= len(finished) < 40
    assert duckdb.connect().execute(f"select count(*) from '{out}/routes/*.parquet'").fetchone()[0] > 0
    assert json.loads((out / "manifest.json").read_text())["status"] == "interrupted"  # Ctrl-C marks the run (issue 10)
    subprocess.run([sys.executable, "-m", "tracekit", "collect", *args], check=True, env=_env(), capture_output=True)
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and m["totals"]["routes"]["requests"] == 40
    ids = duckdb.connect().execute(f"select count(distinct request_id), count(*) from "
                               f"(select distinct request_id, phase, position, layer from '{out}/routes/*.parquet')").fetchone()
    assert ids[0] == 40 and ids[1] == m["totals"]["routes"]["rows"]  # no duplicated rows
