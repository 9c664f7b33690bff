"""The compiled per-(request, layer) statistics (tracekit/analysis/kernels.py) equal the dense numpy/scipy ones on
random sparse count vectors, ties, constant and empty vectors included."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr

from tracekit.analysis import kernels, pair_kernels


def top_mask(a: np.ndarray, n: int) -> np.ndarray:
    """The reference top-n: (..., E) -> (..., E) bool, the n largest entries along the last axis, ties to the lower
    expert id (the same set as a stable descending sort)."""
    order = np.argsort(-a, axis=-1, kind="stable")[..., :min(n, a.shape[-1])]
    out = np.zeros(a.shape, dtype=bool)
    np.put_along_axis(out, order, True, axis=-1)
    return out


def _csr(rows):
    """[(pre (E,), dec (E,))] -> one batch of n=len(rows) slots, L=1: ptr, expert, pre, dec (first-seen order
    shuffled, as the rows come)."""
    rng = np.random.default_rng(0)
    ptr, ex, pr, de = [0], [], [], []
    for a, b in rows:
        ids = np.flatnonzero((a > 0) | (b > 0))
        rng.shuffle(ids)
        ex += ids.tolist()
        pr += a[ids].tolist()
        de += b[ids].tolist()
        ptr.append(len(ex))
    as32 = lambda v: np.asarray(v, dtype=np.int32)  # noqa: E731
    return np.asarray(ptr, dtype=np.int64), as32(ex), as32(pr), as32(de)


def _cases(E, rng):
    out = []
    for _ in range(200):
        a = np.zeros(E, dtype=np.int64)
        b = np.zeros(E, dtype=np.int64)
        na, nb = rng.integers(0, min(E, 12), 2)
        a[rng.choice(E, na, replace=False)] = rng.integers(1, 4, na)  # small counts: many ties
        b[rng.choice(E, nb, replace=False)] = rng.integers(1, 40, nb)
        out.append((a, b))
    out.append((np.zeros(E, np.int64), np.ones(E, np.int64)))  # a constant
    full = rng.integers(1, 5, E)
    out.append((full, full[::-1].copy()))  # no zeros at all
    return out


@pytest.mark.parametrize("E,n", [(16, 4), (64, 8), (8, 8), (8, 20)])
def test_pair_statistics_equal_numpy(E, n):
    rng = np.random.default_rng(E * 100 + n)
    cases = _cases(E, rng)
    ptr, ex, pr, de = _csr(cases)
    S = len(cases)
    # partner of subject i: the decode of case (i + 1) % S, through the pool
    pool_rows = [(np.zeros(E, np.int64), b) for _, b in cases]
    pptr, pex, _, pcn = _csr(pool_rows)
    out = np.full((6, S, 1), np.nan)
    pair_kernels.pair_statistics(ptr, ex, pr, de, np.arange(S, dtype=np.int64), (np.arange(S, dtype=np.int64) + 1) % S,
                            pptr, pex, pcn, 1, E, n, out)
    for i, (a, b) in enumerate(cases):
        for o, partner in ((0, b), (3, cases[(i + 1) % S][1])):
            const = a.min() == a.max() or partner.min() == partner.max()
            if const:
                assert np.isnan(out[o, i, 0]) and np.isnan(out[o + 1, i, 0])
            else:
                assert out[o, i, 0] == pytest.approx(pearsonr(a, partner)[0], abs=1e-12)
                assert out[o + 1, i, 0] == pytest.approx(spearmanr(a, partner)[0], abs=1e-12)
            want = (top_mask(a, n) & top_mask(partner, n)).sum() / min(n, E)
            stable = lambda v: set(np.argsort(-v, kind="stable")[:n].tolist())  # noqa: E731
            assert want == len(stable(a) & stable(partner)) / min(n, E)
            assert out[o + 2, i, 0] == want


def test_sparse_histograms_count_every_choice():
    rng = np.random.default_rng(1)
    R, n, L, E, k = 5000, 7, 3, 32, 4
    slot = rng.integers(-1, n, R)
    li = rng.integers(0, L, R)
    dec = rng.integers(0, 2, R).astype(np.uint8)
    values = np.concatenate([rng.choice(E + 2, k, replace=False) for _ in range(R)]).astype(np.uint8)  # E, E+1 dropped
    offsets = np.arange(R + 1, dtype=np.int32) * k
    req = np.where(slot >= 0, 100 + slot, 100 + n + 3).astype(np.int32)  # a request id outside the batch: skipped
    req_slot = np.full(n + 2, -1, dtype=np.int32)
    req_slot[:n] = np.arange(n)
    layer = (li + 5).astype(np.int16)
    layer_li = np.r_[np.full(5, -1), np.arange(L)].astype(np.int32)
    ptr, ex, pre, de = kernels.sparse_histograms(req, 100, req_slot, layer, layer_li, dec, offsets, values, n, L, E)
    want = np.zeros((n, L, 2, E), dtype=np.int64)
    for i in range(R):
        if slot[i] >= 0:
            for e in values[i * k:(i + 1) * k]:
                if e < E:
                    want[slot[i], li[i], dec[i], e] += 1
    got = np.zeros_like(want)
    for key in range(n * L):
        s, l = divmod(key, L)
        seg = slice(ptr[key], ptr[key + 1])
        assert len(set(ex[seg].tolist())) == ptr[key + 1] - ptr[key]  # each expert once per key
        got[s, l, 0, ex[seg]] = pre[seg]
        got[s, l, 1, ex[seg]] = de[seg]
    assert np.array_equal(got, want)
