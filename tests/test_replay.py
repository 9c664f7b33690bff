"""Per-step replay on hand-built traces: step layout, per-GPU traffic in both DeepEP modes, time, engines."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tracekit.errors import TracekitError
from tracekit.placement.scoring import replay as rp
from tracekit.placement.scoring.comm import score_placement
from tracekit.placement.scoring.hardware import PROFILES, get_profile
from tracekit.placement.data.types import Cluster, GroupingRule, Placement, TraceArrays


def traces(rows, num_experts, num_layers=1):
    """rows: (request, layer_pos, position, phase, [experts])."""
    req = np.array([r[0] for r in rows], dtype=np.int32)
    return TraceArrays(
        layers=np.arange(num_layers) + 1, num_experts=num_experts, request=req,
        layer_pos=np.array([r[1] for r in rows], dtype=np.int16),
        experts=np.array([r[4] for r in rows], dtype=np.uint8),
        phase=np.array([r[3] for r in rows], dtype=np.int8),
        token=np.array([r[2] for r in rows], dtype=np.int32),
        request_domain=np.array(["x"] * (int(req.max()) + 1), dtype=object),
    )


# request 0: prefill 0..2, decode 3..5; request 1: prefill 0..1, decode 2..3; request 2: prefill 0..3, decode 4
LAYOUT_ROWS = ([(0, 0, p, 0, [0]) for p in range(3)] + [(0, 0, p, 1, [0]) for p in range(3, 6)]
               + [(1, 0, p, 0, [0]) for p in range(2)] + [(1, 0, p, 1, [0]) for p in range(2, 4)]
               + [(2, 0, p, 0, [0]) for p in range(4)] + [(2, 0, 4, 1, [0])])
LAYOUT_HOME = np.array([0, 1, 0])


def test_prefill_chunks_and_decode_batches():
    tr = traces(LAYOUT_ROWS, 2)
    lay = rp.step_layout(tr, None, LAYOUT_HOME, decode_batch=1, prefill_chunk=4)
    # rank 0 prefill: r0 p0-2 + r2 p0 -> step 0 (index 0..3); r2 p1-3 -> step 1 (0..2); rank 1: r1 p0-1 -> step 0
    assert lay.step[:3].tolist() == [0, 0, 0] and lay.index[:3].tolist() == [0, 1, 2]
    assert lay.step[10:14].tolist() == [0, 1, 1, 1] and lay.index[10:14].tolist() == [3, 0, 1, 2]
    assert lay.step[6:8].tolist() == [0, 0] and lay.index[6:8].tolist() == [0, 1]
    # decode, one token per rank per step, (decode index, request) order: rank 0 runs r0's 1st, r2's 1st, r0's 2nd,
    # r0's 3rd (global steps 2..5); rank 1 runs r1's two tokens (steps 2, 3)
    assert lay.step[3:6].tolist() == [2, 4, 5]
    assert lay.step[14] == 3
    assert lay.step[8:10].tolist() == [2, 3]
    assert lay.index[3:6].tolist() == [0, 0, 0]
    assert lay.phase.tolist() == [0, 0, 1, 1, 1, 1]
    assert lay.tokens.tolist() == [6, 3, 2, 2, 1, 1]
    assert lay.full.tolist() == [True, True, True, True, True, True]  # 3 * 2 >= 6 and 1 * 2 >= 2


def test_decode_batches_fill_with_consecutive_tokens_and_order_by_request():
    tr = traces(LAYOUT_ROWS, 2)
    lay = rp.step_layout(tr, None, LAYOUT_HOME, decode_batch=2, prefill_chunk=4)
    # rank 0: step 2 = r0's 1st (index 0), r2's 1st (index 1); step 3 = r0's 2nd and 3rd; rank 1: r1's two at step 2
    assert lay.step[3:6].tolist() == [2, 3, 3] and lay.index[3:6].tolist() == [0, 0, 1]
    assert lay.step[14] == 2 and lay.index[14] == 1
    assert lay.step[8:10].tolist() == [2, 2] and lay.index[8:10].tolist() == [0, 1]
    assert lay.tokens.tolist() == [6, 3, 4, 2]
    assert lay.full.tolist() == [True, True, True, True]  # 2 * 2 >= 4
    # a mask drops rows; the kept decode tokens of r0 count from its first kept one
    mask = np.ones(len(tr), bool)
    mask[3] = False
    lay2 = rp.step_layout(tr, mask, LAYOUT_HOME, decode_batch=2, prefill_chunk=4)
    assert lay2.step[3] == -1 and lay2.step[4:6].tolist() == [2, 3]
    assert lay2.tokens.tolist() == [6, 3, 4, 1]
    assert lay2.full.tolist() == [True, True, True, False]  # 1 * 2 < 4: a drain step, left out of the statistics
    with pytest.raises(TracekitError, match="decode-batch"):
        rp.step_layout(tr, None, LAYOUT_HOME, decode_batch=0)


def test_step_counts_both_modes_exact():
    # 2 nodes x 2 GPUs; destinations given directly as GPUs
    sc = rp.StepCounts(num_steps=2, num_layers=1, num_gpus=4, gpus_per_node=2)
    # step 0, decode (low-latency), home GPU0 -> GPUs 2, 3: two RDMA sends, one into each
    sc.add(np.array([0]), np.array([0]), np.array([0]), np.array([[2, 3]]), np.array([True]))
    # step 1, prefill (normal): home GPU0 -> 2, 3: one RDMA send to node 1 landing on GPU2 (local rank 0), then an
    # NVLink forward 2 -> 3; home GPU1 -> 0, 3: NVLink 1 -> 0, one RDMA send landing on GPU3 (local rank 1) = dest
    sc.add(np.array([1, 1]), np.array([0, 0]), np.array([0, 1]), np.array([[2, 3], [0, 3]]), np.array([False, False]))
    r = lambda a: a.reshape(2, 4).tolist()  # noqa: E731
    assert r(sc.load) == [[0, 0, 1, 1], [1, 0, 1, 2]]
    assert r(sc.rdma_out) == [[2, 0, 0, 0], [1, 1, 0, 0]]
    assert r(sc.rdma_in) == [[0, 0, 1, 1], [0, 0, 1, 1]]
    assert r(sc.nvl_out) == [[0, 0, 0, 0], [0, 1, 1, 0]]
    assert r(sc.nvl_in) == [[0, 0, 0, 0], [1, 0, 0, 1]]


def test_step_time_from_the_profile():
    sc = rp.StepCounts(num_steps=1, num_layers=2, num_gpus=2, gpus_per_node=1)  # 2 nodes x 1 GPU
    # layer 0: GPU0 sends 3 LL copies to GPU1, GPU1 keeps 1; layer 1: nothing crosses, GPU0 holds 2 pairs
    sc.add(np.zeros(2, np.int64), np.array([0, 0]), np.array([0, 1]), np.array([[1, 1, 1], [1, 1, 1]]),
           np.array([True, True]))
    sc.add(np.zeros(1, np.int64), np.array([1]), np.array([0]), np.array([[0, 0, 0]]), np.array([True]))
    prof = get_profile("h200", tflops=1.0, rdma_gbps=1.0, nvlink_gbps=10.0)
    lay = rp.StepLayout(np.zeros(3, np.int32), np.zeros(3, np.int32), np.array([1], np.int8), np.array([3]),
                        np.array([True]))
    out = sc.summary(lay, prof, hidden_size=1000, bytes_per_elem=1, moe_intermediate_size=500)
    flops = 6 * 1000 * 500  # per (token, expert) pair
    # layer 0: busiest GPU holds 6 pairs; 3 RDMA copies of 1000 B (dispatch) and 2000 B (combine) at 1 GB/s
    t0 = 6 * flops / 1e12 + 3 * 1000 / 1e9 + 3 * 2000 / 1e9
    t1 = 3 * flops / 1e12  # layer 1: 3 pairs on GPU0, no traffic
    assert out["step_time_ms"] == pytest.approx((t0 + t1) * 1e3)
    assert out["imbalance_p50"] == pytest.approx((6 + 3) / (3 + 1.5))
    assert out["cross_node_bytes_per_step"] == pytest.approx(3000)
    assert out["step_phase"] == "decode" and out["prefill_full_steps"] == 0


def test_score_placement_engines_differ_per_step():
    # 1 node x 2 GPUs, E=2, R=2: each GPU holds both experts (slots 0,1 | 2,3 hold 0,1 | 0,1)
    cl = Cluster(1, 2, 2, 2)
    p = Placement(cl, np.array([1]), np.array([[0, 1, 0, 1]]), "test", grouping=GroupingRule())
    # four requests homed on GPU 0, one decode token each, all to expert 0: one decode step of 4 tokens
    tr = traces([(r, 0, 10, 1, [0]) for r in range(4)], 2)
    home = np.zeros(4, np.int64)
    sg = score_placement(p, tr, engine="sglang", home=home, decode_batch=4)
    vl = score_placement(p, tr, engine="vllm", home=home, decode_batch=4)
    tt = score_placement(p, tr, engine="trtllm", home=home, decode_batch=4)
    assert sg["engine"] == "sglang" and sg["full_steps"] == 1 and sg["tokens_per_step"] == 4
    assert sg["imbalance_p50"] == pytest.approx(2.0)  # SGLang keeps every token on its own GPU's replica
    assert vl["imbalance_p50"] == pytest.approx(1.0)  # vLLM alternates replicas by token index parity
    assert tt["imbalance_p50"] == pytest.approx(1.0)  # TRT-LLM round-robins within the block
    # 4 decode pairs are far below the roofline's ridge: each GPU's time is reading expert 0's weights once, which
    # splitting the pairs does not shorten, so vLLM's split only adds its NVLink copies
    assert sg["step_time_ms"] < vl["step_time_ms"]
    assert sg["hbm_ms_per_step"] > sg["compute_ms_per_step"] and sg["slots_read_per_step"] == 1
    # with HBM made (unrealistically) fast the step is compute-bound: GPU0 computes 4 pairs instead of 2
    fast = dict(home=home, decode_batch=4, hbm_gbps=1e7)
    assert score_placement(p, tr, engine="sglang", **fast)["step_time_ms"] > \
        score_placement(p, tr, engine="vllm", **fast)["step_time_ms"]
    for key in ("step_time_ms", "step_time_p99_ms", "imbalance_p50", "imbalance_p99", "cross_node_bytes_per_step",
                "cross_node_copies_per_token_normal", "cross_node_copies_per_token_lowlat", "gpu_load_max_over_mean"):
        assert key in sg


def test_profiles_and_overrides():
    assert set(PROFILES) == {"h100", "h200", "b200"}
    assert get_profile("B200").nvlink_gbps == 900.0
    assert get_profile("h100", rdma_gbps=25.0).rdma_gbps == 25.0
    with pytest.raises(TracekitError, match="unknown hardware profile"):
        get_profile("a100")
    with pytest.raises(TracekitError, match="tflops"):
        get_profile("h200", tflops=0)


def test_place_cli_engine_profile_and_export_warning(shared_data, tmp_path, capsys):
    from tracekit.importers.jsonl import import_jsonl

    d = shared_data / "traces" / "mixtral-8x7b"
    run = import_jsonl([d / "routing_data_collected_humaneval_2_routing.jsonl"], model="mixtral-8x7b",
                       out=tmp_path / "run")

    from tests._cli import run_cli

    def cli(*args) -> int:
        return run_cli(args)

    js, out = tmp_path / "cmp.json", tmp_path / "p.json"
    assert cli("place", run, "--nodes", 2, "--gpus-per-node", 2, "--redundant", 4, "--strategy", "eplb",
               "--split", "tokens", "--hidden-size", 4096, "--moe-intermediate-size", 14336, "--engine", "vllm",
               "--profile", "b200", "--decode-batch", 8, "--rdma-gbps", 25, "--json", js, "-o", out) == 0
    cmp = json.loads(js.read_text())
    assert cmp["meta"]["engine"] == "vllm" and cmp["meta"]["eval_opts"]["profile"] == "b200"
    held = next(r for r in cmp["rows"] if r["strategy"] == "eplb")["heldout"]
    assert held["engine"] == "vllm" and held["profile"] == "b200" and held["step_time_ms"] > 0
    assert held["tokens_per_step"] <= 4 * 8
    assert json.loads(out.read_text())["meta"]["engine"] == "vllm"
    capsys.readouterr()
    assert cli("export", out, "--format", "sglang", "-o", tmp_path / "s.json") == 0
    printed = capsys.readouterr().out
    assert "warning: this placement's numbers were computed for vllm dispatch" in printed
    assert cli("place", run, "--nodes", 2, "--gpus-per-node", 2, "--redundant", 4, "--engine", "tgi") == 2
    assert "unknown engine 'tgi'" in capsys.readouterr().err
    assert cli("place", run, "--nodes", 2, "--gpus-per-node", 2, "--redundant", 4, "--profile", "a100") == 2
