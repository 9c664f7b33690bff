"""Time one GPU's routed-expert GEMMs for one step and compare with the roofline ``tracekit place`` estimates.

    python benchmarks/gpu_moe_step.py --model mixtral-8x7b                     # sizes from the registry
    python benchmarks/gpu_moe_step.py --hidden 7168 --intermediate 2048 --experts 9 --top-k 8 --tokens 1,16,128,1024
    python benchmarks/gpu_moe_step.py --model qwen3-30b-a3b --profile h100 --kernel loop

The GPU holds ``--experts`` experts (one EP rank's slots, or the whole model on one GPU); a step is ``--tokens``
tokens, each routed to ``--top-k`` distinct experts among them, uniformly at random (seeded). Per step it runs the
SwiGLU expert MLP on the GPU in BF16: gate and up (hidden -> intermediate), SiLU(gate) * up, down (intermediate ->
hidden), for every expert that received a token, with

- ``loop``: one ``torch.matmul`` per touched expert and matrix, launched back to back;
- ``grouped``: ``torch._grouped_mm`` over the touched experts (the grouped GEMM PyTorch ships for MoE; rows per
  expert padded to 16), where this torch and GPU provide it; its output is checked against ``loop``'s.

Weights rotate through enough copies to exceed the GPU's L2 cache four times, so every step reads its experts from
HBM as a serving step does. Time: CUDA events around ``--iters`` steps after warm-up, median of ``--repeats``.

The estimate is :func:`tracekit.placement.scoring.replay.expert_roofline` on the same step (pairs, distinct experts) with
BF16 weights and activations: max(compute at the profile's dense BF16 TFLOP/s, HBM bytes at its bandwidth).
Its profile is ``--profile``, else ``--gpu-spec FILE.json``, else the one named in the device's name (H100, H200,
B200). The table shows measured / estimate (>= 1: peak rates are not reached; the ratio is how far a real kernel
is from the bound at each batch size) and the achieved TFLOP/s and HBM GB/s. Dispatch and combine are not timed.

On a machine without a CUDA GPU it prints one line saying so and exits 0: nothing is timed or estimated there.
JSON goes to ``$OUT/gpu_moe_step.json`` when ``$OUT`` is set, else ``benchmarks/out/gpu_moe_step.json``. Not a test.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ALIGN = 16  # rows per expert are padded to this for torch._grouped_mm


@dataclass
class Step:
    """One routed step: ``counts`` (experts,) pairs per expert; ``order`` (pairs,) the token of each pair, grouped
    by expert in expert order."""

    counts: np.ndarray
    order: np.ndarray

    @property
    def pairs(self) -> int:
        return int(self.counts.sum())

    @property
    def touched(self) -> int:
        return int((self.counts > 0).sum())


def route(tokens: int, experts: int, top_k: int, seed: int = 0) -> Step:
    """``tokens`` tokens, each to ``top_k`` distinct experts of ``experts``, uniformly (seeded)."""
    rng = np.random.default_rng(seed)
    choice = np.argsort(rng.random((tokens, experts)), axis=1)[:, :top_k]  # (tokens, k) distinct ids per row
    e = choice.ravel()
    tok = np.repeat(np.arange(tokens), top_k)
    order = np.argsort(e, kind="stable")
    return Step(np.bincount(e, minlength=experts), tok[order])


def estimate(step: Step, profile, hidden: int, intermediate: int) -> dict:
    """The roofline tracekit's replay uses, for this one GPU and step (BF16 weights and activations)."""
    from tracekit.placement.scoring.replay import expert_roofline

    compute, hbm = expert_roofline(np.array(step.pairs), np.array(step.touched), profile, hidden_size=hidden,
                                   moe_intermediate_size=intermediate, weight_bytes=2, in_bytes=2, out_bytes=2)
    return {"compute_ms": float(compute) * 1e3, "hbm_ms": float(hbm) * 1e3,
            "estimate_ms": float(max(compute, hbm)) * 1e3, "bound": "hbm" if hbm >= compute else "compute",
            "flops": 6.0 * hidden * intermediate * step.pairs,
            "hbm_bytes": step.touched * 3.0 * hidden * intermediate * 2 + step.pairs * hidden * 4.0}


def expert_mlp_loop(x, order, counts, w_gate, w_up, w_down):
    """(pairs, hidden) outputs of every routed pair, grouped by expert: one matmul per touched expert and matrix.
    ``x`` (tokens, hidden); ``w_gate``/``w_up`` (E, hidden, I); ``w_down`` (E, I, hidden); ``order``/``counts`` as
    in :class:`Step` (torch tensors on ``x``'s device)."""
    import torch

    xs = x[order]
    outs, start = [], 0
    for e, n in enumerate(counts.tolist()):  # host ints: the routing is fixed before timing
        if n:
            xe = xs[start:start + n]
            h = torch.nn.functional.silu(xe @ w_gate[e]) * (xe @ w_up[e])
            outs.append(h @ w_down[e])
            start += n
    return torch.cat(outs)


def grouped_layout(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For ``torch._grouped_mm`` over the touched experts: (touched expert ids, padded row of each pair, cumulative
    padded offsets as int32)."""
    ids = np.flatnonzero(counts)
    n = counts[ids]
    padded = -(-n // ALIGN) * ALIGN
    ends = np.cumsum(padded)
    starts = ends - padded
    rows = np.concatenate([s + np.arange(c) for s, c in zip(starts, n)]) if ids.size else np.zeros(0, np.int64)
    return ids, rows, ends.astype(np.int32)


def expert_mlp_grouped(x, order, rows, offs, total, wt_gate, wt_up, wt_down):
    """The same outputs with three ``torch._grouped_mm`` calls; ``wt_*`` (touched, out, in) contiguous, passed
    transposed (the layout the grouped kernel reads)."""
    import torch

    xp = x.new_zeros((total, x.shape[1]))
    xp[rows] = x[order]
    g = torch._grouped_mm(xp, wt_gate.transpose(-2, -1), offs=offs)
    u = torch._grouped_mm(xp, wt_up.transpose(-2, -1), offs=offs)
    out = torch._grouped_mm(torch.nn.functional.silu(g) * u, wt_down.transpose(-2, -1), offs=offs)
    return out[rows]


def _profile(args, device_name: str):
    from tracekit.placement.scoring.hardware import get_profile, load_gpu_spec

    if args.gpu_spec:
        return load_gpu_spec(args.gpu_spec)
    if args.profile:
        return get_profile(args.profile)
    for name in ("h200", "h100", "b200"):
        if name in device_name.lower():
            return get_profile(name)
    raise SystemExit(f"gpu_moe_step: {device_name!r} matches no built-in profile; pass --profile or --gpu-spec")


def _time(fn, iters: int, repeats: int) -> float:
    """Median over ``repeats`` of the mean ms per call of ``fn(i)`` over ``iters`` calls (CUDA events)."""
    import torch

    for i in range(3):
        fn(i)
    torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for i in range(iters):
            fn(i)
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b) / iters)
    return statistics.median(out)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="registry name: hidden, intermediate, experts and top-k from tracekit's registry")
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--intermediate", type=int, help="one expert's FFN width (moe_intermediate_size)")
    ap.add_argument("--experts", type=int, help="experts on this GPU (default: the model's)")
    ap.add_argument("--top-k", type=int)
    ap.add_argument("--tokens", default="1,8,32,128,512,2048", help="tokens per step, comma-separated")
    ap.add_argument("--profile", choices=["h100", "h200", "b200"])
    ap.add_argument("--gpu-spec", help="JSON GPU description (tracekit place --gpu-spec)")
    ap.add_argument("--kernel", choices=["loop", "grouped", "both"], default="both")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.model:
        from tracekit.importers.geometry import registry_geometry

        g = registry_geometry(args.model)
        if not g or not g.get("moe_intermediate_size"):
            ap.error(f"--model {args.model!r}: not a registry model with expert sizes")
        args.hidden = args.hidden or g["hidden_size"]
        args.intermediate = args.intermediate or g["moe_intermediate_size"]
        args.experts = args.experts or g["num_experts"]
        args.top_k = args.top_k or g["top_k"]
    for name in ("hidden", "intermediate", "experts", "top_k"):
        v = getattr(args, name)
        if v is None or v < 1:
            ap.error(f"--{name.replace('_', '-')} must be a positive integer (or give --model)")
    if args.top_k > args.experts:
        ap.error("--top-k must be at most --experts")
    try:
        args.tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
    except ValueError:
        ap.error("--tokens: comma-separated positive integers")
    if not args.tokens or min(args.tokens) < 1:
        ap.error("--tokens: comma-separated positive integers")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_moe_step: no CUDA GPU here (torch.cuda.is_available() is False); nothing timed, nothing compared")
        return 0
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    prof = _profile(args, props.name)
    H, I, E = args.hidden, args.intermediate, args.experts
    set_bytes = E * 3 * H * I * 2
    l2 = int(getattr(props, "L2_cache_size", 50 << 20))
    free, _ = torch.cuda.mem_get_info()
    copies = max(1, min(-(-4 * l2 // set_bytes), 8))
    if copies * set_bytes > 0.6 * free:
        raise SystemExit(f"gpu_moe_step: {copies} x {set_bytes / 2**30:.1f} GiB of weights do not fit in "
                         f"{free / 2**30:.1f} GiB free; lower --experts")
    torch.manual_seed(args.seed)
    bf = torch.bfloat16
    w = [[torch.randn(E, a, b, device=dev, dtype=bf) * 0.02 for a, b in ((H, I), (H, I), (I, H))] for _ in range(copies)]
    print(f"device {props.name}, profile {prof.name} ({prof.tflops:g} TFLOP/s, {prof.hbm_gbps:g} GB/s HBM); "
          f"hidden {H}, intermediate {I}, {E} experts, top-{args.top_k}; {copies} weight copies of "
          f"{set_bytes / 2**20:.0f} MiB (L2 {l2 / 2**20:.0f} MiB)")
    grouped_ok = args.kernel != "loop" and hasattr(torch, "_grouped_mm")
    rows_out = []
    hdr = f"{'tokens':>7} {'pairs':>7} {'experts':>7} {'bound':>7} {'est ms':>9} {'loop ms':>9} {'x est':>6} " \
          f"{'grouped ms':>10} {'x est':>6} {'TFLOP/s':>8} {'GB/s':>7}"
    print(hdr)
    for T in args.tokens:
        step = route(T, E, args.top_k, args.seed + T)
        est = estimate(step, prof, H, I)
        x = torch.randn(T, H, device=dev, dtype=bf)
        order = torch.as_tensor(step.order, device=dev)
        counts = torch.as_tensor(step.counts)
        row = {"tokens": T, "pairs": step.pairs, "experts_touched": step.touched, **est}
        if args.kernel in ("loop", "both"):
            row["loop_ms"] = _time(lambda i: expert_mlp_loop(x, order, counts, *w[i % copies]), args.iters,
                                   args.repeats)
        if grouped_ok:
            ids, prow, offs = grouped_layout(step.counts)
            idx = torch.as_tensor(ids, device=dev)
            wt = [[m[idx].transpose(-2, -1).contiguous() for m in ws] for ws in w]  # (touched, out, in)
            prow_t, offs_t = torch.as_tensor(prow, device=dev), torch.as_tensor(offs, device=dev)
            total = int(offs[-1])
            try:
                got = expert_mlp_grouped(x, order, prow_t, offs_t, total, *wt[0])
                ref = expert_mlp_loop(x, order, counts, *w[0])
                err = float((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6))
                if err > 2e-2:
                    raise RuntimeError(f"grouped output differs from the loop's (relative {err:.3g})")
                row["grouped_ms"] = _time(lambda i: expert_mlp_grouped(x, order, prow_t, offs_t, total,
                                                                      *wt[i % copies]), args.iters, args.repeats)
            except RuntimeError as exc:  # no grouped kernel for this GPU / torch: say so once, go on with the loop
                print(f"  torch._grouped_mm unavailable here ({str(exc).splitlines()[0][:120]}); loop only")
                grouped_ok = False
            del wt
        best = min(v for k, v in row.items() if k in ("loop_ms", "grouped_ms"))
        row["tflops_achieved"] = est["flops"] / (best * 1e-3) / 1e12
        row["hbm_gbps_achieved"] = est["hbm_bytes"] / (best * 1e-3) / 1e9
        rows_out.append(row)
        ref_ms = est["estimate_ms"]
        cells = []
        for key, width in (("loop_ms", 9), ("grouped_ms", 10)):
            v = row.get(key)
            cells.append(f"{v:.4f}".rjust(width) + " " + (f"{v / ref_ms:.2f}" if v else "-").rjust(6) if v
                         else "-".rjust(width) + " " + "-".rjust(6))
        print(f"{T:>7} {step.pairs:>7} {step.touched:>7} {est['bound']:>7} {ref_ms:>9.4f} {cells[0]} {cells[1]} "
              f"{row['tflops_achieved']:>8.1f} {row['hbm_gbps_achieved']:>7.0f}")
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "out")
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"device": props.name, "profile": dataclasses.asdict(prof),
            "hidden": H, "intermediate": I, "experts": E, "top_k": args.top_k, "torch": torch.__version__}
    (out_dir / "gpu_moe_step.json").write_text(json.dumps({"meta": meta, "rows": rows_out}, indent=1, default=str))
    print(f"wrote {out_dir / 'gpu_moe_step.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
