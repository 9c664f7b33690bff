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

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|block|blocks|h)\.(\d+)(?:\.|$)")


class RouterAdapter:
    """Base class: subclasses set ``family`` and ``router_classes`` and may override ``choice``."""

    family: str = ""
    #: class names (``type(module).__name__``) of the router modules of this family
    router_classes: tuple[str, ...] = ()
    #: human-readable list of model types, for error messages and docs
    models: str = ""

    def matches(self, module: nn.Module) -> bool:
        return type(module).__name__ in self.router_classes

    #: one line for the README's families table: what the router returns and how the choice is read
    contract: str = "(logits, weights, ids)"

    def record(self, found: "FoundRouter", args: Any, kwargs: Any, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, weights), both (T, k), for one call of ``found``'s router; ``args``/``kwargs`` are its inputs.

        Default: :meth:`choice` on the output alone. Adapters whose family finishes the choice outside the router
        (DBRX's top-k lives in the parent block) override this and use ``found.parent``.
        """
        ids, weights = self.choice(found.module, output)
        return ids.reshape(-1, ids.shape[-1]), weights.reshape(-1, weights.shape[-1])

    def zero_computation_experts(self, module: nn.Module, config: Any) -> list[int]:
        """Expert ids the router can emit that run no expert FFN (LongCat's identity experts, Zaya's skip
        expert, Switch/NLLB's capacity drop); they count in ``num_experts`` and are listed in the geometry."""
        return []

    def choice(self, module: nn.Module, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, weights), both (T, k) on the router's device, in the router's order.

        Default: routers of transformers 5.x that return ``(logits, weights, ids)``.
        """
        _, weights, ids = output
        return ids, weights

    def num_experts(self, module: nn.Module) -> int:
        for attr in ("num_experts", "n_routed_experts", "num_local_experts"):
            if isinstance(getattr(module, attr, None), int):
                return int(getattr(module, attr))
        if isinstance(getattr(module, "weight", None), torch.Tensor):
            return int(module.weight.shape[0])
        # routers that score with a linear layer of their own (Gemma 4's ``proj``, HunYuan's ``wg``)
        linear = [m for m in module.modules() if isinstance(m, nn.Linear)]
        if linear:
            return int(linear[-1].out_features)
        raise AttributeError(f"{type(module).__name__}: cannot tell its number of experts")

    def top_k(self, module: nn.Module) -> int:
        for attr in ("top_k", "num_experts_per_tok"):
            if isinstance(getattr(module, attr, None), int):
                return int(getattr(module, attr))
        config = getattr(module, "config", None)  # Gemma 4 / DiffusionGemma keep it on the config only
        for attr in ("top_k_experts", "num_experts_per_tok"):
            if isinstance(getattr(config, attr, None), int):
                return int(getattr(config, attr))
        raise AttributeError(f"{type(module).__name__} has no top_k")

    def k(self, found: "FoundRouter") -> int:
        """Experts chosen per token by ``found`` (its ``top_k``; DBRX keeps it on the parent block)."""
        return self.top_k(found.module)

    def geometry(self, config: Any) -> dict[str, Any]:
        """Family-specific routing fields read from the model config (groups, shared experts, scoring)."""
        return {}


@dataclass(frozen=True)
class FoundRouter:
    layer: int  # the model's own layer index
    name: str  # module path, e.g. model.layers.3.mlp.gate
    module: nn.Module
    adapter: RouterAdapter
    parent: nn.Module | None = None  # the block holding the router and its experts
    #: which gate of a layer with several (Ernie 4.5 VL's ``text_moe`` / ``vision_moe``); None when it has one
    gate: str | None = None
    #: ``encoder`` for the encoder stack of an encoder-decoder model, else ``decoder``
    stack: str = "decoder"


def layer_index(module_name: str) -> int:
    m = _LAYER_RE.search(module_name)
    if not m:
        raise ValueError(f"cannot tell the layer index of router {module_name!r}")
    return int(m.group(1))
