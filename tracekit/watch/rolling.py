"""A rolling run: a run directory that ``watch`` appends to for as long as it runs, with retention by size and age.

Same layout, schema and manifest as every run (:mod:`tracekit.store`): each append is one chunk written atomically
and recorded in the manifest, so every query, analysis and ``place`` reads it. Resume-safe like ``collect``: opening
an existing rolling run (same model) carries on after its last chunk and its last request id. Retention drops the
oldest chunks (their manifest record first, then the file and its summaries) while the run holds more than
``max_bytes`` or a chunk is older than ``max_age_s``; the newest chunk is always kept.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import TracekitError
from ..schema import build_routes_table, routes_schema
from ..store import (MANIFEST, base_manifest, list_chunks, new_run_id, read_manifest, remove_stale_temporaries,
                     update_manifest, write_chunk, write_manifest)
from ..summaries import RUN_LOADS, SUMMARY_DIR, TABLES, summary_path

SOURCE = "watch"


class RollingRun:
    """Append-only, retention-bounded routes run at ``out`` (created, or resumed when it is a watch run)."""

    def __init__(self, out: str | os.PathLike, *, model_name: str, geometry: dict[str, Any], engine: str,
                 max_bytes: int | None = None, max_age_s: float | None = None, args: dict | None = None):
        self.out = Path(out)
        self.geometry = geometry
        self.model_name = model_name
        self.max_bytes, self.max_age_s = max_bytes, max_age_s
        self._schema = routes_schema(geometry["num_experts"], "float16")
        m = read_manifest(self.out) if (self.out / MANIFEST).exists() else None
        if m is None:
            if self.out.exists() and any(self.out.iterdir()):
                raise TracekitError(f"--out {self.out} exists and is not a watch run; give a new or empty directory")
            self.run_id = new_run_id()
            write_manifest(self.out, base_manifest(
                run_id=self.run_id, kind="routes", source=SOURCE,
                model={"name": model_name, "hub_id": None, "revision": None}, geometry=geometry,
                dataset={"name": f"watch-{engine}", "domain": "mixed", "sources": []}, args=args or {}))
            update_manifest(self.out, lambda m: m.update(chunks={}, notes=[
                "rolling run written by tracekit watch: the oldest chunks are dropped by retention "
                f"(max bytes {max_bytes}, max age {max_age_s} s)"]))
            self.next_chunk = self.next_request = 0
            self.resumed = False
        else:
            if m.get("source") != SOURCE:
                raise TracekitError(f"--out {self.out} holds a run written by {m.get('source')!r}, not watch; give a "
                                    "new directory")
            g = m.get("geometry") or {}
            if g.get("num_experts") != geometry["num_experts"] or list(g.get("moe_layers") or []) != \
                    list(geometry["moe_layers"]) or g.get("top_k") != geometry["top_k"]:
                raise TracekitError(f"--out {self.out} was written for another model geometry; give a new directory")
            self.run_id = m["run_id"]
            remove_stale_temporaries(self.out)
            chunks = list_chunks(self.out, "routes")
            self.next_chunk = max((c.chunk for c in chunks), default=-1) + 1
            self.next_request = max((max(c.requests) for c in chunks if c.requests), default=-1) + 1
            update_manifest(self.out, lambda m: m.update(status="running"))
            self.resumed = True

    def append(self, *, request_id: np.ndarray, phase: np.ndarray, position: np.ndarray, step: np.ndarray,
               experts: np.ndarray, domain: tuple[np.ndarray, list[str]], prompt_id: list[str] | None = None) -> Path | None:
        """One chunk from per-token arrays: ``request_id, phase, position, step`` (T,), ``experts`` (T, nL, k) over
        the geometry's MoE layers, ``domain`` (labels (T,), names). Returns the chunk's path (None when empty)."""
        t, nl, k = experts.shape
        if t == 0:
            return None
        layers = np.asarray(self.geometry["moe_layers"], dtype=np.int16)
        rep = lambda a: np.repeat(np.asarray(a), nl)  # noqa: E731
        pid = None if prompt_id is None else np.repeat(np.asarray(prompt_id, dtype=object), nl)
        table = build_routes_table(
            schema=self._schema, run_id=self.run_id, model=self.model_name, dataset="watch",
            domain=rep(domain[0]), domains=list(domain[1]), request_id=rep(request_id), prompt_id=pid,
            phase=rep(phase), position=rep(position), step=rep(step), layer=np.tile(layers, t),
            token_id=np.full(t * nl, -1), experts=experts.reshape(t * nl, k), weights=None)
        n_dec = int(np.asarray(phase).sum())
        path = write_chunk(self.out, table, kind="routes", chunk=self.next_chunk,
                           requests=np.unique(request_id).tolist(), prompt_tokens=t - n_dec, generated_tokens=n_dec)
        self.next_chunk += 1
        self.retain()
        return path

    def retain(self, now: float | None = None) -> list[str]:
        """Drop the oldest chunks beyond ``max_bytes`` / ``max_age_s`` (never the newest); returns their names."""
        if self.max_bytes is None and self.max_age_s is None:
            return []
        now = time.time() if now is None else now
        files = sorted((self.out / "routes").glob("part-*.parquet"))
        sizes = [p.stat().st_size for p in files]
        total = sum(sizes)
        drop = []
        for p, size in zip(files[:-1], sizes[:-1]):
            old = self.max_age_s is not None and now - p.stat().st_mtime > self.max_age_s
            big = self.max_bytes is not None and total > self.max_bytes
            if not (old or big):
                break
            drop.append(p)
            total -= size
        if not drop:
            return []
        names = {f"routes/{p.name}" for p in drop}
        update_manifest(self.out, lambda m: [m.setdefault("chunks", {}).pop(n, None) for n in names])
        for p in drop:
            p.unlink(missing_ok=True)
            for t in TABLES:
                summary_path(self.out, t, p.name).unlink(missing_ok=True)
        (self.out / SUMMARY_DIR / RUN_LOADS).unlink(missing_ok=True)  # a run-level summary would be stale
        return sorted(names)

    def bytes(self) -> int:
        return sum(p.stat().st_size for p in (self.out / "routes").glob("part-*.parquet"))

    def close(self) -> None:
        """Fold the totals into the manifest (the run stays readable; a restart resumes it)."""
        from ..store import finalize

        finalize(self.out, status="complete", stopped_by="watch")
