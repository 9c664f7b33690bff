"""The report's Findings sentences and `tracekit diff`, on synthetic runs whose answers are planted."""
from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from tracekit.analysis.findings import uniform_max_mean
from tracekit.analysis.run import analyze
from tracekit.cli import main
from tracekit.diff import compare_loads, diff_result, request_loads
from tracekit.report import report_findings
from tracekit.synth import generate_run

SMALL = dict(num_experts=16, top_k=2, moe_layers=[1, 2, 3], requests=96, prompt_tokens=(24, 40),
             decode_tokens=(16, 24), domains=("code", "math"))


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Strong skew, domain shift and prefill->decode affinity."""
    return generate_run(tmp_path_factory.mktemp("s") / "planted", seed=3, skew=1.0, domain_shift=6.0,
                        domain_shift_frac=0.25, affinity=0.9, **SMALL)


@pytest.fixture(scope="module")
def null(tmp_path_factory):
    """Uniform routing, the same distribution for both domains, no affinity: nothing to find (a large bank of top-k
    sets, so that the generator's finite bank does not itself make some experts busier)."""
    return generate_run(tmp_path_factory.mktemp("s") / "null", seed=4, skew=0.0, layer_skew_spread=0.0,
                        domain_shift=1.0, affinity=0.0, bank_size=50_000, **SMALL)


def _findings(run):
    res = analyze(run)
    return report_findings(res, np.array([1, 2, 3]), 2, "domain")[0]


def test_findings_hold_on_the_planted_run_and_not_on_the_null_run(planted, null):
    strong, flat = _findings(planted), _findings(null)
    assert [f.name for f in strong] == ["imbalance", "domain", "correlation"]
    assert [f.holds for f in strong] == [True, True, True], [f.sentence for f in strong]
    assert [f.holds for f in flat] == [False, False, False], [f.sentence for f in flat]
    for f in strong + flat:  # one sentence: measured value, baseline, verdict
        assert f.sentence.endswith(("holds.", "does not hold.")) and "against" in f.sentence
    imb = strong[0].sentence
    measured, base = (float(x) for x in re.findall(r"([\d.]+)x", imb)[::2][:2])
    assert measured > 2 * base  # Zipf(1) over 16 experts vs uniform


def test_uniform_band_matches_a_direct_simulation():
    """The moment-matched multinomial against tokens that really pick 4 distinct experts of 16 uniformly."""
    rng = np.random.default_rng(0)
    T, E, k = 300, 16, 4
    direct = []
    for _ in range(300):
        picks = np.argsort(rng.random((T, E)), axis=1)[:, :k]
        load = np.bincount(picks.reshape(-1), minlength=E)
        direct.append(load.max() / load.mean())
    sim = uniform_max_mean(np.array([T]), E, k, draws=2000)[:, 0]
    assert abs(np.median(sim) - np.median(direct)) < 0.02
    assert abs(np.percentile(sim, 95) - np.percentile(direct, 95)) < 0.04


def test_report_states_the_findings_first(planted, tmp_path):
    out = tmp_path / "r.html"
    main(["report", str(planted), "-o", str(out)])
    page = out.read_text()
    assert page.index("<h2 id='findings'>Findings</h2>") < page.index("<h2>Expert load per layer</h2>")
    assert page.count("class='finding'") == 3 and page.count("data-holds='true'") == 3


def _split(loads, keep):
    """The requests ``keep`` (bool over requests) of ``loads``, renumbered."""
    new = np.cumsum(keep) - 1
    m = keep[loads.req]
    return dataclasses.replace(loads, req=new[loads.req[m]], layer_pos=loads.layer_pos[m], expert=loads.expert[m],
                               n=loads.n[m], R=int(keep.sum()))


@pytest.fixture(scope="module")
def halves(tmp_path_factory):
    run = generate_run(tmp_path_factory.mktemp("s") / "big", seed=5, skew=0.6, **{**SMALL, "requests": 240})
    loads = request_loads(run)
    keep = np.random.default_rng(1).random(loads.R) < 0.5
    return _split(loads, keep), _split(loads, ~keep)


def test_diff_does_not_flag_two_samples_of_one_distribution(halves):
    c = compare_loads(*halves)
    assert not c["layer_shifted"].any() and not c["expert_flag"].any()
    assert (c["tv"] < c["tv_limit"]).all()


def test_diff_finds_a_planted_load_shift(halves):
    a, b = halves
    # B: in layer 2 (position 1), 1000 more choices of expert 5 (about 8% of the layer's), spread over B's requests
    rng = np.random.default_rng(2)
    extra = rng.integers(0, b.R, 1000)
    b2 = dataclasses.replace(b, req=np.r_[b.req, extra], layer_pos=np.r_[b.layer_pos, np.ones(1000, np.int64)],
                             expert=np.r_[b.expert, np.full(1000, 5)], n=np.r_[b.n, np.ones(1000, np.int64)])
    c = compare_loads(a, b2)
    assert c["layer_shifted"].tolist() == [False, True, False]
    assert np.argwhere(c["expert_flag"]).tolist() == [[1, 5]]
    res = diff_result(c, "A", "B")
    assert res.lines[0].startswith("Load shift: 1 of 3 layers") and res.tables["experts"].num_rows == 3 * 16


def test_diff_command_compares_two_runs(planted, null, tmp_path, capsys):
    main(["diff", str(planted), str(null), "--out", str(tmp_path / "d"), "--bootstrap", "50"])
    out = capsys.readouterr().out
    assert "Load shift: 3 of 3 layers route differently beyond noise" in out
    assert "Domain shift:" in out and "Prefill-decode correlation:" in out
    assert (tmp_path / "d" / "diff_experts.parquet").exists()
