"""JetMoE: ``JetMoeTopKGating`` returns the token grouping it dispatches with, not (ids, weights).

Its output is ``(index_sorted_experts, batch_index, batch_gates, expert_size, logits)``. The choice is recovered
from the returned logits with the gate's own two operations: ``logits.topk(k)`` (same call, same ids, same order)
and the softmax over the top-k logits, cast as the gate casts it (``type_as`` the gates it returns): exactly the
gates the experts' outputs are multiplied by.
"""
from __future__ import annotations

import torch

from .base import RouterAdapter


class JetMoeAdapter(RouterAdapter):
    family = "jetmoe"
    router_classes = ("JetMoeTopKGating",)
    models = "JetMoE"
    contract = "(sorted index, token index, gates, expert sizes, logits); top-k re-read from logits"

    def choice(self, module, output):
        _, _, batch_gates, _, logits = output
        values, ids = logits.topk(module.top_k, dim=1)
        return ids, torch.softmax(values, dim=1).type_as(batch_gates)
