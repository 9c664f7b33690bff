"""Run directories: Parquet layout, manifest, atomic writes and resume.

Layout of one run directory::

    RUN/
      manifest.json                       model, geometry, dataset, args, totals, schema version
      routes/part-r000-c000000.parquet    one file per finished chunk (rank r, chunk c) of the routes table
      loads/part-r000-c000000.parquet     aggregated-count runs (engine statistics) use this table instead

Every file is written under a temporary name and renamed when complete, so a file is either whole or absent.
Each chunk file carries in its Parquet key-value metadata the request ids it holds and their token counts;
resume and the manifest totals are computed from those footers, never from a side file that could disagree.
Files are created with mode 0666 minus the process umask, like any Unix tool.

Integrity. The manifest's ``chunks`` maps each chunk file (relative path) to ``{"rows", "bytes", "sha256"}``,
recorded when the chunk lands (one manifest update per chunk, under a ``flock`` on the run directory so that
data-parallel ranks do not lose each other's updates). Opening a run (:func:`open_run`, and through it every
query, analysis, report and placement) checks every chunk's size and its Parquet footer row count against the
record -- a ``stat`` and a footer read per chunk, no data pages -- and refuses a run with a missing, extra,
truncated or corrupt chunk in one line naming it, unless ``allow_partial`` (then the damaged chunks are skipped).
The full SHA-256 of every file is compared only on request (:func:`verify_run` with ``checksums=True``,
``tracekit info --verify``): it reads every byte. Runs written before the ``chunks`` record existed open as
``unverified``. A chunk that landed after the last manifest update of a run that is not complete (a kill between
the rename and the update) is accepted when its footer names the run, and adopted into the record on resume.
"""
from __future__ import annotations

import contextvars
import fcntl
import json
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_write_json, atomic_write_path, file_sha256
from .chunks import (MANIFEST, META_GENERATED_TOKENS, META_PROMPT_TOKENS, META_REQUESTS, META_RUN_ID,  # noqa: F401
                     ChunkInfo, chunk_files, list_chunks, part_name, read_manifest, read_readable_chunk)
from .errors import TracekitError
from .integrity import Integrity, check_geometry, verify_run  # noqa: F401  (verify_run: the store's API too)
from .manifest_check import check_manifest
from .schema import KINDS, SCHEMA_VERSION
from . import summaries
from .summaries import (META_RECORDED, RUN_LOADS_REL, bytes_record, check_summaries,
                        chunk_summary_records, encode_chunk_summaries, write_encoded_summaries)

ROW_GROUP_ROWS = 1 << 18  # DuckDB parallelises over row groups; ~256K rows keeps 2 cores busy without tiny groups


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


def write_chunk(
    run_dir: Path,
    table: pa.Table,
    *,
    kind: str = "routes",
    rank: int = 0,
    chunk: int,
    requests: Iterable[int] = (),
    prompt_tokens: int = 0,
    generated_tokens: int = 0,
    compression_level: int = 3,
) -> Path:
    """Write one chunk atomically (temporary name, fsync, rename). Returns the final path."""
    if kind not in KINDS:
        raise ValueError(kind)
    out = Path(run_dir) / kind / part_name(rank, chunk)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(table.schema.metadata or {})
    meta[META_REQUESTS] = json.dumps(sorted(int(r) for r in requests)).encode()
    meta[META_PROMPT_TOKENS] = str(int(prompt_tokens)).encode()
    meta[META_GENERATED_TOKENS] = str(int(generated_tokens)).encode()
    if "run_id" in table.schema.names and table.num_rows:
        col = table.column("run_id").chunk(0)
        run_id = col.dictionary[0].as_py() if pa.types.is_dictionary(col.type) else col[0].as_py()
        meta[META_RUN_ID] = str(run_id).encode()
    if kind == "routes":
        meta[META_RECORDED] = b"1"  # this chunk's record holds its summaries' hashes (a lost one is damage)
    table = table.replace_schema_metadata(meta)
    record: dict[str, Any] = {}
    with ThreadPoolExecutor(1, thread_name_prefix="tracekit-summaries") as helper:
        # small per-chunk aggregates for the loads/requests views (routes only): computed in a second thread while
        # the chunk is encoded, and written before the chunk's rename, so a chunk never lands without them
        summaries = helper.submit(encode_chunk_summaries, table) if kind == "routes" else None
        atomic_write_path(out, lambda tmp: _write_chunk_file(tmp, table, compression_level, record, run_dir,
                                                             out.name, summaries))
    if (Path(run_dir) / MANIFEST).exists():
        rel = f"{kind}/{out.name}"
        update_manifest(run_dir, lambda m: m.setdefault("chunks", {}).__setitem__(rel, record))
    return out


def _write_chunk_file(tmp: Path, table: pa.Table, compression_level: int, record: dict, run_dir: Path,
                      name: str, summaries) -> None:
    """Encode the chunk into ``tmp``, record its rows, bytes and sha256, then write its summaries (if any)."""
    pq.write_table(
        table,
        tmp,
        compression="zstd",
        compression_level=compression_level,
        row_group_size=ROW_GROUP_ROWS,
        use_dictionary=True,
        # min/max statistics let DuckDB skip row groups by layer or request; on list columns they only cost time
        write_statistics=[f.name for f in table.schema if not pa.types.is_list(f.type)],
    )
    # the bytes are still in the page cache: hashing them costs ~1 ms per MB (SHA-NI), not a second read
    record.update(rows=table.num_rows, bytes=tmp.stat().st_size, sha256=file_sha256(tmp))
    if summaries is not None:
        encoded = summaries.result()
        write_encoded_summaries(run_dir, name, encoded)
        record["summaries"] = {table: bytes_record(data) for table, data in encoded.items()}


def remove_stale_temporaries(run_dir: Path, rank: int | None = None) -> int:
    """Delete temporary files left by an interrupted writer; finished chunks are never touched.

    ``rank`` given: only that data-parallel rank's chunk temporaries (another rank may be writing its own).
    Leftover manifest temporaries are removed under the manifest lock, so no live update loses its file.
    """
    n = 0
    pattern = ".part-*.tmp" if rank is None else f".part-r{rank:03d}-*.tmp"
    from .summaries import SUMMARY_DIR, TABLES

    folders = [Path(run_dir) / kind for kind in KINDS] + [Path(run_dir) / SUMMARY_DIR / t for t in TABLES]
    for d in folders:  # chunk files and the per-chunk summaries written just before each chunk
        if d.is_dir():
            for p in d.glob(pattern):
                p.unlink(missing_ok=True)
                n += 1
    if rank is None and (Path(run_dir) / SUMMARY_DIR).is_dir():  # the run-level load summary (finalize)
        for p in (Path(run_dir) / SUMMARY_DIR).glob(".loads.parquet.*.tmp"):
            p.unlink(missing_ok=True)
            n += 1
    if Path(run_dir).is_dir():
        with manifest_lock(run_dir):
            for p in Path(run_dir).glob(f".{MANIFEST}.*.tmp"):
                p.unlink(missing_ok=True)
                n += 1
    return n


def only_leftovers(run_dir: Path) -> bool:
    """True when ``run_dir`` holds nothing but what a writer killed before its first manifest landed leaves:
    temporary files and empty table folders."""
    for p in Path(run_dir).iterdir():
        if p.is_file() and p.name.startswith(f".{MANIFEST}.") and p.name.endswith(".tmp"):
            continue
        if p.is_dir() and p.name in KINDS and all(q.name.startswith(".part-") and q.name.endswith(".tmp")
                                                  for q in p.iterdir()):
            continue
        return False
    return True


def remove_leftovers(run_dir: Path) -> None:
    """Delete what :func:`only_leftovers` accepts (the writer holds the run's lock)."""
    for p in Path(run_dir).iterdir():
        if p.is_dir():
            for q in p.iterdir():
                q.unlink(missing_ok=True)
            p.rmdir()
        else:
            p.unlink(missing_ok=True)


def write_manifest(run_dir: Path, manifest: dict[str, Any]) -> None:
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with manifest_lock(run_dir):
        atomic_write_json(Path(run_dir) / MANIFEST, manifest)


@contextmanager
def manifest_lock(run_dir: Path) -> Iterator[None]:
    """Serialise read-modify-write of the manifest between the ranks (and threads) writing one run.

    A ``flock`` on the run directory itself: no lock file, and it dies with the process.
    """
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def update_manifest(run_dir: Path, change: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    """Apply ``change(manifest)`` (in place) and write the manifest back atomically, under the manifest lock."""
    with manifest_lock(run_dir):
        m = read_manifest(run_dir)
        if m is None:
            raise TracekitError(f"{run_dir}: no manifest.json; not a tracekit run directory")
        change(m)
        atomic_write_json(Path(run_dir) / MANIFEST, m)
    return m


def totals(run_dir: Path, chunks: dict[str, list[ChunkInfo]] | None = None) -> dict[str, Any]:
    """Totals over the finished chunks of every kind, recomputed from the files themselves (or from ``chunks``)."""
    out: dict[str, Any] = {}
    for kind in KINDS:
        kind_chunks = list_chunks(run_dir, kind) if chunks is None else chunks.get(kind, [])
        if not kind_chunks:
            continue
        reqs = set()
        for c in kind_chunks:
            reqs.update(c.requests)
        out[kind] = {
            "files": [str(c.path.relative_to(run_dir)) for c in kind_chunks],
            "rows": sum(c.rows for c in kind_chunks),
            "bytes": sum(c.bytes for c in kind_chunks),
            "requests": len(reqs),
            "prompt_tokens": sum(c.prompt_tokens for c in kind_chunks),
            "generated_tokens": sum(c.generated_tokens for c in kind_chunks),
        }
    return out


def reconcile_chunks(manifest: dict[str, Any], run_dir: Path) -> int:
    """Make ``manifest["chunks"]`` list exactly the readable chunk files on disk (resume and finalize).

    Records of files that are gone are dropped (their requests are simply not done); files without a record
    (written before the record existed, or landed just before a kill) are hashed and recorded. Returns how many
    records were dropped.
    """
    recorded = manifest.setdefault("chunks", {})
    on_disk = {f"{kind}/{p.name}": p for kind in KINDS for p in chunk_files(run_dir, kind)}
    gone = [r for r in recorded if r not in on_disk]
    for rel in gone:
        del recorded[rel]
    for rel, p in on_disk.items():
        if rel not in recorded:
            info, kv = read_readable_chunk(p)
            owner = kv.get(META_RUN_ID, b"").decode()
            if owner and owner != manifest.get("run_id"):
                raise TracekitError(f"{p} belongs to run {owner}, not {manifest.get('run_id')}; move it out of this run")
            recorded[rel] = {"rows": info.rows, "bytes": info.bytes, "sha256": file_sha256(p)}
            if rel.startswith("routes/") and kv.get(META_RECORDED):
                # landed just before a kill: its summaries were written before it (absent: the views derive)
                sums = chunk_summary_records(run_dir, p.name)
                if sums is not None:
                    recorded[rel]["summaries"] = sums
    manifest["chunks"] = dict(sorted(recorded.items()))
    return len(gone)


def finalize(run_dir: Path, status: str = "complete", **extra: Any) -> dict[str, Any]:
    """Fold the chunk totals and records into the manifest and mark the run complete (idempotent)."""
    if read_manifest(run_dir) is None:
        raise TracekitError(f"{run_dir}: no manifest.json; not a tracekit run directory")

    def change(m: dict[str, Any]) -> None:
        reconcile_chunks(m, run_dir)
        m["totals"] = totals(run_dir)
        m["status"] = status
        m["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        m.update(extra)
        if status == "complete":
            _compact_recorded(run_dir, m)

    return update_manifest(run_dir, change)


def _compact_recorded(run_dir: Path, m: dict[str, Any]) -> None:
    """Write RUN/summaries/loads.parquet from the run's intact per-chunk load summaries and record its hash in
    ``m`` (under the manifest lock, so the file and its record land together); nothing when a summary is damaged."""
    from .summaries import compact_loads

    chunks = chunk_files(Path(run_dir), "routes")
    rels = [(f"routes/{p.name}", bool((pq.read_metadata(p).metadata or {}).get(META_RECORDED))) for p in chunks]
    sums = m.setdefault("summaries", {})
    sums.pop(RUN_LOADS_REL, None)
    if not check_summaries(run_dir, {**m, "summaries": {}}, rels).per_chunk:
        return
    path = compact_loads(run_dir, chunks, recorded=True)
    if path is not None:
        sums[RUN_LOADS_REL] = bytes_record(path.read_bytes())


# ---------------------------------------------------------------------------------------------------------------
# integrity
# ---------------------------------------------------------------------------------------------------------------
_ALLOW_PARTIAL: contextvars.ContextVar[tuple[bool, Callable[[str], None] | None]] = contextvars.ContextVar(
    "tracekit_allow_partial", default=(False, None))


@contextmanager
def partial_reads(allow: bool = True, on_skip: Callable[[str], None] | None = None) -> Iterator[None]:
    """Inside the block, :func:`open_run` (and every reader built on it) skips damaged chunks instead of refusing.

    ``on_skip(line)`` hears one line per skipped chunk. The CLI's ``--allow-partial`` sets this.
    """
    token = _ALLOW_PARTIAL.set((allow, on_skip))
    try:
        yield
    finally:
        _ALLOW_PARTIAL.reset(token)


def reader_warning(line: str) -> None:
    """One warning line for whoever reads runs: the CLI's (``partial_reads``' ``on_skip``), else Python's warnings."""
    _, on_skip = _ALLOW_PARTIAL.get()
    if on_skip is not None:
        on_skip(line)
    else:
        import warnings

        warnings.warn(line, stacklevel=2)


@dataclass
class Run:
    """A run directory opened for reading."""

    path: Path
    manifest: dict[str, Any]
    files: dict[str, list[Path]] = field(default_factory=dict)
    integrity: Integrity | None = None

    @property
    def kind(self) -> str:
        return self.manifest.get("kind", "routes")

    @property
    def geometry(self) -> dict[str, Any]:
        return self.manifest.get("geometry", {})

    @property
    def run_id(self) -> str:
        return self.manifest["run_id"]

    def table(self, columns: list[str] | None = None, kind: str | None = None) -> pa.Table:
        """Read the run's table into memory (small runs; use tracekit.query for large ones)."""
        kind = kind or self.kind
        paths = self.files.get(kind, [])
        if not paths:
            raise TracekitError(f"{self.path}: no finished {kind} files yet")
        return pa.concat_tables([pq.read_table(p, columns=columns) for p in paths], promote_options="permissive")


def open_run(path: str | os.PathLike, *, allow_partial: bool | None = None) -> Run:
    """Open a run directory; one-line errors for a missing, foreign, damaged or newer-schema directory.

    A run with a missing, extra, truncated or corrupt chunk is refused naming the chunk, unless ``allow_partial``
    (default: the enclosing :func:`partial_reads`, else False); then only the intact chunks are read.
    """
    p = Path(path)
    if not p.is_dir():
        raise TracekitError(f"{p}: no such run directory")
    m = read_manifest(p)
    if m is None:
        raise TracekitError(f"{p}: no manifest.json; not a tracekit run directory (collect or import one first)")
    check_manifest(m, str(p / MANIFEST))
    integrity = verify_run(p, m)
    allow, on_skip = _ALLOW_PARTIAL.get()
    if allow_partial is not None:
        allow = allow_partial
    if integrity.problems:
        if not allow:
            more = f" (and {len(integrity.problems) - 1} more)" if len(integrity.problems) > 1 else ""
            raise TracekitError(
                f"{p}: {integrity.problems[0].line()}{more}; the run is damaged: restore the file or collect it "
                "again, or pass --allow-partial to read the intact chunks"
            )
        if on_skip is not None:
            for prob in integrity.problems:
                on_skip(f"{p}: skipping {prob.line()}")
    check_geometry(p, m.get("geometry") or {}, integrity)
    files = {k: [c.path for c in integrity.good.get(k, [])] for k in KINDS}
    return Run(path=p, manifest=m, files=files, integrity=integrity)


def base_manifest(*, run_id: str, kind: str, source: str, model: dict, geometry: dict, dataset: dict, args: dict) -> dict:
    """The manifest fields every writer (collector, importers) fills in the same way."""
    from . import __version__

    return {
        "schema_version": SCHEMA_VERSION,
        "tracekit_version": __version__,
        "run_id": run_id,
        "kind": kind,
        "source": source,
        "status": "running",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": model,
        "geometry": geometry,
        "dataset": dataset,
        "args": args,
        "notes": [],
    }


def backfill(run_dir: str | Path) -> int:
    """Write the missing summaries of an existing run from its chunk files; returns how many chunks were done."""
    n = 0
    for c in list_chunks(Path(run_dir), "routes"):
        if all(summaries.summary_path(run_dir, name, c.path.name).is_file() for name in summaries.TABLES):
            continue
        summaries.write_chunk_summaries(run_dir, pq.read_table(c.path), c.path.name)
        n += 1
    chunks = [c.path for c in list_chunks(Path(run_dir), "routes")]
    if summaries.run_loads_file(run_dir, chunks) is None:
        summaries.compact_loads(run_dir, chunks)
    return n
