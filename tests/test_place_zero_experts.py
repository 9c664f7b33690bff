"""Placement ignores zero-computation experts (LongCat-Flash's identity experts, Zaya's skip, Switch / NLLB drops).

Runs are written to disk through the store with a geometry that lists ``zero_computation_experts`` (and one is
collected from a tiny LongCat-Flash model), read back by ``load_traces``, and placed and scored by the real code.
The reference is always the same trace with the zero-computation choices removed by hand:

- with exactly one zero-computation choice per token-layer, removing it leaves a fixed (N, k - 1) trace that is a
  run of its own; fits and scores on both must be identical (every engine, both counting paths);
- with any number per token-layer (a real LongCat run), the rows with c such choices form a fixed-width trace
  each; copies, bytes and loads are sums over rows, so the classes' totals must add up to the whole.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from tracekit.placement.data import stats
from tracekit.placement.scoring.comm import evaluate, home_gpus
from tracekit.placement.scoring.dispatch import choose_replicas
from tracekit.placement.data.types import make_cluster
from tracekit.placement.strategies import fit
from tracekit.placement.data.traces import load_traces, split_tokens, subset
from tracekit.placement.data.types import TraceArrays
from tracekit.schema import build_routes_table, routes_schema
from tracekit.store import base_manifest, finalize, new_run_id, write_chunk, write_manifest

from _cli import cli
from _placement_synth import planted_traces

E, ZERO = 8, [8, 9, 10]  # LongCat-style: 8 real experts, ids 8..10 compute nothing
ENGINES = ("sglang", "vllm", "trtllm", "ideal")
COUNTS = ("token_layers", "cross_node_copies_per_token_normal", "cross_node_copies_per_token_lowlat",
          "intra_node_copies_per_token", "intra_node_copies_per_token_lowlat", "nvlink_forward_copies_per_token_normal",
          "bytes_normal", "bytes_lowlat", "bytes_intra_node", "gpu_load_max_over_mean", "gpu_load_max_over_mean_worst",
          "node_load_max_over_mean", "distinct_experts_per_microbatch", "gpu_distinct_slots_per_microbatch_max",
          "step_time_ms", "imbalance_p50", "imbalance_p99", "cross_node_bytes_per_step", "compute_ms_per_step")


def write_run(out, tr: TraceArrays, experts: np.ndarray, geometry: dict, prefill: int) -> str:
    """Write ``tr``'s rows with ``experts`` (N, k) as a routes run (one chunk) through the store."""
    run_id = new_run_id()
    n_total = geometry["num_experts"]
    out.mkdir(parents=True)
    write_manifest(out, base_manifest(run_id=run_id, kind="routes", source="test", model={"name": "zero-test"},
                                      geometry=geometry, dataset={"name": "test"}, args={}))
    domains = sorted(set(tr.request_domain.tolist()))
    dom = np.searchsorted(domains, tr.request_domain[tr.request].astype(str))
    table = build_routes_table(
        schema=routes_schema(n_total, "float16"), run_id=run_id, model="zero-test", dataset="test",
        domain=dom.astype(np.int32), domains=domains, request_id=tr.request.astype(np.int32),
        prompt_id=np.array([f"p{r}" for r in tr.request], dtype=object), phase=tr.phase.astype(np.int8),
        position=tr.token, step=np.where(tr.phase == 1, tr.token - prefill + 1, -1).astype(np.int32),
        layer=tr.layers[tr.layer_pos], token_id=None, experts=experts, weights=None)
    write_chunk(out, table, chunk=0, requests=range(tr.num_requests))
    finalize(out)
    return str(out)


def geometry(num_experts: int, top_k: int, zero: list[int]) -> dict:
    return {"family": "test", "num_layers": 4, "moe_layers": [1, 2, 3], "num_experts": num_experts, "top_k": top_k,
            "zero_computation_experts": zero}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(run with one zero-computation choice per token-layer, the same run with it removed by hand, N)."""
    tr, _ = planted_traces(num_experts=E, top_k=2, layers=3, clusters=2, requests=24, prefill=6, decode=20, seed=3)
    rng = np.random.default_rng(7)
    n = len(tr)
    col = rng.integers(0, 3, size=n)  # where the zero-computation id sits in the router's order
    zid = rng.choice(ZERO, size=n)
    with_zero = np.empty((n, 3), dtype=np.int64)
    real_cols = np.array([[1, 2], [0, 2], [0, 1]])[col]
    np.put_along_axis(with_zero, real_cols, tr.experts.astype(np.int64), axis=1)
    with_zero[np.arange(n), col] = zid
    root = tmp_path_factory.mktemp("zero")
    a = write_run(root / "with_zero", tr, with_zero, geometry(E + len(ZERO), 3, ZERO), prefill=6)
    b = write_run(root / "removed", tr, tr.experts, geometry(E, 2, []), prefill=6)
    return a, b, n


def test_load_maps_zero_choices_to_one_sentinel(pair):
    a, b, n = pair
    ta, tb = load_traces([a]), load_traces([b])
    assert ta.num_experts == E and ta.top_k == 3 and ta.zero_choices == n
    assert ta.experts.max() == E and ((ta.experts == E).sum(1) == 1).all()  # one sentinel per row, ids 0..E
    assert tb.zero_choices == 0 and tb.experts.max() < E
    real = ta.experts[ta.experts != E].reshape(n, 2)  # removing the sentinel gives the hand-removed run
    np.testing.assert_array_equal(real, tb.experts)
    half = np.arange(n) % 2 == 0
    assert subset(ta, half).zero_choices == half.sum()


def test_statistics_equal_hand_removed(pair):
    a, b, _ = pair
    ta, tb = load_traces([a]), load_traces([b])
    np.testing.assert_array_equal(stats.expert_load(ta), stats.expert_load(tb))
    for m in range(ta.num_layers):
        np.testing.assert_array_equal(stats.coactivation(ta, m), stats.coactivation(tb, m))
    np.testing.assert_array_equal(stats.request_histograms(ta), stats.request_histograms(tb))
    grp = np.arange(ta.num_requests) % 3
    np.testing.assert_array_equal(stats.load_by_group(ta, grp, 3), stats.load_by_group(tb, grp, 3))
    np.testing.assert_array_equal(stats.signature_features(ta), stats.signature_features(tb))


@pytest.mark.parametrize("strategy", ["linear", "eplb", "locality"])
@pytest.mark.parametrize("grouping", ["none", "signature"])
def test_fit_and_scores_equal_hand_removed(pair, strategy, grouping):
    a, b, _ = pair
    ta, tb = load_traces([a]), load_traces([b])
    cluster = make_cluster(ta, nodes=2, gpus_per_node=2, redundant=4)
    train, test = split_tokens(ta)
    pa_ = fit(strategy, subset(ta, train), cluster, seed=0, max_imbalance=1.5, grouping=grouping)
    pb = fit(strategy, subset(tb, train), cluster, seed=0, max_imbalance=1.5, grouping=grouping)
    np.testing.assert_array_equal(pa_.slot_expert, pb.slot_expert)  # only real ids, the same layout
    assert pa_.slot_expert.max() < E and all(set(r.tolist()) == set(range(E)) for r in pa_.slot_expert)
    assert pa_.meta["zero_computation_experts"] == ZERO and "zero_computation_experts" not in pb.meta
    for engine in ENGINES:
        for force_sort in (False, True):
            sa = evaluate(pa_, ta, test, engine=engine, decode_batch=8, prefill_chunk=32, force_sort=force_sort)
            sb = evaluate(pb, tb, test, engine=engine, decode_batch=8, prefill_chunk=32, force_sort=force_sort)
            for key in COUNTS:
                assert sa[key] == pytest.approx(sb[key], rel=1e-12, nan_ok=True), (engine, force_sort, key)
            assert sa["gpu_load_max_over_mean_per_layer"] == pytest.approx(sb["gpu_load_max_over_mean_per_layer"])


def test_choose_replicas_gives_zero_choices_no_slot(pair):
    a, _, _ = pair
    ta = load_traces([a])
    cluster = make_cluster(ta, nodes=2, gpus_per_node=2, redundant=4)
    p = fit("eplb", ta, cluster, seed=0)
    home = home_gpus(ta, p)[ta.request]
    idx = np.arange(len(ta)) % 16
    for engine in ENGINES:
        slots = choose_replicas(p.slot_expert, ta.layer_pos, home, ta.experts, engine=engine, gpus_per_node=2,
                                num_gpus=4, num_experts=E, batch=home, index_in_batch=idx)
        zero = ta.experts == E
        assert (slots[zero] == -1).all() and (slots[~zero] >= 0).all()
        assert (p.slot_expert[ta.layer_pos[:, None].repeat(3, 1)[~zero], slots[~zero]] == ta.experts[~zero]).all()


def _classes(tr: TraceArrays) -> list[TraceArrays]:
    """The rows of ``tr`` grouped by how many zero-computation choices they hold, each with those choices removed
    by hand (a fixed-width trace of real experts; the rows whose every choice computes nothing are left out)."""
    zero = tr.experts == tr.num_experts
    out = []
    for c in range(tr.top_k):
        rows = zero.sum(1) == c
        if not rows.any():
            continue
        part = subset(tr, rows)
        real = part.experts[part.experts != tr.num_experts].reshape(int(rows.sum()), tr.top_k - c)
        out.append(TraceArrays(layers=part.layers, num_experts=tr.num_experts, request=part.request,
                               layer_pos=part.layer_pos, experts=real, phase=part.phase, token=part.token,
                               request_domain=part.request_domain, geometry=tr.geometry))
    return out


def _check_sums(tr: TraceArrays, placement, engine: str) -> None:
    """Copies and loads of ``tr`` == the sums over its hand-removed classes (same home GPUs, static dispatch)."""
    home = home_gpus(tr, placement)
    whole = evaluate(placement, tr, engine=engine, home=home, replay=False)
    parts = [evaluate(placement, p, engine=engine, home=home, replay=False) for p in _classes(tr)]
    assert whole["token_layers"] == len(tr)  # rows that compute nothing still cross the layer
    for key in ("bytes_normal", "bytes_lowlat", "bytes_intra_node"):
        assert whole[key] == pytest.approx(sum(p[key] for p in parts), rel=1e-12), key
    np.testing.assert_array_equal(stats.expert_load(tr), sum(stats.expert_load(p) for p in _classes(tr)))


def test_any_number_of_zero_choices_per_row(pair, tmp_path):
    """Zero, one or both of a top-2 token's choices compute nothing (LongCat's router does all three)."""
    tr, _ = planted_traces(num_experts=E, top_k=2, layers=3, clusters=2, requests=16, prefill=6, decode=12, seed=5)
    rng = np.random.default_rng(1)
    ex = tr.experts.astype(np.int64).copy()
    zero = rng.random(ex.shape) < 0.35
    ex[zero] = np.array([8, 10])[np.nonzero(zero)[1]]  # distinct ids within a row, as a top-k router emits
    run = load_traces([write_run(tmp_path / "run", tr, ex, geometry(E + 3, 2, ZERO), prefill=6)])
    assert run.zero_choices == zero.sum() and (zero.sum(1) == 2).any()
    p = fit("eplb", run, make_cluster(run, nodes=2, gpus_per_node=2, redundant=4), seed=0)
    for engine in ("sglang", "ideal"):
        _check_sums(run, p, engine)


def test_place_cli_prints_the_line_and_exports(pair, tmp_path, capsys):
    a, b, n = pair
    args = ["--nodes", "2", "--gpus-per-node", "2", "--redundant", "4", "--split", "tokens", "--max-imbalance", "1.5"]
    code, out_a, err = cli(capsys, "place", a, *args, "-o", str(tmp_path / "a.json"), "--json", str(tmp_path / "ca.json"))
    assert code == 0, err
    lines = [ln for ln in out_a.splitlines() if "zero-computation" in ln]
    assert lines == [f"ignored {n:,} zero-computation expert choices (ids 8..10, computed in place): placing the 8 "
                     "real experts; they send no traffic and load no GPU"]
    code, out_b, err = cli(capsys, "place", b, *args, "--json", str(tmp_path / "cb.json"))
    assert code == 0 and "zero-computation" not in out_b
    placed = json.loads((tmp_path / "a.json").read_text())
    assert placed["cluster"]["num_experts"] == E
    assert all(sorted(set(row)) == list(range(E)) for row in placed["slot_expert"])
    # the held-out scores of every strategy equal the hand-removed run's
    ca, cb = (json.loads((tmp_path / f).read_text()) for f in ("ca.json", "cb.json"))
    for ra, rb in zip(ca["rows"], cb["rows"]):
        assert ra["strategy"] == rb["strategy"]
        for key in COUNTS:
            assert ra["heldout"][key] == pytest.approx(rb["heldout"][key], rel=1e-12, nan_ok=True), key
    for fmt in ("sglang", "trtllm", "vllm", "json", "grouping"):
        code, _, err = cli(capsys, "export", str(tmp_path / "a.json"), "--format", fmt)
        assert code == 0, (fmt, err)
    sglang = next(tmp_path.glob("a.sglang.*"))
    assert sglang.stat().st_size > 0


def test_zero_experts_must_be_the_top_ids(pair, tmp_path, capsys):
    tr, _ = planted_traces(num_experts=E, top_k=2, layers=3, requests=4, prefill=2, decode=4)
    bad = write_run(tmp_path / "bad", tr, tr.experts, geometry(E + 3, 2, [0, 1]), prefill=2)
    code, _, err = cli(capsys, "place", bad, "--nodes", "1", "--gpus-per-node", "2", "--redundant", "1")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not the top ids" in err


def test_longcat_collect_then_place(tmp_path, capsys):
    """A tiny LongCat-Flash model collected for real: its routers emit ids 8..10 (zero-computation experts)."""
    pytest.importorskip("transformers")
    from tests._families import tiny_model
    from tracekit.collect import CollectOptions, collect
    from tracekit.datasets import Prompt
    from tracekit.hooks.families import installed_moe_families
    from tracekit.models import LoadedModel, ModelSpec

    fam = {f.model_type: f for f in installed_moe_families()}.get("longcat_flash")
    if fam is None:
        pytest.skip("this transformers has no longcat_flash")
    model, tok = tiny_model(fam)
    lm = LoadedModel("longcat_flash", model, tok, ModelSpec("longcat_flash", None, "auto", "tiny test model"))
    prompts = [Prompt(f"p{i}", text, "code" if i % 2 else "math") for i, text in enumerate(
        ["def add(a, b):\n    return", "Natalia sold clips to 48 friends.", "for i in range(10):", "What is 7 * 8?"])]
    res = collect(CollectOptions(model="longcat_flash", dataset="humaneval", out=tmp_path / "run", max_new_tokens=12,
                                 batch_size=2, weights="float32", ignore_eos=True, chat_template=False),
                  loaded=lm, prompts=prompts)
    geo = res.manifest["geometry"]
    tr = load_traces([tmp_path / "run"])
    from tracekit.hooks.longcat import LongcatAdapter

    router = next(m for m in model.modules() if type(m).__name__ == "LongcatFlashTopkRouter")
    if LongcatAdapter._remapping(router):  # transformers >= 5.25: identity choices reach the experts as dummy ids
        assert geo["zero_computation_experts"] == [] and geo["num_experts"] == E
        assert tr.num_experts == E and tr.zero_choices == 0
        import pyarrow.parquet as pq

        w = pq.read_table(sorted((tmp_path / "run" / "routes").glob("*.parquet"))).column("weights")
        assert (w.combine_chunks().flatten().to_numpy() == 0).any()  # a random router picks identity experts too
    else:
        assert geo["zero_computation_experts"] == ZERO and geo["num_experts"] == 11
        assert tr.num_experts == E and tr.zero_choices > 0  # a random router picks identity experts too

    code, out, err = cli(capsys, "place", str(tmp_path / "run"), "--nodes", "2", "--gpus-per-node", "1",
                         "--redundant", "2", "--split", "tokens", "--max-imbalance", "4", "-o", str(tmp_path / "p.json"))
    assert code == 0, err
    if tr.zero_choices:
        assert f"ignored {tr.zero_choices:,} zero-computation expert choices (ids 8..10" in out
    placed = json.loads((tmp_path / "p.json").read_text())
    assert all(sorted(set(row)) == list(range(E)) for row in placed["slot_expert"])
    code, _, err = cli(capsys, "export", str(tmp_path / "p.json"), "--format", "sglang")
    assert code == 0, err
    from tracekit.placement.export import load_placement

    p = load_placement(tmp_path / "p.json")
    for engine in ("sglang", "ideal"):
        _check_sums(tr, p, engine)


def test_encoder_rows_are_not_placed(tmp_path):
    """An encoder-decoder's encoder rows carry its own layer numbers (the same as the decoder's) but route to other
    experts: placement reads the decoder's rows only and says how many encoder rows it left out."""
    from tracekit.placement.data.traces import describe_input, load_traces

    tr, _ = planted_traces(num_experts=E, top_k=2, layers=3, clusters=2, requests=10, prefill=4, decode=6, seed=4)
    geo = geometry(E, 2, [])
    plain = load_traces([write_run(tmp_path / "plain", tr, tr.experts.astype(np.int64), geo, 4)])
    pre = tr.phase == 0
    enc = TraceArrays(layers=tr.layers, num_experts=E, request=np.r_[tr.request, tr.request[pre]],
                      layer_pos=np.r_[tr.layer_pos, tr.layer_pos[pre]],
                      experts=np.r_[tr.experts, (tr.experts[pre] + 3) % E], phase=np.r_[tr.phase, np.full(pre.sum(), 2)],
                      token=np.r_[tr.token, tr.token[pre]], request_domain=tr.request_domain)
    both = load_traces([write_run(tmp_path / "enc", enc, enc.experts.astype(np.int64), geo, 4)])
    assert both.encoder_rows == int(pre.sum()) > 0 and plain.encoder_rows == 0
    for name in ("request", "layer_pos", "experts", "phase", "token"):
        assert np.array_equal(getattr(both, name), getattr(plain, name)), name
    assert f"{int(pre.sum()):,} encoder rows not placed" in describe_input(both)
    # the analyses leave them out the same way, and say so
    from tracekit.analysis.run import analyze

    a = analyze(tmp_path / "plain", what="imbalance,correlation,coactivation")
    b = analyze(tmp_path / "enc", what="imbalance,correlation,coactivation")
    for name, table in (("imbalance", "layers"), ("coactivation", "pairs"), ("coactivation", "affinity")):
        assert a[name].tables[table].to_pylist() == b[name].tables[table].to_pylist(), (name, table)
    assert all(any(f"{int(pre.sum()):,} encoder rows left out" in n for n in r.notes) for r in b.values())
    assert not any("encoder" in n for r in a.values() for n in r.notes)
