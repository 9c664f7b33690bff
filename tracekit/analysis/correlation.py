"""Finding 3: does a request's decode route like its own prefill? (vs another request's decode)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from . import kernels, pair_kernels
from .result import AnalysisResult


def shuffled_partners(subjects: np.ndarray, pool: np.ndarray, seed: int = 0) -> np.ndarray:
    """For each subject request index, a different request drawn uniformly from ``pool`` (indices).

    subjects: (S,) request indices; pool: (P,) sorted request indices with a decode. Returns (S,) partner
    indices, partner != subject; -1 where the pool holds no other request. Vectorised: draw among the P (or
    P - 1, when the subject is in the pool) others and step over the subject's own position.
    """
    rng = np.random.default_rng(seed)
    subjects, pool = np.asarray(subjects, dtype=np.int64), np.asarray(pool, dtype=np.int64)
    if len(pool) == 0:
        return np.full(len(subjects), -1, dtype=np.int64)
    pos = np.searchsorted(pool, subjects)
    inside = (pos < len(pool)) & (pool[np.minimum(pos, len(pool) - 1)] == subjects)
    others = len(pool) - inside
    draw = np.floor(rng.random(len(subjects)) * np.maximum(others, 1)).astype(np.int64)
    draw += inside & (draw >= pos)
    return np.where(others > 0, pool[np.minimum(draw, len(pool) - 1)], -1)


POOL_SHARE = 0.25  # of the budget's array memory for the partners' decode histograms
POOL_BYTES_PER_ENTRY = 16  # one (expert, count) of the pool, with its key while the pool is read
#: at most this many partners' decodes are read: a uniform random sample is as good a shuffled baseline (each
#: subject still gets one random other request), and reading the pool's rows alone costs ~1/3 of a full pass
#: at 4% of the requests, against a second full pass when every request is a possible partner
POOL_MAX_REQUESTS = 1024


def pool_reads(slices, pool: np.ndarray, decode_rows: np.ndarray, max_rows: int | None):
    """Yield (slice, request ids, pool rows) to read the ``pool`` (sorted global request numbers) with: the pool's
    requests of consecutive slices of one run merged into one slice while their decode rows (``decode_rows`` (R,))
    stay within ``max_rows``; ids sorted, each with its row in the pool."""
    from .stream import Slice

    P = len(pool)
    group: list = []
    rows = 0

    def merged():
        files = list(dict.fromkeys(f for sl, _, _ in group for f in sl.files))
        req = np.concatenate([sl.request_ids for sl, _, _ in group])
        index = np.concatenate([sl.index for sl, _, _ in group])
        ids = np.concatenate([i for _, i, _ in group])
        at = np.concatenate([p for _, _, p in group])
        o, q = np.argsort(req, kind="stable"), np.argsort(ids, kind="stable")
        return Slice(group[0][0].run_id, files, req[o], index[o]), ids[q], at[q]

    for sl in slices:
        pos = np.searchsorted(pool, sl.index)
        hit = (pos < P) & (pool[np.minimum(pos, max(P - 1, 0))] == sl.index) if P else np.zeros(len(sl.index), bool)
        if not hit.any():
            continue
        more = int(decode_rows[sl.index[hit]].sum())
        if group and (group[0][0].run_id != sl.run_id or (max_rows is not None and rows + more > max_rows)):
            yield merged()
            group, rows = [], 0
        group.append((sl, sl.request_ids[hit], pos[hit].astype(np.int64)))
        rows += more
    if group:
        yield merged()


def group_means(v: np.ndarray, group: np.ndarray, groups: int) -> tuple[float, np.ndarray]:
    """Mean of the finite entries of v (S, L), over everything and per group of rows (``group`` (S,) codes):
    (overall, (groups,)), NaN where there is none."""
    ok = np.isfinite(v)
    sums = np.where(ok, v, 0.0).sum(axis=1)
    counts = ok.sum(axis=1)
    gs = np.bincount(group, weights=sums, minlength=groups)
    gc = np.bincount(group, weights=counts, minlength=groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_group = np.where(gc > 0, gs / np.maximum(gc, 1), np.nan)
    total = counts.sum()
    return (float(sums.sum() / total) if total else float("nan")), per_group


class CorrelationAccumulator:
    """Prefill-decode correlation from request batches. Subjects (requests with both phases) and their shuffled
    partners are fixed from the request index before any row is read; the partners' decode histograms are read
    first (:meth:`fill_pool`, one pass over decode rows), at most a budget-sized random pool of them; then each
    batch yields its subjects' per-layer statistics (:func:`.pair_kernels.pair_statistics`, from sparse histograms).
    Memory: the pool plus one batch, whatever the run's size."""

    def __init__(self, index, labels: np.ndarray | None, by: str, layers: np.ndarray, num_experts: int, top_k: int,
                 top_n: int | None, pool_cap: int, seed: int = 0):
        self.index, self.by, self.layers, self.E = index, by, layers, num_experts
        self.n = int(top_n or top_k)
        self.labels = labels
        self.subjects = np.flatnonzero((index.prefill_rows > 0) & (index.decode_rows > 0))
        pool = np.flatnonzero(index.decode_rows > 0)
        self.pool_total = len(pool)
        if len(pool) > pool_cap:
            pool = np.sort(np.random.default_rng(seed + 1).choice(pool, pool_cap, replace=False))
        self.pool = pool
        self.partners = shuffled_partners(self.subjects, pool, seed)
        self.partner_slot = np.searchsorted(pool, self.partners)
        S, L = len(self.subjects), len(layers)
        # pearson, spearman, overlap, then against the partner: (6, S, L), each (S, L) contiguous, so the result's
        # columns are views of it rather than copies (at 100k requests x 58 layers each is 46 MB)
        self.stats = np.full((6, S, L), np.nan)
        self.pool_csr = None

    @staticmethod
    def pool_capacity(budget_bytes: int, index, num_layers: int, top_k: int) -> int:
        """Requests whose decode histograms fit ``budget_bytes`` (at most one entry per decode choice)."""
        per = (index.decode_rows[index.decode_rows > 0].mean() if (index.decode_rows > 0).any() else 1) * top_k
        return min(POOL_MAX_REQUESTS, max(2, int(budget_bytes // (POOL_BYTES_PER_ENTRY * max(per, 1)))))

    def fill_pool(self, slices, reader, max_rows: int | None = None) -> None:
        """Read the pool's decode histograms (``reader``: a :class:`.scan.SliceReader`), CSR over (pool row, layer).
        The pool's requests of consecutive slices of a run are read together, up to ``max_rows`` decode rows a
        query (a pool of ~1% of the requests would otherwise cost one query per slice)."""
        L = len(self.layers)
        P = len(self.pool)
        parts = []
        if (self.partners >= 0).any():
            for sl, ids, rows in pool_reads(slices, self.pool, self.index.decode_rows, max_rows):
                h = reader.histograms(sl, only=ids, decode_only=True)
                parts.append(kernels.gather_rows(h.ptr, h.expert, h.decode, rows, L, P))
        if parts:
            keys, ex, cn = (np.concatenate([p[i] for p in parts]) for i in range(3))
        else:
            keys, ex, cn = np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int32)
        self.pool_csr = kernels.csr_from_keys(keys, ex, cn, P * L)

    def add(self, batch) -> None:
        S = len(self.subjects)
        if S == 0:
            return
        at = np.minimum(np.searchsorted(self.subjects, batch.index), S - 1)  # each slot's place among the subjects
        hit = self.subjects[at] == batch.index
        if not hit.any():
            return
        slot_subject = np.where(hit, at, -1).astype(np.int64)
        slot_partner = np.where(hit & (self.partners[at] >= 0), self.partner_slot[at], -1).astype(np.int64)
        if self.pool_csr is None:
            slot_partner[:] = -1
            pool = (np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int32))
        else:
            pool = self.pool_csr
        pair_kernels.pair_statistics(batch.ptr, batch.expert, batch.prefill, batch.decode, slot_subject, slot_partner,
                                pool[0], pool[1], pool[2], len(self.layers), self.E, self.n, self.stats)

    def result(self) -> AnalysisResult:
        res = AnalysisResult("correlation")
        n, subjects = self.n, self.subjects
        if len(subjects) == 0:
            res.notes.append("no request has both prefill and decode routing: nothing to correlate")
            return res
        has_partner = self.partners >= 0
        if not has_partner.any():
            res.notes.append(f"too few requests for a shuffled baseline: {self.pool_total} request(s) with decode "
                             "routing, a baseline needs at least 2 (baseline columns are NaN)")
        elif self.pool_total > len(self.pool):
            res.notes.append(f"shuffled baseline partners drawn from a random pool of {len(self.pool)} of the "
                             f"{self.pool_total} requests with decode routing (at most {POOL_MAX_REQUESTS}, "
                             "and what the memory budget holds)")
        if self.by == "phase":
            res.notes.append("--by phase: the correlation compares the two phases of each request, so it is not "
                             "split by phase; shown over all requests")
            lab = np.full(len(subjects), "all", dtype=object)
            key = "phase"
        else:
            lab = self.labels[subjects]
            key = self.by
        st = {k: self.stats[i] for i, k in enumerate(
            ("pearson", "spearman", "overlap", "base_pearson", "base_spearman", "base_overlap"))}
        S, L = st["pearson"].shape
        idx = self.index
        run_names = sorted(idx.run_range)
        run_code = np.searchsorted(np.asarray(run_names, dtype=object), idx.run_ids).astype(np.int32)
        partner = np.maximum(self.partners, 0)
        groups = sorted(set(lab))
        gcode = np.searchsorted(np.asarray(groups, dtype=object), lab).astype(np.int32)
        dict_col = lambda codes, values: pa.DictionaryArray.from_arrays(np.repeat(codes, L), pa.array(values, pa.string()))  # noqa: E731
        res.tables["per_request_layer"] = pa.table({
            "run_id": dict_col(run_code[subjects], run_names),
            "request_id": np.repeat(idx.request_ids[subjects], L),
            "group": dict_col(gcode, groups),
            "layer": np.tile(self.layers, S),
            "pearson": st["pearson"].reshape(-1),
            "spearman": st["spearman"].reshape(-1),
            f"top{n}_overlap": st["overlap"].reshape(-1),
            "baseline_run_id": dict_col(run_code[partner], run_names),
            "baseline_request_id": np.repeat(np.where(has_partner, idx.request_ids[partner], -1), L),
            "baseline_pearson": st["base_pearson"].reshape(-1),
            "baseline_spearman": st["base_spearman"].reshape(-1),
            f"baseline_top{n}_overlap": st["base_overlap"].reshape(-1),
        })

        split = self.by != "phase"  # --by phase: one row over all requests
        summ = {"group": ["all"] + (groups if split else []),
                "requests": [S] + (np.bincount(gcode, minlength=len(groups)).tolist() if split else [])}
        for name, col in (("pearson", "pearson"), ("spearman", "spearman"), ("overlap", f"top{n}_overlap")):
            for stat, out in ((name, col), (f"base_{name}", f"baseline_{col}")):
                overall, per_group = group_means(st[stat], gcode, len(groups))
                summ[out] = [overall] + (per_group.tolist() if split else [])
        res.summaries[f"prefill-decode correlation, mean over requests and layers (by {key})"] = pa.table(summ)
        res.arrays.update(real_spearman=st["spearman"], base_spearman=st["base_spearman"],
                          real_pearson=st["pearson"], base_pearson=st["base_pearson"], groups=lab)
        return res
