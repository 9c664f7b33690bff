"""Router geometry for imports: what ``--model NAME_OR_GEOMETRY`` (plus explicit flags) resolves to.

Engine dumps hold expert ids but not the model's layout, so every importer needs the geometry of the model that
produced them: which layers are MoE, how many routed experts, the top-k. :func:`resolve_model` is the one place
that turns the user's input into ``(model_name, geometry)``:

- a registry name (``deepseek-v3``, ``qwen3-235b-a22b`` ...) -> the registry's published geometry;
- a geometry string ``experts=256,top_k=8,moe_layers=3-60,num_layers=61[,name=my-model]``;
- explicit keyword overrides (the CLI's ``--num-experts --top-k --moe-layers --num-layers``), which win over both.

The model's sizes (``hidden_size``, ``moe_intermediate_size``, ``expert_dtype``: what the placement's step time
needs) come the same way: the registry's, the geometry string's (``hidden=4096,intermediate=14336,dtype=bf16``) or
the flags ``--hidden-size --moe-intermediate-size --expert-dtype`` (:func:`size_overrides`); null when none says.
"""
from __future__ import annotations

from typing import Any

from ..errors import TracekitError

GEOMETRY_KEYS = ("family", "num_layers", "moe_layers", "num_experts", "top_k", "n_group", "topk_group",
                 "n_shared_experts", "scoring", "hidden_size", "moe_intermediate_size", "expert_dtype")
_ALIASES = {"experts": "num_experts", "e": "num_experts", "num_experts": "num_experts", "k": "top_k", "top_k": "top_k",
            "topk": "top_k", "moe_layers": "moe_layers", "layers": "num_layers", "num_layers": "num_layers",
            "name": "name", "hidden": "hidden_size", "hidden_size": "hidden_size", "intermediate": "moe_intermediate_size",
            "moe_intermediate_size": "moe_intermediate_size", "dtype": "expert_dtype", "expert_dtype": "expert_dtype"}


_LAYER_LIMIT = (1 << 15) - 1  # the layer column is int16 (tracekit.schema)


def parse_layers(spec: str | list[int] | range | None) -> list[int] | None:
    """``"3-60"``, ``"0,2,4"``, ``"1-47:2"`` (range with step) or a list -> sorted unique layer indices."""
    if spec is None:
        return None
    if not isinstance(spec, str):
        out = {int(x) for x in spec}
        if out and (min(out) < 0 or max(out) > _LAYER_LIMIT):
            raise TracekitError(f"bad layer list; layer indices are 0..{_LAYER_LIMIT}")
        return sorted(out)
    out: set[int] = set()
    for part in spec.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            step = 1
            if ":" in part:
                part, s = part.split(":", 1)
                step = int(s)
            if "-" in part:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if hi < lo or step < 1 or hi > _LAYER_LIMIT:
                    raise ValueError
                out.update(range(lo, hi + 1, step))
            else:
                if int(part) > _LAYER_LIMIT:
                    raise ValueError
                out.add(int(part))
        except ValueError:
            raise TracekitError(f"bad layer list {spec!r}; write ranges like 3-60, lists like 0,2,4 or 1-47:2 "
                               f"(layers 0..{_LAYER_LIMIT})") from None
    if not out or min(out) < 0:
        raise TracekitError(f"bad layer list {spec!r}; layer indices are non-negative integers")
    return sorted(out)


def _parse_geometry_string(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, _, value = item.partition("=")
        key = _ALIASES.get(key.strip().lower())
        if key is None or not value.strip():
            raise TracekitError(
                f"bad geometry {text!r}; write experts=256,top_k=8,moe_layers=3-60,num_layers=61 (or a registry name)"
            )
        out[key] = value.strip()
    return out


def size_overrides(hidden_size: Any = None, moe_intermediate_size: Any = None, expert_dtype: Any = None) -> dict[str, Any]:
    """The given model sizes, validated (one-line error naming the flag), as geometry fields; None ones left out."""
    from ..schema import EXPERT_DTYPE_BYTES, MAX_MODEL_WIDTH, expert_dtype_name

    out: dict[str, Any] = {}
    for key, flag, value in (("hidden_size", "--hidden-size", hidden_size),
                             ("moe_intermediate_size", "--moe-intermediate-size", moe_intermediate_size)):
        if value is None:
            continue
        try:
            width = int(str(value).strip())
        except ValueError:
            width = 0
        if not 1 <= width <= MAX_MODEL_WIDTH:
            raise TracekitError(f"{flag} must be an integer in 1..{MAX_MODEL_WIDTH}, got {value!r}")
        out[key] = width
    if expert_dtype is not None:
        name = expert_dtype_name(expert_dtype)
        if name is None:
            raise TracekitError(f"--expert-dtype {expert_dtype!r} unknown; use one of {', '.join(EXPERT_DTYPE_BYTES)}")
        out["expert_dtype"] = name
    return out


def registry_geometry(name: str) -> dict[str, Any] | None:
    """Published geometry of a registry model, or None when the name is not in the registry."""
    try:
        from ..models import REGISTRY
    except ImportError:  # registry not available: explicit geometry only
        return None
    spec = REGISTRY.get(name)
    if spec is None:
        return None
    geo = dict(spec.geometry or {})
    geo.setdefault("family", spec.family)
    return geo


def registry_hub_id(name: str | None) -> str | None:
    """The checkpoint id of a registry model (None for tiny presets, hub ids and unknown names)."""
    from ..models import REGISTRY

    spec = REGISTRY.get(name or "")
    return spec.hub_id if spec else (name if name and "/" in name else None)


def resolve_model(
    model: str | None,
    *,
    num_experts: int | None = None,
    top_k: int | None = None,
    moe_layers: str | list[int] | None = None,
    num_layers: int | None = None,
    hidden_size: int | None = None,
    moe_intermediate_size: int | None = None,
    expert_dtype: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """Resolve ``--model`` and the geometry flags to ``(model_name, geometry)``; one-line error if incomplete.

    ``geometry`` has every key of :data:`GEOMETRY_KEYS` (unknown ones are None); ``moe_layers`` is a sorted list
    of absolute layer indices, ``num_layers`` defaults to ``max(moe_layers) + 1``.
    """
    geo: dict[str, Any] = {k: None for k in GEOMETRY_KEYS}
    name = model
    if model and "=" in model:
        parsed = _parse_geometry_string(model)
        name = parsed.pop("name", None)
        geo.update(parsed)
    elif model:
        reg = registry_geometry(model)
        if reg:
            geo.update({k: v for k, v in reg.items() if k in geo})
    overrides = {"num_experts": num_experts, "top_k": top_k, "moe_layers": moe_layers, "num_layers": num_layers}
    geo.update({k: v for k, v in overrides.items() if v is not None})
    geo.update(size_overrides(geo.get("hidden_size"), geo.get("moe_intermediate_size"), geo.get("expert_dtype")))
    geo.update(size_overrides(hidden_size, moe_intermediate_size, expert_dtype))
    missing = [k for k in ("num_experts", "top_k", "moe_layers") if geo.get(k) in (None, [], "")]
    if missing:
        flags = " ".join(f"--{k.replace('_', '-')}" for k in missing)
        what = f"model {model!r} has no published geometry" if model else "no --model given"
        raise TracekitError(f"{what}; give a registry name (see `tracekit models`) or {flags}")
    try:
        geo["num_experts"] = int(geo["num_experts"])
        geo["top_k"] = int(geo["top_k"])
        geo["moe_layers"] = parse_layers(geo["moe_layers"])
        geo["num_layers"] = int(geo["num_layers"]) if geo.get("num_layers") is not None else max(geo["moe_layers"]) + 1
    except (TypeError, ValueError):
        raise TracekitError(f"bad geometry for {model!r}: experts, top_k and num_layers must be integers") from None
    from .numbers import LAYER_MAX, MAX_EXPERTS

    if not 1 <= geo["num_experts"] <= MAX_EXPERTS:
        raise TracekitError(f"bad geometry: experts={geo['num_experts']} is outside 1..{MAX_EXPERTS}")
    if not 1 <= geo["num_layers"] <= LAYER_MAX + 1:
        raise TracekitError(f"bad geometry: num_layers={geo['num_layers']} is outside 1..{LAYER_MAX + 1}")
    if geo["num_experts"] < 1 or not 1 <= geo["top_k"] <= geo["num_experts"]:
        raise TracekitError(f"bad geometry: need 1 <= top_k ({geo['top_k']}) <= experts ({geo['num_experts']})")
    if max(geo["moe_layers"]) >= geo["num_layers"]:
        raise TracekitError(
            f"bad geometry: MoE layer {max(geo['moe_layers'])} is outside num_layers={geo['num_layers']}"
        )
    if not name:
        name = f"moe-E{geo['num_experts']}-k{geo['top_k']}-L{geo['num_layers']}"
    return name, geo
