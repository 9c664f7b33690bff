"""Router hooks, one adapter per model family behind one small interface (:class:`RouterAdapter`).

Installed as ``tracekit.hooks``. To support a new family, subclass :class:`RouterAdapter` in a module here, set
``family`` and ``router_classes``, override :meth:`RouterAdapter.choice` if its router does not return
``(logits, weights, ids)``, and add an instance to :data:`ADAPTERS` before the generic one.
"""
from __future__ import annotations

import re
from typing import Any

from torch import nn

from ..errors import TracekitError
from .base import FoundRouter, RouterAdapter, layer_index
from .dbrx import DbrxAdapter
from .deepseek import DeepseekAdapter
from .doge import DogeAdapter
from .generic import GenericTopKAdapter
from .inkling import InklingAdapter
from .jetmoe import JetMoeAdapter
from .llama4 import Llama4Adapter
from .longcat import LongcatAdapter
from .qwen import QwenMoeAdapter
from .seq2seq import NllbMoeAdapter, SwitchAdapter
from .tracer import RoutedStep, RouterCall, RouterTracer
from .zaya import ZayaAdapter

#: dedicated adapters first; the generic one claims any remaining ``*TopKRouter`` module, and any router found
#: next to an experts module (see :func:`find_routers`)
ADAPTERS: list[RouterAdapter] = [
    DeepseekAdapter(), QwenMoeAdapter(), Llama4Adapter(), DbrxAdapter(), JetMoeAdapter(), InklingAdapter(),
    ZayaAdapter(), SwitchAdapter(), NllbMoeAdapter(), DogeAdapter(), LongcatAdapter(), GenericTopKAdapter(),
]
GENERIC = ADAPTERS[-1]

_ROUTER_NAMES = ("gate", "router")
_ENCODER_RE = re.compile(r"(?:^|\.)encoder(?:\.|$)")


def supported_families() -> str:
    return "; ".join(a.models for a in ADAPTERS)


def _is_experts(module: nn.Module) -> bool:
    name = type(module).__name__
    return name.endswith("Experts") and not name.endswith("SharedExperts")


def _gate_name(name: str) -> str:
    """The router's path inside its layer: ``mlp.text_moe.gate`` for ``model.layers.3.mlp.text_moe.gate``."""
    m = re.search(r"(?:^|\.)(?:layers|block|blocks|h)\.\d+\.(.+)$", name)
    return m.group(1) if m else name


def find_routers(model: nn.Module) -> list[FoundRouter]:
    """Every router module of ``model`` over ``named_modules()``, sorted by (stack, layer, name).

    A router is a module whose class an adapter claims, or (whatever its class) the ``gate``/``router`` module
    of a block that also holds a routed-experts module (a class ending in ``Experts``); the latter gets the
    generic adapter, which checks the ``(logits, weights, ids)`` contract on every call.
    """
    modules = dict(model.named_modules())
    picked: dict[str, RouterAdapter] = {}
    for name, module in modules.items():
        for adapter in ADAPTERS:
            if adapter.matches(module):
                picked[name] = adapter
                break
    for name, module in modules.items():
        if not _is_experts(module) or "." not in name:
            continue
        parent = name.rsplit(".", 1)[0]
        if any(p.rsplit(".", 1)[0] == parent for p in picked):
            continue
        for child in _ROUTER_NAMES:
            if f"{parent}.{child}" in modules and f"{parent}.{child}" not in picked:
                picked[f"{parent}.{child}"] = GENERIC
                break
    found, per_layer = [], {}
    for name in picked:
        try:
            key = ("encoder" if _ENCODER_RE.search(name) else "decoder", layer_index(name))
        except ValueError:
            continue  # a router outside any layer stack (none in transformers today)
        per_layer[key] = per_layer.get(key, 0) + 1
    for name, adapter in picked.items():
        try:
            layer = layer_index(name)
        except ValueError:
            continue
        stack = "encoder" if _ENCODER_RE.search(name) else "decoder"
        parent = modules.get(name.rsplit(".", 1)[0]) if "." in name else None
        # a layer with several gates (Ernie 4.5 VL text/vision, JetMoE attention + MLP) names each one
        gate = _gate_name(name) if per_layer[(stack, layer)] > 1 else None
        found.append(FoundRouter(layer=layer, name=name, module=modules[name], adapter=adapter, parent=parent,
                                 gate=gate, stack=stack))
    if not found:
        raise TracekitError(
            f"no MoE router found in {type(model).__name__}; supported families: {supported_families()}"
        )
    return sorted(found, key=lambda r: (r.stack != "encoder", r.layer, r.name))


#: the config attribute that holds one routed expert's FFN width, first match wins: the MoE-specific names first
#: (DeepSeek, Qwen MoE, GLM, Ernie, Hunyuan: ``moe_intermediate_size``, the dense MLP being ``intermediate_size``),
#: then the families whose experts are their only FFN (Mixtral, Llama 4, gpt-oss, OLMoE: ``intermediate_size``;
#: JetMoE, DBRX's ffn_config: ``ffn_hidden_size``; Switch: ``d_ff``; NLLB-MoE: ``decoder_ffn_dim``)
_EXPERT_WIDTH_ATTRS = ("moe_intermediate_size", "expert_ffn_hidden_size", "expert_intermediate_size",
                       "moe_ffn_hidden_size", "intermediate_size", "ffn_hidden_size", "ffn_dim", "d_ff",
                       "decoder_ffn_dim")
#: quantisation methods whose expert weights have one known width (``quantization_config.quant_method``)
_QUANT_DTYPES = {"fp8": "float8_e4m3fn", "fbgemm_fp8": "float8_e4m3fn", "mxfp4": "mxfp4", "nvfp4": "nvfp4"}


def _width(value: Any) -> int | None:
    """A positive int, or the largest of a per-layer list (Hunyuan-style); None otherwise."""
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) for v in value):
        value = max(value)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def model_sizes(model: nn.Module, config: Any) -> dict[str, Any]:
    """``hidden_size``, ``moe_intermediate_size`` (one routed expert's FFN width) and ``expert_dtype`` (a
    :data:`tracekit.schema.EXPERT_DTYPE_BYTES` name) of a live model; None where the config does not say.

    The dtype is the config's ``expert_dtype`` (DeepSeek V4), else the checkpoint's quantisation (FP8, MXFP4,
    NVFP4, 4/8-bit integer), else the config's dtype, else the dtype the loaded model runs in."""
    from ..schema import expert_dtype_name

    hidden = _width(getattr(config, "hidden_size", None)) or _width(getattr(config, "d_model", None))
    width = None
    for attr in _EXPERT_WIDTH_ATTRS:
        width = _width(getattr(config, attr, None))
        if width is not None:
            break
    ffn = getattr(config, "ffn_config", None)  # DBRX keeps the expert width in a sub-config
    if width is None and ffn is not None:
        width = _width(getattr(ffn, "ffn_hidden_size", None) if not isinstance(ffn, dict) else ffn.get("ffn_hidden_size"))
    dtype = {"fp4": "mxfp4", "fp8": "float8_e4m3fn"}.get(str(getattr(config, "expert_dtype", None)).lower())
    quant = getattr(config, "quantization_config", None)  # DeepSeek V4 names its experts' format (fp4 = MXFP4)
    if dtype is not None:
        pass
    elif quant is not None:
        q = quant if isinstance(quant, dict) else getattr(quant, "to_dict", lambda: vars(quant))()
        method = str(q.get("quant_method", "")).lower()
        dtype = _QUANT_DTYPES.get(method)
        if dtype is None and q.get("bits") in (4, 8):
            dtype = "int4" if q["bits"] == 4 else "int8"
    else:
        for value in (getattr(config, "dtype", None), getattr(model, "dtype", None)):
            dtype = expert_dtype_name(value)
            if dtype is not None:
                break
    return {"hidden_size": hidden, "moe_intermediate_size": width, "expert_dtype": dtype}


def router_geometry(model: nn.Module, routers: list[FoundRouter]) -> dict[str, Any]:
    """The routing geometry recorded in every manifest, read from the live model and its config.

    ``num_experts`` counts every id a router can emit, zero-computation experts included; those are listed in
    ``zero_computation_experts`` (empty for most families). ``encoder_moe_layers`` and ``gates`` appear for
    encoder-decoder models and layers with several gates. ``hidden_size``, ``moe_intermediate_size`` and
    ``expert_dtype`` are the model's sizes (:func:`model_sizes`), which the placement's step time uses.
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    first = next((r for r in routers if r.stack == "decoder"), routers[0])
    decoder = [r for r in routers if r.stack == "decoder"]
    geometry = {
        "family": first.adapter.family,
        "model_type": getattr(config, "model_type", None),
        "router_class": type(first.module).__name__,
        "num_layers": getattr(config, "num_hidden_layers", None),
        "moe_layers": sorted({r.layer for r in decoder}),
        "num_experts": max(r.adapter.num_experts(r.module) for r in routers),
        "top_k": first.adapter.k(first),
        **model_sizes(model, config),
    }
    geometry.update(first.adapter.geometry(config))
    zero = sorted({e for r in routers for e in r.adapter.zero_computation_experts(r.module, config)})
    geometry["zero_computation_experts"] = zero
    encoder = sorted({r.layer for r in routers if r.stack == "encoder"})
    if encoder:
        geometry["encoder_moe_layers"] = encoder
    gates = sorted({r.gate for r in routers if r.gate})
    if gates:
        geometry["gates"] = gates
    return geometry


__all__ = [
    "ADAPTERS",
    "FoundRouter",
    "RoutedStep",
    "RouterAdapter",
    "RouterCall",
    "RouterTracer",
    "find_routers",
    "model_sizes",
    "router_geometry",
    "supported_families",
]
