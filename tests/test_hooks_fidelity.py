"""The recorded ids and weights equal what the experts actually consumed, at every MoE layer, every forward step.

Independent witness: a forward pre-hook on each layer's experts module captures the (ids, weights) passed into it.
Llama 4's experts take the already-weighted inputs instead, so there the witness recovers the choice from them:
row e of the routed input is ``hidden * score_e`` (zero for experts not chosen).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests._tiny import tiny_mixtral, tiny_olmoe
from tracekit.hooks import RouterTracer, find_routers
from tracekit.models import load_model

PROMPTS = ["def add(a, b):\n    return", "Natalia sold clips to 48 of her friends in April."]


def _model(name):
    if name == "mixtral":
        return tiny_mixtral()
    if name == "olmoe":
        return tiny_olmoe()
    lm = load_model(name)
    return lm.model, lm.tokenizer


def _witness(model, routers):
    """Pre-hooks on the experts that log (ids, weights) as consumed, in call order."""
    calls, handles = [], []
    for r in routers:
        block = model.get_submodule(r.name.rsplit(".", 1)[0])
        if r.adapter.family == "llama4":
            state = {}

            def on_block(mod, args, state=state):
                state["hidden"] = args[0].reshape(-1, args[0].shape[-1]).float()

            def on_experts(mod, args, state=state, k=r.adapter.top_k(r.module), e=r.adapter.num_experts(r.module)):
                h = state["hidden"]  # (T, H)
                routed = args[0].float().reshape(e, h.shape[0], -1)  # (E, T, H)
                scores = (routed * h[None]).sum(-1) / (h * h).sum(-1)[None]  # (E, T)
                w, ids = torch.topk(scores.T, k, dim=1)
                # a zero hidden state (the pad embedding) carries no information about its scores: mark it
                known = (h * h).sum(-1) > 0
                calls.append((torch.where(known[:, None], ids, -1), torch.where(known[:, None], w, float("nan"))))

            handles.append(block.register_forward_pre_hook(on_block))
            handles.append(block.experts.register_forward_pre_hook(on_experts))
        else:
            handles.append(block.experts.register_forward_pre_hook(lambda mod, args: calls.append((args[1], args[2]))))
    return calls, handles


@pytest.mark.parametrize("name", ["tiny-deepseek-v3", "tiny-qwen3-moe", "tiny-llama4", "mixtral", "olmoe"])
def test_recorded_choice_equals_consumed(name):
    model, tok = _model(name)
    routers = find_routers(model)
    calls, handles = _witness(model, routers)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with RouterTracer(model, routers, weight_dtype=torch.float32) as tracer, torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    for h in handles:
        h.remove()
    steps = tracer.fetch()
    L = len(routers)
    assert len(steps) == out.shape[1] - enc["input_ids"].shape[1]  # one prefill + one step per fed-back token
    assert len(calls) == len(steps) * L
    assert steps[0].ids.shape[1] == enc["input_ids"].numel()  # prefill routes every position, pads included
    for s, step in enumerate(steps):
        assert step.ids.shape[0] == L
        for layer in range(L):
            ids, w = calls[s * L + layer]
            if name == "tiny-llama4":  # recovered by division: equal up to float rounding, where recoverable
                known = ids.numpy()[:, 0] >= 0
                assert known.sum() >= enc["attention_mask"].sum() if s == 0 else known.all()
                np.testing.assert_array_equal(step.ids[layer][known], ids.numpy()[known])
                np.testing.assert_allclose(step.weights[layer][known], w.numpy()[known], rtol=1e-4, atol=1e-6)
                continue
            np.testing.assert_array_equal(step.ids[layer], ids.numpy())  # same experts, in the router's order
            np.testing.assert_array_equal(step.weights[layer], w.float().numpy())


def test_deepseek_order_is_routers_not_sorted():
    """DeepSeek V3 returns unsorted top-k; the trace keeps that order (sorting would lose the pairing)."""
    lm = load_model("tiny-deepseek-v3")
    routers = find_routers(lm.model)
    enc = lm.tokenizer(PROMPTS[:1], return_tensors="pt")
    with RouterTracer(lm.model, routers) as tracer, torch.inference_mode():
        lm.model(**enc)
    ids = tracer.fetch()[0].ids
    assert (np.diff(ids, axis=-1) < 0).any() and (np.diff(ids, axis=-1) > 0).any()


def test_deepseek_preset_has_real_router_geometry():
    lm = load_model("tiny-deepseek-v3")
    gate = find_routers(lm.model)[0].module
    assert (gate.num_experts, gate.top_k, gate.num_group, gate.topk_group) == (256, 8, 8, 4)
    assert gate.e_score_correction_bias.abs().sum() > 0  # non-zero bias, as the real model learns
    assert lm.model.config.first_k_dense_replace >= 1 and lm.model.config.n_shared_experts == 1


def test_tracer_does_not_sync_or_copy_in_hooks():
    """Inside generate the recorded tensors stay on the model's device; fetch() makes the one host copy."""
    lm = load_model("tiny-qwen3-moe")
    routers = find_routers(lm.model)
    enc = lm.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with RouterTracer(lm.model, routers) as tracer, torch.inference_mode():
        lm.model.generate(**enc, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
        assert tracer.num_steps == 3
        assert all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for step in tracer._steps for _, _, t in step)
    assert len(tracer.fetch()) == 3 and tracer.num_steps == 0


def test_unknown_model_gets_one_line_error():
    from tracekit.errors import TracekitError

    with pytest.raises(TracekitError, match="no MoE router found.*supported families: DeepSeek"):
        find_routers(torch.nn.Sequential(torch.nn.Linear(2, 2)))
