"""`tracekit report` and `tracekit analyze` end to end on the real Mixtral traces."""
from __future__ import annotations

import base64
import re

import pyarrow.parquet as pq
import pytest

from tracekit.cli import main
from tracekit.importers.jsonl import import_jsonl

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
