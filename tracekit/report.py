"""One self-contained HTML page with the figures of the three findings (matplotlib, PNGs embedded as base64)."""
from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from .analysis.coactivation import TOP1_NOTE
from .analysis.run import analyze
from .errors import TracekitError
from .query import connect, resolve_runs
from .report_figures import (fig_coactivation, fig_correlation, fig_domain_shift, fig_imbalance_curve, fig_load_heatmap,
                              fig_run_diff, placeholder)


def _short(labels: list[str], limit: int = 60) -> str:
    text = ", ".join(labels)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_label(path: Path, base: Path) -> str:
    """How the page names a run: its path relative to the page's folder when it lies below it, else its folder
    name (never an absolute path: the page is meant to be shared)."""
    try:
        return Path(path).resolve().relative_to(Path(base).resolve()).as_posix()
    except ValueError:
        return Path(path).resolve().name


def _html_table(table, max_rows: int = 20) -> str:
    from .formatting import format_cell

    head = "".join(f"<th>{html.escape(c)}</th>" for c in table.column_names)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(format_cell(v))}</td>" for v in r.values()) + "</tr>"
                   for r in table.slice(0, max_rows).to_pylist())
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(runs: str | os.PathLike | Iterable, out_html: str | os.PathLike, png_dir: str | os.PathLike | None = None,
                 layer: int | None = None, by: str = "domain", seed: int = 0, memory_budget: str | None = None,
                 compare: str | os.PathLike | Iterable | None = None, draws: int | None = None) -> Path:
    """Analyse ``runs`` and write one self-contained HTML page (figures as base64 PNG); with ``png_dir`` also
    write each figure as a PNG file there. ``layer``: MoE layer of the co-activation heatmap (default middle).
    ``compare``: a second run set; the page then also says how it routes differently from ``runs`` (B vs A, as
    ``tracekit diff A B``: :func:`.diff.diff_runs`, ``draws`` bootstrap resamples). Returns the HTML path."""
    out_html = Path(out_html)
    opened = resolve_runs(runs)
    other = resolve_runs(compare) if compare is not None else None
    from .analysis.budget import MemoryBudget

    budget = MemoryBudget.of(memory_budget)
    con = connect([r.path for r in opened], memory_limit=budget.duckdb_limit)
    try:
        from .analysis.data import geometry

        geo = geometry(con)
        layers = geo.layers
        if layer is None:
            layer = int(layers[(len(layers) - 1) // 2])  # the middle one, never the last when there are two
        elif layer not in layers.tolist():
            raise TracekitError(f"--layer {layer} is not a MoE layer of these traces ({layers[0]}..{layers[-1]})")
        res = analyze(con, by=by, layer=layer, seed=seed, memory_budget=budget)
    finally:
        con.close()
    from .progress import current

    current().describe("drawing the figures")
    models = sorted({str((r.manifest.get("model") or {}).get("name", "?")) for r in opened})
    model = ", ".join(models)
    imb, dom, cor, coa = res["imbalance"], res["domain"], res["correlation"], res["coactivation"]
    figs: list[tuple[str, str, bytes]] = []
    figs.append(("load_heatmap", "Expert load per layer", fig_load_heatmap(imb.arrays["load"], layers, model)))
    findings, band = report_findings(res, layers, geo.top_k, by, seed)
    curves = {"all tokens": imb.arrays["max_mean"]}
    for ph in ("prefill", "decode"):
        if f"max_mean_{ph}" in imb.arrays:
            curves[ph] = imb.arrays[f"max_mean_{ph}"]
    figs.append(("imbalance_curve", "Load imbalance per layer", fig_imbalance_curve(layers, curves, band)))
    if "share_diff" in dom.arrays:
        figs.append(("domain_shift", "Domain shift", fig_domain_shift(
            dom.arrays["share_diff"], dom.arrays["groups"], layers, dom.arrays.get("js_sample"),
            dom.arrays.get("js_shuffled"))))
    else:
        figs.append(("domain_shift", "Domain shift", placeholder("Domain shift", "; ".join(dom.notes) or "one group only")))
    if "real_spearman" in cor.arrays:
        figs.append(("prefill_decode_correlation", "Prefill-decode correlation", fig_correlation(
            {"spearman": cor.arrays["real_spearman"], "pearson": cor.arrays["real_pearson"]},
            {"spearman": cor.arrays["base_spearman"], "pearson": cor.arrays["base_pearson"]})))
    else:
        figs.append(("prefill_decode_correlation", "Prefill-decode correlation",
                     placeholder("Prefill-decode correlation", "; ".join(cor.notes))))
    trans = coa.arrays.get("transitions", {})
    (tkey, tmat) = next(iter(trans.items())) if trans else ((layer, None), None)
    pairs = coa.arrays["pairs"].get(layer)  # None for top-1 routing: co-activation does not apply
    figs.append(("coactivation", f"Co-activation, layer {layer}",
                 fig_coactivation(pairs, layer, tmat, tkey[1] if tmat is not None else None)))
    captions = {"coactivation": TOP1_NOTE} if pairs is None else {}
    diff = None
    if other is not None:
        from .diff import BOOTSTRAP, diff_runs

        label_a = _short([run_label(r.path, out_html.parent) for r in opened])
        label_b = _short([run_label(r.path, out_html.parent) for r in other])
        current().describe("comparing with the --compare runs (bootstrap over requests)")
        diff = diff_runs([r.path for r in opened], [r.path for r in other], by=by, draws=draws or BOOTSTRAP,
                         seed=seed, memory_budget=memory_budget, analysed_a=res)
        figs.append(("run_diff", "Load shift and imbalance per layer, B vs A",
                     fig_run_diff(diff.arrays, label_a, label_b)))

    if png_dir is not None:
        png_dir = Path(png_dir)
        png_dir.mkdir(parents=True, exist_ok=True)
        for name, _, data in figs:
            _atomic_bytes(png_dir / f"{name}.png", data)

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>tracekit report: {html.escape(model)}</title>",
             "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}"
             "img{max-width:100%;border:1px solid #ddd}table{border-collapse:collapse;font-size:12px;margin:0.5em 0 1.5em}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#f3f3f3}li.finding{margin:0.4em 0}</style></head><body>",
             f"<h1>tracekit report: {html.escape(model)}</h1>",
             f"<p>Runs: {html.escape(', '.join(run_label(r.path, out_html.parent) for r in opened))}; "
             f"MoE layers {layers[0]}..{layers[-1]}, "
             f"E={geo.num_experts}, top-{geo.top_k}.</p>"]
    parts.append(findings_html(findings))
    for name, title, data in figs:
        if name == "run_diff":
            parts.append("<h2 id='compare'>Compared with B</h2>"
                         f"<p>A: {html.escape(', '.join(run_label(r.path, out_html.parent) for r in opened))}<br/>"
                         f"B: {html.escape(', '.join(run_label(r.path, out_html.parent) for r in other))}</p>"
                         "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in diff.lines) + "</ul>")
        parts.append(f"<h2>{html.escape(title)}</h2><img alt='{name}' id='fig-{name}' src='data:image/png;base64,"
                     f"{base64.b64encode(data).decode()}'/>")
        if name in captions:
            parts.append(f"<p class='na'>{html.escape(captions[name])}</p>")
        if name == "run_diff":
            for title_, table in diff.summaries.items():
                parts.append(f"<h3>{html.escape(title_)}</h3>{_html_table(table)}")
    parts.append("<h2>Summary tables</h2>")
    for r in res.values():
        for title, table in r.summaries.items():
            parts.append(f"<h3>{html.escape(r.name)}: {html.escape(title)}</h3>{_html_table(table)}")
        for note in r.notes:
            parts.append(f"<p><em>note: {html.escape(note)}</em></p>")
    parts.append("</body></html>")
    _atomic_bytes(out_html, "\n".join(parts).encode())
    return out_html


def report_findings(res: dict, layers: np.ndarray, top_k: int, by: str, seed: int = 0) -> tuple[list, dict | None]:
    """The three findings of ``res`` (what :func:`.analysis.run.analyze` returns) and the imbalance figure's
    uniform band."""
    from .analysis.findings import correlation_finding, domain_finding, imbalance_finding

    imb, dom, cor = res["imbalance"], res["domain"], res["correlation"]
    f_imb, band = imbalance_finding(imb.arrays["load"], layers, top_k, seed=seed)
    f_dom = domain_finding(dom.arrays.get("js_sample"), dom.arrays.get("js_shuffled"), by,
                           list(dom.arrays.get("js_groups") or dom.arrays.get("groups") or []),
                           int(dom.arrays.get("js_requests", 0)), dom.arrays.get("classifier"))
    f_cor = correlation_finding(cor.arrays.get("real_spearman"), cor.arrays.get("base_spearman"),
                                "; ".join(cor.notes), seed=seed)
    return [f_imb, f_dom, f_cor], band


VERDICT_COLOURS = {True: "#1a7f37", False: "#b35900", None: "#666"}


def findings_html(findings: list) -> str:
    items = "".join(f"<li class='finding' data-holds='{str(f.holds).lower()}'><strong style='color:"
                    f"{VERDICT_COLOURS[f.holds]}'>[{f.verdict}]</strong> {html.escape(f.sentence)}</li>"
                    for f in findings)
    return f"<h2 id='findings'>Findings</h2><ul>{items}</ul>"


def _atomic_bytes(path: Path, data: bytes) -> None:
    from .atomic import atomic_write_bytes

    atomic_write_bytes(path, data)
