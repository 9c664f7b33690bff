"""The writer lock on --out: a second collect or import is refused in one line naming the holder's pid; the ranks of
one data-parallel job share the run; a kill -9 never leaves it locked; a finished writer leaves no lock file."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_import_engines import GEO_FLAGS, sglang_response
from tracekit.errors import TracekitError
from tracekit.runlock import lock_path, writer_lock, writer_pid

HOLD = ("import sys, time\n"
        "from tracekit.runlock import writer_lock\n"
        "ctx = writer_lock(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))\nctx.__enter__()\n"
        "print('held', flush=True)\n"
        "time.sleep(120)\n")
COLLECT = ["--model", "tiny-qwen3-moe", "--dataset", "humaneval", "--max-new-tokens", "2", "--batch-size", "2",
           "--chunk-requests", "2", "--no-progress"]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _hold(out: Path, rank: int = 0, world: int = 1) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(out), str(rank), str(world)], stdout=subprocess.PIPE,
                         text=True, env=_env())
    assert p.stdout.readline().strip() == "held"
    return p


def _stop(p: subprocess.Popen) -> None:
    p.kill()
    p.wait()


def _tk(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tracekit", *args], capture_output=True, text=True, env=_env(),
                          timeout=timeout)


def _routed_file(tmp_path: Path) -> Path:
    import numpy as np

    resp, _ = sglang_response(np.random.default_rng(0), 4, 3)
    f = tmp_path / "r.jsonl"
    f.write_text(json.dumps(resp) + "\n")
    return f


def test_second_import_is_refused_while_a_writer_holds_out(tmp_path):
    out = tmp_path / "run"
    holder = _hold(out)
    try:
        r = _tk("import", "routed-experts", str(_routed_file(tmp_path)), "--out", str(out), *GEO_FLAGS)
        assert r.returncode == 2
        assert r.stderr == (f"error: {out} is being written by another tracekit process (pid {holder.pid}); "
                            "wait for it or choose another --out\n")
        assert not out.exists()
        assert writer_pid(out) == str(holder.pid)
    finally:
        _stop(holder)
    # the kill -9 released it: the same import now succeeds and leaves no lock or staging file behind
    assert writer_pid(out) is None
    r = _tk("import", "routed-experts", str(_routed_file(tmp_path)), "--out", str(out), *GEO_FLAGS)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.jsonl", "run"]


def test_collect_is_refused_while_a_writer_holds_out(tmp_path):
    out = tmp_path / "run"
    holder = _hold(out)
    try:
        r = _tk("collect", *COLLECT, "--limit", "2", "--out", str(out))
        assert r.returncode == 2 and r.stderr.count("\n") == 1
        assert f"is being written by another tracekit process (pid {holder.pid})" in r.stderr
        assert not out.exists()
    finally:
        _stop(holder)


def test_data_parallel_ranks_share_the_lock(tmp_path):
    out = tmp_path / "run"
    rank0 = _hold(out, 0, 2)
    try:
        with writer_lock(out, 1, 2):  # rank 1 of the same job joins
            pass
        with pytest.raises(TracekitError, match="being written by another tracekit process"):
            with writer_lock(out, 0, 2):  # a second job's rank 0
                pass
        with pytest.raises(TracekitError, match=f"pid {rank0.pid}"):
            with writer_lock(out):  # a single-process writer
                pass
    finally:
        _stop(rank0)
    single = _hold(out)
    try:
        with pytest.raises(TracekitError, match="being written"):
            with writer_lock(out, 1, 2):  # a DP rank while a single process writes
                pass
    finally:
        _stop(single)


def test_lock_is_reentrant_and_removed_when_released(tmp_path):
    out = tmp_path / "run"
    with writer_lock(out):
        with writer_lock(out):
            assert lock_path(out).exists()
        assert lock_path(out).exists()
    assert not lock_path(out).exists()
    with writer_lock(out, 1, 2):
        assert lock_path(out, 1).exists()
    assert not lock_path(out).exists() and not lock_path(out, 1).exists()


def test_two_collects_with_different_arguments(tmp_path):
    """Concurrent: the second is refused by the lock. Afterwards: refused by the manifest's arguments. The run
    holds the first collect's rows under the first collect's manifest, and `info` sees the live writer."""
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "tracekit", "collect", *COLLECT, "--limit", "40", "--out", str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.time() + 240
        while not (out / "manifest.json").exists():
            assert first.poll() is None, first.communicate()
            assert time.time() < deadline
            time.sleep(0.2)
        info = _tk("info", str(out), "--json")
        if writer_pid(out) == str(first.pid):  # still writing after info returned: info saw it
            m = json.loads(info.stdout)
            assert (m["status"], m["writer_pid"]) == ("running", first.pid)
        second = _tk("collect", *COLLECT, "--limit", "3", "--out", str(out))
        if writer_pid(out) == str(first.pid):  # the first held the lock for the whole second command
            assert second.returncode == 2, second.stderr
            assert f"is being written by another tracekit process (pid {first.pid})" in second.stderr
        assert first.wait(timeout=300) == 0, first.stderr.read()
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGKILL)
            first.wait()
    second = _tk("collect", *COLLECT, "--limit", "3", "--out", str(out))
    assert second.returncode == 2 and second.stderr.count("\n") == 1
    assert "holds another run (limit=40)" in second.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and m["args"]["limit"] == 40 and m["totals"]["routes"]["requests"] == 40
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no lock file left


# --- the lock is on the resolved directory (issue 19.1) ---------------------------------------------------------


def _spellings(tmp_path: Path) -> tuple[Path, list[Path]]:
    """A run directory R and other paths naming it: a symlink to it, a path through a symlinked parent, a
    relative link, and a ``..`` detour through a symlinked directory (lexical normalisation would get it wrong)."""
    real = tmp_path / "data" / "R"
    real.mkdir(parents=True)
    (tmp_path / "A").symlink_to(real)
    (tmp_path / "P").symlink_to(tmp_path / "data")
    (tmp_path / "rel").symlink_to(Path("data") / "R")
    (tmp_path / "data" / "sub").mkdir()
    (tmp_path / "deep").symlink_to(tmp_path / "data" / "sub")
    return real, [tmp_path / "A", tmp_path / "P" / "R", tmp_path / "rel", tmp_path / "deep" / ".." / "R"]


def test_every_spelling_of_one_directory_shares_one_lock(tmp_path):
    real, others = _spellings(tmp_path)
    holder = _hold(real)
    try:
        for other in others:
            assert lock_path(other) == lock_path(real)
            assert writer_pid(other) == str(holder.pid)
            with pytest.raises(TracekitError, match=f"being written by another tracekit process \\(pid {holder.pid}\\)"):
                with writer_lock(other):
                    pass
    finally:
        _stop(holder)
    holder = _hold(others[0])  # held through the symlink: the real path is refused
    try:
        with pytest.raises(TracekitError, match=f"pid {holder.pid}"):
            with writer_lock(real):
                pass
    finally:
        _stop(holder)


def test_import_through_a_symlink_is_refused_while_the_target_is_written(tmp_path):
    real, (link, *_) = _spellings(tmp_path)
    holder = _hold(real)
    try:
        r = _tk("import", "routed-experts", str(_routed_file(tmp_path)), "--out", str(link), *GEO_FLAGS)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert f"is being written by another tracekit process (pid {holder.pid})" in r.stderr
        assert list(real.iterdir()) == []
    finally:
        _stop(holder)
    # unheld: the import through the symlink fills the target, and the symlink still points at it
    r = _tk("import", "routed-experts", str(_routed_file(tmp_path)), "--out", str(link), *GEO_FLAGS)
    assert r.returncode == 0, r.stderr
    assert link.is_symlink() and (real / "manifest.json").is_file()
    assert not [p for p in real.parent.iterdir() if p.name.startswith(".")]  # no staging or lock file left


@pytest.mark.parametrize("command", ["import", "collect"])
def test_dangling_symlink_out_is_refused_in_one_line(tmp_path, command):
    link = tmp_path / "kdangle"
    link.symlink_to(tmp_path / "missing")
    if command == "import":
        r = _tk("import", "routed-experts", str(_routed_file(tmp_path)), "--out", str(link), *GEO_FLAGS)
    else:
        r = _tk("collect", *COLLECT, "--limit", "2", "--out", str(link))
    assert r.returncode == 2, r.stderr
    assert r.stderr == (f"error: --out {link} is a symlink to {tmp_path / 'missing'}, which does not exist; "
                        "create the target directory or give a real directory\n")
    assert not (tmp_path / "missing").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["kdangle"] + (["r.jsonl"] if command == "import" else []))
