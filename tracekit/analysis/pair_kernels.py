"""Compiled prefill-decode statistics of finding 3 (numba): per (request, layer), Pearson, Spearman and top-n
overlap of the prefill's expert histogram against its own decode's and against a partner request's decode (the
shuffled baseline), computed from the sparse histograms of :mod:`tracekit.analysis.kernels` (value histograms and
average ranks per distinct count, never a dense E-wide vector per key).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .kernels import CACHE
from .kernels import blocks


def pair_statistics(ptr, expert, pre, dec, slot_subject, slot_partner, pool_ptr, pool_expert, pool_count,
                    L: int, E: int, n_top: int, out) -> None:
    """See :func:`_pair_statistics` (the compiled loop); fills ``out`` (6, S, L)."""
    _pair_statistics(ptr, expert, pre, dec, slot_subject, slot_partner, pool_ptr, pool_expert, pool_count,
                     L, E, n_top, out, blocks(len(ptr) - 1))


@njit(cache=CACHE, nogil=True, parallel=True)
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


@njit(cache=CACHE, nogil=True)
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


@njit(cache=CACHE, nogil=True)
def _threshold(hist, top, n):  # pragma: no cover - compiled
    """The n-th largest value t of a count vector (0 when fewer than n are positive) and how many entries equal to
    t its top n take (the lowest ids first)."""
    above = 0
    t = top
    while t > 0 and above + hist[t] < n:
        above += hist[t]
        t -= 1
    return t, n - above


@njit(cache=CACHE, nogil=True)
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


@njit(cache=CACHE, nogil=True)
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


@njit(cache=CACHE, nogil=True)
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


@njit(cache=CACHE, nogil=True)
def _pearson(E, sxy, sx, sxx, sy, syy):  # pragma: no cover - compiled
    den = np.sqrt((E * sxx - sx * sx) * (E * syy - sy * sy))
    return (E * sxy - sx * sy) / den if den > 0 else np.nan  # a constant vector: no correlation


@njit(cache=CACHE, nogil=True)
def _spearman(E, s_xy, sxx, syy):  # pragma: no cover - compiled
    if sxx <= 1e-9 or syy <= 1e-9:
        return np.nan
    mean = (E + 1) / 2.0
    return (s_xy - E * mean * mean) / np.sqrt(sxx * syy)


@njit(cache=CACHE, nogil=True)
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
