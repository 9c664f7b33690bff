"""Where a command may write its output, checked before any work starts, and how it writes (atomically).

Every output option of every command (``query -o``, ``analyze --out``, ``report -o/--png``, ``place -o/--json``,
``export -o``) goes through :func:`check_file` or :func:`check_folder` first, so a bad target costs one line and
nothing is computed or written. The rules, for a target path ``P``:

- ``P`` is never inside a run directory, nor one itself (a folder holding ``manifest.json``, or ``routes/`` or
  ``loads/`` with Parquet chunks): traces are written by ``collect``/``import`` only.
- No part of ``P``'s parent chain is a file (``out.txt/result.csv``).
- A file target is not a folder and not a special file (``/dev/...``, a FIFO); an existing one is replaced only
  with ``--force``.
- A folder target is not a file; one that already holds files is written into only with ``--force``.

Writes go to a temporary file in the target's folder and are renamed over the target (:func:`atomic_write`);
the temporary is removed whatever fails, so a reader sees the old file or the new one, never half of one.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Callable, Iterable

from .errors import TracekitError

MANIFEST = "manifest.json"
TRACE_KINDS = ("routes", "loads")


def is_run_dir(folder: Path) -> bool:
    """True for a folder that holds a run: its manifest, or chunk files of a trace kind (a manifest-less run
    that was interrupted before its first manifest write is still a run)."""
    try:
        if (folder / MANIFEST).exists():
            return True
        return any(any((folder / kind).glob("part-*.parquet")) for kind in TRACE_KINDS if (folder / kind).is_dir())
    except OSError:
        return False


def enclosing_run(path: Path) -> Path | None:
    """The run directory that ``path`` is, or lies inside (after resolving symlinks), or None."""
    resolved = Path(os.path.abspath(path))
    try:
        resolved = resolved.resolve()
    except (OSError, RuntimeError):  # a symlink loop: judged on the literal path
        pass
    for folder in (resolved, *resolved.parents):
        if folder.is_dir() and is_run_dir(folder):
            return folder
    return None


def _check_common(path: Path, option: str) -> Path:
    path = Path(path)
    run = enclosing_run(path)
    if run is not None:
        where = "is the run directory" if Path(os.path.abspath(path)).resolve() == run else f"is inside the run directory {run}"
        raise TracekitError(f"{option} {path} {where}; runs are written only by collect/import: choose a path outside it")
    for parent in Path(os.path.abspath(path)).parents:
        if parent.exists() and not parent.is_dir():
            raise TracekitError(f"{option} {path}: {parent} is a file, not a folder; choose another path")
    return path


def check_file(path: Path | str, *, force: bool, option: str) -> Path:
    """Check that ``path`` may be written as a file (see the module docstring); return it as a Path."""
    path = _check_common(Path(path), option)
    if path.is_symlink() and not path.exists():
        raise TracekitError(f"{option} {path} is a dangling symlink; remove it or choose another path")
    if path.exists():
        if path.is_dir():
            raise TracekitError(f"{option} {path} is a folder; give a file path")
        if not stat.S_ISREG(path.stat().st_mode):
            raise TracekitError(f"{option} {path} is not a regular file; give a file path")
        if not force:
            raise TracekitError(f"{option} {path} exists; pass --force to replace it")
    return path


def check_folder(path: Path | str, *, force: bool, option: str, names: Iterable[str] | None = None) -> Path:
    """Check that ``path`` may be used as an output folder: not a file; if it exists and holds files, only with
    ``force``. With ``names``, only those files are checked (the ones the command will write)."""
    path = _check_common(Path(path), option)
    if path.exists():
        if not path.is_dir():
            raise TracekitError(f"{option} {path} is a file; give a folder")
        try:
            held = [p.name for p in path.iterdir()]
        except OSError as exc:
            raise TracekitError(f"{option} {path}: cannot list the folder ({exc.strerror})") from None
        clash = [n for n in held if names is None or n in set(names)]
        if clash and not force:
            shown = ", ".join(sorted(clash)[:3]) + (", ..." if len(clash) > 3 else "")
            raise TracekitError(f"{option} {path} already holds files ({shown}); pass --force to write into it")
        for n in (names or ()):
            if (path / n).is_dir():
                raise TracekitError(f"{option} {path}: {path / n} is a folder; remove it or choose another folder")
    return path


def distinct(*targets: tuple[str, Path | None]) -> None:
    """One line if two output options name the same path (the second write would replace the first)."""
    seen: dict[str, str] = {}
    for option, p in targets:
        if p is None:
            continue
        key = os.path.abspath(p)
        if key in seen:
            raise TracekitError(f"{seen[key]} and {option} name the same path {p}; give each its own")
        seen[key] = option


def atomic_write(path: Path | str, write: Callable[[str], None]) -> Path:
    """Create ``path``'s folder if needed, call ``write(tmp_path)``, then rename the temporary over ``path``: the
    store's one mechanism (:func:`tracekit.atomic.atomic_write_path`: fsync, temporary removed on any failure
    including Ctrl-C, the file created with the process umask)."""
    from .atomic import atomic_write_path

    atomic_write_path(path, lambda tmp: write(str(tmp)))
    return Path(path)


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
