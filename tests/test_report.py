"""`tracekit report` and `tracekit analyze` end to end: figures that fit the page and read correctly, on tiny-preset
runs of three domains (tests/data prompts, always run) and on the real Mixtral traces (when present)."""
from __future__ import annotations

import base64
import itertools
import re

import numpy as np
import pyarrow.parquet as pq
import pytest

from tracekit.analysis.coactivation import TOP1_NOTE
from tracekit.analysis.run import analyze
from tracekit.cli import main
from tracekit.collect import CollectOptions, collect
from tracekit.importers.jsonl import import_jsonl
from tracekit.report_figures import (NO_DATA_GREY, correlation_range, draw_coactivation, draw_correlation, draw_domain_shift,
                             draw_load_heatmap, log_ticks)

from mixtral_raw import FILES

FIGURES = ("load_heatmap", "imbalance_curve", "domain_shift", "prefill_decode_correlation", "coactivation")


@pytest.fixture(scope="module")
def run(shared_data, tmp_path_factory):
    return import_jsonl([shared_data / "traces" / "mixtral-8x7b" / f for f in FILES], model="mixtral-8x7b",
                        out=tmp_path_factory.mktemp("r") / "mixtral")


def test_report_is_one_self_contained_page_with_every_figure(run, tmp_path):
    out = tmp_path / "report.html"
    main(["report", str(run), "-o", str(out), "--png", str(tmp_path / "png"), "--layer", "7"])
    page = out.read_text()
    imgs = dict(re.findall(r"<img alt='(\w+)' id='fig-\w+' src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page))
    assert sorted(imgs) == sorted(FIGURES)
    for name, data in imgs.items():
        png = base64.b64decode(data)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert (tmp_path / "png" / f"{name}.png").read_bytes() == png
    assert "Co-activation, layer 7" in page and "src='http" not in page and "<script" not in page


def test_report_refuses_a_layer_without_moe(run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["report", str(run), "-o", str(tmp_path / "r.html"), "--layer", "40"])
    assert exc.value.code == 2 and "--layer 40" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


def test_analyze_prints_summaries_and_writes_full_tables(run, tmp_path, capsys):
    main(["analyze", str(run), "--by", "phase", "--what", "imbalance,coactivation", "--layer", "3",
          "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "imbalance by group" in out and "co-activation within a layer" in out and "prefill" in out
    t = pq.read_table(tmp_path / "out" / "imbalance_layers.parquet")
    assert set(t["group"].to_pylist()) == {"all", "prefill", "decode"} and t.num_rows == 3 * 32
    pairs = pq.read_table(tmp_path / "out" / "coactivation_pairs.parquet")
    assert set(pairs["layer"].to_pylist()) == {3} and pairs.num_rows == 28
    main(["analyze", str(run), "--what", "domain", "--out", str(tmp_path / "csv"), "--format", "csv"])
    assert (tmp_path / "csv" / "domain_distances.csv").read_text().startswith('"layer"')
    with pytest.raises(SystemExit) as exc:
        main(["analyze", str(run), "--what", "nonsense"])
    assert exc.value.code == 2


# ---- tiny-preset runs of three domains (no shared data needed) -------------------------------------------------

DOMAIN_SETS = (("humaneval", "humaneval.jsonl"), ("math500", "math500_test.jsonl"), ("vicuna", "vicuna_questions.jsonl"))
PAGE_WIDTH_PX = 1200  # the report's max-width: a wider figure is scaled down and its text shrinks


def _runs(model, sets, prompt_data, root):
    out = []
    for name, file in sets:
        res = collect(CollectOptions(model=model, dataset=name, data_file=prompt_data / file, limit=4,
                                     max_new_tokens=8, out=root / f"{model}-{name}"))
        assert res.complete
        out.append(root / f"{model}-{name}")
    return out


@pytest.fixture(scope="module")
def three_domains(prompt_data, tmp_path_factory):
    """tiny-deepseek-v3 (E=256, top-8) on code, math and chat prompts: three runs."""
    return _runs("tiny-deepseek-v3", DOMAIN_SETS, prompt_data, tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def top1_runs(prompt_data, tmp_path_factory):
    """tiny-llama4 (E=128, top-1) on code and chat prompts."""
    return _runs("tiny-llama4", (DOMAIN_SETS[0], DOMAIN_SETS[2]), prompt_data, tmp_path_factory.mktemp("runs"))


def _png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def _report(runs, tmp_path, *extra):
    out = tmp_path / "site" / "report.html"
    main(["report", *map(str, runs), "-o", str(out), "--png", str(tmp_path / "png"), *extra])
    return out.read_text(), {p.stem: p.read_bytes() for p in (tmp_path / "png").glob("*.png")}


def test_three_domain_report_figures_fit_the_page_and_name_runs_without_paths(three_domains, tmp_path):
    page, pngs = _report(three_domains, tmp_path)
    assert sorted(pngs) == sorted(FIGURES)
    for name, png in pngs.items():
        w, h = _png_size(png)
        assert w <= PAGE_WIDTH_PX, f"{name} is {w}x{h} px: the page scales it down and its text shrinks"
    w, h = _png_size(pngs["domain_shift"])  # was 1988x353: three 256-expert panels side by side
    assert w / h <= 2.5 and h >= 400, f"domain_shift is {w}x{h} px"
    header = re.search(r"<p>Runs: ([^<]*)</p>", page).group(1)
    assert header.startswith("tiny-deepseek-v3-humaneval, tiny-deepseek-v3-math500, tiny-deepseek-v3-vicuna;")
    assert str(three_domains[0].parent) not in page and str(tmp_path) not in page
    assert TOP1_NOTE not in page  # top-8: co-activation applies


def test_run_below_the_page_is_named_by_its_relative_path(three_domains, tmp_path):
    import shutil

    site = tmp_path / "site"
    shutil.copytree(three_domains[0], site / "runs" / "code")
    main(["report", str(site / "runs" / "code"), "-o", str(site / "index.html")])
    page = (site / "index.html").read_text()
    assert "<p>Runs: runs/code;" in page and str(tmp_path) not in page


def test_domain_shift_panels_form_a_grid_of_readable_size(three_domains):
    dom = analyze(three_domains, what="domain")["domain"]
    diff, groups = dom.arrays["share_diff"], dom.arrays["groups"]
    assert sorted(groups) == ["chat", "code", "math"] and diff.shape[1:] == (3, 256)
    fig = draw_domain_shift(diff, groups, np.array([1, 2, 3]))
    w, h = fig.get_size_inches()
    panels = [ax for ax in fig.axes if ax.get_title() in groups]
    assert len(panels) == 3 and w <= 10.5 and w / h <= 2.5
    # 256 experts: each layer's most shifted experts, the rest aggregated, so a panel needs no full page width
    fig.canvas.draw()
    assert all(ax.get_xticklabels()[-1].get_text() == "rest" for ax in panels)
    assert all(ax.get_position().width * w >= 2.0 for ax in panels)  # at least 2 inches per panel
    # tall and narrow panels (few experts, many layers) sit side by side instead
    tall = draw_domain_shift(np.zeros((2, 32, 8)), ["code", "math"], np.arange(32))
    tall_panels = [ax for ax in tall.axes if ax.get_title() in ("code", "math")]
    assert len({round(ax.get_position().x0, 3) for ax in tall_panels}) == 2


def _overlaps(boxes) -> list:
    return [(a, b) for a, b in itertools.combinations(boxes, 2) if a.overlaps(b)]


@pytest.mark.parametrize("shape,spread", [((3, 256), 600.0), ((2, 128), 2000.0), ((32, 8), 3.5), ((58, 256), 50.0),
                                          ((1, 64), 1.02)])
def test_load_heatmap_colour_bar_labels_do_not_overlap(shape, spread):
    """Loads spanning ``spread`` (max / min, log-spaced) in every layer, in the layer and expert counts of real
    models (Mixtral 32x8, DeepSeek V3 58x256, the tiny presets)."""
    L, E = shape
    load = np.tile(np.geomspace(1.0, spread, E), (L, 1))
    load[0, 0] = 0  # an expert that no token chose
    fig = draw_load_heatmap(load, np.arange(L), "m")
    fig.canvas.draw()
    cbar = fig.axes[-1]
    boxes = [t.get_window_extent() for t in cbar.get_yticklabels() if t.get_text()]
    assert len(boxes) >= (2 if spread > 1.5 else 1)
    assert not _overlaps(boxes), [t.get_text() for t in cbar.get_yticklabels()]
    assert "grey: no token" in cbar.get_ylabel()


def test_log_ticks_keep_their_distance():
    ticks = log_ticks(0.02, 13.0, axis_inches=2.0)  # the range that overlapped: 0.75, 1, 1.5, 2, 3 in 0.4 inch
    assert 1 in ticks and ticks == sorted(ticks)
    gaps = np.diff(np.log10(ticks)) / np.log10(13.0 / 0.02) * 2.0
    assert gaps.min() >= 0.28


def _cell_rgb(fig, ax, row, col):
    """The colour the heatmap of ``ax`` gives cell (row, col), over the white page (a transparent cell is white)."""
    im = ax.images[0]
    r, g, b, a = im.to_rgba(im.get_array())[row, col]
    return np.array([r, g, b]) * a + (1 - a)


def test_coactivation_zero_looks_unlike_the_maximum_and_the_minimum(three_domains):
    coa = analyze(three_domains, what="coactivation", layer=2)["coactivation"]
    pairs = coa.arrays["pairs"][2]
    (tk, tmat), = coa.arrays["transitions"].items()
    fig = draw_coactivation(pairs, 2, tmat, tk[1])
    ax, = [a for a in fig.axes if a.get_title().startswith("Co-activation in layer 2")]
    shown = np.ma.filled(ax.images[0].get_array(), 0)  # 256 experts: the most co-chosen ones and a "rest"
    off = ~np.eye(len(shown), dtype=bool)
    hi = np.unravel_index(np.argmax(np.where(off, shown, -1)), shown.shape)
    lo = np.unravel_index(np.argmin(np.where(off & (shown > 0), shown, shown.max() + 1)), shown.shape)
    zero = _cell_rgb(fig, ax, 0, 0)  # the diagonal: never a pair
    from matplotlib.colors import to_rgb

    assert np.allclose(zero, to_rgb(NO_DATA_GREY), atol=0.02)
    for other in (hi, lo):
        assert np.abs(_cell_rgb(fig, ax, *other) - zero).sum() > 0.3, other
    # inter-layer affinity: a path no token took is grey, not the white of "independent"
    ax2, = [a for a in fig.axes if a.get_title().startswith("Inter-layer affinity")]
    r, c = np.argwhere(np.ma.getmaskarray(ax2.images[0].get_array()))[0]  # a path no token took
    assert np.allclose(_cell_rgb(fig, ax2, r, c), to_rgb(NO_DATA_GREY), atol=0.02)


def test_correlation_axis_follows_the_data_and_shows_the_baseline(three_domains):
    cor = analyze(three_domains, what="correlation")["correlation"]
    real = {n: cor.arrays[f"real_{n}"] for n in ("spearman", "pearson")}
    base = {n: cor.arrays[f"base_{n}"] for n in ("spearman", "pearson")}
    vals = np.concatenate([a[np.isfinite(a)] for a in (*real.values(), *base.values())])
    lo, hi = vals.min(), vals.max()
    fig = draw_correlation(real, base)
    for ax in fig.axes:
        x0, x1 = ax.get_xlim()
        assert x0 <= lo and hi <= x1  # every value, own decode and baseline, is inside
        pad = max(0.1 * (hi - lo), 0.1 - (hi - lo) / 2, 0.02) + 1e-9
        assert x0 >= max(-1, lo - pad) and x1 <= min(1, hi + pad)
        baseline = [p for p in ax.patches if p.get_facecolor()[:3] == ax.patches[-1].get_facecolor()[:3]]
        assert sum(p.get_height() for p in baseline) == np.isfinite(base["spearman"]).sum()
    assert correlation_range(np.array([0.2, 0.8])) == pytest.approx((0.14, 0.86))
    assert correlation_range(np.array([-0.95, 0.99])) == (-1.0, 1.0)


def test_top1_model_says_coactivation_does_not_apply(top1_runs, tmp_path, capsys):
    coa = analyze(top1_runs, what="coactivation")["coactivation"]
    assert coa.notes[0] == TOP1_NOTE and "co-activation within a layer" not in coa.summaries
    assert coa.tables["pairs"].num_rows == 0 and coa.tables["affinity"].num_rows > 0  # affinity still applies
    main(["analyze", *map(str, top1_runs), "--what", "coactivation", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "not applicable to top-1 routing" in out and "nan" not in out
    assert pq.read_table(tmp_path / "out" / "coactivation_pairs.parquet").num_rows == 0
    page, pngs = _report(top1_runs, tmp_path)
    section = page.split("<h2>Co-activation, layer 1</h2>", 1)[1].split("<h2>", 1)[0]
    assert f"<p class='na'>{TOP1_NOTE}</p>" in section  # the default layer has a next layer: the affinity panel
    assert "nan" not in page.split("<h2>Summary tables</h2>", 1)[1]
    fig = draw_coactivation(None, 1, np.ones((4, 4)), 3)  # top-1: the affinity panel alone, no blank heatmap
    assert [ax.get_title().split(",")[0] for ax in fig.axes if ax.get_title()] == ["Inter-layer affinity"]
