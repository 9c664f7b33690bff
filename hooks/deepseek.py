"""DeepSeek V3 (and R1) and DeepSeek V2: ``mlp.gate`` returns ``(logits, weights, ids)``.

V3 selects with sigmoid scores plus ``e_score_correction_bias``, limited to ``topk_group`` of ``n_group`` groups;
ids come back unsorted (``topk(sorted=False)``) and we keep that order. The weights are the un-biased scores,
renormalised and multiplied by ``routed_scaling_factor`` — exactly what the experts consume.
"""
from __future__ import annotations

from typing import Any

from .base import RouterAdapter


class DeepseekAdapter(RouterAdapter):
    family = "deepseek"
    router_classes = ("DeepseekV3TopkRouter", "DeepseekV2TopkRouter")
    models = "DeepSeek V3/R1, DeepSeek V2"

    def geometry(self, config: Any) -> dict[str, Any]:
        return {
            "n_group": getattr(config, "n_group", None),
            "topk_group": getattr(config, "topk_group", None),
            "n_shared_experts": getattr(config, "n_shared_experts", None),
            "scoring": "sigmoid+bias" if config.model_type == "deepseek_v3" else "softmax",
            "routed_scaling_factor": getattr(config, "routed_scaling_factor", None),
            "norm_topk_prob": getattr(config, "norm_topk_prob", None),
        }
