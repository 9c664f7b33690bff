"""Block-diffusion generation (DiffusionGemma): which rows its router calls become.

``DiffusionGemmaForBlockDiffusion.generate`` (transformers 5.24) is autoregressive over *canvases* of
``config.canvas_length`` (C) tokens and diffuses inside each canvas:

1. the **encoder** stack (a causal LM that fills the KV cache) runs over the prompt, and at the start of every later
   canvas over the previous canvas's C accepted tokens;
2. the **decoder** stack then runs up to ``max_denoising_steps`` forwards over the whole canvas (C noisy tokens), each
   one a denoising iteration, until every sequence's canvas is stable (or the steps run out);
3. the canvas is appended to the sequence (tokens after an EOS become pad) and the next canvas starts.

Both stacks have routers and experts; their expert weights are tied (the same experts, layer by layer), so both
stacks' rows carry the model's own layer index. What the experts consume becomes rows as follows:

- encoder over the prompt: phase ``encoder``, one row per real prompt token (pads dropped), step null, pass 0;
- encoder over canvas c: phase ``encoder``, one row per canvas token at its position in the request
  (prompt length + c * C + j), its accepted token, step null, pass 0;
- decoder forward t (global, 1-based ``step``), denoising iteration i of canvas c (``pass`` = i, 0-based): phase
  ``decode``, one row per canvas position, ``token_id`` null (the canvas is still noise being denoised).

A request whose canvas c holds its EOS keeps the rows of canvases 0..c (every denoising forward of them) and the
encoder rows of canvases 0..c-1; later canvases of a batch that goes on for other requests are padding and are
dropped, as the autoregressive path drops steps after EOS. Within a batch a request whose canvas has already
converged still runs every forward the batch runs (the experts consume it), so its rows are kept.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .batch_rows import BatchRows, prompt_block
from .errors import TracekitError


def is_block_diffusion(model) -> bool:
    """True for a model whose ``generate`` is block diffusion over canvases (DiffusionGemma)."""
    config = getattr(model, "config", None)
    return isinstance(getattr(config, "canvas_length", None), int) and hasattr(model, "_denoising_step")


def generate_kwargs(opts, pad_token_id: int | None) -> dict[str, Any]:
    """The block-diffusion ``generate`` options for a collection: whole canvases covering ``max_new_tokens``; with
    ``ignore_eos`` no EOS criterion (every canvas runs). Sampling is the model's own (a random initial canvas)."""
    kw: dict[str, Any] = {"max_new_tokens": opts.max_new_tokens, "pad_token_id": pad_token_id}
    if opts.ignore_eos:
        kw["eos_token_id"] = None
    return kw


def diffusion_rows(steps: list, sites: list, input_ids: np.ndarray, attention_mask: np.ndarray,
                   sequences: np.ndarray, canvas_length: int, eos_ids: set[int], request_ids: np.ndarray):
    """The tracer's steps (one per decoder forward, the encoder calls joining the forward after them) of one
    left-padded batch -> :class:`tracekit.batch_rows.BatchRows` (see the module docstring).

    Shapes: ``input_ids``/``attention_mask`` (B, S); ``sequences`` (B, S + n * C) what ``generate`` returned.
    """

    B, S = input_ids.shape
    C = int(canvas_length)
    generated = sequences[:, S:]
    n_canvas = generated.shape[1] // C
    starts = [t for t, s in enumerate(steps) if any(sites[c.router].stack == "encoder" for c in s.calls)]
    if not steps or starts[:1] != [0] or len(starts) != n_canvas or generated.shape[1] != n_canvas * C:
        raise TracekitError(f"block diffusion: {len(starts)} encoder passes for {generated.shape[1]} generated tokens "
                            f"in canvases of {C}; tracekit cannot tie the router calls to canvases")
    canvas_of_step = np.searchsorted(np.asarray(starts), np.arange(len(steps)), side="right") - 1
    real_len = attention_mask.astype(bool).sum(1)
    gen_len = np.full(B, generated.shape[1], dtype=np.int64)  # tokens before the first EOS
    for b in range(B):
        hits = np.nonzero(np.isin(generated[b], list(eos_ids)))[0] if eos_ids else np.zeros(0, dtype=np.int64)
        if hits.size:
            gen_len[b] = hits[0]
    last_canvas = np.minimum(gen_len // C, n_canvas - 1)  # the canvas holding the EOS, else the last one

    blocks = prompt_block([c for c in steps[0].calls if sites[c.router].stack == "encoder"], sites, input_ids,
                           attention_mask, 2)
    j = np.tile(np.arange(C), B)
    bb = np.repeat(np.arange(B), C)
    iteration = 0
    for t, step in enumerate(steps):
        c = int(canvas_of_step[t])
        iteration = 0 if t in starts else iteration + 1
        for call in step.calls:
            site = sites[call.router]
            encoder = site.stack == "encoder"
            if encoder and t == 0:
                continue  # the prompt, above
            if call.ids.shape[0] != B * C:
                raise TracekitError(f"block diffusion: router of layer {site.layer} routed {call.ids.shape[0]} tokens "
                                    f"where a canvas of {B}x{C} was expected; tracekit cannot tie rows to tokens")
            col = c - 1 if encoder else c  # an encoder pass encodes the previous canvas
            keep = (col < last_canvas[bb]) if encoder else (col <= last_canvas[bb])
            b, jj = bb[keep], j[keep]
            n = b.size
            blocks.append(dict(
                b=b, phase=np.full(n, 2 if encoder else 1, np.int8), position=real_len[b] + col * C + jj,
                step=np.full(n, -1 if encoder else t + 1, np.int32), layer=np.full(n, site.layer, np.int16),
                token=generated[b, col * C + jj] if encoder else np.full(n, -1, np.int64),
                experts=call.ids[keep], weights=None if call.weights is None else call.weights[keep],
                pass_=np.full(n, 0 if encoder else iteration, np.int16), router=np.full(n, site.gate, np.int32)))

    def cat(key):
        return np.concatenate([blk[key] for blk in blocks])

    per_request = {int(request_ids[b]): int(gen_len[b]) for b in range(B)}
    has_w = bool(blocks) and blocks[0]["weights"] is not None
    return BatchRows(
        request_id=request_ids[cat("b")], phase=cat("phase"), position=cat("position"), step=cat("step"),
        layer=cat("layer"), token_id=cat("token"), experts=cat("experts"), weights=cat("weights") if has_w else None,
        prompt_tokens=int(real_len.sum()), generated_tokens=int(sum(per_request.values())),
        generated_per_request=per_request, pass_=cat("pass_"), router=cat("router"),
    )
