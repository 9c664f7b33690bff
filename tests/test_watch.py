"""`tracekit watch` against a fake SGLang on loopback (tests/_fake_watch_engine.py) whose domain mix shifts halfway:
it survives the engine restarting, stays within its retention, detects the shift, and proposes a bounded
re-placement that scores better on the new mix."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tracekit.placement import strategies as strat
from tracekit.placement.export import load_placement, save_placement
from tracekit.placement.scoring.comm import score_placement
from tracekit.placement.data.traces import load_traces
from tracekit.placement.data.types import Cluster
from tracekit.watch.metrics import Metrics
from tracekit.watch.rolling import RollingRun
from tracekit.watch.sampler import RoutedSampler, keep
from tracekit.watch.sources import RecorderSource, SpoolSource
from tracekit.watch.watcher import Watcher, js_divergence, layer_loads

from _fake_watch_engine import FakeRecorderEngine
from _watch_synth import GEOMETRY, shifted_traces

OPTS = {"decode_batch": 16, "prefill_chunk": 64}
E, LAYERS, TOK = 16, 2, 24
GEO = {"num_experts": E, "top_k": 2, "moe_layers": [1, 2], "num_layers": 3, **GEOMETRY}


def per_request(tr):
    """[(domain, experts (T, nL, k))] of TraceArrays built by shifted_traces / load_traces (rows token-major or
    layer-major: sorted here by (request, token, layer))."""
    out = []
    for r in range(tr.num_requests):
        sel = np.flatnonzero(tr.request == r)
        order = sel[np.lexsort((tr.layer_pos[sel], tr.token[sel]))]
        toks = np.unique(tr.token[order])
        keep_t = [t for t in toks if (tr.token[order] == t).sum() == tr.num_layers]
        rows = order[np.isin(tr.token[order], keep_t)]
        out.append((tr.request_domain[r], tr.experts[rows].reshape(len(keep_t), tr.num_layers, -1).astype(np.int64)))
    return out


def synthetic_shift(n: int = 48):
    old = shifted_traces(["code"] * n, num_experts=E, layers=LAYERS, tokens=TOK, seed=1)
    new = shifted_traces(["math"] * n, num_experts=E, layers=LAYERS, tokens=TOK, seed=2)
    return old, new


def drive(tmp_path, old, new, deployed, geo, *, window=24, max_moves=2, restart_at=4, per_dump=8, max_bytes=None,
          drift_threshold=0.1, baseline=None, min_gain=0.02):
    dump = tmp_path / "dumps"
    dump.mkdir()
    eng = FakeRecorderEngine(dump, per_request(old) + per_request(new), num_layers=geo["num_layers"],
                             moe_layers=geo["moe_layers"], num_experts=geo["num_experts"], per_dump=per_dump)
    eng.start()
    run = RollingRun(tmp_path / "run", model_name="fake", geometry=geo, engine="sglang", max_bytes=max_bytes)
    metrics = Metrics()
    w = Watcher([RecorderSource(eng.url, dump, geo)], run, deployed, max_moves=max_moves, window_requests=window,
                min_requests=8, judge_every=2, drift_threshold=drift_threshold, baseline=baseline, metrics=metrics, min_gain=min_gain,
                eval_opts=OPTS)
    seen, shift_at, ups, results = 0, None, [], []
    try:
        for cycle in range(200):
            if cycle == restart_at:  # the engine restarts: one cycle finds nobody, the next a fresh server
                eng.stop()
                results.append(w.step())
                ups.append(metrics.engine_up._value.get())
                eng.start()
            r = w.step()
            results.append(r)
            seen += r["requests"]
            if r.get("shift") and shift_at is None:
                shift_at = seen
            if not eng.queue and r["requests"] == 0:
                break
    finally:
        eng.stop()
    return w, run, metrics, seen, shift_at, ups, results


def check_outcome(tmp_path, w, run, metrics, seen, shift_at, ups, n_old, new, deployed, max_moves):
    assert ups == [0.0]  # the restart was seen, and the watch carried on
    assert seen == n_old + new.num_requests  # nothing the engine recorded was lost
    assert shift_at is not None and shift_at > n_old  # detected after the mix changed, not before
    prop_path = run.out / "proposal.json"
    assert prop_path.is_file(), "no proposal written"
    prop = load_placement(prop_path)
    plan = json.loads(prop_path.with_name("proposal.moves.json").read_text())
    assert 0 < plan["moves_total"] and max(plan["moves_per_layer"].values()) <= max_moves
    moved = (prop.slot_expert != deployed.slot_expert).sum(1)
    assert moved.max() <= max_moves
    s_new = score_placement(prop, new, **OPTS)["step_time_ms"]
    s_dep = score_placement(deployed, new, **OPTS)["step_time_ms"]
    assert s_new < s_dep  # better on the new mix
    assert metrics.proposals._value.get() >= 1 and metrics.shifts._value.get() >= 1
    tr = load_traces([run.out])  # the rolling run reads like any run
    assert tr.num_requests == seen


def test_watch_synthetic_shift(tmp_path, caplog):
    caplog.set_level(logging.INFO, "tracekit.watch")
    old, new = synthetic_shift()
    c = Cluster(2, 2, E, 4)
    deployed = strat.fit("eplb", old, c)
    deployed.meta["num_hidden_layers"] = 3
    w, run, metrics, seen, shift_at, ups, _ = drive(tmp_path, old, new, deployed, GEO)
    check_outcome(tmp_path, w, run, metrics, seen, shift_at, ups, old.num_requests, new, deployed, 2)
    msgs = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("engine unreachable") for m in msgs) and any("engine back" in m for m in msgs)
    assert any(m.startswith("mix shift: mean Jensen-Shannon drift") for m in msgs)
    assert any(m.startswith("re-place: step time -") for m in msgs)


def test_watch_real_mixtral_shift(tmp_path, shared_data):
    from tracekit.importers.jsonl import import_jsonl

    d = shared_data / "traces" / "mixtral-8x7b"
    trs = {}
    for dom, f in (("code", "routing_data_collected_humaneval_2_routing.jsonl"),
                   ("math", "routing_data_collected_gsm8k_2_routing.jsonl")):
        trs[dom] = load_traces([import_jsonl([d / f], model="mixtral-8x7b", out=tmp_path / dom)])
    geo = {"num_experts": 8, "top_k": 2, "moe_layers": list(range(32)), "num_layers": 32, "hidden_size": 4096,
           "moe_intermediate_size": 14336, "expert_dtype": "float8_e4m3fn"}

    def pieces(tr, dom, size=16):  # each real request cut into pseudo-requests of `size` tokens
        out = []
        for _, ex in per_request(tr):
            out += [(dom, ex[i:i + size]) for i in range(0, ex.shape[0] - size + 1, size)]
        return out

    old, new = pieces(trs["code"], "code"), pieces(trs["math"], "math")

    c = Cluster(2, 2, 8, 4)
    from _watch_synth import traces_from_requests

    t_old, t_new = traces_from_requests(old, geo), traces_from_requests(new, geo)
    deployed = strat.fit("eplb", t_old, c)
    # code vs math moves Mixtral's load less than the synthetic mix does (mean JS ~0.03 over whole sets)
    w, run, metrics, seen, shift_at, ups, _ = drive(tmp_path, t_old, t_new, deployed, geo, window=12, max_moves=3,
                                                    per_dump=4, min_gain=0.0, drift_threshold=0.025,
                                                    baseline=layer_loads(t_old))  # --baseline: the fit's run
    check_outcome(tmp_path, w, run, metrics, seen, shift_at, ups, t_old.num_requests, t_new, deployed, 3)


def test_retention_bounds_the_run(tmp_path):
    old, new = synthetic_shift(24)
    geo = GEO
    run = RollingRun(tmp_path / "run", model_name="fake", geometry=geo, engine="sglang", max_bytes=1)
    reqs = per_request(old) + per_request(new)
    sizes = []
    for i, (_, ex) in enumerate(reqs):
        t = ex.shape[0]
        run.append(request_id=np.full(t, i), phase=np.zeros(t, np.int8), position=np.arange(t), step=np.full(t, -1),
                   experts=ex, domain=(np.zeros(t, np.int32), ["x"]))
        sizes.append(run.bytes())
    one = max(sizes)
    assert max(sizes) <= one and len(list((run.out / "routes").glob("part-*"))) == 1  # only the newest chunk
    tr = load_traces([run.out])
    assert tr.num_requests == 1
    run.close()
    again = RollingRun(tmp_path / "run", model_name="fake", geometry=geo, engine="sglang", max_age_s=0.0)
    assert again.resumed and again.next_chunk == len(reqs) and again.next_request == len(reqs)


def test_spool_sampler_and_js():
    assert js_divergence(np.array([[1, 0]]), np.array([[0, 1]]))[0] == pytest.approx(1.0)
    assert js_divergence(np.array([[1, 3]]), np.array([[2, 6]]))[0] == pytest.approx(0.0)
    kept = sum(keep(f"r{i}", 0.25) for i in range(4000))
    assert 800 < kept < 1200


def test_watch_reads_the_spool(tmp_path):
    """Routed experts sampled in front of the engine (RoutedSampler) reach the run with their domain."""
    old, new = synthetic_shift(8)
    dump = tmp_path / "d"
    dump.mkdir()
    eng = FakeRecorderEngine(dump, per_request(old), num_layers=3, moe_layers=[1, 2], num_experts=E)
    eng.start()
    spool = tmp_path / "spool"
    sampler = RoutedSampler(spool, rate=1.0, rotate_lines=4)
    try:
        for i in range(8):
            body = {"text": "x"}
            assert sampler.prepare(body, f"q{i}")
            req = urllib.request.Request(eng.url + "/generate", data=json.dumps(body).encode(), method="POST")
            resp = json.loads(urllib.request.urlopen(req, timeout=10).read())
            sampler.record(f"q{i}", resp, domain="code")
        sampler.flush()
    finally:
        eng.stop()
    run = RollingRun(tmp_path / "run", model_name="fake", geometry=GEO, engine="sglang")
    c = Cluster(2, 2, E, 4)
    w = Watcher([SpoolSource(spool, GEO)], run, strat.fit("eplb", old, c), min_requests=4, eval_opts=OPTS)
    r = w.step()
    assert r["requests"] == 8 and not list(spool.glob("*.jsonl"))
    tr = load_traces([run.out])
    assert set(tr.request_domain) == {"code"} and tr.num_requests == 8
    assert w.metrics.domain_share.labels("code")._value.get() == 1.0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_watch_cli_sigterm_and_metrics(tmp_path):
    old, new = synthetic_shift(16)
    dump = tmp_path / "dumps"
    dump.mkdir()
    eng = FakeRecorderEngine(dump, per_request(old) + per_request(new), num_layers=3, moe_layers=[1, 2],
                             num_experts=E, per_dump=8)
    eng.start()
    dep = tmp_path / "dep.json"
    p = strat.fit("eplb", old, Cluster(2, 2, E, 4))
    p.meta["num_hidden_layers"] = 3
    save_placement(p, dep)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "tracekit", "watch", "--server", eng.url, "--placement", str(dep), "--top-k", "2",
           "--out", str(tmp_path / "run"), "--dump-dir", str(dump), "--interval", "0.2", "--sample", "0.5",
           "--metrics-port", str(_free_port()), "--window", "16", "--judge-every", "2", "--min-gain", "0.0"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 15
        while eng.queue and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(0.6)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
    finally:
        eng.stop()
        if proc.poll() is None:
            proc.kill()
    (tmp_path / "err.txt").write_text(err)
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err[-2500:]
    assert "stopped:" in err and "metrics on http://" in err
    tr = load_traces([tmp_path / "run"])
    assert tr.num_requests == 32
    rc = subprocess.run([sys.executable, "-m", "tracekit", "watch", "--server", "nope", "--placement", str(dep),
                         "--out", str(tmp_path / "r2"), "--dump-dir", str(dump)], capture_output=True, text=True,
                        env=env)
    assert rc.returncode == 2 and len(rc.stderr.strip().splitlines()) == 1 and "--server" in rc.stderr
