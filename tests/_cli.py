"""Running the CLI in-process from a test: exit code (and captured output)."""
from __future__ import annotations

import pytest

from tracekit.cli import main


def run_cli(args) -> int:
    """``tracekit ARGS...`` in this process; returns the exit code."""
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def cli(capsys, *argv) -> tuple[int, str, str]:
    """``tracekit ARGV...`` in this process; returns (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
        raise SystemExit(0)
    cap = capsys.readouterr()
    return exc.value.code or 0, cap.out, cap.err
