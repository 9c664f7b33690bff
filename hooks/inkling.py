"""Inkling: ``InklingTopkRouter`` returns ``(logits, weights, ids, shared_gammas)``; the fourth value scales the shared
experts, which are not routed. The routed choice is the (weights, ids) pair the routed experts receive."""
from __future__ import annotations

from .base import RouterAdapter


class InklingAdapter(RouterAdapter):
    family = "inkling"
    router_classes = ("InklingTopkRouter",)
    models = "Inkling"
    contract = "(logits, weights, ids, shared gammas)"

    def choice(self, module, output):
        _, weights, ids, _ = output
        return ids, weights
