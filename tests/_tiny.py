"""Tiny models of the generic families (built from the real transformers config classes) for the tests."""
from __future__ import annotations

import torch


def tiny_mixtral(seed: int = 0):
    from transformers import MixtralConfig, MixtralForCausalLM

    from tracekit.models import tiny_config_kwargs
    from tracekit.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    cfg = MixtralConfig(**tiny_config_kwargs(tok), intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2)
    torch.manual_seed(seed)
    return MixtralForCausalLM(cfg).eval(), tok


def tiny_olmoe(seed: int = 0):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    from tracekit.models import tiny_config_kwargs
    from tracekit.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    cfg = OlmoeConfig(**tiny_config_kwargs(tok), intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, num_experts=64, num_experts_per_tok=8)
    torch.manual_seed(seed)
    return OlmoeForCausalLM(cfg).eval(), tok
