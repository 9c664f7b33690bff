"""kill -9 + resume trials of a real ``tracekit collect`` subprocess: prints a table, writes JSON.

One uninterrupted reference run, then N trials: start the same collect into a fresh ``--out``, ``SIGKILL`` it at a
random point, then run the same command again to completion. Every fourth trial kills after U(0, reference wall
time) from the start (mostly model loading and the first manifest write); the others after U(0, reference writing
time) from the moment the manifest appears (mid-chunk, between a chunk's rename and its manifest update, the final
manifest write ... wherever it lands), so that most kills hit the writing phase even on a loaded machine. Per trial, against the reference table (rows keyed by request, layer, phase, position):

- lost: reference rows absent after resume; duplicated: surplus copies of a key; corrupt: a key whose row differs
  (any column: run id, token, experts, weights ...);
- temp: files other than ``manifest.json`` and the Parquet chunks left in or next to the run (temporaries, locks);
- resumed: the re-run exited 0 and the manifest says complete with every chunk verified by SHA-256.

    python benchmarks/crash_trials.py [--trials 20] [--limit 8] [--seed 0] [--out benchmarks/out/crash_trials.json]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa

KEY = ("request_id", "layer", "phase", "position")


def collect_args(limit: int) -> list[str]:
    return ["collect", "--model", "tiny-qwen3-moe", "--dataset", "humaneval", "--limit", str(limit),
            "--max-new-tokens", "3", "--batch-size", "1", "--chunk-requests", "1", "--no-progress"]


def env() -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    e["OMP_NUM_THREADS"] = "1"
    return e


def run_collect(out: Path, limit: int, kill_after: float | None = None, from_manifest: bool = False) -> dict:
    """Run one collect; with ``kill_after`` SIGKILL it after that many seconds (if still running), counted from the
    start or, with ``from_manifest``, from the moment ``manifest.json`` appears. Also measures when it appeared."""
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "tracekit", *collect_args(limit), "--out", str(out)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env())
    t_manifest = None
    killed = False
    start = t0
    while p.poll() is None:
        now = time.perf_counter()
        if t_manifest is None and (out / "manifest.json").exists():
            t_manifest = now - t0
            if from_manifest:
                start = now
        if kill_after is not None and (t_manifest is not None or not from_manifest) and now - start >= kill_after:
            p.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.01)
    rc = p.wait()
    return {"rc": rc, "killed": killed, "seconds": time.perf_counter() - t0, "manifest_at": t_manifest,
            "stderr": p.stderr.read().decode()[-500:]}


def read_table(run: Path) -> pa.Table:
    import pyarrow.parquet as pq

    files = sorted((run / "routes").glob("part-*.parquet"))
    t = pa.concat_tables([pq.read_table(f) for f in files]) if files else None
    if t is None:
        return pa.table({})
    cols = {}
    for name in t.column_names:  # dictionary columns as plain values, so tables from different files compare
        c = t.column(name)
        cols[name] = c.cast(c.type.value_type) if pa.types.is_dictionary(c.type) else c
    return pa.table(cols).sort_by([(k, "ascending") for k in KEY])


def compare(ref: pa.Table, got: pa.Table) -> dict:
    """Rows lost, duplicated and corrupt in ``got`` against ``ref`` (keyed by request, layer, phase, position)."""
    def rows(t):
        return [tuple(json.dumps(v, sort_keys=True, default=str) for v in r.values()) for r in t.to_pylist()]

    names = ref.column_names
    ki = [names.index(k) for k in KEY]
    ref_rows = {tuple(r[i] for i in ki): r for r in rows(ref)}
    got_rows = rows(got.select(names)) if got.num_columns else []
    counts = Counter(tuple(r[i] for i in ki) for r in got_rows)
    lost = sum(1 for k in ref_rows if k not in counts)
    duplicated = sum(c - 1 for c in counts.values() if c > 1) + sum(c for k, c in counts.items() if k not in ref_rows)
    corrupt = sum(1 for r in got_rows if tuple(r[i] for i in ki) in ref_rows and ref_rows[tuple(r[i] for i in ki)] != r)
    return {"rows_ref": ref.num_rows, "rows_got": got.num_rows, "lost": lost, "duplicated": duplicated,
            "corrupt": corrupt, "equal": got.equals(ref)}


def leftovers(root: Path) -> list[str]:
    """Everything under ``root`` that is neither the run's manifest nor a chunk (temporaries, locks, staging)."""
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_dir() and rel in ("run", "run/routes"):
            continue
        if rel == "run/manifest.json" or (rel.startswith("run/routes/part-") and rel.endswith(".parquet")):
            continue
        out.append(rel)
    return out


def state_after_kill(root: Path) -> str:
    run = root / "run"
    if not run.exists():
        return "no run dir"
    parts = len(list((run / "routes").glob("part-*.parquet"))) if (run / "routes").is_dir() else 0
    tmp = [x for x in leftovers(root) if x.endswith(".tmp")]
    man = "manifest" if (run / "manifest.json").exists() else "no manifest"
    return f"{man}, {parts} chunks" + (f", {len(tmp)} tmp" if tmp else "")


def verified(run: Path) -> bool:
    r = subprocess.run([sys.executable, "-m", "tracekit", "info", str(run), "--verify", "--json"], capture_output=True,
                       text=True, env=env())
    if r.returncode != 0:
        return False
    m = json.loads(r.stdout)
    return m["status"] == "complete" and m["integrity"]["state"] == "verified"


def trial(root: Path, limit: int, kill_after: float, from_manifest: bool, ref: pa.Table) -> dict:
    first = run_collect(root / "run", limit, kill_after=kill_after, from_manifest=from_manifest)
    state = state_after_kill(root)
    second = run_collect(root / "run", limit)
    res = {"kill_after_s": round(kill_after, 2), "from": "manifest" if from_manifest else "start",
           "killed": first["killed"], "state_at_kill": state,
           "resume_rc": second["rc"], "resume_stderr": second["stderr"] if second["rc"] else ""}
    res.update(compare(ref, read_table(root / "run")))
    res["leftovers"] = leftovers(root)
    res["verified"] = second["rc"] == 0 and verified(root / "run")
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--limit", type=int, default=8, help="requests per run (one chunk each)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/crash_trials.json"))
    a = ap.parse_args()
    rng = random.Random(a.seed)
    with tempfile.TemporaryDirectory(prefix="crash-trials-") as tmp:
        tmp = Path(tmp)
        (tmp / "ref").mkdir()
        ref_run = run_collect(tmp / "ref" / "run", a.limit)
        if ref_run["rc"] != 0:
            print(ref_run["stderr"], file=sys.stderr)
            return 1
        ref = read_table(tmp / "ref" / "run")
        wall = ref_run["seconds"]
        writing = wall - (ref_run["manifest_at"] or 0.0)
        results = []
        print(f"reference: {ref.num_rows} rows, {wall:.1f} s wall, manifest at {ref_run['manifest_at']:.1f} s; {a.trials} "
              f"trials of kill -9 (from start: U(0, {wall:.1f}) s; from manifest: U(0, {writing:.1f}) s) + resume")
        print(f"{'#':>3} {'from':>8} {'kill s':>7} {'state at kill':<28} {'rc':>3} {'lost':>5} {'dup':>5} {'corrupt':>7} "
              f"{'equal':>5} {'verified':>8} leftovers")
        for i in range(a.trials):
            root = tmp / f"t{i:02d}"
            root.mkdir()
            from_manifest = i % 4 != 0
            r = trial(root, a.limit, rng.uniform(0, writing if from_manifest else wall), from_manifest, ref)
            results.append(r)
            print(f"{i:>3} {r['from']:>8} {r['kill_after_s']:>7.2f} {r['state_at_kill']:<28} {r['resume_rc']:>3} {r['lost']:>5} "
                  f"{r['duplicated']:>5} {r['corrupt']:>7} {str(r['equal']):>5} {str(r['verified']):>8} "
                  f"{','.join(r['leftovers']) or '-'}")
    summary = {
        "trials": len(results),
        "killed": sum(r["killed"] for r in results),
        "rows_lost": sum(r["lost"] for r in results),
        "rows_duplicated": sum(r["duplicated"] for r in results),
        "rows_corrupt": sum(r["corrupt"] for r in results),
        "tables_equal": sum(r["equal"] for r in results),
        "verified": sum(r["verified"] for r in results),
        "runs_with_leftovers": sum(bool(r["leftovers"]) for r in results),
        "resume_failures": sum(r["resume_rc"] != 0 for r in results),
        "reference_rows": ref.num_rows,
        "reference_seconds": round(wall, 2),
    }
    print(json.dumps(summary))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"summary": summary, "trials": results}, indent=2))
    print(f"wrote {a.out}")
    ok = (summary["rows_lost"] == summary["rows_duplicated"] == summary["rows_corrupt"] == 0
          and summary["tables_equal"] == summary["verified"] == len(results) and not summary["runs_with_leftovers"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
