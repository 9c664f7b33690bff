"""Write an imported run all-or-nothing: chunks go to a hidden sibling directory that is renamed into place at the end.

Importers validate as they read; when a file turns out malformed half-way, the staging directory is deleted and
``--out`` is left exactly as it was (absent or empty). Every table goes through :mod:`tracekit.schema` builders and
every file through :func:`tracekit.store.write_chunk`, so imported runs are read like collected ones.

The import holds the writer lock of ``--out`` (:mod:`tracekit.runlock`) while it stages, so a concurrent collect or
import on the same ``--out`` is refused; staging folders left by a killed import are removed under that lock.
"""
from __future__ import annotations

import functools
import inspect
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from ..errors import TracekitError
from ..schema import build_routes_table, routes_schema
from ..runlock import resolve_out, writer_lock
from ..store import base_manifest, finalize, new_run_id, update_manifest, write_chunk, write_manifest
from .geometry import registry_hub_id


def holds_out_lock(fn: Callable) -> Callable:
    """Decorate an import entry point with an ``out`` argument: the writer lock of ``out`` is held for the whole
    call (reading the sources included), so a second writer is refused before it reads anything."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        out = Path(sig.bind(*args, **kwargs).arguments["out"])
        if out.exists() and not out.is_dir():
            raise TracekitError(f"{out} already exists and is not empty; import into a new --out directory")
        with writer_lock(out):
            return fn(*args, **kwargs)

    return wrapper


def refuse_nonempty_out(out: Path) -> None:
    """An import never writes into an existing run: one line if ``out`` exists and holds anything."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TracekitError(f"{out} already exists and is not empty; import into a new --out directory")


class StagedRun:
    """A run directory being imported. Use as a context manager; it appears at ``out`` only on success."""

    def __init__(
        self,
        out: str | os.PathLike,
        *,
        kind: str,
        source: str,
        model_name: str,
        geometry: dict[str, Any],
        dataset: dict[str, Any],
        args: dict[str, Any],
        weight_dtype: str = "float16",
        run_id: str | None = None,
    ) -> None:
        self.out = Path(out)
        self.kind = kind
        self.model_name = model_name
        self.geometry = geometry
        self.dataset = dataset
        self.run_id = run_id or new_run_id()
        self.notes: list[str] = []
        self.extra: dict[str, Any] = {}
        self._chunk = 0
        self._schema = routes_schema(geometry["num_experts"], weight_dtype) if kind == "routes" else None
        self._manifest = base_manifest(
            run_id=self.run_id, kind=kind, source=source,
            model={"name": model_name, "hub_id": registry_hub_id(model_name), "revision": None},
            geometry=geometry, dataset=dataset, args=args,
        )
        self.tmp: Path | None = None
        self._target = self.out
        self._lock = None
        self._warned = False

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def __enter__(self) -> "StagedRun":
        if self.out.exists() and not self.out.is_dir():
            raise TracekitError(f"{self.out} already exists and is not empty; import into a new --out directory")
        self._lock = writer_lock(self.out)
        self._lock.__enter__()
        try:
            refuse_nonempty_out(self.out)
            # stage next to the directory --out resolves to (a symlink --out keeps pointing at the finished run)
            self._target = resolve_out(self.out)
            parent = self._target.parent
            for stale in parent.glob(f".{self._target.name}.importing-*"):  # left by a killed import (we hold the lock)
                shutil.rmtree(stale, ignore_errors=True)
            self.tmp = parent / f".{self._target.name}.importing-{uuid.uuid4().hex[:8]}"
            self.tmp.mkdir()
            write_manifest(self.tmp, {**self._manifest, "chunks": {}})
        except BaseException:
            self._unlock()
            raise
        return self

    def _unlock(self) -> None:
        if self._lock is not None:
            lock, self._lock = self._lock, None
            lock.__exit__(None, None, None)

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.tmp is not None
        try:
            if exc_type is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                return
            if self._chunk == 0:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise TracekitError("the sources hold no routing records to import (empty dump?)")

            def change(m: dict[str, Any]) -> None:
                m["notes"] = list(self.notes)
                m.update(self.extra)

            try:
                update_manifest(self.tmp, change)
                finalize(self.tmp)
                if self._target.exists():
                    self._target.rmdir()  # empty (checked on enter)
                os.replace(self.tmp, self._target)
            except BaseException:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise
        finally:
            self._unlock()

    def _warn_once(self, line: str) -> None:
        """One warning line per import on stderr (the first chunk that has it), kept in the manifest's notes."""
        if not self._warned:
            self._warned = True
            print(f"warning: {line}", file=sys.stderr)
            self.note(line)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    # -- writing -----------------------------------------------------------------------------------------------
    def write_routes_tokens(
        self,
        *,
        request_id: np.ndarray,
        prompt_id: list[str] | np.ndarray | None,
        phase: np.ndarray,
        position: np.ndarray,
        step: np.ndarray,
        token_id: np.ndarray | None,
        experts: np.ndarray,
        domain: str | tuple[np.ndarray, list[str]],
        prompt_tokens: int,
        generated_tokens: int,
    ) -> None:
        """Write one chunk from per-token arrays.

        Shapes: ``request_id, phase, position, step, token_id`` are (T,); ``experts`` is (T, nL, k) over the
        geometry's MoE layers in order; rows come out token-major, one per (token, MoE layer).
        ``domain`` is one string, or ``(labels (T,), names)`` for a chunk that mixes domains.
        """
        assert self.tmp is not None and self._schema is not None
        layers = np.asarray(self.geometry["moe_layers"], dtype=np.int16)
        t, nl, k = experts.shape
        if t == 0:
            return
        if nl != len(layers):
            raise ValueError(f"experts has {nl} layers, geometry has {len(layers)} MoE layers")
        rep = lambda a: None if a is None else np.repeat(np.asarray(a), nl)  # noqa: E731
        pid = None if prompt_id is None else np.repeat(np.asarray(prompt_id, dtype=object), nl)
        dom, domains = (domain, None) if isinstance(domain, str) else (rep(domain[0]), list(domain[1]))
        table = build_routes_table(
            schema=self._schema, run_id=self.run_id, model=self.model_name, dataset=self.dataset["name"],
            domain=dom, domains=domains, request_id=rep(request_id), prompt_id=pid, phase=rep(phase),
            position=rep(position), step=rep(step), layer=np.tile(layers, t), token_id=rep(token_id),
            experts=experts.reshape(t * nl, k), weights=None,
        )
        self._write(table, requests=np.unique(request_id).tolist(), prompt_tokens=prompt_tokens,
                    generated_tokens=generated_tokens)

    def write_loads(self, table: pa.Table) -> None:
        assert self.kind == "loads"
        if table.num_rows:
            self._write(table)

    @property
    def schema(self) -> pa.Schema | None:
        """The routes schema of this run (None for a loads run)."""
        return self._schema

    def write_table(self, table: pa.Table, *, requests: list[int], prompt_tokens: int, generated_tokens: int) -> None:
        """Write one chunk of an already-built routes table (built with :attr:`schema`)."""
        self._write(table, requests=requests, prompt_tokens=prompt_tokens, generated_tokens=generated_tokens)

    def _write(self, table: pa.Table, **meta: Any) -> None:
        assert self.tmp is not None
        if self.kind == "routes":  # what no router emits is refused before anything of the chunk is written
            from .choices import check_routes_table, weight_scale

            check_routes_table(table, scale=weight_scale(self.model_name, self.geometry), warn=self._warn_once)
        write_chunk(self.tmp, table, kind=self.kind, chunk=self._chunk, **meta)
        self._chunk += 1
