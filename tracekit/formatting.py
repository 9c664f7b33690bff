"""How one value reads in a table cell, the same in the terminal (``tracekit query``) and in the HTML report.

A leaf module: the CLI and the report both import it, neither imports the other for it.
"""
from __future__ import annotations

import math


def format_cell(v) -> str:
    """``None`` -> ``NULL``, floats to 4 significant digits (6 from a million up), NaN -> ``nan``, else ``str``."""
    if v is None:
        return "NULL"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}" if abs(v) < 1e6 else f"{v:.6g}"
    return str(v)
