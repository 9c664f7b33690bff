"""Every other transformers MoE family whose router returns its choice as ``(logits, weights, ids)``.

Covers Mixtral, OLMoE, GPT-OSS, Qwen3-Next, MiniMax, Ernie-MoE and the like: any module whose class name ends in
``TopKRouter``/``TopkRouter`` and is not claimed by a dedicated adapter. Every call checks the output's form (three
tensors, integer ids; metadata only, no host sync), so a router with another contract fails loudly instead of
recording garbage.
"""
from __future__ import annotations

from .base import RouterAdapter


class GenericTopKAdapter(RouterAdapter):
    family = "generic"
    router_classes = ()
    models = "Mixtral, OLMoE, GPT-OSS and other transformers MoE models whose router returns (logits, weights, ids)"

    def matches(self, module) -> bool:
        name = type(module).__name__
        return name.endswith("TopKRouter") or name.endswith("TopkRouter")

    def choice(self, module, output):
        if not (isinstance(output, tuple) and len(output) == 3):
            raise TypeError(f"{type(module).__name__} did not return (logits, weights, ids)")
        _, weights, ids = output
        if ids.dtype.is_floating_point:
            raise TypeError(f"{type(module).__name__} returned non-integer expert ids")
        return ids, weights

    def geometry(self, config) -> dict:
        return {"n_group": None, "topk_group": None, "n_shared_experts": None, "scoring": None}

