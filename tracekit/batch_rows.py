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


def rows_from_steps(
    steps: list,
    layers: list[int] | list[CallSite],
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    generated: np.ndarray,
    eos_ids: set[int],
    request_ids: np.ndarray,
    decoder_prompt: np.ndarray | None = None,
) -> BatchRows:
    """Turn the tracer's steps for one left-padded batch into rows (unsorted), dropping pad positions.

    Shapes: ``input_ids``/``attention_mask`` (B, S); ``generated`` (B, G) tokens after the prompt. ``layers`` gives,
    per traced router, its layer (or a :class:`CallSite` with its stack and gate). Step 0 holds the prefill calls
    (B*S tokens each) and, for an encoder-decoder model, the encoder calls (B*S) and the decoder calls over
    ``decoder_prompt`` (B, S_d: the decoder start token); step s >= 1 holds decode calls of B tokens each, one per
    router and pass. Decode step s routes ``generated[:, s-1]``, kept while it comes before the request's EOS.
    """
    sites = [x if isinstance(x, CallSite) else CallSite(int(x)) for x in layers]
    B, S = input_ids.shape
    dec_ids = input_ids if decoder_prompt is None else decoder_prompt
    dec_mask = attention_mask if decoder_prompt is None else np.ones_like(decoder_prompt)
    first = steps[0].calls if steps else []
    blocks = prompt_block([c for c in first if sites[c.router].stack == "encoder"], sites, input_ids, attention_mask, 2)
    blocks += prompt_block([c for c in first if sites[c.router].stack != "encoder"], sites, dec_ids, dec_mask, 0)
    dec_len = dec_mask.astype(bool).sum(1)

    n_dec = len(steps) - 1
    gen_len = np.full(B, generated.shape[1], dtype=np.int64)
    for b in range(B):
        hits = np.nonzero(np.isin(generated[b], list(eos_ids)))[0]
        if hits.size:
            gen_len[b] = hits[0]
    per_request = {int(request_ids[b]): 0 for b in range(B)}
    if n_dec > 0:
        alive = np.arange(n_dec)[None, :] < gen_len[:, None]  # (B, T)
        db, dt = np.nonzero(alive)
        n = db.size
        # calls are grouped by (router, pass): the same in every decode step
        keys = [(c.router, c.pass_) for c in steps[1].calls]
        for s in steps[2:]:
            if [(c.router, c.pass_) for c in s.calls] != keys:
                raise TracekitError("the routers called changed between decode steps; tracekit cannot tie rows to tokens")
        for j, (r, p) in enumerate(keys):
            ids = np.stack([s.calls[j].ids for s in steps[1:]], axis=1)  # (B, T, k)
            w = None if steps[1].calls[j].weights is None else np.stack([s.calls[j].weights for s in steps[1:]], axis=1)
            if ids.shape[0] != B:
                raise TracekitError(f"router of layer {sites[r].layer} routed {ids.shape[0]} tokens in a decode step of "
                                    f"batch {B}; tracekit cannot tie rows to tokens")
            blocks.append(dict(
                b=db, phase=np.ones(n, np.int8), position=dec_len[db] + dt, step=(dt + 1).astype(np.int32),
                layer=np.full(n, sites[r].layer, np.int16), token=generated[db, dt], experts=ids[db, dt],
                weights=None if w is None else w[db, dt], pass_=np.full(n, p, np.int16),
                router=np.full(n, sites[r].gate, np.int32)))
        counts = alive.sum(1)
        per_request = {int(request_ids[b]): int(counts[b]) for b in range(B)}

    def cat(key):
        return np.concatenate([blk[key] for blk in blocks])

    has_w = bool(blocks) and blocks[0]["weights"] is not None
    return BatchRows(  # unsorted: _merge orders the whole chunk once
        request_id=request_ids[cat("b")],
        phase=cat("phase"),
        position=cat("position"),
        step=cat("step"),
        layer=cat("layer"),
        token_id=cat("token"),
        experts=cat("experts"),
        weights=cat("weights") if has_w else None,
        prompt_tokens=int(attention_mask.astype(bool).sum()),
        generated_tokens=int(sum(per_request.values())),
        generated_per_request=per_request,
        pass_=cat("pass_"),
        router=cat("router"),
    )


def merge_rows(rows: list[BatchRows]) -> BatchRows:
    def cat(name):
        return np.concatenate([getattr(r, name) for r in rows])

    req, lay, pos, ph, ps = cat("request_id"), cat("layer"), cat("position"), cat("phase"), cat("pass_")
    # layer-major file order: best compression, row groups prune by layer; encoder rows before decoder rows
    order = np.lexsort((ps, pos, -ph.astype(np.int16) // 2, req, lay))
    per = {}
    for r in rows:
        per.update(r.generated_per_request)
    return BatchRows(
        request_id=req[order], phase=ph[order], position=pos[order], step=cat("step")[order],
        layer=lay[order], token_id=cat("token_id")[order], experts=cat("experts")[order],
        weights=cat("weights")[order] if rows[0].weights is not None else None,
        prompt_tokens=sum(r.prompt_tokens for r in rows), generated_tokens=sum(r.generated_tokens for r in rows),
        generated_per_request=per, pass_=ps[order], router=cat("router")[order],
    )
