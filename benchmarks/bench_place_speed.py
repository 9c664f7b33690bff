"""Speed of ``tracekit place --strategy all`` on a DeepSeek-V3-shaped synthetic run (issue 18's target).

The run: :func:`tracekit.synth.generate_run` with 256 experts, top-8, the 58 MoE layers 3..60 of 61, 300 requests
of 64-512 prompt and 32-512 decode tokens, seed 0 (9,408,354 token-layers), cached under benchmarks/out/. The
command: ``python -m tracekit place RUN --nodes 4 --gpus-per-node 8 --redundant 32 --strategy all -o FILE`` in a
child process under ``/usr/bin/time -v`` (wall, user + system CPU, peak RSS). Target: <= 120 s wall on this 2-core
machine, peak RSS <= 2 GB (10^9 bytes). The machine is shared, so the CPU time (user + system) is printed beside the wall time:
wall >> CPU means the process waited for a core.

``--reference FILE``: compare the written placement byte for byte with FILE (a ``place -o`` file written before a
change), so a speed-up can be shown not to change the result.

Usage: ``python benchmarks/bench_place_speed.py [--reference FILE] [--profile]`` (``--profile``: cProfile the
command in this process instead, top 25 by cumulative time); writes benchmarks/out/bench_place_speed.json.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUT = ROOT / "benchmarks" / "out"
RUN = OUT / "synth-dsv3-speed-300r"
PARAMS = {"num_experts": 256, "top_k": 8, "moe_layers": list(range(3, 61)), "num_layers": 61, "requests": 300,
          "prompt_tokens": [64, 512], "decode_tokens": [32, 512], "seed": 0}
ARGS = ["--nodes", "4", "--gpus-per-node", "8", "--redundant", "32", "--strategy", "all"]
WALL_S, RSS_GB = 120.0, 2.0


def run_dir() -> Path:
    from tracekit.store import read_manifest, write_manifest
    from tracekit.synth import generate_run

    m = read_manifest(RUN) if RUN.exists() else None
    if m and m.get("status") == "complete" and m.get("args", {}).get("bench_params") == PARAMS:
        return RUN
    import shutil

    shutil.rmtree(RUN, ignore_errors=True)
    p = dict(PARAMS)
    generate_run(RUN, **{**p, "prompt_tokens": tuple(p["prompt_tokens"]), "decode_tokens": tuple(p["decode_tokens"])})
    m = read_manifest(RUN)
    m.setdefault("args", {})["bench_params"] = PARAMS
    write_manifest(RUN, m)
    return RUN


def timed(run: Path, out: Path) -> dict:
    """Run place under /usr/bin/time -v; wall, CPU and peak RSS from its report."""
    out.unlink(missing_ok=True)
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "tracekit", "place", str(run), *ARGS, "-o", str(out)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"place failed ({res.returncode}): {res.stderr[-2000:]}")
    rep = res.stderr

    def num(label: str) -> float:
        return float(re.search(rf"{re.escape(label)}: ([0-9.:]+)", rep).group(1))

    return {"wall_s": wall, "user_s": num("User time (seconds)"), "system_s": num("System time (seconds)"),
            "peak_rss_gb": num("Maximum resident set size (kbytes)") * 1024 / 1e9,  # time -v's kbytes are KiB
            "pick_line": next((ln for ln in res.stdout.splitlines() if ln.startswith("* pick:")), None)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reference", type=Path, help="a place -o file to compare the new one with, byte for byte")
    ap.add_argument("--profile", action="store_true", help="cProfile place in this process (top 25, cumulative)")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    run = run_dir()
    print(f"run {run} ready in {time.perf_counter() - t0:.1f} s (0 = cached)")
    placement = OUT / "bench_place_speed.placement.json"
    if args.profile:
        import cProfile
        import pstats

        from tracekit.cli import main as cli

        prof = cProfile.Profile()
        placement.unlink(missing_ok=True)
        prof.enable()
        try:
            cli(["place", str(run), *ARGS, "-o", str(placement)])
        except SystemExit:
            pass
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
        return
    r = timed(run, placement)
    r["cpu_s"] = r["user_s"] + r["system_s"]
    r["wall_ok"], r["rss_ok"] = r["wall_s"] <= WALL_S, r["peak_rss_gb"] <= RSS_GB
    if args.reference:
        r["identical_to_reference"] = placement.read_bytes() == args.reference.read_bytes()
    print(f"place --strategy all on {run.name} (4x8 GPUs, R=32): wall {r['wall_s']:.1f} s (target <= {WALL_S:.0f}: "
          f"{'met' if r['wall_ok'] else 'NOT met'}), CPU {r['cpu_s']:.1f} s (user {r['user_s']:.1f} + system "
          f"{r['system_s']:.1f}), peak RSS {r['peak_rss_gb']:.2f} GB (target <= {RSS_GB:.0f}: "
          f"{'met' if r['rss_ok'] else 'NOT met'})")
    print(r["pick_line"])
    if args.reference:
        print(f"placement identical to {args.reference}: {r['identical_to_reference']}")
    (OUT / "bench_place_speed.json").write_text(json.dumps(r, indent=2) + "\n")
    print(f"wrote {OUT / 'bench_place_speed.json'}")


if __name__ == "__main__":
    main()
