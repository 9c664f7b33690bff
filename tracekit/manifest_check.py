"""Type checks for a run's ``manifest.json`` as read back from disk (it may be hand-edited or another tool's).

:func:`check_manifest` raises one :class:`~tracekit.errors.TracekitError` line naming the file, the field and
what it must be, for every field that readers use (``info``, the query views, analyses, placement). It checks
types and ranges only; whether the chunk files match the manifest is the store's integrity check.
"""
from __future__ import annotations

from typing import Any

from .errors import TracekitError
from .schema import KINDS, check_version, geometry_size_problem

_FIX = "restore the file, or collect/import the run again"
# Geometry limits for values read from files or typed on the command line. Real models have < 200 layers and
# <= 512 routed experts; the limits are far above that but keep E- or L-sized arrays from reaching GiBs on a typo.
MAX_LAYERS = 4096
MAX_EXPERTS = 65536
_MAX_LAYER = MAX_LAYERS
_MAX_EXPERTS = MAX_EXPERTS


#: the content hash every chunk record carries
CHECKSUM = "sha256"


def is_int(x: Any) -> bool:
    """An int that is not a bool (JSON's true/false parse as Python bools, which are ints)."""
    return isinstance(x, int) and not isinstance(x, bool)


def check_manifest(m: Any, where: str) -> None:
    """One line unless ``m`` (the parsed manifest at ``where``) has the types and ranges readers rely on.

    The one validator of a manifest read back from disk: every reader (:func:`tracekit.store.open_run`, ``info``,
    ``collect``'s resume) calls it. Checks the schema version, types and ranges; whether the chunk files match the
    manifest is the store's integrity check."""
    if not isinstance(m, dict):
        raise TracekitError(f"{where}: not a tracekit manifest (a manifest is a JSON object, not "
                            f"{type(m).__name__}); {_FIX}")
    check_version(m.get("schema_version"), str(where))

    def bad(field: str, want: str) -> TracekitError:
        return TracekitError(f"{where}: field {field!r} must be {want}; {_FIX}")

    if not isinstance(m.get("run_id"), str):
        raise bad("run_id", "a string")
    for field in ("kind", "source", "status", "tracekit_version", "created_at", "finished_at"):
        if m.get(field) is not None and not isinstance(m[field], str):
            raise bad(field, "a string")
    if m.get("kind", "routes") not in KINDS:
        raise bad("kind", " or ".join(KINDS))
    for field in ("model", "dataset", "args", "totals"):
        if m.get(field) is not None and not isinstance(m[field], dict):
            raise bad(field, "an object")
    for section, key in (("model", "name"), ("model", "hub_id"), ("model", "revision"), ("dataset", "name"),
                         ("dataset", "domain"), ("dataset", "hub_id")):
        value = (m.get(section) or {}).get(key)
        if value is not None and not isinstance(value, str):
            raise bad(f"{section}.{key}", "a string")
    prompts = (m.get("dataset") or {}).get("prompts")
    if prompts is not None and not (is_int(prompts) and prompts >= 0):
        raise bad("dataset.prompts", "a non-negative integer")
    notes = m.get("notes")
    if notes is not None and not (isinstance(notes, list) and all(isinstance(n, str) for n in notes)):
        raise bad("notes", "a list of strings")
    chunks = m.get("chunks")
    if chunks is not None and not (isinstance(chunks, dict) and all(
            isinstance(rec, dict) and is_int(rec.get("rows")) and is_int(rec.get("bytes"))
            and isinstance(rec.get(CHECKSUM), str) for rec in chunks.values())):
        raise TracekitError(f"{where}: field 'chunks' must map files to {{rows, bytes, sha256}}; {_FIX}")
    tot = m.get("totals") or {}
    if not all(isinstance(t, dict) and all(is_int(t[k]) for k in ("rows", "bytes", "requests", "prompt_tokens",
                                                                   "generated_tokens") if k in t)
               for t in tot.values()):
        raise bad("totals", "an object of per-table counts")
    g = m.get("geometry")
    if g is None:
        return
    if not isinstance(g, dict):
        raise bad("geometry", "an object")
    moe = g.get("moe_layers")
    if moe is not None and not (isinstance(moe, list) and all(is_int(x) and 0 <= x < _MAX_LAYER for x in moe)):
        raise bad("geometry.moe_layers", f"a list of layer indices in 0..{_MAX_LAYER - 1}")
    for key, lo, hi in (("num_layers", 1, _MAX_LAYER), ("num_experts", 1, _MAX_EXPERTS), ("top_k", 1, _MAX_EXPERTS),
                        ("n_group", 0, _MAX_EXPERTS), ("topk_group", 0, _MAX_EXPERTS),
                        ("n_shared_experts", 0, _MAX_EXPERTS)):
        v = g.get(key)
        if v is not None and not (is_int(v) and lo <= v <= hi):
            raise bad(f"geometry.{key}", f"an integer in {lo}..{hi}")
    sizes = geometry_size_problem(g)
    if sizes:
        raise bad(*sizes)
    for key in ("family", "model_type", "router_class", "scoring"):
        if g.get(key) is not None and not isinstance(g[key], str):
            raise bad(f"geometry.{key}", "a string")
