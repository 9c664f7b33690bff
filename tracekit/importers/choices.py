"""What no router emits, refused at import: one shared, vectorised check of every routes chunk an importer writes.

A top-k router picks ``k`` *distinct* experts per token and gives them finite, non-negative gate weights; a softmax
over the experts (or over the top-k) gives weights that sum to at most 1, and only a model that scales its routed
output (DeepSeek V3's ``routed_scaling_factor`` 2.5, DeepSeek V2's 16, LongCat-Flash's) sums higher, up to that
factor. :func:`check_choices` refuses (one line, the import writes nothing) duplicate ids within a token, negative
and non-finite weights, and weight sums above the model's factor when the factor is known (the geometry's
``routed_scaling_factor``, else :data:`KNOWN_SCALE`, else 1 for a softmax router); when it is not known, sums above
1 are kept and said in one warning line. :class:`~tracekit.importers.staging.StagedRun` runs it on every routes
chunk, so every importer (JSONL, SGLang, the routed-experts responses) goes through it.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pyarrow as pa

from ..errors import TracekitError

#: routed-weight scale of registry models: the softmax/sigmoid top-k families sum to at most 1, DeepSeek V3/R1
#: multiply by routed_scaling_factor 2.5 (their config.json)
KNOWN_SCALE = {"deepseek-v3": 2.5, "deepseek-r1": 2.5, "mixtral-8x7b": 1.0, "qwen3-235b-a22b": 1.0,
               "qwen3-30b-a3b": 1.0, "qwen3.5-35b-a3b": 1.0, "gpt-oss-120b": 1.0, "llama4-maverick": 1.0,
               "llama4-scout": 1.0}
#: relative slack on a weight sum: float16 weights round each of k values by up to 2**-11
SUM_TOLERANCE = 0.02


def weight_scale(model: str | None, geometry: dict[str, Any]) -> float | None:
    """The most a token's routed weights may sum to for this model, or None when it is not known."""
    factor = geometry.get("routed_scaling_factor")
    if isinstance(factor, (int, float)) and not isinstance(factor, bool) and factor > 0:
        return float(factor)
    if model in KNOWN_SCALE:
        return KNOWN_SCALE[model]
    if geometry.get("scoring") == "softmax":
        return 1.0
    return None


def _lists(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A list column -> (row of each value (V,), values (V,), null rows mask (N,))."""
    from ..summaries import offsets_and_values

    if isinstance(col, pa.Array):
        col = pa.chunked_array([col])
    offsets, values = offsets_and_values(col)
    offsets = np.asarray(offsets, dtype=np.int64)
    offsets = offsets - offsets[0]
    values = np.asarray(values)[: offsets[-1]] if offsets.size else np.asarray(values)[:0]
    row = np.repeat(np.arange(len(offsets) - 1, dtype=np.int64), np.diff(offsets))
    nulls = np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    return row, values, nulls


def first_bad(mask: np.ndarray) -> int | None:
    idx = np.flatnonzero(mask)
    return int(idx[0]) if idx.size else None


def check_choices(experts: pa.ChunkedArray, weights: pa.ChunkedArray | None, *, describe: Callable[[int], str],
                  scale: float | None, warn: Callable[[str], None] | None = None) -> None:
    """Refuse a chunk's choices that no router emits (see the module docstring).

    ``experts``, ``weights``: list columns of N rows (``weights`` None or all-null when not recorded);
    ``describe(i)``: where row ``i`` came from, for the one-line error; ``scale``: the most a row's weights may sum
    to (:func:`weight_scale`), None when unknown (then ``warn`` hears one line about sums above 1).
    """
    row, ids, _ = _lists(experts)
    if ids.size:
        order = np.lexsort((ids, row))  # by row, then id: a repeated id within a row becomes two neighbours
        r, v = row[order], ids[order]
        dup = first_bad((r[1:] == r[:-1]) & (v[1:] == v[:-1]))
        if dup is not None:
            raise TracekitError(f"{describe(int(r[dup]))}: expert {int(v[dup])} is chosen twice in one token; a top-k "
                                "router picks k distinct experts (is the dump's layout right?)")
    if weights is None or weights.null_count == len(weights):
        return
    wrow, w, nulls = _lists(weights)
    w = w.astype(np.float64, copy=False)
    bad = first_bad(~np.isfinite(w))
    if bad is not None:
        raise TracekitError(f"{describe(int(wrow[bad]))}: gate weight {w[bad]} is not a finite number")
    bad = first_bad(w < 0)
    if bad is not None:
        raise TracekitError(f"{describe(int(wrow[bad]))}: gate weight {w[bad]:.6g} is negative; a router's gate "
                            "weights are softmax or sigmoid outputs (>= 0)")
    sums = np.bincount(wrow, weights=w, minlength=len(nulls))
    limit = (scale if scale is not None else 1.0) * (1 + SUM_TOLERANCE)
    over = first_bad(sums > limit)
    if over is None:
        return
    n = int(np.count_nonzero(sums > limit))
    what = f"{describe(over)}: gate weights sum to {sums[over]:.4g}"
    if scale is not None:
        raise TracekitError(f"{what}, above the {scale:g} this model's router can give ({n:,} token-layers do); "
                            "are the weights scaled or summed twice?")
    if warn is not None:
        warn(f"{what} ({n:,} token-layers above 1, largest {sums.max():.4g}): a softmax top-k sums to at most 1 "
             "unless the model scales its routed weights (DeepSeek's routed_scaling_factor); kept, as this model's "
             "factor is unknown")


def check_routes_table(table: pa.Table, *, scale: float | None, warn: Callable[[str], None] | None = None) -> None:
    """:func:`check_choices` on a routes chunk built with :func:`tracekit.schema.build_routes_table`; rows are named
    by their request, prompt id, position and layer."""

    def describe(i: int) -> str:
        pid = table["prompt_id"][i].as_py() if "prompt_id" in table.column_names else None
        return (f"request {table['request_id'][i].as_py()}" + (f" (prompt {pid!r})" if pid is not None else "")
                + f", position {table['position'][i].as_py()}, layer {table['layer'][i].as_py()}")

    weights = table["weights"] if "weights" in table.column_names else None
    check_choices(table["experts"], weights, describe=describe, scale=scale, warn=warn)
