"""Import per-request routed experts returned by SGLang or vLLM (``routed-experts``): JSONL, one response a line.

Layouts (checked against the engines' sources):

- SGLang ``POST /generate`` with ``"return_routed_experts": true`` on a server started with
  ``--enable-return-routed-experts``: ``{"text", "output_ids", "meta_info": {"id", "prompt_tokens",
  "completion_tokens", "cached_tokens", "routed_experts": "<base64>"}}``. The base64 string holds raw int32 of shape
  (prompt_tokens + completion_tokens - 1, num_hidden_layers, num_experts_per_tok): the capturer reads the request's
  KV slots ``req_to_token[:seqlen - 1]`` (the last sampled token is never forwarded). Sources:
  ``sgl-project/sglang`` ``python/sglang/srt/layers/moe/routed_experts_capturer.py`` (``get_routed_experts``,
  host buffer ``(tokens, num_hidden_layers, num_experts_per_tok)`` int32) and
  ``sgl-project/sglang-jax`` ``docs/features/return_routed_experts.md`` (base64 in ``meta_info["routed_experts"]``).
  The ids are those after ``topk_ids_logical_to_physical``: logical unless the server runs redundant experts.
- vLLM with ``--enable-return-routed-experts``: ``CompletionOutput.routed_experts`` is an array
  ``[seq_len, layer_num, topk]`` (``vllm-project/vllm`` ``vllm/outputs.py``) with ``num_tokens - 1`` rows; the
  OpenAI server puts it in ``choices[i]["routed_experts"]``, either as a nested list or, in recent versions, as
  base64 of ``.npy`` bytes (``vllm/entrypoints/openai/completion/protocol.py``, ``CompletionResponseChoice``);
  ``routed_experts_prompt_start`` skips the first N prompt tokens. The prompt length comes from
  ``prompt_token_ids`` (``return_token_ids: true``) or ``usage.prompt_tokens``. Offline ``LLM.generate`` output
  saved as ``{"prompt_token_ids", "outputs": [{"token_ids", "routed_experts"}]}`` is read too.

A line may wrap a response as ``{"prompt_id", "domain", "routed_experts_prompt_start", "response": {...}}`` (what
:mod:`tracekit.server_client` saves). Row ``r`` is the token at position ``start + r``: prefill while the position
is inside the prompt, decode after it (decode step = position - prompt_len + 1). The layer axis may cover every
layer (dense rows ignored) or only the MoE layers.
"""
from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import TracekitError
from ..jsonlines import iter_json_lines, read_json
from .numbers import POSITION_MAX, TOKEN_ID_MAX, check_int, check_int_list, check_label
from .staging import StagedRun

CHUNK_REQUESTS = 256


@dataclass
class RoutedRequest:
    """One request's routing as the engine returned it, before it becomes rows."""

    prompt_id: str | None
    domain: str | None
    experts: np.ndarray  # (rows, layers_in_response, k)
    prompt_len: int
    prompt_start: int = 0
    n_generated: int | None = None
    prompt_ids: list[int] | None = None
    output_ids: list[int] | None = None


# ------------------------------------------------------------------------------------------------------------
# decoding one response
# ------------------------------------------------------------------------------------------------------------
def decode_array(value: Any, *, rows: int | None, top_k: int, layer_options: tuple[int, ...], where: str) -> np.ndarray:
    """A routed-experts payload (nested list, base64 of .npy, or base64 of raw int32) -> (rows, layers, k) ints."""
    if isinstance(value, list):
        try:
            arr = np.asarray(value)
        except ValueError:
            raise TracekitError(f"{where}: routed_experts is a ragged list") from None
        if arr.size == 0:
            return np.zeros((0, layer_options[0], top_k), dtype=np.int64)
        if arr.ndim != 3 or arr.dtype.kind not in "iu":
            raise TracekitError(f"{where}: routed_experts has shape {arr.shape} ({arr.dtype}), expected (tokens, layers, top_k) ints")
        return arr
    if not isinstance(value, str):
        raise TracekitError(f"{where}: routed_experts is {type(value).__name__}; expected base64 text or a nested list")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise TracekitError(f"{where}: routed_experts is not valid base64 (truncated?)") from None
    if raw.startswith(b"\x93NUMPY"):
        try:
            arr = np.load(io.BytesIO(raw), allow_pickle=False)
        except Exception as exc:
            raise TracekitError(f"{where}: routed_experts .npy payload is unreadable ({exc})") from None
        if arr.ndim != 3 or arr.dtype.kind not in "iu":
            raise TracekitError(f"{where}: routed_experts .npy has shape {arr.shape} ({arr.dtype}), expected 3-D ints")
        return arr
    if len(raw) % 4:
        raise TracekitError(f"{where}: routed_experts holds {len(raw)} bytes, not a whole number of int32")
    flat = np.frombuffer(raw, dtype="<i4")
    n = flat.size
    if rows is not None:
        if rows <= 0 or n % (rows * top_k):
            raise TracekitError(f"{where}: routed_experts holds {n} ids, not {rows} tokens x layers x top_k={top_k}")
        return flat.reshape(rows, n // (rows * top_k), top_k)
    for n_layers in layer_options:
        if n % (n_layers * top_k) == 0:
            return flat.reshape(-1, n_layers, top_k)
    raise TracekitError(f"{where}: routed_experts holds {n} ids, not a multiple of layers x top_k={top_k}")


def _ints(value: Any, what: str, where: str) -> list[int] | None:
    """Token ids: a list of integers in the token_id column's range."""
    if value is None:
        return None
    return check_int_list(value, what, where, 0, TOKEN_ID_MAX)


def _int(value: Any, what: str, where: str) -> int:
    """A token count or offset: an integer in 0..2**31-1 (positions are int32)."""
    return check_int(value, what, where, 0, POSITION_MAX)


def _label(value: Any, what: str, where: str) -> str | None:
    return None if value is None else check_label(value, what, where)


def parse_response(obj: Any, geometry: dict[str, Any], where: str) -> list[RoutedRequest]:
    """One JSONL record (a response, or a wrapped one) -> the requests it holds, validated for shape."""
    if not isinstance(obj, (dict, list)):
        raise TracekitError(f"{where}: expected a JSON object (an SGLang or vLLM response)")
    meta: dict[str, Any] = {}
    resp = obj
    if isinstance(obj, dict) and "response" in obj:
        meta, resp = obj, obj["response"]
    if isinstance(resp, list):  # SGLang batch /generate returns a list of responses
        out = []
        for i, r in enumerate(resp):
            out += parse_response({**meta, "response": r, "prompt_id": _indexed(meta.get("prompt_id"), i)},
                                  geometry, f"{where}[{i}]")
        return out
    if not isinstance(resp, dict):
        raise TracekitError(f"{where}: response is {type(resp).__name__}, expected an object")
    top_k = geometry["top_k"]
    layer_options = (geometry["num_layers"], len(geometry["moe_layers"]))
    start = _int(meta.get("routed_experts_prompt_start", resp.get("routed_experts_prompt_start", 0)),
                 "routed_experts_prompt_start", where)
    pid, dom = _label(meta.get("prompt_id"), "prompt_id", where), _label(meta.get("domain"), "domain", where)
    if "meta_info" in resp:  # SGLang
        mi = resp["meta_info"]
        if not isinstance(mi, dict) or "routed_experts" not in mi or mi["routed_experts"] is None:
            raise TracekitError(f"{where}: no meta_info.routed_experts; send return_routed_experts=true to a server "
                                "started with --enable-return-routed-experts")
        p = _int(mi.get("prompt_tokens"), "meta_info.prompt_tokens", where)
        g = _int(mi.get("completion_tokens"), "meta_info.completion_tokens", where)
        _check_start(start, p, where)
        arr = decode_array(mi["routed_experts"], rows=p + g - 1 - start, top_k=top_k, layer_options=layer_options,
                           where=where)
        return [RoutedRequest(pid if pid is not None else _label(mi.get("id"), "meta_info.id", where), dom, arr, p, start, g,
                              _ints(resp.get("input_ids"), "input_ids", where),
                              _ints(resp.get("output_ids"), "output_ids", where))]
    if "choices" in resp or "outputs" in resp:  # vLLM OpenAI response, or offline RequestOutput
        choices = resp.get("choices", resp.get("outputs"))
        if not isinstance(choices, list) or not choices:
            raise TracekitError(f"{where}: no choices/outputs in the response")
        usage = resp.get("usage") or {}
        out = []
        for ci, ch in enumerate(choices):
            w = f"{where} choice {ci}"
            if not isinstance(ch, dict) or ch.get("routed_experts") is None:
                raise TracekitError(f"{w}: no routed_experts; start vLLM with --enable-return-routed-experts")
            prompt_ids = _ints(ch.get("prompt_token_ids", resp.get("prompt_token_ids")), "prompt_token_ids", w)
            if prompt_ids is not None:
                p = len(prompt_ids)
            elif "prompt_tokens" in usage:
                p = _int(usage["prompt_tokens"], "usage.prompt_tokens", w)
            else:
                raise TracekitError(f"{w}: prompt length unknown; request with return_token_ids=true (prompt_token_ids)")
            _check_start(start, p, w)
            out_ids = _ints(ch.get("token_ids"), "token_ids", w)
            g = len(out_ids) if out_ids is not None else (usage.get("completion_tokens") if len(choices) == 1 else None)
            if g is not None:
                g = _int(g, "usage.completion_tokens", w)
            rows = None if g is None else p + int(g) - 1 - start
            arr = decode_array(ch["routed_experts"], rows=rows, top_k=top_k, layer_options=layer_options, where=w)
            rid = pid if pid is not None else _label(resp.get("id") or resp.get("request_id"), "id", w)
            rid = _indexed(rid, ch.get("index", ci)) if len(choices) > 1 else rid
            out.append(RoutedRequest(rid, dom, arr, p, start, None if g is None else int(g), prompt_ids, out_ids))
        return out
    raise TracekitError(f"{where}: neither an SGLang response (meta_info) nor a vLLM one (choices/outputs)")


def _check_start(start: int, prompt_len: int, where: str) -> None:
    if start > prompt_len:
        raise TracekitError(f"{where}: routed_experts_prompt_start {start} is past the prompt's {prompt_len} tokens")


def _indexed(pid: Any, i: int) -> str | None:
    return None if pid is None else f"{pid}#{i}"


# ------------------------------------------------------------------------------------------------------------
# rows
# ------------------------------------------------------------------------------------------------------------
def request_tokens(req: RoutedRequest, geometry: dict[str, Any], where: str,
                   slot_map: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-token columns of one request: position, phase (0/1), step (-1 = null), token_id (-1), experts (T, nL, k).

    ``slot_map`` (M, S): logical expert of every physical slot of every MoE layer (see :func:`read_slot_map`).
    """
    arr = req.experts
    rows, n_layers, k = arr.shape
    if req.prompt_start + rows - 1 > POSITION_MAX:
        raise TracekitError(f"{where}: positions {req.prompt_start}..{req.prompt_start + rows - 1} pass {POSITION_MAX} "
                            "(routed_experts_prompt_start too large?)")
    if k != geometry["top_k"]:
        raise TracekitError(f"{where}: {k} experts per token, the model's top_k is {geometry['top_k']}; check --model")
    moe = geometry["moe_layers"]
    if n_layers == geometry["num_layers"]:
        arr = arr[:, moe]
    elif n_layers != len(moe):
        raise TracekitError(f"{where}: routed_experts has {n_layers} layers; the model has {geometry['num_layers']} "
                            f"({len(moe)} MoE); check --model")
    expected = None if req.n_generated is None else req.prompt_len + req.n_generated - 1 - req.prompt_start
    if expected is not None and rows != expected:
        raise TracekitError(f"{where}: routed_experts has {rows} tokens; prompt {req.prompt_len} + generated "
                            f"{req.n_generated} - 1 - start {req.prompt_start} = {expected} (truncated response?)")
    if rows < req.prompt_len - req.prompt_start:
        raise TracekitError(f"{where}: routed_experts has {rows} tokens, fewer than the prompt's "
                            f"{req.prompt_len - req.prompt_start}")
    e = geometry["num_experts"]
    if slot_map is not None:  # physical slots (servers with redundant experts) -> logical experts, per MoE layer
        if arr.size and (arr.min() < 0 or arr.max() >= slot_map.shape[1]):
            raise TracekitError(f"{where}: slot ids outside 0..{slot_map.shape[1] - 1} of --slot-map; is it the map "
                                "the server ran with?")
        arr = slot_map[np.arange(arr.shape[1])[None, :, None], arr]
    if arr.size and (arr.min() < 0 or arr.max() >= e):
        raise TracekitError(f"{where}: expert ids outside 0..{e - 1}: physical slots of redundant experts? pass the "
                            "server's map with --slot-map FILE (its --init-expert-location JSON); else a wrong --model?")
    position = np.arange(req.prompt_start, req.prompt_start + rows, dtype=np.int64)
    phase = (position >= req.prompt_len).astype(np.int8)
    step = np.where(phase == 1, position - req.prompt_len + 1, -1)
    token = np.full(rows, -1, dtype=np.int64)
    if req.prompt_ids is not None:
        m = position < min(req.prompt_len, len(req.prompt_ids))
        token[m] = np.asarray(req.prompt_ids, dtype=np.int64)[position[m]]
    if req.output_ids is not None:
        gi = position - req.prompt_len
        m = (gi >= 0) & (gi < len(req.output_ids))
        token[m] = np.asarray(req.output_ids, dtype=np.int64)[gi[m]]
    return {"position": position, "phase": phase, "step": step, "token": token, "experts": arr}


class RoutesBatcher:
    """Buffers requests and writes one chunk per ``chunk_requests`` through a :class:`StagedRun`."""

    def __init__(self, staged: StagedRun, default_domain: str = "unknown", chunk_requests: int = CHUNK_REQUESTS,
                 slot_map: np.ndarray | None = None):
        self.staged = staged
        self.default_domain = default_domain
        self.slot_map = slot_map  # (M, S) physical slot -> logical expert, for servers with redundant experts
        self.chunk_requests = chunk_requests
        self.next_request = 0
        self._buf: list[tuple[int, RoutedRequest, dict[str, np.ndarray]]] = []
        self.totals = {"requests": 0, "prefill_tokens": 0, "decode_tokens": 0}

    def add(self, req: RoutedRequest, where: str, request_id: int | None = None) -> int:
        """Validate one request and buffer it; ``request_id`` defaults to arrival order."""
        cols = request_tokens(req, self.staged.geometry, where, self.slot_map)
        rid = self.next_request if request_id is None else request_id
        self.next_request = max(self.next_request, rid) + 1
        self._buf.append((rid, req, cols))
        if len(self._buf) >= self.chunk_requests:
            self.flush()
        return rid

    def flush(self) -> None:
        if not self._buf:
            return
        domains = sorted({r.domain or self.default_domain for _, r, _ in self._buf})
        dindex = {d: i for i, d in enumerate(domains)}
        cat = lambda k: np.concatenate([c[k] for _, _, c in self._buf])  # noqa: E731
        req_ids = np.concatenate([np.full(c["position"].shape[0], rid) for rid, _, c in self._buf])
        labels = np.concatenate([np.full(c["position"].shape[0], dindex[r.domain or self.default_domain])
                                 for _, r, c in self._buf])
        pids = [r.prompt_id if r.prompt_id is not None else f"request-{rid}"
                for rid, r, c in self._buf for _ in range(c["position"].shape[0])]
        phase = cat("phase")
        n_dec = int(phase.sum())
        self.staged.write_routes_tokens(
            request_id=req_ids, prompt_id=[str(p) for p in pids], phase=phase, position=cat("position"),
            step=cat("step"), token_id=cat("token"), experts=cat("experts"),
            domain=(labels, domains), prompt_tokens=phase.size - n_dec, generated_tokens=n_dec,
        )
        self.totals["requests"] += len(self._buf)
        self.totals["decode_tokens"] += n_dec
        self.totals["prefill_tokens"] += phase.size - n_dec
        self._buf.clear()


def add_notes(staged: StagedRun) -> None:
    staged.note("routed experts as returned per request by the engine: the last generated token was never forwarded "
                "and has no routing; gate weights are not returned (null)")
    staged.note("prompt tokens served from the engine's prefix cache carry the routing recorded when they were "
                "first computed")


def read_slot_map(path: str | Path, geometry: dict[str, Any]) -> np.ndarray:
    """(M, S) logical expert per physical slot of each MoE layer, from SGLang's ``--init-expert-location`` JSON.

    The file holds ``{"physical_to_logical_map": [[...], ...]}`` with one row per hidden layer (or per MoE layer),
    each of width E + R: what ``tracekit export --format sglang`` writes and what the server was started with.
    """
    doc = read_json(path, "pass the JSON the server was started with (--init-expert-location)")
    rows = doc.get("physical_to_logical_map") if isinstance(doc, dict) else None
    try:
        table = np.asarray(rows, dtype=np.int64)
    except (TypeError, ValueError):
        table = np.zeros((0, 0), dtype=np.int64)
    if table.ndim != 2 or table.size == 0:
        raise TracekitError(f"{path}: expected {{\"physical_to_logical_map\": [[slot -> expert, ...], ...]}}")
    moe, e = geometry["moe_layers"], geometry["num_experts"]
    if table.shape[0] == geometry["num_layers"]:
        table = table[moe]
    elif table.shape[0] != len(moe):
        raise TracekitError(f"{path}: {table.shape[0]} rows; the model has {geometry['num_layers']} layers "
                            f"({len(moe)} MoE)")
    if table.shape[1] < e or table.min() < 0 or table.max() >= e:
        raise TracekitError(f"{path}: rows must be at least E={e} wide and hold expert ids 0..{e - 1}")
    return table


def import_routed_experts(paths: list[str | Path], staged: StagedRun, *, domain: str = "unknown",
                          slot_map: str | Path | None = None) -> dict[str, int]:
    table = read_slot_map(slot_map, staged.geometry) if slot_map is not None else None
    batcher = RoutesBatcher(staged, default_domain=domain, slot_map=table)
    if slot_map is not None:
        staged.note(f"physical slots mapped to logical experts with {slot_map}")
    for path in paths:
        path = Path(path)
        for n, obj in iter_json_lines(path):
            where = f"{path}:{n}"
            for req in parse_response(obj, staged.geometry, where):
                batcher.add(req, where)
    batcher.flush()
    add_notes(staged)
    staged.extra["import_counts"] = dict(batcher.totals)
    return dict(batcher.totals)
