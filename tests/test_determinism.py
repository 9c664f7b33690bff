"""Same runs, same flags, same seed -> the same bytes, whatever the machine's load and thread counts.

`place` read its rows through a DuckDB query whose ``IN`` filter (a mark join) returned them in thread-scheduling
order, and the partition's sample and near-ties followed that order: on main, two runs of the same command wrote
different placements (on the synthetic run below, 145 of 160 slots differed between two runs). It also decided
near-ties on float dot products that a multi-threaded BLAS may round differently with OMP_NUM_THREADS (now exact
integer counts, BLAS in one thread). Each case runs the real CLI in fresh processes: one thread everywhere, four
threads everywhere, and four threads while CPU burners keep every core busy; the files must be equal byte for byte.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tracekit.synth import generate_run

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("det") / "run"
    generate_run(out, num_experts=32, top_k=4, moe_layers=range(1, 5), num_layers=5, requests=300,
                 prompt_tokens=(128, 512), decode_tokens=(64, 256), seed=5)
    return out


def _tracekit(args, threads: int, burn: bool = False):
    env = {**os.environ, **{v: str(threads) for v in THREAD_VARS}}
    burners = []
    if burn:  # one busy process per core, and one more
        burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                   for _ in range((os.cpu_count() or 1) + 1)]
    try:
        proc = subprocess.run([sys.executable, "-m", "tracekit", *map(str, args)], env=env, capture_output=True,
                              text=True, timeout=600)
    finally:
        for b in burners:
            b.kill()
            b.wait()
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_place_same_bytes_whatever_threads_and_load(run_dir, tmp_path):
    outs = []
    for i, (threads, burn) in enumerate(((1, False), (4, False), (4, True))):
        pick, table = tmp_path / f"pick{i}.json", tmp_path / f"table{i}.json"
        _tracekit(["place", run_dir, "--nodes", 2, "--gpus-per-node", 4, "--redundant", 8, "--max-imbalance", 1.5,
                   "-o", pick, "--json", table], threads, burn)
        outs.append((pick.read_bytes(), table.read_bytes()))
    assert b'"slot_expert"' in outs[0][0]
    for other in outs[1:]:
        assert other[0] == outs[0][0], "the saved placement changed with the thread count or the load"
        assert other[1] == outs[0][1], "the --json comparison changed with the thread count or the load"


def test_place_default_bound_same_bytes(run_dir, tmp_path):
    """The default (relative) bound too, and a grouping (k-means on the prefill signatures: BLAS distances)."""
    outs = []
    for i, threads in enumerate((1, 4)):
        pick = tmp_path / f"pick{i}.json"
        _tracekit(["place", run_dir, "--nodes", 2, "--gpus-per-node", 2, "--redundant", 4, "--grouping",
                   "signature", "-o", pick], threads)
        outs.append(pick.read_bytes())
    assert outs[0] == outs[1]


def test_analyze_and_report_same_bytes(run_dir, tmp_path):
    tables, pages = [], []
    for i, (threads, burn) in enumerate(((1, False), (4, True))):
        out = tmp_path / f"an{i}"
        _tracekit(["analyze", run_dir, "--out", out, "--format", "csv"], threads, burn)
        tables.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
        page = tmp_path / f"report{i}.html"
        _tracekit(["report", run_dir, "-o", page], threads)
        pages.append(re.findall(r"<table.*?</table>", page.read_text(), re.S))
    assert tables[0] and tables[0] == tables[1]
    assert pages[0] and pages[0] == pages[1]
