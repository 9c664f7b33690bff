"""Llama 4 (Scout, Maverick): ``feed_forward.router`` returns ``(scores, logits)``.

``scores`` is (T, E): sigmoid of the top-k logits scattered into a tensor of sigmoid(-inf) = 0 elsewhere. The ids are
``topk(logits, k)`` — the same call the router itself makes, so the same ids in the same order — and the weights
are the scores gathered at those ids: what ``Llama4TextMoe`` multiplies into each expert's input.
"""
from __future__ import annotations

from typing import Any

import torch

from .base import RouterAdapter


class Llama4Adapter(RouterAdapter):
    family = "llama4"
    router_classes = ("Llama4Router",)
    models = "Llama 4 (Scout, Maverick)"

    def choice(self, module, output) -> tuple[torch.Tensor, torch.Tensor]:
        scores, logits = output
        ids = torch.topk(logits, module.top_k, dim=1)[1]
        return ids, scores.gather(1, ids)

    def num_experts(self, module) -> int:
        return int(module.num_experts)

    def geometry(self, config: Any) -> dict[str, Any]:
        return {
            "n_group": None,
            "topk_group": None,
            "n_shared_experts": 1,
            "scoring": "sigmoid",
            "interleave_moe_layer_step": getattr(config, "interleave_moe_layer_step", None),
        }
