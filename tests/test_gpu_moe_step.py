"""benchmarks/gpu_moe_step.py off the GPU: its CPU-only answer, and the pieces it times, checked on the CPU."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tracekit.placement.scoring.hardware import get_profile

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_moe_step.py"
spec = importlib.util.spec_from_file_location("gpu_moe_step", SCRIPT)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only answer needs a machine without CUDA")
def test_cpu_only_machine_says_so_in_one_line_and_exits_0():
    r = subprocess.run([sys.executable, str(SCRIPT), "--model", "mixtral-8x7b"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.count("\n") == 1 and "no CUDA GPU" in r.stdout and "nothing timed" in r.stdout


def test_bad_arguments_exit_2():
    for argv in (["--hidden", "10"], ["--model", "not-a-model"], ["--model", "mixtral-8x7b", "--tokens", "0"],
                 ["--hidden", "8", "--intermediate", "8", "--experts", "2", "--top-k", "3"]):
        with pytest.raises(SystemExit) as exc:
            bench.parse_args(argv)
        assert exc.value.code == 2


def test_route_gives_top_k_distinct_experts_per_token():
    step = bench.route(tokens=50, experts=9, top_k=4, seed=1)
    assert step.pairs == 200 and step.counts.sum() == 200 and step.order.size == 200
    assert step.touched == int((step.counts > 0).sum()) <= 9
    # grouped by expert: within each expert's run every token appears once, and each token appears top_k times
    assert np.bincount(step.order, minlength=50).tolist() == [4] * 50
    start = 0
    for n in step.counts:
        run = step.order[start:start + n]
        assert np.unique(run).size == n
        start += n


def test_loop_mlp_equals_a_per_pair_reference():
    torch.manual_seed(0)
    T, H, I, E = 6, 8, 12, 4
    step = bench.route(T, E, 2, seed=3)
    x = torch.randn(T, H)
    wg, wu, wd = torch.randn(E, H, I), torch.randn(E, H, I), torch.randn(E, I, H)
    got = bench.expert_mlp_loop(x, torch.as_tensor(step.order), torch.as_tensor(step.counts), wg, wu, wd)
    experts = np.repeat(np.arange(E), step.counts)  # the expert of each grouped pair
    want = torch.stack([(torch.nn.functional.silu(x[t] @ wg[e]) * (x[t] @ wu[e])) @ wd[e]
                        for t, e in zip(step.order.tolist(), experts.tolist())])
    torch.testing.assert_close(got, want)


def test_grouped_layout_pads_each_expert_to_16_rows():
    counts = np.array([3, 0, 17, 16])
    ids, rows, offs = bench.grouped_layout(counts)
    assert ids.tolist() == [0, 2, 3] and offs.tolist() == [16, 48, 64] and offs.dtype == np.int32
    assert rows.tolist() == list(range(3)) + list(range(16, 33)) + list(range(48, 64))


def test_estimate_is_the_replay_roofline_by_hand():
    step = bench.route(tokens=4, experts=8, top_k=2, seed=0)
    prof = get_profile("h200")
    est = bench.estimate(step, prof, hidden=4096, intermediate=14336)
    hbm = (step.touched * 3 * 4096 * 14336 * 2 + 8 * 4096 * 4) / 4800e9
    compute = 8 * 6 * 4096 * 14336 / 989e12
    assert est["bound"] == "hbm" and est["estimate_ms"] == pytest.approx(hbm * 1e3)
    assert est["compute_ms"] == pytest.approx(compute * 1e3)
    big = bench.estimate(bench.route(tokens=4096, experts=8, top_k=2), prof, hidden=4096, intermediate=14336)
    assert big["bound"] == "compute"
