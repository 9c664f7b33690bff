"""The memory budget of an analysis: one number (``--memory-budget 2GB``) split between DuckDB and numpy.

DuckDB gets ``DUCKDB_SHARE`` of it as its ``memory_limit`` (it spills beyond that); the arrays the analyses hold
at one time (one batch of per-request counts, the correlation partner pool, the classifier sample) are sized
from ``NUMPY_SHARE`` of it. The rest is headroom for the interpreter and its libraries (~0.3 GB) and for Arrow
record batches in flight. The budget bounds the working memory, not the result tables, which have one row per
request and layer for the correlation (the per-request result itself).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import TracekitError

DEFAULT_BUDGET = "2GB"
DUCKDB_SHARE = 0.3
NUMPY_SHARE = 0.4
MIN_BYTES = 64 << 20

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}


def parse_size(text: str | int) -> int:
    """'2GB', '512MiB', '1.5 GB' or a number of bytes -> bytes (one-line error for anything else)."""
    if isinstance(text, int) and not isinstance(text, bool):
        n = text
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        unit = m.group(2).upper() if m else None
        if not m or unit not in _UNITS:
            raise TracekitError(f"memory budget {text!r} not understood; give a size like 2GB, 512MB or 1.5GiB")
        n = int(float(m.group(1)) * _UNITS[unit])
    if n < MIN_BYTES:
        raise TracekitError(f"memory budget {text!r} is below the minimum of 64MiB (67.1MB); give a larger --memory-budget")
    return n


@dataclass(frozen=True)
class MemoryBudget:
    total: int

    @classmethod
    def of(cls, budget: "MemoryBudget | str | int | None") -> "MemoryBudget":
        if isinstance(budget, MemoryBudget):
            return budget
        return cls(parse_size(DEFAULT_BUDGET if budget is None else budget))

    @property
    def duckdb_limit(self) -> str:
        """DuckDB's ``memory_limit`` setting."""
        return f"{max(32, int(self.total * DUCKDB_SHARE) >> 20)}MiB"

    @property
    def arrays(self) -> int:
        """Bytes of numpy arrays an analysis may hold at one time."""
        return int(self.total * NUMPY_SHARE)

    def __str__(self) -> str:
        return f"{self.total / 1e9:.3g} GB"
