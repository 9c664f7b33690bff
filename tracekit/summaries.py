"""Per-chunk summary tables: small aggregates written next to every ``routes`` chunk.

Layout (one summary file per chunk, with the chunk's own file name)::

    RUN/summaries/loads/part-r000-c000000.parquet     assignments per phase, layer and expert (summary_loads.sql)
    RUN/summaries/requests/part-r000-c000000.parquet  one row per request of the chunk (summary_requests.sql)
    RUN/summaries/loads.parquet                       the chunks' load summaries summed (written when the run is
                                                      finalised): one row per key for the whole run

The per-chunk load summaries repeat every (phase, layer, expert) key once per chunk (2.9M rows for a 24-chunk
DeepSeek-width run), which made the load query take seconds; the run-level file holds each key once (119K rows).
It names the chunks it sums, with their sizes, and is used only while those are exactly the chunks read.

:func:`tracekit.store.write_chunk` writes them (atomically, *before* the chunk itself) for every routes chunk, so
the collector and every importer produce them. The ``loads`` and ``requests`` views read them when every chunk of
every routes run has both (a few kilobytes per chunk instead of every token-layer); otherwise the views derive
the same rows from the routes themselves (runs written before summaries existed). A summary whose chunk is
missing (a writer killed between the two renames) is ignored; the re-written chunk re-writes it.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SUMMARY_DIR = "summaries"
TABLES = ("loads", "requests")
REQUEST_COLUMNS = ("run_id", "model", "dataset", "domain", "request_id", "prompt_id", "phase", "position", "step")


def summary_path(run_dir: str | Path, table: str, chunk_name: str) -> Path:
    return Path(run_dir) / SUMMARY_DIR / table / chunk_name


def summarize_table(table: pa.Table) -> dict[str, pa.Table]:
    """The summaries of one routes chunk held in memory: {"loads": ..., "requests": ...}."""
    return {"loads": load_summary(table), "requests": request_summary(table)}


def _codes(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, pa.Array]:
    """(N,) integer codes and the distinct values of a string column (dictionary-encoded or not)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if not pa.types.is_dictionary(col.type):
        col = pc.dictionary_encode(col)
    return col.indices.to_numpy(zero_copy_only=False).astype(np.int64), col.dictionary.cast(pa.string())


def offsets_and_values(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """An Arrow list or fixed-size-list column -> (offsets (N + 1,), values) numpy arrays."""
    arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if pa.types.is_fixed_size_list(arr.type):
        k = arr.type.list_size
        values = arr.values.to_numpy(zero_copy_only=False)[arr.offset * k:(arr.offset + len(arr)) * k]
        return np.arange(len(arr) + 1, dtype=np.int64) * k, values
    if len(arr) == 0:
        return np.zeros(1, dtype=np.int32), np.zeros(0, dtype=np.uint8)
    return arr.offsets.to_numpy(), arr.values.to_numpy(zero_copy_only=False)


def _dense_unique(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.unique(x, return_inverse=True) for small non-negative integers, by counting instead of sorting."""
    if x.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    present = np.flatnonzero(np.bincount(x))
    lut = np.zeros(int(present[-1]) + 1, dtype=np.int64)
    lut[present] = np.arange(len(present))
    return present, lut[x]


def load_summary(table: pa.Table) -> pa.Table:
    """The rows of summary_loads.sql computed with numpy (one bincount; DuckDB's unnest and group-by took 20 s per
    million rows here): (token, expert) assignments per run, model, dataset, domain, phase, layer and expert."""
    n = table.num_rows
    keys = [_codes(table[c]) for c in ("run_id", "model", "dataset", "domain", "phase")]
    flat = np.zeros(n, dtype=np.int64)
    for codes, values in keys:  # one integer per (run, model, dataset, domain, phase) combination
        flat = flat * max(len(values), 1) + codes
    uniq, inverse = _dense_unique(flat)
    combo = np.zeros((len(uniq), len(keys)), dtype=np.int64)
    rest_key = uniq.copy()
    for i in range(len(keys) - 1, -1, -1):
        rest_key, combo[:, i] = np.divmod(rest_key, max(len(keys[i][1]), 1))
    layers, li = _dense_unique(table["layer"].to_numpy().astype(np.int64))
    from .analysis.kernels import count_choices

    experts = table["experts"] if n else pa.chunked_array([pa.array([], pa.list_(pa.int32()))])
    offsets, vals = offsets_and_values(experts)
    E = int(vals.max()) + 1 if vals.size else 1
    row_cell = (inverse.reshape(-1).astype(np.int64) * len(layers) + li) * E
    counts = np.zeros(len(combo) * len(layers) * E, dtype=np.int64)
    count_choices(row_cell, offsets, vals, E, counts)
    cell = np.flatnonzero(counts)
    g, rest = np.divmod(cell, len(layers) * E)
    l, e = np.divmod(rest, E)
    cols = {name: keys[i][1].take(pa.array(combo[g, i])) for i, name in enumerate(("run_id", "model", "dataset",
                                                                                  "domain", "phase"))}
    window = np.where(pc.equal(cols["phase"], "prefill").to_numpy(zero_copy_only=False), 0, -1) if len(cell) else \
        np.zeros(0, dtype=np.int32)
    return pa.table({**cols, "window": pa.array(window, pa.int32()), "layer": pa.array(layers[l], pa.int16()),
                     "expert": pa.array(e, pa.int32()), "count": pa.array(counts[cell], pa.int64())})


RUN_LOADS = "loads.parquet"
META_CHUNKS = b"tracekit.summary_of"
LOAD_KEYS = ("run_id", "model", "dataset", "domain", "phase", "window", "layer", "expert")


def chunk_identity(chunks: list[Path]) -> dict[str, int]:
    """{chunk file name: size in bytes}: what a run-level summary was computed from."""
    return {Path(c).name: Path(c).stat().st_size for c in chunks}


def compact_loads(run_dir: str | Path, chunks: list[Path], recorded: bool = False) -> Path | None:
    """Sum the load summaries of ``chunks`` (a run's routes chunk files) into RUN/summaries/loads.parquet; None
    (nothing written) when a chunk lacks its summary. ``recorded``: the caller records the file's hash in the
    manifest (the file then says so, :data:`META_RECORDED`, so that a lost record is seen)."""
    from .atomic import atomic_write_bytes

    files = summary_files(run_dir, chunks)
    if files is None or not chunks:
        return None
    table = pa.concat_tables([pq.read_table(f) for f in files["loads"]], promote_options="permissive")
    summed = table.group_by(list(LOAD_KEYS)).aggregate([("count", "sum")]).rename_columns(
        [*LOAD_KEYS, "count"]).sort_by([(k, "ascending") for k in LOAD_KEYS])
    summed = summed.select([*LOAD_KEYS[:5], "window", "layer", "expert", "count"])
    import json

    meta = {META_CHUNKS: json.dumps(chunk_identity(chunks), sort_keys=True).encode()}
    if recorded:
        meta[META_RECORDED] = b"1"
    summed = summed.replace_schema_metadata(meta)
    buf = io.BytesIO()
    pq.write_table(summed, buf, compression="zstd")
    path = Path(run_dir) / SUMMARY_DIR / RUN_LOADS
    atomic_write_bytes(path, buf.getvalue())
    return path


def run_loads_file(run_dir: str | Path, chunks: list[Path]) -> Path | None:
    """RUN/summaries/loads.parquet when it sums exactly ``chunks`` as they are now, else None."""
    import json

    path = Path(run_dir) / SUMMARY_DIR / RUN_LOADS
    if not path.is_file():
        return None
    try:
        meta = pq.read_schema(path).metadata or {}
        return path if json.loads(meta.get(META_CHUNKS, b"null")) == chunk_identity(chunks) else None
    except (OSError, ValueError, pa.ArrowException):
        return None  # unreadable: the per-chunk summaries answer instead


def group_ids(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct keys (G,), group of each row (N,)) for non-negative int64 keys: by counting when their range is
    small, else by sorting."""
    if key.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    lo = int(key.min())
    if int(key.max()) - lo <= 8 * key.size + 1024:
        present, inverse = _dense_unique(key - lo)
        return present + lo, inverse
    return np.unique(key, return_inverse=True)


def _distinct_per_group(group: np.ndarray, values: np.ndarray, groups: int) -> np.ndarray:
    """(G,) how many distinct ``values`` (N,) (non-negative) each group of ``group`` (N,) holds."""
    if group.size == 0:
        return np.zeros(groups, dtype=np.int64)
    span = int(values.max()) + 1
    key = group * span + values
    if groups * span <= 64 * key.size + 4096:  # a byte per possible pair: mark, then count the marked per group
        seen = np.zeros(groups * span, dtype=bool)
        seen[key] = True
        return np.count_nonzero(seen.reshape(groups, span), axis=1)
    return np.bincount(np.unique(key) // span, minlength=groups)


def request_summary(table: pa.Table) -> pa.Table:
    """The rows of summary_requests.sql computed with numpy: one row per (run, request) of a chunk (DuckDB's
    start-up and group-by took 0.3-1 s of the writer's ~1.7 s per 3M-row chunk)."""
    n = table.num_rows
    run_codes, run_values = _codes(table["run_id"])
    req = table["request_id"].to_numpy().astype(np.int64)
    span = int(req.max()) + 1 if n else 1
    keys, g = group_ids(run_codes * span + req)
    G = len(keys)
    first = np.full(G, n, dtype=np.int64)
    np.minimum.at(first, g, np.arange(n, dtype=np.int64))
    phase_codes, phase_values = _codes(table["phase"])
    names = phase_values.to_pylist()
    is_pre = phase_codes == names.index("prefill") if "prefill" in names else np.zeros(n, dtype=bool)
    is_dec = phase_codes == names.index("decode") if "decode" in names else np.zeros(n, dtype=bool)

    def present(column: str, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        col = table[column]
        ok = mask & ~np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        return g[ok], col.fill_null(0).to_numpy().astype(np.int64)[ok]

    def any_value(column: str) -> pa.Array:
        return table[column].take(pa.array(first)).combine_chunks().cast(pa.string())

    return pa.table({
        "run_id": run_values.take(pa.array(run_codes[first])),
        "request_id": pa.array(req[first], pa.int32()),
        "prompt_id": any_value("prompt_id"),
        "model": any_value("model"), "dataset": any_value("dataset"), "domain": any_value("domain"),
        "prompt_tokens": pa.array(_distinct_per_group(*present("position", is_pre), G), pa.int64()),
        "generated_tokens": pa.array(_distinct_per_group(*present("step", is_dec), G), pa.int64()),
        "prefill_rows": pa.array(np.bincount(g[is_pre], minlength=G), pa.int64()),
        "decode_rows": pa.array(np.bincount(g[is_dec], minlength=G), pa.int64()),
        "rows": pa.array(np.bincount(g, minlength=G), pa.int64()),
    })


def encode_chunk_summaries(table: pa.Table) -> dict[str, bytes]:
    """The summaries of the routes chunk ``table`` as Parquet bytes, by table name (CPU only: it runs in a second
    thread while the chunk itself is encoded)."""
    out = {}
    for name, summary in summarize_table(table).items():
        buf = io.BytesIO()
        pq.write_table(summary, buf, compression="zstd")
        out[name] = buf.getvalue()
    return out


def write_encoded_summaries(run_dir: str | Path, chunk_name: str, encoded: dict[str, bytes]) -> list[Path]:
    """Write :func:`encode_chunk_summaries`' files for the chunk that will be stored as ``chunk_name``."""
    from .atomic import atomic_write_bytes

    out = []
    for name, data in encoded.items():
        path = summary_path(run_dir, name, chunk_name)
        atomic_write_bytes(path, data)
        out.append(path)
    return out


def write_chunk_summaries(run_dir: str | Path, table: pa.Table, chunk_name: str) -> list[Path]:
    """Compute and write the summaries of the routes chunk ``table`` that will be stored as ``chunk_name``."""
    return write_encoded_summaries(run_dir, chunk_name, encode_chunk_summaries(table))


def summary_files(run_dir: str | Path, chunks: list[Path]) -> dict[str, list[Path]] | None:
    """{table: summary files} for the routes ``chunks`` of a run, or None when any chunk lacks a summary."""
    files: dict[str, list[Path]] = {name: [] for name in TABLES}
    for chunk in chunks:
        for name in TABLES:
            p = summary_path(run_dir, name, Path(chunk).name)
            if not p.is_file():
                return None
            files[name].append(p)
    return files


# ---------------------------------------------------------------------------------------------------------------
# integrity of the summaries: they are what the ``loads`` and ``requests`` views serve, so they are hashed too
# ---------------------------------------------------------------------------------------------------------------
#: in a routes chunk's footer and in RUN/summaries/loads.parquet: the writer recorded the summaries' SHA-256 in the
#: manifest (a summary of such a chunk without a record lost it; older runs carry no flag and read as unverified)
META_RECORDED = b"tracekit.summaries_recorded"
RUN_LOADS_REL = f"{SUMMARY_DIR}/{RUN_LOADS}"


def bytes_record(data: bytes) -> dict[str, object]:
    """{"bytes", "sha256"} of a file's content (the manifest's record of one summary file)."""
    import hashlib

    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def chunk_summary_records(run_dir: str | Path, chunk_name: str) -> dict[str, dict] | None:
    """{table: record} of the summaries written for the chunk ``chunk_name``, None when one is absent (a chunk
    adopted on resume, written by a tracekit from before summaries)."""
    out = {}
    for name in TABLES:
        p = summary_path(run_dir, name, chunk_name)
        if not p.is_file():
            return None
        out[name] = bytes_record(p.read_bytes())
    return out


@dataclass
class SummaryCheck:
    """What :func:`check_summaries` found for one run.

    ``state``: verified (every summary read matches its record), unverified (written before tracekit recorded
    them), damaged (``problems``: one line each) or none (no summaries). ``per_chunk``: every routes chunk's two
    summaries are present and intact (the views may read them); ``run_loads``: RUN/summaries/loads.parquet may be
    read (intact, or from an older run). ``max_expert``: the largest expert id any intact load summary holds
    (its Parquet statistics; None when unknown)."""

    state: str = "none"
    problems: list[str] = field(default_factory=list)
    per_chunk: bool = False
    run_loads: bool = False
    max_expert: int | None = None


def column_max(md: pq.FileMetaData, name: str) -> int | None:
    """The largest value of column ``name`` by the row groups' statistics (None when a row group has none)."""
    try:
        idx = md.schema.to_arrow_schema().get_field_index(name)
    except (pa.ArrowException, ValueError):
        return None
    if idx < 0:
        return None
    best = None
    for g in range(md.num_row_groups):
        col = md.row_group(g).column(idx)
        if md.row_group(g).num_rows == 0:
            continue
        st = col.statistics
        if st is None or not st.has_min_max:
            return None
        best = int(st.max) if best is None else max(best, int(st.max))
    return best


def _note_max(check: SummaryCheck, data: bytes) -> None:
    try:
        m = column_max(pq.read_metadata(pa.BufferReader(data)), "expert")
    except (pa.ArrowException, OSError, ValueError):
        return
    if m is not None:
        check.max_expert = m if check.max_expert is None else max(check.max_expert, m)


def check_summaries(run_dir: str | Path, manifest: dict, chunks: list[tuple[str, bool]]) -> SummaryCheck:
    """Compare every summary of a run with the manifest's record (SHA-256 of each: they are small, a few KB per
    chunk, so this runs on every open, not only under ``--verify``).

    ``chunks``: (relative path, footer flag :data:`META_RECORDED`) of the intact routes chunks read. A chunk's
    record (``manifest["chunks"][rel]["summaries"]``) holds its two summaries' records; the run-level file's record
    is ``manifest["summaries"]["summaries/loads.parquet"]``. Never raises."""
    check = SummaryCheck()
    recorded = manifest.get("chunks") if isinstance(manifest.get("chunks"), dict) else {}
    verified = unverified = 0
    per_chunk = bool(chunks)
    any_flag = False
    for rel, flagged in chunks:
        any_flag |= flagged
        name = Path(rel).name
        rec = recorded.get(rel)
        srec = rec.get("summaries") if isinstance(rec, dict) else None
        for table in TABLES:
            p = summary_path(run_dir, table, name)
            shown = f"{SUMMARY_DIR}/{table}/{name}"
            want = srec.get(table) if isinstance(srec, dict) else None
            if not p.is_file():
                per_chunk = False
                if want is not None:
                    check.problems.append(f"summary {shown} is missing (recorded with {want.get('bytes')} bytes)")
                continue
            try:
                data = p.read_bytes()
            except OSError as exc:
                per_chunk = False
                check.problems.append(f"summary {shown} is unreadable ({exc.strerror})")
                continue
            if want is not None:
                if bytes_record(data) != {"bytes": want.get("bytes"), "sha256": want.get("sha256")}:
                    per_chunk = False
                    check.problems.append(f"summary {shown} is corrupt (sha256 differs from the record)")
                    continue
                verified += 1
            elif rec is not None and flagged:
                per_chunk = False
                check.problems.append(f"summary {shown} is unrecorded (the manifest lost its record, which the "
                                      "tracekit that wrote its chunk keeps)")
                continue
            else:
                unverified += 1  # an older run, or a chunk adopted on resume before its record was written
            if table == "loads":
                _note_max(check, data)
    check.per_chunk = per_chunk
    whole = Path(run_dir) / RUN_LOADS_REL
    runs_rec = manifest.get("summaries") if isinstance(manifest.get("summaries"), dict) else {}
    want = runs_rec.get(RUN_LOADS_REL)
    if whole.is_file():
        try:
            data = whole.read_bytes()
            flagged = META_RECORDED in (pq.read_schema(pa.BufferReader(data)).metadata or {})
        except (OSError, pa.ArrowException, ValueError):
            data, flagged = None, False
        if want is not None:
            if data is None or bytes_record(data) != {"bytes": want.get("bytes"), "sha256": want.get("sha256")}:
                check.problems.append(f"summary {RUN_LOADS_REL} is corrupt (sha256 differs from the record)")
            else:
                check.run_loads, verified = True, verified + 1
        elif flagged or (any_flag and manifest.get("status") == "complete"):
            # written by a tracekit that records it: in a finished run its record was removed; in an unfinished one a
            # kill came between the file and the record (it is re-written when the run finishes): not read either way
            if manifest.get("status") == "complete":
                check.problems.append(f"summary {RUN_LOADS_REL} is unrecorded (the manifest lost its record)")
        elif data is not None:
            check.run_loads, unverified = True, unverified + 1
    elif want is not None and chunks:
        check.problems.append(f"summary {RUN_LOADS_REL} is missing (recorded with {want.get('bytes')} bytes)")
    if check.problems:
        check.state = "damaged"
    elif unverified:
        check.state = "unverified"
    elif verified:
        check.state = "verified"
    return check
