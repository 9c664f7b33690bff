"""Router hooks, one adapter per model family behind one small interface (:class:`RouterAdapter`).

Installed as ``tracekit.hooks``. To support a new family, subclass :class:`RouterAdapter` in a module here, set
``family`` and ``router_classes``, override :meth:`RouterAdapter.choice` if its router does not return
``(logits, weights, ids)``, and add an instance to :data:`ADAPTERS` before the generic one.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import TracekitError
from .base import FoundRouter, RouterAdapter, layer_index
from .deepseek import DeepseekAdapter
from .generic import GenericTopKAdapter
from .llama4 import Llama4Adapter
from .qwen import QwenMoeAdapter
from .tracer import RoutedStep, RouterTracer

#: dedicated adapters first; the generic one claims any remaining ``*TopKRouter`` module
ADAPTERS: list[RouterAdapter] = [DeepseekAdapter(), QwenMoeAdapter(), Llama4Adapter(), GenericTopKAdapter()]


def supported_families() -> str:
    return "; ".join(a.models for a in ADAPTERS)


def find_routers(model: nn.Module) -> list[FoundRouter]:
    """Every router module of ``model`` by module class over ``named_modules()``, sorted by layer."""
    found = []
    for name, module in model.named_modules():
        for adapter in ADAPTERS:
            if adapter.matches(module):
                found.append(FoundRouter(layer=layer_index(name), name=name, module=module, adapter=adapter))
                break
    if not found:
        raise TracekitError(
            f"no MoE router found in {type(model).__name__}; supported families: {supported_families()}"
        )
    return sorted(found, key=lambda r: r.layer)


def router_geometry(model: nn.Module, routers: list[FoundRouter]) -> dict[str, Any]:
    """The routing geometry recorded in every manifest, read from the live model and its config."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    first = routers[0]
    geometry = {
        "family": first.adapter.family,
        "model_type": getattr(config, "model_type", None),
        "router_class": type(first.module).__name__,
        "num_layers": getattr(config, "num_hidden_layers", None),
        "moe_layers": [r.layer for r in routers],
        "num_experts": first.adapter.num_experts(first.module),
        "top_k": first.adapter.top_k(first.module),
        "hidden_size": getattr(config, "hidden_size", None),
    }
    geometry.update(first.adapter.geometry(config))
    return geometry


__all__ = [
    "ADAPTERS",
    "FoundRouter",
    "RoutedStep",
    "RouterAdapter",
    "RouterTracer",
    "find_routers",
    "router_geometry",
    "supported_families",
]
