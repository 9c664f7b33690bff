"""Reading JSON Lines with one-line errors that name the file and line (shared by every JSONL reader)."""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any, Iterator

from .errors import TracekitError


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
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    yield n, json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    raise TracekitError(f"{path}:{n}: not UTF-8 text; is this a JSONL file?") from None
                except json.JSONDecodeError as exc:
                    raise TracekitError(f"{path}:{n}: malformed JSON ({exc.msg}); the file may be truncated") from None
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
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TracekitError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); {fix}") from None
    except UnicodeDecodeError:
        raise TracekitError(f"{path}: not UTF-8 text; {fix}") from None
