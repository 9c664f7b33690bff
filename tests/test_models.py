"""Model loading: the real from_pretrained path on a local checkpoint, and the registry's one-line errors."""
from __future__ import annotations

import duckdb
import pytest

from tracekit.collect import CollectOptions, collect
from tracekit.errors import TracekitError
from tracekit.models import REGISTRY, get_spec, load_model, parse_max_memory


def _routes(run):
    return duckdb.connect().sql(f"select request_id, phase, position, layer, experts from '{run}/routes/*.parquet' "
                                "order by all").fetchall()


def test_local_checkpoint_goes_through_from_pretrained_and_routes_like_the_preset(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    preset = load_model("tiny-deepseek-v3")
    ckpt = tmp_path / "ckpt"
    preset.model.save_pretrained(ckpt)
    preset.tokenizer.save_pretrained(ckpt)
    loaded = load_model(str(ckpt), device_map="cpu", dtype="float32")
    assert type(loaded.model).__name__ == "DeepseekV3ForCausalLM" and loaded.spec.hub_id == str(ckpt)
    assert next(loaded.model.parameters()).device.type == "cpu"
    common = dict(dataset="humaneval", limit=3, max_new_tokens=4)
    collect(CollectOptions(model="tiny-deepseek-v3", out=tmp_path / "a", **common), loaded=preset)
    b = collect(CollectOptions(model=str(ckpt), out=tmp_path / "b", device_map="cpu", dtype="float32", **common))
    assert b.manifest["model"]["hub_id"] == str(ckpt) and b.manifest["geometry"]["n_group"] == 8
    assert _routes(tmp_path / "a") == _routes(tmp_path / "b")  # the saved bias and router weights came back


def test_registry_and_option_errors(tmp_path):
    assert {"deepseek-v3", "qwen3-235b-a22b", "qwen3-30b-a3b", "llama4-maverick", "llama4-scout"} <= set(REGISTRY)
    assert REGISTRY["deepseek-v3"].geometry["moe_layers"] == list(range(3, 61))
    assert get_spec("org/some-moe").hub_id == "org/some-moe"
    with pytest.raises(TracekitError, match="unknown model 'nope'"):
        get_spec("nope")
    assert parse_max_memory("0=70GiB,cpu=200GiB") == {0: "70GiB", "cpu": "200GiB"}
    with pytest.raises(TracekitError, match="DEVICE=SIZE"):
        parse_max_memory("70GiB")
    with pytest.raises(TracekitError, match="--dtype"):
        load_model("tiny-qwen3-moe", dtype="float8")
    with pytest.raises(TracekitError, match="tiny presets only"):
        load_model(str(tmp_path), layers=2)


def test_llama4_multimodal_checkpoint_traces_its_text_model(tmp_path, monkeypatch):
    """A Llama 4 (Maverick-style, image-text) checkpoint: routers are found inside the wrapper, and loading by
    path gives the text model with the same weights, which is what `collect` traces."""
    import torch
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    from tracekit.hooks import find_routers
    from tracekit.tokenizer import VOCAB_SIZE, byte_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = byte_tokenizer()
    text = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=32, intermediate_size_mlp=128,
                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=16,
                num_experts_per_tok=1, interleave_moe_layer_step=2, max_position_embeddings=512,
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                attention_chunk_size=512)
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28,
                  patch_size=14, vision_output_dim=64, projector_input_dim=64, projector_output_dim=64)
    torch.manual_seed(0)
    wrapper = Llama4ForConditionalGeneration(Llama4Config(text_config=text, vision_config=vision)).eval()
    found = find_routers(wrapper)
    assert [r.layer for r in found] == [1, 3] and found[0].name.startswith("language_model.")
    wrapper.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    loaded = load_model(str(tmp_path / "ckpt"), device_map="cpu", dtype="float32")
    params = dict(loaded.model.named_parameters())
    assert [r.layer for r in find_routers(loaded.model)] == [1, 3]
    for name, p in wrapper.language_model.named_parameters():
        assert torch.equal(params[name], p), name
    res = collect(CollectOptions(model=str(tmp_path / "ckpt"), dataset="humaneval", limit=2, max_new_tokens=3,
                                 device_map="cpu", dtype="float32", out=tmp_path / "run"))
    assert res.complete and res.manifest["geometry"]["moe_layers"] == [1, 3]
