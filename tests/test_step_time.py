"""The step time's roofline (compute vs HBM reads of touched experts), its profiles, and the model sizes it reads
from the runs' geometry (collect, importers, flags, the "assumed" line)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tracekit.errors import TracekitError
from tracekit.placement.scoring import comm
from tracekit.placement.scoring import replay as rp
from tracekit.placement.scoring.comm import score_placement
from tracekit.placement.scoring.hardware import PROFILES, get_profile, load_gpu_spec
from tracekit.placement.scoring.sizes import assumed_line, model_sizes
from tracekit.placement.data.types import Cluster, GroupingRule, Placement, TraceArrays

from _cli import cli


def _one_step():
    """The layout of one full decode step."""
    return rp.StepLayout(np.zeros(1, np.int32), np.zeros(1, np.int32), np.ones(1, np.int8), np.ones(1, np.int64),
                         np.ones(1, bool))


def _local_counts():
    """1 node x 2 GPUs, 2 slots each (slots 0, 1 on GPU0; 2, 3 on GPU1), one decode step, one layer; every pair
    lands on its home GPU, so nothing crosses. GPU0: 4 pairs on slots 0, 0, 0, 1; GPU1: 2 pairs on slot 3."""
    sc = rp.StepCounts(num_steps=1, num_layers=1, num_gpus=2, gpus_per_node=2, slots_per_gpu=2)
    slots = np.array([[0, 0], [0, 1], [3, 3]])
    sc.add(np.zeros(3, np.int64), np.zeros(3, np.int64), np.array([0, 0, 1]), slots // 2, np.ones(3, bool),
           slots=slots)
    return sc


def test_roofline_hbm_bound_step_by_hand():
    sc = _local_counts()
    # pairs: GPU0 = 4 (slots 0, 0, 0, 1 -> 2 distinct), GPU1 = 2 (slot 3 twice -> 1 distinct)
    assert sc.load.tolist() == [4, 2] and sc.slots_read().ravel().tolist() == [2, 1]
    prof = get_profile("custom", tflops=1.0, hbm_gbps=1.0, nvlink_gbps=1.0, rdma_gbps=1.0)
    out = sc.summary(_one_step(), prof, hidden_size=10, bytes_per_elem=1, moe_intermediate_size=20, weight_bytes=2)
    expert = 3 * 10 * 20 * 2  # bytes of one expert's weights
    hbm0 = (2 * expert + 4 * 10 * (1 + 2)) / 1e9  # two experts read once + 4 pairs' activations in (FP8) and out
    compute0 = 4 * 6 * 10 * 20 / 1e12
    assert hbm0 > 100 * compute0
    assert out["step_time_ms"] == pytest.approx(hbm0 * 1e3)  # nothing crosses: the step is GPU0's weight reads
    assert out["hbm_ms_per_step"] == pytest.approx(hbm0 * 1e3)
    assert out["compute_ms_per_step"] == pytest.approx(compute0 * 1e3)
    assert out["slots_read_per_step"] == 2


def test_roofline_compute_bound_and_per_gpu_max():
    sc = _local_counts()
    # 1e-9 TFLOP/s = 1000 FLOP/s: compute dominates on both GPUs
    prof = get_profile("slow", tflops=1e-9, hbm_gbps=1.0, nvlink_gbps=1.0, rdma_gbps=1.0)
    out = sc.summary(_one_step(), prof, hidden_size=10, bytes_per_elem=1, moe_intermediate_size=20, weight_bytes=2)
    assert out["step_time_ms"] == pytest.approx(4 * 1200 / 1000 * 1e3)
    # the roofline is taken per GPU before the max over GPUs: GPU0 HBM-bound (2 experts, 4 pairs), GPU1
    # compute-bound (2 pairs) -> the step is max(GPU0's HBM, GPU1's compute), not GPU0's compute
    prof = get_profile("mixed", tflops=2400 / 5e-6 / 1e12, hbm_gbps=1.0, nvlink_gbps=1.0, rdma_gbps=1.0)
    out = sc.summary(_one_step(), prof, hidden_size=10, bytes_per_elem=1, moe_intermediate_size=20, weight_bytes=2)
    gpu0 = max(4 * 1200 / (prof.tflops * 1e12), (2 * 1200 + 4 * 30) / 1e9)
    gpu1 = max(2 * 1200 / (prof.tflops * 1e12), (1 * 1200 + 2 * 30) / 1e9)
    assert 2 * 1200 / (prof.tflops * 1e12) > (1200 + 60) / 1e9  # GPU1 is compute-bound
    assert out["expert_ms_per_step"] == pytest.approx(max(gpu0, gpu1) * 1e3)
    assert out["step_time_ms"] == pytest.approx(max(gpu0, gpu1) * 1e3)


def test_weight_bytes_change_the_hbm_term():
    sc = _local_counts()
    prof = get_profile("custom", tflops=1.0, hbm_gbps=1.0, nvlink_gbps=1.0, rdma_gbps=1.0)
    kw = dict(hidden_size=10, bytes_per_elem=1, moe_intermediate_size=20)
    bf16 = sc.summary(_one_step(), prof, weight_bytes=2, **kw)["hbm_ms_per_step"]
    fp8 = sc.summary(_one_step(), prof, weight_bytes=1, **kw)["hbm_ms_per_step"]
    assert bf16 - fp8 == pytest.approx(2 * 3 * 10 * 20 / 1e9 * 1e3)  # GPU0's two experts at one byte less a weight


def _random_case(rng, T=5, M=3, G=4, spg=3, n=400, k=3, zero=True):
    step = rng.integers(0, T, n)
    lp = rng.integers(0, M, n)
    h = rng.integers(0, G, n)
    slots = rng.integers(0, G * spg, (n, k))
    real = rng.random((n, k)) > 0.2 if zero else None
    dg = slots // spg
    if real is not None:
        dg = np.where(real, dg, h[:, None])
    return step, lp, h, slots, dg, real


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("spg", [1, 3, 70])
def test_distinct_slots_exact_against_brute_force(packed, spg):
    rng = np.random.default_rng(spg)
    T, M, G = 5, 3, 4
    step, lp, h, slots, dg, real = _random_case(rng, T=T, M=M, G=G, spg=spg)
    parts = []
    for sl in (slice(0, 150), slice(150, 400)):  # two accumulators, merged, as evaluate's threads do
        sc = rp.StepCounts(T, M, G, 2, slots_per_gpu=spg, packed=packed)
        sc.add(step[sl], lp[sl], h[sl], dg[sl], rng.random(sl.stop - sl.start) < 0.5, real[sl], slots[sl])
        parts.append(sc)
    parts[0].merge(parts[1])
    want = np.zeros((T, M, G), np.int64)
    seen = set()
    for i in range(len(step)):
        for j in range(slots.shape[1]):
            if real[i, j] and (step[i], lp[i], slots[i, j]) not in seen:
                seen.add((step[i], lp[i], slots[i, j]))
                want[step[i], lp[i], slots[i, j] // spg] += 1
    np.testing.assert_array_equal(parts[0].slots_read(), want)
    assert parts[0].packed == packed


def test_steps_without_slots_need_one_slot_per_gpu():
    sc = rp.StepCounts(1, 1, 2, 2, slots_per_gpu=2)
    with pytest.raises(ValueError, match="slots"):
        sc.add(np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros((1, 1), np.int64),
               np.ones(1, bool))


def _traces(rows, num_experts, num_layers=1, geometry=None):
    req = np.array([r[0] for r in rows], dtype=np.int32)
    return TraceArrays(
        layers=np.arange(num_layers), num_experts=num_experts, request=req,
        layer_pos=np.array([r[1] for r in rows], dtype=np.int16),
        experts=np.array([r[4] for r in rows], dtype=np.uint8),
        phase=np.array([r[3] for r in rows], dtype=np.int8),
        token=np.array([r[2] for r in rows], dtype=np.int32),
        request_domain=np.array(["x"] * (int(req.max()) + 1), dtype=object),
        geometry=geometry or {},
    )


def _random_traces(seed=0, R=12, L=3, E=8, k=2, tokens=10, geometry=None):
    rng = np.random.default_rng(seed)
    rows = []
    for r in range(R):
        for t in range(tokens):
            for layer in range(L):
                rows.append((r, layer, t, int(t >= 3), rng.choice(E, k, replace=False).tolist()))
    return _traces(rows, E, L, geometry)


def _placement(E=8, L=3, nodes=2, gpn=2, redundant=4, seed=0):
    cl = Cluster(nodes, gpn, E, redundant)
    rng = np.random.default_rng(seed)
    se = np.stack([np.concatenate([rng.permutation(E), rng.integers(0, E, redundant)]) for _ in range(L)])
    return Placement(cl, np.arange(L), se, "test", grouping=GroupingRule())


@pytest.mark.parametrize("engine", ["sglang", "vllm"])
def test_evaluate_slots_read_matches_a_python_replay(engine):
    """evaluate's slots_read_per_step equals a loop over the rows with the same step layout and replica choice."""
    from tracekit.placement.scoring.dispatch import choose_replicas, replica_lists

    tr, p = _random_traces(), _placement()
    home = np.arange(tr.num_requests) % p.cluster.num_gpus
    out = comm.evaluate(p, tr, engine=engine, home=home, decode_batch=2, prefill_chunk=4)
    lay = rp.step_layout(tr, None, home, decode_batch=2, prefill_chunk=4)
    c = p.cluster
    if engine == "sglang":
        table = comm.dispatch_table(p, "sglang", num_hidden_layers=None)
        slots = table[tr.layer_pos[:, None], home[tr.request][:, None], tr.experts.astype(np.int64)]
    else:
        slots = choose_replicas(np.asarray(p.slot_expert), tr.layer_pos.astype(np.int32),
                                home[tr.request].astype(np.int32), tr.experts.astype(np.int32), engine=engine,
                                gpus_per_node=c.gpus_per_node, num_gpus=c.num_gpus, num_experts=c.num_experts,
                                batch=lay.step.astype(np.int64) * c.num_gpus + home[tr.request],
                                index_in_batch=lay.index, replicas=replica_lists(np.asarray(p.slot_expert), c.num_experts))
    touched: dict[tuple[int, int, int], set] = {}
    for i in range(len(tr)):
        for s in slots[i]:
            touched.setdefault((int(lay.step[i]), int(tr.layer_pos[i]), int(s) // c.slots_per_gpu), set()).add(int(s))
    keep = lay.full & (lay.phase == 1)
    per_step = []
    for t in np.flatnonzero(keep):
        per_step.append(sum(max((len(v) for (tt, m, g), v in touched.items() if tt == t and m == layer), default=0)
                            for layer in range(tr.num_layers)))
    assert out["slots_read_per_step"] == pytest.approx(np.mean(per_step))
    assert out["step_phase"] == "decode"


def test_evaluate_same_numbers_on_one_thread_or_many(monkeypatch):
    tr, p = _random_traces(seed=3, R=30), _placement(seed=3)
    monkeypatch.setattr(comm, "EVAL_THREADS", 1)
    one = comm.evaluate(p, tr, engine="sglang", decode_batch=4)
    monkeypatch.setattr(comm, "EVAL_THREADS", 4)
    import tracekit.placement.data.stats as stats

    monkeypatch.setattr(comm, "row_chunks", lambda n, *size: stats.row_chunks(n, 97))  # many chunks over 4 threads
    many = comm.evaluate(p, tr, engine="sglang", decode_batch=4)
    assert json.dumps(one, sort_keys=True) == json.dumps(many, sort_keys=True)


def test_h100_and_h200_differ_by_their_hbm():
    tr, p = _random_traces(seed=1), _placement(seed=1)
    a = score_placement(p, tr, profile="h100", decode_batch=4)
    b = score_placement(p, tr, profile="h200", decode_batch=4)
    assert a["compute_ms_per_step"] == pytest.approx(b["compute_ms_per_step"])  # same tensor cores
    assert a["hbm_ms_per_step"] / b["hbm_ms_per_step"] == pytest.approx(4800 / 3350)
    assert a["step_time_ms"] > b["step_time_ms"]
    assert (a["profile"], b["profile"]) == ("h100", "h200")


def test_evaluate_takes_the_sizes_from_the_geometry():
    geo = {"hidden_size": 4096, "moe_intermediate_size": 14336, "expert_dtype": "bfloat16"}
    p = _placement(seed=2)
    with_geo = comm.evaluate(p, _random_traces(seed=2, geometry=geo), engine="sglang", decode_batch=4)
    explicit = comm.evaluate(p, _random_traces(seed=2), engine="sglang", decode_batch=4, hidden_size=4096,
                             moe_intermediate_size=14336, expert_dtype="bf16")
    bare = comm.evaluate(p, _random_traces(seed=2), engine="sglang", decode_batch=4)
    for key in ("step_time_ms", "hbm_ms_per_step", "bytes_lowlat"):
        assert with_geo[key] == pytest.approx(explicit[key])
    assert with_geo["sizes_assumed"] == [] and with_geo["moe_intermediate_size"] == 14336
    assert bare["sizes_assumed"] == ["hidden_size", "moe_intermediate_size", "expert_dtype"]
    assert bare["hidden_size"] == 7168 and bare["step_time_ms"] != pytest.approx(with_geo["step_time_ms"])


def test_profiles_hbm_and_gpu_spec(tmp_path):
    assert [PROFILES[n].hbm_gbps for n in ("h100", "h200", "b200")] == [3350.0, 4800.0, 8000.0]
    assert get_profile("h100", hbm_gbps=2000).hbm_gbps == 2000.0
    with pytest.raises(TracekitError, match="unknown hardware profile 'mi300x'"):
        get_profile("mi300x", tflops=1307.0)  # a new name needs every rate
    f = tmp_path / "gpu.json"
    f.write_text(json.dumps({"name": "mi300x", "tflops": 1307, "hbm_gbps": 5300, "nvlink_gbps": 448, "rdma_gbps": 50}))
    assert load_gpu_spec(f) == get_profile("mi300x", tflops=1307, hbm_gbps=5300, nvlink_gbps=448, rdma_gbps=50)
    f.write_text(json.dumps({"base": "h200", "hbm_gbps": 6000}))
    assert load_gpu_spec(f).hbm_gbps == 6000 and load_gpu_spec(f).tflops == 989.0
    for spec, msg in (({"name": "x", "tflops": 1, "hbm_gbps": 1, "nvlink_gbps": 1}, "'rdma_gbps' is missing"),
                      ({"base": "h200", "hbm_gbps": -1}, "hbm-gbps must be a positive number"),
                      ({"base": "h200", "hbm": 1}, "unknown field 'hbm'"),
                      ({"base": "a100"}, "base 'a100'"), ([1, 2], "JSON object")):
        f.write_text(json.dumps(spec))
        with pytest.raises(TracekitError, match=msg):
            load_gpu_spec(f)
    f.write_text("{nope")
    with pytest.raises(TracekitError, match="not JSON"):
        load_gpu_spec(f)
    with pytest.raises(TracekitError, match="no such file"):
        load_gpu_spec(tmp_path / "missing.json")


def test_model_sizes_and_the_assumed_line():
    s = model_sizes({"hidden_size": 4096})
    assert (s.hidden_size, s.moe_intermediate_size, s.expert_dtype) == (4096, 2048, "bfloat16")
    assert s.assumed == ("moe_intermediate_size", "expert_dtype")
    line = assumed_line(s)
    assert line.startswith("assumed moe_intermediate_size=2048 (--moe-intermediate-size), expert_dtype=bfloat16")
    assert "\n" not in line and "hidden_size" not in line
    s = model_sizes({"expert_dtype": "float6"}, hidden_size=1, moe_intermediate_size=2)
    assert s.assumed == ("expert_dtype",) and "'float6' is unknown" in assumed_line(s, {"expert_dtype": "float6"})
    full = model_sizes({"hidden_size": 7168, "moe_intermediate_size": 2048, "expert_dtype": "float8_e4m3fn"})
    assert assumed_line(full) is None and full.expert_bytes == 3 * 7168 * 2048 * 1.0
    with pytest.raises(TracekitError, match="--expert-dtype 'int3' unknown"):
        model_sizes({}, expert_dtype="int3")
    with pytest.raises(TracekitError, match="--hidden-size must be an integer"):
        model_sizes({}, hidden_size=0)


# ------------------------------------------------------------------------------------------------------------------
# sizes in the runs: collect, importers, validators, place's "assumed" line
# ------------------------------------------------------------------------------------------------------------------
def _jsonl(path: Path, requests=8, layers=2, tokens=24, E=4, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    with path.open("w") as f:
        for r in range(requests):
            for layer in range(layers):  # layer-major, as generated-token logs are
                for t in range(tokens):
                    e = rng.choice(E, 2, replace=False).tolist()
                    f.write(json.dumps({"dataset": "gsm8k", "problem_id": r, "layer": layer, "experts": e,
                                        "gating_probs": [0.6, 0.4], "token_idx": t}) + "\n")
    return path


def test_jsonl_import_records_sizes_from_flags_or_registry(tmp_path, capsys):
    from tracekit.store import open_run

    src = _jsonl(tmp_path / "r.jsonl")
    code, _, err = cli(capsys, "import", "jsonl", str(src), "--model", "m", "--out", str(tmp_path / "a"),
                       "--hidden-size", "4096", "--moe-intermediate-size", "14336", "--expert-dtype", "bf16")
    assert code == 0, err
    g = open_run(tmp_path / "a").geometry
    assert (g["hidden_size"], g["moe_intermediate_size"], g["expert_dtype"]) == (4096, 14336, "bfloat16")
    code, _, _ = cli(capsys, "import", "jsonl", str(src), "--model", "m", "--out", str(tmp_path / "b"))
    g = open_run(tmp_path / "b").geometry
    assert code == 0 and (g["hidden_size"], g["moe_intermediate_size"], g["expert_dtype"]) == (None, None, None)
    code, _, err = cli(capsys, "import", "jsonl", str(src), "--model", "m", "--out", str(tmp_path / "c"),
                       "--expert-dtype", "int3")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--expert-dtype 'int3' unknown" in err
    assert not (tmp_path / "c").exists()


def test_engine_import_geometry_string_and_registry_sizes():
    from tracekit.importers.geometry import resolve_model

    _, g = resolve_model("mixtral-8x7b")
    assert (g["hidden_size"], g["moe_intermediate_size"], g["expert_dtype"]) == (4096, 14336, "bfloat16")
    _, g = resolve_model("experts=8,top_k=2,moe_layers=0-3,hidden=1024,intermediate=512,dtype=fp8")
    assert (g["hidden_size"], g["moe_intermediate_size"], g["expert_dtype"]) == (1024, 512, "float8_e4m3fn")
    _, g = resolve_model("deepseek-v3", moe_intermediate_size=1024, expert_dtype="mxfp4")
    assert (g["hidden_size"], g["moe_intermediate_size"], g["expert_dtype"]) == (7168, 1024, "mxfp4")
    with pytest.raises(TracekitError, match="--moe-intermediate-size must be an integer"):
        resolve_model("experts=8,top_k=2,moe_layers=0-3,intermediate=big")


def test_manifest_validators_accept_sizes_and_refuse_bad_ones(tmp_path, capsys):
    from tracekit.manifest_check import check_manifest
    from tracekit.store import open_run

    run = tmp_path / "run"
    assert cli(capsys, "import", "jsonl", str(_jsonl(tmp_path / "r.jsonl")), "--model", "m", "--out", str(run),
               "--moe-intermediate-size", "64", "--expert-dtype", "mxfp4")[0] == 0
    m = json.loads((run / "manifest.json").read_text())
    check_manifest(m, "m.json")
    for bad in ({"moe_intermediate_size": "64"}, {"moe_intermediate_size": 0}, {"hidden_size": True},
                {"expert_dtype": 16}):
        with pytest.raises(TracekitError, match="geometry.(moe_intermediate_size|hidden_size|expert_dtype)"):
            check_manifest({**m, "geometry": {**m["geometry"], **bad}}, "m.json")
        (run / "manifest.json").write_text(json.dumps({**m, "geometry": {**m["geometry"], **bad}}))
        with pytest.raises(TracekitError, match="geometry.(moe_intermediate_size|hidden_size|expert_dtype)"):
            open_run(run)
    (run / "manifest.json").write_text(json.dumps({**m, "geometry": {**m["geometry"], "expert_dtype": "float6"}}))
    assert open_run(run).geometry["expert_dtype"] == "float6"  # a dtype from a newer tracekit: read, then assumed


def test_place_says_assumed_once_and_takes_a_gpu_spec(tmp_path, capsys):
    src = _jsonl(tmp_path / "r.jsonl")
    bare, sized = tmp_path / "bare", tmp_path / "sized"
    assert cli(capsys, "import", "jsonl", str(src), "--model", "m", "--out", str(bare))[0] == 0
    assert cli(capsys, "import", "jsonl", str(src), "--model", "m", "--out", str(sized), "--hidden-size", "256",
               "--moe-intermediate-size", "512", "--expert-dtype", "bfloat16")[0] == 0
    base = ["place", "--nodes", "1", "--gpus-per-node", "2", "--redundant", "0", "--strategy", "eplb",
            "--split", "tokens", "--decode-batch", "4"]
    code, out, err = cli(capsys, *base[:1], str(bare), *base[1:])
    assert code == 0, err
    lines = [ln for ln in out.splitlines() if ln.startswith("assumed ")]
    assert len(lines) == 1 and all(f"{k}=" in lines[0] for k in ("hidden_size", "moe_intermediate_size", "expert_dtype"))
    code, out, err = cli(capsys, *base[:1], str(sized), *base[1:])
    assert code == 0 and "assumed" not in out
    code, out, _ = cli(capsys, *base[:1], str(bare), *base[1:], "--hidden-size", "256", "--expert-dtype", "fp8")
    assert code == 0 and [ln for ln in out.splitlines() if ln.startswith("assumed ")][0].startswith(
        "assumed moe_intermediate_size=2048 (--moe-intermediate-size): ")
    spec, js = tmp_path / "gpu.json", tmp_path / "cmp.json"
    spec.write_text(json.dumps({"name": "slowgpu", "tflops": 100, "hbm_gbps": 500, "nvlink_gbps": 100, "rdma_gbps": 10}))
    code, out, err = cli(capsys, *base[:1], str(sized), *base[1:], "--gpu-spec", str(spec), "--json", str(js))
    assert code == 0, err
    held = next(r for r in json.loads(js.read_text())["rows"] if r["strategy"] == "eplb")["heldout"]
    assert held["profile"] == "slowgpu" and held["hbm_ms_per_step"] > 0
    spec.write_text(json.dumps({"name": "slowgpu", "tflops": 100}))
    code, out, err = cli(capsys, *base[:1], str(sized), *base[1:], "--gpu-spec", str(spec))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "'hbm_gbps' is missing" in err
    code, _, err = cli(capsys, *base[:1], str(sized), *base[1:], "--expert-dtype", "int3")
    assert code == 2 and "--expert-dtype 'int3' unknown" in err


def test_collect_records_the_model_sizes(tmp_path, prompt_data):
    from tracekit.collect import CollectOptions, collect
    from tracekit.models import load_model

    out = tmp_path / "run"
    res = collect(CollectOptions(model="tiny-llama4", dataset="mbpp", data_file=prompt_data / "mbpp.jsonl",
                                 limit=2, max_new_tokens=2, batch_size=2, out=out))
    assert res.complete
    g = json.loads((out / "manifest.json").read_text())["geometry"]
    cfg = load_model("tiny-llama4").model.config
    # Llama 4: the experts' width is intermediate_size; intermediate_size_mlp is the dense layers'
    assert cfg.intermediate_size != cfg.intermediate_size_mlp
    assert (g["hidden_size"], g["moe_intermediate_size"]) == (cfg.hidden_size, cfg.intermediate_size)
    assert g["expert_dtype"] == "float32"  # the tiny model runs in float32 and its config names no dtype
