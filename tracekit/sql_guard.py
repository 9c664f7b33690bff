"""Is a statement read-only? Decided on DuckDB's parsed statement tree, never on its leading keyword: a SELECT
whose every query node (CTEs, subqueries, set operations included) is a SELECT, or an EXPLAIN [ANALYZE] of one.
``WITH x AS (DELETE ... RETURNING 1) SELECT ...`` or ``EXPLAIN ANALYZE CREATE ...`` are refused in one line.
"""
from __future__ import annotations

import json
from typing import Iterator

import duckdb

from .errors import TracekitError

_SELECT_NODES = frozenset({"SELECT_NODE", "SET_OPERATION_NODE", "RECURSIVE_CTE_NODE", "CTE_NODE"})


_HINTS = ("Did you mean", "Candidate bindings", "Candidate")


def first_line(exc: BaseException) -> str:
    """The error's first line, with DuckDB's own hint ("Did you mean ...", candidate columns) kept on it."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    lines = text.splitlines()
    hints = [ln.strip() for ln in lines[1:] if ln.strip().startswith(_HINTS)]
    return " ".join([lines[0], *hints])


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Refuse (TracekitError) anything but SELECT / EXPLAIN statements; also catches syntax errors."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise TracekitError(f"invalid SQL: {first_line(exc)}") from None
    if not statements:
        raise TracekitError("empty SQL: give a SELECT statement over routes, choices, requests, runs or loads")
    for st in statements:
        _check_statement(con, st, st.query)


def _refuse(kind: str) -> None:
    raise TracekitError(f"{kind} statements are not allowed: traces are read-only; use SELECT "
                        "(and --format/-o to save a result)")


def _check_statement(con: duckdb.DuckDBPyConnection, st, text: str, depth: int = 0) -> None:
    """Refuse ``st`` unless its parsed tree is read-only: a SELECT whose every query node is a SELECT, or an
    EXPLAIN [ANALYZE] of such a SELECT."""
    if st.type == duckdb.StatementType.EXPLAIN:
        inner = _explained(text)
        try:
            inner_sts = con.extract_statements(inner) if inner and depth < 4 else []
        except duckdb.Error:
            inner_sts = []
        if len(inner_sts) != 1:
            raise TracekitError("EXPLAIN: cannot tell which statement it explains; EXPLAIN a single SELECT")
        _check_statement(con, inner_sts[0], inner_sts[0].query, depth + 1)
        return
    if st.type != duckdb.StatementType.SELECT:
        _refuse(str(st.type).rsplit(".", 1)[-1])
    try:
        tree = json.loads(con.execute("SELECT json_serialize_sql(?)", [text]).fetchall()[0][0])
    except (duckdb.Error, ValueError, TypeError) as exc:
        raise TracekitError(f"cannot check the statement: {first_line(exc)}") from None
    if tree.get("error"):
        raise TracekitError(f"cannot check the statement: {tree.get('error_message', 'unknown')}")
    for node_type in _node_types(tree):
        if node_type not in _SELECT_NODES:
            _refuse(node_type.removesuffix("_NODE").removesuffix("_QUERY") + " (inside a SELECT)")


def _node_types(tree) -> Iterator[str]:
    """Every query-node type (``..._NODE``) anywhere in a serialized statement tree."""
    stack = [tree]
    while stack:
        x = stack.pop()
        if isinstance(x, dict):
            t = x.get("type")
            if isinstance(t, str) and t.endswith("_NODE"):
                yield t
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)


def _explained(text: str) -> str | None:
    """The statement an ``EXPLAIN [ANALYZE] [(options)]`` statement explains, as text (None if not found)."""
    try:
        tokens = duckdb.tokenize(text)
    except Exception:  # noqa: BLE001 - any tokenizer failure: we cannot tell, refuse
        return None
    i, depth = 0, 0
    words = [(pos, text[pos:(tokens[j + 1][0] if j + 1 < len(tokens) else len(text))].strip())
             for j, (pos, _) in enumerate(tokens)]
    while i < len(words):
        pos, w = words[i]
        lw = w.lower()
        if depth == 0 and lw in ("explain", "analyze", "analyse"):
            i += 1
            continue
        if w == "(" or (w.startswith("(") and depth == 0 and i and words[i - 1][1].lower() in ("explain", "analyze", "analyse")):
            depth += w.count("(") - w.count(")")
            i += 1
            continue
        if depth > 0:
            depth += w.count("(") - w.count(")")
            i += 1
            continue
        return text[pos:]
    return None
