"""Request grouping: domains packed onto nodes by load, prefill signatures clustered back into their planted
groups, and the fitted rule placing unseen requests from their prefill alone."""
from __future__ import annotations

import numpy as np
import pytest

from _placement_synth import planted_traces
from tracekit.errors import TracekitError
from tracekit.placement.strategies.grouping import assign_nodes, fit_grouping, pack_groups, request_load
from tracekit.placement.data.traces import request_masks, split_requests, subset
from tracekit.placement.data.types import Cluster, GroupingRule

CLUSTER = Cluster(nodes=4, gpus_per_node=2, num_experts=32, redundant=8)
DOMAINS = ("code", "math", "chat", "general")


@pytest.fixture(scope="module")
def planted():
    traces, _ = planted_traces(num_experts=32, top_k=4, layers=3, clusters=4, requests=200, domain_focus=0.9, seed=2)
    fit_mask, test_mask = split_requests(traces, holdout=0.3, seed=0)
    return traces, fit_mask, test_mask, subset(traces, fit_mask)


def test_domain_rule_puts_each_domain_on_its_nodes(planted):
    traces, fit_mask, test_mask, fit = planted
    rule = fit_grouping(fit, CLUSTER, "domain")
    assert rule.kind == "domain"
    # four equal domains on four nodes: one node each, all different
    assert sorted(len(v) for v in rule.domain_nodes.values()) == [1, 1, 1, 1]
    assert sorted(v[0] for v in rule.domain_nodes.values()) == [0, 1, 2, 3]
    nodes = assign_nodes(rule, traces, CLUSTER)
    for r, dom in enumerate(traces.request_domain):
        assert nodes[r] in rule.domain_nodes[dom]
    held = request_masks(traces, test_mask)
    load = np.bincount(nodes[held], weights=request_load(traces)[held], minlength=4)
    assert load.max() / load.mean() < 1.25  # held-out requests spread over all nodes


def test_pack_groups_splits_big_domains_and_shares_small_ones():
    sets = pack_groups(np.array([3.0, 1.0]), 4, tol=1.05)  # 3:1 over 4 nodes
    assert [len(s) for s in sets] == [3, 1] and set(sets[0]).isdisjoint(sets[1])
    sets = pack_groups(np.array([5.0, 4.0, 3.0, 2.0, 1.0, 1.0]), 2, tol=1.05)  # more domains than nodes
    load = np.zeros(2)
    for g, s in zip([5.0, 4.0, 3.0, 2.0, 1.0, 1.0], sets):
        load[s] += g / len(s)
    assert load.max() / load.mean() <= 1.05


def test_signature_recovers_planted_groups(planted):
    traces, fit_mask, test_mask, fit = planted
    rule = fit_grouping(fit, CLUSTER, "signature", seed=0)
    assert rule.kind == "signature" and rule.centroids.shape[0] == len(rule.centroid_node)
    assert rule.centroids.shape[1] == len(rule.feature_layers) * CLUSTER.num_experts
    nodes = assign_nodes(rule, traces, CLUSTER)
    dom = traces.request_domain.astype(str)
    fitted, held = request_masks(traces, fit_mask), request_masks(traces, test_mask)
    for subset_ in (fitted, held):  # the held-out requests were never clustered
        # each node serves essentially one planted group, and each group lives on essentially one node
        for n in range(CLUSTER.nodes):
            doms, counts = np.unique(dom[subset_ & (nodes == n)], return_counts=True)
            assert counts.max() >= 0.9 * counts.sum(), (n, dict(zip(doms, counts)))
        for d in DOMAINS:
            _, counts = np.unique(nodes[subset_ & (dom == d)], return_counts=True)
            assert counts.max() >= 0.9 * counts.sum(), (d, counts)


def test_rule_assigns_an_unseen_request_from_its_prefill_alone(planted):
    traces, fit_mask, test_mask, fit = planted
    rule = fit_grouping(fit, CLUSTER, "signature", seed=0)
    full = assign_nodes(rule, traces, CLUSTER)
    prefill_only = subset(traces, traces.phase == 0)  # what the router has when the request arrives
    assert np.array_equal(assign_nodes(rule, prefill_only, CLUSTER), full)
    # the node's dominant group matches the request's group for held-out requests
    held = np.flatnonzero(request_masks(traces, test_mask))
    dom = traces.request_domain.astype(str)
    major = {n: max(DOMAINS, key=lambda d: int(((full == n) & (dom == d)).sum())) for n in range(CLUSTER.nodes)}
    hits = sum(major[full[r]] == dom[r] for r in held)
    assert hits >= 0.9 * len(held)


def test_none_and_bad_input(planted):
    traces, _, _, fit = planted
    rule = fit_grouping(fit, CLUSTER, "none")
    assert rule.kind == "none"
    assert np.array_equal(assign_nodes(rule, traces, CLUSTER), np.arange(traces.num_requests) % CLUSTER.nodes)
    with pytest.raises(TracekitError):
        fit_grouping(fit, CLUSTER, "bogus")
    with pytest.raises(TracekitError):
        assign_nodes(GroupingRule(kind="signature"), traces, CLUSTER)
    other = Cluster(nodes=4, gpus_per_node=2, num_experts=32, redundant=8)
    bad = fit_grouping(fit, other, "signature")
    bad.feature_layers = [99]
    with pytest.raises(TracekitError):
        assign_nodes(bad, traces, CLUSTER)
