"""Run directories: Parquet layout, manifest, atomic writes and resume.

Layout of one run directory::

    RUN/
      manifest.json                       model, geometry, dataset, args, totals, schema version
      routes/part-r000-c000000.parquet    one file per finished chunk (rank r, chunk c) of the routes table
      loads/part-r000-c000000.parquet     aggregated-count runs (engine statistics) use this table instead

Every file is written under a temporary name and renamed when complete, so a file is either whole or absent.
Each chunk file carries in its Parquet key-value metadata the request ids it holds and their token counts;
resume and the manifest totals are computed from those footers, never from a side file that could disagree.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import TracekitError
from .jsonlines import read_json
from .schema import KINDS, SCHEMA_VERSION, check_version

MANIFEST = "manifest.json"
ROW_GROUP_ROWS = 1 << 18  # DuckDB parallelises over row groups; ~256K rows keeps 2 cores busy without tiny groups
_PART_RE = re.compile(r"^part-r(\d{3,})-c(\d{6,})\.parquet$")
META_REQUESTS = b"tracekit.requests"
META_PROMPT_TOKENS = b"tracekit.prompt_tokens"
META_GENERATED_TOKENS = b"tracekit.generated_tokens"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


def part_name(rank: int, chunk: int) -> str:
    return f"part-r{rank:03d}-c{chunk:06d}.parquet"


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
    table = table.replace_schema_metadata(meta)
    if kind == "routes":  # small per-chunk aggregates for the loads/requests views, written before the chunk
        from .summaries import write_chunk_summaries

        write_chunk_summaries(run_dir, table, out.name)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
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
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


@dataclass
class ChunkInfo:
    path: Path
    rank: int
    chunk: int
    rows: int
    bytes: int
    requests: list[int]
    prompt_tokens: int
    generated_tokens: int


def list_chunks(run_dir: Path, kind: str = "routes") -> list[ChunkInfo]:
    """Finished chunk files of a run, read from their Parquet footers (cheap: no data pages are read)."""
    d = Path(run_dir) / kind
    if not d.is_dir():
        return []
    out = []
    for p in sorted(d.iterdir()):
        m = _PART_RE.match(p.name)
        if not m:
            continue
        try:
            md = pq.read_metadata(p)
        except Exception as exc:  # a foreign or damaged file: say which
            raise TracekitError(f"{p}: not a readable Parquet chunk ({exc}); remove it and re-run to resume") from None
        kv = md.metadata or {}
        check_version(kv.get(b"tracekit.schema_version", b"").decode() or None, str(p))
        out.append(
            ChunkInfo(
                path=p,
                rank=int(m.group(1)),
                chunk=int(m.group(2)),
                rows=md.num_rows,
                bytes=p.stat().st_size,
                requests=json.loads(kv.get(META_REQUESTS, b"[]")),
                prompt_tokens=int(kv.get(META_PROMPT_TOKENS, b"0")),
                generated_tokens=int(kv.get(META_GENERATED_TOKENS, b"0")),
            )
        )
    return out


def remove_stale_temporaries(run_dir: Path) -> int:
    """Delete temporary files left by an interrupted writer; finished chunks are never touched."""
    n = 0
    for kind in KINDS:
        d = Path(run_dir) / kind
        if d.is_dir():
            for p in d.glob(".part-*.tmp"):
                p.unlink(missing_ok=True)
                n += 1
    return n


def read_manifest(run_dir: Path) -> dict[str, Any] | None:
    p = Path(run_dir) / MANIFEST
    if not p.exists():
        return None
    return read_json(p, "restore or remove it")


def write_manifest(run_dir: Path, manifest: dict[str, Any]) -> None:
    atomic_write_json(Path(run_dir) / MANIFEST, manifest)


def totals(run_dir: Path) -> dict[str, Any]:
    """Totals over the finished chunks of every kind, recomputed from the files themselves."""
    out: dict[str, Any] = {}
    for kind in KINDS:
        chunks = list_chunks(run_dir, kind)
        if not chunks:
            continue
        reqs = set()
        for c in chunks:
            reqs.update(c.requests)
        out[kind] = {
            "files": [str(c.path.relative_to(run_dir)) for c in chunks],
            "rows": sum(c.rows for c in chunks),
            "bytes": sum(c.bytes for c in chunks),
            "requests": len(reqs),
            "prompt_tokens": sum(c.prompt_tokens for c in chunks),
            "generated_tokens": sum(c.generated_tokens for c in chunks),
        }
    return out


def finalize(run_dir: Path, status: str = "complete", **extra: Any) -> dict[str, Any]:
    """Fold the chunk totals into the manifest and mark the run complete (idempotent)."""
    m = read_manifest(run_dir)
    if m is None:
        raise TracekitError(f"{run_dir}: no manifest.json; not a tracekit run directory")
    m["totals"] = totals(run_dir)
    m["status"] = status
    m["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    m.update(extra)
    write_manifest(run_dir, m)
    return m


@dataclass
class Run:
    """A run directory opened for reading."""

    path: Path
    manifest: dict[str, Any]
    files: dict[str, list[Path]] = field(default_factory=dict)

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


def open_run(path: str | os.PathLike) -> Run:
    """Open a run directory; one-line errors for a missing, foreign or newer-schema directory."""
    p = Path(path)
    if not p.is_dir():
        raise TracekitError(f"{p}: no such run directory")
    m = read_manifest(p)
    if m is None:
        raise TracekitError(f"{p}: no manifest.json; not a tracekit run directory (collect or import one first)")
    check_version(m.get("schema_version"), str(p / MANIFEST))
    files = {k: [c.path for c in list_chunks(p, k)] for k in KINDS}
    return Run(path=p, manifest=m, files=files)


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
