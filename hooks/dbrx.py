"""DBRX: ``DbrxRouter`` returns logits only; the top-k lives in the parent ``DbrxFFN.route_tokens_to_experts``.

The adapter calls that same method of the parent on the router's logits: the same softmax, top-k and p-norm
normalisation, so the same ids in the same order and the weights the experts receive.
"""
from __future__ import annotations

from .base import RouterAdapter


class DbrxAdapter(RouterAdapter):
    family = "dbrx"
    router_classes = ("DbrxRouter",)
    models = "DBRX"
    contract = "logits; top-k by the parent's `route_tokens_to_experts`"

    def record(self, found, args, kwargs, output):
        weights, ids = found.parent.route_tokens_to_experts(output)
        return ids, weights

    def num_experts(self, module) -> int:
        return int(module.layer.out_features)

    def k(self, found) -> int:
        return int(found.parent.top_k)
