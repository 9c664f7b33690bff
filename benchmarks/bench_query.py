"""Query benchmark: SQL over a synthetic DeepSeek-V3-width run (E=256, k=8, 58 MoE layers).

    python benchmarks/bench_query.py                 # 100M token-layer rows (writes ~0.8 GB under /tmp)
    python benchmarks/bench_query.py --rows 5e6      # quick check

Steps (each measured in a fresh child process, so its peak RSS is its own):
  generate     tracekit.synth.generate_run (skewed, 4 domains, prefill->decode affinity), skipped if the data exists
  load         load per layer and expert over every row (DuckDB, tracekit/sql/load_by_layer_expert.sql)
  coactivation expert-pair counts for one layer (SQL filter + numpy bincount)
  correlation  prefill-decode correlation for all requests (SQL aggregate + numpy), with shuffled baseline
  pandas       the load query in pandas on the same files: read_parquet -> explode -> groupby.size, file by file

Targets (issue 3, 2-core machine): load <= 5 s, peak memory <= 4 GB, pandas >= 10x slower than DuckDB.
Prints a table and writes benchmarks/out/bench_query.json.
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
PROMPT, DECODE = (128, 1024), (32, 512)


def _child(step: str, data: Path, rows: int, seed: int) -> dict:
    """Run one step in this process and return its measurements."""
    import numpy as np

    t0 = time.perf_counter()
    if step == "generate":
        from tracekit.synth import generate_run

        mean_tokens = (sum(PROMPT) + sum(DECODE)) / 2
        requests = max(4, round(rows / (len(MOE_LAYERS) * mean_tokens)))
        generate_run(data, num_experts=256, top_k=8, moe_layers=MOE_LAYERS, requests=requests,
                     prompt_tokens=PROMPT, decode_tokens=DECODE, seed=seed)
        from tracekit.store import open_run

        tot = open_run(data).manifest["totals"]["routes"]
        dt = time.perf_counter() - t0
        return {"seconds": dt, "rows": tot["rows"], "bytes": tot["bytes"], "requests": tot["requests"],
                "rows_per_s": tot["rows"] / dt, "bytes_per_row": tot["bytes"] / tot["rows"]}
    from tracekit.query import connect, fetch_arrow, run_sql, sql_text

    con = connect(data)
    if step == "load":
        times = []
        for _ in range(3):
            t = time.perf_counter()
            res = fetch_arrow(run_sql(con, sql_text("load_by_layer_expert")))
            times.append(time.perf_counter() - t)
        total = int(np.asarray(res["n"]).sum())
        return {"seconds": min(times), "first_seconds": times[0], "runs": times, "cells": res.num_rows,
                "assignments": total}
    if step == "coactivation":
        from tracekit.analysis.coactivation import layer_pair_counts
        from tracekit.analysis.data import geometry

        geo = geometry(con)
        layer = MOE_LAYERS[len(MOE_LAYERS) // 2]
        t = time.perf_counter()
        m = layer_pair_counts(con, geo, [layer])[layer]
        return {"seconds": time.perf_counter() - t, "layer": layer, "pairs": int(m.sum() // 2)}
    if step == "correlation":
        from tracekit.analysis.correlation import analyze_correlation
        from tracekit.analysis.data import geometry, request_counts

        t = time.perf_counter()
        rc = request_counts(con, geometry(con))
        t_sql = time.perf_counter() - t
        res = analyze_correlation(rc)
        s = next(iter(res.summaries.values())).to_pylist()[0]
        return {"seconds": time.perf_counter() - t, "sql_seconds": t_sql, "requests": s["requests"],
                "spearman": s["spearman"], "baseline_spearman": s["baseline_spearman"]}
    if step == "pandas":
        import pandas as pd

        from tracekit.store import open_run

        files = open_run(data).files["routes"]
        t = time.perf_counter()
        acc = None
        for f in files:
            df = pd.read_parquet(f, columns=["layer", "experts"])
            part = df.explode("experts").groupby(["layer", "experts"]).size()
            acc = part if acc is None else acc.add(part, fill_value=0)
        return {"seconds": time.perf_counter() - t, "cells": int(len(acc)), "assignments": int(acc.sum()),
                "files": len(files)}
    raise SystemExit(f"unknown step {step}")


def _run_step(step: str, data: Path, rows: int, seed: int) -> dict:
    """Run a step in a child process; add its own peak RSS (wait4 rusage)."""
    p = subprocess.Popen([sys.executable, __file__, "--child", step, "--data", str(data), "--rows", str(rows),
                          "--seed", str(seed)], stdout=subprocess.PIPE, text=True)
    out = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"step {step} failed (exit {p.returncode})")
    res = json.loads(out.strip().splitlines()[-1])
    res["peak_rss_gb"] = ru.ru_maxrss / 1024**2  # ru_maxrss is KiB on Linux
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=float, default=100e6, help="target token-layer rows (default 100M)")
    ap.add_argument("--data", type=Path, default=None, help="run directory (default /tmp/tracekit-bench-<rows>)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-pandas", action="store_true", help="do not run the (slow) pandas comparison")
    ap.add_argument("--steps", default="load,coactivation,correlation,pandas",
                    help="comma-separated steps to time (generate runs first whenever the data is missing)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    rows = int(a.rows)
    data = a.data or Path(f"/tmp/tracekit-bench-{rows}")
    if a.child:
        print(json.dumps(_child(a.child, data, rows, a.seed)))
        return

    results = {}
    if not (data / "manifest.json").exists():
        results["generate"] = _run_step("generate", data, rows, a.seed)
    steps = [s for s in a.steps.split(",") if s and not (a.skip_pandas and s == "pandas")]
    if "load" not in steps:
        raise SystemExit("--steps must include load (the other steps are compared with it)")
    for step in steps:
        results[step] = _run_step(step, data, rows, a.seed)
        print(f"  {step}: {results[step]['seconds']:.2f} s", file=sys.stderr)

    from tracekit.store import open_run

    tot = open_run(data).manifest["totals"]["routes"]
    load = results["load"]["seconds"]
    summary = {
        "rows": tot["rows"], "bytes": tot["bytes"], "requests": tot["requests"], "data": str(data),
        "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "targets": {"load_seconds<=": 5.0, "peak_gb<=": 4.0, "pandas_over_duckdb>=": 10.0},
        "steps": results,
    }
    if "pandas" in results:
        summary["pandas_over_duckdb"] = results["pandas"]["seconds"] / load
        assert results["pandas"]["assignments"] == results["load"]["assignments"], "pandas and DuckDB disagree"
    print(f"\nrows {tot['rows']:,}  bytes {tot['bytes']:,} ({tot['bytes'] / tot['rows']:.2f} B/row)  "
          f"requests {tot['requests']}  cores {os.cpu_count()}")
    print(f"{'step':<14}{'seconds':>10}{'peak GB':>10}  note")
    for step, r in results.items():
        note = ""
        if step == "generate":
            note = f"{r['rows_per_s'] / 1e6:.2f} M rows/s"
        elif step == "load":
            note = f"best of 3 (first {r['first_seconds']:.2f} s); target <= 5 s"
        elif step == "coactivation":
            note = f"layer {r['layer']}, {r['pairs']:,} pairs"
        elif step == "correlation":
            note = f"{r['requests']} requests (SQL {r['sql_seconds']:.2f} s); spearman {r['spearman']:.3f} vs shuffled {r['baseline_spearman']:.3f}"
        elif step == "pandas":
            note = f"{summary['pandas_over_duckdb']:.1f}x the DuckDB load query; target >= 10x"
        print(f"{step:<14}{r['seconds']:>10.2f}{r['peak_rss_gb']:>10.2f}  {note}")
    out = Path(__file__).resolve().parent / "out" / "bench_query.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
