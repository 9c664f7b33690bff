"""Prometheus metrics of the router (one registry per proxy, so tests can run several)."""
from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TOKENS = re.compile(rb'"(prompt_tokens|completion_tokens)"\s*:\s*(\d+)')


class RouteMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tracekit_route_requests", "Requests forwarded, by endpoint, group, DP rank and "
                                "who chose the rank (classifier, client, any)", ["endpoint", "group", "rank", "source"],
                                registry=r)
        self.tokens = Counter("tracekit_route_tokens", "Tokens reported by the upstream (prompt, completion) per "
                              "group and DP rank", ["group", "rank", "kind"], registry=r)
        self.decisions = Counter("tracekit_route_classifier_decisions", "Classifier decisions by predicted group",
                                 ["group"], registry=r)
        self.upstream_errors = Counter("tracekit_route_upstream_errors", "Upstream failures by endpoint and kind "
                                       "(connect, timeout, midstream)", ["endpoint", "kind"], registry=r)
        self.rejected = Counter("tracekit_route_rejected", "Requests refused by the proxy (4xx/503) by reason",
                                ["reason"], registry=r)
        self.latency = Histogram("tracekit_route_request_seconds", "Time from request received to response "
                                 "finished, by endpoint", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.inflight = Gauge("tracekit_route_inflight", "In-flight requests per DP rank", ["rank"], registry=r)
        self._children: dict = {}

    def child(self, metric, *labels: str):
        """``metric.labels(*labels)``, memoised (labels() costs a lock and a dict build per call)."""
        key = (id(metric), labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*labels)
        return c


def token_counts(data: bytes) -> dict[str, int]:
    """Last ``prompt_tokens`` / ``completion_tokens`` values in a response (SGLang ``meta_info`` or OpenAI ``usage``)."""
    out: dict[str, int] = {}
    for k, v in _TOKENS.findall(data):
        out[k.decode()] = int(v)
    return out
