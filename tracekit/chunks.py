"""A run directory's chunk files as readers see them: names, footers (:class:`ChunkInfo`), the manifest's path.

The leaf both the writer (:mod:`tracekit.store`) and the integrity check (:mod:`tracekit.integrity`) read through.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import pyarrow.parquet as pq

from .errors import TracekitError
from .jsonlines import read_json
from .schema import check_version
from .summaries import column_max

MANIFEST = "manifest.json"
PART_RE = re.compile(r"^part-r(\d{3,})-c(\d{6,})\.parquet$")
META_REQUESTS = b"tracekit.requests"
META_PROMPT_TOKENS = b"tracekit.prompt_tokens"
META_GENERATED_TOKENS = b"tracekit.generated_tokens"
META_RUN_ID = b"tracekit.run_id"


def part_name(rank: int, chunk: int) -> str:
    return f"part-r{rank:03d}-c{chunk:06d}.parquet"


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
    max_layer: int | None = None  # the largest layer index by the footer's column statistics (None: unknown)
    max_expert: int | None = None  # loads chunks: the largest expert id, likewise


def chunk_files(run_dir: Path, kind: str) -> list[Path]:
    d = Path(run_dir) / kind
    if not d.is_dir():
        return []
    return [p for p in sorted(d.iterdir()) if PART_RE.match(p.name)]


def one_printable_line(exc: BaseException, limit: int = 80) -> str:
    """An exception's text as one short printable line (a corrupt file's bytes can end up in the message)."""
    return "".join(ch for ch in " ".join(str(exc).split()) if ch.isprintable())[:limit]


def read_readable_chunk(p: Path) -> tuple["ChunkInfo", dict]:
    """:func:`read_chunk`, with a foreign or damaged file turned into one line that names it."""
    try:
        return read_chunk(p)
    except TracekitError:
        raise
    except Exception as exc:
        raise TracekitError(f"{p}: not a readable Parquet chunk ({one_printable_line(exc)}); remove it and re-run "
                            "to resume") from None


def read_chunk(p: Path) -> tuple[ChunkInfo, dict]:
    """A chunk's footer as ChunkInfo (and its key-value metadata); raises on an unreadable file."""
    m = PART_RE.match(p.name)
    md = pq.read_metadata(p)
    kv = md.metadata or {}
    check_version(kv.get(b"tracekit.schema_version", b"").decode() or None, str(p))
    info = ChunkInfo(
        path=p,
        rank=int(m.group(1)),
        chunk=int(m.group(2)),
        rows=md.num_rows,
        bytes=p.stat().st_size,
        requests=json.loads(kv.get(META_REQUESTS, b"[]")),
        prompt_tokens=int(kv.get(META_PROMPT_TOKENS, b"0")),
        generated_tokens=int(kv.get(META_GENERATED_TOKENS, b"0")),
    )
    info.max_layer = column_max(md, "layer")
    info.max_expert = column_max(md, "expert")  # routes chunks hold lists (no statistics): their summaries tell
    return info, kv


def list_chunks(run_dir: Path, kind: str = "routes", only: Iterable[str | os.PathLike] | None = None) -> list[ChunkInfo]:
    """Finished chunk files of a run, read from their Parquet footers (cheap: no data pages are read).
    ``only``: just these files (e.g. the intact chunks a partial read keeps)."""
    out = []
    keep = None if only is None else {Path(f).name for f in only}
    for p in chunk_files(run_dir, kind):
        if keep is not None and p.name not in keep:
            continue
        out.append(read_readable_chunk(p)[0])
    return out


def read_manifest(run_dir: Path) -> dict[str, Any] | None:
    p = Path(run_dir) / MANIFEST
    if not p.exists():
        return None
    return read_json(p, "restore or remove it")
