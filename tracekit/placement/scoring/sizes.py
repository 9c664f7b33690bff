"""The model sizes the step time needs, from the traces' geometry, the user's flags, or stated defaults.

:func:`model_sizes` resolves ``hidden_size``, ``moe_intermediate_size`` and ``expert_dtype`` (flag > geometry >
default) and lists every size it had to default; :func:`assumed_line` turns that list into the one line
``tracekit place`` prints. Defaults are DeepSeek V3's widths (7168, 2048) with BF16 expert weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...errors import TracekitError
from ...schema import EXPERT_DTYPE_BYTES, MAX_MODEL_WIDTH, expert_dtype_name

DEFAULT_HIDDEN = 7168  # DeepSeek V3's hidden_size
DEFAULT_MOE_INTERMEDIATE = 2048  # DeepSeek V3's moe_intermediate_size
DEFAULT_EXPERT_DTYPE = "bfloat16"
_FLAGS = {"hidden_size": "--hidden-size", "moe_intermediate_size": "--moe-intermediate-size",
          "expert_dtype": "--expert-dtype"}


@dataclass(frozen=True)
class ModelSizes:
    hidden_size: int
    moe_intermediate_size: int
    expert_dtype: str
    #: the fields above that were defaulted (neither given nor in the geometry), in field order
    assumed: tuple[str, ...] = ()

    @property
    def weight_bytes(self) -> float:
        """Bytes per expert weight."""
        return EXPERT_DTYPE_BYTES[self.expert_dtype]

    @property
    def expert_bytes(self) -> float:
        """Bytes of one routed expert's weights: gate, up and down, each hidden x moe_intermediate."""
        return 3.0 * self.hidden_size * self.moe_intermediate_size * self.weight_bytes


def _width(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value \
            or not 1 <= value <= MAX_MODEL_WIDTH:
        raise TracekitError(f"{_FLAGS[name]} must be an integer in 1..{MAX_MODEL_WIDTH}, got {value!r}")
    return int(value)


def model_sizes(geometry: dict | None, *, hidden_size: int | None = None, moe_intermediate_size: int | None = None,
                expert_dtype: str | None = None) -> ModelSizes:
    """Resolve the sizes: an explicit argument, else the geometry's value, else the default (listed in
    ``assumed``). A bad explicit value is a one-line error; a geometry dtype this tracekit does not know is
    defaulted (and listed)."""
    g = geometry or {}
    assumed = []
    widths = {}
    for name, given, default in (("hidden_size", hidden_size, DEFAULT_HIDDEN),
                                 ("moe_intermediate_size", moe_intermediate_size, DEFAULT_MOE_INTERMEDIATE)):
        if given is not None:
            widths[name] = _width(given, name)
        elif g.get(name):
            widths[name] = int(g[name])
        else:
            widths[name] = default
            assumed.append(name)
    if expert_dtype is not None:
        dtype = expert_dtype_name(expert_dtype)
        if dtype is None:
            raise TracekitError(f"--expert-dtype {expert_dtype!r} unknown; use one of {', '.join(EXPERT_DTYPE_BYTES)}")
    else:
        dtype = expert_dtype_name(g.get("expert_dtype"))
        if dtype is None:
            dtype = DEFAULT_EXPERT_DTYPE
            assumed.append("expert_dtype")
    return ModelSizes(widths["hidden_size"], widths["moe_intermediate_size"], dtype, tuple(assumed))


def assumed_line(sizes: ModelSizes, geometry: dict | None = None) -> str | None:
    """One line naming every defaulted size and the flag that sets it, or None when nothing was defaulted."""
    if not sizes.assumed:
        return None
    g = geometry or {}
    parts = []
    for name in sizes.assumed:
        value = getattr(sizes, name)
        why = f" (the geometry's {g[name]!r} is unknown)" if name == "expert_dtype" and g.get(name) else ""
        parts.append(f"{name}={value}{why} ({_FLAGS[name]})")
    return ("assumed " + ", ".join(parts) + ": the runs' geometry does not record "
            + ("it" if len(parts) == 1 else "them") + "; the step time uses these sizes")
