"""The rows of one collected batch, in columns, and how a prompt forward's router calls become rows.

Shared by the generate driver (:mod:`tracekit.collect`) and the block-diffusion driver
(:mod:`tracekit.collect_diffusion`): both build :class:`BatchRows` for the store.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import TracekitError


@dataclass
class BatchRows:
    """Columnar rows of one batch (N rows), ready for :func:`build_routes_table`."""

    request_id: np.ndarray
    phase: np.ndarray  # 0 prefill, 1 decode, 2 encoder (schema.PHASES)
    position: np.ndarray
    step: np.ndarray
    layer: np.ndarray
    token_id: np.ndarray
    experts: np.ndarray  # (N, k)
    weights: np.ndarray | None  # (N, k)
    prompt_tokens: int
    generated_tokens: int
    generated_per_request: dict[int, int]
    pass_: np.ndarray | None = None  # call number of the router within its forward (looped layers)
    router: np.ndarray | None = None  # label into the run's gate names, -1 = the layer's only gate


@dataclass(frozen=True)
class CallSite:
    """What the collector needs to know of each traced router: where its rows go."""

    layer: int
    stack: str = "decoder"  # "encoder" rows route the encoder input once per request
    gate: int = -1  # label into the run's gate names; -1 when its layer has one gate


def call_sites(routers: list, gates: list[str] | None = None) -> list[CallSite]:
    gates = gates or []
    return [CallSite(r.layer, getattr(r, "stack", "decoder"), gates.index(r.gate) if getattr(r, "gate", None) else -1)
            for r in routers]


def prompt_block(calls, sites, ids: np.ndarray, mask: np.ndarray, phase: int):
    """Rows of every call in ``calls`` over a left-padded (B, S) input, pad positions dropped."""
    B, S = ids.shape
    real = mask.astype(bool)
    b_idx, s_idx = np.nonzero(real)
    pos = s_idx - (S - real.sum(1))[b_idx]
    n = b_idx.size
    out = []
    for c in calls:
        if c.ids.shape[0] != B * S:
            raise TracekitError(
                f"router of layer {sites[c.router].layer} routed {c.ids.shape[0]} tokens in a forward of {B}x{S}; "
                f"tracekit traces text prompts through every router of a layer (mixed-modality inputs are not supported)")
        k = c.ids.shape[-1]
        out.append(dict(
            b=b_idx, phase=np.full(n, phase, np.int8), position=pos, step=np.full(n, -1, np.int32),
            layer=np.full(n, sites[c.router].layer, np.int16), token=ids[b_idx, s_idx],
            experts=c.ids.reshape(B, S, k)[b_idx, s_idx],
            weights=None if c.weights is None else c.weights.reshape(B, S, k)[b_idx, s_idx],
            pass_=np.full(n, c.pass_, np.int16), router=np.full(n, sites[c.router].gate, np.int32)))
    return out
