"""The one small interface every model-family adapter implements.

An adapter knows which router module classes its family uses and how to read the router's *choice* (expert ids
and the gate weights the experts consume) out of the router's forward output. It knows nothing about batching,
phases or storage: that is the collector's job.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


class RouterAdapter:
    """Base class: subclasses set ``family`` and ``router_classes`` and may override ``choice``."""

    family: str = ""
    #: class names (``type(module).__name__``) of the router modules of this family
    router_classes: tuple[str, ...] = ()
    #: human-readable list of model types, for error messages and docs
    models: str = ""

    def matches(self, module: nn.Module) -> bool:
        return type(module).__name__ in self.router_classes

    def choice(self, module: nn.Module, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, weights), both (T, k) on the router's device, in the router's order.

        Default: routers of transformers 5.x that return ``(logits, weights, ids)``.
        """
        _, weights, ids = output
        return ids, weights

    def num_experts(self, module: nn.Module) -> int:
        for attr in ("num_experts", "n_routed_experts", "num_local_experts"):
            if hasattr(module, attr):
                return int(getattr(module, attr))
        return int(module.weight.shape[0])

    def top_k(self, module: nn.Module) -> int:
        for attr in ("top_k", "num_experts_per_tok"):
            if hasattr(module, attr):
                return int(getattr(module, attr))
        raise AttributeError(f"{type(module).__name__} has no top_k")

    def geometry(self, config: Any) -> dict[str, Any]:
        """Family-specific routing fields read from the model config (groups, shared experts, scoring)."""
        return {}


@dataclass(frozen=True)
class FoundRouter:
    layer: int  # the model's own layer index
    name: str  # module path, e.g. model.layers.3.mlp.gate
    module: nn.Module
    adapter: RouterAdapter


def layer_index(module_name: str) -> int:
    m = _LAYER_RE.search(module_name)
    if not m:
        raise ValueError(f"cannot tell the layer index of router {module_name!r}")
    return int(m.group(1))
