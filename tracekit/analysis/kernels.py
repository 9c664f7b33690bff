"""Compiled loops over token-layer rows for the streaming analyses (numba).

The analyses need, per request and MoE layer, the expert histogram of the prefill and of the decode: sparse (a
request-layer touches ~k x tokens experts of E). Dense (requests, layers, 2, E) arrays made every statistic a pass
over mostly zeros (1,400 s for 100k requests); these loops touch only the experts a request used, so their cost
grows with the rows read, not with requests x layers x E.

Terms: a *key* is one (request slot, layer index) pair, ``key = slot * L + li``; a batch's sparse histograms are
CSR over keys: ``ptr`` (K + 1,) into ``expert``/``prefill``/``decode`` (T,), the experts of a key in first-seen
order with their prefill and decode counts (at least one of them > 0).
"""
from __future__ import annotations

import numpy as np
import numba
from numba import njit, prange

CACHE = True  # compiled once per machine (numba's cache beside the module, or the user's cache when read-only)


def blocks(K: int) -> int:
    """How many blocks a parallel loop over K keys is cut into (a few per thread, for balance)."""
    return max(1, min(K, 8 * numba.get_num_threads()))


def sparse_histograms(req, lo, req_slot, layer, layer_li, decode, offsets, values, n: int, L: int, E: int,
                      buffers: dict | None = None):
    """See :func:`_sparse_histograms` (the compiled loops); returns ptr, expert, prefill, decode (views of
    ``buffers``' arrays when given: valid until the next call with the same buffers, which saves the page faults
    of fresh arrays on every batch)."""
    need = int(offsets[-1] - offsets[0]) if len(offsets) else 0
    buffers = {} if buffers is None else buffers
    if buffers.get("size", -1) < need:
        buffers.update(size=need, **{k: np.empty(need, np.int32) for k in ("e", "a", "b", "e2", "a2", "b2")})
    ptr = _sparse_histograms(req, lo, req_slot, layer, layer_li, decode, offsets, values, n, L, E, buffers["e"],
                             buffers["a"], buffers["b"], buffers["e2"], buffers["a2"], buffers["b2"], blocks(n * L))
    T = int(ptr[-1])
    return ptr, buffers["e2"][:T], buffers["a2"][:T], buffers["b2"][:T]


@njit(cache=CACHE, nogil=True, parallel=True)
def _sparse_histograms(req, lo, req_slot, layer, layer_li, decode, offsets, values, n, L, E, room_e, room_a,
                       room_b, expert, pre, dec, blocks):  # pragma: no cover - compiled
    """Per-(request, layer) expert histograms of a batch of rows.

    req (R,): request id of each row, its slot ``req_slot[req - lo]`` (0..n-1; -1 or out of range: skip the row);
    layer (R,): layer number, its index ``layer_li[layer]`` (0..L-1; -1 or out of range: skip); decode (R,)
    bool-like: decode row (else prefill); offsets (R + 1,) and values (V,): each row's expert ids
    ``values[offsets[i]:offsets[i + 1]]`` (ids >= E are dropped). The rows are ordered by key with a counting sort,
    ``blocks`` ranges of keys are counted in parallel, each key into the room its choices could need in
    room_e/room_a/room_b (each at least V long), then compacted into expert/pre/dec (as long). Returns ptr
    (n*L + 1,) int64 into them.
    """
    K = n * L
    R = req.shape[0]
    key_of = np.empty(R, dtype=np.int64)
    room = np.zeros(K + 1, dtype=np.int64)
    span = req_slot.shape[0]
    nl = layer_li.shape[0]
    for i in range(R):
        r = req[i] - lo
        y = layer[i]
        s = req_slot[r] if 0 <= r < span else -1
        l = layer_li[y] if 0 <= y < nl else -1
        if s >= 0 and l >= 0:
            key = s * L + l
            key_of[i] = key
            room[key + 1] += offsets[i + 1] - offsets[i]
        else:
            key_of[i] = -1
    for k in range(K):
        room[k + 1] += room[k]
    start, order = _counting_order(key_of, K)
    used = np.zeros(K, dtype=np.int64)
    for bi in prange(blocks):
        ca = np.zeros(E, dtype=np.int32)
        cb = np.zeros(E, dtype=np.int32)
        touched = np.empty(E, dtype=np.int32)
        for key in range(bi * K // blocks, (bi + 1) * K // blocks):
            nt = 0
            for j in range(start[key], start[key + 1]):
                i = order[j]
                d = decode[i] != 0
                for v in range(offsets[i], offsets[i + 1]):
                    e = values[v]
                    if e >= E:
                        continue
                    if ca[e] == 0 and cb[e] == 0:
                        touched[nt] = e
                        nt += 1
                    if d:
                        cb[e] += 1
                    else:
                        ca[e] += 1
            t = room[key]
            for q in range(nt):
                e = touched[q]
                room_e[t] = e
                room_a[t] = ca[e]
                room_b[t] = cb[e]
                ca[e] = 0
                cb[e] = 0
                t += 1
            used[key] = nt
    ptr = np.zeros(K + 1, dtype=np.int64)
    for k in range(K):
        ptr[k + 1] = ptr[k] + used[k]
    for bi in prange(blocks):
        for key in range(bi * K // blocks, (bi + 1) * K // blocks):
            src = room[key]
            dst = ptr[key]
            for q in range(used[key]):
                expert[dst + q] = room_e[src + q]
                pre[dst + q] = room_a[src + q]
                dec[dst + q] = room_b[src + q]
    return ptr


@njit(cache=CACHE, nogil=True)
def count_choices(row_base, offsets, values, E, out):  # pragma: no cover - compiled
    """out[row_base[i] + e] += 1 for every expert id e < E of row i (``values[offsets[i]:offsets[i + 1]]``);
    row_base (R,) int64, out (cells,) int64. The per-chunk load summary's count (a numpy broadcast and bincount
    over every choice took ~10x longer)."""
    for i in range(row_base.shape[0]):
        b = row_base[i]
        for v in range(offsets[i], offsets[i + 1]):
            e = values[v]
            if e < E:
                out[b + e] += 1


@njit(cache=CACHE, nogil=True)
def add_loads(ptr, expert, pre, dec, slot_group, L, out_phase, out_group):  # pragma: no cover - compiled
    """Sum a batch's histograms into out_phase (2, L, E) (prefill, decode) and out_group (G, L, E) (both phases,
    by ``slot_group`` (n,): the group of each slot; -1 adds to no group)."""
    K = ptr.shape[0] - 1
    for key in range(K):
        s = key // L
        l = key - s * L
        g = slot_group[s]
        for t in range(ptr[key], ptr[key + 1]):
            e = expert[t]
            out_phase[0, l, e] += pre[t]
            out_phase[1, l, e] += dec[t]
            if g >= 0:
                out_group[g, l, e] += pre[t] + dec[t]


@njit(cache=CACHE, nogil=True)
def add_rows_of_slots(ptr, expert, pre, dec, slot_row, L, E, phase_rows, out):  # pragma: no cover - compiled
    """Scatter slots' histograms into rows of ``out`` (M, L * E): slot s -> row ``slot_row[s]`` (-1: skip), both
    phases summed; with ``phase_rows`` the prefill goes to row 2r and the decode to row 2r + 1 instead."""
    K = ptr.shape[0] - 1
    for key in range(K):
        s = key // L
        r = slot_row[s]
        if r < 0:
            continue
        l = key - s * L
        for t in range(ptr[key], ptr[key + 1]):
            c = l * E + expert[t]
            if phase_rows:
                out[2 * r, c] += pre[t]
                out[2 * r + 1, c] += dec[t]
            else:
                out[r, c] += pre[t] + dec[t]


@njit(cache=CACHE, nogil=True)
def _counting_order(key, K):  # pragma: no cover - compiled
    """Rows ordered by ``key`` (R,) in 0..K-1 (rows with key < 0 left out), stable: (start (K + 1,), order)."""
    start = np.zeros(K + 1, dtype=np.int64)
    for i in range(key.shape[0]):
        if key[i] >= 0:
            start[key[i] + 1] += 1
    for t in range(K):
        start[t + 1] += start[t]
    fill = start[:-1].copy()
    order = np.empty(start[K], dtype=np.int64)
    for i in range(key.shape[0]):
        if key[i] >= 0:
            order[fill[key[i]]] = i
            fill[key[i]] += 1
    return start, order


@njit(cache=CACHE, nogil=True)
def coactivation_counts(li, offsets, values, token, E, pair_of, next_of, pairs, trans):  # pragma: no cover - compiled
    """Co-activation within a layer and from a layer to the next, from a batch's rows.

    li (R,) layer index; offsets (R + 1,), values: each row's expert ids (ids >= E skipped); token (R,): the token
    of each row (-1: skip). pair_of (L,): the row of ``pairs`` (P, E, E) a layer counts into (-1: none): every
    two ids i < j (list order) of a row add pairs[p, e_i, e_j]; next_of (L,): the row of ``trans`` (S, E, E) for
    a layer whose next MoE layer is counted (-1: none): each row at layer l and each row of the same token at
    layer l + 1 add trans[s, a, b] for all their ids a, b. Rows are visited layer by layer, so the (E, E) counts
    being added to stay in cache.
    """
    R = li.shape[0]
    L = pair_of.shape[0]
    T = 0
    for i in range(R):
        if token[i] >= T:
            T = token[i] + 1
    tok = np.where(li >= 0, token, -1)
    t_start, t_order = _counting_order(tok, T)
    # per row: where the rows of its token at the next layer are (t_order[nx_lo[i]:nx_hi[i]])
    nx_lo = np.zeros(R, dtype=np.int64)
    nx_hi = np.zeros(R, dtype=np.int64)
    for t in range(T):
        lo, hi = t_start[t], t_start[t + 1]
        for j in range(lo + 1, hi):  # a token's rows sorted by layer (a handful: insertion)
            x = t_order[j]
            q = j
            while q > lo and li[t_order[q - 1]] > li[x]:
                t_order[q] = t_order[q - 1]
                q -= 1
            t_order[q] = x
        for j in range(lo, hi):
            a = t_order[j]
            q = j + 1
            while q < hi and li[t_order[q]] == li[a]:
                q += 1
            nx_lo[a] = q
            while q < hi and li[t_order[q]] == li[a] + 1:
                q += 1
            nx_hi[a] = q
    l_start, l_order = _counting_order(np.where(tok >= 0, li, -1), L)
    for l in range(L):
        p = pair_of[l]
        s = next_of[l]
        for j in range(l_start[l], l_start[l + 1]):
            a = l_order[j]
            if p >= 0:
                for u in range(offsets[a], offsets[a + 1]):
                    x = values[u]
                    if x >= E:
                        continue
                    for v in range(u + 1, offsets[a + 1]):
                        y = values[v]
                        if y < E:
                            pairs[p, x, y] += 1
            if s >= 0:
                for q in range(nx_lo[a], nx_hi[a]):
                    b = t_order[q]
                    for u in range(offsets[a], offsets[a + 1]):
                        x = values[u]
                        if x >= E:
                            continue
                        for v in range(offsets[b], offsets[b + 1]):
                            y = values[v]
                            if y < E:
                                trans[s, x, y] += 1


@njit(cache=CACHE, nogil=True)
def gather_rows(ptr, expert, counts, slot_row, L, rows):  # pragma: no cover - compiled
    """Concatenate the histograms of chosen slots, CSR over (row, layer): slot s -> row ``slot_row[s]`` of ``rows``
    (-1: skip), entries with a zero count dropped. Returns (keys (T,) int64 = row * L + layer, expert, count) in
    the batch's order; :func:`csr_from_keys` orders them."""
    K = ptr.shape[0] - 1
    T = 0
    for key in range(K):
        if slot_row[key // L] >= 0:
            for t in range(ptr[key], ptr[key + 1]):
                if counts[t] > 0:
                    T += 1
    keys = np.empty(T, dtype=np.int64)
    ex = np.empty(T, dtype=np.int32)
    cn = np.empty(T, dtype=np.int32)
    j = 0
    for key in range(K):
        s = key // L
        r = slot_row[s]
        if r < 0:
            continue
        for t in range(ptr[key], ptr[key + 1]):
            if counts[t] > 0:
                keys[j] = r * L + (key - s * L)
                ex[j] = expert[t]
                cn[j] = counts[t]
                j += 1
    return keys, ex, cn


@njit(cache=CACHE, nogil=True)
def csr_from_keys(keys, expert, count, K):  # pragma: no cover - compiled
    """Entries keyed 0..K-1 -> CSR: ptr (K + 1,), expert, count ordered by key (stable)."""
    ptr, order = _counting_order(keys, K)
    return ptr, expert[order], count[order]
