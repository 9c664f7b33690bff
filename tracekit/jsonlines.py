"""Reading JSON and JSON Lines with one-line errors that name the file and line (shared by every JSON reader).

Strict about numbers: Python's ``json`` accepts ``NaN``, ``Infinity`` and ``-Infinity`` (not JSON) and turns
``1e999`` into ``inf``; here all of them are refused, and so is an integer too long for Python to convert, each
as one line naming ``file:line``. Numbers are checked against the schema's columns by the importers.
"""
from __future__ import annotations

import contextvars
import gzip
import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import TracekitError

#: the longest line :func:`iter_json_lines` reads (bytes, newline excluded): a line is parsed whole, so a newline-free
#: multi-GB file would otherwise be read into memory before any error (4.4 GB RSS for a 2 GB line, measured)
DEFAULT_MAX_LINE_BYTES = 64 << 20
_MAX_LINE = contextvars.ContextVar("tracekit_max_line_bytes", default=DEFAULT_MAX_LINE_BYTES)


@contextmanager
def max_line_bytes(limit: int | None) -> Iterator[None]:
    """Inside the block, JSON Lines readers accept lines up to ``limit`` bytes (None: the default, 64 MiB); the
    importers' ``--max-line-bytes``."""
    token = _MAX_LINE.set(int(limit) if limit else DEFAULT_MAX_LINE_BYTES)
    try:
        yield
    finally:
        _MAX_LINE.reset(token)


_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000 ** 2, "GB": 1000 ** 3, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30}


def parse_line_limit(text: str | int | None) -> int | None:
    """``--max-line-bytes``: bytes as a number or with a unit (``64MB``, ``1GiB``); one line when it is neither."""
    if text is None or isinstance(text, int):
        return text
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(text), re.IGNORECASE)
    if not m or float(m.group(1)) < 1:
        raise TracekitError(f"--max-line-bytes {text!r} is not a size; use e.g. 64MB or 1GB")
    value = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    if value < 1:
        raise TracekitError(f"--max-line-bytes {text!r} is not a size; use e.g. 64MB or 1GB")
    return value


def _bounded_lines(f, path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of a binary file, never holding more than the line limit + 1 bytes of one line."""
    cap = _MAX_LINE.get()
    n = 0
    while True:
        raw = f.readline(cap + 1)  # bounded: a longer line comes back cut at cap + 1 bytes, without its newline
        if not raw:
            return
        n += 1
        if len(raw) > cap and not raw.endswith(b"\n"):
            raise TracekitError(f"{path}:{n}: line longer than {cap:,} bytes (a JSON Lines file has one record per "
                                "line); raise the limit with --max-line-bytes if the records really are this long")
        yield n, raw


class _NumberError(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    raise _NumberError(f"{name} is not a JSON number; write a finite number or null")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _NumberError(f"number {text[:40]} is out of range (overflows to infinity)")
    return value


def loads_strict(text: str | bytes) -> Any:
    """``json.loads`` that refuses NaN, Infinity and numbers that overflow (raises ValueError)."""
    return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)


def _value_error(exc: ValueError) -> str:
    """One phrase for a ValueError raised while parsing a JSON text."""
    if isinstance(exc, json.JSONDecodeError):
        return f"malformed JSON ({exc.msg})"
    msg = str(exc)
    if "digits" in msg and "integer" in msg:  # sys.set_int_max_str_digits limit
        return "a number has too many digits"
    return msg


def iter_json_lines(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for every non-blank line of a ``.jsonl`` or ``.jsonl.gz`` file.

    A line that is not JSON (a truncated file, a stray byte) raises :class:`TracekitError` with ``file:line``.
    """
    path = Path(path)
    if not path.is_file():
        raise TracekitError(f"{path}: no such file")
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for n, raw in _bounded_lines(f, path):
                if not raw.strip():
                    continue
                try:
                    value = loads_strict(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    raise TracekitError(f"{path}:{n}: not UTF-8 text; is this a JSONL file?") from None
                except json.JSONDecodeError as exc:
                    raise TracekitError(f"{path}:{n}: malformed JSON ({exc.msg}); the file may be truncated") from None
                except (ValueError, RecursionError) as exc:
                    what = "nested too deeply" if isinstance(exc, RecursionError) else _value_error(exc)
                    raise TracekitError(f"{path}:{n}: {what}") from None
                yield n, value
    except (OSError, EOFError) as exc:  # a damaged .gz
        raise TracekitError(f"{path}: cannot read ({exc})") from None


def iter_json_objects(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Like :func:`iter_json_lines`, but every line must be a JSON object."""
    for n, value in iter_json_lines(path):
        if not isinstance(value, dict):
            raise TracekitError(f"{path}:{n}: expected a JSON object per line, got {type(value).__name__}")
        yield n, value


def read_json(path: str | Path, fix: str) -> Any:
    """A whole JSON file; one line naming the file, the parse error and ``fix`` (what the user should do)."""
    path = Path(path)
    try:
        return loads_strict(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TracekitError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); {fix}") from None
    except UnicodeDecodeError:
        raise TracekitError(f"{path}: not UTF-8 text; {fix}") from None
    except (ValueError, RecursionError) as exc:
        what = "nested too deeply" if isinstance(exc, RecursionError) else _value_error(exc)
        raise TracekitError(f"{path}: {what}; {fix}") from None
    except IsADirectoryError:
        raise TracekitError(f"{path} is a directory; {fix}") from None
    except OSError as exc:
        raise TracekitError(f"{path}: cannot read ({exc.strerror}); {fix}") from None


def check_format(d: Any, where: str, fmt: str, version: int, what: str, fix: str) -> None:
    """One line unless ``d`` is a JSON object of format ``fmt`` at a version this tracekit reads (<= ``version``).

    ``what``: the kind of file, for the message ("text classifier"); ``fix``: how to write a good one."""
    if not isinstance(d, dict) or d.get("format") != fmt:
        raise TracekitError(f"{where}: not a tracekit {what}; {fix}")
    try:
        v = int(d.get("version", 0))
    except (TypeError, ValueError):
        raise TracekitError(f"{where}: {what} version {d.get('version')!r} is not a number; {fix}") from None
    if v > version:
        raise TracekitError(f"{where}: {what} format v{v} is newer than this tracekit; upgrade tracekit")

