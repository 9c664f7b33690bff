"""Tiny random models of every MoE family of the installed transformers, built from the family's own config class.

Sizes are shrunk generically (width, heads, layers, experts) through the config's own attribute names; per-layer
lists (``layer_types``, ``mlp_layer_types``, ...) keep one layer of every kind they list, so a family with several
kinds of MoE layer (DeepSeek V4's hash and learned routers) keeps both, and a hybrid keeps a full-attention layer next
to its MoE layers (Kimi Linear). Lists the config class leaves None are filled as released checkpoints set them, and a
heterogeneous config's ``per_layer_config`` travels with the kept layers, shrunk like the globals. ``OVERRIDES`` holds
the few config fields a family needs beyond that; a family without an entry is built from the generic rules alone, so
a new family is tried as it comes.
"""
from __future__ import annotations

from typing import Any

import torch

from tracekit.hooks.families import MoeFamily

#: generic sizes, by the config's (possibly aliased) attribute name
SIZES: dict[str, Any] = {
    "hidden_size": 64, "d_model": 64, "intermediate_size": 64, "d_ff": 64, "ffn_dim": 64, "ffn_hidden_size": 64,
    "moe_intermediate_size": 16, "expert_ffn_hidden_size": 16, "shared_expert_intermediate_size": 16,
    "moe_shared_expert_intermediate_size": 16, "shared_intermediate_size": 16,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_heads": 4,
    "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
    "q_lora_rank": 16, "kv_lora_rank": 16, "o_lora_rank": 16, "index_n_heads": 2, "index_num_heads": 2, "index_topk": 8,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_num_heads": 4,
    "mamba_n_heads": 4, "mamba_num_heads": 4, "mamba_d_state": 8, "ssm_state_size": 8, "router_hidden_size": 16,
    "num_experts": 8, "n_routed_experts": 8, "num_local_experts": 8, "moe_num_experts": 8,
    "num_experts_per_tok": 2, "moe_topk": 2, "moe_top_k": 2, "moe_k": 2, "top_k_experts": 2, "num_experts_per_token": 2,
    "n_shared_experts": 1, "n_group": 2, "topk_group": 1, "num_expert_group": 2, "zero_expert_num": 3,
    "max_position_embeddings": 512, "sliding_window": 64, "vocab_size": None,  # None: the byte tokenizer's
    "unpadded_vocab_size": None,  # Inkling 2: the lm head's width, the generated ids
    "num_nextn_predict_layers": 0, "first_k_dense_replace": 1, "num_dense_layers": 1,
    "expert_capacity": 64, "router_jitter_noise": 0.0,
}
#: fields set even where the default is None (the config class leaves them to the checkpoint)
FILL_NONE = ("sliding_window", "num_experts_per_tok", "n_routed_experts", "num_experts", "top_k_experts",
             "moe_intermediate_size", "n_shared_experts")
#: layer counts
LAYER_KEYS = ("num_hidden_layers", "num_layers", "n_layers", "encoder_layers", "decoder_layers", "num_decoder_layers")
N_LAYERS = 3
#: sub-configs that are not the language model: shrunk hard, never run on text prompts
VISION_SIZES = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "depth": 1, "num_attention_heads": 2,
                "num_heads": 2, "embed_dim": 32, "out_hidden_size": 64, "projection_dim": 32}  # out: the text width

#: the few fields a family needs beyond the generic rules (keyed by model type)
OVERRIDES: dict[str, dict[str, Any]] = {
    # transformers 5.24 reads rope_theta and clamps with clip_qkv unconditionally: released configs set both
    "dbrx": {"attn_config": {"rope_theta": 500000.0, "clip_qkv": 8.0, "kv_n_heads": 2}},
    # sparse layers every other layer, so three layers hold MoE in both stacks
    "nllb-moe": {"encoder_sparse_step": 2, "decoder_sparse_step": 2},
    "doge": {"is_moe": True},
    "gemma4": {"text_config": {"enable_moe_block": True}},
    "zaya": {"num_experts_per_tok": 1},  # transformers 5.24: "ZAYA currently supports num_experts_per_tok=1 only"
    "hunyuan_v1_moe": {"head_dim": 16},
    "nemotron_h": {"n_groups": 1, "mamba_head_dim": 16},
    "glm5_next": {"text_config": {"index_topk": 16}},
    # the config class leaves QSA unset while its default layer types build QSA indexers: set it as a checkpoint would
    "qwen4_exp": {"text_config": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 256,
                                  "indexer_budget": 16, "indexer_compress_ratio": 4}},
    # multimodal RoPE: the sections (as released configs give them) scaled to the shrunk head dim 16 (64 / 4 heads):
    # Ernie 4.5 VL [22, 22, 20] over 128 / 2 -> [3, 3, 2] over 8; GLM-4.5V [8, 12, 12] over 128 * 0.5 / 2 -> [1, 2, 1]
    "ernie4_5_vl_moe": {"text_config": {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0,
                                                            "mrope_section": [3, 3, 2]}}},
    "glm4v_moe": {"text_config": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                      "partial_rotary_factor": 0.5, "mrope_section": [1, 2, 1]}}},
    "inkling2": {"vision_config": {"text_hidden_size": 64}},
    # layer 1 of 3 looped, 3 passes: the tracer must keep every pass (the default loop, layers 6..17, lies beyond
    # a 3-layer model, so nothing would loop); one layer per attention-residual block so the loop bounds divide it
    "inkling2_loop": {"vision_config": {"text_hidden_size": 64},
                      "text_config": {"n_layers_per_attn_res_block": 1, "loop_layer_index_start": 1,
                                      "loop_layer_index_end": 2, "loop_num_passes": 3, "loop_gate_rank": 16}},
    # built as released, with its talker (an MoE stack of its own, which text generation must not run); the
    # released talker config carries spatial_merge_size and the shared expert's width, the config class leaves them
    "qwen3_omni_moe": {"thinker_config": {"vision_start_token_id": 259},
                       "talker_config": {"spatial_merge_size": 2,
                                         "text_config": {"shared_expert_intermediate_size": 16}}},
    # LFM2-8B-A1B's layer_types (the config class leaves it None): short-conv layers with full attention between
    "lfm2_moe": {"layer_types": ["conv", "full_attention", "conv"]},
    # Jamba-v0.1 (attention every 8th layer from layer 4, MoE every 2nd from 1) in three layers: an attention layer
    # without MoE and a Mamba layer with MoE, as there; the config class derives its layer types from these periods
    "jamba": {"attn_layer_period": 3, "attn_layer_offset": 2},
    # the vision/audio adapters' widths must equal the towers' and the text model's (shrunk) widths
    "dots3_note": {"vision_config": {"adapter_in_dim": 32, "adapter_out_dim": 64},
                   "audio_config": {"adapter_input_size": 32, "adapter_out_dim": 64}},
    # canvases of two tokens: three new tokens take two canvases, so the encoder's pass over a canvas is traced too
    "diffusion_gemma": {"canvas_length": 2},
    "switch_transformers": {"encoder_sparse_step": 2, "decoder_sparse_step": 2, "num_sparse_encoder_layers": 2,
                            "num_sparse_decoder_layers": 2},
}


def _resolve(cfg_cls, name: str) -> str:
    return getattr(cfg_cls, "attribute_map", {}).get(name, name)


def _layer_subset(lists: dict[str, list], n_layers: int, n: int) -> list[int]:
    """Indices of at least ``n`` of ``n_layers`` layers that keep one layer of every kind of *every* per-layer list.

    A hybrid stack lists attention kinds and MLP kinds separately (Kimi Linear: ``layer_types`` and
    ``mlp_layer_types``): the subset keeps the first layer of each kind of each list, so a MoE layer and a full
    attention layer (the cache needs one) both survive.
    """
    keep: list[int] = []
    for values in lists.values():
        as_str = [str(x) for x in values]
        for v in dict.fromkeys(as_str):
            if as_str.index(v) not in keep:
                keep.append(as_str.index(v))
    for i in range(n_layers):
        if len(keep) >= n:
            break
        if i not in keep:
            keep.append(i)
    return sorted(keep)


def _is_layer_refs(name: str, value: Any, n_layers: int) -> bool:
    """A list of layer numbers (``kv_source_layers``: per layer, the layer whose K/V it reads; ``index_layers``,
    ``mlp_only_layers``: which layers are of a kind): named ``*_layers``, integers below the layer count."""
    return (name.endswith("_layers") and isinstance(value, list) and bool(value)
            and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < n_layers for x in value))


def _close_over_sources(idx: list[int], per_layer_refs: dict[str, list[int]]) -> list[int]:
    """``idx`` plus every layer a kept layer refers to (Kolibri's K/V-sharing layers read an earlier layer's
    cache: that layer is kept too), so the renumbered references stay inside the tiny model."""
    keep = set(idx)
    while True:
        more = {v[i] for v in per_layer_refs.values() for i in keep} - keep
        if not more:
            return sorted(keep)
        keep |= more


def _per_layer_overrides(default) -> dict[int, dict[str, Any]]:
    """A heterogeneous config's per-layer overrides (transformers' ``per_layer_config``), by layer index.

    Reading the default's global values is what shrinking needs, so the default instance is opened for that.
    """
    if not getattr(default, "is_heterogeneous", False):
        return {}
    default.allow_global_per_layer_attribute_access = True
    return {int(i): dict(v) for i, v in (default.to_dict().get("per_layer_config") or {}).items()}


def _shrink_like_global(layer: dict[str, Any], default, kwargs: dict[str, Any]) -> dict[str, Any]:
    """One layer's overrides, each size scaled by the factor its global field was shrunk by (Dots3's sliding layers
    keep half the heads of its full layers: so does the tiny model)."""
    out = {}
    for k, v in layer.items():
        g = getattr(default, k, None)
        sized = isinstance(v, int) and not isinstance(v, bool) and isinstance(g, int) and g
        if sized and isinstance(kwargs.get(k), int):
            v = max(1, round(v * kwargs[k] / g))
        out[k] = v
    return out


#: a released checkpoint's ``mlp_layer_types`` where the config class leaves it None: dense first layers, then MoE
FIRST_DENSE_LAYERS = 1


def _fill_layer_types(default, kwargs: dict[str, Any], n: int) -> None:
    """Per-layer lists the config class leaves to the checkpoint, filled as released checkpoints set them.

    ``mlp_layer_types`` None (DeepSeek-OCR-2): ``FIRST_DENSE_LAYERS`` dense layers, the rest sparse. A hybrid
    ``layer_types`` of linear layers only (Granite 4.0-H's default): its last layer becomes full attention, as in
    every released hybrid checkpoint; transformers 5.24 cannot ``generate`` with a cache of linear layers only.
    """
    if "mlp_layer_types" in vars(default) and default.mlp_layer_types is None and "mlp_layer_types" not in kwargs:
        kwargs["mlp_layer_types"] = ["dense"] * FIRST_DENSE_LAYERS + ["sparse"] * (n - FIRST_DENSE_LAYERS)
    types = kwargs.get("layer_types")
    if isinstance(types, list) and types and set(types) == {"linear_attention"}:
        kwargs["layer_types"] = types[:-1] + ["full_attention"]


def tiny_kwargs(cfg_cls, vocab: int, overrides: dict[str, Any] | None = None, vision: bool = False) -> dict[str, Any]:
    """Constructor kwargs for a tiny instance of ``cfg_cls`` (recursing into its sub-configs)."""
    default = cfg_cls()
    overrides_by_layer = _per_layer_overrides(default)
    kwargs: dict[str, Any] = {}
    sizes = VISION_SIZES if vision else SIZES
    for name, value in sizes.items():
        real = _resolve(cfg_cls, name)
        if real in kwargs or not hasattr(default, real):
            continue
        cur = getattr(default, real)
        if isinstance(cur, bool) or not isinstance(cur, (int, float)) and cur is not None:
            continue
        if cur is None and name not in FILL_NONE:
            continue
        kwargs[real] = vocab if value is None else value
    if not vision and hasattr(default, "kv_lora_rank") and "num_key_value_heads" in kwargs:
        kwargs["num_key_value_heads"] = kwargs.get("num_attention_heads", 4)  # MLA: one kv head per query head
    for key in LAYER_KEYS + (("depth",) if vision else ()):
        real = _resolve(cfg_cls, key)
        n_default = getattr(default, real, None) if hasattr(default, real) else None
        if not isinstance(n_default, int) or isinstance(n_default, bool):
            continue
        if vision:  # the vision tower never runs on text: its first layers, as many as VISION_SIZES keeps
            if real not in kwargs or kwargs[real] >= n_default:
                continue
            idx = list(range(kwargs[real]))
        elif real in kwargs:
            continue
        else:
            idx = None
        lists = {k: v for k, v in vars(default).items() if isinstance(v, list) and len(v) == n_default}
        refs = {k: v for k, v in vars(default).items() if _is_layer_refs(k, v, n_default)}
        if idx is None:  # per-layer lists: keep one layer of every kind of every list, in order
            kinds = {k: v for k, v in lists.items() if k not in refs}
            if overrides_by_layer and real == "num_hidden_layers":  # heterogeneous: other overrides, other kind
                kinds["per_layer_config"] = [repr(sorted(overrides_by_layer.get(i, {}).items()))
                                             for i in range(n_default)]
            idx = _layer_subset(kinds, n_default, N_LAYERS) if n_default > N_LAYERS else list(range(n_default))
            idx = _close_over_sources(idx, {k: v for k, v in refs.items() if k in lists})
        kwargs[real] = len(idx)
        for k, v in lists.items():
            kwargs[k] = [v[i] for i in idx]
        for k, v in refs.items():  # layer numbers inside lists: renumbered to the kept layers
            new_index = {old: new for new, old in enumerate(idx)}
            kwargs[k] = ([new_index[v[i]] for i in idx] if k in lists
                         else [new_index[x] for x in v if x in new_index])
        if overrides_by_layer and real == "num_hidden_layers":  # as a saved checkpoint's config carries it
            kwargs["per_layer_config"] = {
                new: _shrink_like_global(overrides_by_layer[old], default, kwargs)
                for new, old in enumerate(idx) if old in overrides_by_layer}
        if not vision:
            _fill_layer_types(default, kwargs, len(idx))
    if not vision:
        for tok in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
            if hasattr(default, tok):
                kwargs[tok] = {"bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258,
                               "decoder_start_token_id": 256}[tok]
    if vision:  # per-layer lists of an encoder shrunk to one layer (Muse Spark's audio stages, vision layer types)
        for key in ("num_hidden_layers", "depth", "num_layers"):
            real, n = _resolve(cfg_cls, key), kwargs.get(_resolve(cfg_cls, key))
            n_default = getattr(default, real, None)
            if isinstance(n, int) and isinstance(n_default, int) and n < n_default:
                for k, v in vars(default).items():
                    if isinstance(v, (list, tuple)) and len(v) == n_default and k not in kwargs:
                        kwargs[k] = type(v)(v[:n])
    for key, sub_cls in (getattr(cfg_cls, "sub_configs", None) or {}).items():
        if getattr(default, key, None) is None:
            continue
        sub_cls = type(getattr(default, key))  # AutoConfig entries: the class the default instance has
        is_vision = any(s in key for s in ("vision", "audio", "code2wav", "visual"))
        sub = tiny_kwargs(sub_cls, vocab, (overrides or {}).get(key), vision=is_vision)
        if sub:
            kwargs[key] = sub
    subs = getattr(cfg_cls, "sub_configs", None) or {}  # a dict override of a sub-config was applied above
    kwargs.update({k: v for k, v in (overrides or {}).items() if not (isinstance(v, dict) and k in subs)})
    if hasattr(default, "initializer_range") and kwargs:
        kwargs["initializer_range"] = 0.15
    return {k: v for k, v in kwargs.items() if v is not None or k == "sliding_window"}


def tiny_config(family: MoeFamily):
    from transformers import CONFIG_MAPPING

    from tracekit.tokenizer import VOCAB_SIZE

    cfg_cls = CONFIG_MAPPING[family.model_type]
    return cfg_cls(**tiny_kwargs(cfg_cls, VOCAB_SIZE, OVERRIDES.get(family.model_type)))


def tiny_model(family: MoeFamily, seed: int = 0):
    """(model, tokenizer) of a tiny random-init model of ``family`` that can ``generate`` on text."""
    from tracekit.models import generate_model_for
    from tracekit.tokenizer import byte_tokenizer

    cls, cfg = generate_model_for(tiny_config(family))
    torch.manual_seed(seed)
    model = cls._from_config(cfg, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # learned correction biases are non-zero in real checkpoints
        for name, buf in model.named_buffers():
            if name.endswith(("e_score_correction_bias", "expert_bias")) and buf.is_floating_point():
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.05)
            if name.endswith("tid2eid"):  # DeepSeek V4's hash table: a fixed token -> experts map
                buf.copy_(torch.stack([torch.randperm(buf.shape[-1] * 0 + _n_experts(model), generator=g)[: buf.shape[-1]]
                                       for _ in range(buf.shape[0])]))
    return model, byte_tokenizer()


def _n_experts(model) -> int:
    cfg = model.config.get_text_config()
    for a in ("n_routed_experts", "num_local_experts", "num_experts"):
        if isinstance(getattr(cfg, a, None), int):
            return getattr(cfg, a)
    raise AttributeError("expert count")
