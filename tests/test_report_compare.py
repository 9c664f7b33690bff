"""`tracekit report A --compare B`: the page adds `tracekit diff A B` (load shift against bootstrap noise, the
findings' changes) with its figure."""
from __future__ import annotations

import base64
import re

import pytest

from tracekit.cli import main
from tracekit.report_figures import draw_run_diff
from tracekit.synth import generate_run

GEO = dict(num_experts=16, top_k=2, moe_layers=[1, 2, 3], requests=24, prompt_tokens=(6, 12), decode_tokens=(3, 6))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    return generate_run(root / "a" / "run", seed=1, **GEO), generate_run(root / "b" / "run", seed=2, skew=1.2, **GEO)


def _report(tmp_path, a, *compare):
    out = tmp_path / "r.html"
    args = ["report", str(a), "-o", str(out), "--bootstrap", "40", "--force"]
    for c in compare:
        args += ["--compare", str(c)]
    try:
        main(args)
    except SystemExit as exc:
        assert exc.code in (0, None)
    return out.read_text()


def _section(page):
    return page[page.index("<h2 id='compare'>"):page.index("<h2>Summary tables</h2>")]


def test_report_compares_two_run_sets_like_diff(runs, tmp_path):
    from tracekit.diff import diff_runs

    a, b = runs
    page = _report(tmp_path, a, b.parent / "*")  # a glob for B, as for the report's own runs
    sec = _section(page)
    assert "A: " in sec and "B: " in sec and str(tmp_path) not in sec and "/tmp/" not in sec
    imgs = dict(re.findall(r"<img alt='(\w+)' id='fig-\w+' src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page))
    assert base64.b64decode(imgs["run_diff"])[:8] == b"\x89PNG\r\n\x1a\n"
    expected = diff_runs([a], [b], draws=40)  # the same numbers as tracekit diff A B
    for line in expected.lines:
        assert line.replace("'", "&#x27;") in sec
    shifted = re.search(r"Load shift: (\d+) of 3 layers", sec)
    assert shifted and int(shifted.group(1)) >= 1  # B was generated with another skew
    assert "findings, A vs B" in sec and "load shift per layer (B vs A)" in sec


def test_a_run_compared_with_itself_shows_no_shift(runs, tmp_path):
    page = _report(tmp_path, runs[0], runs[0])
    assert "Load shift: 0 of 3 layers" in _section(page)
    assert "<h2 id='compare'>" not in _report(tmp_path, runs[0])  # no --compare: no section


def test_diff_figure_shows_the_noise_next_to_each_layers_shift(runs):
    from tracekit.diff import compare_loads, request_loads

    c = compare_loads(request_loads(runs[0]), request_loads(runs[1]), draws=40)
    fig = draw_run_diff(c, "a", "b")
    shift, imb = fig.axes
    assert len(shift.patches) == 3 and [t.get_text() for t in shift.get_xticklabels()] == ["1", "2", "3"]
    assert len(shift.get_legend().get_texts()) == 3 and len(imb.get_legend().get_texts()) == 2
    heights = [p.get_height() for p in shift.patches]
    assert heights == pytest.approx(list(c["tv"])) and shift.get_ylim()[1] > max(heights)
