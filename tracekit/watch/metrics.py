"""The Prometheus metrics ``watch`` serves (names the Prometheus way: ``tracekit_watch_*``, base units, ratios)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        p = "tracekit_watch_"
        self.rows = Counter(p + "token_layers", "Token-layer rows appended to the rolling run", registry=r)
        self.requests = Counter(p + "requests", "Requests read from the engine", registry=r)
        self.errors = Counter(p + "errors", "Failed reads from the engine or its spool, by kind", ["kind"], registry=r)
        self.engine_up = Gauge(p + "engine_up", "1 when the last read from the engine succeeded", registry=r)
        self.run_bytes = Gauge(p + "run_bytes", "Bytes of the rolling run's chunks", registry=r)
        self.gpu_max_over_mean = Gauge(p + "gpu_load_max_over_mean",
                                       "Busiest GPU over mean GPU load of the live window under the deployed "
                                       "placement, as the engine dispatches it", ["layer"], registry=r)
        self.cross_node_share = Gauge(p + "predicted_cross_node_share",
                                      "Share of (token, expert) pairs sent to another node (deployed placement)",
                                      registry=r)
        self.step_time = Gauge(p + "predicted_step_time_seconds", "Predicted MoE step time", ["placement"],
                               registry=r)
        self.drift = Gauge(p + "load_drift_js", "Jensen-Shannon divergence (base 2) of the live expert load from "
                           "the load the deployed placement was fitted on", ["layer"], registry=r)
        self.drift_mean = Gauge(p + "load_drift_js_mean", "Mean over layers of load_drift_js", registry=r)
        self.domain_share = Gauge(p + "domain_share", "Share of the window's requests per domain", ["domain"],
                                  registry=r)
        self.gain = Gauge(p + "predicted_gain_ratio", "Predicted step-time cut of the budgeted re-placement",
                          registry=r)
        self.proposals = Counter(p + "proposals", "Re-placements proposed (gain >= --min-gain)", registry=r)
        self.shifts = Counter(p + "mix_shifts", "Load drifts detected above --drift-threshold", registry=r)
