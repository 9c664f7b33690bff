"""Zaya: ``ZayaRouter`` returns ``(logits, weights, ids, next_router_states)`` and has one *skip* expert (id E).

Before returning, the router rewrites a skip choice as id 0 with weight 0 (so the experts' one-hot mask stays E
wide): the returned ids cannot tell "skip" from expert 0. The adapter redoes the router's own selection on its
returned logits (softmax, + ``balancing_biases``, top-k: the same operations in the same dtypes) to get the true
ids, skip = E; the weights are the returned ones (0 for a skip, as the experts consume them). Geometry counts E+1
ids and lists E as a zero-computation expert.
"""
from __future__ import annotations

import torch

from .base import RouterAdapter


class ZayaAdapter(RouterAdapter):
    family = "zaya"
    router_classes = ("ZayaRouter",)
    models = "Zaya"
    contract = "(logits, weights, ids, router states); skip expert re-read from logits"

    def choice(self, module, output):
        logits, weights, _, _ = output
        probs = torch.softmax(logits, dim=-1)
        biased = probs.detach().to(torch.float32) + module.balancing_biases
        ids = torch.topk(biased, module.top_k, dim=-1).indices
        return ids, weights

    def num_experts(self, module) -> int:
        return int(module.num_router_classes)

    def zero_computation_experts(self, module, config) -> list[int]:
        return [int(module.num_experts)]
