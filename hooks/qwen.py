"""Qwen3-MoE and Qwen2-MoE: ``mlp.gate`` returns ``(logits, weights, ids)`` (softmax, top-k, optional renorm)."""
from __future__ import annotations

from typing import Any

from .base import RouterAdapter


class QwenMoeAdapter(RouterAdapter):
    family = "qwen-moe"
    router_classes = ("Qwen3MoeTopKRouter", "Qwen2MoeTopKRouter")
    models = "Qwen3-MoE, Qwen2-MoE"

    def geometry(self, config: Any) -> dict[str, Any]:
        shared = getattr(config, "shared_expert_intermediate_size", 0) or 0
        return {
            "n_group": None,
            "topk_group": None,
            "n_shared_experts": 1 if shared else 0,
            "scoring": "softmax",
            "norm_topk_prob": getattr(config, "norm_topk_prob", None),
        }
