"""Switch Transformers and NLLB-MoE (encoder-decoder, capacity-limited routers).

Switch's ``Top1Router`` returns ``(dispatch one-hot (B,S,E), top-1 probability (B,S,1), logits)``; NLLB-MoE's
``Top2Router`` returns ``(top-1 one-hot (T,E), combine weights (T,E), logits)``. A token over an expert's capacity
(or a padding token NLLB masks) reaches no expert: its slot is recorded as id E (the *dropped* pseudo-expert, listed
as zero-computation) with weight 0. The encoder's routers run once per request (phase ``encoder``); the decoder's
route the decoder start token (prefill) and every generated token (decode).

Note (transformers 5.24): ``NllbMoeExperts.forward`` one-hots the already one-hot ``router_mask``, so it runs the
``expert_0``/``expert_1`` submodules only; what it receives (mask and combine weights) is the router's choice,
which is what tracekit records.
"""
from __future__ import annotations

import torch

from .base import RouterAdapter


def _top1(mask: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, E) one-hot (rows all zero when dropped) -> (T,) ids with E for dropped, (T,) kept flag."""
    kept = mask.reshape(-1, num_experts).bool().any(-1)
    ids = mask.reshape(-1, num_experts).argmax(-1)
    return torch.where(kept, ids, torch.full_like(ids, num_experts)), kept


class _DroppedSlotAdapter(RouterAdapter):
    """A capacity-limited router: a slot that reaches no expert is recorded as id E, one more id than the router's
    experts, listed as a zero-computation expert."""

    def num_experts(self, module) -> int:
        return int(module.num_experts) + 1

    def zero_computation_experts(self, module, config) -> list[int]:
        return [int(module.num_experts)]


class SwitchAdapter(_DroppedSlotAdapter):
    family = "switch"
    router_classes = ("SwitchTransformersTop1Router",)
    models = "Switch Transformers"
    contract = "(dispatch one-hot, top-1 prob, logits); capacity drop = id E"

    def choice(self, module, output):
        mask, probs, _ = output
        e = module.num_experts
        ids, kept = _top1(mask, e)
        w = probs.reshape(-1, 1) * kept[:, None].to(probs.dtype)
        return ids[:, None], w

    def top_k(self, module) -> int:
        return 1


class NllbMoeAdapter(_DroppedSlotAdapter):
    family = "nllb-moe"
    router_classes = ("NllbMoeTop2Router",)
    models = "NLLB-MoE"
    contract = "(top-1 one-hot, combine weights (T, E), logits); dropped slot = id E"

    def choice(self, module, output):
        mask, combine, _ = output
        e = module.num_experts
        combine = combine.reshape(-1, e)
        id1, kept1 = _top1(mask, e)
        second = combine.masked_fill(mask.reshape(-1, e).bool(), 0)
        w2, id2 = second.max(-1)
        kept2 = w2 > 0
        id2 = torch.where(kept2, id2, torch.full_like(id2, e))
        ids = torch.stack([id1, id2], dim=-1)
        w = combine.gather(1, ids.clamp(max=e - 1)) * torch.stack([kept1, kept2], -1).to(combine.dtype)
        return ids, w

    def top_k(self, module) -> int:
        return 2
