"""One self-contained HTML page with the figures of the three findings (matplotlib, PNGs embedded as base64)."""
from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from .analysis.run import analyze
from .errors import TracekitError
from .query import connect, resolve_runs


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _figure().close(fig)
    return buf.getvalue()


def _placeholder(title: str, text: str) -> bytes:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 2.2))
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    return _png(fig)


def fig_load_heatmap(load: np.ndarray, layers: np.ndarray, model: str) -> bytes:
    """load: (L, E) assignments -> heatmap of load / mean load per layer."""
    plt = _figure()
    rel = load / np.maximum(load.mean(1, keepdims=True), 1e-12)
    L, E = rel.shape
    fig, ax = plt.subplots(figsize=(min(16, 5 + E / 24), min(12, 2.5 + L / 5)))
    from matplotlib.colors import LogNorm

    pos = rel[rel > 0]
    lo = max(float(pos.min()) if pos.size else 0.1, 0.02)  # log scale: skewed layers must not wash out the rest
    im = ax.imshow(np.clip(rel, lo, None), aspect="auto", cmap="viridis", interpolation="nearest",
                   norm=LogNorm(vmin=lo, vmax=max(float(rel.max()), lo * 1.01)), extent=(-0.5, E - 0.5, L - 0.5, -0.5))
    ax.set_yticks(np.arange(L)[:: max(1, L // 16)])
    ax.set_yticklabels(layers[:: max(1, L // 16)])
    ax.set_xlabel("expert id")
    ax.set_ylabel("MoE layer")
    ax.set_title(f"Expert load per layer ({model}): load / mean load of the layer")
    cb = fig.colorbar(im, ax=ax, label="load / mean (1 = balanced, log scale)")
    vmin, vmax = im.norm.vmin, im.norm.vmax
    ticks = [t for t in (0.02, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 50) if vmin <= t <= vmax]
    cb.set_ticks(ticks, labels=[f"{t:g}" for t in ticks])
    cb.minorticks_off()
    return _png(fig)


def fig_imbalance_curve(layers: np.ndarray, curves: dict[str, np.ndarray]) -> bytes:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(9, 4))
    for name, y in curves.items():
        ax.plot(layers, y, marker="o", ms=3, label=name, lw=2 if name == "all tokens" else 1.2)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("MoE layer")
    ax.xaxis.get_major_locator().set_params(integer=True)  # layers are whole numbers
    ax.set_ylabel("max / mean expert load")
    ax.set_title("Load imbalance per layer (1 = perfectly balanced)")
    ax.legend()
    ax.grid(alpha=0.3)
    return _png(fig)


def fig_domain_shift(diff: np.ndarray, groups: list[str], layers: np.ndarray) -> bytes:
    """diff: (D, L, E) share in group - overall share."""
    plt = _figure()
    D = min(len(groups), 4)
    L, E = diff.shape[1:]
    a = np.abs(diff[:D])
    vmax = float(np.nanpercentile(a, 99.5)) if np.isfinite(a).any() else 0.0
    vmax = vmax or 1e-9  # 99.5th percentile: a few outliers must not wash out the rest
    fig, axes = plt.subplots(1, D, figsize=(min(18, 3 + D * (2 + E / 40)), min(12, 2.5 + L / 5)), squeeze=False,
                             layout="constrained")  # keeps the figure title clear of the panel titles
    for d in range(D):
        ax = axes[0, d]
        im = ax.imshow(diff[d], aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest",
                       extent=(-0.5, E - 0.5, L - 0.5, -0.5))
        ax.set_title(groups[d])
        ax.set_xlabel("expert id")
        if d == 0:
            ax.set_yticks(np.arange(L)[:: max(1, L // 16)])
            ax.set_yticklabels(layers[:: max(1, L // 16)])
            ax.set_ylabel("MoE layer")
        else:
            ax.set_yticks([])
    fig.suptitle("Domain shift: expert share within the group minus share over all requests")
    fig.colorbar(im, ax=axes[0, :].tolist(), label="share difference\n(red: more popular in the group)")
    return _png(fig)


def fig_correlation(real: dict[str, np.ndarray], base: dict[str, np.ndarray]) -> bytes:
    plt = _figure()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    bins = np.linspace(-1, 1, 41)
    for ax, name in zip(axes, ("spearman", "pearson")):
        r, b = real[name].reshape(-1), base[name].reshape(-1)
        r, b = r[np.isfinite(r)], b[np.isfinite(b)]
        ax.hist(r, bins=bins, alpha=0.6, label=f"own decode (mean {r.mean():.2f})" if len(r) else "own decode", color="C0")
        ax.hist(b, bins=bins, alpha=0.6, label=f"another request's decode (mean {b.mean():.2f})" if len(b) else "shuffled", color="C1")
        ax.set_xlabel(f"{name.capitalize()} correlation of prefill and decode expert histograms")
        ax.set_ylabel("(request, layer) pairs")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("Prefill-decode correlation per request and layer vs a shuffled baseline")
    return _png(fig)


def fig_coactivation(pairs: np.ndarray, layer: int, trans: np.ndarray | None, next_layer: int | None) -> bytes:
    plt = _figure()
    fig, axes = plt.subplots(1, 2 if trans is not None else 1, figsize=(13 if trans is not None else 7, 5.5), squeeze=False)
    from matplotlib.colors import LogNorm

    share = pairs / max(pairs.sum() / 2, 1)
    pos = share[share > 0]
    im = axes[0, 0].imshow(np.where(share > 0, share, np.nan), cmap="magma", interpolation="nearest",
                           norm=LogNorm(vmin=pos.min(), vmax=pos.max()) if pos.size else None)
    axes[0, 0].set_title(f"Co-activation in layer {layer}: share of expert pairs\n(diagonal blank: an expert is not paired with itself)", fontsize=10)
    axes[0, 0].set_xlabel("expert")
    axes[0, 0].set_ylabel("expert")
    fig.colorbar(im, ax=axes[0, 0], label="tokens choosing both / all pairs (log)")
    if trans is not None:
        with np.errstate(invalid="ignore", divide="ignore"):
            cond = trans / trans.sum(1, keepdims=True)
            lift = cond / (trans.sum(0) / max(trans.sum(), 1))[None, :]
        lift = np.clip(np.where(np.isfinite(lift) & (lift > 0), lift, np.nan), 0.1, 10)
        im2 = axes[0, 1].imshow(lift, cmap="RdBu_r", interpolation="nearest", norm=LogNorm(vmin=0.1, vmax=10))
        axes[0, 1].set_title(f"Inter-layer affinity, same token, layer {layer} -> {next_layer}", fontsize=10)
        axes[0, 1].set_xlabel(f"expert at layer {next_layer}")
        axes[0, 1].set_ylabel(f"expert at layer {layer}")
        fig.colorbar(im2, ax=axes[0, 1], label="P(next | expert) / P(next)  (1 = independent, log)")
    return _png(fig)


def _html_table(table, max_rows: int = 20) -> str:
    from .cli.query_cmd import _fmt

    head = "".join(f"<th>{html.escape(c)}</th>" for c in table.column_names)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r.values()) + "</tr>"
                   for r in table.slice(0, max_rows).to_pylist())
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(runs: str | os.PathLike | Iterable, out_html: str | os.PathLike, png_dir: str | os.PathLike | None = None,
                 layer: int | None = None, by: str = "domain", seed: int = 0, memory_budget: str | None = None) -> Path:
    """Analyse ``runs`` and write one self-contained HTML page (figures as base64 PNG); with ``png_dir`` also
    write each figure as a PNG file there. ``layer``: MoE layer of the co-activation heatmap (default middle).
    Returns the HTML path."""
    out_html = Path(out_html)
    opened = resolve_runs(runs)
    from .analysis.budget import MemoryBudget

    budget = MemoryBudget.of(memory_budget)
    con = connect([r.path for r in opened], memory_limit=budget.duckdb_limit)
    try:
        from .analysis.data import geometry

        geo = geometry(con)
        layers = geo.layers
        if layer is None:
            layer = int(layers[len(layers) // 2])
        elif layer not in layers.tolist():
            raise TracekitError(f"--layer {layer} is not a MoE layer of these traces ({layers[0]}..{layers[-1]})")
        res = analyze(con, by=by, layer=layer, seed=seed, memory_budget=budget)
    finally:
        con.close()
    models = sorted({str((r.manifest.get("model") or {}).get("name", "?")) for r in opened})
    model = ", ".join(models)
    imb, dom, cor, coa = res["imbalance"], res["domain"], res["correlation"], res["coactivation"]
    figs: list[tuple[str, str, bytes]] = []
    figs.append(("load_heatmap", "Expert load per layer", fig_load_heatmap(imb.arrays["load"], layers, model)))
    curves = {"all tokens": imb.arrays["max_mean"]}
    for ph in ("prefill", "decode"):
        if f"max_mean_{ph}" in imb.arrays:
            curves[ph] = imb.arrays[f"max_mean_{ph}"]
    figs.append(("imbalance_curve", "Load imbalance per layer", fig_imbalance_curve(layers, curves)))
    if "share_diff" in dom.arrays:
        figs.append(("domain_shift", "Domain shift", fig_domain_shift(dom.arrays["share_diff"], dom.arrays["groups"], layers)))
    else:
        figs.append(("domain_shift", "Domain shift", _placeholder("Domain shift", "; ".join(dom.notes) or "one group only")))
    if "real_spearman" in cor.arrays:
        figs.append(("prefill_decode_correlation", "Prefill-decode correlation", fig_correlation(
            {"spearman": cor.arrays["real_spearman"], "pearson": cor.arrays["real_pearson"]},
            {"spearman": cor.arrays["base_spearman"], "pearson": cor.arrays["base_pearson"]})))
    else:
        figs.append(("prefill_decode_correlation", "Prefill-decode correlation",
                     _placeholder("Prefill-decode correlation", "; ".join(cor.notes))))
    trans = coa.arrays.get("transitions", {})
    (tkey, tmat) = next(iter(trans.items())) if trans else ((layer, None), None)
    figs.append(("coactivation", f"Co-activation, layer {layer}",
                 fig_coactivation(coa.arrays["pairs"][layer], layer, tmat, tkey[1] if tmat is not None else None)))

    if png_dir is not None:
        png_dir = Path(png_dir)
        png_dir.mkdir(parents=True, exist_ok=True)
        for name, _, data in figs:
            _atomic_bytes(png_dir / f"{name}.png", data)

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>tracekit report: {html.escape(model)}</title>",
             "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}"
             "img{max-width:100%;border:1px solid #ddd}table{border-collapse:collapse;font-size:12px;margin:0.5em 0 1.5em}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#f3f3f3}</style></head><body>",
             f"<h1>tracekit report: {html.escape(model)}</h1>",
             f"<p>Runs: {html.escape(', '.join(str(r.path) for r in opened))}; MoE layers {layers[0]}..{layers[-1]}, "
             f"E={geo.num_experts}, top-{geo.top_k}.</p>"]
    for name, title, data in figs:
        parts.append(f"<h2>{html.escape(title)}</h2><img alt='{name}' id='fig-{name}' src='data:image/png;base64,"
                     f"{base64.b64encode(data).decode()}'/>")
    parts.append("<h2>Summary tables</h2>")
    for r in res.values():
        for title, table in r.summaries.items():
            parts.append(f"<h3>{html.escape(r.name)}: {html.escape(title)}</h3>{_html_table(table)}")
        for note in r.notes:
            parts.append(f"<p><em>note: {html.escape(note)}</em></p>")
    parts.append("</body></html>")
    _atomic_bytes(out_html, "\n".join(parts).encode())
    return out_html


def _atomic_bytes(path: Path, data: bytes) -> None:
    from .store import atomic_write_bytes

    atomic_write_bytes(path, data)
