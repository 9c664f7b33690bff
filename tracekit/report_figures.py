"""The report's figures: matplotlib drawings of the three findings, each also as PNG bytes (``fig_*``).

Readable at any width: beyond ``WIDE_EXPERTS`` experts a figure shows each layer's top experts (by load, shift or
co-activation, clustered) and aggregates the rest, so a 256- or 384-expert model reads like an 8-expert one.
"""
from __future__ import annotations

import io

import numpy as np

from .analysis.coactivation import TOP1_NOTE


def new_figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# Every figure is at most this wide (inches at DPI): the page is 1200 px wide, so no figure is scaled down and its
# text shows at the size it was drawn.
DPI = 110
MAX_WIDTH_IN = 10.5
NO_DATA_GREY = "#c8c8c8"


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    new_figure().close(fig)
    return buf.getvalue()


def placeholder_figure(title: str, text: str):
    plt = new_figure()
    fig, ax = plt.subplots(figsize=(7, 2.2))
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    return fig


def placeholder(title: str, text: str) -> bytes:
    return png_bytes(placeholder_figure(title, text))


# Round multipliers of a power of ten, coarse levels first: a finer level is used only while the bar has few ticks.
_TICK_LEVELS = ((1,), (2, 5), (3, 1.5), (1.2, 1.4, 1.6, 1.8, 2.5, 4, 6, 7, 8, 9))


def log_ticks(vmin: float, vmax: float, axis_inches: float, min_gap_in: float = 0.28, enough: int = 4) -> list[float]:
    """Tick values for a log colour bar ``axis_inches`` long: round numbers (powers of ten first, 1 before all,
    then 2 and 5, ...), none closer than ``min_gap_in`` to another so that their labels never overlap; finer round
    numbers only while there are fewer than ``enough``."""
    lv, hv = np.log10(vmin), np.log10(vmax)
    if hv - lv <= 0:
        return [vmin]
    gap = (hv - lv) * min_gap_in / max(axis_inches, 1e-6)  # in decades
    decades = range(int(np.floor(lv)), int(np.ceil(hv)) + 1)
    chosen: list[float] = []
    for i, level in enumerate(_TICK_LEVELS):
        if len(chosen) >= enough:
            break
        # beyond powers of ten, keep ticks spread out: about ``enough`` over the bar, never bunched around 1
        need = gap if i == 0 else max(gap, (hv - lv) / (enough + 1))
        cands = sorted({float(f"{m * 10.0 ** d:.6g}") for m in level for d in decades}, key=lambda t: abs(np.log10(t)))
        for t in cands:
            if lv <= np.log10(t) <= hv and all(abs(np.log10(t) - np.log10(c)) >= need for c in chosen):
                chosen.append(t)
    if len(chosen) < 2:  # a narrow range with at most one round number in it: label its ends (3 digits, inside)
        for t, r in ((vmin, np.ceil), (vmax, np.floor)):
            scale = 10.0 ** (np.floor(np.log10(t)) - 2)
            t = float(f"{r(t / scale) * scale:.3g}")
            if vmin <= t <= vmax and all(abs(np.log10(t) - np.log10(c)) >= gap for c in chosen):
                chosen.append(t)
    return sorted(chosen)


def draw_load_heatmap(load: np.ndarray, layers: np.ndarray, model: str):
    """load: (L, E) assignments -> Figure: heatmap of load / mean load per layer (log colour scale, grey = 0)."""
    plt = new_figure()
    from matplotlib.colors import LogNorm

    rel = load / np.maximum(load.mean(1, keepdims=True), 1e-12)
    num_experts = rel.shape[1]
    ranked = num_experts > WIDE_EXPERTS
    if ranked:  # a 256-expert row is a barcode: each layer's experts by load, the busiest, the rest's mean and
        rel = ranked_with_rest(rel, TOP_LOAD, tail=IDLE_LOAD)  # the idlest (an expert no token chose shows grey)
    L, E = rel.shape
    height = min(12.0, 2.5 + L / 5)
    fig, ax = plt.subplots(figsize=(min(MAX_WIDTH_IN, 5 + E / 24), height))
    pos = rel[rel > 0]
    lo = max(float(pos.min()) if pos.size else 0.1, 0.02)  # log scale: skewed layers must not wash out the rest
    hi = max(float(rel.max()), lo * 1.01)
    cmap = plt.get_cmap("viridis").with_extremes(bad=NO_DATA_GREY)
    shown = np.ma.masked_less_equal(np.clip(rel, lo, None) * (rel > 0), 0)  # an expert with no token: grey
    im = ax.imshow(shown, aspect="auto", cmap=cmap, interpolation="nearest", norm=LogNorm(vmin=lo, vmax=hi),
                   extent=(-0.5, E - 0.5, L - 0.5, -0.5))
    ax.set_yticks(np.arange(L)[:: max(1, L // 16)])
    ax.set_yticklabels(layers[:: max(1, L // 16)])
    if ranked:
        ax.set_xlabel(f"experts of each layer by load rank: the {TOP_LOAD} busiest, the mean of the next "
                      f"{num_experts - TOP_LOAD - IDLE_LOAD}, the {IDLE_LOAD} idlest (of {num_experts})")
        ticks = list(range(0, TOP_LOAD, 8)) + [TOP_LOAD, E - 1]
        ax.set_xticks(ticks, [str(t + 1) for t in ticks[:-2]] + ["rest", str(num_experts)])
        for x in (TOP_LOAD - 0.5, TOP_LOAD + 0.5):
            ax.axvline(x, color="white", lw=2)
    else:
        ax.set_xlabel("expert id")
    ax.set_ylabel("MoE layer")
    ax.set_title(f"Expert load per layer ({model}): load / mean load of the layer")
    label = "load / mean (1 = balanced, log scale)" + ("\ngrey: no token" if (rel <= 0).any() else "")
    cb = fig.colorbar(im, ax=ax, label=label)
    ticks = log_ticks(lo, hi, axis_inches=0.75 * height)
    cb.set_ticks(ticks, labels=[f"{t:g}" for t in ticks])
    cb.minorticks_off()
    return fig


WIDE_EXPERTS = 48  # beyond this many experts a figure shows each layer's top experts and aggregates the rest
TOP_LOAD = 40
IDLE_LOAD = 8
TOP_SHIFT = 32
TOP_PAIRS = 32


def ranked_with_rest(values: np.ndarray, n: int, key: np.ndarray | None = None, tail: int = 0) -> np.ndarray:
    """values: (L, E) -> (L, n + 1 + tail): each row's entries in descending order of ``key`` (default the values),
    the first ``n``, then the mean of the middle E - n - tail, then the last ``tail``."""
    key = values if key is None else key
    order = np.argsort(-key, axis=1, kind="stable")
    s = np.take_along_axis(values, order, axis=1)
    E = s.shape[1]
    return np.concatenate([s[:, :n], s[:, n:E - tail].mean(1, keepdims=True), s[:, E - tail:]], axis=1)


def fig_load_heatmap(load: np.ndarray, layers: np.ndarray, model: str) -> bytes:
    return png_bytes(draw_load_heatmap(load, layers, model))


def draw_imbalance_curve(layers: np.ndarray, curves: dict[str, np.ndarray], band: dict | None = None):
    """curves: {name: (L,) max / mean load}; band: {"median", "lo", "hi": (L,)} of uniform routing of the same
    token count (:func:`.analysis.findings.imbalance_finding`), drawn as a grey band -> Figure."""
    plt = new_figure()
    fig, ax = plt.subplots(figsize=(9, 4))
    if band is not None:
        ax.fill_between(layers, band["lo"], band["hi"], color="0.6", alpha=0.35, lw=0,
                        label="uniform routing, same tokens (5-95%)")
        ax.plot(layers, band["median"], color="0.35", lw=1, ls=":")
    for name, y in curves.items():
        ax.plot(layers, y, marker="o", ms=3, label=name, lw=2 if name == "all tokens" else 1.2)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("MoE layer")
    ax.xaxis.get_major_locator().set_params(integer=True)  # layers are whole numbers
    ax.set_ylabel("max / mean expert load")
    ax.set_title("Load imbalance per layer (1 = perfectly balanced; grey band: uniform routing of the same tokens)",
                 fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def fig_imbalance_curve(layers: np.ndarray, curves: dict[str, np.ndarray], band: dict | None = None) -> bytes:
    return png_bytes(draw_imbalance_curve(layers, curves, band))


MAX_GROUP_PANELS = 6


def panel_grid(n: int, num_experts: int, num_layers: int) -> tuple[int, int, float, float]:
    """Panels of (layers x experts) heatmaps laid out in a grid whose whole is close to 3:2 and at most
    MAX_WIDTH_IN wide: returns (rows, cols, panel width, panel height) in inches."""
    pw, ph = float(np.clip(1.5 + num_experts / 32, 2.5, 8.5)), float(np.clip(1.0 + num_layers / 6, 1.6, 7.0))
    best = None
    for cols in range(1, n + 1):
        rows = -(-n // cols)
        w = min(pw, (MAX_WIDTH_IN - 1.8) / cols)
        if w < 2.0 and cols > 1:
            break
        h = min(ph, 13.0 / rows)
        score = abs(np.log((cols * w + 1.8) / (rows * h + 1.0) / 1.5))
        if best is None or score < best[0]:
            best = (score, rows, cols, w, h)
    return best[1], best[2], best[3], best[4]


def draw_domain_shift(diff: np.ndarray, groups: list[str], layers: np.ndarray, js: np.ndarray | None = None,
                      js_shuffled: np.ndarray | None = None):
    """diff: (D, L, E) share in group - overall share -> Figure with one panel per group (at most
    MAX_GROUP_PANELS), in a grid so that the text keeps its size. Past WIDE_EXPERTS experts each layer's experts
    are ordered by their shift (most over-represented first; the rest's mean last). With ``js`` (L,) and
    ``js_shuffled`` (P, L) a panel below draws the groups' divergence per layer against shuffled labels."""
    plt = new_figure()
    D = min(len(groups), MAX_GROUP_PANELS)
    num_experts = diff.shape[2]
    ranked = num_experts > WIDE_EXPERTS
    if ranked:
        diff = np.stack([ranked_with_rest(np.nan_to_num(d), TOP_SHIFT) for d in diff[:D]])
    L, E = diff.shape[1:]
    a = np.abs(diff[:D])
    vmax = float(np.nanpercentile(a, 99.5)) if np.isfinite(a).any() else 0.0
    vmax = vmax or 1e-9  # 99.5th percentile: a few outliers must not wash out the rest
    rows, cols, pw, ph = panel_grid(D, E, L)
    base = js is not None and js_shuffled is not None and len(js_shuffled)
    size = (cols * pw + 1.8, rows * ph + 1.0 + (2.4 if base else 0.0))
    fig = plt.figure(figsize=size, layout="constrained")  # keeps the figure title clear of the panel titles
    top, bottom = fig.subfigures(2, 1, height_ratios=[rows * ph + 1.0, 2.4]) if base else (fig, None)
    axes = top.subplots(rows, cols, squeeze=False)
    step = max(1, L // max(2, int(ph * 3)))  # about three layer labels per inch
    for i, ax in enumerate(axes.flat):
        if i >= D:
            ax.axis("off")
            continue
        im = ax.imshow(diff[i], aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest",
                       extent=(-0.5, E - 0.5, L - 0.5, -0.5))
        ax.set_title(groups[i])
        if i // cols == rows - 1 or i + cols >= D:
            ax.set_xlabel("expert rank by shift" if ranked else "expert id")
        if ranked:
            ticks = list(range(0, TOP_SHIFT, 8)) + [TOP_SHIFT]
            ax.set_xticks(ticks, [str(t + 1) for t in ticks[:-1]] + ["rest"])
            ax.axvline(TOP_SHIFT - 0.5, color="black", lw=1)
        if i % cols == 0:
            ax.set_yticks(np.arange(L)[::step])
            ax.set_yticklabels(layers[::step])
            ax.set_ylabel("MoE layer")
        else:
            ax.set_yticks([])
    more = f" (first {D} of {len(groups)} groups)" if len(groups) > D else ""
    top.suptitle("Domain shift: expert share within the group minus share over all requests" + more + (
        f"\neach layer's {TOP_SHIFT} most over-represented of {num_experts} experts, then the mean of the rest"
        if ranked else ""))
    top.colorbar(im, ax=axes.ravel().tolist(), label="share difference\n(red: more popular in the group)",
                 shrink=min(1.0, 4.0 / (rows * ph)))
    if base:
        ax = bottom.subplots()
        lo, hi = np.nanpercentile(js_shuffled, 5, 0), np.nanpercentile(js_shuffled, 95, 0)
        ax.fill_between(layers, lo, hi, color="0.6", alpha=0.4, lw=0, label="labels shuffled (5-95%)")
        ax.plot(layers, js, marker="o", ms=3, color="C3", label="true labels")
        ax.set_xlabel("MoE layer")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("mean JS divergence\nbetween groups (bits)", fontsize=8)
        ax.set_ylim(bottom=0)
        ax.set_title("How far apart the groups route, per layer, against shuffled group labels", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return fig


def fig_domain_shift(diff: np.ndarray, groups: list[str], layers: np.ndarray, js: np.ndarray | None = None,
                     js_shuffled: np.ndarray | None = None) -> bytes:
    return png_bytes(draw_domain_shift(diff, groups, layers, js, js_shuffled))


def correlation_range(*samples: np.ndarray) -> tuple[float, float]:
    """The x range of the correlation histograms: every finite value of every sample (own decode and the shuffled
    baseline) with a 10% margin, within [-1, 1]; at least 0.2 wide."""
    vals = np.concatenate([np.asarray(s, dtype=np.float64).reshape(-1) for s in samples] or [np.zeros(0)])
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return -1.0, 1.0
    lo, hi = float(vals.min()), float(vals.max())
    pad = max(0.1 * (hi - lo), 0.1 - (hi - lo) / 2, 0.02)
    return max(-1.0, lo - pad), min(1.0, hi + pad)


def draw_correlation(real: dict[str, np.ndarray], base: dict[str, np.ndarray]):
    """real/base: {"spearman"|"pearson": (R, L) correlations} -> Figure: histograms on an axis fitted to the data."""
    plt = new_figure()
    fig, axes = plt.subplots(1, 2, figsize=(MAX_WIDTH_IN, 4))
    lo, hi = correlation_range(*real.values(), *base.values())
    bins = np.linspace(lo, hi, 31)
    for ax, name in zip(axes, ("spearman", "pearson")):
        r, b = real[name].reshape(-1), base[name].reshape(-1)
        r, b = r[np.isfinite(r)], b[np.isfinite(b)]
        ax.hist(r, bins=bins, alpha=0.6, label=f"own decode (mean {r.mean():.2f})" if len(r) else "own decode", color="C0")
        ax.hist(b, bins=bins, alpha=0.6, label=f"another request's decode (mean {b.mean():.2f})" if len(b) else "shuffled",
                color="C1")
        for x, c in ((r, "C0"), (b, "C1")):
            if len(x):
                ax.axvline(float(x.mean()), color=c, ls="--", lw=1.2)
        ax.set_xlim(lo, hi)
        ax.yaxis.get_major_locator().set_params(integer=True)  # counts
        ax.set_xlabel(f"{name.capitalize()} correlation,\nprefill vs decode expert histogram")
        ax.set_ylabel("(request, layer) pairs")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("Prefill-decode correlation per request and layer vs a shuffled baseline (dashed: means)")
    return fig


def fig_correlation(real: dict[str, np.ndarray], base: dict[str, np.ndarray]) -> bytes:
    return png_bytes(draw_correlation(real, base))


def cluster_order(pairs: np.ndarray) -> np.ndarray:
    """(N, N) symmetric pair counts -> (N,) an order that puts experts chosen together next to each other: average
    linkage on the correlation of their co-activation profiles (rows)."""
    N = len(pairs)
    if N < 3:
        return np.arange(N)
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import pdist

    prof = pairs / np.maximum(pairs.sum(1, keepdims=True), 1)
    d = np.nan_to_num(pdist(prof, metric="correlation"), nan=1.0) if np.ptp(prof) > 0 else np.zeros(N * (N - 1) // 2)
    return leaves_list(linkage(np.clip(d, 0, None), method="average"))


def top_with_rest(counts: np.ndarray, rows: np.ndarray, cols: np.ndarray, mean: bool = False) -> np.ndarray:
    """counts: (E, F) -> (len(rows) + 1, len(cols) + 1): the chosen rows and columns in that order, then one row and
    one column that sum (``mean``: average) every other row / column."""
    agg = np.mean if mean else np.sum
    rest_r = np.setdiff1d(np.arange(counts.shape[0]), rows)
    rest_c = np.setdiff1d(np.arange(counts.shape[1]), cols)
    r = np.vstack([counts[rows].astype(np.float64), agg(counts[rest_r], axis=0, keepdims=True)])
    return np.hstack([r[:, cols], agg(r[:, rest_c], axis=1, keepdims=True)])


def _label_experts(ax, ids: list[str], axis: str) -> None:
    n = len(ids)
    fs = 7 if n <= 40 else 5
    if axis in ("x", "both"):
        ax.set_xticks(np.arange(n), ids, rotation=90, fontsize=fs)
    if axis in ("y", "both"):
        ax.set_yticks(np.arange(n), ids, fontsize=fs)


def draw_coactivation(pairs: np.ndarray | None, layer: int, trans: np.ndarray | None, next_layer: int | None):
    """pairs: (E, E) pair counts of ``layer`` (None for top-1 routing, where there are no pairs); trans: (E, E)
    transitions ``layer`` -> ``next_layer`` or None -> Figure with one panel for each that is given."""
    plt = new_figure()
    from matplotlib.colors import LogNorm

    panels = [p for p in (pairs, trans) if p is not None]
    wide = bool(panels) and panels[0].shape[0] > WIDE_EXPERTS
    pair_ids = row_ids = col_ids = None
    if wide and pairs is not None:  # the most co-chosen experts, clustered, and one "rest" row and column
        top = np.sort(np.argsort(-pairs.sum(1), kind="stable")[:TOP_PAIRS])
        top = top[cluster_order(pairs[np.ix_(top, top)])]
        total = pairs.sum()
        pairs = top_with_rest(pairs, top, top, mean=True)
        np.fill_diagonal(pairs[:-1, :-1], 0)
        pair_ids = [str(e) for e in top] + ["rest"]
    if wide and trans is not None:  # the busiest experts of each layer, in load order, and the rest
        r = np.argsort(-trans.sum(1), kind="stable")[:TOP_PAIRS]
        c = np.argsort(-trans.sum(0), kind="stable")[:TOP_PAIRS]
        trans = top_with_rest(trans, r, c)
        row_ids, col_ids = [str(e) for e in r] + ["rest"], [str(e) for e in c] + ["rest"]
    panels = [p for p in (pairs, trans) if p is not None]
    if not panels:
        return placeholder_figure(f"Co-activation, layer {layer}", f"{TOP1_NOTE}; layer {layer} is the last MoE layer")
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(MAX_WIDTH_IN if len(panels) > 1 else 6, 5.0),
                             squeeze=False, layout="constrained")
    col = 0
    if pairs is not None:
        ax = axes[0, col]
        col += 1
        share = pairs / max((total if pair_ids else pairs.sum()) / 2, 1)
        pos = share[share > 0]
        # log scale on a sequential map with neither end white or grey; a pair no token chose is grey, so zero
        # never looks like the maximum (nor like the minimum)
        cmap = plt.get_cmap("viridis").with_extremes(bad=NO_DATA_GREY)
        im = ax.imshow(np.ma.masked_less_equal(share, 0), cmap=cmap, interpolation="nearest",
                       norm=LogNorm(vmin=pos.min(), vmax=max(pos.max(), pos.min() * 1.01)) if pos.size else None)
        ax.set_title(f"Co-activation in layer {layer}: share of expert pairs\n"
                     "(grey: no token chose the pair, as on the diagonal)", fontsize=9)
        if pair_ids:
            _label_experts(ax, pair_ids, "both")
            ax.set_xlabel(f"expert id (the {TOP_PAIRS} most co-chosen, clustered; rest: mean of the other experts)",
                          fontsize=8)
        else:
            ax.set_xlabel("expert")
        ax.set_ylabel("expert")
        fig.colorbar(im, ax=ax, label="tokens choosing both / all pairs (log)", shrink=0.85)
    if trans is not None:
        ax = axes[0, col]
        with np.errstate(invalid="ignore", divide="ignore"):
            cond = trans / trans.sum(1, keepdims=True)
            lift = cond / (trans.sum(0) / max(trans.sum(), 1))[None, :]
        # grey: no token took the path (with few tokens most paths; white would read as "independent")
        lift = np.ma.masked_where(trans == 0, np.clip(lift, 0.1, 10))
        cmap = plt.get_cmap("RdBu_r").with_extremes(bad=NO_DATA_GREY)
        im2 = ax.imshow(lift, cmap=cmap, interpolation="nearest", norm=LogNorm(vmin=0.1, vmax=10))
        ax.set_title(f"Inter-layer affinity, same token, layer {layer} -> {next_layer}\n"
                     "(grey: no token took the path)", fontsize=9)
        ax.set_xlabel(f"expert at layer {next_layer}")
        ax.set_ylabel(f"expert at layer {layer}")
        if row_ids:
            _label_experts(ax, row_ids, "y")
            _label_experts(ax, col_ids, "x")
            ax.set_xlabel(f"expert at layer {next_layer} (the {TOP_PAIRS} busiest by load; rest summed)", fontsize=8)
        fig.colorbar(im2, ax=ax, label="P(next | expert) / P(next), log\n(1 = independent, clipped to 0.1..10)",
                     extend="both", shrink=0.85)
    return fig


def fig_coactivation(pairs: np.ndarray | None, layer: int, trans: np.ndarray | None, next_layer: int | None) -> bytes:
    return png_bytes(draw_coactivation(pairs, layer, trans, next_layer))


def draw_run_diff(c: dict, label_a: str, label_b: str):
    """The report's comparison figure from :func:`.diff.compare_loads`'s arrays ``c``: per MoE layer, how far B's
    expert shares are from A's (total variation) against the TV two bootstrap samples of the same runs show (mean
    and the flagging limit); and the max/mean load of A and B. Same expert count needed for the first panel."""
    plt = new_figure()
    layers = np.asarray(c["layers"])
    x = np.arange(len(layers))
    panels = 2 if c.get("tv") is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(min(MAX_WIDTH_IN, 5.2 * panels), 3.3), squeeze=False)
    axes = axes[0]
    step = max(1, len(layers) // 12)
    if panels == 2:
        ax = axes[0]
        shifted = np.asarray(c["layer_shifted"], bool)
        ax.bar(x, c["tv"], color=np.where(shifted, "#c0392b", "#7f8c8d"), width=0.8,
               label="B vs A (red: beyond noise)")
        ax.plot(x, c["tv_null"], "k:", lw=1.2, label="noise: two samples of the same runs")
        ax.plot(x, c["tv_limit"], "k--", lw=1, label="flagging limit")
        ax.set_ylabel("total variation of expert shares")
        ax.set_title(f"Load shift per layer: {int(shifted.sum())} of {len(layers)} beyond noise", fontsize=10)
        ax.legend(fontsize=7, loc="upper left")
    ax = axes[-1]
    ax.plot(x, c["max_mean_a"], "o-", ms=3, label=f"A: {label_a}")
    ax.plot(x, c["max_mean_b"], "s-", ms=3, label=f"B: {label_b}")
    ax.set_ylabel("max / mean expert load")
    ax.set_title("Imbalance per layer", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    for ax in axes:
        ax.set_xticks(x[::step], [str(v) for v in layers[::step]])
        ax.set_xlabel("MoE layer")
        top = max((np.nanmax(np.asarray(ln.get_ydata(), float)) for ln in ax.lines), default=0.0)
        top = max([top] + [p.get_height() for p in ax.patches])
        ax.set_ylim(0, (top if np.isfinite(top) and top > 0 else 1.0) * 1.45)  # headroom: the legend covers no data
    fig.tight_layout()
    return fig


def fig_run_diff(c: dict, label_a: str, label_b: str) -> bytes:
    return png_bytes(draw_run_diff(c, label_a, label_b))
