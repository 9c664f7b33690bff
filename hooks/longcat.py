"""LongCat-Flash: ``LongcatFlashTopkRouter`` returns ``(logits, weights, ids)`` over ``n_routed_experts +
zero_expert_num`` ids; ids from ``n_routed_experts`` up are *identity* (zero-computation) experts.

What the experts consume depends on the transformers release (the block between router and experts changed):

- up to 5.24 the experts receive the router's ids as they are and skip the identity ids: tracekit records them,
  and lists the identity ids as zero-computation experts;
- from 5.25 ``LongcatFlashMoE.forward`` rewrites each identity choice ``j`` (``j >= R``) as the dummy id
  ``(j - R) * R // Z`` with weight 0 ("spread across the full range of experts to minimize comms costs on one
  rank"): the experts receive, and run, that real expert with weight 0 while the identity path adds
  ``hidden * weight`` beside them. tracekit records what the experts consume: the dummy id with weight 0. Every
  recorded id is then a real expert (``num_experts`` = R, no zero-computation ids); an identity choice reads as a
  slot of weight exactly 0, which a softmax gate never gives a real choice.

The block is read, not the version: the rewrite applies when the block (the router's parent) carries
``num_routed_experts`` and ``zero_expert_num`` and its forward builds dummy indices.
"""
from __future__ import annotations

import inspect
import sys
from functools import lru_cache

import torch

from .generic import GenericTopKAdapter


@lru_cache(maxsize=None)
def _remaps(modeling_module: str) -> bool:
    """Whether the MoE block of ``modeling_module`` (the router's own modeling file) rewrites identity choices as
    weight-0 dummy ids before its experts run (transformers >= 5.25)."""
    for obj in vars(sys.modules[modeling_module]).values():
        if isinstance(obj, type) and obj.__name__.endswith("MoE") and "forward" in vars(obj):
            try:
                if "dummy_indices" in inspect.getsource(obj.forward):
                    return True
            except (OSError, TypeError):  # no source to read: a compiled build
                continue
    return False


class LongcatAdapter(GenericTopKAdapter):
    family = "longcat_flash"
    router_classes = ("LongcatFlashTopkRouter",)
    models = "LongCat-Flash"
    contract = "(logits, weights, ids); identity experts as the experts receive them (5.25: dummy id, weight 0)"

    def matches(self, module) -> bool:
        return type(module).__name__ in self.router_classes

    @staticmethod
    def _remapping(module) -> tuple[int, int] | None:
        """(R, Z) when the experts receive identity choices as dummy ids, else None."""
        ids, real = getattr(module, "n_routed_experts", None), getattr(module, "num_experts", None)
        if isinstance(ids, int) and isinstance(real, int) and ids > real and _remaps(type(module).__module__):
            return real, ids - real  # the router's n_routed_experts counts the identity experts too
        return None

    def record(self, found, args, kwargs, output):
        ids, weights = self.choice(found.module, output)
        ids, weights = ids.reshape(-1, ids.shape[-1]), weights.reshape(-1, weights.shape[-1])
        remap = self._remapping(found.module)
        if remap is None:
            return ids, weights
        r, z = remap
        identity = ids >= r
        dummy = torch.div((ids - r) * r, z, rounding_mode="floor")
        return torch.where(identity, dummy, ids), weights.masked_fill(identity, 0.0)

    def num_experts(self, module) -> int:
        remap = self._remapping(module)
        return remap[0] if remap else super().num_experts(module)

    def zero_computation_experts(self, module, config) -> list[int]:
        return [] if self._remapping(module) else super().zero_computation_experts(module, config)
