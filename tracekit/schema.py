"""The one place where tracekit's on-disk tables are defined.

Every writer (the collector, every importer) builds its Arrow tables through the functions here, and every
reader checks `SCHEMA_VERSION` through :func:`check_version`. Two tables exist:

``routes`` (kind ``"routes"``): one row per (request, token, MoE layer).

=============  ===========================  ==========================================================
column         Arrow type                   meaning
=============  ===========================  ==========================================================
run_id         dictionary<string>           id of the run directory the row belongs to
model          dictionary<string>           registry name or hub id of the model
dataset        dictionary<string>           dataset name (``datasets_cfg``) or import source
domain         dictionary<string>           task family: code, math, chat, general (or unknown)
request_id     int32                        request index within the run (global across ranks)
prompt_id      string                       the dataset's own id of the prompt (e.g. ``HumanEval/3``)
phase          dictionary<string>           ``prefill`` or ``decode``
position       int32                        token index in the request's sequence (prompt starts at 0)
step           int32, nullable              decode step (1 = first decode forward); null in prefill
layer          int16                        the model's own (absolute) layer index
token_id       int32, nullable              the token routed at this position (null if unknown)
experts        list<uint8|uint16|uint32>    expert ids in the router's order (narrowest type for E)
weights        list<float16|float32>, null  gate weights as the experts consumed them, same order
pass           int16 (v2)                   which call of this layer's router in the forward (0 = first;
                                            looped layers call one router several times per forward;
                                            block diffusion: the denoising iteration of the canvas)
router         dictionary<string>, null(v2) which gate of a layer with several (Ernie 4.5 VL ``text_moe``
                                            / ``vision_moe``); null when the layer has one gate
=============  ===========================  ==========================================================

Schema v2 (tracekit 0.2) added ``pass``, ``router`` and the phase ``encoder`` (the encoder stack of an
encoder-decoder model: one row per prompt token and encoder MoE layer; its decoder rows are ``prefill`` for the
decoder start token and ``decode`` for every generated token). v1 files have neither column: readers see
``pass = 0`` and ``router = NULL`` (the ``routes`` view fills them).

``loads`` (kind ``"loads"``): aggregated counts, for engines that dump only statistics.

=============  ===================  =========================================================
run_id, model, dataset, domain      as above
phase          dictionary<string>   ``prefill``, ``decode`` or ``mixed`` (engine did not say)
window         int32                forward pass / iteration index the counts belong to
layer          int16                absolute layer index
expert         int32                logical expert id
count          int64                (token, expert) assignments in that window and layer
=============  ===================  =========================================================
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from .errors import TracekitError

SCHEMA_VERSION = 2
KINDS = ("routes", "loads")
#: phase labels in the order of their integer codes (0, 1, 2): append only, never reorder
PHASES = ("prefill", "decode", "encoder")

_DICT = pa.dictionary(pa.int32(), pa.string())


# ---------------------------------------------------------------------------------------------------------------
# model sizes in a run's geometry (manifest.json); every writer fills them when it knows them, else null:
#   hidden_size            the model's hidden width (bytes per dispatched token, expert GEMM shape)
#   moe_intermediate_size  one routed expert's FFN width (its three matrices are hidden x this)
#   expert_dtype           the dtype the routed experts' weights are stored in (a key of EXPERT_DTYPE_BYTES)
# ---------------------------------------------------------------------------------------------------------------
GEOMETRY_SIZE_FIELDS = ("hidden_size", "moe_intermediate_size")
MAX_MODEL_WIDTH = 1 << 24
#: bytes per weight of each expert dtype: block-scaled formats count their scales (MXFP4: 4 bits + one 8-bit scale
#: per 32 weights; NVFP4: 4 bits + one FP8 scale per 16)
EXPERT_DTYPE_BYTES = {
    "float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "float8_e4m3fn": 1.0, "float8_e5m2": 1.0, "int8": 1.0,
    "mxfp4": 4.25 / 8, "nvfp4": 4.5 / 8, "int4": 0.5,
}
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32",
                  "fp8": "float8_e4m3fn", "float8": "float8_e4m3fn", "e4m3": "float8_e4m3fn", "float8_e4m3": "float8_e4m3fn",
                  "e5m2": "float8_e5m2", "fp4": "nvfp4", "w4a16": "int4", "w8a8": "int8"}


def expert_dtype_name(value: object) -> str | None:
    """The canonical :data:`EXPERT_DTYPE_BYTES` key for a dtype spelled as torch, a config or a user writes it
    (``torch.bfloat16``, ``bf16``, ``fp8``, ``mxfp4``...); None when it names none of them."""
    if value is None:
        return None
    name = str(value).strip().lower().removeprefix("torch.")
    name = _DTYPE_ALIASES.get(name, name)
    return name if name in EXPERT_DTYPE_BYTES else None


def geometry_size_problem(g: dict) -> tuple[str, str] | None:
    """``(field, what it must be)`` for the first bad model-size field of a geometry, else None (null is fine).
    ``expert_dtype`` must be a string; a name this tracekit does not know is read as unknown (defaulted)."""
    for key in GEOMETRY_SIZE_FIELDS:
        v = g.get(key)
        if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_MODEL_WIDTH):
            return f"geometry.{key}", f"an integer in 1..{MAX_MODEL_WIDTH}"
    if g.get("expert_dtype") is not None and not isinstance(g["expert_dtype"], str):
        return "geometry.expert_dtype", f"a dtype name ({', '.join(EXPERT_DTYPE_BYTES)})"
    return None


def expert_type(num_experts: int) -> pa.DataType:
    """Narrowest unsigned integer type that holds ids 0..num_experts-1."""
    if num_experts <= 256:
        return pa.uint8()
    if num_experts <= 65536:
        return pa.uint16()
    return pa.uint32()


def expert_numpy_dtype(num_experts: int) -> np.dtype:
    return np.dtype(expert_type(num_experts).to_pandas_dtype())


def weight_type(weight_dtype: str) -> pa.DataType:
    if weight_dtype == "float16":
        return pa.float16()
    if weight_dtype == "float32":
        return pa.float32()
    raise TracekitError(f"unknown weight dtype {weight_dtype!r}; use float16 or float32")


def routes_schema(num_experts: int, weight_dtype: str = "float16") -> pa.Schema:
    """Arrow schema of the ``routes`` table for a model with ``num_experts`` routed experts."""
    return pa.schema(
        [
            pa.field("run_id", _DICT, nullable=False),
            pa.field("model", _DICT, nullable=False),
            pa.field("dataset", _DICT, nullable=False),
            pa.field("domain", _DICT, nullable=False),
            pa.field("request_id", pa.int32(), nullable=False),
            pa.field("prompt_id", pa.string()),
            pa.field("phase", _DICT, nullable=False),
            pa.field("position", pa.int32(), nullable=False),
            pa.field("step", pa.int32()),
            pa.field("layer", pa.int16(), nullable=False),
            pa.field("token_id", pa.int32()),
            pa.field("experts", pa.list_(expert_type(num_experts)), nullable=False),
            pa.field("weights", pa.list_(weight_type(weight_dtype))),
            pa.field("pass", pa.int16(), nullable=False),
            pa.field("router", _DICT),
        ],
        metadata={"tracekit.schema_version": str(SCHEMA_VERSION), "tracekit.kind": "routes"},
    )


def loads_schema() -> pa.Schema:
    return pa.schema(
        [
            pa.field("run_id", _DICT, nullable=False),
            pa.field("model", _DICT, nullable=False),
            pa.field("dataset", _DICT, nullable=False),
            pa.field("domain", _DICT, nullable=False),
            pa.field("phase", _DICT, nullable=False),
            pa.field("window", pa.int32(), nullable=False),
            pa.field("layer", pa.int16(), nullable=False),
            pa.field("expert", pa.int32(), nullable=False),
            pa.field("count", pa.int64(), nullable=False),
        ],
        metadata={"tracekit.schema_version": str(SCHEMA_VERSION), "tracekit.kind": "loads"},
    )


def _const_dict(value: str, n: int) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, dtype=np.int32)), pa.array([value], pa.string()))


def _labels_dict(labels: np.ndarray, values: list[str]) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(pa.array(labels.astype(np.int32, copy=False)), pa.array(values, pa.string()))


def _fixed_lists(values: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    """(N, k) array -> list array of N lists of length k, zero-copy where the dtype already matches."""
    n, k = values.shape
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=value_type)
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, flat)


def build_routes_table(
    *,
    schema: pa.Schema,
    run_id: str,
    model: str,
    dataset: str,
    domain: str | np.ndarray,
    request_id: np.ndarray,
    prompt_id: list[str] | np.ndarray | pa.Array | None,
    phase: np.ndarray,
    position: np.ndarray,
    step: np.ndarray,
    layer: np.ndarray,
    token_id: np.ndarray | None,
    experts: np.ndarray,
    weights: np.ndarray | None,
    domains: list[str] | None = None,
    pass_: np.ndarray | None = None,
    router: np.ndarray | None = None,
    routers: list[str] | None = None,
) -> pa.Table:
    """Assemble a ``routes`` table from columnar numpy arrays.

    Shapes: every 1-D array has N rows; ``experts`` and ``weights`` are (N, k).
    ``phase`` is an int array (0 = prefill, 1 = decode); ``step`` uses -1 for null (prefill).
    ``domain`` is a single string, or an int array of labels into ``domains``.
    ``token_id`` may use -1 for unknown.
    ``pass_`` (default all 0) numbers a router's calls within one forward; ``router`` is an int array of labels
    into ``routers`` with -1 for null (default all null: one gate per layer).
    """
    n = int(request_id.shape[0])
    e_type = schema.field("experts").type.value_type
    w_type = schema.field("weights").type.value_type
    if experts.ndim != 2 or experts.shape[0] != n:
        raise ValueError(f"experts must be (N, k) with N={n}, got {experts.shape}")
    experts = experts.astype(e_type.to_pandas_dtype(), copy=False)
    step_arr = pa.array(step.astype(np.int32, copy=False), mask=step < 0)
    tok = None
    if token_id is not None:
        token_id = token_id.astype(np.int32, copy=False)
        tok = pa.array(token_id, mask=token_id < 0)
    else:
        tok = pa.nulls(n, pa.int32())
    if weights is None:
        w_arr = pa.nulls(n, pa.list_(w_type))
    else:
        w_arr = _fixed_lists(weights.astype(w_type.to_pandas_dtype(), copy=False), w_type)
    if isinstance(domain, str):
        dom = _const_dict(domain, n)
    else:
        dom = _labels_dict(np.asarray(domain), list(domains or []))
    if prompt_id is None:
        pid = pa.nulls(n, pa.string())
    elif isinstance(prompt_id, (pa.Array, pa.ChunkedArray)):
        pid = prompt_id
    else:
        pid = pa.array(prompt_id, pa.string())
    cols = [
        _const_dict(run_id, n),
        _const_dict(model, n),
        _const_dict(dataset, n),
        dom,
        pa.array(request_id.astype(np.int32, copy=False)),
        pid,
        _labels_dict(np.asarray(phase), list(PHASES)),
        pa.array(position.astype(np.int32, copy=False)),
        step_arr,
        pa.array(layer.astype(np.int16, copy=False)),
        tok,
        _fixed_lists(experts, e_type),
        w_arr,
        pa.array(np.zeros(n, np.int16) if pass_ is None else pass_.astype(np.int16, copy=False)),
        _router_labels(router, routers or [], n),
    ]
    return pa.Table.from_arrays(cols, schema=schema)


def _router_labels(router: np.ndarray | None, routers: list[str], n: int) -> pa.DictionaryArray:
    if router is None or not routers:
        return pa.DictionaryArray.from_arrays(pa.nulls(n, pa.int32()), pa.array([], pa.string()))
    labels = np.asarray(router).astype(np.int32, copy=False)
    return pa.DictionaryArray.from_arrays(pa.array(labels, mask=labels < 0), pa.array(routers, pa.string()))


def build_loads_table(
    *,
    run_id: str,
    model: str,
    dataset: str,
    domain: str,
    phase: str,
    window: np.ndarray,
    layer: np.ndarray,
    expert: np.ndarray,
    count: np.ndarray,
) -> pa.Table:
    """Assemble a ``loads`` table; every argument array has shape (N,)."""
    n = int(window.shape[0])
    cols = [
        _const_dict(run_id, n),
        _const_dict(model, n),
        _const_dict(dataset, n),
        _const_dict(domain, n),
        _const_dict(phase, n),
        pa.array(window.astype(np.int32, copy=False)),
        pa.array(layer.astype(np.int16, copy=False)),
        pa.array(expert.astype(np.int32, copy=False)),
        pa.array(count.astype(np.int64, copy=False)),
    ]
    return pa.Table.from_arrays(cols, schema=loads_schema())


def check_version(version: int | str | None, where: str) -> None:
    """Refuse data written by a newer tracekit schema (one line, exit 2 through the CLI)."""
    try:
        v = int(version) if version is not None else None
    except ValueError:
        v = None
    if v is None:
        raise TracekitError(f"{where}: no tracekit schema version found; is this a tracekit run directory?")
    if v > SCHEMA_VERSION:
        raise TracekitError(
            f"{where} uses trace schema v{v}, newer than this tracekit (v{SCHEMA_VERSION}); upgrade tracekit"
        )
