"""Every other transformers MoE family whose router returns its choice as ``(logits, weights, ids)``.

Covers Mixtral, OLMoE, GPT-OSS, Qwen3-Next, MiniMax, Ernie-MoE, AFMoE, Gemma 4, HunYuan-MoE, DeepSeek V4 (learned
and hash routers alike), LongCat-Flash and the like. Routers are found two ways: a module whose class name ends in
``TopKRouter``/``TopkRouter``, and, structurally, the router sitting next to a routed-experts module (a module
called ``gate``/``router`` in the block that holds ``experts``), whatever its class is called. Every call checks the
output's form (three or more tensors, integer ids second-to-third; metadata only, no host sync), so a router with
another contract fails loudly, in one line, instead of recording garbage.
"""
from __future__ import annotations

import torch

from ..errors import TracekitError
from .base import RouterAdapter


class GenericTopKAdapter(RouterAdapter):
    family = "generic"
    router_classes = ()
    models = "Mixtral, OLMoE, GPT-OSS and other transformers MoE models whose router returns (logits, weights, ids)"

    def matches(self, module) -> bool:
        name = type(module).__name__
        return name.endswith("TopKRouter") or name.endswith("TopkRouter")

    def choice(self, module, output):
        if not (isinstance(output, tuple) and len(output) == 3 and isinstance(output[2], torch.Tensor)):
            raise TracekitError(f"router {type(module).__name__} did not return (logits, weights, ids); "
                                f"tracekit has no adapter for its contract (see README: Adding a model family)")
        _, weights, ids = output
        if ids.dtype.is_floating_point:
            raise TracekitError(f"router {type(module).__name__} returned non-integer expert ids; "
                                f"tracekit has no adapter for its contract (see README: Adding a model family)")
        return ids, weights

    def num_experts(self, module) -> int:
        # LongCat-Flash: n_routed_experts counts the zero-computation experts too (every id the router can emit)
        for attr in ("n_routed_experts", "num_experts", "num_local_experts"):
            if isinstance(getattr(module, attr, None), int):
                return int(getattr(module, attr))
        return super().num_experts(module)

    def zero_computation_experts(self, module, config) -> list[int]:
        zero = getattr(config, "zero_expert_num", None) or 0
        routed = getattr(config, "n_routed_experts", None)
        if zero and isinstance(routed, int):  # LongCat-Flash: ids routed..routed+zero-1 are identity experts
            return list(range(routed, routed + zero))
        return []

    def geometry(self, config) -> dict:
        return {"n_group": getattr(config, "n_group", None), "topk_group": getattr(config, "topk_group", None),
                "n_shared_experts": getattr(config, "n_shared_experts", None), "scoring": getattr(config, "scoring_func", None)}
