"""Tracing overhead of ``generate`` on a random-init model of Qwen3-30B-A3B's real geometry (the GPU check).

    python benchmarks/gpu_overhead.py                          # cuda, bf16, all 48 layers (~61 GB of weights)
    python benchmarks/gpu_overhead.py --device cpu --layers 2 --batch 1 --prompt-len 16 --new-tokens 4 --repeats 1

What it measures, with tracing (``tracekit.hooks.RouterTracer`` + one ``fetch()`` per generate) on and off,
interleaved (off/on, on/off alternately) after one warm-up each:

- median of the paired ratios ``t_on / t_off`` and generated tokens per second either way;
- with ``torch.profiler`` on one short generate each way (cuda only): host syncs (``cudaStreamSynchronize``,
  ``cudaDeviceSynchronize``) and device-to-host copies (``Memcpy DtoH``, ``cudaMemcpy``). Tracing must add no host
  sync per layer: the extra counts are compared with the number of MoE layers times forward steps.

Geometry (``Qwen/Qwen3-30B-A3B`` config.json): hidden 2048, 48 layers, 128 experts, top-8 (normalised),
moe_intermediate_size 768, 32 heads of 128, 4 KV heads, vocab 151936. Prints a table; writes JSON to
``$OUT/gpu_overhead.json`` when ``$OUT`` is set, else ``benchmarks/out/gpu_overhead.json``. Not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

QWEN3_30B_A3B = dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
                     num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                     num_experts_per_tok=8, norm_topk_prob=True, vocab_size=151936, rms_norm_eps=1e-6,
                     max_position_embeddings=40960, decoder_sparse_step=1, mlp_only_layers=[],
                     tie_word_embeddings=False)


def build_model(layers: int, device: str, dtype: torch.dtype):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(**{**QWEN3_30B_A3B, "num_hidden_layers": layers})
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created (and random-initialised) directly in bf16 on the device
    try:
        with torch.device(device):
            model = Qwen3MoeForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model.eval(), cfg


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_generate(model, inputs, new_tokens: int, tracer_factory=None):
    """One greedy generate of exactly ``new_tokens``; with a tracer, recording plus its single fetch."""
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        if tracer_factory is None:
            model.generate(**inputs, **kw)
            return 0
        with tracer_factory() as tracer:
            model.generate(**inputs, **kw)
        return len(tracer.fetch())


def timed(fn, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def profile_counts(fn, device: str) -> dict[str, int]:
    """Host syncs and device-to-host copies seen by the profiler during ``fn()`` (all zero on cpu)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    counts = {"stream_sync": 0, "device_sync": 0, "memcpy_dtoh": 0, "cuda_memcpy_calls": 0}
    for ev in prof.key_averages():
        name = ev.key
        if name == "cudaStreamSynchronize":
            counts["stream_sync"] += ev.count
        elif name == "cudaDeviceSynchronize":
            counts["device_sync"] += ev.count
        elif "Memcpy DtoH" in name:
            counts["memcpy_dtoh"] += ev.count
        elif name in ("cudaMemcpy", "cudaMemcpyAsync"):
            counts["cuda_memcpy_calls"] += ev.count
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=48, help="decoder layers (48 = the real model)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--profile-new-tokens", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    from tracekit.hooks import RouterTracer, find_routers

    device, dtype = args.device, getattr(torch, args.dtype)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; run with --device cpu --layers 2 for a smoke test")
    t_build = time.perf_counter()
    model, cfg = build_model(args.layers, device, dtype)
    sync(device)
    t_build = time.perf_counter() - t_build
    routers = find_routers(model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, cfg.vocab_size, (args.batch, args.prompt_len), generator=g).to(device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    factory = lambda: RouterTracer(model, routers)  # noqa: E731

    off = lambda: run_generate(model, inputs, args.new_tokens)  # noqa: E731
    on = lambda: run_generate(model, inputs, args.new_tokens, factory)  # noqa: E731
    timed(off, device)
    timed(on, device)  # warm-up both paths
    t_off, t_on = [], []
    for r in range(args.repeats):
        order = [(off, t_off), (on, t_on)] if r % 2 == 0 else [(on, t_on), (off, t_off)]
        for fn, sink in order:
            sink.append(timed(fn, device))
    ratios = [b / a for a, b in zip(t_off, t_on)]
    gen_tokens = args.batch * args.new_tokens
    steps = run_generate(model, inputs, args.profile_new_tokens, factory)

    # on cpu this only smoke-tests the path: there are no CUDA events to count
    p_off = profile_counts(lambda: run_generate(model, inputs, args.profile_new_tokens), device)
    p_on = profile_counts(lambda: run_generate(model, inputs, args.profile_new_tokens, factory), device)
    extra = {k: p_on[k] - p_off[k] for k in p_off}
    per_layer_budget = len(routers) * steps  # what one sync or copy per layer per step would add
    prof = {"off": p_off, "on": p_on, "extra": extra, "forward_steps": steps, "moe_layers": len(routers),
            "per_layer_sync": (extra["stream_sync"] + extra["device_sync"]) >= per_layer_budget,
            "per_layer_dtoh": extra["memcpy_dtoh"] >= per_layer_budget, "cuda_events": device.startswith("cuda")}

    result = {
        "model": "random-init Qwen3-30B-A3B geometry", "layers": args.layers, "moe_layers": len(routers),
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else device, "dtype": args.dtype,
        "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "build_s": round(t_build, 2), "t_off_s": t_off, "t_on_s": t_on,
        "median_ratio": statistics.median(ratios),
        "tokens_per_s_off": gen_tokens / statistics.median(t_off),
        "tokens_per_s_on": gen_tokens / statistics.median(t_on),
        "peak_gpu_gib": (torch.cuda.max_memory_allocated() / 2**30) if device.startswith("cuda") else None,
        "profile": prof, "torch": torch.__version__,
    }

    table = Table(title=f"tracing overhead, {result['device']}, {args.layers} layers, batch {args.batch}, "
                        f"prompt {args.prompt_len}, +{args.new_tokens} tokens")
    for col in ("", "tracing off", "tracing on"):
        table.add_column(col, justify="right")
    table.add_row("median generate s", f"{statistics.median(t_off):.3f}", f"{statistics.median(t_on):.3f}")
    table.add_row("generated tokens/s", f"{result['tokens_per_s_off']:,.1f}", f"{result['tokens_per_s_on']:,.1f}")
    table.add_row("median ratio on/off", "", f"{result['median_ratio']:.4f}")
    for k in ("stream_sync", "device_sync", "memcpy_dtoh", "cuda_memcpy_calls"):
        table.add_row(f"{k} ({steps} steps)", str(prof["off"][k]), f"{prof['on'][k]} (+{prof['extra'][k]})")
    verdict = "YES" if prof["per_layer_sync"] or prof["per_layer_dtoh"] else "no"
    table.add_row("host sync per layer?", "", verdict if prof["cuda_events"] else "n/a (no CUDA events)")
    Console().print(table)

    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).resolve().parent / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out_dir / 'gpu_overhead.json'}")


if __name__ == "__main__":
    main()
