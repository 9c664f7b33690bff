"""Forward hooks that record every router's choice, per forward step, without leaving the device.

Inside the hooks nothing forces a host sync: each router's (ids, weights) are cast on the device and packed into
one byte tensor per layer; at the end of the model's forward the layers are stacked into one (L, T, bytes) tensor.
:meth:`RouterTracer.fetch` then copies *all* recorded steps to the host in a single transfer after ``generate``
has finished (so at most one device-to-host copy per forward step, in practice one per batch).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from .base import FoundRouter


@dataclass
class RoutedStep:
    """One forward step: ``ids`` and ``weights`` are (L, T, k) over the L MoE layers and T flattened tokens."""

    ids: np.ndarray
    weights: np.ndarray | None


class RouterTracer:
    """Context manager recording the routers' choices of every forward pass of ``model``.

    Tokens are in the order the routers see them: the (batch, sequence) input flattened row-major.

    >>> with RouterTracer(model, routers) as tracer:       # doctest: +SKIP
    ...     model.generate(**inputs)
    >>> steps = tracer.fetch()                              # list[RoutedStep], one per forward
    """

    def __init__(
        self,
        model: nn.Module,
        routers: list[FoundRouter],
        *,
        weight_dtype: torch.dtype | None = torch.float16,
        num_experts: int | None = None,
    ) -> None:
        self.model = model
        self.routers = routers
        self.layers = [r.layer for r in routers]
        e = num_experts or max(r.adapter.num_experts(r.module) for r in routers)
        self.id_dtype = torch.int16 if e <= torch.iinfo(torch.int16).max else torch.int32
        self.weight_dtype = weight_dtype
        self.top_k = routers[0].adapter.top_k(routers[0].module)
        self._id_bytes = torch.empty((), dtype=self.id_dtype).element_size()
        self._w_bytes = torch.empty((), dtype=weight_dtype).element_size() if weight_dtype is not None else 0
        self._handles: list[Any] = []
        self._current: list[torch.Tensor | None] = [None] * len(routers)
        self._steps: list[torch.Tensor] = []

    # -- hooks -------------------------------------------------------------------------------------------------
    def _on_router(self, index: int, module: nn.Module, args: Any, output: Any) -> None:
        ids, weights = self.routers[index].adapter.choice(module, output)
        parts = [ids.to(self.id_dtype).contiguous().view(torch.uint8)]
        if self.weight_dtype is not None:
            parts.append(weights.to(self.weight_dtype).contiguous().view(torch.uint8))
        self._current[index] = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]

    def _begin_step(self, module: nn.Module, args: Any) -> None:
        self._current = [None] * len(self.routers)

    def _end_step(self, module: nn.Module, args: Any, output: Any) -> None:
        missing = [self.routers[i].name for i, c in enumerate(self._current) if c is None]
        if missing:
            raise RuntimeError(f"routers not called in this forward step: {missing[:3]}")
        device = self._current[0].device
        self._steps.append(torch.stack([c.to(device, non_blocking=True) for c in self._current]))
        self._current = [None] * len(self.routers)

    def __enter__(self) -> "RouterTracer":
        for i, r in enumerate(self.routers):
            self._handles.append(r.module.register_forward_hook(partial(self._on_router, i)))
        self._handles.append(self.model.register_forward_pre_hook(self._begin_step))
        self._handles.append(self.model.register_forward_hook(self._end_step))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # -- results -----------------------------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return len(self._steps)

    def clear(self) -> None:
        self._steps.clear()

    def fetch(self) -> list[RoutedStep]:
        """Copy every recorded step to the host in one transfer and unpack it; clears the recorder."""
        if not self._steps:
            return []
        shapes = [s.shape for s in self._steps]
        flat = torch.cat([s.reshape(-1) for s in self._steps]).cpu().numpy()
        self._steps.clear()
        k, ib, wb = self.top_k, self._id_bytes, self._w_bytes
        id_np = np.dtype(np.int16 if ib == 2 else np.int32)
        w_np = np.dtype({2: np.float16, 4: np.float32}.get(wb, np.float16))
        out, offset = [], 0
        for shape in shapes:
            n = int(np.prod(shape))
            step = flat[offset : offset + n].reshape(shape)
            offset += n
            ids = np.ascontiguousarray(step[..., : k * ib]).view(id_np)
            weights = np.ascontiguousarray(step[..., k * ib :]).view(w_np) if wb else None
            out.append(RoutedStep(ids=ids, weights=weights))
        return out
