"""Import per-token routing records from JSON Lines into a run directory of tracekit's schema.

Each line is one JSON object describing one token at one MoE layer, e.g. (the Mixtral traces in
``shared/data/traces/mixtral-8x7b``)::

    {"dataset": "gsm8k", "problem_id": 0, "layer": 3, "experts": [7, 0], "gating_probs": [0.8, 0.2], "token_idx": 5}

A field map names the record fields (``--field-map experts=experts,weights=gating_probs,...``); keys:

==========  ========  ================================================================================
key         required  meaning
==========  ========  ================================================================================
experts     yes       list of expert ids, router order
weights     no        list of gate weights, same order (``weights=`` to ignore them)
request     yes       request / problem id within the dataset
layer       yes       the model's (absolute) layer index
position    yes       token index; ``a|b`` takes the first field present (default ``token_idx|token_pos``)
dataset     no        dataset name (else ``--dataset`` or the file name); domain follows from it
token_id    no        the routed token's id
==========  ========  ================================================================================

Phases (``--phase``):

* ``prefill``: every record is a prompt token at its ``position``.
* ``decode``: every record is a generated token. Layer-major records (all of layer 0, then layer 1, ...)
  carry the generated token's index as ``position`` (step = position + 1). Step-major records (every layer of
  step 1, then of step 2, ... with a constant ``position``) get their step from the order: a new step starts
  whenever the layer does not increase.
* ``auto`` (default), per request: a layer-major prefix with increasing positions followed by a step-major tail
  with a constant position (the layout of vLLM-style dumps that log the prompt, then each decode forward) is split
  into prefill and decode; a request without such a tail is taken as decode (per-generated-token logs).

Decode positions continue after the prompt when the request's prefill was recorded (position = prompt length +
step - 1); otherwise they count generated tokens from 0, and the manifest says so.

Nothing is written unless every line parses: the run is built in a temporary folder and renamed at the end.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import TracekitError
from ..jsonlines import iter_json_objects
from ..schema import build_routes_table
from .geometry import registry_geometry, size_overrides
from .numbers import (LAYER_MAX, MAX_EXPERTS, POSITION_MAX, TOKEN_ID_MAX, check_int, check_label, check_num_experts,
                      check_weights)
from .staging import StagedRun, holds_out_lock, refuse_nonempty_out

DEFAULT_FIELD_MAP = {
    "experts": "experts",
    "weights": "gating_probs",
    "request": "problem_id",
    "layer": "layer",
    "position": "token_idx|token_pos",
    "dataset": "dataset",
    "token_id": "",
}
_REQUIRED = ("experts", "request", "layer", "position")
PHASE_MODES = ("auto", "decode", "prefill")

# Task family of the datasets tracekit knows by name (lower-case; '-' and '_' ignored).
# task families of dataset names that are not in datasets_cfg/ (the registry's own names come from there)
EXTRA_DATASET_DOMAINS = {"codealpaca": "code", "math": "math", "alpaca": "chat", "nq": "general", "c4": "general",
                         "pile": "general"}
ROWS_PER_CHUNK = 1 << 20


def domain_of(dataset: str) -> str:
    """code/math/chat/general for a known dataset name, else ``unknown``."""
    key = _name_key(dataset)
    for name, dom in _dataset_domains().items():
        if key == name or key.startswith(name):
            return dom
    return "unknown"


def _name_key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


@lru_cache(maxsize=1)
def _dataset_domains() -> dict[str, str]:
    from ..datasets import list_datasets

    return {**{_name_key(c.name): c.domain for c in list_datasets()}, **EXTRA_DATASET_DOMAINS}


def parse_field_map(spec: str | dict | None) -> dict[str, str]:
    """``"experts=experts,weights=gating_probs"`` -> mapping over DEFAULT_FIELD_MAP (unknown keys refused)."""
    fm = dict(DEFAULT_FIELD_MAP)
    if not spec:
        return fm
    items = spec.items() if isinstance(spec, dict) else (p.split("=", 1) if "=" in p else (p, None) for p in spec.split(","))
    for k, v in items:
        k = k.strip()
        if v is None:
            raise TracekitError(f"--field-map entry {k!r} has no '='; write key=field, e.g. weights=gating_probs")
        if k not in DEFAULT_FIELD_MAP:
            raise TracekitError(f"--field-map key {k!r} unknown; keys: {', '.join(DEFAULT_FIELD_MAP)}")
        fm[k] = v.strip()
    for k in _REQUIRED:
        if not fm[k]:
            raise TracekitError(f"--field-map must name a field for {k!r}")
    return fm


@dataclass
class _Request:
    file_idx: int
    dataset: str
    key: object
    lines: list[int] = field(default_factory=list)
    layer: list[int] = field(default_factory=list)
    position: list[int] = field(default_factory=list)
    token_id: list[int] = field(default_factory=list)
    experts: list[list[int]] = field(default_factory=list)
    weights: list[list[float]] = field(default_factory=list)


_FIELD_MAX = {"layer": LAYER_MAX, "position": POSITION_MAX - 1, "token_id": TOKEN_ID_MAX}  # step = position + 1


def _int_field(rec: dict, names: str, where: str, what: str) -> int:
    for name in names.split("|"):
        if name in rec:
            return check_int(rec[name], f"field {name!r} ({what})", where, 0, _FIELD_MAX[what])
    raise TracekitError(f"{where}: no field {names!r} ({what}); name it with --field-map {what}=FIELD")


def _read_files(files: Sequence[Path], fm: dict[str, str], dataset_override: str | None,
                weight_dtype: str = "float32", num_experts: int | None = None) -> list[_Request]:
    requests: dict[tuple, _Request] = {}
    k_seen: int | None = None
    e_max = (num_experts if num_experts is not None else MAX_EXPERTS) - 1
    for fi, path in enumerate(files):
        if not path.is_file():
            raise TracekitError(f"{path}: no such file")
        for lineno, rec in iter_json_objects(path):
            where = f"{path}:{lineno}"
            if dataset_override:
                ds = dataset_override
            elif fm["dataset"] and fm["dataset"] in rec:
                ds = check_label(rec[fm["dataset"]], f"field {fm['dataset']!r} (dataset)", where)
            else:
                ds = path.stem
            if fm["request"] not in rec:
                raise TracekitError(f"{where}: no field {fm['request']!r} (request); name it with --field-map request=FIELD")
            rkey = check_label(rec[fm["request"]], f"request field {fm['request']!r}", where)
            layer = _int_field(rec, fm["layer"], where, "layer")
            pos = _int_field(rec, fm["position"], where, "position")
            ex = rec.get(fm["experts"])
            if not isinstance(ex, list) or not ex:
                raise TracekitError(f"{where}: field {fm['experts']!r} must be a non-empty list of expert ids, got {ex!r}"[:300])
            for i, e in enumerate(ex):
                what = f"field {fm['experts']!r}[{i}] (expert id)" + (" (--num-experts)" if num_experts is not None else "")
                check_int(e, what, where, 0, e_max)
            if k_seen is None:
                k_seen = len(ex)
            elif len(ex) != k_seen:
                raise TracekitError(f"{where}: {len(ex)} experts where earlier records have {k_seen}; top-k must be constant")
            w = None
            if fm["weights"]:
                w = rec.get(fm["weights"])
                if w is None:
                    raise TracekitError(f"{where}: no field {fm['weights']!r} (weights); pass --field-map weights= to import without weights")
                w = check_weights(w, len(ex), f"field {fm['weights']!r}", where, weight_dtype)
            tok = -1
            if fm["token_id"] and fm["token_id"] in rec:
                tok = _int_field(rec, fm["token_id"], where, "token_id")
            key = (fi, ds, rkey)
            req = requests.get(key)
            if req is None:
                req = requests[key] = _Request(fi, ds, rkey)
            req.lines.append(lineno)
            req.layer.append(layer)
            req.position.append(pos)
            req.token_id.append(tok)
            req.experts.append(ex)
            if w is not None:
                req.weights.append(w)
    if not requests:
        raise TracekitError(f"{', '.join(map(str, files))}: no routing records found")
    return list(requests.values())


def _steps_by_order(layer: np.ndarray) -> np.ndarray:
    """Step-major rows (each decode step lists its layers in increasing order): 1-based step per row."""
    new = np.ones(len(layer), dtype=bool)
    new[1:] = layer[1:] <= layer[:-1]
    return np.cumsum(new).astype(np.int32)


def _decode_tail_start(layer: np.ndarray, pos: np.ndarray) -> int | None:
    """Start of a step-major decode tail (constant position, >= 2 layers) after a layer-major prefix, or None."""
    n = len(pos)
    same = pos == pos[-1]
    k = n
    while k > 0 and same[k - 1]:
        k -= 1
    tail_layers = layer[k:]
    if n - k < 2 or len(np.unique(tail_layers)) < 2:
        return None
    # inside the tail the layer must cycle (step-major), never stay on one layer
    if np.any(tail_layers[1:] == tail_layers[:-1]):
        return None
    return k


@dataclass
class _Phased:
    phase: np.ndarray  # 0 prefill, 1 decode
    position: np.ndarray
    step: np.ndarray  # -1 in prefill
    prompt_tokens: int
    generated_tokens: int
    how: str


def _recover_phases(req: _Request, mode: str, path: Path) -> _Phased:
    layer = np.asarray(req.layer, dtype=np.int64)
    pos = np.asarray(req.position, dtype=np.int64)
    n = len(layer)
    split = None
    if mode == "prefill":
        split = n
    elif mode == "auto":
        split = _decode_tail_start(layer, pos)
    if split is None and mode in ("auto", "decode") and n > 1 and np.all(pos == pos[0]) and len(np.unique(layer)) > 1:
        split = 0  # decode only, step-major
    phase = np.ones(n, dtype=np.int8)
    step = np.full(n, -1, dtype=np.int32)
    out_pos = pos.astype(np.int64)
    if split is None:  # layer-major decode: position is the generated token's index
        step[:] = pos + 1
        prompt_len, how = 0, "decode (position = generated-token index; prompt length unknown)"
    else:
        phase[:split] = 0
        prompt_len = int(pos[:split].max()) + 1 if split else 0
        if split < n:
            step[split:] = _steps_by_order(layer[split:])
            out_pos[split:] = prompt_len + step[split:] - 1
        how = "prefill + step-major decode" if 0 < split < n else ("prefill" if split == n else "step-major decode")
        if split < n and prompt_len + int(step[split:].max()) - 1 > POSITION_MAX:
            raise TracekitError(f"{path}:{req.lines[-1]}: request {req.key!r}: decode positions after a prompt of "
                                f"{prompt_len} tokens pass {POSITION_MAX}")
    # one row per (phase, position, layer): position < 2**31 takes bits 16..46, layer < 2**15 bits 0..14
    key = (phase.astype(np.int64) << 48) | (out_pos.astype(np.int64) << 16) | layer
    uniq, idx, counts = np.unique(key, return_index=True, return_counts=True)
    if len(uniq) < n:
        dup = np.flatnonzero(counts > 1)[0]
        first = idx[dup]
        line = req.lines[int(np.flatnonzero(key == uniq[dup])[1])]
        raise TracekitError(
            f"{path}:{line}: second record for request {req.key!r} layer {layer[first]} "
            f"{'prefill' if phase[first] == 0 else 'decode'} position {out_pos[first]} (first at line {req.lines[first]}); "
            "check --phase and --field-map position=FIELD"
        )
    gen = int(len(np.unique(step[phase == 1])))
    prompt_tokens = int(len(np.unique(out_pos[phase == 0])))
    return _Phased(phase, out_pos, step, prompt_tokens, gen, how)


@holds_out_lock
def import_jsonl(
    files: Iterable[str | os.PathLike],
    *,
    model: str,
    out: str | os.PathLike,
    field_map: str | dict | None = None,
    phase: str = "auto",
    num_experts: int | None = None,
    top_k: int | None = None,
    num_layers: int | None = None,
    dataset: str | None = None,
    domain: str | None = None,
    weight_dtype: str = "float32",
    run_id: str | None = None,
    hidden_size: int | None = None,
    moe_intermediate_size: int | None = None,
    expert_dtype: str | None = None,
) -> Path:
    """Turn JSONL routing records into the run directory ``out`` (which must not hold a run yet).

    ``weight_dtype`` is how the records' gate weights are stored; the model's sizes (``hidden_size``,
    ``moe_intermediate_size``, ``expert_dtype`` of its expert weights) go into the geometry, over the registry's
    (records carry none of them).

    Returns the run directory. Raises TracekitError (one line, naming file:line for a bad record) and then
    leaves nothing behind.
    """
    files = [Path(f) for f in files]
    if not files:
        raise TracekitError("no input files given")
    if phase not in PHASE_MODES:
        raise TracekitError(f"--phase {phase!r} unknown; use one of {', '.join(PHASE_MODES)}")
    fm = parse_field_map(field_map)
    out = Path(out)
    refuse_nonempty_out(out)  # before reading the files; StagedRun checks again when it opens
    if weight_dtype not in ("float16", "float32"):
        raise TracekitError(f"unknown weight dtype {weight_dtype!r}; use float16 or float32")
    if num_experts is not None:
        check_num_experts(check_int(num_experts, "--num-experts", "import", 1), "--num-experts")
    if num_layers is not None:
        check_int(num_layers, "--num-layers", "import", 1, LAYER_MAX + 1)
    sizes = size_overrides(hidden_size, moe_intermediate_size, expert_dtype)
    reqs = _read_files(files, fm, dataset, weight_dtype, num_experts)

    max_id = max(max(max(e) for e in r.experts) for r in reqs)
    k = len(reqs[0].experts[0])
    if num_experts is None:
        num_experts = check_num_experts(max_id + 1, ", ".join(map(str, files)))
    if top_k is not None and top_k != k:
        raise TracekitError(f"records list {k} experts per token but --top-k is {top_k}")
    layers_seen = sorted({l for r in reqs for l in r.layer})
    if num_layers is not None and layers_seen[-1] >= num_layers:
        raise TracekitError(f"layer {layers_seen[-1]} in the records but --num-layers is {num_layers}")
    phased = [_recover_phases(r, phase, files[r.file_idx]) for r in reqs]

    datasets = list(dict.fromkeys(r.dataset for r in reqs))
    domains = {d: (domain or domain_of(d)) for d in datasets}
    geometry = {
        "family": None,
        "num_layers": num_layers if num_layers is not None else layers_seen[-1] + 1,
        "moe_layers": list(range(num_layers)) if num_layers is not None else layers_seen,
        "num_experts": num_experts,
        "top_k": k,
        "n_group": None,
        "topk_group": None,
        "n_shared_experts": None,
        "scoring": None,
        "hidden_size": None,
        "moe_intermediate_size": None,
        "expert_dtype": None,
        **sizes,
    }
    registry = registry_geometry(model) or {}
    if registry and (registry.get("num_experts"), registry.get("top_k")) != (num_experts, k):
        raise TracekitError(
            f"records have E={num_experts}, top-{k} but {model} has E={registry.get('num_experts')}, "
            f"top-{registry.get('top_k')}; pass the right --model or explicit --num-experts/--top-k"
        )
    for key, value in registry.items():  # what the records cannot tell (family, scoring, groups, width)
        if geometry.get(key) is None:
            geometry[key] = value
    if registry and num_layers is None:
        stray = sorted(set(layers_seen) - set(registry["moe_layers"]))
        if stray:
            raise TracekitError(f"records route layer {stray[0]}, which is not an MoE layer of {model}")
        geometry["num_layers"], geometry["moe_layers"] = registry["num_layers"], list(registry["moe_layers"])
    dataset = {
        "name": "+".join(datasets),
        "domain": domains[datasets[0]] if len(set(domains.values())) == 1 else "mixed",
        "datasets": [{"name": d, "domain": domains[d]} for d in datasets],
        "files": [str(f) for f in files],
        "prompts": len(reqs),
    }
    args = {"files": [str(f) for f in files], "field_map": fm, "phase": phase, "num_experts": num_experts,
            "top_k": top_k, "num_layers": num_layers, "weight_dtype": weight_dtype, "hidden_size": hidden_size,
            "moe_intermediate_size": moe_intermediate_size, "expert_dtype": expert_dtype, "argv": sys.argv[1:]}
    with StagedRun(out, kind="routes", source="import:jsonl", model_name=model, geometry=geometry, dataset=dataset,
                   args=args, weight_dtype=weight_dtype, run_id=run_id) as staged:
        hows = sorted({p.how for p in phased})
        staged.note("phases: " + "; ".join(f"{sum(p.how == h for p in phased)} request(s) {h}" for h in hows))
        if any("prompt length unknown" in h for h in hows):
            staged.note("decode-only requests: position counts generated tokens from 0 (the prompt was not logged)")
        for ds in datasets:
            members = [i for i, r in enumerate(reqs) if r.dataset == ds]
            start = 0
            while start < len(members):
                group, rows = [], 0
                while start < len(members) and (not group or rows + len(reqs[members[start]].layer) <= ROWS_PER_CHUNK):
                    group.append(members[start])
                    rows += len(reqs[members[start]].layer)
                    start += 1
                table = _table(reqs, phased, group, staged.schema, staged.run_id, model, ds, domains[ds],
                               fm["weights"] != "")
                staged.write_table(table, requests=group,
                                   prompt_tokens=sum(phased[i].prompt_tokens for i in group),
                                   generated_tokens=sum(phased[i].generated_tokens for i in group))
    return out


def _table(reqs, phased, group, schema, run_id, model, dataset, domain, with_weights):
    def cat(fn, dtype):
        return np.concatenate([np.asarray(fn(i), dtype=dtype) for i in group])

    n_per = [len(reqs[i].layer) for i in group]
    return build_routes_table(
        schema=schema,
        run_id=run_id,
        model=model,
        dataset=dataset,
        domain=domain,
        request_id=np.repeat(np.asarray(group, dtype=np.int32), n_per),
        prompt_id=np.repeat(np.asarray([str(reqs[i].key) for i in group], dtype=object), n_per),
        phase=cat(lambda i: phased[i].phase, np.int8),
        position=cat(lambda i: phased[i].position, np.int32),
        step=cat(lambda i: phased[i].step, np.int32),
        layer=cat(lambda i: reqs[i].layer, np.int16),
        token_id=cat(lambda i: reqs[i].token_id, np.int32),
        experts=np.concatenate([np.asarray(reqs[i].experts, dtype=np.int64) for i in group]),
        weights=np.concatenate([np.asarray(reqs[i].weights, dtype=np.float64) for i in group]) if with_weights else None,
    )
