"""Per-step replay: held-out traffic run as the forward steps of a DP-attention + expert-parallel deployment.

Whole-set GPU max/mean hides what sets latency: the slowest GPU of *each forward step*. This module cuts the
evaluated tokens into the steps a deployment runs and scores each step.

**Steps** (:func:`step_layout`). Every request lives on its home GPU (its DP rank, from
:func:`tracekit.placement.scoring.comm.route_requests`). Prefill and decode run as separate forward steps (SGLang with DP
attention and DeepEP does not mix them):

- prefill: each rank concatenates its requests' prompt tokens in arrival (request index) order and cuts them into
  chunks of ``prefill_chunk`` tokens; prefill step s is every rank's s-th chunk.
- decode: each rank orders its requests' evaluated decode tokens by (decode index, request) (the j-th token of
  every request before the (j+1)-th of any) and cuts them into batches of ``decode_batch`` tokens; decode step s is
  every rank's s-th batch. With at least ``decode_batch`` requests on a rank this is continuous batching (one token
  per running request per step); with fewer, a batch takes several consecutive tokens of each request, as if more
  requests like them were running, so that batches have the deployment's size rather than the trace's
  concurrency (a held-out split rarely has 128 requests per rank).

Within a rank's batch tokens are ordered by request, then position (that index is what per-token dispatch rules,
vLLM's and TRT-LLM's, see). Only *full* steps, those carrying at least half the tokens of the fullest step of their
phase, enter the per-step statistics; the ramp-up and drain at the ends of a finite replay would otherwise read as
imbalance no deployment in steady state sees (their count is reported). Decode and prefill steps differ by orders
of magnitude in size, so their statistics are kept apart: the headline keys are the decode steps' (the steady
state of serving; the prefill steps' when the rows hold no decode), and ``decode_*`` / ``prefill_*`` carry both.
``tokens_per_step`` says how large the full steps were.

**Per step and MoE layer** (:class:`StepCounts`), with the engine's replica choice
(:mod:`tracekit.placement.scoring.dispatch`):

- GPU load: (token, expert) pairs landing on each GPU. Per-step imbalance = sum over layers of the busiest GPU's
  load / sum over layers of the mean GPU load (each layer waits for its slowest GPU).
- Traffic per GPU, in the DeepEP mode SGLang's ``--deepep-mode auto`` uses: normal mode for prefill (one RDMA send
  per distinct remote node, landing on the GPU with the sender's local rank, then NVLink forwards to the other
  destination GPUs of that node; NVLink sends to the distinct other GPUs of the home node), low-latency mode for
  decode (one RDMA send per remote (token, expert) pair, straight to its GPU; NVLink per pair on another GPU of the
  home node). Counted per GPU as sends and receives, RDMA and NVLink apart.
- Weight reads: the distinct slots on each GPU that receive at least one (token, expert) pair in the step and
  layer, counted exactly (per-(step, layer, slot) flags: one byte per slot, or one bit when the byte flags would
  pass :data:`FLAG_BYTES_MAX`; either way ``slots_per_gpu`` bits to bytes per (step, layer, GPU) beside the 40
  bytes of the counters above).
- Estimated MoE time of the layer = expert time + dispatch time + combine time. Expert time is a roofline: the max
  over GPUs of max(compute, HBM traffic / HBM bandwidth), where compute = pairs x ``6 * hidden *
  moe_intermediate`` FLOPs at the profile's dense BF16 throughput and HBM traffic = every touched slot's weights
  read once (3 matrices of ``hidden x moe_intermediate`` at ``weight_bytes`` per weight: small-batch decode is
  bound by these) + each pair's activation in (``bytes_per_elem`` per value, as dispatched) and out (BF16).
  Intermediate activations are taken to stay on chip (a fused kernel) and FP8 weights to run at the BF16 rate.
  Dispatch and combine are each the max over GPUs of max(RDMA bytes in or out / RDMA bandwidth, NVLink bytes in
  or out / NVLink bandwidth); dispatch moves ``bytes_per_elem`` per value (1 = FP8), combine 2 (BF16). No overlap
  between expert time and communication is assumed. Step time is the sum over MoE layers (attention and dense
  layers excluded: placement does not change them).

A zero-computation choice (the sentinel id E of :class:`~tracekit.placement.data.types.TraceArrays`) is computed on
the token's own GPU: no traffic, no load, no expert compute; its token still takes its place in the step.

**score_placement** (:mod:`tracekit.placement.scoring.comm`, the interface the placement table uses)::

    score_placement(placement, traces, mask=None, *, engine='sglang', profile='h200', decode_batch=128,
                    prefill_chunk=4096, home=None, **overrides) -> dict

returns the whole-set numbers of :func:`tracekit.placement.scoring.comm.evaluate` (one pass) plus: ``step_time_ms`` (mean
over full steps), ``step_time_p99_ms``, ``imbalance_p50``/``imbalance_p99`` (per-step GPU max/mean),
``cross_node_bytes_per_step`` (mean RDMA dispatch bytes per full step, in the step's mode),
``steps``/``full_steps``, ``tokens_per_step``,
``compute_ms_per_step`` (sum over layers of the busiest GPU's compute), ``hbm_ms_per_step`` (same for HBM
traffic), ``expert_ms_per_step`` (the roofline part of the step time), ``slots_read_per_step`` (the most slots one
GPU reads, summed over layers), ``step_phase`` (which steps the headline keys describe), the same per-step keys
prefixed ``decode_`` and ``prefill_``, ``engine``, ``profile`` and the sizes used (``hidden_size``,
``moe_intermediate_size``, ``expert_dtype``, ``sizes_assumed``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import TracekitError
from .hardware import HardwareProfile
from ..data.types import TraceArrays

DEFAULT_DECODE_BATCH = 128  # decode tokens per DP rank per step
DEFAULT_PREFILL_CHUNK = 4096  # prefill tokens per DP rank per step
COMBINE_BYTES = 2  # DeepEP combines in BF16
FLAG_BYTES_MAX = 1 << 27  # byte flags per accumulator beyond which touched slots are kept as bits
STEP_KEYS = ("tokens_per_step", "step_time_ms", "step_time_p99_ms", "compute_ms_per_step", "hbm_ms_per_step",
             "expert_ms_per_step", "slots_read_per_step", "imbalance_p50", "imbalance_p99",
             "cross_node_bytes_per_step")


@dataclass
class StepLayout:
    """Where each evaluated token-layer runs: ``step`` (N,) int32 global step (-1 = not evaluated),
    ``index`` (N,) int32 the token's index in its rank's batch; per step (T,): ``phase`` (0 prefill, 1 decode)
    and ``tokens`` (tokens in the step, all ranks); ``full`` (T,) bool the steps that enter the statistics."""

    step: np.ndarray
    index: np.ndarray
    phase: np.ndarray
    tokens: np.ndarray
    full: np.ndarray

    @property
    def num_steps(self) -> int:
        return int(self.phase.size)


def step_layout(traces: TraceArrays, mask: np.ndarray | None, home: np.ndarray, *,
                decode_batch: int = DEFAULT_DECODE_BATCH, prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> StepLayout:
    """Cut the token-layers selected by ``mask`` (N,) into deployment steps (see the module docstring).

    ``home`` (R_n,) home GPU (DP rank) per request. A token is (request, position); its rows share one step.
    """
    if decode_batch < 1 or prefill_chunk < 1:
        raise TracekitError("--decode-batch and --prefill-chunk must be at least 1")
    N = len(traces)
    sel = np.ones(N, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    R = traces.num_requests
    req = traces.request[sel].astype(np.int64)
    pos = traces.token[sel].astype(np.int64)
    ph = traces.phase[sel].astype(np.int8)
    step = np.full(N, -1, dtype=np.int32)
    index = np.zeros(N, dtype=np.int32)
    if req.size == 0:
        z = np.zeros(0)
        return StepLayout(step, index, z.astype(np.int8), z.astype(np.int64), z.astype(bool))
    # dense token slots: request r owns positions lo[r]..hi[r]
    lo = np.full(R, np.iinfo(np.int64).max)
    hi = np.full(R, -1, dtype=np.int64)
    np.minimum.at(lo, req, pos)
    np.maximum.at(hi, req, pos)
    span = np.where(hi >= 0, hi - lo + 1, 0)
    off = np.concatenate([[0], np.cumsum(span)])
    slot = off[req] + pos - np.where(hi >= 0, lo, 0)[req]
    n_slots = int(off[-1])
    present = np.zeros(n_slots, dtype=bool)
    present[slot] = True
    t_phase = np.zeros(n_slots, dtype=np.int8)
    t_phase[slot] = ph
    t_req = np.repeat(np.arange(R), span)
    t_step = np.full(n_slots, -1, dtype=np.int64)
    t_idx = np.zeros(n_slots, dtype=np.int64)
    rank = np.asarray(home, dtype=np.int64)[t_req]

    # prefill: per rank, tokens in (request, position) order -> chunks
    pre = np.flatnonzero(present & (t_phase == 0))  # slots are already (request, position) ordered
    n_pre_steps = 0
    if pre.size:
        order = pre[np.argsort(rank[pre], kind="stable")]
        rk = rank[order]
        start = np.searchsorted(rk, rk, side="left")
        q = np.arange(order.size) - start
        t_step[order] = q // prefill_chunk
        t_idx[order] = q % prefill_chunk
        n_pre_steps = int(t_step[order].max()) + 1

    # decode: per rank, tokens in (decode index, request) order cut into batches of `decode_batch`
    dec = np.flatnonzero(present & (t_phase == 1))
    if dec.size:
        r_dec = t_req[dec]  # slots are (request, position) ordered: searchsorted gives each request's first
        j = np.arange(dec.size) - np.searchsorted(r_dec, r_dec, side="left")  # j-th decode token of its request
        order = np.lexsort((r_dec, j, rank[dec]))
        rk = rank[dec][order]
        q = np.arange(dec.size) - np.searchsorted(rk, rk, side="left")
        t_step[dec[order]] = n_pre_steps + q // decode_batch
        t_idx[dec[order]] = q % decode_batch
    T = int(t_step.max()) + 1
    tok = np.flatnonzero(present)
    tokens = np.bincount(t_step[tok], minlength=T)
    phase = np.ones(T, dtype=np.int8)
    phase[:n_pre_steps] = 0
    full = np.zeros(T, dtype=bool)
    for p in (0, 1):
        cand = (phase == p) & (tokens > 0)
        if cand.any():
            full |= cand & (tokens * 2 >= tokens[cand].max())
    step[sel] = t_step[slot].astype(np.int32)
    index[sel] = t_idx[slot].astype(np.int32)
    return StepLayout(step, index, phase, tokens, full)


def expert_roofline(pairs: np.ndarray, slots: np.ndarray, profile: HardwareProfile, *, hidden_size: int,
                    moe_intermediate_size: int, weight_bytes: float, in_bytes: float,
                    out_bytes: float = COMBINE_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """The two sides of one GPU's expert roofline, in seconds: ``(compute, hbm)`` for ``pairs`` (token, expert)
    pairs landing on ``slots`` distinct experts (arrays of one shape, e.g. (T, M, G)); the expert time is their
    max. compute = pairs x 6 * hidden * moe_intermediate FLOPs (gate, up, down: 3 GEMMs, 2 FLOPs per MAC) at the
    profile's dense rate; hbm = every slot's 3 matrices read once at ``weight_bytes`` per weight, plus each pair's
    activation read (``in_bytes`` per value) and written (``out_bytes``), at the profile's HBM bandwidth."""
    flops = 6.0 * hidden_size * moe_intermediate_size
    compute = np.asarray(pairs, dtype=np.float64) * (flops / (profile.tflops * 1e12))
    expert_bytes = 3.0 * hidden_size * moe_intermediate_size * weight_bytes
    hbm = (np.asarray(slots, dtype=np.float64) * expert_bytes + np.asarray(pairs, dtype=np.float64)
           * (hidden_size * (in_bytes + out_bytes))) / (profile.hbm_gbps * 1e9)
    return compute, hbm


class StepCounts:
    """Per (step, MoE layer, GPU) accumulators: load, RDMA sends/receives, NVLink sends/receives; per (step, MoE
    layer, slot) whether the slot received a pair (``touched``: bool flags, or uint64 words of bits when
    ``packed``; default: bits only when the byte flags would pass :data:`FLAG_BYTES_MAX`).

    Every count is an integer (exact in float64 or a flag), so merging accumulators filled by different threads
    gives the same numbers in any order."""

    def __init__(self, num_steps: int, num_layers: int, num_gpus: int, gpus_per_node: int,
                 slots_per_gpu: int = 1, packed: bool | None = None):
        self.T, self.M, self.G, self.gpn, self.spg = num_steps, num_layers, num_gpus, gpus_per_node, slots_per_gpu
        size = num_steps * num_layers * num_gpus
        self.load = np.zeros(size)
        self.rdma_out = np.zeros(size)
        self.rdma_in = np.zeros(size)
        self.nvl_out = np.zeros(size)
        self.nvl_in = np.zeros(size)
        self.packed = size * slots_per_gpu > FLAG_BYTES_MAX if packed is None else bool(packed)
        self.words = -(-slots_per_gpu // 64)  # uint64 words per (step, layer, GPU) when packed
        self.touched = np.zeros(size * self.words, dtype=np.uint64) if self.packed \
            else np.zeros(size * slots_per_gpu, dtype=bool)

    def merge(self, other: "StepCounts") -> None:
        for k in ("load", "rdma_out", "rdma_in", "nvl_out", "nvl_in"):
            getattr(self, k).__iadd__(getattr(other, k))
        self.touched |= other.touched

    def slots_read(self) -> np.ndarray:
        """(T, M, G) int64: distinct slots of each GPU that received at least one pair in the step and layer."""
        if self.packed:
            per = np.bitwise_count(self.touched).reshape(-1, self.words).sum(1, dtype=np.int64)
        else:
            per = self.touched.reshape(-1, self.spg).sum(1, dtype=np.int64)
        return per.reshape(self.T, self.M, self.G)

    def _touch(self, base: np.ndarray, slots: np.ndarray, keep: np.ndarray | None) -> None:
        """Flag ``slots`` (n, k) global slot ids at their row's (step, layer) ``base`` (n,) = (step * M + layer)
        * G; entries where ``keep`` (n, k) is False read no weights."""
        spg = self.spg
        it = np.int32 if self.touched.size < 2**31 - 1 and not self.packed else np.int64
        s = slots.astype(it, copy=False)
        b = base.astype(it, copy=False)[:, None]
        if keep is not None:
            s, b = s[keep], np.broadcast_to(b, keep.shape)[keep]
        if not self.packed:  # slot = GPU * spg + local, so (step, layer, GPU, local) = base * spg + slot
            self.touched[(b * it(spg) + s).ravel()] = True
            return
        g, loc = np.divmod(s, spg)
        word = (b + g) * self.words + loc // 64
        np.bitwise_or.at(self.touched, word.ravel(), np.left_shift(np.uint64(1), (loc % 64).astype(np.uint64)).ravel())

    def add(self, step: np.ndarray, lp: np.ndarray, h: np.ndarray, dg: np.ndarray, decode: np.ndarray,
            real: np.ndarray | None = None, slots: np.ndarray | None = None) -> None:
        """One chunk: ``step``, ``lp``, ``h`` (n,) step, layer position, home GPU; ``dg`` (n, k) destination GPU;
        ``decode`` (n,) bool (low-latency mode) else normal mode. Masked entries go to a dump bin (index
        ``size``) instead of being compacted out: one pass per count. ``real`` (n, k) bool or None: False for a
        zero-computation choice, whose ``dg`` is the home GPU (so it sends nothing) and which adds no load and
        reads no weights. ``slots`` (n, k) the slot of each pair (GPU ``slot // slots_per_gpu``); may be left out
        only with one slot per GPU (then the slot is ``dg``)."""
        G, gpn = self.G, self.gpn
        if slots is None:
            if self.spg != 1:
                raise ValueError("StepCounts.add needs slots when a GPU holds several slots")
            slots = dg
        size = self.load.size
        it = np.int32 if size < 2**31 - 1 else np.int64
        base = (step.astype(it) * it(self.M) + lp.astype(it)) * it(G)  # (n,) first bin of the row's (step, layer)
        d = dg.astype(it)
        key = base[:, None] + d  # (n, k) bin of each destination
        hh = h.astype(it)
        own = base + hh
        decode = np.asarray(decode, dtype=bool)

        def put(arr, keys, keep):
            arr += np.bincount(np.where(keep, keys, size).ravel(), minlength=size + 1)[:size]

        if real is None:
            self.load += np.bincount(key.ravel(), minlength=size)
        else:
            put(self.load, key, real)
        self._touch(base, slots, real)

        if decode.any():  # low-latency: one send per (token, expert) pair
            remote = (d // gpn) != (hh // gpn)[:, None]
            ll = decode[:, None]
            r_ll = remote & ll
            l_ll = ~remote & (d != hh[:, None]) & ll
            self.rdma_out += np.bincount(own, weights=r_ll.sum(1), minlength=size)
            put(self.rdma_in, key, r_ll)
            self.nvl_out += np.bincount(own, weights=l_ll.sum(1), minlength=size)
            put(self.nvl_in, key, l_ll)
        nm = np.flatnonzero(~decode)
        if nm.size:  # normal: one send per distinct remote node, NVLink fan-out
            b, hn_, hloc = base[nm], hh[nm] // gpn, hh[nm] % gpn
            ds = np.sort(d[nm].astype(np.int16), axis=1).astype(it)
            dn = ds // gpn
            new_gpu = np.ones(ds.shape, dtype=bool)
            new_gpu[:, 1:] = ds[:, 1:] != ds[:, :-1]
            new_node = np.ones(ds.shape, dtype=bool)
            new_node[:, 1:] = dn[:, 1:] != dn[:, :-1]
            rem = dn != hn_[:, None]
            rn = rem & new_node
            landing = dn * gpn + hloc[:, None]  # the GPU of the sender's local rank on the remote node
            self.rdma_out += np.bincount(own[nm], weights=rn.sum(1), minlength=size)
            put(self.rdma_in, b[:, None] + landing, rn)
            fw = rem & new_gpu & (ds != landing)
            put(self.nvl_out, b[:, None] + landing, fw)
            put(self.nvl_in, b[:, None] + ds, fw)
            lg = ~rem & new_gpu & (ds != hh[nm][:, None])
            self.nvl_out += np.bincount(own[nm], weights=lg.sum(1), minlength=size)
            put(self.nvl_in, b[:, None] + ds, lg)

    def summary(self, layout: StepLayout, profile: HardwareProfile, *, hidden_size: int, bytes_per_elem: float,
                moe_intermediate_size: int, weight_bytes: float = 2.0) -> dict:
        """Per-step statistics over the full steps (see the module docstring). ``weight_bytes``: bytes per expert
        weight (2 = BF16)."""
        T, M, G = self.T, self.M, self.G
        shape = (T, M, G)
        load = self.load.reshape(shape)
        slots = self.slots_read()
        gpu_compute, gpu_hbm = expert_roofline(load, slots, profile, hidden_size=hidden_size,
                                               moe_intermediate_size=moe_intermediate_size, weight_bytes=weight_bytes,
                                               in_bytes=bytes_per_elem)  # (T, M, G) seconds each
        compute = gpu_compute.max(2)  # (T, M)
        hbm = gpu_hbm.max(2)
        expert = np.maximum(gpu_compute, gpu_hbm).max(2)  # roofline per GPU, then the slowest GPU

        def comm_s(elem: float) -> np.ndarray:
            rd = np.maximum(self.rdma_out, self.rdma_in).reshape(shape) * elem / (profile.rdma_gbps * 1e9)
            nv = np.maximum(self.nvl_out, self.nvl_in).reshape(shape) * elem / (profile.nvlink_gbps * 1e9)
            return np.maximum(rd, nv).max(2)

        elem = hidden_size * bytes_per_elem
        layer_s = expert + comm_s(elem) + comm_s(hidden_size * COMBINE_BYTES)
        step_ms = layer_s.sum(1) * 1e3
        mean_load = load.mean(2).sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            imb = load.max(2).sum(1) / mean_load
        xbytes = self.rdma_out.reshape(shape).sum((1, 2)) * elem
        full = layout.full & (mean_load > 0)

        def stats(keep: np.ndarray) -> dict:
            if not keep.any():
                return dict.fromkeys(STEP_KEYS, float("nan")) | {"full_steps": 0}
            return {
                "full_steps": int(keep.sum()),
                "tokens_per_step": float(layout.tokens[keep].mean()),
                "step_time_ms": float(step_ms[keep].mean()),
                "step_time_p99_ms": float(np.percentile(step_ms[keep], 99)),
                "compute_ms_per_step": float(compute.sum(1)[keep].mean() * 1e3),
                "hbm_ms_per_step": float(hbm.sum(1)[keep].mean() * 1e3),
                "expert_ms_per_step": float(expert.sum(1)[keep].mean() * 1e3),
                "slots_read_per_step": float(slots.max(2).sum(1)[keep].mean()),
                "imbalance_p50": float(np.percentile(imb[keep], 50)),
                "imbalance_p99": float(np.percentile(imb[keep], 99)),
                "cross_node_bytes_per_step": float(xbytes[keep].mean()),
            }

        dec, pre = stats(full & (layout.phase == 1)), stats(full & (layout.phase == 0))
        head, head_phase = (dec, "decode") if dec["full_steps"] else (pre, "prefill")
        out = {"steps": int(T), "step_phase": head_phase, **head}
        for name, part in (("decode", dec), ("prefill", pre)):
            out.update({f"{name}_{k}": v for k, v in part.items()})
        return out
