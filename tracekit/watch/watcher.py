"""The loop of ``tracekit watch``: read, append, measure, judge.

Each cycle reads every source (:mod:`tracekit.watch.sources`), appends the tokens to the rolling run
(:mod:`tracekit.watch.rolling`), keeps the last ``window_requests`` requests in memory as the live window, and
updates the metrics: the deployed placement scored on the window by the replay (:func:`tracekit.placement.scoring.comm.score_placement`
under the engine's dispatch), and per layer the Jensen-Shannon divergence of the window's expert load from the
baseline load (the run the deployed placement was fitted on, ``--baseline``, else the first full window). When
the mean divergence passes ``drift_threshold`` (a mix shift) or every ``judge_every`` cycles, it judges
re-placement exactly as ``place --from`` does (:func:`tracekit.placement.moves.replace_within_budget`) and, when the
predicted gain reaches ``min_gain``, writes the proposal and its move plan. An unreachable engine is logged once
per outage and retried every cycle; nothing is lost but the routing the engine served meanwhile.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import TracekitError
from ..placement.data.types import Placement, TraceArrays
from .metrics import Metrics
from .rolling import RollingRun

log = logging.getLogger("tracekit.watch")


def js_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence (base 2, in [0, 1]) between the rows of ``p`` and ``q`` (M, E) (normalised here)."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    p = p / np.maximum(p.sum(1, keepdims=True), 1e-300)
    q = q / np.maximum(q.sum(1, keepdims=True), 1e-300)
    m = 0.5 * (p + q)

    def kl(a, b):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(a > 0, a * np.log2(a / np.where(b > 0, b, 1)), 0.0).sum(1)
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def layer_loads(traces: TraceArrays) -> np.ndarray:
    """(M, E) (token, expert) counts per MoE layer."""
    M, E = traces.num_layers, traces.num_experts
    ex = np.asarray(traces.experts, dtype=np.int64)
    key = traces.layer_pos.astype(np.int64)[:, None] * (E + 1) + ex
    return np.bincount(key.ravel(), minlength=M * (E + 1)).reshape(M, E + 1)[:, :E]


@dataclass
class Window:
    """The last ``size`` requests, per token: experts (T, nL, k), phase, position, domain."""

    size: int
    items: deque = field(default_factory=deque)

    def add(self, batch, first_request: int) -> None:
        ids = batch.request
        order = np.argsort(ids, kind="stable")
        bounds = np.flatnonzero(np.diff(ids[order])) + 1
        for part in np.split(order, bounds):
            if part.size:
                self.items.append((first_request + int(ids[part[0]]), batch.experts[part], batch.phase[part],
                                   batch.position[part], batch.domains[int(batch.domain[part[0]])]))
        while len(self.items) > self.size:
            self.items.popleft()

    def __len__(self) -> int:
        return len(self.items)

    def traces(self, layers: np.ndarray, num_experts: int, geometry: dict) -> TraceArrays:
        ex = [it[1] for it in self.items]
        nl = len(layers)
        T = np.array([e.shape[0] for e in ex])
        req = np.repeat(np.arange(len(ex)), T)
        cat = np.concatenate(ex) if ex else np.zeros((0, nl, 1), dtype=np.int64)  # (T, nL, k)
        k = cat.shape[2]
        return TraceArrays(
            layers=np.asarray(layers), num_experts=num_experts,
            request=np.repeat(req, nl).astype(np.int32),
            layer_pos=np.tile(np.arange(nl), cat.shape[0]).astype(np.int16),
            experts=cat.reshape(-1, k).astype(np.int32),
            phase=np.repeat(np.concatenate([it[2] for it in self.items]), nl).astype(np.int8),
            token=np.repeat(np.concatenate([it[3] for it in self.items]), nl).astype(np.int32),
            request_domain=np.array([it[4] for it in self.items], dtype=object), geometry=dict(geometry))

    def domain_shares(self) -> dict[str, float]:
        doms = [it[4] for it in self.items]
        return {d: doms.count(d) / len(doms) for d in sorted(set(doms))} if doms else {}


class Watcher:
    def __init__(self, sources: list, run: RollingRun, deployed: Placement, *, engine: str = "sglang",
                 min_gain: float = 0.05, max_moves: int | None = None, max_move_gb: float | None = None,
                 window_requests: int = 256, min_requests: int = 16, judge_every: int = 10,
                 drift_threshold: float = 0.1, baseline: np.ndarray | None = None, proposal: Path | None = None,
                 metrics: Metrics | None = None, strategy: str = "eplb", eval_opts: dict[str, Any] | None = None):
        self.sources, self.run, self.deployed = sources, run, deployed
        self.engine, self.min_gain, self.max_moves, self.max_move_gb = engine, min_gain, max_moves, max_move_gb
        self.window = Window(window_requests)
        self.min_requests, self.judge_every, self.drift_threshold = min_requests, judge_every, drift_threshold
        self.baseline = baseline
        self.proposal = proposal or (run.out / "proposal.json")
        self.metrics = metrics or Metrics()
        self.strategy, self.eval_opts = strategy, dict(eval_opts or {})
        self.cycles = 0
        self.up: bool | None = None
        self.shifted = False
        self.last: dict[str, Any] = {}
        self.live_loads: np.ndarray | None = None  # (M, E) from stat dumps

    # ---------------------------------------------------------------------------------------------- reading
    def _read(self) -> list:
        batches = []
        for src in self.sources:
            try:
                batches += src.collect()
                src.start()  # the next recording window
                if self.up is not True:
                    log.info("engine reachable: reading routing" if self.up is None else
                             "engine back: recording restarted")
                self.up = True
                self.metrics.engine_up.set(1)
            except TracekitError as exc:
                kind = "engine" if "cannot reach" in str(exc) or "HTTP" in str(exc) else "read"
                self.metrics.errors.labels(kind).inc()
                if kind == "engine":
                    if self.up is not False:
                        log.warning("engine unreachable (%s); retrying every cycle", exc)
                    self.up = False
                    self.metrics.engine_up.set(0)
                else:
                    log.warning("skipped unreadable input: %s", exc)
        return batches

    def step(self) -> dict[str, Any]:
        """One cycle; returns what it did (for tests and the log)."""
        self.cycles += 1
        out: dict[str, Any] = {"cycle": self.cycles, "requests": 0, "rows": 0}
        for b in self._read():
            if b.loads is not None:
                self.live_loads = b.loads if self.live_loads is None else self.live_loads + b.loads
                continue
            first = self.run.next_request
            names = b.domains
            self.run.append(request_id=b.request + first, phase=b.phase, position=b.position,
                            step=np.full(b.tokens, -1), experts=b.experts, domain=(b.domain, names))
            self.run.next_request = first + int(b.request.max()) + 1
            self.window.add(b, first)
            nl = b.experts.shape[1]
            self.metrics.rows.inc(b.tokens * nl)
            self.metrics.requests.inc(b.requests)
            out["requests"] += b.requests
            out["rows"] += b.tokens * nl
        self.metrics.run_bytes.set(self.run.bytes())
        if len(self.window) >= self.min_requests and out["requests"]:
            out.update(self.measure())
        return out

    # ---------------------------------------------------------------------------------------------- judging
    def measure(self) -> dict[str, Any]:
        from ..placement.scoring.comm import score_placement

        tr = self.window.traces(self.deployed.layers, self.deployed.cluster.num_experts, self.run.geometry)
        loads = layer_loads(tr)
        if self.baseline is None:
            self.baseline = loads
            log.info("baseline load: the first %d requests (give --baseline RUN to compare with the fit's)",
                     len(self.window))
        js = js_divergence(loads, self.baseline)
        for lay, v in zip(self.deployed.layers, js):
            self.metrics.drift.labels(str(int(lay))).set(float(v))
        mean_js = float(js.mean())
        self.metrics.drift_mean.set(mean_js)
        for d, s in self.window.domain_shares().items():
            self.metrics.domain_share.labels(d).set(s)
        sc = score_placement(self.deployed, tr, engine=self.engine, **self.eval_opts)
        for lay, v in zip(self.deployed.layers, sc["gpu_load_max_over_mean_per_layer"]):
            self.metrics.gpu_max_over_mean.labels(str(int(lay))).set(v)
        self.metrics.cross_node_share.set(sc["cross_node_copies_per_token_lowlat"] / max(tr.top_k, 1))
        if np.isfinite(sc.get("step_time_ms", np.nan)):
            self.metrics.step_time.labels("deployed").set(sc["step_time_ms"] / 1e3)
        res: dict[str, Any] = {"drift": mean_js, "shift": False}
        shift = mean_js > self.drift_threshold
        if shift and not self.shifted:
            self.metrics.shifts.inc()
            log.warning("mix shift: mean Jensen-Shannon drift %.3f > %.3f over the last %d requests (%s)", mean_js,
                        self.drift_threshold, len(self.window),
                        ", ".join(f"{d} {100 * s:.0f}%" for d, s in self.window.domain_shares().items()))
            res["shift"] = True
        if (shift and not self.shifted) or self.cycles % self.judge_every == 0:
            res.update(self.judge(tr))
        self.shifted = shift
        return res

    def judge(self, tr: TraceArrays) -> dict[str, Any]:
        from ..placement.export import save_placement
        from ..placement.moves import judgement, replace_within_budget
        from ..atomic import atomic_write_json

        try:
            rep = replace_within_budget(self.deployed, tr, max_moves=self.max_moves, max_move_gb=self.max_move_gb,
                                        engine=self.engine, strategy=self.strategy, **self.eval_opts)
        except TracekitError as exc:
            log.warning("no judgement this cycle: %s", exc)
            return {"judged": False}
        go, line = judgement(rep, self.min_gain)
        self.metrics.gain.set(rep.gain)
        if np.isfinite(rep.value):
            self.metrics.step_time.labels("proposed").set((rep.value if go else rep.deployed_value) / 1e3)
        if go:
            p = rep.placement
            p.meta["judgement"] = {"line": line, **rep.to_json()}
            p.meta["engine"] = self.engine
            save_placement(p, self.proposal)
            plan = self.proposal.with_name(f"{self.proposal.stem}.moves.json")
            atomic_write_json(plan, rep.plan.to_json())
            self.metrics.proposals.inc()
            log.warning("%s; wrote %s and %s", line, self.proposal, plan)
        else:
            log.info("%s", line)
        self.last = {"judged": True, "re_place": go, "line": line, "gain": rep.gain, "moves": rep.plan.moves,
                     "per_layer_max": int(rep.plan.per_layer.max()) if rep.plan.per_layer.size else 0,
                     "replacement": rep}
        return self.last

    def loop(self, stop: threading.Event, interval: float, rate: float = 1.0) -> None:
        """Cycle until ``stop`` is set: record for ``rate * interval`` seconds, read, then wait out the cycle."""
        while not stop.is_set():
            if stop.wait(max(0.0, rate * interval)):
                break
            try:
                r = self.step()
                if r["requests"]:
                    log.info("cycle %d: %d requests, %d token-layers appended (run %.1f MB)", r["cycle"],
                             r["requests"], r["rows"], self.run.bytes() / 1e6)
            except TracekitError as exc:
                self.metrics.errors.labels("cycle").inc()
                log.error("cycle failed: %s", exc)
            stop.wait(max(0.0, (1.0 - rate) * interval))
