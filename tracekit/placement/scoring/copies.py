"""Per-chunk counting of :func:`tracekit.placement.scoring.comm.evaluate`: the copies a chunk of token-layers
sends (normal and low-latency mode, across and inside nodes) and the GPU load it adds, into one :class:`Counts`
per thread, merged at the end. Every count is an integer (exact in float64 too), so the merge order, and so the
number of threads, changes no number.

Distinct destinations per row come from per-row GPU bitmasks when the cluster has at most 64 GPUs
(:func:`count_chunk_bits`), else from sorting each row's k GPUs (:func:`count_chunk_sorted`); both give identical
numbers.
"""
from __future__ import annotations

import numpy as np


class Counts:
    """Accumulators of :func:`evaluate` over row chunks."""

    def __init__(self, M: int, G: int, nodes: int):
        self.rows = self.cn_norm = self.cn_ll = self.intra_norm = self.intra_ll = self.fwd_norm = 0
        self.node_eg_norm = np.zeros(nodes)
        self.node_in_norm = np.zeros(nodes)
        self.node_eg_ll = np.zeros(nodes)
        self.node_in_ll = np.zeros(nodes)
        self.nvl_in_norm = np.zeros(G)
        self.nvl_in_ll = np.zeros(G)
        self.gpu_load = np.zeros(M * G, dtype=np.int64)
        self.rows_layer = np.zeros(M, dtype=np.int64)
        self.cn_norm_layer = np.zeros(M)

    def merge(self, o: "Counts") -> None:
        for name, val in vars(o).items():
            setattr(self, name, getattr(self, name) + val)


def count_pairs(acc: Counts, lp, h, hn, dg, dn, G: int, nodes: int, real=None) -> None:
    """Per (token, expert) pair: GPU load, low-latency copies and intra-node pairs (shared by both paths).

    ``real`` (n, k) bool or None: False for zero-computation choices, whose ``dg`` is the home GPU (no copy is
    counted for them by construction); they add no GPU load either."""
    n, k = dg.shape
    acc.rows += n
    acc.rows_layer += np.bincount(lp, minlength=acc.rows_layer.size)
    size = acc.gpu_load.size
    key = lp[:, None] * G + dg
    if real is not None:
        key = np.where(real, key, size)  # a dump bin past the end
    acc.gpu_load += np.bincount(key.ravel(), minlength=size + 1)[:size]
    remote = dn != hn[:, None]
    local = ~remote & (dg != h[:, None])
    per_row_ll = remote.sum(1)
    acc.cn_ll += int(per_row_ll.sum())
    acc.node_eg_ll += np.bincount(hn, weights=per_row_ll, minlength=nodes)
    acc.node_in_ll += np.bincount((dn + nodes * remote).ravel(), minlength=2 * nodes)[nodes:]
    acc.intra_ll += int(local.sum())
    acc.nvl_in_ll += np.bincount((dg + G * local).ravel(), minlength=2 * G)[G:]


def count_chunk_bits(acc: Counts, lp, h, dg, G: int, gpn: int, nodes: int, real=None) -> None:
    """One chunk with per-row GPU bitmasks (G <= 64): distinct GPUs / nodes without sorting."""
    hn = h // gpn
    dn = dg // gpn
    count_pairs(acc, lp, h, hn, dg, dn, G, nodes, real)
    bit = np.left_shift(np.uint64(1), np.arange(G, dtype=np.uint64))
    gbits = bit[dg[:, 0]]
    for j in range(1, dg.shape[1]):
        gbits |= bit[dg[:, j]]
    node_mask = np.array([bit[j * gpn:(j + 1) * gpn].sum() for j in range(nodes)], dtype=np.uint64)
    rank_mask = np.array([bit[r::gpn].sum() for r in range(gpn)], dtype=np.uint64)  # GPUs of local rank r
    per_row = np.zeros(hn.size, dtype=np.int64)
    for j in range(nodes):  # normal mode: one send per distinct remote node
        rj = ((gbits & node_mask[j]) != 0) & (hn != j)
        per_row += rj
        acc.node_in_norm[j] += int(rj.sum())
    acc.cn_norm += int(per_row.sum())
    acc.cn_norm_layer += np.bincount(lp, weights=per_row, minlength=acc.cn_norm_layer.size)
    acc.node_eg_norm += np.bincount(hn, weights=per_row, minlength=nodes)
    home_node = node_mask[hn]
    local_bits = gbits & home_node & ~bit[h]
    fwd_bits = gbits & ~home_node & ~rank_mask[h % gpn]  # remote GPUs other than the landing GPU
    acc.intra_norm += int(np.bitwise_count(local_bits).sum())
    acc.fwd_norm += int(np.bitwise_count(fwd_bits).sum())
    # per-GPU bit counts: a 256-bin histogram of each byte of the masks, then the bits of each byte value
    by = (local_bits | fwd_bits).view(np.uint8).reshape(-1, 8)
    bits_of = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little").astype(np.int64)
    nvl = np.concatenate([np.bincount(by[:, b], minlength=256) @ bits_of for b in range(8)])
    acc.nvl_in_norm += nvl[:G]


def count_chunk_sorted(acc: Counts, lp, h, dg, G: int, gpn: int, nodes: int, real=None) -> None:
    """One chunk, any cluster size: sort each row's GPUs and count first occurrences."""
    if real is None:
        dg = np.sort(dg, axis=1)
    else:  # the mask follows its entries through the sort
        order = np.argsort(dg, axis=1, kind="stable")
        dg, real = np.take_along_axis(dg, order, 1), np.take_along_axis(real, order, 1)
    hn = h // gpn
    dn = dg // gpn
    count_pairs(acc, lp, h, hn, dg, dn, G, nodes, real)
    new_gpu = np.ones_like(dg, dtype=bool)
    new_gpu[:, 1:] = dg[:, 1:] != dg[:, :-1]
    new_node = np.ones_like(dg, dtype=bool)
    new_node[:, 1:] = dn[:, 1:] != dn[:, :-1]
    remote = dn != hn[:, None]
    local = ~remote & (dg != h[:, None])
    rn = remote & new_node
    per_row = rn.sum(1)
    acc.cn_norm += int(per_row.sum())
    acc.cn_norm_layer += np.bincount(lp, weights=per_row, minlength=acc.cn_norm_layer.size)
    acc.node_eg_norm += np.bincount(hn, weights=per_row, minlength=nodes)
    acc.node_in_norm += np.bincount(dn[rn], minlength=nodes)
    lg = local & new_gpu
    acc.intra_norm += int(lg.sum())
    fw = remote & new_gpu & ((dg % gpn) != (h % gpn)[:, None])
    acc.fwd_norm += int(fw.sum())
    acc.nvl_in_norm += np.bincount(dg[lg], minlength=G) + np.bincount(dg[fw], minlength=G)
