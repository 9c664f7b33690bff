"""Turn a fitted placement into the files serving engines load; validate before writing; write atomically.

Export never recomputes a placement: it reads ``Placement.slot_expert`` (M, S) and lays it out per engine.
Every format shares the slot convention: physical slot p sits on EP rank (GPU) ``p // (S / G)``.

- ``sglang``: ``--init-expert-location FILE`` JSON ``{"physical_to_logical_map": [[...], ...]}``, one row per
  *hidden layer* of the model including dense ones (SGLang sizes the map by ``num_hidden_layers`` and indexes it
  by absolute layer id). Dense layers have no experts; their rows are never read, and we fill them with SGLang's
  own trivial map ``arange(E + R) % E`` (what ``ExpertLocationMetadata.init_trivial`` builds for every layer), so
  every row is a valid mapping of width E + R. SGLang 0.5.23's ``static`` dispatch (``_find_nearest_expert``) takes
  a replica on the token's own GPU, else the *first* replica on its node when some but not all replicas are there,
  else a seeded fair random one; ``tracekit place --engine sglang`` scores placements under exactly that table
  (:mod:`tracekit.placement.scoring.dispatch`), which is why dense rows matter there too: they take random draws. The
  flags name the a2a backend it was scored under (``meta['a2a_backend']``, default deepep): SGLang builds those
  per-rank tables only with an a2a backend (with ``none`` it refuses static dispatch).
- ``trtllm``: MoE load balancer YAML: ``num_slots``, ``layer_updates_per_iter: 0`` (static),
  ``initial_global_assignments`` keyed by absolute MoE layer index, each a list of ``num_slots`` expert ids;
  rank r holds slots [r * num_slots / ep, (r + 1) * num_slots / ep).
- ``vllm``: released vLLM cannot load a static expert map. We emit the ``--eplb-config`` JSON (redundant experts,
  window sizes) and the ``--expert-placement-strategy`` closest to the placement that vLLM will actually run, and
  say plainly what is lost. vLLM (0.33, ``determine_expert_placement_strategy``) runs ``round_robin`` only for
  models with expert groups (``n_group`` > 1), no redundant experts and EPLB off, and with all-to-all kernels only
  on the DeepEP low-latency or NIXL EP backend; anything else falls back to ``linear``. So with R > 0 the flag is
  ``linear``.

Each placement records the dispatch it was scored under (``meta['engine']``, from ``tracekit place --engine``);
exporting it to another engine adds a one-line warning to the notes: that engine picks replicas its own way, so
the table's numbers do not carry over.
- ``json``: the neutral form (:func:`save_placement` / :func:`load_placement`), the whole placement and its rule.
- ``grouping``: the request grouping rule alone, what a router applies online.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import TracekitError
from ..jsonlines import read_json
from ..manifest_check import MAX_EXPERTS
from ..manifest_check import MAX_LAYERS as MAX_HIDDEN_LAYERS  # bounds the SGLang map (rows x slots) a file can ask for
from ..atomic import atomic_write_bytes
from .data.types import Cluster, GroupingRule, Placement

FORMATS = ("sglang", "trtllm", "vllm", "json", "grouping")
NEUTRAL_FORMAT = "tracekit-placement"
NEUTRAL_VERSION = 1
VLLM_EPLB_DEFAULTS = {"window_size": 1000, "step_interval": 3000, "log_balancedness": False}


# ------------------------------------------------------------------------------------------------ validation


def validate(placement: Placement, num_hidden_layers: int | None = None) -> None:
    """One-line TracekitError unless the placement can be exported: widths exact (E + R), E + R divisible by the
    EP size, ids in range, every logical expert present in every MoE layer, MoE layers unique and below
    ``num_hidden_layers``."""
    c = placement.cluster
    se = np.asarray(placement.slot_expert)
    layers = np.asarray(placement.layers)
    if c.num_slots % c.num_gpus:
        from .data.types import nearest_redundant

        near = " or ".join(map(str, nearest_redundant(c.num_experts, c.redundant, c.num_gpus)))
        raise TracekitError(f"E + R = {c.num_slots} slots do not divide over EP size {c.num_gpus}; change --redundant "
                            f"(nearest: {near})")
    if se.ndim != 2 or se.shape != (len(layers), c.num_slots):
        raise TracekitError(
            f"placement rows are {se.shape}, expected {len(layers)} MoE layers x {c.num_slots} slots (E + R)"
        )
    if not np.issubdtype(se.dtype, np.integer):
        raise TracekitError("placement slot ids must be integers")
    if se.size and (se.min() < 0 or se.max() >= c.num_experts):
        raise TracekitError(f"placement holds expert id {int(se.min() if se.min() < 0 else se.max())} outside 0..{c.num_experts - 1}")
    for m in range(se.shape[0]):
        present = np.bincount(se[m], minlength=c.num_experts)
        if (present == 0).any():
            miss = np.flatnonzero(present == 0)
            raise TracekitError(
                f"layer {int(layers[m])} has no slot for expert(s) {miss[:5].tolist()}; every logical expert needs one"
            )
    if len(np.unique(layers)) != len(layers) or (layers.size and layers.min() < 0):
        raise TracekitError(f"placement MoE layers are not unique non-negative indices: {layers.tolist()[:8]}")
    if num_hidden_layers is not None and layers.size and layers.max() >= num_hidden_layers:
        raise TracekitError(
            f"MoE layer {int(layers.max())} is beyond the model's {num_hidden_layers} hidden layers; pass the right --num-layers"
        )


def hidden_layers(placement: Placement, override: int | None = None) -> int:
    """The model's hidden layer count: ``override``, else the fitted geometry (``meta['num_hidden_layers']``),
    else last MoE layer + 1."""
    if override is not None:
        return int(override)
    n = placement.meta.get("num_hidden_layers")
    return int(n) if n else int(np.max(placement.layers)) + 1


# ------------------------------------------------------------------------------------------------ neutral JSON


def grouping_to_dict(rule: GroupingRule) -> dict[str, Any]:
    return {
        "kind": rule.kind,
        "domain_nodes": {str(k): [int(x) for x in v] for k, v in (rule.domain_nodes or {}).items()},
        "feature_layers": [int(x) for x in (rule.feature_layers or [])],
        "centroids": None if rule.centroids is None else np.asarray(rule.centroids, dtype=float).tolist(),
        "centroid_node": None if rule.centroid_node is None else [int(x) for x in rule.centroid_node],
        "how_to_apply": {
            "none": "round-robin requests over nodes",
            "domain": "send a request of domain d round-robin to the nodes domain_nodes[d] (all nodes if d is absent)",
            "signature": "histogram the request's prefill experts per feature layer (absolute layer ids; "
            "zero-computation experts are not counted), normalise each layer to sum 1, concatenate; send it to "
            "centroid_node of the nearest centroid (Euclidean)",
        }[rule.kind],
    }


def grouping_from_dict(d: dict[str, Any]) -> GroupingRule:
    kind = d.get("kind", "none")
    if kind not in ("none", "domain", "signature"):
        raise TracekitError(f"grouping kind {kind!r} unknown; expected none, domain or signature")
    return GroupingRule(
        kind=kind,
        domain_nodes={str(k): [int(x) for x in v] for k, v in (d.get("domain_nodes") or {}).items()},
        feature_layers=[int(x) for x in d.get("feature_layers") or []],
        centroids=None if d.get("centroids") is None else np.asarray(d["centroids"], dtype=np.float32),
        centroid_node=None if d.get("centroid_node") is None else np.asarray(d["centroid_node"], dtype=np.int64),
    )


def jsonable(x: Any) -> Any:
    """Plain JSON values; a NaN or infinite metric (e.g. a ratio over no tokens) becomes null, since strict JSON
    readers (ours included) refuse NaN."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist()) if x.dtype.kind == "f" else x.tolist()
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


#: wall-clock fields (fit and scoring times): printed, never written, so that a file is a pure function of
#: (runs, flags, seed) and re-running ``place`` writes the same bytes
TIMING_KEYS = frozenset({"fit_seconds", "eval_seconds", "seconds"})


def without_timings(obj: Any) -> Any:
    """``obj`` (JSON-ready dicts and lists) without the :data:`TIMING_KEYS` fields, at any depth."""
    if isinstance(obj, dict):
        return {k: without_timings(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [without_timings(v) for v in obj]
    return obj


def placement_to_dict(placement: Placement) -> dict[str, Any]:
    c = placement.cluster
    return {
        "format": NEUTRAL_FORMAT,
        "version": NEUTRAL_VERSION,
        "strategy": placement.strategy,
        "cluster": {"nodes": c.nodes, "gpus_per_node": c.gpus_per_node, "num_experts": c.num_experts,
                    "redundant": c.redundant, "num_slots": c.num_slots, "slots_per_gpu": c.slots_per_gpu},
        "slot_convention": "slot p on GPU p // slots_per_gpu; GPU g on node g // gpus_per_node",
        "layers": [int(x) for x in placement.layers],
        "slot_expert": np.asarray(placement.slot_expert).astype(int).tolist(),
        "grouping": grouping_to_dict(placement.grouping or GroupingRule()),
        "meta": without_timings(jsonable(placement.meta)),
    }


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def check_placement_json(d: Any, where: str) -> None:
    """One line for a placement file of the wrong shape or types (hand-edited, truncated, another tool's JSON):
    every field that export reads is checked here, at the read boundary, before any array is built."""
    fix = "write it again with tracekit place -o"
    if not isinstance(d, dict):
        raise TracekitError(f"{where}: a placement is a JSON object, not {type(d).__name__}; {fix}")

    def bad(field: str, want: str) -> TracekitError:
        return TracekitError(f"{where}: field {field!r} must be {want}; {fix}")

    if "version" in d and not (_is_int(d["version"]) and d["version"] >= 0):
        raise bad("version", "a non-negative integer")
    c = d.get("cluster")
    if not isinstance(c, dict):
        raise bad("cluster", "an object with nodes, gpus_per_node, num_experts, redundant")
    for key, lo, hi in (("nodes", 1, 4096), ("gpus_per_node", 1, 64), ("num_experts", 1, MAX_EXPERTS),
                        ("redundant", 0, MAX_EXPERTS)):
        v = c.get(key)
        if not (_is_int(v) and lo <= v <= hi):
            raise bad(f"cluster.{key}", f"an integer in {lo}..{hi}")
    layers = d.get("layers")
    if not (isinstance(layers, list) and all(_is_int(x) and 0 <= x < MAX_HIDDEN_LAYERS for x in layers)):
        raise bad("layers", f"a list of MoE layer indices in 0..{MAX_HIDDEN_LAYERS - 1}")
    se = d.get("slot_expert")
    e = c["num_experts"]
    if not (isinstance(se, list) and all(isinstance(r, list) and all(_is_int(x) and 0 <= x < e for x in r) for r in se)):
        raise bad("slot_expert", f"a list (one per MoE layer) of lists of expert ids in 0..{e - 1}")
    if "strategy" in d and not isinstance(d["strategy"], str):
        raise bad("strategy", "a string")
    g = d.get("grouping")
    if g is not None:
        if not isinstance(g, dict):
            raise bad("grouping", "an object")
        dn = g.get("domain_nodes")
        if dn is not None and not (isinstance(dn, dict) and all(
                isinstance(v, list) and all(_is_int(x) and x >= 0 for x in v) for v in dn.values())):
            raise bad("grouping.domain_nodes", "an object of domain -> list of node indices")
        fl = g.get("feature_layers")
        if fl is not None and not (isinstance(fl, list) and all(_is_int(x) and x >= 0 for x in fl)):
            raise bad("grouping.feature_layers", "a list of layer indices")
        cen = g.get("centroids")
        if cen is not None and not (isinstance(cen, list) and all(
                isinstance(r, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                            and np.isfinite(x) for x in r) for r in cen)):
            raise bad("grouping.centroids", "a list of lists of finite numbers")
        cn = g.get("centroid_node")
        if cn is not None and not (isinstance(cn, list) and all(_is_int(x) and x >= 0 for x in cn)):
            raise bad("grouping.centroid_node", "a list of node indices")
    meta = d.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise bad("meta", "an object")
    n = (meta or {}).get("num_hidden_layers")
    if n is not None and not (_is_int(n) and 1 <= n <= MAX_HIDDEN_LAYERS):
        raise bad("meta.num_hidden_layers", f"an integer in 1..{MAX_HIDDEN_LAYERS}")


def placement_from_dict(d: dict[str, Any], where: str = "placement") -> Placement:
    if isinstance(d, dict) and d.get("format") == NEUTRAL_FORMAT:
        check_placement_json(d, where)
    if not isinstance(d, dict) or d.get("format") != NEUTRAL_FORMAT:
        if isinstance(d, dict) and "run_id" in d and "kind" in d:
            what = "a run's manifest; place its run with tracekit place RUN -o placement.json"
        else:
            what = (f"format {d.get('format') if isinstance(d, dict) else None!r}, not {NEUTRAL_FORMAT!r}; "
                    "write one with tracekit place RUNS -o placement.json")
        raise TracekitError(f"{where}: not a placement ({what})")
    if int(d.get("version", 0)) > NEUTRAL_VERSION:
        raise TracekitError(f"{where}: placement format v{d['version']} is newer than this tracekit; upgrade tracekit")
    try:
        c = d["cluster"]
        cluster = Cluster(int(c["nodes"]), int(c["gpus_per_node"]), int(c["num_experts"]), int(c["redundant"]))
        p = Placement(
            cluster=cluster,
            layers=np.asarray(d["layers"], dtype=np.int64),
            slot_expert=np.asarray(d["slot_expert"], dtype=np.int64),
            strategy=str(d.get("strategy", "unknown")),
            grouping=grouping_from_dict(d.get("grouping") or {}),
            meta=dict(d.get("meta") or {}),
        )
        validate(p)
    except (KeyError, TypeError, ValueError) as exc:
        raise TracekitError(f"{where}: malformed placement ({type(exc).__name__}: {exc})") from None
    except TracekitError as exc:  # name the file the problem is in
        raise TracekitError(f"{where}: {exc}") from None
    return p


def save_placement(placement: Placement, path: str | Path) -> Path:
    """Validate and write the neutral JSON atomically."""
    validate(placement)
    path = Path(path)
    atomic_write_bytes(path, (json.dumps(placement_to_dict(placement), separators=(",", ":")) + "\n").encode())
    return path


def load_placement(path: str | Path) -> Placement:
    path = Path(path)
    if not path.is_file():
        raise TracekitError(f"{path}: no such placement file (write one with tracekit place -o)")
    d = read_json(path, "write it again with tracekit place -o")
    return placement_from_dict(d, str(path))


# ------------------------------------------------------------------------------------------------ engines


def sglang_map(placement: Placement, num_hidden_layers: int | None = None) -> dict[str, Any]:
    """``{"physical_to_logical_map": (num_hidden_layers, E + R)}``; dense rows = SGLang's trivial map."""
    n = hidden_layers(placement, num_hidden_layers)
    validate(placement, n)
    c = placement.cluster
    rows = np.tile(np.arange(c.num_slots) % c.num_experts, (n, 1))
    rows[np.asarray(placement.layers)] = np.asarray(placement.slot_expert)
    return {"physical_to_logical_map": rows.astype(int).tolist()}


def sglang_flags(placement: Placement, path: str | Path) -> list[str]:
    c = placement.cluster
    return [
        f"--init-expert-location {path}",
        f"--ep-num-redundant-experts {c.redundant}",
        f"--ep-size {c.num_gpus}",
        f"--tp-size {c.num_gpus}",
        f"--nnodes {c.nodes}",
        "--enable-dp-attention",
        f"--dp-size {c.num_gpus}",
        f"--moe-a2a-backend {placement.meta.get('a2a_backend', 'deepep')}",
        "--ep-dispatch-algorithm static",
    ]


def trtllm_yaml(placement: Placement) -> str:
    """TensorRT-LLM's ``moe_load_balancer`` file: slot count, no online updates, every layer's slot -> expert map."""
    import yaml

    validate(placement)
    doc = {"num_slots": int(placement.cluster.num_slots), "layer_updates_per_iter": 0,
           "initial_global_assignments": {int(layer): [int(x) for x in row]
                                          for layer, row in zip(placement.layers, np.asarray(placement.slot_expert))}}
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=1 << 20)


def vllm_round_robin_runs(cluster: Cluster, n_group: int | None) -> bool:
    """Whether vLLM runs ``--expert-placement-strategy round_robin`` (see the module docstring): no redundant
    experts and expert groups (``n_group`` > 1; unknown counts as yes)."""
    return cluster.redundant == 0 and (n_group is None or int(n_group) > 1)


def vllm_deployable(cluster: Cluster, n_group: int | None) -> list[str]:
    """The tracekit strategies whose layout released vLLM can run: ``linear`` (its default
    ``--expert-placement-strategy``), ``eplb`` (``--enable-eplb``: vLLM's own online rebalancer is DeepSeek's EPLB,
    fed by its own load counts, so it reaches this layout when the live load resembles the fit rows) and
    ``round-robin`` where :func:`vllm_round_robin_runs`. Never ``locality``: vLLM loads no static expert map."""
    return ["linear", "eplb"] + (["round-robin"] if vllm_round_robin_runs(cluster, n_group) else [])


def vllm_config(placement: Placement) -> dict[str, Any]:
    """The vLLM settings closest to the placement, and what vLLM cannot take."""
    from .strategies.baselines import linear_row, round_robin_row

    validate(placement)
    c = placement.cluster
    se = np.asarray(placement.slot_expert)
    gpu = c.gpu_of_slot()

    def overlap(row: np.ndarray) -> float:  # share of (layer, GPU, expert) memberships that agree
        ref = {(int(g), int(e)) for g, e in zip(gpu, row)}
        return float(np.mean([(int(g), int(e)) in ref for g, e in zip(np.tile(gpu, se.shape[0]), se.ravel())]))

    scores = {"linear": overlap(linear_row(c)), "round_robin": overlap(round_robin_row(c, strict=False))}
    closest = max(scores, key=lambda k: (scores[k], k == "linear"))
    n_group = placement.meta.get("n_group")
    rr_runs = vllm_round_robin_runs(c, n_group)
    best = closest if (closest == "linear" or rr_runs) else "linear"
    rr_note = (
        " vLLM runs round_robin only for models with expert groups (n_group > 1), no redundant experts and EPLB off "
        "(with all-to-all kernels only on the DeepEP low-latency or NIXL EP backend); otherwise it falls back to "
        "linear" + (", so this placement (closest to round_robin) gets linear" if closest != best else "") + "."
    )
    eplb_cfg = {**VLLM_EPLB_DEFAULTS, "num_redundant_experts": c.redundant}
    flags = [
        "--enable-expert-parallel",
        f"--data-parallel-size {c.num_gpus}",
        f"--expert-placement-strategy {best}",
    ]
    if c.redundant:
        flags = ["--enable-eplb", f"--eplb-config '{json.dumps(eplb_cfg, separators=(',', ':'))}'"] + flags
    return {
        "eplb_config": eplb_cfg,
        "expert_placement_strategy": best,
        "closest_strategy": closest,
        "placement_overlap": scores,
        "flags": flags,
        "cannot_take": (
            "released vLLM loads no static expert map: the per-layer slot->expert assignment of this placement "
            f"({placement.strategy}), its replica choice and the request grouping rule cannot be given to vLLM. "
            f"It starts from --expert-placement-strategy {best} (the same for every layer) and, with --enable-eplb, "
            f"re-balances {c.redundant} redundant experts from its own load counts (EPLB: balance, not locality)."
            + rr_note
        ),
    }


def render(placement: Placement, fmt: str, *, out: str | Path | None = None, num_hidden_layers: int | None = None) -> tuple[str, list[str]]:
    """(file text, notes to print) for ``fmt``; validates first. ``out`` names the file in printed flags."""
    if fmt not in FORMATS:
        raise TracekitError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    name = str(out) if out else f"placement.{_suffix(fmt)}"
    if fmt == "sglang":
        text = json.dumps(sglang_map(placement, num_hidden_layers), separators=(",", ":")) + "\n"
        return text, ["sglang server flags: " + " ".join(sglang_flags(placement, name))]
    if fmt == "trtllm":
        return trtllm_yaml(placement), [
            f"trtllm: set moe_config.load_balancer: {name} in the extra LLM API options YAML, with moe_expert_parallel_size "
            f"{placement.cluster.num_gpus}"
        ]
    if fmt == "vllm":
        cfg = vllm_config(placement)
        return json.dumps(cfg, indent=2) + "\n", ["vllm flags: " + " ".join(cfg["flags"]), "vllm: " + cfg["cannot_take"]]
    if fmt == "grouping":
        return json.dumps(grouping_export_dict(placement), indent=1) + "\n", grouping_notes(placement, name)
    validate(placement)
    return json.dumps(placement_to_dict(placement), separators=(",", ":")) + "\n", []


GROUPING_FORMAT = "tracekit-grouping"
GROUPING_VERSION = 1


def grouping_export_dict(placement: Placement) -> dict[str, Any]:
    """The grouping file ``tracekit route`` serves: the rule, label -> nodes, the cluster (DP rank r is GPU r, on
    node r // gpus_per_node), the model it was fitted for, and the prompt classifier (``meta['classifier']``)."""
    from .strategies.grouping import group_nodes

    rule = placement.grouping or GroupingRule()
    c = placement.cluster
    return {
        "format": GROUPING_FORMAT,
        "version": GROUPING_VERSION,
        **grouping_to_dict(rule),
        "groups": group_nodes(rule),
        "cluster": {"nodes": c.nodes, "gpus_per_node": c.gpus_per_node, "dp_size": c.num_gpus},
        "dp_rank_convention": "DP attention with dp-size = EP size: DP rank r runs on GPU r, node r // gpus_per_node",
        "model": jsonable(placement.meta.get("model")),
        "classifier": placement.meta.get("classifier"),
    }


def grouping_vanished(placement: Placement, asked: str | None = None) -> str | None:
    """One line when ``placement`` carries no request grouping a router could apply (no rule, rule ``none``, or a
    rule with no group -> nodes entry: ``tracekit route`` would start with 0 groups), else None. ``asked``: the
    ``--grouping`` the user asked ``place`` for (the line then names it)."""
    from .strategies.grouping import group_nodes

    rule = placement.grouping or GroupingRule()
    if rule.kind != "none" and group_nodes(rule):
        return None
    why = f"--grouping {asked} asked, but " if asked and asked != "none" else ""
    return f"warning: {why}{placement.strategy} has no request grouping (rule {rule.kind}): route starts with 0 groups"


def grouping_notes(placement: Placement, name: str) -> list[str]:
    rule = placement.grouping or GroupingRule()
    vanished = grouping_vanished(placement, placement.meta.get("grouping_asked"))
    notes = ([vanished] if vanished else []) + [f"grouping rule: {rule.kind}"]
    if rule.kind != "none" and not placement.meta.get("classifier"):
        notes.append("no prompt classifier in this placement (fit it with tracekit place --grouping); "
                     "tracekit route then needs requests that already carry a rank")
    notes.append(f"serve it: tracekit route --grouping {name} --upstream http://SGLANG_HOST:PORT --dp-size "
                 f"{placement.cluster.num_gpus}")
    return notes


def _suffix(fmt: str) -> str:
    return "yaml" if fmt == "trtllm" else "json"


def default_export_path(placement_path: str | Path, fmt: str) -> Path:
    """Where ``tracekit export`` writes without ``-o``: beside the placement, ``STEM.FORMAT.SUFFIX``
    (placement.sglang.json, placement.trtllm.yaml); the neutral ``json`` is ``STEM.neutral.json``, not
    ``STEM.json.json``."""
    p = Path(placement_path)
    return p.with_name(f"{p.stem}.{'neutral' if fmt == 'json' else fmt}.{_suffix(fmt)}")


def engine_warning(placement: Placement, fmt: str) -> str | None:
    """One line when ``placement`` was scored under another engine's dispatch than ``fmt`` (sglang, trtllm, vllm)."""
    scored = placement.meta.get("engine")
    if fmt not in ("sglang", "trtllm", "vllm") or not scored or scored == fmt:
        return None
    return (f"warning: this placement's numbers were computed for {scored} dispatch, not {fmt}'s replica choice; "
            f"rescore with tracekit place --engine {fmt} before relying on them")


def export(placement: Placement, fmt: str, out: str | Path, *, num_hidden_layers: int | None = None) -> list[str]:
    """Validate, render and write ``out`` atomically. Returns the notes (engine warning, server flags, limits)."""
    text, notes = render(placement, fmt, out=out, num_hidden_layers=num_hidden_layers)
    atomic_write_bytes(Path(out), text.encode())
    warn = engine_warning(placement, fmt)
    return ([warn] if warn else []) + notes
