"""`tracekit watch` numbers on synthetic routing whose domain mix shifts halfway (tests/_watch_synth.py).

- rows/s sustained: token-layer rows appended through the rolling run (store + window + metrics), per second;
- per-request overhead of sampling through a proxy (RoutedSampler.prepare + record), p50 / p99 in microseconds;
- requests until the mix shift is detected (after the switch);
- predicted gain of the budgeted proposal vs an oracle (eplb fitted on the new mix), on held-out new-mix rows.

    .venv/bin/python benchmarks/bench_watch.py [--requests 96] [--experts 32] [--max-moves 4]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _watch_synth import GEOMETRY, shifted_traces  # noqa: E402
from test_watch import per_request  # noqa: E402

from tracekit.placement import strategies as strat# noqa: E402
from tracekit.placement.scoring.comm import score_placement  # noqa: E402
from tracekit.placement.data.types import Cluster  # noqa: E402
from tracekit.watch.rolling import RollingRun  # noqa: E402
from tracekit.watch.sampler import RoutedSampler  # noqa: E402
from tracekit.watch.sources import Batch  # noqa: E402
from tracekit.watch.watcher import Watcher  # noqa: E402

OPTS = {"decode_batch": 16, "prefill_chunk": 64}


class ListSource:
    def __init__(self, reqs, per):
        self.reqs, self.per = list(reqs), per

    def start(self):
        return None

    def collect(self):
        part, self.reqs = self.reqs[:self.per], self.reqs[self.per:]
        if not part:
            return []
        names = sorted({d for d, _ in part})
        T = [ex.shape[0] for _, ex in part]
        return [Batch(np.repeat(np.arange(len(part)), T), np.zeros(sum(T), np.int8),
                      np.concatenate([np.arange(t) for t in T]), np.concatenate([ex for _, ex in part]),
                      np.repeat([names.index(d) for d, _ in part], T).astype(np.int32), names)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--max-moves", type=int, default=4)
    a = ap.parse_args()
    E, L = a.experts, a.layers
    old = shifted_traces(["code"] * a.requests, num_experts=E, layers=L, tokens=32, seed=1)
    new = shifted_traces(["math"] * a.requests, num_experts=E, layers=L, tokens=32, seed=2)
    geo = {"num_experts": E, "top_k": 2, "moe_layers": list(range(1, L + 1)), "num_layers": L + 1, **GEOMETRY}
    c = Cluster(2, 4, E, 8)
    dep = strat.fit("eplb", old, c)
    with tempfile.TemporaryDirectory() as tmp:
        run = RollingRun(Path(tmp) / "run", model_name="bench", geometry=geo, engine="sglang")
        w = Watcher([ListSource(per_request(old) + per_request(new), 8)], run, dep, window_requests=32,
                    min_requests=16, judge_every=10 ** 9, drift_threshold=0.1, max_moves=a.max_moves, min_gain=0.0,
                    eval_opts=OPTS)
        rows = seen = 0
        shift_at = None
        t0 = time.perf_counter()
        while True:
            r = w.step()
            if not r["requests"]:
                break
            rows += r["rows"]
            seen += r["requests"]
            if r.get("shift") and shift_at is None:
                shift_at = seen
        dt = time.perf_counter() - t0
        print(f"rows/s sustained (store + window + metrics + judgements): {rows / dt:,.0f} ({rows} rows, {dt:.2f} s)")
        print(f"requests until the shift was detected: "
              f"{'not detected' if shift_at is None else shift_at - a.requests} after the switch "
              f"(window 32, checked every 8)")
        # judge on the new mix alone, against an oracle fitted on it
        tr = w.window.traces(dep.layers, E, geo)
        rep = w.judge(tr)["replacement"]
        oracle = strat.fit("eplb", new, c)
        s_dep = score_placement(dep, new, **OPTS)["step_time_ms"]
        s_rep = score_placement(rep.placement, new, **OPTS)["step_time_ms"]
        s_orc = score_placement(oracle, new, **OPTS)["step_time_ms"]
        print(f"step time on the new mix: deployed {s_dep:.4f} ms, proposal ({rep.plan.moves} moves, <= "
              f"{a.max_moves}/layer) {s_rep:.4f} ms ({100 * (s_rep / s_dep - 1):+.1f}%), oracle eplb fitted on the "
              f"new mix {s_orc:.4f} ms ({100 * (s_orc / s_dep - 1):+.1f}%)")
        sampler = RoutedSampler(Path(tmp) / "spool", rate=0.1)
        resp = {"meta_info": {"prompt_tokens": 16, "completion_tokens": 17, "routed_experts": "A" * 4096}}
        lat = []
        for i in range(5000):
            t = time.perf_counter_ns()
            body = {"text": "hello"}
            if sampler.prepare(body, f"q{i}"):
                sampler.record(f"q{i}", resp, "code")
            lat.append(time.perf_counter_ns() - t)
        sampler.flush()
        lat = np.array(lat) / 1e3
        print(f"sampling overhead per request (rate 0.1): p50 {np.percentile(lat, 50):.1f} us, "
              f"p99 {np.percentile(lat, 99):.1f} us")


if __name__ == "__main__":
    main()
