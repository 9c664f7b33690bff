"""Shared option pieces of the CLI: value domains checked at parse time, the --force flag, device checks.

Every numeric option gets a domain (typer ``min=``/``max=``, or a callback below for open bounds and finiteness),
and every option with a fixed set of values is a ``Literal`` so that typer lists the valid ones; a value outside
is one ``error:`` line before any work starts.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import typer

from ..errors import TracekitError
from ..manifest_check import MAX_EXPERTS, MAX_LAYERS  # noqa: F401  (re-exported for the command modules)

MAX_SEED = 2**32 - 1  # numpy's seed range
MAX_COUNT = 1_000_000_000


def positive_float(option: str, upper: float | None = None) -> Callable[[Optional[float]], Optional[float]]:
    """Callback: the value is a finite number > 0 (and <= ``upper``), or None."""

    def check(value: Optional[float]) -> Optional[float]:
        if value is None:
            return value
        if not math.isfinite(value) or value <= 0 or (upper is not None and value > upper):
            limit = f" and at most {upper:g}" if upper is not None else ""
            raise typer.BadParameter(f"{value!r} is not a finite number > 0{limit}", param_hint=f"'{option}'")
        return value

    return check


def force_option(what: str = "output files") -> bool:
    return typer.Option(False, "--force", help=f"Overwrite {what} if present.")


def check_device_map(device_map: str | None) -> None:
    """One line, before any model loads, for a device map that asks for a GPU this machine does not have."""
    if device_map is None:
        return
    dm = device_map.strip().lower()
    named = ("auto", "balanced", "balanced_low_0", "sequential", "cpu")
    if dm in named:
        return
    index: int | None = None
    if dm == "cuda":
        index = 0
    elif dm.startswith("cuda:") and dm[5:].isdigit():
        index = int(dm[5:])
    elif dm.isdigit():
        index = int(dm)
    if index is None:
        raise TracekitError(f"--device-map {device_map!r} unknown; use {', '.join(named)}, cuda or cuda:N")
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise TracekitError(f"--device-map {device_map}: no CUDA GPU is visible on this machine; use --device-map cpu")
    if index >= count:
        raise TracekitError(f"--device-map {device_map}: this machine has {count} CUDA GPU(s) (cuda:0..cuda:{count - 1})")


def server_url(value: Optional[str]) -> Optional[str]:
    """Callback: --server is an http(s) URL with a host, e.g. http://10.0.0.5:30000."""
    if value is None:
        return value
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018  (raises ValueError for a port out of range or not a number)
    except ValueError as exc:
        raise typer.BadParameter(f"{value!r} is not a URL ({exc})", param_hint="'--server'") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise typer.BadParameter(f"{value!r} is not an http(s) URL with a host, e.g. http://127.0.0.1:30000",
                                 param_hint="'--server'")
    return value


def _manifest_files(runs) -> list:
    """The manifest.json files that :func:`tracekit.query.resolve_runs` would open for ``runs`` (directories,
    globs, folders of runs one or two levels down)."""
    import glob
    from pathlib import Path

    from ..store import MANIFEST

    found = []
    for item in runs:
        s = str(item)
        for m in ([Path(p) for p in sorted(glob.glob(s))] if glob.has_magic(s) else [Path(s)]):
            if (m / MANIFEST).is_file():
                found.append(m / MANIFEST)
            elif m.is_dir():
                found += sorted(m.glob(f"*/{MANIFEST}")) + sorted(m.glob(f"*/*/{MANIFEST}"))
    return found


def check_runs(runs) -> None:
    """Type-check the manifests of the runs a command reads before the library opens them, so a hand-edited
    manifest is one line naming the file and the field (a run that is missing is the library's one line)."""
    from ..jsonlines import read_json
    from ..manifest_check import check_manifest

    for path in _manifest_files(runs):
        check_manifest(read_json(path, "restore or remove it"), str(path))
