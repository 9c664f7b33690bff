"""Import SGLang's expert distribution recorder dumps (``sglang-per-token`` and ``sglang-stat``).

Source of the layout: ``sgl-project/sglang``, ``python/sglang/srt/eplb/expert_distribution.py`` (class
``_DetailSinglePassGatherer``, ``_DetailAccumulator.dump``, ``_StatAccumulator.dump`` and ``_dump_to_file``).
The server runs with ``--expert-distribution-recorder-mode per_token`` (or ``stat``); ``POST
/start_expert_distribution_record`` ... ``POST /dump_expert_distribution_record`` makes every rank ``torch.save``
into ``$SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR`` (default ``/tmp``):

``per_token`` -> ``expert_distribution_recorder_{time.time()}_{rank}.pt``, one per rank::

    {"records": [ {                            # one per forward pass while recording
         "forward_pass_id": int, "rank": int, "gatherer_key": "primary",
         "input_ids": list[int],               # the pass's tokens (all requests concatenated)
         "positions": list[int],               # each token's position in its sequence
         "extend_seq_lens": list[int] | None,  # tokens per request in an extend pass; None in decode
         "forward_mode": int,                  # ForwardMode IntEnum: 1 EXTEND, 2 DECODE, 3 MIXED, 4 IDLE, ...
         "topk_ids_of_layer": int32 tensor (num_layers, num_tokens, 8),  # PHYSICAL slot ids, -1 = none
         "misc_objects": list, "global_physical_count": tensor (num_layers, num_physical_experts)}, ...],
     "last_physical_to_logical_map": int tensor (num_layers, num_physical_experts)}

``num_layers`` is the model's layer count (dense layers stay -1); the 8 columns are a fixed ``_TOP_K_NUM`` (unused
ones stay -1). Slots are physical because the hook sits after ``topk_ids_logical_to_physical``.

``stat`` -> ``expert_distribution_recorder_{time.time()}.pt`` written by rank 0 only, after an all-reduce::

    {"rank": 0, "logical_count": int32 tensor (buffer_steps, num_layers, num_logical_experts),
     "average_utilization_rate_over_window": float | None}

``buffer_steps`` is ``--expert-distribution-recorder-buffer-size`` (default 1000), a circular buffer of forward
passes: slots never filled are all-zero, and once it wraps the slots are not in time order.

What the per-token dump cannot give, and what this importer does instead (all written to ``manifest["notes"]``):
request ids are not recorded (a ``rids`` field is a TODO upstream), so prefill requests are recovered from
``extend_seq_lens`` (one request per segment; a chunked-prefill continuation is joined to the previous pass's
last segment when its first position follows on); decode passes carry one token per running request in an
order that changes between steps, so each decode token becomes its own one-token request and its decode step is
unknown (null). Gate weights are not recorded (null).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..errors import TracekitError
from ..schema import build_loads_table
from .numbers import COUNT_MAX, POSITION_MAX, TOKEN_ID_MAX, WINDOW_MAX, check_array, check_int, check_int_list
from .staging import StagedRun

EXTEND, DECODE, MIXED, IDLE = 1, 2, 3, 4
_NAME_RE = re.compile(r"expert_distribution_recorder_(\d+(?:\.\d+)?)(?:_(\d+))?\.pt$")
_RECORD_KEYS = ("topk_ids_of_layer", "input_ids", "positions", "extend_seq_lens", "forward_mode")


# ------------------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------------------
def load_dump(path: Path) -> Any:
    """``torch.load`` a dump (tensors, lists, dicts only: ``weights_only``); one-line error when unreadable."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TracekitError(f"{path}: no such file") from None
    except Exception as exc:  # truncated zip, pickle garbage, foreign file
        msg = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise TracekitError(f"{path}: not a readable torch.save dump ({msg}); is the file truncated?") from None


def sort_dump_files(paths: Iterable[str | Path]) -> list[Path]:
    """Order dumps by the time then rank SGLang puts in their names; other names keep their given order, last."""
    paths = [Path(p) for p in paths]
    for p in paths:
        if p.is_dir():
            raise TracekitError(f"{p} is a directory; pass the .pt files (e.g. {p}/expert_distribution_recorder_*.pt)")

    def key(ip):
        i, p = ip
        m = _NAME_RE.search(p.name)
        return (0, float(m.group(1)), int(m.group(2) or 0), i) if m else (1, 0.0, 0, i)

    return [p for _, p in sorted(enumerate(paths), key=key)]


def as_numpy(x: Any, what: str, where: str, ndim: int | None = None) -> np.ndarray:
    try:
        a = x.numpy() if hasattr(x, "numpy") else np.asarray(x)
    except Exception:
        raise TracekitError(f"{where}: {what} is not an array") from None
    if ndim is not None and a.ndim != ndim:
        raise TracekitError(f"{where}: {what} has shape {tuple(a.shape)}, expected {ndim} dimensions")
    if a.size == 0:
        a = a.astype(np.int64)  # an empty Python list loads as float64
    if a.dtype.kind not in "iu":
        raise TracekitError(f"{where}: {what} holds {a.dtype}, expected integers")
    return a


# ------------------------------------------------------------------------------------------------------------
# pure functions
# ------------------------------------------------------------------------------------------------------------
def slots_to_logical(topk_slots: np.ndarray, phys_to_log: np.ndarray, moe_layers: list[int], top_k: int,
                     num_experts: int, where: str) -> np.ndarray:
    """Map physical slot ids to logical expert ids at the MoE layers.

    ``topk_slots`` (L, T, K) physical slots, -1 where nothing was recorded; ``phys_to_log`` (L, P).
    Returns (T, len(moe_layers), top_k) logical ids. Raises when the dump does not match the geometry.
    """
    n_layers, _, k_cols = topk_slots.shape
    if top_k > k_cols:
        raise TracekitError(f"{where}: the recorder kept {k_cols} experts per token but the model's top_k is {top_k}")
    if phys_to_log.shape[0] != n_layers:
        raise TracekitError(f"{where}: physical_to_logical_map has {phys_to_log.shape[0]} layers, records {n_layers}")
    if max(moe_layers) >= n_layers:
        raise TracekitError(f"{where}: dump has {n_layers} layers but the geometry's MoE layers go to {max(moe_layers)}")
    dense = np.setdiff1d(np.arange(n_layers), moe_layers)
    if dense.size and (topk_slots[dense] >= 0).any():
        bad = int(dense[(topk_slots[dense] >= 0).reshape(dense.size, -1).any(axis=1)][0])
        raise TracekitError(f"{where}: layer {bad} routed tokens but the geometry says it is dense; check --model")
    if k_cols > top_k and (topk_slots[moe_layers, :, top_k:] >= 0).any():
        raise TracekitError(f"{where}: tokens have more than top_k={top_k} experts; check --model / --top-k")
    slots = topk_slots[moe_layers, :, :top_k]  # (nL, T, k)
    n_phys = phys_to_log.shape[1]
    if slots.size and (slots.min() < 0 or slots.max() >= n_phys):
        raise TracekitError(
            f"{where}: slot ids outside 0..{n_phys - 1} at an MoE layer (a -1 means the layer was not routed); "
            "check --model"
        )
    logical = np.take_along_axis(phys_to_log[moe_layers], slots.reshape(len(moe_layers), -1), axis=1)
    logical = logical.reshape(slots.shape)
    if logical.size and (logical.min() < 0 or logical.max() >= num_experts):
        raise TracekitError(f"{where}: logical expert ids outside 0..{num_experts - 1}; check --num-experts")
    return np.ascontiguousarray(logical.transpose(1, 0, 2))


def segments(forward_mode: int, extend_seq_lens: list[int] | None, n_tokens: int, where: str) -> list[tuple[int, int]]:
    """Token ranges [a, b) of the requests in one pass: extend segments, or one token per request in decode."""
    if forward_mode == DECODE:
        return [(i, i + 1) for i in range(n_tokens)]
    if hasattr(extend_seq_lens, "tolist"):  # a tensor or array
        extend_seq_lens = extend_seq_lens.tolist()
    lens = check_int_list(extend_seq_lens or [], "extend_seq_lens", where, 0, POSITION_MAX)
    if sum(lens) != n_tokens or any(x < 0 for x in lens):
        raise TracekitError(f"{where}: extend_seq_lens sum to {sum(lens)} but the pass has {n_tokens} tokens")
    ends = np.cumsum(lens)
    return [(int(e - n), int(e)) for n, e in zip(lens, ends) if n > 0]


@dataclass
class RequestAssembler:
    """Gives every token of a stream of passes (one rank) a request id, phase and prompt id."""

    next_request: int = 0
    tail: dict[int, tuple[int, int]] = field(default_factory=dict)  # rank -> (request_id, next position)
    counts: dict[str, int] = field(default_factory=lambda: {"prefill_requests": 0, "chunk_continuations": 0,
                                                            "mid_sequence_starts": 0, "decode_tokens": 0,
                                                            "mixed_decode_tokens": 0})

    def _new(self) -> int:
        rid = self.next_request
        self.next_request += 1
        return rid

    def assign(self, rank: int, fp_id: int, mode: int, segs: list[tuple[int, int]], positions: np.ndarray):
        """Returns (request_id (T,), phase (T,) 0/1, prompt_id list) for one pass."""
        t = positions.shape[0]
        req = np.empty(t, dtype=np.int64)
        phase = np.zeros(t, dtype=np.int8)
        pids: list[str] = [""] * t
        if mode == DECODE:
            for a, _ in segs:
                req[a] = self._new()
                phase[a] = 1
                pids[a] = f"sglang/r{rank}/fp{fp_id}/decode{a}"
            self.counts["decode_tokens"] += t
            return req, phase, pids
        tail = self.tail.get(rank)
        last = None
        for si, (a, b) in enumerate(segs):
            start = int(positions[a])
            if mode == MIXED and b - a == 1 and start > 0 and not (tail and tail[1] == start):
                rid, ph, pid = self._new(), 1, f"sglang/r{rank}/fp{fp_id}/decode{a}"
                self.counts["mixed_decode_tokens"] += 1
            elif start > 0 and tail and tail[1] == start:
                rid, ph, pid = tail[0], 0, f"sglang/r{rank}/req{tail[0]}"
                tail = None
                self.counts["chunk_continuations"] += 1
            else:
                rid, ph = self._new(), 0
                pid = f"sglang/r{rank}/req{rid}"
                self.counts["prefill_requests"] += 1
                if start > 0:
                    self.counts["mid_sequence_starts"] += 1
            req[a:b] = rid
            phase[a:b] = ph
            pids[a:b] = [pid] * (b - a)
            if ph == 0:
                last = (rid, int(positions[b - 1]) + 1)
        if last is not None:
            self.tail[rank] = last
        return req, phase, pids


# ------------------------------------------------------------------------------------------------------------
# per_token
# ------------------------------------------------------------------------------------------------------------
def check_per_token(obj: Any, path: Path) -> tuple[list[dict], np.ndarray]:
    if isinstance(obj, dict) and "logical_count" in obj:
        raise TracekitError(f"{path}: this is a stat-mode dump (logical_count); import it as sglang-stat")
    if not isinstance(obj, dict) or "records" not in obj or "last_physical_to_logical_map" not in obj:
        raise TracekitError(
            f"{path}: not an SGLang per_token dump (expected keys records, last_physical_to_logical_map)"
        )
    records = obj["records"]
    if not isinstance(records, list):
        raise TracekitError(f"{path}: records is {type(records).__name__}, expected a list")
    p2l = as_numpy(obj["last_physical_to_logical_map"], "last_physical_to_logical_map", str(path), ndim=2)
    return records, p2l


def import_sglang_per_token(paths: list[str | Path], staged: StagedRun, *, domain: str = "unknown") -> dict[str, int]:
    """Read per_token dumps and write their routes into ``staged``; returns counts of what was recovered."""
    geo = staged.geometry
    asm = RequestAssembler()
    seen: set[tuple] = set()
    skipped = {"duplicate_passes": 0, "idle_passes": 0, "other_mode_passes": 0, "other_mode_tokens": 0}
    for path in sort_dump_files(paths):
        records, p2l = check_per_token(load_dump(path), path)
        cols: dict[str, list] = {k: [] for k in ("req", "phase", "pos", "tok", "experts", "pid")}
        prompt_tokens = generated = 0
        for i, rec in enumerate(records):
            where = f"{path} record {i}"
            if not isinstance(rec, dict) or any(k not in rec for k in _RECORD_KEYS):
                raise TracekitError(f"{where}: missing one of {', '.join(_RECORD_KEYS)}")
            mode = check_int(rec["forward_mode"], "forward_mode", where, 0, 255)
            input_ids = check_array(as_numpy(rec["input_ids"], "input_ids", where, ndim=1), "input_ids", where, 0,
                                    TOKEN_ID_MAX)
            positions = check_array(as_numpy(rec["positions"], "positions", where, ndim=1), "positions", where, 0,
                                    POSITION_MAX)
            topk = as_numpy(rec["topk_ids_of_layer"], "topk_ids_of_layer", where, ndim=3)
            t = input_ids.shape[0]
            if positions.shape[0] != t or topk.shape[1] != t:
                raise TracekitError(
                    f"{where}: {t} input_ids, {positions.shape[0]} positions, {topk.shape[1]} routed tokens"
                )
            if mode == IDLE or t == 0:
                skipped["idle_passes"] += 1
                continue
            if mode not in (EXTEND, DECODE, MIXED):
                skipped["other_mode_passes"] += 1
                skipped["other_mode_tokens"] += t
                continue
            rank = check_int(rec.get("rank") if rec.get("rank") is not None else 0, "rank", where, 0, 1 << 20)
            fp_id = check_int(rec.get("forward_pass_id") if rec.get("forward_pass_id") is not None else i,
                              "forward_pass_id", where, 0, (1 << 63) - 1)
            key = (fp_id, t, mode, input_ids.tobytes(), topk.tobytes())
            if key in seen:  # tensor-parallel ranks record the same pass
                skipped["duplicate_passes"] += 1
                continue
            seen.add(key)
            logical = slots_to_logical(topk, p2l, geo["moe_layers"], geo["top_k"], geo["num_experts"], where)
            segs = segments(mode, rec["extend_seq_lens"], t, where)
            req, phase, pids = asm.assign(rank, fp_id, mode, segs, positions)
            cols["req"].append(req)
            cols["phase"].append(phase)
            cols["pos"].append(positions)
            cols["tok"].append(input_ids)
            cols["experts"].append(logical)
            cols["pid"].extend(pids)
            n_dec = int(phase.sum())
            generated += n_dec
            prompt_tokens += t - n_dec
        if not cols["req"]:
            continue
        req = np.concatenate(cols["req"])
        staged.write_routes_tokens(
            request_id=req, prompt_id=cols["pid"], phase=np.concatenate(cols["phase"]),
            position=np.concatenate(cols["pos"]), step=np.full(req.shape[0], -1, dtype=np.int32),
            token_id=np.concatenate(cols["tok"]), experts=np.concatenate(cols["experts"]), domain=domain,
            prompt_tokens=prompt_tokens, generated_tokens=generated,
        )
    counts = {**asm.counts, **skipped}
    _per_token_notes(staged, counts)
    staged.extra["import_counts"] = counts
    return counts


def _per_token_notes(staged: StagedRun, c: dict[str, int]) -> None:
    staged.note("SGLang per_token dumps record no request ids: prefill requests were recovered from extend_seq_lens, "
                "one request per extend segment")
    staged.note("decode passes hold one token per running request in an order that changes between steps, so decode "
                "tokens cannot be tied to their requests: each decode token is its own one-token request "
                "(prompt_id sglang/r{rank}/fp{pass}/decode{i}) and its decode step is null")
    staged.note("gate weights are not in the dump: weights are null")
    staged.note("physical slots were mapped to logical experts with the dump's last_physical_to_logical_map; passes "
                "recorded before an EPLB rebalance during the same recording would map wrongly")
    if c["chunk_continuations"]:
        staged.note(f"{c['chunk_continuations']} chunked-prefill continuations were joined to the request whose "
                    "last position they follow")
    if c["mid_sequence_starts"]:
        staged.note(f"{c['mid_sequence_starts']} prefill requests start past position 0 (prefix-cache hit or a "
                    "chunk whose earlier part was not recorded): their cached prefix was not routed")
    if c["mixed_decode_tokens"]:
        staged.note(f"{c['mixed_decode_tokens']} tokens of MIXED passes were taken as decode (one-token segments past "
                    "position 0 that continue no prefill)")
    if c["other_mode_passes"]:
        staged.note(f"{c['other_mode_passes']} passes ({c['other_mode_tokens']} tokens) in speculative or other "
                    "forward modes were skipped")
    if c["duplicate_passes"]:
        staged.note(f"{c['duplicate_passes']} passes recorded identically by several ranks (tensor parallel) were "
                    "kept once")


# ------------------------------------------------------------------------------------------------------------
# stat
# ------------------------------------------------------------------------------------------------------------
def stat_counts(obj: Any, path: Path, geometry: dict[str, Any]) -> np.ndarray:
    """``logical_count`` of a stat dump as (steps, len(moe_layers), E) int64, validated against the geometry."""
    if isinstance(obj, dict) and "records" in obj:
        raise TracekitError(f"{path}: this is a per_token dump (records); import it as sglang-per-token")
    if not isinstance(obj, dict) or "logical_count" not in obj:
        raise TracekitError(f"{path}: not an SGLang stat dump (expected key logical_count)")
    lc = check_array(as_numpy(obj["logical_count"], "logical_count", str(path), ndim=3), "logical_count", str(path), 0,
                     COUNT_MAX)
    _, n_layers, n_exp = lc.shape
    moe = geometry["moe_layers"]
    if n_exp != geometry["num_experts"]:
        raise TracekitError(f"{path}: logical_count has {n_exp} experts, the model {geometry['num_experts']}")
    if n_layers == geometry["num_layers"]:
        dense = np.setdiff1d(np.arange(n_layers), moe)
        if dense.size and lc[:, dense].any():
            raise TracekitError(f"{path}: counts at layers the geometry calls dense; check --model")
        return lc[:, moe]
    if n_layers == len(moe):
        return lc
    raise TracekitError(
        f"{path}: logical_count has {n_layers} layers; the model has {geometry['num_layers']} ({len(moe)} MoE)"
    )


def loads_rows(counts: np.ndarray, moe_layers: list[int], window_offset: int) -> dict[str, np.ndarray]:
    """(S, nL, E) counts -> flat (window, layer, expert, count) columns for the windows that saw any token."""
    keep = np.flatnonzero(counts.reshape(counts.shape[0], -1).sum(axis=1) > 0)
    c = counts[keep]
    s, nl, e = c.shape
    w = np.repeat(keep + window_offset, nl * e)
    layer = np.tile(np.repeat(np.asarray(moe_layers), e), s)
    expert = np.tile(np.arange(e), s * nl)
    return {"window": w, "layer": layer, "expert": expert, "count": c.reshape(-1)}


def import_sglang_stat(paths: list[str | Path], staged: StagedRun, *, domain: str = "unknown") -> dict[str, int]:
    geo = staged.geometry
    offset = 0
    windows = 0
    for path in sort_dump_files(paths):
        counts = stat_counts(load_dump(path), path, geo)
        if offset + counts.shape[0] - 1 > WINDOW_MAX:
            raise TracekitError(f"{path}: more than {WINDOW_MAX + 1} forward passes in all; import fewer files at once")
        rows = loads_rows(counts, geo["moe_layers"], offset)
        windows += int(np.unique(rows["window"]).size)
        staged.write_loads(build_loads_table(run_id=staged.run_id, model=staged.model_name,
                                             dataset=staged.dataset["name"], domain=domain, phase="mixed", **rows))
        offset += counts.shape[0]
    staged.note("SGLang stat dumps hold (token, expert) counts per forward pass summed over all ranks; prefill and "
                "decode are not separated (phase 'mixed')")
    staged.note("window = slot of the recorder's circular buffer (--expert-distribution-recorder-buffer-size), offset "
                "by earlier files; once the buffer wrapped, slots are not in time order; all-zero slots were dropped")
    staged.extra["import_counts"] = {"windows": windows}
    return {"windows": windows}
