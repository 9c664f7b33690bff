"""Progress for long commands, on stderr: a spinner with what is happening, or a bar with an ETA.

Neutral helpers any command (analyze, report, import, place, diff) can use. They draw only when stderr is a
terminal (nothing in pipes, logs and tests) and are no-ops otherwise; ``TRACEKIT_PROGRESS=0`` turns them off,
``=1`` forces them on. The library reports progress through :func:`current`, so a command wraps its work in
:func:`task` and the code underneath advances whatever bar is open without knowing about the CLI.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Iterator

_local = threading.local()


def enabled() -> bool:
    flag = os.environ.get("TRACEKIT_PROGRESS")
    if flag in ("0", "1"):
        return flag == "1"
    return sys.stderr.isatty()


class Bar:
    """What the library sees: ``describe(text)``, ``total(n)``, ``advance(n)``. A plain Bar does nothing."""

    def describe(self, text: str) -> None:
        pass

    def total(self, n: float | None) -> None:
        pass

    def advance(self, n: float = 1) -> None:
        pass


class _RichBar(Bar):
    def __init__(self, progress, task_id):
        self.p, self.id = progress, task_id

    def describe(self, text: str) -> None:
        self.p.update(self.id, description=text)

    def total(self, n: float | None) -> None:
        self.p.update(self.id, total=n, completed=0)
        if n is not None:
            self.p.reset(self.id, total=n)  # the ETA starts from here, not from the spinner's start

    def advance(self, n: float = 1) -> None:
        self.p.advance(self.id, n)


def current() -> Bar:
    """The bar of the innermost :func:`task` of this thread (a no-op Bar when there is none)."""
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else Bar()


@contextlib.contextmanager
def task(description: str, total: float | None = None, unit: str = "") -> Iterator[Bar]:
    """Show ``description`` with a bar (when ``total`` is known, with an ETA) or a spinner; yields the Bar."""
    if not enabled():
        bar: Bar = Bar()
        _push(bar)
        try:
            yield bar
        finally:
            _local.stack.pop()
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn(unit), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=True, refresh_per_second=4,
                  speed_estimate_period=60) as p:
        bar = _RichBar(p, p.add_task(description, total=total))
        _push(bar)
        try:
            yield bar
        finally:
            _local.stack.pop()


def status(description: str):
    """A spinner with ``description`` for work whose size is unknown (same as ``task`` without a total)."""
    return task(description)


def _push(bar: Bar) -> None:
    if not hasattr(_local, "stack"):
        _local.stack = []
    _local.stack.append(bar)


def numba_note() -> None:
    """Say once per process, when the analyses' kernels are about to compile for the first time on this machine,
    that this takes a while (numba caches the result, so later runs start at once)."""
    if getattr(_local, "numba_said", False):
        return
    _local.numba_said = True
    try:
        from .analysis import kernels
    except ImportError:
        return
    cache = os.path.join(os.path.dirname(kernels.__file__), "__pycache__")
    if enabled() and not (os.path.isdir(cache) and any(n.startswith("kernels.") and n.endswith(".nbi")
                                                       for n in os.listdir(cache))):
        current().describe("compiling the analysis kernels (first run on this machine, cached afterwards)")
