"""`tracekit route` cost on loopback: added latency (p50, p99) over direct calls, requests/s, classifier accuracy.

Three processes on 127.0.0.1: the fake SGLang upstream (tests/_fake_sglang.py), the router (`tracekit route`, the
real CLI) and this load generator. Measures, in one run (bounded request counts):
- added latency: sequential non-streaming /generate requests with real prompts, alternating direct and through
  the router (so background noise hits both); added p50 = p50(router) - p50(direct), same for p99;
- throughput: non-streaming requests/s through the router at a fixed concurrency, and direct for reference;
- streaming: time to the first SSE chunk, direct vs through the router;
- sampling for ``tracekit watch`` (``--sample-routed 1``, every request asks for its routed experts and is spooled):
  added p50 / p99 over the router without sampling (in-process mode);
- the classifier: held-out domain accuracy on the shared prompt sets (code, math, chat, general) against the
  majority baseline, and its time per prompt.
Targets: p50 added <= 1 ms, p99 added <= 5 ms, >= 2,000 requests/s non-streaming, accuracy >= 0.9.
The machine this was written on has 2 cores shared with other jobs, and the three processes share them too:
throughput here is a floor, not the router's ceiling.

    python benchmarks/bench_route.py [--latency-requests 2000] [--throughput-requests 20000] [--concurrency 64]
                                     [--out benchmarks/out/bench_route.json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np

from tracekit.placement import export
from tracekit.placement.strategies import baselines
from tracekit.placement.strategies import classifier as C
from tracekit.placement.data.types import Cluster, GroupingRule, Placement

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TRACEKIT_SHARED_DATA", ROOT.parent / "shared" / "data"))
SETS = [
    ("gsm8k_test.jsonl", "question", "math"), ("math500_test.jsonl", "problem", "math"),
    ("humaneval.jsonl", "prompt", "code"), ("mbpp.jsonl", "text", "code"),
    ("mt_bench_questions.jsonl", "turns", "chat"), ("vicuna_questions.jsonl", "text", "chat"),
    ("nq_open_dev.jsonl", "question", "general"),
]
FALLBACK = {  # used only without the shared prompt sets
    "code": ["def add(a, b):\n    return a + b", "Write a Python function to reverse a linked list."],
    "math": ["Solve for x: 3x + 5 = 20.", "What is the sum of the first 100 positive integers?"],
    "general": ["who wrote the novel pride and prejudice", "what is the capital city of australia"],
}


def prompt_sets() -> tuple[list[str], list[str], str]:
    p = SHARED / "prompts"
    if all((p / f).is_file() for f, _, _ in SETS):
        t, d = C.load_classifier_data([f"{p / f}:{k}:{dom}" for f, k, dom in SETS])
        return t, d, str(p)
    return [x for v in FALLBACK.values() for x in v], [k for k, v in FALLBACK.items() for _ in v], "inline fallback"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args[:4]} exited: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


def quantiles(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean())}


async def latency(direct: str, routed: str, prompts: list[str], n: int) -> dict:
    out = {"direct": [], "routed": []}
    async with aiohttp.ClientSession() as s:
        for i in range(n + 50):
            body = json.dumps({"text": prompts[i % len(prompts)], "sampling_params": {"max_new_tokens": 16}}).encode()
            for name, base in (("direct", direct), ("routed", routed)) if i % 2 else (("routed", routed), ("direct", direct)):
                t0 = time.perf_counter()
                async with s.post(base + "/generate", data=body, headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    assert r.status == 200
                if i >= 50:  # warm-up discarded
                    out[name].append(time.perf_counter() - t0)
    d, r = quantiles(out["direct"]), quantiles(out["routed"])
    return {"requests_each": n, "direct": d, "routed": r,
            "added_p50_ms": r["p50_ms"] - d["p50_ms"], "added_p99_ms": r["p99_ms"] - d["p99_ms"]}


async def throughput(base: str, prompts: list[str], n: int, conc: int) -> dict:
    bodies = [json.dumps({"text": p, "sampling_params": {"max_new_tokens": 16}}).encode() for p in prompts[:1000]]
    done = errors = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conc)) as s:
        async def worker(k: int) -> None:
            nonlocal done, errors
            i = k
            while i < n:
                async with s.post(base + "/generate", data=bodies[i % len(bodies)],
                                  headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    done += r.status == 200
                    errors += r.status != 200
                i += conc
        await asyncio.gather(*(worker(k) for k in range(min(conc, 200))))  # warm-up
        done = errors = 0
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(conc)))
        dt = time.perf_counter() - t0
    return {"requests": n, "concurrency": conc, "seconds": dt, "requests_per_s": done / dt, "errors": errors}


async def first_chunk(direct: str, routed: str, n: int) -> dict:
    out = {"direct": [], "routed": []}
    body = json.dumps({"text": "Solve 2x = 4.", "stream": True, "fake": {"chunks": 8}}).encode()
    async with aiohttp.ClientSession() as s:
        for i in range(n + 20):
            for name, base in (("direct", direct), ("routed", routed)):
                t0 = time.perf_counter()
                async with s.post(base + "/generate", data=body, headers={"Content-Type": "application/json"}) as r:
                    await r.content.readuntil(b"\n\n")
                    t = time.perf_counter() - t0
                    await r.read()
                if i >= 20:
                    out[name].append(t)
    d, r = quantiles(out["direct"]), quantiles(out["routed"])
    return {"streams_each": n, "direct": d, "routed": r, "added_p50_ms": r["p50_ms"] - d["p50_ms"],
            "added_p99_ms": r["p99_ms"] - d["p99_ms"]}


async def in_process(grouping: Path, prompts: list[str], args) -> dict:
    """Upstream, router and load generator in one event loop: the router's own cost, no cross-process wake-ups."""
    sys.path.insert(0, str(ROOT / "tests"))
    from _fake_sglang import FakeSGLang, start

    from tracekit.route.server import RouteOptions, make_app
    from tracekit.route.table import load_route_table

    up, up_port = await start(FakeSGLang(model_path="fake/model", dp_size=8, record=False).app())
    app = make_app(load_route_table(grouping), RouteOptions(upstream=f"http://127.0.0.1:{up_port}"))
    px, px_port = await start(app)
    spool = tempfile.mkdtemp(prefix="tracekit-spool-")
    # every request sampled for tracekit watch (--sample-routed 1): the worst case of the sampling's cost
    sampled_app = make_app(load_route_table(grouping), RouteOptions(upstream=f"http://127.0.0.1:{up_port}",
                                                                    sample_routed=1.0, spool=spool))
    sx, sx_port = await start(sampled_app)
    direct, routed = f"http://127.0.0.1:{up_port}", f"http://127.0.0.1:{px_port}"
    try:
        lat = await latency(direct, routed, prompts, args.latency_requests)
        lat_sampled = await latency(routed, f"http://127.0.0.1:{sx_port}", prompts, args.latency_requests)
        stream = await first_chunk(direct, routed, args.streams)
        thr = await throughput(routed, prompts, args.throughput_requests, args.concurrency)
        thr_d = await throughput(direct, prompts, args.throughput_requests, args.concurrency)
    finally:
        await sx.cleanup()
        await px.cleanup()
        await up.cleanup()
        import shutil

        shutil.rmtree(spool, ignore_errors=True)
    return {"latency": lat, "sampling_added_over_route": lat_sampled, "streaming_first_chunk": stream,
            "throughput": {"routed": thr, "direct": thr_d}}


def processes(grouping: Path, prompts: list[str], args) -> dict:
    """Upstream and router as their own processes (the router through the real CLI), load from this one."""
    up_port, px_port = free_port(), free_port()
    procs = []
    try:
        up = subprocess.Popen([sys.executable, str(ROOT / "tests" / "_fake_sglang.py"), str(up_port), "fake/model", "8"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(up)
        px = subprocess.Popen([sys.executable, "-m", "tracekit", "route", "--grouping", str(grouping),
                               "--upstream", f"http://127.0.0.1:{up_port}", "--listen", f"127.0.0.1:{px_port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(px)
        direct, routed = f"http://127.0.0.1:{up_port}", f"http://127.0.0.1:{px_port}"
        wait_http(direct + "/get_server_info", up)
        wait_http(routed + "/healthz", px)
        lat = asyncio.run(latency(direct, routed, prompts, args.latency_requests))
        stream = asyncio.run(first_chunk(direct, routed, args.streams))
        thr = asyncio.run(throughput(routed, prompts, args.throughput_requests, args.concurrency))
        thr_d = asyncio.run(throughput(direct, prompts, args.throughput_requests, args.concurrency))
    finally:
        for pr in procs:
            pr.terminate()
            pr.wait(timeout=20)
    return {"latency": lat, "streaming_first_chunk": stream, "throughput": {"routed": thr, "direct": thr_d}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--latency-requests", type=int, default=2000)
    ap.add_argument("--throughput-requests", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--streams", type=int, default=300)
    ap.add_argument("--mode", choices=("both", "in-process", "processes"), default="both")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "bench_route.json")
    args = ap.parse_args()
    args.latency_requests = min(args.latency_requests, 20000)  # bounded
    args.throughput_requests = min(args.throughput_requests, 200000)
    args.streams = min(args.streams, 5000)

    texts, doms, source = prompt_sets()
    acc = C.heldout_accuracy(texts, doms, holdout=0.3, seed=0)
    clf = C.fit_text_classifier(texts, doms, seed=0)
    sample = texts[:: max(1, len(texts) // 2000)]
    t0 = time.perf_counter()
    for t in sample:
        clf.predict_one(t)
    per_prompt_ms = (time.perf_counter() - t0) / len(sample) * 1e3

    c = Cluster(2, 4, num_experts=8, redundant=0)
    doms_sorted = sorted(set(doms))
    nodes = {d: [i % 2] for i, d in enumerate(doms_sorted)}
    p = Placement(c, np.arange(2), baselines.linear(c, 2), "bench", grouping=GroupingRule("domain", domain_nodes=nodes),
                  meta={"model": {"name": "fake", "hub_id": "fake/model"}, "classifier": clf.to_dict()})
    tmp = Path(tempfile.mkdtemp())
    export.export(p, "grouping", tmp / "grouping.json")

    prompts = texts[::7] or texts
    modes = {}
    if args.mode in ("both", "in-process"):
        modes["in_process"] = asyncio.run(in_process(tmp / "grouping.json", prompts, args))
    if args.mode in ("both", "processes"):
        modes["processes"] = processes(tmp / "grouping.json", prompts, args)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    result = {
        "machine": {"cpus": os.cpu_count(), "load_average_1min_after": load,
                    "note": "shared with other jobs; upstream, router and load generator share these cores (loopback only)",
                    "python": sys.version.split()[0]},
        "prompt_source": source,
        "classifier": {**{k: acc[k] for k in ("accuracy", "majority_baseline", "majority_label", "recall", "train", "test")},
                       "predict_ms_per_prompt": per_prompt_ms, "max_chars": clf.params["max_chars"]},
        "modes": modes,
        "targets": {"added_p50_ms": 1.0, "added_p99_ms": 5.0, "requests_per_s": 2000, "accuracy": 0.9},
    }
    result["met"] = {"accuracy": acc["accuracy"] >= 0.9}
    rows = [
        ("classifier held-out accuracy", f"{acc['accuracy']:.3f} (majority {acc['majority_baseline']:.3f})", ">= 0.9", result["met"]["accuracy"]),
        ("classifier time per prompt", f"{per_prompt_ms:.3f} ms", "", None),
    ]
    for mode, r in modes.items():
        lat, stream, thr = r["latency"], r["streaming_first_chunk"], r["throughput"]
        met = {"added_p50_ms": lat["added_p50_ms"] <= 1.0, "added_p99_ms": lat["added_p99_ms"] <= 5.0,
               "requests_per_s": thr["routed"]["requests_per_s"] >= 2000}
        result["met"][mode] = met
        rows += [
            (f"[{mode}] added latency p50", f"{lat['added_p50_ms']:.3f} ms", "<= 1 ms", met["added_p50_ms"]),
            (f"[{mode}] added latency p99", f"{lat['added_p99_ms']:.3f} ms", "<= 5 ms", met["added_p99_ms"]),
            (f"[{mode}]   direct p50 / p99", f"{lat['direct']['p50_ms']:.3f} / {lat['direct']['p99_ms']:.3f} ms", "", None),
            (f"[{mode}]   routed p50 / p99", f"{lat['routed']['p50_ms']:.3f} / {lat['routed']['p99_ms']:.3f} ms", "", None),
            (f"[{mode}] added time to first SSE chunk p50 / p99",
             f"{stream['added_p50_ms']:.3f} / {stream['added_p99_ms']:.3f} ms", "", None),
            (f"[{mode}] requests/s through router (conc {args.concurrency})", f"{thr['routed']['requests_per_s']:.0f}",
             ">= 2000", met["requests_per_s"]),
            (f"[{mode}] requests/s direct (same load generator)", f"{thr['direct']['requests_per_s']:.0f}", "", None),
        ]
        if "sampling_added_over_route" in r:
            smp = r["sampling_added_over_route"]
            rows.append((f"[{mode}] --sample-routed 1: added p50 / p99 over route",
                         f"{smp['added_p50_ms']:.3f} / {smp['added_p99_ms']:.3f} ms", "", None))
    w = max(len(r[0]) for r in rows)
    print(f"{'measure':<{w}}  {'value':>28}  {'target':>8}  met")
    for name, val, target, met in rows:
        print(f"{name:<{w}}  {val:>28}  {target:>8}  {'' if met is None else ('yes' if met else 'NO')}")
    print(f"({os.cpu_count()} CPUs shared with other jobs, 1-min load average {load:.1f} at the end; upstream, router "
          "and load generator on the same cores)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
