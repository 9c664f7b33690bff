"""`place --max-rows`: beyond the budget, placement reads a seeded uniform sample of whole requests (every row of a
kept request, none of the others), says so, and its memory follows the budget, not the run."""
from __future__ import annotations

import numpy as np
import pytest

from tests._cli import cli
from tracekit.placement.data.traces import describe_input, load_traces
from tracekit.synth import generate_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return generate_run(tmp_path_factory.mktemp("p") / "run", num_experts=16, top_k=2, moe_layers=[1, 2, 3],
                        requests=120, prompt_tokens=(3, 9), decode_tokens=(1, 5), seed=5, rows_per_chunk=700)


def _rows_by_request(t):
    out = {}
    for i, key in enumerate(t.request_key[t.request]):
        out.setdefault(key, []).append((int(t.layer_pos[i]), int(t.phase[i]), int(t.token[i]),
                                        tuple(t.experts[i].tolist())))
    return {k: sorted(v) for k, v in out.items()}


def test_a_sample_of_whole_requests_within_the_budget(run):
    full = load_traces([run])
    assert full.sample is None and load_traces([run], max_rows=len(full)).sample is None
    budget = len(full) // 3
    part = load_traces([run], max_rows=budget, seed=7)
    s = part.sample
    assert s["rows"] == len(part) <= budget and s["of_rows"] == len(full)
    assert s["requests"] == len(part.request_key) < s["of_requests"] == len(full.request_key) == 120
    whole, sampled = _rows_by_request(full), _rows_by_request(part)
    assert set(sampled) < set(whole)
    assert all(sampled[k] == whole[k] for k in sampled)  # every row of a kept request, exactly as in the full read
    assert part.num_experts == full.num_experts and np.array_equal(part.layers, full.layers)
    again = load_traces([run], max_rows=budget, seed=7)
    assert list(again.request_key) == list(part.request_key)  # seeded
    assert list(load_traces([run], max_rows=budget, seed=8).request_key) != list(part.request_key)
    line = describe_input(part)
    assert f"a random sample of {s['requests']:,} of 120 requests" in line and f"--max-rows {budget:,}" in line


def test_place_says_it_sampled(run, capsys, tmp_path):
    full = len(load_traces([run]))
    code, out, err = cli(capsys, "place", str(run), "--nodes", "2", "--gpus-per-node", "2", "--strategy", "eplb",
                         "--max-rows", str(full // 2), "--max-imbalance", "3")
    assert code == 0, err
    assert "a random sample of" in out and f"--max-rows {full // 2:,}" in out
    code, out, err = cli(capsys, "place", str(run), "--max-rows", "0")
    assert code == 2 and len(err.strip().splitlines()) == 1
