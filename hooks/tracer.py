"""Forward hooks that record every router's choice, per forward step, without leaving the device.

Inside the hooks nothing forces a host sync: each router call's (ids, weights) are cast on the device and packed
into one byte tensor (tokens, bytes). Every call is kept, in call order, with the router it came from and its
*pass* (0 for the first call of that router in the step; looped layers call the same router several times per
forward). A step ends when the model's own ``forward`` returns; calls made before any step is open (the encoder of
an encoder-decoder model, which ``generate`` runs once before its first decoder forward) belong to the first step.
:meth:`RouterTracer.fetch` copies *all* recorded calls to the host in a single transfer after ``generate`` has
finished (so at most one device-to-host copy per forward step, in practice one per batch).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import TracekitError
from .base import FoundRouter


@dataclass
class RouterCall:
    """One router call: ``ids`` and ``weights`` are (T, k) over the T tokens it routed."""

    router: int  # index into the tracer's routers
    pass_: int  # 0 for the router's first call in the step, 1 for its second, ...
    ids: np.ndarray
    weights: np.ndarray | None


@dataclass
class RoutedStep:
    """One forward step: every router call, in call order."""

    calls: list[RouterCall]

    @property
    def ids(self) -> np.ndarray:
        """(C, T, k) over the step's C calls, when they all route the same T tokens (decoder-only models)."""
        return np.stack([c.ids for c in self.calls])

    @property
    def weights(self) -> np.ndarray | None:
        if not self.calls or self.calls[0].weights is None:
            return None
        return np.stack([c.weights for c in self.calls])


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
        self.top_k = routers[0].adapter.k(routers[0])
        self._id_bytes = torch.empty((), dtype=self.id_dtype).element_size()
        self._w_bytes = torch.empty((), dtype=weight_dtype).element_size() if weight_dtype is not None else 0
        self._handles: list[Any] = []
        self._pending: list[tuple[int, int, torch.Tensor]] = []  # calls of the step being recorded
        self._passes: dict[int, int] = {}
        self._depth = 0  # nesting of the model's own forward (a wrapper may call itself)
        self._steps: list[list[tuple[int, int, torch.Tensor]]] = []

    # -- hooks -------------------------------------------------------------------------------------------------
    def _on_router(self, index: int, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        found = self.routers[index]
        ids, weights = found.adapter.record(found, args, kwargs, output)
        if ids.shape[-1] != self.top_k:
            raise TracekitError(f"router {found.name} chose {ids.shape[-1]} experts per token, expected {self.top_k}")
        parts = [ids.to(self.id_dtype).contiguous().view(torch.uint8)]
        if self.weight_dtype is not None:
            parts.append(weights.to(self.weight_dtype).contiguous().view(torch.uint8))
        packed = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
        p = self._passes.get(index, 0)
        self._passes[index] = p + 1
        self._pending.append((index, p, packed))

    def _begin_step(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        if self._depth == 0:
            self._passes = {}  # an encoder's calls before the first step stay pending and join it
        self._depth += 1

    def _end_step(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._steps.append(self._pending)
            self._pending, self._passes = [], {}

    def step_module(self) -> nn.Module:
        """The module whose forward is one step: the innermost one holding every decoder router's layer stack.

        Not the model itself: a wrapper's ``generate`` may delegate to an inner model (Qwen3-Omni's thinker), and
        an encoder-decoder's encoder runs outside the decoder's forward (its calls join the first step).
        """
        paths = [r.name.split(".") for r in self.routers if getattr(r, "stack", "decoder") != "encoder"]
        paths = paths or [r.name.split(".") for r in self.routers]
        common = []
        for parts in zip(*paths):
            if len(set(parts)) > 1:
                break
            common.append(parts[0])
        for i in range(len(common)):  # stop above the layer list ("layers.3" -> its owner)
            if common[i] in ("layers", "block", "blocks", "h") and (i + 1 >= len(common) or common[i + 1].isdigit()):
                common = common[:i]
                break
        return self.model.get_submodule(".".join(common)) if common else self.model

    def __enter__(self) -> "RouterTracer":
        for i, r in enumerate(self.routers):
            self._handles.append(r.module.register_forward_hook(partial(self._on_router, i), with_kwargs=True))
        step = self.step_module()
        self._handles.append(step.register_forward_pre_hook(self._begin_step, with_kwargs=True))
        self._handles.append(step.register_forward_hook(self._end_step, with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._depth = 0

    # -- results -----------------------------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return len(self._steps)

    def clear(self) -> None:
        self._steps.clear()
        self._pending, self._passes, self._depth = [], {}, 0

    def fetch(self) -> list[RoutedStep]:
        """Copy every recorded call to the host in one transfer and unpack it; clears the recorder."""
        if not self._steps:
            return []
        calls = [c for step in self._steps for c in step]
        flat = torch.cat([t.to(calls[0][2].device).reshape(-1) for _, _, t in calls]).cpu().numpy()
        k, ib, wb = self.top_k, self._id_bytes, self._w_bytes
        id_np = np.dtype(np.int16 if ib == 2 else np.int32)
        w_np = np.dtype({2: np.float16, 4: np.float32}.get(wb, np.float16))
        out, offset = [], 0
        for step in self._steps:
            recs = []
            for index, p, t in step:
                n = t.numel()
                rows = flat[offset : offset + n].reshape(t.shape)
                offset += n
                ids = np.ascontiguousarray(rows[:, : k * ib]).view(id_np)
                weights = np.ascontiguousarray(rows[:, k * ib :]).view(w_np) if wb else None
                recs.append(RouterCall(router=index, pass_=p, ids=ids, weights=weights))
            out.append(RoutedStep(recs))
        self._steps.clear()
        return out
