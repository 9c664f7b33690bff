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

_CACHE = True  # compiled once per machine (numba's cache beside the module, or the user's cache when read-only)


def _blocks(K: int) -> int:
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
                             buffers["a"], buffers["b"], buffers["e2"], buffers["a2"], buffers["b2"], _blocks(n * L))
    T = int(ptr[-1])
    return ptr, buffers["e2"][:T], buffers["a2"][:T], buffers["b2"][:T]


def pair_statistics(ptr, expert, pre, dec, slot_subject, slot_partner, pool_ptr, pool_expert, pool_count,
                    L: int, E: int, n_top: int, out) -> None:
    """See :func:`_pair_statistics` (the compiled loop); fills ``out`` (6, S, L)."""
    _pair_statistics(ptr, expert, pre, dec, slot_subject, slot_partner, pool_ptr, pool_expert, pool_count,
                     L, E, n_top, out, _blocks(len(ptr) - 1))


@njit(cache=_CACHE, nogil=True, parallel=True)
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


@njit(cache=_CACHE, nogil=True)
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


@njit(cache=_CACHE, nogil=True)
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


@njit(cache=_CACHE, nogil=True)
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


@njit(cache=_CACHE, nogil=True, parallel=True)
def _pair_statistics(ptr, expert, pre, dec, slot_subject, slot_partner, pool_ptr, pool_expert, pool_count,
                     L, E, n_top, out, blocks):  # pragma: no cover - compiled
    """Prefill-decode statistics of a batch's subjects, and against their partners' decode (the shuffled baseline).

    ptr/expert/pre/dec: the batch's histograms (see the module docstring); slot_subject (n,): the subject row
    of each slot in ``out`` (-1: not a subject); slot_partner (n,): the partner's row in the pool (-1: none);
    pool_ptr (P*L + 1,), pool_expert, pool_count: the pool's decode histograms, CSR over (pool row, layer).
    out (6, S, L) float64, filled for every subject and layer: pearson, spearman, top-n overlap, then the same
    three against the partner's decode (left as is where there is no partner). Ranges of keys run in parallel.
    """
    K = ptr.shape[0] - 1
    V = 2
    for t in range(pre.shape[0]):
        V = max(V, pre[t] + 2, dec[t] + 2)
    for t in range(pool_count.shape[0]):
        V = max(V, pool_count[t] + 2)
    for bi in prange(blocks):
        _pair_statistics_range(ptr, expert, pre, dec, slot_subject, slot_partner, pool_ptr, pool_expert,
                               pool_count, L, E, n_top, out, V, bi * K // blocks, (bi + 1) * K // blocks)


@njit(cache=_CACHE, nogil=True)
def _ranks(hist, top, nz, E, rank):  # pragma: no cover - compiled
    """Average ranks (1-based, ties averaged) of the values 0..top of a count vector over E entries, from
    ``hist[1:top + 1]`` (how many entries hold each value) and nz positive entries; sets hist[0] and
    rank[0..top]. Returns the sum over the E entries of (rank - mean rank)^2."""
    hist[0] = E - nz
    below = 0
    ss = 0.0
    for v in range(top + 1):
        rank[v] = below + (hist[v] + 1) / 2.0
        below += hist[v]
        ss += hist[v] * rank[v] * rank[v]
    mean = (E + 1) / 2.0
    return ss - E * mean * mean


@njit(cache=_CACHE, nogil=True)
def _threshold(hist, top, n):  # pragma: no cover - compiled
    """The n-th largest value t of a count vector (0 when fewer than n are positive) and how many entries equal to
    t its top n take (the lowest ids first)."""
    above = 0
    t = top
    while t > 0 and above + hist[t] < n:
        above += hist[t]
        t -= 1
    return t, n - above


@njit(cache=_CACHE, nogil=True)
def _keep_lowest(tie, nt, need, e):  # pragma: no cover - compiled
    """Insert id e into tie[:nt], sorted, keeping only the ``need`` lowest ids; returns the new length."""
    if nt == need:
        if e > tie[nt - 1]:
            return nt
        nt -= 1
    p = nt
    while p > 0 and tie[p - 1] > e:
        tie[p] = tie[p - 1]
        p -= 1
    tie[p] = e
    return nt + 1


@njit(cache=_CACHE, nogil=True)
def _rest_of_top_marked(flag, tie, nt, t, need, dense, E):  # pragma: no cover - compiled
    """How many of a top-n set's members at its threshold t are flagged: the ``nt`` kept ties ``tie`` when t > 0,
    else the ``need`` lowest ids whose count (``dense``) is 0. The members above t are counted by the caller."""
    both = 0
    for q in range(nt):
        both += flag[tie[q]]
    if t == 0:
        got = 0
        e = 0
        while got < need and e < E:
            if dense[e] == 0:
                both += flag[e]
                got += 1
            e += 1
    return both


@njit(cache=_CACHE, nogil=True)
def _profile(ids, cnt, lo, hi, dense, hist, E):  # pragma: no cover - compiled
    """One pass over the positive entries ids/cnt[lo:hi] (zeros skipped) of a count vector: dense[e] = count,
    hist[v] += 1; returns (sum, sum of squares, positive entries, largest value)."""
    s = 0.0
    ss = 0.0
    nz = 0
    top = 0
    for q in range(lo, hi):
        x = cnt[q]
        if x > 0:
            e = ids[q]
            dense[e] = x
            hist[x] += 1
            s += x
            ss += x * x
            nz += 1
            if x > top:
                top = x
    return s, ss, nz, top


@njit(cache=_CACHE, nogil=True)
def _pearson(E, sxy, sx, sxx, sy, syy):  # pragma: no cover - compiled
    den = np.sqrt((E * sxx - sx * sx) * (E * syy - sy * sy))
    return (E * sxy - sx * sy) / den if den > 0 else np.nan  # a constant vector: no correlation


@njit(cache=_CACHE, nogil=True)
def _spearman(E, s_xy, sxx, syy):  # pragma: no cover - compiled
    if sxx <= 1e-9 or syy <= 1e-9:
        return np.nan
    mean = (E + 1) / 2.0
    return (s_xy - E * mean * mean) / np.sqrt(sxx * syy)


@njit(cache=_CACHE, nogil=True)
def _pair_statistics_range(ptr, expert, pre, dec, slot_subject, slot_partner, pool_ptr, pool_expert, pool_count,
                           L, E, n_top, out, V, k0, k1):  # pragma: no cover - compiled
    """:func:`pair_statistics` for the keys k0..k1-1 (V above every count).

    Per key: one pass over its experts builds the prefill (a) and decode (b) vectors' sums, value histograms and
    dense copies; the average rank of each value follows from the histograms; a second pass adds the rank
    products and picks the top-n sets (ties to the lowest ids, kept by insertion: n is small). The prefill's
    ranks and top set are reused against the partner's decode (p), which costs one pass over p's experts.
    """
    n = min(n_top, E)
    xa = np.zeros(E, dtype=np.int64)
    xb = np.zeros(E, dtype=np.int64)
    xp = np.zeros(E, dtype=np.int64)
    fa = np.zeros(E, dtype=np.int8)  # in the prefill's top n
    ha = np.zeros(V, dtype=np.int64)
    hb = np.zeros(V, dtype=np.int64)
    hp = np.zeros(V, dtype=np.int64)
    ra = np.zeros(V)
    rb = np.zeros(V)
    rp = np.zeros(V)
    tie_a = np.empty(n + 1, dtype=np.int32)
    tie_b = np.empty(n + 1, dtype=np.int32)
    picked = np.empty(n + 1, dtype=np.int32)  # zero-count experts marked in fa
    for key in range(k0, k1):
        s = key // L
        r = slot_subject[s]
        if r < 0:
            continue
        l = key - s * L
        lo, hi = ptr[key], ptr[key + 1]
        m = hi - lo
        sa, saa, nza, top_a = _profile(expert, pre, lo, hi, xa, ha, E)
        sb, sbb, nzb, top_b = _profile(expert, dec, lo, hi, xb, hb, E)
        sab = 0.0
        for q in range(lo, hi):
            sab += pre[q] * dec[q]
        raa = _ranks(ha, top_a, nza, E, ra)
        rbb = _ranks(hb, top_b, nzb, E, rb)
        ta, need_a = _threshold(ha, top_a, n)
        tb, need_b = _threshold(hb, top_b, n)
        rab = (E - m) * ra[0] * rb[0]
        sum_ra = 0.0  # sum of the prefill's positive entries' ranks (the baseline reuses it)
        nta = 0
        ntb = 0
        both = 0
        for q in range(lo, hi):
            x = pre[q]
            y = dec[q]
            e = expert[q]
            rab += ra[x] * rb[y]
            if x > 0:
                sum_ra += ra[x]
            if x > ta:
                fa[e] = 1
            elif x == ta and ta > 0:
                nta = _keep_lowest(tie_a, nta, need_a, e)
        for q in range(nta):
            fa[tie_a[q]] = 1
        npick = 0
        if ta == 0:  # fewer than n positive: the lowest ids of count 0 complete the set
            e = 0
            while npick < need_a and e < E:
                if xa[e] == 0:
                    fa[e] = 1
                    picked[npick] = e
                    npick += 1
                e += 1
        for q in range(lo, hi):
            y = dec[q]
            e = expert[q]
            if y > tb:
                both += fa[e]
            elif y == tb and tb > 0:
                ntb = _keep_lowest(tie_b, ntb, need_b, e)
        both += _rest_of_top_marked(fa, tie_b, ntb, tb, need_b, xb, E)
        out[0, r, l] = _pearson(E, sab, sa, saa, sb, sbb)
        out[1, r, l] = _spearman(E, rab, raa, rbb)
        out[2, r, l] = both / n

        p = slot_partner[s]
        if p >= 0:  # the prefill against the partner's decode
            pk = p * L + l
            plo, phi = pool_ptr[pk], pool_ptr[pk + 1]
            sp, spp, nzp, top_p = _profile(pool_expert, pool_count, plo, phi, xp, hp, E)
            rpp = _ranks(hp, top_p, nzp, E, rp)
            tp, need_p = _threshold(hp, top_p, n)
            sap = 0.0
            common = 0
            rap = sum_ra * rp[0]
            ntp = 0
            both = 0
            for q in range(plo, phi):
                c = pool_count[q]
                if c <= 0:
                    continue
                e = pool_expert[q]
                x = xa[e]
                sap += x * c
                rap += ra[x] * rp[c]
                if x > 0:
                    common += 1
                    rap -= ra[x] * rp[0]
                if c > tp:
                    both += fa[e]
                elif c == tp and tp > 0:
                    ntp = _keep_lowest(tie_b, ntp, need_p, e)
            rap += ra[0] * rp[0] * (E - (nza + nzp - common))
            both += _rest_of_top_marked(fa, tie_b, ntp, tp, need_p, xp, E)
            out[3, r, l] = _pearson(E, sap, sa, saa, sp, spp)
            out[4, r, l] = _spearman(E, rap, raa, rpp)
            out[5, r, l] = both / n
            for q in range(plo, phi):
                xp[pool_expert[q]] = 0
            for v in range(top_p + 1):
                hp[v] = 0
        for q in range(lo, hi):
            e = expert[q]
            xa[e] = 0
            xb[e] = 0
            fa[e] = 0
        for q in range(npick):
            fa[picked[q]] = 0
        for q in range(nta):
            fa[tie_a[q]] = 0
        for v in range(top_a + 1):
            ha[v] = 0
        for v in range(top_b + 1):
            hb[v] = 0


@njit(cache=_CACHE, nogil=True)
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


@njit(cache=_CACHE, nogil=True)
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


@njit(cache=_CACHE, nogil=True)
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


@njit(cache=_CACHE, nogil=True)
def csr_from_keys(keys, expert, count, K):  # pragma: no cover - compiled
    """Entries keyed 0..K-1 -> CSR: ptr (K + 1,), expert, count ordered by key (stable)."""
    ptr, order = _counting_order(keys, K)
    return ptr, expert[order], count[order]
