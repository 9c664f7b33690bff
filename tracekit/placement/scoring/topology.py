"""GPU-to-GPU cost beyond nodes x GPUs: SGLang's rank-cost matrix, and the traffic it weights.

The file is the JSON of SGLang's topology-aware EPLB (sgl-project/sglang PR #37923, ``--eplb-topology``)::

    {"rank_cost_matrix": [[0, 1, ...], ...]}     G x G, row = source EP rank (GPU), column = destination

square, finite, non-negative, zero on the diagonal, values relative (only ratios matter). A GB200 NVL72 rack is
one matrix of equal costs; two NICs per node give the GPUs behind each NIC their own cost to the other node.
``nodes x gpus_per_node`` stays the shorthand: :func:`shorthand_matrix` is 0 on a GPU itself, 1 within a node and
the profile's NVLink / RDMA bandwidth ratio across nodes.

:func:`weighted_traffic` generalises the communication model's cross-node notion: every (token, expert) pair
sent from the token's home GPU h to the GPU d its replica lives on (the engine's own replica choice) costs
``cost[h, d]``; the sum per token-layer is ``topology_cost_per_token`` and the share of pairs whose cost is
the matrix's largest off-diagonal level is ``topology_far_share`` (the cross-node share under the shorthand).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import TracekitError
from ..data.types import Placement, TraceArrays


def check_matrix(obj, where: str, num_gpus: int | None = None) -> np.ndarray:
    """(G, G) float64 from ``{"rank_cost_matrix": [[...]]}`` (or the bare list), or a one-line TracekitError."""
    data = obj.get("rank_cost_matrix") if isinstance(obj, dict) else obj
    if isinstance(obj, dict) and "rank_cost_matrix" not in obj:
        raise TracekitError(f'{where}: expected {{"rank_cost_matrix": [[...], ...]}} (SGLang\'s topology JSON)')
    try:
        a = np.asarray(data, dtype=np.float64)
    except (TypeError, ValueError):
        raise TracekitError(f"{where}: rank_cost_matrix must be a rectangular array of numbers") from None
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise TracekitError(f"{where}: rank_cost_matrix must be square (one row and column per GPU), got shape "
                            f"{a.shape}")
    if num_gpus is not None and a.shape[0] != num_gpus:
        raise TracekitError(f"{where}: rank_cost_matrix is {a.shape[0]} x {a.shape[0]}, the cluster has {num_gpus} "
                            "GPUs (nodes x gpus-per-node)")
    if not np.isfinite(a).all() or (a < 0).any():
        raise TracekitError(f"{where}: rank_cost_matrix must be finite and non-negative")
    if (np.diag(a) != 0).any():
        raise TracekitError(f"{where}: rank_cost_matrix's diagonal must be zero (a GPU sends to itself for free)")
    return a


def load_topology(path: str | Path, num_gpus: int | None = None) -> np.ndarray:
    """Read and validate a topology file (one line on any problem)."""
    from ...jsonlines import read_json

    p = Path(path)
    if not p.is_file():
        raise TracekitError(f"--topology {p}: no such file")
    return check_matrix(read_json(p, 'write {"rank_cost_matrix": [[...]]}'), f"--topology {p}", num_gpus)


def shorthand_matrix(nodes: int, gpus_per_node: int, across: float = 9.0) -> np.ndarray:
    """(G, G) the nodes x GPUs shorthand: 0 on the diagonal, 1 within a node, ``across`` between nodes."""
    node = np.arange(nodes * gpus_per_node) // gpus_per_node
    a = np.where(node[:, None] == node[None, :], 1.0, float(across))
    np.fill_diagonal(a, 0.0)
    return a


def pair_destinations(placement: Placement, traces: TraceArrays, mask: np.ndarray | None = None, *,
                      engine: str = "sglang", home: np.ndarray | None = None, decode_batch: int = 128,
                      prefill_chunk: int = 4096, seed: int = 42) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(h (n,), dg (n, k), real (n, k) bool)``: the home GPU and destination GPU of every (token, expert) pair of
    the rows selected by ``mask``, under ``engine``'s replica choice (as :func:`tracekit.placement.scoring.comm.evaluate`
    chooses them)."""
    from . import replay as rp
    from .comm import dispatch_table, home_gpus
    from .dispatch import STATIC_ENGINES, check_engine, choose_replicas

    check_engine(engine)
    c = placement.cluster
    sel = np.ones(len(traces), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if home is None:
        home = home_gpus(traces, placement, c, sel)
    home = np.asarray(home, dtype=np.int64)
    lp = traces.layer_pos[sel].astype(np.int64)
    h = home[traces.request[sel]]
    ex = traces.experts[sel].astype(np.int64)
    real = ex < c.num_experts
    look = np.where(real, ex, 0)
    gpu_of_slot = c.gpu_of_slot()
    if engine in STATIC_ENGINES:
        n_hidden = placement.meta.get("num_hidden_layers") or (traces.geometry or {}).get("num_layers")
        table = dispatch_table(placement, engine, seed=seed, num_hidden_layers=n_hidden)
        M, G, E = table.shape
        slots = table.reshape(-1)[((lp * G + h) * E)[:, None] + look]
    else:
        layout = rp.step_layout(traces, sel, home, decode_batch=decode_batch, prefill_chunk=prefill_chunk)
        st = layout.step[sel].astype(np.int64)
        slots = choose_replicas(np.asarray(placement.slot_expert), lp, h, look, engine=engine,
                                gpus_per_node=c.gpus_per_node, num_gpus=c.num_gpus, num_experts=c.num_experts,
                                batch=st * c.num_gpus + h, index_in_batch=layout.index[sel])
    dg = np.where(real, gpu_of_slot[slots], h[:, None])
    return h, dg, real


def weighted_traffic(placement: Placement, traces: TraceArrays, cost: np.ndarray, mask: np.ndarray | None = None,
                     **kw) -> dict:
    """``topology_cost_per_token`` (sum of ``cost[home, dest]`` over a token-layer's pairs, mean over token-layers)
    and ``topology_far_share`` (share of pairs sent at the matrix's highest off-diagonal cost) for the rows of
    ``mask``; ``kw`` as :func:`pair_destinations`."""
    cost = np.asarray(cost, dtype=np.float64)
    if cost.shape != (placement.cluster.num_gpus,) * 2:
        raise TracekitError(f"the topology has {cost.shape[0]} GPUs, the placement {placement.cluster.num_gpus}")
    h, dg, real = pair_destinations(placement, traces, mask, **kw)
    if h.size == 0:
        return {"topology_cost_per_token": float("nan"), "topology_far_share": float("nan")}
    w = cost[h[:, None], dg]
    off = cost[~np.eye(cost.shape[0], dtype=bool)]
    top = off.max() if off.size else 0.0
    pairs = int(real.sum())
    far = int(((w >= top) & (top > 0) & real).sum())
    return {"topology_cost_per_token": float(w.sum() / h.size),
            "topology_far_share": float(far / pairs) if pairs else float("nan")}


def topology_lines(comp, traces: TraceArrays, path: str | Path, engine: str) -> list[str]:
    """The placement table's topology line: weighted traffic of every compared placement on its held-out rows."""
    from ..data.traces import make_split

    cl = comp.meta["cluster"]
    cost = load_topology(path, cl["nodes"] * cl["gpus_per_node"])
    m = comp.meta
    _, test = make_split(traces, m.get("split", "request"), m.get("holdout") or 0.3, m.get("seed", 0),
                         m.get("token_frac") or 0.5)
    parts = []
    for row in comp.rows:
        name = row["strategy"]
        w = weighted_traffic(comp.placements[name], traces, cost, test, engine=engine)
        row["heldout"].update(w)
        parts.append(f"{name} {w['topology_cost_per_token']:.3g} ({100 * w['topology_far_share']:.0f}% far)")
    return [f"topology cost per token-layer, held-out ({path}): " + ", ".join(parts)]
