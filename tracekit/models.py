"""Model registry: names for the real checkpoints, tiny random-init presets, and loading.

Real checkpoints load through ``from_pretrained`` with accelerate's ``device_map`` so a model larger than one GPU
spreads over the machine's GPUs. Tiny presets are built from the real config classes with the real router geometry
of the big model (expert count, top-k, grouping, scoring, shared experts, which layers are MoE) and a small width,
random-initialised with a fixed seed, with the in-memory byte tokenizer: they need no network.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import torch

from .errors import TracekitError


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hub_id: str | None  # None for tiny presets
    family: str
    summary: str
    #: published routing geometry (what `tracekit models` lists without downloading anything)
    geometry: dict[str, Any] = field(default_factory=dict)
    build_tiny: Callable[..., tuple[Any, Any]] | None = None

    @property
    def is_tiny(self) -> bool:
        return self.build_tiny is not None


def _geo(num_layers, moe_layers, num_experts, top_k, hidden_size, **extra) -> dict[str, Any]:
    return {
        "num_layers": num_layers,
        "moe_layers": list(moe_layers),
        "num_experts": num_experts,
        "top_k": top_k,
        "hidden_size": hidden_size,
        **extra,
    }


# Expert sizes (moe_intermediate_size: one routed expert's FFN width; expert_dtype: how the released checkpoint stores
# the routed experts' weights): the installed transformers config classes' defaults where they name the checkpoint
# (DeepSeek V3 2048, V4 Flash 2048, Qwen3-30B 768, Qwen3.5 512, GLM-4.5-Air 1408, gpt-oss 2880, Mixtral 14336, Llama 4
# 8192), Qwen3-235B-A22B's config.json 1536; DeepSeek V3/R1 ship FP8 (e4m3, 128x128 blocks) weights, gpt-oss and
# DeepSeek V4 Flash MXFP4 experts (vLLM's DeepseekV4FP8Config docstring: expert_dtype "fp4" for V4-Flash), the rest BF16.
DEEPSEEK_V3_GEOMETRY = _geo(61, range(3, 61), 256, 8, 7168, n_group=8, topk_group=4, n_shared_experts=1, scoring="sigmoid+bias",
                            moe_intermediate_size=2048, expert_dtype="float8_e4m3fn")
QWEN3_235B_GEOMETRY = _geo(94, range(94), 128, 8, 4096, n_group=None, topk_group=None, n_shared_experts=0, scoring="softmax",
                           moe_intermediate_size=1536, expert_dtype="bfloat16")
QWEN3_30B_GEOMETRY = _geo(48, range(48), 128, 8, 2048, n_group=None, topk_group=None, n_shared_experts=0, scoring="softmax",
                          moe_intermediate_size=768, expert_dtype="bfloat16")
LLAMA4_MAVERICK_GEOMETRY = _geo(48, range(1, 48, 2), 128, 1, 5120, n_group=None, topk_group=None, n_shared_experts=1, scoring="sigmoid",
                                moe_intermediate_size=8192, expert_dtype="bfloat16")
LLAMA4_SCOUT_GEOMETRY = _geo(48, range(48), 16, 1, 5120, n_group=None, topk_group=None, n_shared_experts=1, scoring="sigmoid",
                             moe_intermediate_size=8192, expert_dtype="bfloat16")
MIXTRAL_8X7B_GEOMETRY = _geo(32, range(32), 8, 2, 4096, n_group=None, topk_group=None, n_shared_experts=0, scoring="softmax",
                             moe_intermediate_size=14336, expert_dtype="bfloat16")
# Newer families. Each value is checked two ways: the installed transformers config class's defaults (the class
# named in parentheses, whose docstring names the checkpoint) and a public model page found with the search tool.
# DeepSeek V4 Flash (DeepseekV4Config; NVIDIA NeMo AutoModel's DeepSeek-V4-Flash page): 43 layers, all MoE, 256 routed
# + 1 shared, top-6, sqrt-softplus scores x 1.5; the first 3 layers route by a token-id hash table (mlp_layer_types).
DEEPSEEK_V4_FLASH_GEOMETRY = _geo(43, range(43), 256, 6, 4096, n_group=None, topk_group=None, n_shared_experts=1,
                                  scoring="sqrtsoftplus", hash_layers=[0, 1, 2],
                                  moe_intermediate_size=2048, expert_dtype="mxfp4")
# Qwen3.5-35B-A3B (Qwen3_5MoeTextConfig; the model card of its GPTQ quantisation): 40 layers (30 linear attention
# + 10 full), every one MoE, 256 experts top-8, one shared expert.
QWEN3_5_35B_GEOMETRY = _geo(40, range(40), 256, 8, 2048, n_group=None, topk_group=None, n_shared_experts=1, scoring="softmax",
                            moe_intermediate_size=512, expert_dtype="bfloat16")
# GLM-4.5-Air (Glm4MoeConfig defaults, although its docstring names GLM-4.5; apxml.com's GLM-4.5-Air page quoting
# its config.json): 46 layers, first dense, 128 routed + 1 shared, top-8, sigmoid + correction bias, 1 group.
GLM4_5_AIR_GEOMETRY = _geo(46, range(1, 46), 128, 8, 4096, n_group=1, topk_group=1, n_shared_experts=1, scoring="sigmoid+bias",
                           moe_intermediate_size=1408, expert_dtype="bfloat16")
# gpt-oss-120b (GptOssConfig defaults; apxml.com / crafiq.ai gpt-oss-120b pages): 36 layers, all MoE, 128 experts top-4.
GPT_OSS_120B_GEOMETRY = _geo(36, range(36), 128, 4, 2880, n_group=None, topk_group=None, n_shared_experts=0, scoring="softmax",
                             moe_intermediate_size=2880, expert_dtype="mxfp4")


# ---------------------------------------------------------------------------------------------------------------
# tiny presets
# ---------------------------------------------------------------------------------------------------------------
TINY_HIDDEN = 64
TINY_CONTEXT = 4096


def tiny_config_kwargs(tok) -> dict[str, Any]:
    """Config fields every tiny model shares: the byte tokenizer's vocabulary and special ids, the small width, and
    an init scale (0.15) at which random routers are not saturated (larger init gives DeepSeek's sigmoid scores ~1)."""
    from .tokenizer import VOCAB_SIZE

    return dict(vocab_size=VOCAB_SIZE, hidden_size=TINY_HIDDEN, max_position_embeddings=TINY_CONTEXT,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                initializer_range=0.15)


def _tiny_deepseek_v3(layers: int = 4, seed: int = 0):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from .tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    cfg = DeepseekV3Config(
        **tiny_config_kwargs(tok),
        intermediate_size=128,
        moe_intermediate_size=16,
        num_hidden_layers=layers,
        first_k_dense_replace=min(1, layers - 1),  # real model: 3 dense layers first; keep one dense layer
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=256,
        num_experts_per_tok=8,
        n_group=8,
        topk_group=4,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(cfg)
    # DeepSeek V3 learns a non-zero expert bias (e_score_correction_bias); random-init leaves it at zero.
    g = torch.Generator().manual_seed(seed + 1)
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.copy_(torch.randn(buf.shape, generator=g) * 0.05)
    return model, tok


def _tiny_qwen3_moe(layers: int = 4, seed: int = 0):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from .tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    cfg = Qwen3MoeConfig(
        **tiny_config_kwargs(tok),
        intermediate_size=128,
        moe_intermediate_size=16,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=128,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    )
    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(cfg), tok


def _tiny_llama4(layers: int = 4, seed: int = 0):
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    from .tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    cfg = Llama4TextConfig(
        **tiny_config_kwargs(tok),
        intermediate_size=32,
        intermediate_size_mlp=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=128,
        num_experts_per_tok=1,
        interleave_moe_layer_step=2,  # Maverick: MoE every other layer, dense in between
        attention_chunk_size=TINY_CONTEXT,
    )
    torch.manual_seed(seed)
    return Llama4ForCausalLM(cfg), tok


REGISTRY: dict[str, ModelSpec] = {
    s.name: s
    for s in [
        ModelSpec("deepseek-v3", "deepseek-ai/DeepSeek-V3", "deepseek", "671B total, 37B active", DEEPSEEK_V3_GEOMETRY),
        ModelSpec("deepseek-r1", "deepseek-ai/DeepSeek-R1", "deepseek", "671B total, 37B active", DEEPSEEK_V3_GEOMETRY),
        ModelSpec("qwen3-235b-a22b", "Qwen/Qwen3-235B-A22B", "qwen-moe", "235B total, 22B active", QWEN3_235B_GEOMETRY),
        ModelSpec("qwen3-30b-a3b", "Qwen/Qwen3-30B-A3B", "qwen-moe", "30B total, 3B active", QWEN3_30B_GEOMETRY),
        ModelSpec("llama4-maverick", "meta-llama/Llama-4-Maverick-17B-128E-Instruct", "llama4", "400B total, 17B active", LLAMA4_MAVERICK_GEOMETRY),
        ModelSpec("llama4-scout", "meta-llama/Llama-4-Scout-17B-16E-Instruct", "llama4", "109B total, 17B active", LLAMA4_SCOUT_GEOMETRY),
        ModelSpec("mixtral-8x7b", "mistralai/Mixtral-8x7B-Instruct-v0.1", "generic", "47B total, 13B active", MIXTRAL_8X7B_GEOMETRY),
        ModelSpec("deepseek-v4-flash", "deepseek-ai/DeepSeek-V4-Flash", "generic", "284B total, 13B active; hash + learned routers", DEEPSEEK_V4_FLASH_GEOMETRY),
        ModelSpec("qwen3.5-35b-a3b", "Qwen/Qwen3.5-35B-A3B", "generic", "35B total, 3B active; hybrid linear attention", QWEN3_5_35B_GEOMETRY),
        ModelSpec("glm-4.5-air", "zai-org/GLM-4.5-Air", "generic", "106B total, 12B active", GLM4_5_AIR_GEOMETRY),
        ModelSpec("gpt-oss-120b", "openai/gpt-oss-120b", "generic", "117B total, 5.1B active", GPT_OSS_120B_GEOMETRY),
        ModelSpec("tiny-deepseek-v3", None, "deepseek", "random-init, DeepSeek V3 router geometry", {}, _tiny_deepseek_v3),
        ModelSpec("tiny-qwen3-moe", None, "qwen-moe", "random-init, Qwen3-235B router geometry", {}, _tiny_qwen3_moe),
        ModelSpec("tiny-llama4", None, "llama4", "random-init, Llama 4 Maverick router geometry", {}, _tiny_llama4),
    ]
}


def get_spec(name: str) -> ModelSpec:
    """Registry entry for ``name``; a hub id or local path not in the registry gets an ad-hoc spec."""
    if name in REGISTRY:
        return REGISTRY[name]
    if Path(name).is_dir() or ("/" in name and not name.startswith((".", "/"))):
        return ModelSpec(name, name, "auto", "hub id or local path")
    raise TracekitError(
        f"unknown model {name!r}; use a registry name ({', '.join(REGISTRY)}), a hub id like org/name, or a local path"
    )


@dataclass
class LoadedModel:
    name: str
    model: Any
    tokenizer: Any
    spec: ModelSpec
    revision: str | None = None

    @property
    def context_length(self) -> int | None:
        cfg = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else self.model.config
        return getattr(cfg, "max_position_embeddings", None)


_DTYPES = {"auto": "auto", "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
           "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}


def parse_dtype(dtype: str):
    if dtype not in _DTYPES:
        raise TracekitError(f"unknown --dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _cached(hub_id: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(hub_id, "config.json", revision=revision), str)
    except Exception:
        return False


def check_weights_reachable(name: str, revision: str | None = None) -> None:
    """Fail at once, with one line, when a real checkpoint's weights cannot be had (offline and not cached)."""
    spec = get_spec(name)
    if spec.is_tiny or Path(spec.hub_id).is_dir() or _cached(spec.hub_id, revision) or hub_reachable():
        return
    raise TracekitError(
        f"weights of {name} ({spec.hub_id}) are unreachable: not a local path, not in the Hugging Face cache, and the "
        f"hub cannot be reached; pass a local checkpoint path, or trace offline with a tiny preset "
        f"(--model tiny-deepseek-v3 | tiny-qwen3-moe | tiny-llama4) and local prompts (--data-file FILE)"
    )


def load_model(
    name: str,
    *,
    device_map: str | None = None,
    dtype: str = "auto",
    max_memory: dict | None = None,
    revision: str | None = None,
    layers: int | None = None,
    seed: int = 0,
) -> LoadedModel:
    """Load a model by registry name, hub id or local path, ready for tracing (eval mode).

    Tiny presets are built locally (``layers`` overrides their depth). Real checkpoints go through
    ``AutoModelForCausalLM.from_pretrained`` with ``device_map``/``dtype``/``max_memory``; when the weights are
    neither local nor cached and the hub is unreachable this fails at once with one line.
    """
    spec = get_spec(name)
    if spec.is_tiny:
        model, tok = spec.build_tiny(layers=layers or 4, seed=seed)
        torch_dtype = parse_dtype(dtype)
        if torch_dtype not in ("auto", torch.float32):
            model = model.to(torch_dtype)
        if device_map and device_map not in ("cpu", "auto"):
            model = model.to(device_map)
        elif device_map == "auto" and torch.cuda.is_available():
            model = model.to("cuda")
        model.eval()
        return LoadedModel(name, model, tok, spec)
    if layers is not None:
        raise TracekitError("--layers applies to tiny presets only; real checkpoints keep their depth")

    check_weights_reachable(name, revision)
    hub_id = spec.hub_id
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {"dtype": parse_dtype(dtype), "revision": revision}
    if device_map:
        kwargs["device_map"] = device_map
    if max_memory:
        kwargs["max_memory"] = max_memory
    try:
        from transformers import AutoConfig

        tok = AutoTokenizer.from_pretrained(hub_id, revision=revision)
        # causal LM first (a multimodal checkpoint such as Llama 4 loads as its text model), then image-text-to-text,
        # seq2seq (Switch, NLLB-MoE) and the family's own class where no auto class maps it (Qwen3-Omni-MoE)
        cls, _ = generate_model_for(AutoConfig.from_pretrained(hub_id, revision=revision))
        model = cls.from_pretrained(hub_id, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise TracekitError(f"cannot load {name} ({hub_id}): {(str(exc).splitlines() or [type(exc).__name__])[0]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    model.eval()
    rev = getattr(model.config, "_commit_hash", None) or revision
    return LoadedModel(name, model, tok, spec, revision=rev)


def parse_max_memory(value: str | None) -> dict | None:
    """``"0=70GiB,1=70GiB,cpu=200GiB"`` -> accelerate's max_memory dict."""
    if not value:
        return None
    out: dict[Any, str] = {}
    for part in value.split(","):
        if "=" not in part:
            raise TracekitError(f"bad --max-memory entry {part!r}; use DEVICE=SIZE pairs like 0=70GiB,cpu=200GiB")
        k, v = part.split("=", 1)
        out[int(k) if k.strip().isdigit() else k.strip()] = v.strip()
    return out


# ---------------------------------------------------------------------------------------------------------------
# which model class runs `generate` for a config (any family, including those no auto class maps)
# ---------------------------------------------------------------------------------------------------------------
_GENERATE_MAPPINGS = ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
                      "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES")


def model_class_for(config) -> type:
    """The transformers class that runs ``generate`` on text for ``config`` (see :func:`generate_model_for`)."""
    return generate_model_for(config)[0]


def generate_model_for(config) -> tuple[type, Any]:
    """(class, config) that run ``generate`` on text for ``config``, preferring what ``load_model`` loads.

    Order: the causal-LM auto mapping (for a multimodal config, its text model on the text sub-config, as
    ``AutoModelForCausalLM`` loads Llama 4); then image-text-to-text, seq2seq and multimodal-LM mappings; then
    the checkpoint's own ``architectures``; then the family's modeling module's ``*ForConditionalGeneration`` /
    ``*ForCausalLM`` class (Qwen3-Omni-MoE has no auto class). A config none of these cover is one line.
    """
    import importlib

    import transformers
    from transformers.models.auto import modeling_auto
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    model_type = getattr(config, "model_type", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for mapping in _GENERATE_MAPPINGS:
        name = getattr(modeling_auto, mapping, {}).get(model_type)
        if isinstance(name, (list, tuple)):
            name = name[0]
        cls = getattr(transformers, name, None) if name else None
        if cls is None:
            continue
        wanted = getattr(cls, "config_class", None)
        if wanted in (type(config), None):
            return cls, config
        if wanted is type(text):
            return cls, text
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None and hasattr(cls, "generate"):
            return cls, config
    module = model_type_to_module_name(model_type) if model_type else ""
    try:
        mod = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    except Exception:
        mod = None
    if mod is not None:
        for suffix in ("ForConditionalGeneration", "ForCausalLM"):
            for name, cls in vars(mod).items():
                if (name.endswith(suffix) and isinstance(cls, type) and getattr(cls, "config_class", None) is type(config)
                        and hasattr(cls, "can_generate") and cls.can_generate()):
                    return cls, config
    raise TracekitError(
        f"transformers {transformers.__version__} has no model class that generates text for model type "
        f"{model_type!r}; tracekit traces models that run generate (causal LM, image-text-to-text or seq2seq)"
    )


def text_model(model):
    """The module whose ``generate`` produces the text tokens of ``model``: the model itself, or the thinker of a
    thinker/talker model (Qwen3-Omni-MoE).

    Qwen3-Omni's wrapper ``generate`` hands its own ``thinker_max_new_tokens`` (1024) to the thinker, whatever
    ``max_new_tokens`` says, and with a talker (released checkpoints) goes on to generate speech: its talker, an MoE
    stack of its own, runs over audio codec frames after the text is finished, not over the text tokens. Text
    generation runs the thinker alone, so tracekit drives and traces the thinker; the talker's routers never run.
    """
    thinker = getattr(model, "thinker", None)
    if isinstance(thinker, torch.nn.Module) and callable(getattr(thinker, "generate", None)):
        return thinker
    return model
