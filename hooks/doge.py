"""Doge: ``DogeCDMoE`` retrieves experts by product keys; there is no router module and no experts module.

Its forward returns ``(hidden_states, router_logits)`` with ``router_logits`` viewed as (2, T, sqrt(E)): two
sub-key score sets. The adapter hooks the CDMoE block and redoes its own selection on those logits (top-sqrt(E)
of each half, the sum grid, top-k, gather, softmax, optional renorm): the same operations, so the ids equal the
rows the block's ``down_embed``/``up_embed`` look up, and the weights the ones it multiplies them by.
"""
from __future__ import annotations

import torch.nn.functional as F

from .base import RouterAdapter


class DogeAdapter(RouterAdapter):
    family = "doge"
    router_classes = ("DogeCDMoE",)
    models = "Doge (CDMoE product-key experts)"
    contract = "block output (hidden, logits (2, T, sqrt E)); product-key top-k redone"

    def choice(self, module, output):
        _, router_logits = output
        (sx, sy), (ix, iy) = router_logits.topk(module.num_keys, dim=-1)
        scores = (sx.unsqueeze(-1) + sy.unsqueeze(-2)).flatten(-2)
        indices = (ix.unsqueeze(-1) * module.num_keys + iy.unsqueeze(-2)).flatten(-2)
        top, pos = scores.topk(module.top_k, dim=-1)
        ids = indices.gather(-1, pos)
        w = F.softmax(top, dim=-1)
        if module.norm_topk_prob:
            w = w / w.sum(dim=-1, keepdim=True)
        return ids, w
