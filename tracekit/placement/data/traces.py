"""Read run directories into :class:`~tracekit.placement.data.types.TraceArrays`, and split them for held-out scoring.

Placement consumes columnar numpy arrays, not rows: this module is the one place where the placement code
touches Parquet. It queries the run files with DuckDB (``read_parquet`` over ``open_run(path).files[kind]``) and
turns the ``experts`` list column into an (N, k) array by flattening the Arrow list (no Python loop per row).

Several runs load into one ``TraceArrays``: requests are renumbered 0..R_n-1 (run by run, in request-id order)
and ``request_key`` keeps "run_id:request_id". All runs must share the expert count and top-k.

Zero-computation experts (the manifest geometry's ``zero_computation_experts``, always the top ids) are not
placed: ``TraceArrays.num_experts`` counts the real experts, every zero-computation choice becomes the sentinel id
``num_experts`` (see :class:`~tracekit.placement.data.types.TraceArrays`), and their counts in a loads run are dropped.

Runs of kind ``loads`` (engines that dump only aggregated counts) carry no token rows: they fill
``TraceArrays.loads`` (M, E), enough for the load-only strategies (linear, round-robin, eplb) but not for
locality, grouping or the communication model.

Splits return boolean row masks (N,), so every array keeps one indexing:

- :func:`split_requests` holds out whole requests (stratified by domain, seeded): the optimizer never sees them.
- :func:`split_tokens` fits on the prefill and the first ``frac`` of each request's decode tokens and scores
  the rest of the decode tokens (the protocol of the issue's quoted Mixtral measurement).
"""
from __future__ import annotations

import os
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ...errors import TracekitError
from ...query import sql_text
from ...store import open_run
from .types import TraceArrays

PHASE_FILTERS = ("all", "decode", "prefill")

# all of this module's queries live in tracekit/sql/placement_*.sql
_SQL_ROUTES = sql_text("placement_routes")
_SQL_REQUESTS = sql_text("placement_requests")
_SQL_LAYERS = sql_text("placement_layers")
_SQL_TOPK = sql_text("placement_topk")
_SQL_LOADS = sql_text("placement_loads")
_SQL_MAX_EXPERT = sql_text("placement_max_expert")
_SQL_ENCODER_ROWS = sql_text("placement_encoder_rows")


def _phase_where(phase: str, kind: str) -> str:
    """The rows placement reads: prefill and decode (an encoder-decoder's encoder rows carry the same layer numbers
    as its decoder's layers but route to other experts, so they are left out: placement covers the decoder)."""
    if phase not in PHASE_FILTERS:
        raise TracekitError(f"unknown phase {phase!r}; use one of {', '.join(PHASE_FILTERS)}")
    if phase == "all":
        return "WHERE phase <> 'encoder'" if kind == "routes" else ""
    return f"WHERE phase = '{phase}'"  # validated literal, not user text


def _connect():
    import duckdb

    con = duckdb.connect()
    threads = os.environ.get("TRACEKIT_THREADS")
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    return con


def _files(run, kind: str) -> list[str]:
    files = [str(p) for p in run.files.get(kind, [])]
    if not files:
        raise TracekitError(f"{run.path}: no finished {kind} files; collect or import into it first")
    return files


def load_traces(runs: Iterable[str | os.PathLike], phase: str = "all", max_rows: int | None = None,
                seed: int = 0) -> TraceArrays:
    """Load one or more run directories into columnar arrays.

    ``phase``: ``all`` (default), ``decode`` or ``prefill`` filters rows at read time. Signature grouping wants the
    prefill even when scoring decode, so prefer ``all`` and mask later (``traces.phase == 1``).
    ``max_rows``: when the runs hold more token-layer rows, read a seeded uniform random sample of whole requests
    (over all runs) that fits, and say so in ``TraceArrays.sample``: memory is bounded by ``max_rows``, not by the
    runs' size. Rows are read file by file into preallocated arrays (no whole-run Arrow table).
    Returns TraceArrays with N token-layer rows; ``loads`` (M, E) is set when any run is of kind ``loads``.
    """
    if max_rows is not None and max_rows < 1:
        raise TracekitError(f"--max-rows {max_rows}: give at least 1 row")
    runs = [open_run(p) for p in runs]
    if not runs:
        raise TracekitError("no run directories given")
    where = _phase_where(phase, "routes")
    num_experts, zero_ids, layers, geometry = _runs_geometry(runs)
    con = _connect()
    try:
        parts, loads_parts, top_k, num_experts = _scan_runs(con, runs, layers, num_experts)
        # zero-computation experts are the top ids (checked in _zero_experts): they all become the sentinel id
        # `real` (= TraceArrays.num_experts), so ids stay fixed-shape and a consumer masks with one comparison
        real = num_experts - len(zero_ids or [])
        layer_arr = np.array(sorted(layers), dtype=np.int64)
        if layer_arr.size == 0:
            raise TracekitError("the runs hold no MoE layers; nothing to place")
        lut_layer = np.full(int(layer_arr.max()) + 1, -1, dtype=np.int32)
        lut_layer[layer_arr] = np.arange(len(layer_arr), dtype=np.int32)
        top = real + 1 if zero_ids else real  # ids 0..top-1, the sentinel included
        e_dtype = np.uint8 if top <= 256 else (np.uint16 if top <= 65536 else np.uint32)
        rows = _read_rows(con, parts, where, max_rows, seed, top_k, lut_layer, layer_arr, real, zero_ids, e_dtype)
        loads, zero_loads = _read_loads(con, loads_parts, phase, lut_layer, layer_arr, real)
    finally:
        con.close()
    return TraceArrays(
        layers=layer_arr,
        num_experts=int(real),
        request=rows["request"],
        layer_pos=rows["layer_pos"],
        experts=rows["experts"],
        phase=rows["phase"],
        token=rows["token"],
        request_domain=rows["request_domain"],
        loads=loads,
        geometry=geometry,
        request_key=rows["request_key"],
        zero_choices=rows["zero_choices"] + zero_loads,
        sample=rows["sample"],
        encoder_rows=rows["encoder_rows"],
    )


def _runs_geometry(runs) -> tuple[int | None, list[int] | None, set[int], dict]:
    """(num_experts, zero-computation ids, MoE layers, geometry) the runs' manifests agree on (one line when not)."""
    num_experts = None
    zero_ids: list[int] | None = None
    layers: set[int] = set()
    geometry: dict = {}
    for run in runs:
        g = run.geometry or {}
        e = g.get("num_experts")
        if e is not None:
            if num_experts is not None and int(e) != num_experts:
                raise TracekitError(
                    f"{run.path}: {e} experts but an earlier run has {num_experts}; place runs of one model at a time"
                )
            num_experts = int(e)
        zero = _zero_experts(run, g)
        if zero_ids is not None and zero != zero_ids:
            raise TracekitError(f"{run.path}: zero-computation experts {zero} but an earlier run has {zero_ids}; "
                                "place runs of one model at a time")
        zero_ids = zero
        if g.get("moe_layers"):
            layers.update(int(x) for x in g["moe_layers"])
        geometry = geometry or dict(g)

    return num_experts, zero_ids, layers, geometry


def _scan_runs(con, runs, layers: set[int], num_experts: int | None):
    """(routes parts [(run, files)], loads parts, top-k, num_experts) from the files' own statistics; ``layers``
    gains the layers of runs whose manifest names none. One line for mixed top-k or ids beyond the geometry."""
    parts = []
    loads_parts = []
    top_k = None
    max_expert = -1
    for run in runs:
        if run.kind == "loads":
            loads_parts.append((run, _files(run, "loads")))
            continue
        files = _files(run, "routes")
        lo, hi, emax = con.sql(_SQL_TOPK, params={"files": files}).fetchall()[0]
        if lo is None:
            continue
        if lo != hi or (top_k is not None and lo != top_k):
            raise TracekitError(f"{run.path}: rows with different numbers of experts ({lo}..{hi}); expected one top-k")
        top_k = int(lo)
        max_expert = max(max_expert, int(emax))
        if not (run.geometry or {}).get("moe_layers"):
            layers.update(int(r[0]) for r in con.sql(_SQL_LAYERS, params={"files": files}).fetchall())
        parts.append((run, files))
    for run, files in loads_parts:
        if not (run.geometry or {}).get("moe_layers"):
            layers.update(int(r[0]) for r in con.sql(_SQL_LAYERS, params={"files": files}).fetchall())
        emax = con.sql(_SQL_MAX_EXPERT, params={"files": files}).fetchall()[0][0]
        max_expert = max(max_expert, int(emax if emax is not None else -1))
    if num_experts is None:
        if max_expert < 0:
            raise TracekitError("the runs hold no routing rows; nothing to place")
        num_experts = max_expert + 1
    if max_expert >= num_experts:
        raise TracekitError(f"expert id {max_expert} out of range for {num_experts} experts; check the manifest geometry")
    return parts, loads_parts, top_k, num_experts


def _read_rows(con, parts, where: str, max_rows, seed: int, top_k, lut_layer, layer_arr, real: int, zero_ids,
               e_dtype) -> dict:
    """Every token-layer row of the routes ``parts`` (or the seeded sample of whole requests that fits
    ``max_rows``), read file by file into preallocated arrays; the TraceArrays fields by name."""
    zero_choices = 0
    # requests of every run (and their rows), then the sample of whole requests that fits max_rows
    reqs = []
    encoder_rows = 0
    for run, files in parts:
        req = con.sql(_SQL_REQUESTS.format(where=where), params={"files": files}).to_arrow_table()
        reqs.append(req)
        encoder_rows += int(con.sql(_SQL_ENCODER_ROWS, params={"files": files}).fetchall()[0][0] or 0)
    rows_of = [r.column("rows").to_numpy().astype(np.int64) for r in reqs]
    total_rows = int(sum(r.sum() for r in rows_of))
    keep = [np.ones(len(r), dtype=bool) for r in rows_of]
    sample = None
    if max_rows is not None and total_rows > max_rows:
        keep, sample = _sample_requests(rows_of, max_rows, seed)
        sample.update(of_rows=total_rows, max_rows=int(max_rows), seed=int(seed))
    n_rows = int(sum(r[k].sum() for r, k in zip(rows_of, keep)))
    request = np.empty(n_rows, dtype=np.int32)
    layer_pos = np.empty(n_rows, dtype=np.int16)
    experts = np.empty((n_rows, top_k or 0), dtype=e_dtype)
    phase_col = np.empty(n_rows, dtype=np.int8)
    token = np.empty(n_rows, dtype=np.int32)
    domains: list[np.ndarray] = []
    keys: list[np.ndarray] = []
    offset = 0
    at = 0
    for (run, files), req, kept in zip(parts, reqs, keep):
        rid = req.column("request_id").to_numpy().astype(np.int64)[kept]
        if rid.size == 0:
            continue
        every = req.column("request_id").to_numpy().astype(np.int64)
        lut_req = np.full(int(every.max()) + 1, -1, dtype=np.int64)
        lut_req[rid] = np.arange(rid.size) + offset  # -1: a request the sample leaves out
        reader = con.sql(_SQL_ROUTES.format(where=where), params={"files": files}).to_arrow_reader(1 << 20)
        for tab in reader:
            if sample is not None:  # keep the sampled requests' rows (in file order, whatever the threads do)
                tab = tab.filter(pa.array(lut_req[tab.column("request_id").to_numpy()] >= 0))
            n = tab.num_rows
            if n == 0:
                continue
            if at + n > n_rows:
                raise TracekitError(f"{run.path}: the routes changed while they were read; run place again")
            layer = tab.column("layer").to_numpy()
            if layer.max() >= len(lut_layer) or (lut_layer[layer] < 0).any():
                bad = sorted(set(np.unique(layer).tolist()) - set(layer_arr.tolist()))
                raise TracekitError(f"{run.path}: layers {bad[:5]} are not in the manifest's moe_layers; fix the geometry")
            flat = pc.list_flatten(tab.column("experts")).to_numpy(zero_copy_only=False)
            if zero_ids:
                is_zero = flat >= real
                zero_choices += int(np.count_nonzero(is_zero))
                flat = np.where(is_zero, real, flat)
            experts[at:at + n] = flat.reshape(-1, top_k)
            request[at:at + n] = lut_req[tab.column("request_id").to_numpy()]
            layer_pos[at:at + n] = lut_layer[layer]
            phase_col[at:at + n] = tab.column("phase").to_numpy()
            token[at:at + n] = tab.column("position").to_numpy()
            at += n
        domains.append(np.array(req.column("domain").to_pylist(), dtype=object)[kept])
        keys.append(np.array([f"{run.run_id}:{r}" for r in rid], dtype=object))
        offset += rid.size
    if at != n_rows:
        raise TracekitError(f"the routes changed while they were read ({at:,} rows, {n_rows:,} counted); run place again")

    return {"request": request, "layer_pos": layer_pos, "experts": experts, "phase": phase_col, "token": token,
            "request_domain": np.concatenate(domains) if domains else np.zeros(0, dtype=object),
            "request_key": np.concatenate(keys) if keys else np.zeros(0, dtype=object),
            "zero_choices": zero_choices, "sample": sample, "encoder_rows": encoder_rows}


def _read_loads(con, loads_parts, phase: str, lut_layer, layer_arr, real: int) -> tuple[np.ndarray | None, int]:
    """((M, E) counts of the loads-kind runs or None, zero-computation choices among them)."""
    zero_choices = 0
    loads = None
    if loads_parts:
        loads = np.zeros((len(layer_arr), real), dtype=np.int64)
        for run, files in loads_parts:
            t = con.sql(_SQL_LOADS.format(where=_phase_where(phase, "loads")), params={"files": files}).to_arrow_table()
            lp = lut_layer[t.column("layer").to_numpy()]
            expert, count = t.column("expert").to_numpy(), t.column("count").to_numpy()
            keep = expert < real  # counts of zero-computation experts are not placed
            zero_choices += int(count[~keep].sum())
            np.add.at(loads, (lp[keep], expert[keep]), count[keep])
    return loads, zero_choices


def _sample_requests(rows_of: list[np.ndarray], max_rows: int, seed: int) -> tuple[list[np.ndarray], dict]:
    """A uniform random sample of whole requests over all runs (``rows_of``: each run's rows per request) holding
    at most ``max_rows`` rows: requests in a seeded random order, each taken while it fits (at least one). Returns
    the kept masks per run and {"requests", "of_requests", "rows"}."""
    sizes = np.concatenate(rows_of) if rows_of else np.zeros(0, dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(sizes))
    fits = np.cumsum(sizes[order]) <= max_rows
    fits[0] = True
    chosen = np.zeros(len(sizes), dtype=bool)
    chosen[order[fits]] = True
    bounds = np.cumsum([0] + [len(r) for r in rows_of])
    keep = [chosen[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    return keep, {"requests": int(chosen.sum()), "of_requests": int(len(sizes)), "rows": int(sizes[chosen].sum())}


def _zero_experts(run, geometry: dict) -> list[int]:
    """The run's zero-computation expert ids (manifest geometry), checked to be the top ids: placement renumbers
    nothing, so the real experts must be 0..E-1 and the zero-computation ones E..E+Z-1 (every family so far)."""
    zero = sorted(int(x) for x in geometry.get("zero_computation_experts") or [])
    if not zero:
        return []
    total = geometry.get("num_experts")
    if total is None or zero != list(range(int(total) - len(zero), int(total))):
        raise TracekitError(
            f"{run.path}: zero-computation experts {zero[:5]} are not the top ids of {total} experts; placement "
            "needs the real experts numbered first (fix the manifest geometry)")
    return zero


def describe_zero(traces: TraceArrays) -> str | None:
    """One line for ``place`` when the runs hold zero-computation choices (None otherwise)."""
    if not traces.zero_choices:
        return None
    ids = (traces.geometry or {}).get("zero_computation_experts") or []
    which = f"ids {ids[0]}..{ids[-1]}" if len(ids) > 1 else f"id {ids[0]}" if ids else "ids"
    return (f"ignored {traces.zero_choices:,} zero-computation expert choices ({which}, computed in place): "
            f"placing the {traces.num_experts} real experts; they send no traffic and load no GPU")


def describe_input(traces: TraceArrays) -> str:
    """One line for ``place``'s output: what was read into memory and where the fitting samples tokens."""
    from ..strategies.locality import SAMPLE_TOKENS

    arrays = (traces.request, traces.layer_pos, traces.experts, traces.phase, traces.token)
    nbytes = sum(a.nbytes for a in arrays)
    s = traces.sample
    read = (f"a random sample of {s['requests']:,} of {s['of_requests']:,} requests ({s['rows']:,} of "
            f"{s['of_rows']:,} token-layer rows; --max-rows {s['max_rows']:,}, seed {s['seed']})" if s else
            f"{len(traces):,} token-layer rows of {len(traces.request_key):,} requests")
    enc = (f"; {traces.encoder_rows:,} encoder rows not placed (an encoder-decoder's encoder routes to experts of "
           "its own: placement covers the decoder's MoE layers)" if traces.encoder_rows else "")
    return (f"input: {read} read into memory ({nbytes / 1e6:,.0f} MB; loads count every row read){enc}; locality "
            f"partitions a sample of {SAMPLE_TOKENS:,} token-layers per layer (tracekit/placement/strategies/locality.py); "
            "scoring replays every held-out row")


def subset(traces: TraceArrays, mask: np.ndarray) -> TraceArrays:
    """The rows selected by ``mask`` (N,) bool; requests keep their indices (R_n unchanged), loads are dropped."""
    mask = np.asarray(mask, dtype=bool)
    experts = traces.experts[mask]
    return TraceArrays(
        layers=traces.layers,
        num_experts=traces.num_experts,
        request=traces.request[mask],
        layer_pos=traces.layer_pos[mask],
        experts=experts,
        phase=traces.phase[mask],
        token=traces.token[mask],
        request_domain=traces.request_domain,
        loads=None,
        geometry=traces.geometry,
        request_key=traces.request_key,
        zero_choices=int(np.count_nonzero(experts == traces.num_experts)) if traces.zero_choices else 0,
    )


def _require_rows(traces: TraceArrays, what: str) -> None:
    if len(traces) == 0:
        raise TracekitError(f"{what} needs per-token routes; a loads-only run has none (use a routes run)")


def split_requests(traces: TraceArrays, holdout: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Hold out whole requests: returns (train_mask, test_mask), (N,) bool each, disjoint.

    Within each domain, ``round(holdout * n_domain)`` requests (seeded shuffle) go to test, so every task family
    appears on both sides when it has enough requests; at least one request ends on each side overall.
    """
    _require_rows(traces, "a request split")
    if not 0.0 < holdout < 1.0:
        raise TracekitError(f"--holdout must be between 0 and 1 (exclusive), got {holdout}")
    present = np.zeros(traces.num_requests, dtype=bool)
    present[traces.request] = True
    reqs = np.flatnonzero(present)
    if reqs.size < 2:
        raise TracekitError("a request split needs at least 2 requests; use --split tokens for a single request")
    rng = np.random.default_rng(seed)
    test_req = np.zeros(traces.num_requests, dtype=bool)
    dom = traces.request_domain[reqs].astype(str)
    for d in sorted(set(dom.tolist())):
        members = reqs[dom == d]
        members = members[rng.permutation(members.size)]
        test_req[members[: int(round(holdout * members.size))]] = True
    n_test = int(test_req[reqs].sum())
    if n_test == 0:
        test_req[reqs[rng.integers(reqs.size)]] = True
    elif n_test == reqs.size:
        test_req[reqs[rng.integers(reqs.size)]] = False
    test = test_req[traces.request]
    return ~test, test


def split_tokens(traces: TraceArrays, frac: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Split inside each request: (train_mask, test_mask), (N,) bool each.

    Train: the prefill rows and each request's decode tokens with position < first + frac * (decode span);
    test: the remaining decode tokens. The optimizer sees the beginning of every request and is scored on its end.
    """
    _require_rows(traces, "a token split")
    if not 0.0 < frac < 1.0:
        raise TracekitError(f"token split fraction must be between 0 and 1, got {frac}")
    dec = traces.phase == 1
    if not dec.any():
        raise TracekitError("a token split needs decode tokens; the traces hold prefill only")
    r = traces.request[dec]
    t = traces.token[dec].astype(np.int64)
    lo = np.full(traces.num_requests, np.iinfo(np.int64).max)
    hi = np.full(traces.num_requests, -1, dtype=np.int64)
    np.minimum.at(lo, r, t)
    np.maximum.at(hi, r, t)
    cut = lo + np.ceil(frac * (hi - lo + 1))
    test = np.zeros(len(traces), dtype=bool)
    test[dec] = t >= cut[r]
    return ~test, test


def request_masks(traces: TraceArrays, row_mask: np.ndarray) -> np.ndarray:
    """(R_n,) bool: requests that have at least one row in ``row_mask``."""
    out = np.zeros(traces.num_requests, dtype=bool)
    out[traces.request[np.asarray(row_mask, dtype=bool)]] = True
    return out


def make_split(traces: TraceArrays, how: str = "request", holdout: float = 0.3, seed: int = 0, frac: float = 0.5):
    """(train_mask, test_mask) for ``how`` = request | tokens."""
    if how == "request":
        return split_requests(traces, holdout=holdout, seed=seed)
    if how == "tokens":
        return split_tokens(traces, frac=frac)
    raise TracekitError(f"unknown split {how!r}; use request or tokens")
