"""Atomic file writes, content hashes and temporary names: the leaf every writer of a run shares.

A file is written to a hidden temporary name next to its target, fsynced, and renamed over it, so a reader (or a
resume after ``kill -9``) sees the old file or the new one, never a part. :mod:`tracekit.store` (chunks, manifest)
and :mod:`tracekit.summaries` (per-chunk summaries) both write through here; neither imports the other for it.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable

#: fault injection for the crash tests: ``NAME:N`` makes the N-th atomic write of a file called NAME in this
#: process stop dead (``os._exit(137)``, like ``kill -9``) after its temporary file is written, before the rename
CRASH_ENV = "TRACEKIT_CRASH_BEFORE_RENAME"
_crash_counts: dict[str, int] = {}


def temp_path(path: Path) -> Path:
    """A fresh hidden temporary name next to ``path`` (``.NAME.<random>.tmp``); nothing is created."""
    path = Path(path)
    return path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"


def _maybe_crash(name: str) -> None:
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    _crash_counts[name] = _crash_counts.get(name, 0) + 1
    if _crash_counts[name] == int(nth or 1):
        os._exit(137)


def atomic_write_path(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` creates a temporary file next to ``path``; it is fsynced and renamed over ``path``.

    ``write`` must create the file itself (``open(tmp, "w")``, ``pq.write_table(t, tmp)`` ...), so the file gets
    the process umask. On any error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        _maybe_crash(path.name)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    def write(tmp: Path) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0666 & ~umask
        with os.fdopen(fd, "wb") as f:
            f.write(data)

    atomic_write_path(path, write)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
