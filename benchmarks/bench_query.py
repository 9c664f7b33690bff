"""Query and analysis benchmark on synthetic DeepSeek-V3-width runs (E=256, k=8, 58 MoE layers).

    python benchmarks/bench_query.py                                   # every run, every step (hours when loaded)
    python benchmarks/bench_query.py --runs short-10k --steps load,correlation
    python benchmarks/bench_query.py --table                           # only print/write what was measured

Runs (generated once with tracekit.synth.generate_run into --data-root, then reused):
  short-10k, short-30k, short-100k  10,000 / 30,000 / 100,000 short requests (prompt 8-16, decode 2-8 tokens):
                                    ~10M / ~30M / ~100M token-layer rows (the cost-grows-linearly series)
  long-2033                         2,033 long requests (prompt 128-1024, decode 32-512): ~100M rows

Steps (each in a fresh child process, so its wall time and peak RSS are its own):
  load          load per layer and expert from the loads view (per-chunk summaries), best of 3
  load_rows     the same from every row (tracekit/sql/load_by_layer_expert_rows.sql), best of 3
  pandas        load_rows in pandas: read_parquet -> explode -> groupby.size, file by file
  imbalance, domain, correlation, coactivation   tracekit.analyze(what=...) with --budget (default 2GB)
  correlation+domain                              both in one analyze call (one pass over the rows)
  report        tracekit.report.write_report (every analysis and the figures)

Targets (issue 13, 2-core machine): peak RSS <= 2 GB for every analysis on both 100M-row runs; load <= 1 s;
correlation + domain <= 15 s; cost linear in rows. Every step's result is kept in benchmarks/out/bench_query/
<run>/<step>.json as soon as it is measured (steps of one run can be measured in separate invocations); the table
and benchmarks/out/bench_query.json are assembled from those files.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

MOE_LAYERS = list(range(3, 61))  # DeepSeek V3: 61 layers, the first 3 dense
SHORT = dict(prompt_tokens=(8, 16), decode_tokens=(2, 8))
RUNS = {
    "short-10k": dict(requests=10_000, **SHORT),
    "short-30k": dict(requests=30_000, **SHORT),
    "short-100k": dict(requests=100_000, **SHORT),
    "long-2033": dict(requests=2033, prompt_tokens=(128, 1024), decode_tokens=(32, 512)),
}
STEPS = ("load", "load_rows", "imbalance", "domain", "correlation", "coactivation", "correlation+domain", "report",
         "pandas")
ANALYSES = ("imbalance", "domain", "correlation", "coactivation", "correlation+domain", "report")
OUT = Path(__file__).resolve().parent / "out"


def _child(step: str, data: Path, budget: str) -> dict:
    """Run one step in this process and return its measurements."""
    import numpy as np

    t0 = time.perf_counter()
    if step in ("load", "load_rows"):
        from tracekit.query import connect, fetch_arrow, run_sql, sql_text

        con = connect(data)
        sql = sql_text("load_by_layer_expert" if step == "load" else "load_by_layer_expert_rows")
        times = []
        for _ in range(3):
            t = time.perf_counter()
            res = fetch_arrow(run_sql(con, sql))
            times.append(time.perf_counter() - t)
        return {"seconds": min(times), "first_seconds": times[0], "runs": times, "cells": res.num_rows,
                "assignments": int(np.asarray(res["n"]).sum())}
    if step == "pandas":
        import pandas as pd

        from tracekit.store import open_run

        files = open_run(data).files["routes"]
        acc = None
        for f in files:
            df = pd.read_parquet(f, columns=["layer", "experts"])
            part = df.explode("experts").groupby(["layer", "experts"]).size()
            acc = part if acc is None else acc.add(part, fill_value=0)
        return {"seconds": time.perf_counter() - t0, "cells": int(len(acc)), "assignments": int(acc.sum()),
                "files": len(files)}
    if step == "report":
        import tempfile

        from tracekit.report import write_report

        with tempfile.TemporaryDirectory() as d:
            write_report(data, Path(d) / "report.html", memory_budget=budget)
        return {"seconds": time.perf_counter() - t0}
    from tracekit.analysis.run import analyze

    res = analyze(data, what=step.replace("+", ","), memory_budget=budget)
    out = {"seconds": time.perf_counter() - t0, "notes": [n for r in res.values() for n in r.notes]}
    if "correlation" in res and res["correlation"].summaries:
        s = next(iter(res["correlation"].summaries.values())).to_pylist()[0]
        out.update(requests=s["requests"], spearman=s["spearman"], baseline_spearman=s["baseline_spearman"])
    if "domain" in res and "classifier" in res["domain"].tables:
        c = res["domain"].tables["classifier"].to_pylist()[0]
        out.update(classifier_n=c["n"], accuracy=c["accuracy"], majority_baseline=c["baseline"])
    return out


def _run_step(step: str, data: Path, budget: str, time_limit: float | None = None) -> dict:
    """Run a step in a child process; add its wall time and its own peak RSS (wait4 rusage). A child still
    running after ``time_limit`` seconds is stopped and recorded as timed out, with its peak RSS until then."""
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, __file__, "--child", step, "--data", str(data), "--budget", budget],
                         stdout=subprocess.PIPE, text=True)
    timed_out = False
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        if time_limit and time.perf_counter() - t > time_limit:
            p.kill()
            _, status, ru = os.wait4(p.pid, 0)
            timed_out = True
            break
        time.sleep(0.5)
    wall = time.perf_counter() - t
    out = p.stdout.read()
    if timed_out:
        res = {"seconds": wall, "timed_out": True, "time_limit": time_limit}
    elif os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"step {step} on {data} failed (exit {os.waitstatus_to_exitcode(status)})")
    else:
        res = json.loads(out.strip().splitlines()[-1])
    res["wall_seconds"] = wall  # with interpreter start and imports
    res["peak_rss_gb"] = ru.ru_maxrss / 1024**2  # ru_maxrss is KiB on Linux
    res["loadavg"] = os.getloadavg()[0]
    return res


def generate(name: str, data: Path) -> dict:
    from tracekit.synth import generate_run

    t = time.perf_counter()
    generate_run(data, num_experts=256, top_k=8, moe_layers=MOE_LAYERS, seed=0, **RUNS[name])
    return {"seconds": time.perf_counter() - t}


def _totals(data: Path) -> dict:
    from tracekit.store import open_run

    t = open_run(data).manifest["totals"]["routes"]
    return {"rows": t["rows"], "bytes": t["bytes"], "requests": t["requests"], "files": len(t["files"])}


def assemble(root: Path, data_root: Path) -> dict:
    """Collect every measured step into one summary (and check pandas against DuckDB)."""
    runs = {}
    for name in RUNS:
        d = root / name
        if not d.is_dir() or not (data_root / name / "manifest.json").exists():
            continue
        steps = {p.stem: json.loads(p.read_text()) for p in sorted(d.glob("*.json"))}
        if steps:
            runs[name] = {**_totals(data_root / name), "steps": steps}
            if "pandas" in steps and "load_rows" in steps:
                assert steps["pandas"]["assignments"] == steps["load_rows"]["assignments"], "pandas and DuckDB disagree"
                runs[name]["pandas_over_duckdb"] = steps["pandas"]["seconds"] / steps["load_rows"]["seconds"]
    series = [n for n in ("short-10k", "short-30k", "short-100k") if n in runs]
    linear = {}
    for step in ANALYSES + ("load_rows",):
        pts = [(runs[n]["rows"], runs[n]["steps"][step]["seconds"]) for n in series
               if step in runs[n]["steps"] and not runs[n]["steps"][step].get("timed_out")]
        if len(pts) >= 2:
            linear[step] = [{"rows": r, "seconds": s, "seconds_per_M_rows": s / (r / 1e6)} for r, s in pts]
    return {"cpu_count": os.cpu_count(), "python": platform.python_version(),
            "targets": {"peak_gb<=": 2.0, "load_seconds<=": 1.0, "correlation+domain_seconds<=": 15.0},
            "runs": runs, "linear": linear}


def print_table(summary: dict) -> None:
    for name, run in summary["runs"].items():
        print(f"\n{name}: rows {run['rows']:,}  requests {run['requests']:,}  files {run['files']}  "
              f"({run['bytes'] / run['rows']:.2f} B/row)")
        print(f"  {'step':<20}{'seconds':>9}{'wall s':>9}{'peak GB':>9}{'load':>6}  note")
        for step in STEPS:
            r = run["steps"].get(step)
            if r is None:
                continue
            note = ""
            if r.get("timed_out"):
                note = f"DID NOT FINISH: stopped after {r['time_limit']:.0f} s (peak RSS until then)"
            elif step == "load":
                note = f"best of 3 (first {r['first_seconds']:.2f} s); from the summaries; target <= 1 s"
            elif step == "load_rows":
                note = f"best of 3 over every row; {r['assignments']:,} assignments"
            elif step == "pandas":
                note = f"{run.get('pandas_over_duckdb', float('nan')):.1f}x load_rows"
            elif "spearman" in r:
                note = f"{r['requests']:,} requests; spearman {r['spearman']:.3f} vs shuffled {r['baseline_spearman']:.3f}"
            if "classifier_n" in r:
                note += f"{'; ' if note else ''}classifier on {r['classifier_n']:,} requests, accuracy {r['accuracy']:.2f}"
            print(f"  {step:<20}{r['seconds']:>9.2f}{r.get('wall_seconds', float('nan')):>9.2f}"
                  f"{r['peak_rss_gb']:>9.2f}{r.get('loadavg', float('nan')):>6.1f}  {note}")
    if summary["linear"]:
        print("\nseconds per million rows (short runs; constant = linear)")
        for step, pts in summary["linear"].items():
            print(f"  {step:<20}" + "".join(f"{p['rows'] / 1e6:>7.1f}M: {p['seconds_per_M_rows']:.2f}" for p in pts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", type=Path, default=Path("/tmp/tracekit-bench"),
                    help="folder of the generated runs (reused; ~0.8 GB per 100M rows)")
    ap.add_argument("--runs", default=",".join(RUNS), help="comma-separated runs: " + ", ".join(RUNS))
    ap.add_argument("--steps", default=",".join(STEPS), help="comma-separated steps: " + ", ".join(STEPS))
    ap.add_argument("--budget", default="2GB", help="--memory-budget of the analyses")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="stop a step after this many seconds and record it as timed out (peak RSS until then)")
    ap.add_argument("--table", action="store_true", help="measure nothing; print and write what was measured")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(_child(a.child, a.data, a.budget)))
        return
    root = OUT / "bench_query"
    if not a.table:
        for name in [r for r in a.runs.split(",") if r]:
            if name not in RUNS:
                raise SystemExit(f"unknown run {name}; choose from {', '.join(RUNS)}")
            data = a.data_root / name
            if not (data / "manifest.json").exists():
                print(f"generating {name} ...", file=sys.stderr)
                gen = generate(name, data)
                (root / name).mkdir(parents=True, exist_ok=True)
                (root / name / "generate.json").write_text(json.dumps(gen) + "\n")
            for step in [s for s in a.steps.split(",") if s]:
                if step not in STEPS:
                    raise SystemExit(f"unknown step {step}; choose from {', '.join(STEPS)}")
                res = _run_step(step, data, a.budget, a.time_limit)
                (root / name).mkdir(parents=True, exist_ok=True)
                (root / name / f"{step}.json").write_text(json.dumps(res, indent=1) + "\n")
                print(f"  {name} {step}: {res['seconds']:.2f} s, {res['peak_rss_gb']:.2f} GB", file=sys.stderr)
    summary = assemble(root, a.data_root)
    print_table(summary)
    out = OUT / "bench_query.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
