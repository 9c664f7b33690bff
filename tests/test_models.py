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
    a = collect(CollectOptions(model="tiny-deepseek-v3", out=tmp_path / "a", **common), loaded=preset)
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
