"""Checks of every number an importer reads, against the column it lands in (:mod:`tracekit.schema`).

Engine dumps and JSON records are untrusted: a value that does not fit its column would otherwise wrap silently
when numpy casts it (a position of 2**32 + 5 stored as 5, a prompt start of 2**31 as -2**31), a boolean would pass
as 0/1, and a huge expert id would make the derived expert count absurd. Every check raises
:class:`~tracekit.errors.TracekitError` with the place (``file:line`` or ``file record i``), the field and the
allowed range: one line, and the import writes nothing.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import TracekitError

INT16_MAX = (1 << 15) - 1
INT32_MAX = (1 << 31) - 1
#: column ranges (inclusive) of the routes and loads tables
POSITION_MAX = INT32_MAX  # routes.position int32
STEP_MAX = INT32_MAX  # routes.step int32
REQUEST_MAX = INT32_MAX  # routes.request_id int32
TOKEN_ID_MAX = INT32_MAX  # routes.token_id int32
LAYER_MAX = INT16_MAX  # routes.layer / loads.layer int16
WINDOW_MAX = INT32_MAX  # loads.window int32
COUNT_MAX = 1 << 53  # loads.count is int64; counts are summed over ranks and used as float64: stay exact
#: the most routed experts an imported model may have: ids are stored as uint8/16/32, but every analysis and placement
#: allocates (E,) and (E, E) arrays, so an expert count derived from one bad id (2**40) must be refused, not used.
#: The largest published MoE models have a few hundred experts.
MAX_EXPERTS = 1 << 16


def check_int(value: Any, what: str, where: str, lo: int = 0, hi: int = INT32_MAX) -> int:
    """A JSON/Python scalar that must be an integer in ``lo..hi`` (booleans and fractional floats refused)."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if not ok and isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
        value, ok = int(value), True
    if not ok:
        raise TracekitError(f"{where}: {what} must be an integer in {lo}..{hi}, got {_show(value)}")
    value = int(value)
    if not lo <= value <= hi:
        raise TracekitError(f"{where}: {what} = {_show(value)} is outside {lo}..{hi}")
    return value


def check_int_list(values: Any, what: str, where: str, lo: int = 0, hi: int = INT32_MAX) -> list[int]:
    """A JSON list of integers in ``lo..hi``."""
    if not isinstance(values, list):
        raise TracekitError(f"{where}: {what} must be a list of integers, got {_show(values)}")
    return [check_int(v, f"{what}[{i}]", where, lo, hi) for i, v in enumerate(values)]


def check_weights(values: Any, k: int, what: str, where: str, dtype: str = "float32") -> list[float]:
    """A JSON list of ``k`` finite gate weights that fit ``dtype`` (float16 overflows past 65504)."""
    if not isinstance(values, list) or len(values) != k:
        raise TracekitError(f"{where}: {what} must be a list of {k} numbers, got {_show(values)}")
    limit = float(np.finfo(np.float16 if dtype == "float16" else np.float32).max)
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TracekitError(f"{where}: {what}[{i}] must be a number, got {_show(v)}")
        if not math.isfinite(v) or abs(v) > limit:
            raise TracekitError(f"{where}: {what}[{i}] = {_show(v)} is not a finite {dtype}")
    return [float(v) for v in values]


def check_array(a: np.ndarray, what: str, where: str, lo: int, hi: int) -> np.ndarray:
    """An integer array whose every value lies in ``lo..hi`` (its column's range), returned as int64."""
    if a.dtype.kind not in "iu":
        raise TracekitError(f"{where}: {what} holds {a.dtype}, expected integers")
    if a.size:
        mn, mx = int(a.min()), int(a.max())
        if mn < lo or mx > hi:
            bad = mn if mn < lo else mx
            raise TracekitError(f"{where}: {what} holds {bad}, outside {lo}..{hi}")
    return a.astype(np.int64, copy=False)


def check_num_experts(e: int, where: str) -> int:
    """An expert count given or derived (``max id + 1``) from the records: 1..MAX_EXPERTS."""
    if not 1 <= e <= MAX_EXPERTS:
        raise TracekitError(f"{where}: {e} experts (from the largest expert id) is more than tracekit supports "
                            f"({MAX_EXPERTS}); an expert id is wrong, or pass --num-experts")
    return e


def check_label(value: Any, what: str, where: str) -> str:
    """A text field (prompt id, dataset, domain): a string, or an integer id written as its decimal text."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise TracekitError(f"{where}: {what} must be a string or an integer id, got {_show(value)}")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
