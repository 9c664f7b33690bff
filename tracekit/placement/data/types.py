"""Data types shared by the communication model, the placement strategies, grouping and export.

Conventions (every module in ``tracekit.placement`` follows them):

- E logical experts per MoE layer, R redundant slots per layer, S = E + R physical slots per layer.
- G = nodes * gpus_per_node GPUs; slot p lives on GPU ``p // slots_per_gpu``; GPU g on node ``g // gpus_per_node``.
- M MoE layers; arrays indexed by MoE-layer *position* m (0..M-1); ``Placement.layers[m]`` is the model's own
  absolute layer index (what the traces' ``layer`` column holds and what engines key by).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...errors import TracekitError


def nearest_redundant(num_experts: int, redundant: int, num_gpus: int) -> list[int]:
    """The valid redundant-slot counts nearest ``redundant`` (E + R a multiple of ``num_gpus``): the one below it
    (when >= 0) and the one above, ascending; ``[redundant]`` when it is valid."""
    below = redundant - (num_experts + redundant) % num_gpus
    if below == redundant:
        return [redundant]
    return ([below] if below >= 0 else []) + [below + num_gpus]


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    num_experts: int
    redundant: int = 0

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise TracekitError("--nodes and --gpus-per-node must be at least 1")
        if self.redundant < 0:
            raise TracekitError("--redundant must be >= 0")
        if self.num_slots % self.num_gpus:
            near = " or ".join(str(r) for r in nearest_redundant(self.num_experts, self.redundant, self.num_gpus))
            raise TracekitError(
                f"{self.num_experts} experts + {self.redundant} redundant slots = {self.num_slots} slots do not divide "
                f"over {self.num_gpus} GPUs; choose --redundant so that E + R is a multiple of nodes x gpus-per-node "
                f"(nearest: --redundant {near})"
            )

    @property
    def num_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def num_slots(self) -> int:
        return self.num_experts + self.redundant

    @property
    def slots_per_gpu(self) -> int:
        return self.num_slots // self.num_gpus

    def gpu_of_slot(self) -> np.ndarray:
        """(S,) GPU index of every physical slot."""
        return np.arange(self.num_slots) // self.slots_per_gpu

    def node_of_gpu(self) -> np.ndarray:
        """(G,) node index of every GPU."""
        return np.arange(self.num_gpus) // self.gpus_per_node


@dataclass
class GroupingRule:
    """How a router assigns a new request to a node (its home node, where all its tokens start).

    kind ``none``: any node (the router picks the least-loaded GPU of the cluster).
    kind ``domain``: ``domain_nodes[domain]`` lists the nodes serving that task family (least-loaded GPU among them).
    kind ``signature``: the request's prefill expert histogram (concatenated over ``feature_layers``, each layer's
    histogram normalised to sum 1) goes to the node of the nearest centroid: ``centroids`` (C, D), ``centroid_node`` (C,).
    """

    kind: str = "none"
    domain_nodes: dict[str, list[int]] = field(default_factory=dict)
    feature_layers: list[int] = field(default_factory=list)
    centroids: np.ndarray | None = None
    centroid_node: np.ndarray | None = None


@dataclass
class Placement:
    """Which logical expert sits in each physical slot of each MoE layer, plus the request grouping rule.

    ``slot_expert``: (M, S) int array; every row holds every logical expert 0..E-1 at least once.
    """

    cluster: Cluster
    layers: np.ndarray  # (M,) absolute layer indices
    slot_expert: np.ndarray  # (M, S)
    strategy: str
    grouping: GroupingRule = field(default_factory=GroupingRule)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class TraceArrays:
    """Token-layer routing in columnar arrays, as placement and evaluation consume it.

    N token-layers, k experts each: ``request`` (N,) int, ``layer_pos`` (N,) MoE-layer position m,
    ``experts`` (N, k) logical ids, ``phase`` (N,) 0 prefill / 1 decode, ``token`` (N,) a per-request token
    counter (position) so that (request, token) identifies one token across layers.
    Per request (R_n requests, indexed by ``request``): ``request_domain`` (R_n,) strings.

    Zero-computation experts (the manifest's ``zero_computation_experts``: LongCat-Flash's identity experts, Zaya's
    skip expert, Switch / NLLB-MoE's capacity drop) are not placed: ``num_experts`` counts the real experts only,
    and a choice of a zero-computation expert is stored in ``experts`` as the id ``num_experts`` (one sentinel,
    so the array keeps its fixed (N, k) shape). Such a choice is computed in place: it sends nothing, loads no
    GPU and touches no slot. ``zero_choices`` counts them (0: the sentinel never occurs and consumers skip the
    masking); :func:`real_choices` gives the mask.
    """

    layers: np.ndarray  # (M,) absolute layer index of each MoE-layer position
    num_experts: int
    request: np.ndarray
    layer_pos: np.ndarray
    experts: np.ndarray
    phase: np.ndarray
    token: np.ndarray
    request_domain: np.ndarray
    # Optional extras (added with defaults so existing constructors keep working):
    # ``loads`` (M, E) aggregated counts for runs of kind "loads" (then N = 0: no token rows, load-only strategies);
    # ``geometry`` the run manifest's geometry (n_group, hidden_size, num_layers, moe_layers, ...);
    # ``request_key`` (R_n,) "run_id:request_id" strings naming each request.
    loads: np.ndarray | None = None
    geometry: dict[str, Any] = field(default_factory=dict)
    request_key: np.ndarray | None = None
    zero_choices: int = 0
    # ``sample``: set when load_traces read a seeded random sample of whole requests (``max_rows``):
    # {"requests", "of_requests", "rows", "of_rows", "max_rows", "seed"}
    sample: dict | None = None
    # ``encoder_rows``: encoder-phase rows load_traces left out (their layer numbers are the encoder's own)
    encoder_rows: int = 0

    @property
    def num_layers(self) -> int:
        """M, the number of MoE-layer positions."""
        return int(len(self.layers))

    @property
    def num_requests(self) -> int:
        """R_n, the number of requests (``request`` indexes 0..R_n-1)."""
        return int(len(self.request_domain))

    @property
    def top_k(self) -> int:
        return int(self.experts.shape[1]) if self.experts.ndim == 2 else 0

    def __len__(self) -> int:
        return int(self.request.shape[0])


def real_choices(traces: TraceArrays, experts: np.ndarray) -> np.ndarray | None:
    """(n, k) bool: which entries of ``experts`` (rows of ``traces.experts``) choose a real expert; None when the
    traces hold no zero-computation choice (every entry is real, nothing to mask)."""
    if not traces.zero_choices:
        return None
    return np.asarray(experts) < traces.num_experts


def make_cluster(traces: TraceArrays, nodes: int, gpus_per_node: int, redundant: int) -> Cluster:
    """Cluster for the traces' expert count (one-line error when E + R does not divide over the GPUs)."""
    return Cluster(nodes=nodes, gpus_per_node=gpus_per_node, num_experts=traces.num_experts, redundant=redundant)
