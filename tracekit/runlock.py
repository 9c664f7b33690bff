"""Advisory locks on a run directory: one writer (``collect`` or ``import``) per ``--out`` at a time.

The lock files sit next to the run directory, not inside it (an import renames a finished folder into place, and
a run folder should hold only the run)::

    PARENT/.NAME.lock         every writer; exclusive for a single process, shared by the ranks of one DP job
    PARENT/.NAME.r001.lock    one per data-parallel rank (exclusive): two jobs never write the same rank's chunks

``fcntl.flock`` locks die with their process, so a ``kill -9`` never leaves a run locked; a lock file that
outlives its writer is just an empty file that the next writer reuses. The holder writes its pid into the file so
that the refusal can name it. A writer removes its lock files when it is done (after re-checking, under the lock,
that the path still names the file it locked, so a writer that raced with the removal locks a fresh file).

The lock is named after the *resolved* directory (symlinks and ``..`` followed, as ``realpath`` does), so two
spellings of one directory (``R``, a symlink ``A -> R``, ``R/../R``, a symlinked parent) share one lock. A
``--out`` that is a dangling symlink is refused in one line: writing through it would create the target somewhere
the user did not name.

Within one process the lock is re-entrant (``import_jsonl`` takes it before reading the sources, and the staging
step that writes the run takes it again).
"""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import TracekitError

_held: dict[str, list] = {}  # lock path -> [fd, count] for the locks this process holds


def resolve_out(run_dir: str | os.PathLike) -> Path:
    """The directory ``run_dir`` names, every symlink followed; one-line TracekitError for a dangling symlink."""
    p = Path(run_dir)
    if p.is_symlink() and not p.exists():
        raise TracekitError(f"--out {run_dir} is a symlink to {os.readlink(p)}, which does not exist; "
                            "create the target directory or give a real directory")
    return Path(os.path.realpath(p))


def lock_path(run_dir: str | os.PathLike, rank: int | None = None) -> Path:
    """The lock file of ``run_dir`` (``rank`` given: that data-parallel rank's own lock file), named after the
    resolved directory so that every spelling of one directory shares it."""
    p = Path(os.path.realpath(run_dir))
    suffix = "" if rank is None else f".r{rank:03d}"
    return p.parent / f".{p.name}{suffix}.lock"


def _read_pid(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        return "?"
    return text if text.isdigit() else "?"


def _acquire(path: Path, shared: bool, run_dir: Path) -> None:
    key = str(path)
    if key in _held:
        _held[key][1] += 1
        return
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise TracekitError(f"--out {run_dir}: cannot create its lock file {path} ({exc.strerror})") from None
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise TracekitError(
                f"{run_dir} is being written by another tracekit process (pid {_read_pid(path)}); "
                "wait for it or choose another --out"
            ) from None
        try:  # the previous holder may have removed the file between our open and our lock: lock the new one
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    if not shared or os.fstat(fd).st_size == 0:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[key] = [fd, 1]


def _release(path: Path) -> None:
    key = str(path)
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] > 0:
        return
    fd = entry[0]
    del _held[key]
    try:
        # remove the file only while holding it exclusively (a shared holder still at work keeps it)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                path.unlink()
        except FileNotFoundError:
            pass
    except BlockingIOError:
        pass
    finally:
        os.close(fd)  # closing drops the lock


@contextmanager
def writer_lock(run_dir: str | os.PathLike, rank: int = 0, world: int = 1) -> Iterator[None]:
    """Hold the writer lock of ``run_dir`` for the block; one-line TracekitError if another process holds it.

    A single process (``world == 1``) takes the run's lock exclusively. Each rank of a data-parallel job takes it
    shared plus its own rank lock exclusively, so the ranks of one job share the run while a second job, or a
    single-process writer, is refused.
    """
    run_dir = Path(run_dir)
    resolve_out(run_dir)  # a dangling symlink: one line, before any lock file is made
    main = lock_path(run_dir)
    _acquire(main, shared=world > 1, run_dir=run_dir)
    try:
        if world > 1:
            _acquire(lock_path(run_dir, rank), shared=False, run_dir=run_dir)
        try:
            yield
        finally:
            if world > 1:
                _release(lock_path(run_dir, rank))
    finally:
        _release(main)


def writer_pid(run_dir: str | os.PathLike) -> str | None:
    """The pid (as text) of a live writer of ``run_dir``, or None when nobody holds its lock."""
    path = lock_path(run_dir)
    if str(path) in _held:
        return str(os.getpid())
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:  # a writer holds it exclusively, or the ranks of a data-parallel job hold it shared: both block this
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_pid(path)
    finally:
        os.close(fd)
    return None
