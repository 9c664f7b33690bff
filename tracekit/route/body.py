"""Request bodies: what the router reads (prompt text, an existing rank) and the one field it adds.

The body is forwarded byte for byte except for one inserted member: ``"routed_dp_rank":N`` goes just before the
object's closing brace (``,`` first when the object has members). Inserting at the end rather than the start
matters when the client sent ``"routed_dp_rank": null``: JSON parsers SGLang uses (Python's ``json``, which FastAPI
and pydantic read bodies with) keep the *last* duplicate key, so the inserted rank wins over the null.
The body must parse as a JSON object first (:func:`parse_object`), so the closing brace is the last non-space byte.
"""
from __future__ import annotations

import json
from typing import Any

RANK_FIELD = "routed_dp_rank"  # SGLang >= 0.5.23; ``data_parallel_rank`` is its deprecated alias
ALIAS_FIELD = "data_parallel_rank"
RANK_HEADER = "X-Data-Parallel-Rank"  # SGLang's OpenAI-compatible endpoints read it too (it overrides the body)
_SPACE = b" \t\r\n"


class BadRequest(ValueError):
    """A request the proxy refuses (400): the message is one line that says what is wrong."""


def parse_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object; :class:`BadRequest` for an empty body, invalid JSON or a non-object."""
    if not raw.strip(_SPACE):
        raise BadRequest("empty body; send a JSON object")
    try:
        obj = json.loads(raw)
    except UnicodeDecodeError:
        raise BadRequest("body is not UTF-8 JSON") from None
    except json.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise BadRequest("JSON nested too deeply") from None
    except ValueError as exc:  # e.g. an integer longer than Python's int-string limit (4300 digits)
        raise BadRequest(f"JSON value out of range: {str(exc).splitlines()[0][:120]}") from None
    if not isinstance(obj, dict):
        raise BadRequest(f"body is a JSON {type(obj).__name__}, expected an object")
    if not raw.rstrip(_SPACE).endswith(b"}"):  # UTF-16/32 JSON parses too, but the rank is inserted as UTF-8
        raise BadRequest("body is not UTF-8 JSON")
    return obj


def carried_rank(obj: dict[str, Any], header: str | None) -> int | None:
    """The rank a request already carries (header, then ``routed_dp_rank``, then ``data_parallel_rank``), or None.

    :class:`BadRequest` when a given rank is not an integer.
    """
    for where, v in ((RANK_HEADER, header), (RANK_FIELD, obj.get(RANK_FIELD)), (ALIAS_FIELD, obj.get(ALIAS_FIELD))):
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, str)):
            raise BadRequest(f"{where} must be an integer DP rank, got {json.dumps(v)[:40]}")
        try:
            return int(v)
        except ValueError:
            raise BadRequest(f"{where} must be an integer DP rank, got {str(v)[:40]!r}") from None
    return None


def insert_rank(raw: bytes, obj: dict[str, Any], rank: int) -> bytes:
    """``raw`` with ``"routed_dp_rank":rank`` added as the object's last member; every other byte unchanged."""
    end = len(raw.rstrip(_SPACE))  # raw parsed as an object, so raw[end - 1] is its closing brace
    member = b'"%s":%d' % (RANK_FIELD.encode(), int(rank))
    sep = b"," if obj else b""
    return raw[: end - 1] + sep + member + raw[end - 1 :]


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def prompt_texts(path: str, obj: dict[str, Any]) -> list[str]:
    """The prompt text(s) of a request, what the classifier reads; [] when it has none (token ids only).

    ``/generate``: ``text`` (a string or a batch list); ``/v1/completions``: ``prompt`` (string or list of strings);
    ``/v1/chat/completions``: the user messages' text, joined (one conversation = one text).
    """
    if path == "/v1/chat/completions":
        msgs = obj.get("messages")
        if not isinstance(msgs, list):
            return []
        text = "\n".join(_content_text(m.get("content")) for m in msgs if isinstance(m, dict) and m.get("role") == "user")
        return [text] if text.strip() else []
    v = obj.get("text") if path == "/generate" else obj.get("prompt")
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and v and all(isinstance(x, str) for x in v):
        return list(v)
    return []
