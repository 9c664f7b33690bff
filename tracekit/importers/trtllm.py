"""Import TensorRT-LLM expert statistics (``trtllm-stats``) into the ``loads`` table.

Source of the layout: ``NVIDIA/TensorRT-LLM``, ``tensorrt_llm/_torch/expert_statistic.py`` (``ExpertStatistic``)
and the reader ``examples/wide_ep/ep_load_balancer/utils.py`` (``load_expert_statistic``). With
``EXPERT_STATISTIC_ITER_RANGE=start-stop`` and ``EXPERT_STATISTIC_PATH=DIR`` set, when iteration ``stop`` begins
every rank writes::

    DIR/meta_info.json           (rank 0) {"num_experts": E, "num_experts_per_token": k}
    DIR/rank{r}.safetensors      {"{iter}_{layer}": int64 tensor (E,)}  torch.bincount of that rank's
                                 token_selected_experts for iterations start..stop-1 and each MoE layer

``layer`` is the decoder layer index (``3`` .. ``60`` for DeepSeek R1 in the upstream README). ``*_raw.safetensors``
files (raw ids) are not statistics and are skipped, as upstream does. Ranks count the tokens they routed, so the
counts are summed over ranks (as ``load_expert_statistic`` does); iterations mix prefill and decode.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import TracekitError
from ..jsonlines import read_json
from ..schema import build_loads_table
from .numbers import COUNT_MAX, MAX_EXPERTS, WINDOW_MAX, check_array, check_int
from .staging import StagedRun

_RANK_RE = re.compile(r"^rank(\d+)\.safetensors$")
_KEY_RE = re.compile(r"^(\d+)_(\d+)$")


def read_meta(directory: Path) -> dict[str, Any]:
    p = directory / "meta_info.json"
    if not p.is_file():
        raise TracekitError(f"{directory}: no meta_info.json; pass the EXPERT_STATISTIC_PATH directory")
    meta = read_json(p, "truncated? dump the statistics again")
    if not isinstance(meta, dict) or "num_experts" not in meta:
        raise TracekitError(f"{p}: expected {{\"num_experts\": E, \"num_experts_per_token\": k}}")
    meta["num_experts"] = check_int(meta["num_experts"], "num_experts", str(p), 1, MAX_EXPERTS)
    if meta.get("num_experts_per_token") is not None:
        meta["num_experts_per_token"] = check_int(meta["num_experts_per_token"], "num_experts_per_token", str(p), 1,
                                                  meta["num_experts"])
    return meta


def rank_files(directory: Path) -> list[Path]:
    files = sorted((p for p in directory.iterdir() if _RANK_RE.match(p.name)), key=lambda p: int(_RANK_RE.match(p.name).group(1)))
    if not files:
        raise TracekitError(f"{directory}: no rank*.safetensors files")
    return files


def read_rank(path: Path, num_experts: int) -> dict[tuple[int, int], np.ndarray]:
    """One rank file -> {(iter, layer): counts (E,)}; one-line error when damaged or foreign."""
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except Exception as exc:  # SafetensorError (truncated header or data), OSError
        raise TracekitError(f"{path}: not a readable safetensors file ({str(exc)[:120]}); truncated?") from None
    out = {}
    for key, arr in tensors.items():
        m = _KEY_RE.match(key)
        if not m:
            raise TracekitError(f"{path}: key {key!r} is not '{{iter}}_{{layer}}'")
        if arr.ndim != 1 or arr.shape[0] != num_experts or arr.dtype.kind not in "iu":
            raise TracekitError(f"{path}: {key} has shape {arr.shape} ({arr.dtype}), expected ({num_experts},) ints")
        out[(int(m.group(1)), int(m.group(2)))] = check_array(arr, f"counts of {key}", str(path), 0, COUNT_MAX)
    return out


def map_layers(layers: list[int], geometry: dict[str, Any], where: str) -> dict[int, int]:
    """Dump layer ids -> absolute layer ids: absolute when they are MoE layers, else MoE ordinals."""
    moe = geometry["moe_layers"]
    if set(layers) <= set(moe):
        return {x: x for x in layers}
    if max(layers) < len(moe):
        return {x: moe[x] for x in layers}
    raise TracekitError(f"{where}: layers {min(layers)}..{max(layers)} do not match the model's MoE layers "
                        f"{moe[0]}..{moe[-1]}; check --model")


def import_trtllm_stats(paths: list[str | Path], staged: StagedRun, *, domain: str = "unknown") -> dict[str, int]:
    """Each path is an EXPERT_STATISTIC_PATH directory; several directories become consecutive windows."""
    geo = staged.geometry
    offset = 0
    totals = {"windows": 0, "ranks": 0}
    for directory in map(Path, paths):
        if not directory.is_dir():
            raise TracekitError(f"{directory}: not a directory; pass the EXPERT_STATISTIC_PATH directory")
        meta = read_meta(directory)
        e = meta["num_experts"]
        if e != geo["num_experts"]:
            raise TracekitError(f"{directory}: statistics count {e} experts, the model has {geo['num_experts']} "
                                "(redundant slots?); check --model")
        k = meta.get("num_experts_per_token")
        if k is not None and k != geo["top_k"]:
            raise TracekitError(f"{directory}: {k} experts per token, the model's top_k is {geo['top_k']}")
        summed: dict[tuple[int, int], np.ndarray] = {}
        files = rank_files(directory)
        for f in files:
            for key, counts in read_rank(f, e).items():
                summed[key] = summed[key] + counts if key in summed else counts
        if not summed:
            raise TracekitError(f"{directory}: the statistic files hold no counts")
        lmap = map_layers(sorted({layer for _, layer in summed}), geo, str(directory))
        keys = sorted(summed)
        iters = sorted({i for i, _ in keys})
        if iters[-1] - iters[0] + offset > WINDOW_MAX:
            raise TracekitError(f"{directory}: iterations {iters[0]}..{iters[-1]} span more than {WINDOW_MAX + 1} "
                                "windows; is a key's iteration number wrong?")
        w = np.repeat(np.array([i - iters[0] + offset for i, _ in keys]), e)
        layer = np.repeat(np.array([lmap[x] for _, x in keys]), e)
        table = build_loads_table(run_id=staged.run_id, model=staged.model_name, dataset=staged.dataset["name"],
                                  domain=domain, phase="mixed", window=w, layer=layer,
                                  expert=np.tile(np.arange(e), len(keys)),
                                  count=np.concatenate([summed[kk] for kk in keys]))
        staged.write_loads(table)
        totals["windows"] += len(iters)
        totals["ranks"] += len(files)
        staged.extra.setdefault("trtllm_iterations", []).append({"dir": str(directory), "start": iters[0],
                                                                "stop": iters[-1] + 1})
        offset += iters[-1] - iters[0] + 1
    staged.note("TensorRT-LLM expert statistics: per-iteration (token, expert) counts summed over rank files; "
                "prefill and decode are not separated (phase 'mixed'); window = iteration - first recorded iteration")
    staged.extra["import_counts"] = totals
    return totals
