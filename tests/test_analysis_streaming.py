"""Analyses in bounded memory: a budget that splits a synthetic run into many batches gives the same numbers as
one that holds it whole; per-chunk summaries equal the rows they summarise; the edge cases (--by phase, one
request, top-1 routing) say what they cannot compute."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
import pytest

from tracekit.analysis.budget import MemoryBudget, parse_size
from tracekit.analysis.data import geometry
from tracekit.analysis.run import analyze
from tracekit.analysis.stream import plan_slices, request_index, rows_per_slice
from tracekit.errors import TracekitError
from tracekit.query import connect, query
from tracekit.store import backfill
from tracekit.summaries import SUMMARY_DIR
from tracekit.synth import generate_run

SMALL = MemoryBudget(400_000)  # 160 KB of arrays: ~500 token-layer rows (k=4) per slice


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return generate_run(tmp_path_factory.mktemp("s") / "run", num_experts=32, top_k=4, moe_layers=[1, 2, 4, 5],
                        requests=600, prompt_tokens=(3, 9), decode_tokens=(0, 4), seed=11, rows_per_chunk=4000)


@pytest.fixture(scope="module")
def both(run):
    kw = dict(by="domain", window=7, seed=2)
    return analyze(run, memory_budget=SMALL, **kw), analyze(run, memory_budget="4GB", **kw)


def rows(res, name, table):
    return res[name].tables[table].to_pylist()


def test_small_budget_reads_many_batches(run):
    con = connect(run)
    try:
        geo, index = geometry(con), request_index(con)
        small = plan_slices(con, index, len(index), rows_per_slice(geo, SMALL, 0.35))
        big = plan_slices(con, index, len(index), rows_per_slice(geo, MemoryBudget.of("4GB"), 0.35))
    finally:
        con.close()
    chunks = len(list((run / "routes").glob("*.parquet")))
    assert chunks >= 5 and len(big) == chunks and len(small) > chunks  # some chunks are read in two request ranges
    assert sorted(np.concatenate([s.index for s in small]).tolist()) == list(range(len(index)))


@pytest.mark.parametrize("name,table", [("imbalance", "layers"), ("imbalance", "stability"),
                                        ("domain", "distances"), ("domain", "rank_shifts"),
                                        ("coactivation", "pairs"), ("coactivation", "affinity")])
def test_small_budget_gives_the_same_tables(both, name, table):
    small, big = both
    assert rows(small, name, table) == rows(big, name, table)


def test_small_budget_gives_the_same_per_request_correlation(both):
    small, big = both
    a, b = rows(small, "correlation", "per_request_layer"), rows(big, "correlation", "per_request_layer")
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        for col in ("run_id", "request_id", "group", "layer", "top4_overlap"):
            assert x[col] == y[col]
        for col in ("pearson", "spearman"):
            assert x[col] == pytest.approx(y[col], nan_ok=True, abs=1e-12)
    # the big budget holds every partner: no sampling, no note; the small one says how large its pool was
    assert not any("pool" in n for n in big["correlation"].notes)
    assert any("random pool of" in n for n in small["correlation"].notes)


def test_classifier_sample_is_stated(both):
    small, big = both
    assert rows(big, "domain", "classifier")[0]["n"] == 600 and not any("sample" in n for n in big["domain"].notes)
    n = rows(small, "domain", "classifier")[0]["n"]
    assert 2 <= n < 600 and any(f"random sample of {n} of 600 requests" in s for s in small["domain"].notes)


def test_baseline_and_overlap_match_a_direct_computation(run, both):
    """Each request's baseline partner, recomputed from the raw rows."""
    small, _ = both
    table = pq.read_table(run / "routes")
    req, phase = table["request_id"].to_numpy(), np.asarray(table["phase"].to_pylist())
    layer = table["layer"].to_numpy()
    experts = np.asarray(table["experts"].to_pylist())

    def hist(r, ph, l):
        m = (req == r) & (phase == ph) & (layer == l)
        return np.bincount(experts[m].reshape(-1), minlength=32).astype(float)

    for row in rows(small, "correlation", "per_request_layer")[:40]:
        pre = hist(row["request_id"], "prefill", row["layer"])
        base = hist(row["baseline_request_id"], "decode", row["layer"])
        assert row["baseline_request_id"] != row["request_id"]
        assert row["baseline_pearson"] == pytest.approx(np.corrcoef(pre, base)[0, 1], nan_ok=True)


def test_summaries_equal_the_rows(run):
    assert (run / SUMMARY_DIR / "loads").is_dir()
    from_summaries = query(run, "SELECT layer, expert, sum(count) AS n FROM loads GROUP BY ALL ORDER BY ALL").to_pylist()
    table = pq.read_table(run / "routes", columns=["layer", "experts"])
    c = Counter()
    for l, ex in zip(table["layer"].to_pylist(), table["experts"].to_pylist()):
        for e in ex:
            c[(l, e)] += 1
    assert {(r["layer"], r["expert"]): r["n"] for r in from_summaries} == dict(c)
    req = query(run, "SELECT request_id, prompt_tokens, generated_tokens, rows FROM requests ORDER BY 1").to_pylist()
    assert len(req) == 600 and sum(r["rows"] for r in req) == table.num_rows


def test_runs_without_summaries_fall_back_to_the_rows(run, tmp_path):
    import shutil

    copy = tmp_path / "old"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / SUMMARY_DIR)
    sql = "SELECT phase, layer, expert, sum(count) AS n FROM loads GROUP BY ALL ORDER BY ALL"
    derived = query(copy, sql).to_pylist()
    assert derived == query(run, sql).to_pylist()
    assert query(copy, "SELECT * FROM requests ORDER BY request_id").to_pylist() == \
        query(run, "SELECT * FROM requests ORDER BY request_id").to_pylist()
    assert backfill(copy) == len(list((run / "routes").glob("*.parquet")))
    assert query(copy, sql).to_pylist() == derived


def test_by_phase_compares_the_phases(run):
    res = analyze(run, what="domain,correlation", by="phase", seed=0)
    dist = rows(res, "domain", "distances")
    assert {(r["group_a"], r["group_b"]) for r in dist} == {("prefill", "decode")}
    assert rows(res, "domain", "classifier")[0]["n"] > 600  # one histogram per request and phase
    summ = next(iter(res["correlation"].summaries.values())).to_pylist()
    assert [r["group"] for r in summ] == ["all"] and any("--by phase" in n for n in res["correlation"].notes)


def test_one_request_has_no_baseline_and_says_so(tmp_path):
    one = generate_run(tmp_path / "one", num_experts=16, top_k=2, moe_layers=[0, 1], requests=1,
                       prompt_tokens=6, decode_tokens=4)
    res = analyze(one, what="correlation")["correlation"]
    summ = next(iter(res.summaries.values())).to_pylist()[0]
    assert summ["requests"] == 1 and np.isnan(summ["baseline_spearman"]) and not np.isnan(summ["spearman"])
    assert any("too few requests for a shuffled baseline: 1 request" in n for n in res.notes)


def test_top1_coactivation_is_undefined_and_said(tmp_path):
    r = generate_run(tmp_path / "top1", num_experts=16, top_k=1, moe_layers=[0, 1, 2], requests=8,
                     prompt_tokens=5, decode_tokens=3)
    res = analyze(r, what="coactivation")["coactivation"]
    assert res.tables["pairs"].num_rows == 0 and not res.summaries.get("co-activation within a layer")
    assert any("co-activation within a layer" in n and "undefined" in n for n in res.notes)
    aff = res.tables["affinity"].to_pylist()
    assert len(aff) == 2 * 16 * 16 and sum(a["count"] for a in aff) == 2 * 8 * (5 + 3)  # every token, 2 pairs


@pytest.mark.parametrize("text,ok", [("2GB", 2 * 10**9), ("512MiB", 512 << 20), ("1.5 GB", 1_500_000_000),
                                     ("10MB", None), ("lots", None), ("-1GB", None)])
def test_memory_budget_parsing(text, ok):
    if ok is None:
        with pytest.raises(TracekitError):
            parse_size(text)
    else:
        assert parse_size(text) == ok


def test_a_request_split_over_two_chunks_is_read_whole(run, tmp_path):
    """An importer may write one request's rows into two chunks: those chunks are read together."""
    import json
    import shutil

    from tracekit.store import finalize, write_chunk

    split = tmp_path / "split"
    shutil.copytree(run, split, ignore=shutil.ignore_patterns("routes", SUMMARY_DIR))
    files = sorted((run / "routes").glob("*.parquet"))
    first = pq.read_table(files[0])
    req = first["request_id"].to_numpy()
    shared = int(req[len(req) // 2])  # a request in the middle of the first chunk
    meta = json.loads(first.schema.metadata[b"tracekit.requests"])
    layer = first["layer"].to_numpy()
    for c, mask in enumerate([(req < shared) | ((req == shared) & (layer < 3)),
                              (req > shared) | ((req == shared) & (layer >= 3))]):
        part = first.filter(mask)
        ids = sorted({int(x) for x in part["request_id"].to_numpy()})
        write_chunk(split, part, chunk=c, requests=ids)
    for c, f in enumerate(files[1:], start=2):
        t = pq.read_table(f)
        write_chunk(split, t, chunk=c, requests=json.loads(t.schema.metadata[b"tracekit.requests"]))
    finalize(split)
    assert shared in meta
    kw = dict(what="imbalance,domain,correlation,coactivation", by="domain", window=7, seed=2, memory_budget="4GB")
    a, b = analyze(split, **kw), analyze(run, **kw)
    for name, table in [("imbalance", "layers"), ("imbalance", "stability"), ("domain", "rank_shifts"),
                        ("correlation", "per_request_layer"), ("coactivation", "affinity")]:
        assert rows(a, name, table) == rows(b, name, table)


def test_cli_memory_budget(run, capsys):
    from tracekit.cli import main

    main(["analyze", str(run), "--what", "imbalance,correlation", "--by", "phase", "--memory-budget", "128MB"])
    out = capsys.readouterr().out
    assert "imbalance by group" in out and "--by phase: the correlation compares the two phases" in out
    with pytest.raises(SystemExit) as exc:
        main(["analyze", str(run), "--memory-budget", "a lot"])
    assert exc.value.code == 2 and "memory budget 'a lot' not understood" in capsys.readouterr().err


def test_run_level_load_summary_sums_exactly_the_chunks_read(run, tmp_path):
    """finalize writes summaries/loads.parquet (each key once); the loads view reads it only while it sums exactly
    the chunks read, else the per-chunk summaries answer."""
    import shutil

    from tracekit.store import partial_reads
    from tracekit.summaries import RUN_LOADS

    whole = run / SUMMARY_DIR / RUN_LOADS
    assert whole.is_file()
    t = pq.read_table(whole)
    keys = ["run_id", "model", "dataset", "domain", "phase", "window", "layer", "expert"]
    assert t.num_rows == len(set(zip(*(t[k].to_pylist() for k in keys))))  # each key once
    per_chunk = pq.read_table(run / SUMMARY_DIR / "loads")
    assert t.num_rows < per_chunk.num_rows and sum(t["count"].to_pylist()) == sum(per_chunk["count"].to_pylist())

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    sql = "SELECT layer, expert, sum(count) AS n FROM loads GROUP BY ALL ORDER BY ALL"
    truth = query(run, sql).to_pylist()
    doubled = t.set_column(t.schema.get_field_index("count"), "count", pa.compute.multiply(t["count"], 2))
    pq.write_table(doubled.replace_schema_metadata(t.schema.metadata), copy / SUMMARY_DIR / RUN_LOADS)
    # a changed file no longer matches the manifest's hash: refused, the verified per-chunk summaries answer
    assert [r["n"] for r in query(copy, sql).to_pylist()] == [r["n"] for r in truth]
    # recorded as the writer would record it, it is what is read
    import json

    from tracekit.summaries import RUN_LOADS_REL, bytes_record

    manifest = json.loads((copy / "manifest.json").read_text())
    manifest.setdefault("summaries", {})[RUN_LOADS_REL] = bytes_record((copy / SUMMARY_DIR / RUN_LOADS).read_bytes())
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert [r["n"] for r in query(copy, sql).to_pylist()] == [2 * r["n"] for r in truth]  # it is what is read

    gone = sorted((copy / "routes").glob("*.parquet"))[0]
    gone.unlink()
    with partial_reads():
        left = query(copy, sql).to_pylist()
    rows = pq.read_table(sorted((copy / "routes").glob("*.parquet")), columns=["layer", "experts"])
    c = Counter()
    for l, ex in zip(rows["layer"].to_pylist(), rows["experts"].to_pylist()):
        for e in ex:
            c[(l, e)] += 1
    assert {(r["layer"], r["expert"]): r["n"] for r in left} == dict(c)  # per-chunk summaries of what is left
