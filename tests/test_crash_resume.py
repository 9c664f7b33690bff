"""Resume after a kill at any point of a real `tracekit collect` subprocess: the final table equals an uninterrupted
run's, every chunk verifies, and no temporary or lock file survives. The first and the final manifest writes and a
chunk write are hit deterministically (fault injection: TRACEKIT_CRASH_BEFORE_RENAME stops the process dead after
the temporary file is written, before the rename); five more kills land at random points of the writing phase;
Ctrl-C / SIGTERM mark the run interrupted. The 20-trial version is benchmarks/crash_trials.py."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tracekit.atomic import CRASH_ENV

LIMIT = 3  # requests, one chunk each
ARGS = ["collect", "--model", "tiny-qwen3-moe", "--dataset", "humaneval", "--limit", str(LIMIT), "--max-new-tokens",
        "3", "--batch-size", "1", "--chunk-requests", "1", "--no-progress"]
KEY = [("request_id", "ascending"), ("layer", "ascending"), ("phase", "ascending"), ("position", "ascending")]


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", CRASH_ENV)}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def _start(out: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tracekit", *ARGS, "--out", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=_env(**env))


def _collect(out: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tracekit", *ARGS, "--out", str(out)], capture_output=True, text=True,
                          env=_env(**env), timeout=600)


def _table(run: Path) -> pa.Table:
    t = pa.concat_tables([pq.read_table(f) for f in sorted((run / "routes").glob("part-*.parquet"))])
    cols = {n: (c.cast(c.type.value_type) if pa.types.is_dictionary(c.type) else c)
            for n, c in zip(t.column_names, t.columns)}
    return pa.table(cols).sort_by(KEY)


def _leftovers(root: Path) -> list[str]:
    """Anything in the run but the manifest, finished chunks, their per-chunk summaries and the run-level load summary
    finalize writes (a temp, a lock ...)."""
    keep = {"run", "run/routes", "run/manifest.json", "run/summaries", "run/summaries/loads", "run/summaries/requests",
            "run/summaries/loads.parquet"}
    chunk_dirs = {"run/routes", "run/summaries/loads", "run/summaries/requests"}
    return [p.relative_to(root).as_posix() for p in sorted(root.rglob("*"))
            if p.relative_to(root).as_posix() not in keep
            and not (p.parent.relative_to(root).as_posix() in chunk_dirs and p.name.startswith("part-")
                     and p.suffix == ".parquet")]


def _info(run: Path, *flags: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "tracekit", "info", str(run), "--json", *flags], capture_output=True,
                       text=True, env=_env())
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> pa.Table:
    root = tmp_path_factory.mktemp("reference")
    r = _collect(root / "run")
    assert r.returncode == 0, r.stderr
    return _table(root / "run")


def _resume_and_check(root: Path, reference: pa.Table) -> None:
    r = _collect(root / "run")
    assert r.returncode == 0, r.stderr
    assert _table(root / "run").equals(reference)
    assert _leftovers(root) == []
    info = _info(root / "run", "--verify")
    assert info["status"] == "complete" and info["integrity"]["state"] == "verified"
    assert info["totals"]["routes"]["requests"] == LIMIT


def test_kill_during_first_manifest_write(tmp_path, reference):
    r = _collect(tmp_path / "run", **{CRASH_ENV: "manifest.json:1"})
    assert r.returncode == 137
    names = [p.name for p in (tmp_path / "run").iterdir()]
    assert len(names) == 1 and names[0].startswith(".manifest.json.") and names[0].endswith(".tmp")
    _resume_and_check(tmp_path, reference)


def test_kill_during_final_manifest_write(tmp_path, reference):
    # manifest writes: the first, one record per chunk, the final one
    r = _collect(tmp_path / "run", **{CRASH_ENV: f"manifest.json:{LIMIT + 2}"})
    assert r.returncode == 137
    assert len(list((tmp_path / "run" / "routes").glob("part-*.parquet"))) == LIMIT
    assert list((tmp_path / "run").glob(".manifest.json.*.tmp"))
    assert _info(tmp_path / "run")["status"] == "interrupted"  # running, and nobody holds the lock
    _resume_and_check(tmp_path, reference)


@pytest.mark.parametrize("nth, folder", [(1, "summaries/loads"), (2, "summaries/requests"), (3, "routes")])
def test_kill_during_a_chunk_write(tmp_path, reference, nth, folder):
    """A chunk's name is written three times: its load summary, its request summary, then the chunk itself."""
    r = _collect(tmp_path / "run", **{CRASH_ENV: f"part-r000-c000001.parquet:{nth}"})
    assert r.returncode == 137
    assert list((tmp_path / "run" / folder).glob(".part-r000-c000001.parquet.*.tmp"))
    _resume_and_check(tmp_path, reference)


def _wait_for_first_chunk(p: subprocess.Popen, run: Path) -> None:
    deadline = time.time() + 300
    while not list((run / "routes").glob("part-*.parquet")) if (run / "routes").is_dir() else True:
        assert p.poll() is None, p.stderr.read()
        assert time.time() < deadline
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_mark_the_run_interrupted(tmp_path, reference, sig):
    run = tmp_path / "run"
    p = _start(run)
    _wait_for_first_chunk(p, run)
    p.send_signal(sig)
    assert p.wait(timeout=120) == 130
    assert "interrupted" in p.stderr.read()
    m = json.loads((run / "manifest.json").read_text())
    if m["status"] != "complete":  # the signal can land after the last chunk
        assert m["status"] == "interrupted"
        assert _info(run)["status"] == "interrupted"
    _resume_and_check(tmp_path, reference)


def test_kill_9_at_random_points_then_resume(tmp_path, reference):
    rng = random.Random(1234)
    for trial in range(5):
        root = tmp_path / f"t{trial}"
        root.mkdir()
        p = _start(root / "run")
        deadline = time.time() + 300
        while not (root / "run" / "manifest.json").exists() and p.poll() is None:
            assert time.time() < deadline
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 4.0))  # somewhere in the writing phase (chunks, records, the final manifest)
        p.send_signal(signal.SIGKILL)
        p.wait()
        _resume_and_check(root, reference)
