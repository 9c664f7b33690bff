"""Is a run what its manifest says? Every chunk against its record (size, footer rows, optionally SHA-256), the
summaries against theirs, and the manifest's geometry against the data; readers refuse a damaged run in one line
(or skip its damaged chunks under ``--allow-partial``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from .atomic import file_sha256
from .chunks import (MANIFEST, META_RUN_ID, ChunkInfo, chunk_files, one_printable_line, read_chunk,
                     read_manifest)
from .errors import TracekitError
from .manifest_check import CHECKSUM, is_int
from .schema import KINDS
from .summaries import META_RECORDED, SummaryCheck, check_summaries

@dataclass
class ChunkProblem:
    file: str  # relative to the run directory, e.g. routes/part-r000-c000003.parquet
    what: str  # missing | extra | truncated | corrupt
    detail: str

    def line(self) -> str:
        return f"chunk {self.file} is {self.what} ({self.detail})"


@dataclass
class Integrity:
    """What :func:`verify_run` found. ``state``: verified, unverified (no chunk record) or damaged."""

    state: str
    checked: str  # what was compared: "sizes and footer row counts" or "sha256 of every byte"
    problems: list[ChunkProblem]
    good: dict[str, list[ChunkInfo]]  # per kind: the chunks that passed, in file order
    unrecorded: list[str] = field(default_factory=list)  # accepted: landed after the last manifest update
    summaries: SummaryCheck = field(default_factory=SummaryCheck)  # the per-chunk and run-level summary files

    @property
    def damaged(self) -> bool:
        """A chunk or a summary file differs from the record (readers refuse the first, fall back for the second)."""
        return bool(self.problems or self.summaries.problems)

    def lines(self) -> list[str]:
        """Every problem found, one line each: chunks first, then summaries."""
        return [p.line() for p in self.problems] + list(self.summaries.problems)

    def summary(self) -> str:
        n = sum(len(v) for v in self.good.values())
        sums = {"verified": "; summaries: sha256 verified",
                "unverified": "; summaries unverified (written before tracekit recorded their checksums)"}
        tail = sums.get(self.summaries.state, "")
        if self.damaged:
            lines = self.lines()
            return f"DAMAGED: {lines[0]}" + (f" and {len(lines) - 1} more" if len(lines) > 1 else "")
        if self.state == "unverified":
            return (f"unverified: written before tracekit recorded chunk checksums ({n} chunk{'s' if n != 1 else ''} "
                    f"readable){tail}")
        extra = f"; {len(self.unrecorded)} chunk(s) not yet recorded (run not finished)" if self.unrecorded else ""
        return f"verified: {n} chunk{'s' if n != 1 else ''}, {self.checked}{extra}{tail}"


def verify_run(run_dir: str | os.PathLike, manifest: dict[str, Any] | None = None, *, checksums: bool = False) -> Integrity:
    """Check every chunk of a run against the manifest's record (see the module docstring).

    Default: size and footer row count per chunk (a ``stat`` and a footer read). ``checksums``: also the SHA-256
    of every file (reads everything). Never raises for damage; a newer schema still raises.
    """
    run_dir = Path(run_dir)
    m = manifest if manifest is not None else (read_manifest(run_dir) or {})
    recorded = m.get("chunks")
    complete = m.get("status") == "complete"
    problems: list[ChunkProblem] = []
    good: dict[str, list[ChunkInfo]] = {k: [] for k in KINDS}
    unrecorded: list[str] = []
    flagged: dict[str, bool] = {}  # routes chunks read: does the footer say its summaries are recorded
    seen: set[str] = set()
    for kind in KINDS:
        for p in chunk_files(run_dir, kind):
            rel = f"{kind}/{p.name}"
            seen.add(rel)
            rec = recorded.get(rel) if isinstance(recorded, dict) else None
            size = p.stat().st_size
            if rec is not None and size != rec.get("bytes"):
                # cut short (a copy that stopped, a full disk): the footer is gone too; else the file was replaced
                try:
                    pq.read_metadata(p)
                    what = "corrupt"
                except Exception:
                    what = "truncated" if size < rec.get("bytes", 0) else "corrupt"
                problems.append(ChunkProblem(rel, what, f"{size} bytes, recorded {rec.get('bytes')}"))
                continue
            try:
                info, kv = read_chunk(p)
            except TracekitError:
                raise
            except Exception as exc:
                text = one_printable_line(exc)
                problems.append(ChunkProblem(rel, "corrupt", f"unreadable Parquet footer: {text}"))
                continue
            if rec is not None:
                if info.rows != rec.get("rows"):
                    problems.append(ChunkProblem(rel, "corrupt", f"{info.rows} rows, recorded {rec.get('rows')}"))
                    continue
                if checksums and file_sha256(p) != rec.get(CHECKSUM):
                    problems.append(ChunkProblem(rel, "corrupt", "sha256 differs from the record"))
                    continue
            elif not isinstance(recorded, dict) and kv.get(META_RUN_ID):
                # this chunk's writer records every chunk in the manifest: the record was removed, not never made
                problems.append(ChunkProblem(rel, "unrecorded", "the manifest has lost its 'chunks' record, which "
                                                                "the tracekit that wrote this chunk keeps"))
                continue
            elif isinstance(recorded, dict):
                owner = kv.get(META_RUN_ID, b"").decode()
                if complete or owner != m.get("run_id"):
                    why = "not in the manifest" + (f"; it belongs to run {owner}" if owner and owner != m.get("run_id") else "")
                    problems.append(ChunkProblem(rel, "extra", why))
                    continue
                unrecorded.append(rel)
            good[kind].append(info)
            if kind == "routes":
                flagged[rel] = bool(kv.get(META_RECORDED))
    if isinstance(recorded, dict):
        for rel in recorded:
            if rel not in seen:
                problems.append(ChunkProblem(rel, "missing", f"recorded with {recorded[rel].get('rows')} rows"))
    state = "damaged" if problems else ("verified" if isinstance(recorded, dict) else "unverified")
    checked = "sha256 of every byte" if checksums else "sizes and footer row counts"
    summaries = check_summaries(run_dir, m, list(flagged.items()))
    return Integrity(state, checked, problems, good, unrecorded, summaries)


def data_max_expert(integrity: Integrity) -> int | None:
    """The largest expert id the run's intact files hold, from what is already read on open: the Parquet statistics
    of the loads chunks and of the routes chunks' load summaries (None when nothing tells; no data page is read)."""
    found = [c.max_expert for c in integrity.good.get("loads", []) if c.max_expert is not None]
    if integrity.summaries.max_expert is not None:
        found.append(integrity.summaries.max_expert)
    return max(found) if found else None


def check_geometry(run_dir: Path, geometry: dict[str, Any], integrity: Integrity) -> None:
    """One line when the manifest's geometry cannot describe the data: an expert id at or above ``num_experts``
    (every reader sizes its arrays by it, so the numbers would be silently wrong)."""
    e = geometry.get("num_experts")
    top = data_max_expert(integrity)
    if is_int(e) and top is not None and top >= e:
        raise TracekitError(
            f"{run_dir}: the manifest says num_experts {e}, but the data holds expert id {top}: the geometry does not "
            f"describe these routes; fix geometry.num_experts in {run_dir / MANIFEST} (or import the run again with "
            "the right --model)")
