"""One entry point for the serving-engine importers: ``import_engine_run(FORMAT, sources, out, model=...)``.

==================  ======  =====================================================================
format              kind    sources
==================  ======  =====================================================================
sglang-per-token    routes  ``expert_distribution_recorder_*_{rank}.pt`` (recorder mode per_token)
sglang-stat         loads   ``expert_distribution_recorder_*.pt`` (recorder mode stat)
routed-experts      routes  JSONL of SGLang ``/generate`` or vLLM completion responses
trtllm-stats        loads   ``EXPERT_STATISTIC_PATH`` directories (meta_info.json, rank*.safetensors)
==================  ======  =====================================================================
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from ..errors import TracekitError
from ..store import read_manifest
from .geometry import resolve_model
from .routed_experts import import_routed_experts
from .sglang import import_sglang_per_token, import_sglang_stat
from .staging import StagedRun, holds_out_lock
from .trtllm import import_trtllm_stats

FORMATS: dict[str, tuple[str, Callable[..., dict]]] = {
    "sglang-per-token": ("routes", import_sglang_per_token),
    "sglang-stat": ("loads", import_sglang_stat),
    "routed-experts": ("routes", import_routed_experts),
    "trtllm-stats": ("loads", import_trtllm_stats),
}


@holds_out_lock
def import_engine_run(
    fmt: str,
    sources: list[str | os.PathLike],
    out: str | os.PathLike,
    *,
    model: str | None,
    num_experts: int | None = None,
    top_k: int | None = None,
    moe_layers: str | list[int] | None = None,
    num_layers: int | None = None,
    dataset: str | None = None,
    domain: str = "unknown",
    args: dict[str, Any] | None = None,
    slot_map: str | os.PathLike | None = None,
    hidden_size: int | None = None,
    moe_intermediate_size: int | None = None,
    expert_dtype: str | None = None,
) -> dict[str, Any]:
    """Import engine recordings into a new run directory ``out``; returns its manifest.

    Nothing is written unless every source is read without error (see :class:`StagedRun`).
    """
    if fmt not in FORMATS:
        raise TracekitError(f"unknown import format {fmt!r}; use one of {', '.join(FORMATS)}")
    if not sources:
        raise TracekitError(f"{fmt}: give at least one source file")
    for s in sources:
        if not Path(s).exists():
            raise TracekitError(f"{s}: no such file or directory")
    kind, fn = FORMATS[fmt]
    options: dict[str, Any] = {}
    if slot_map is not None:
        if fmt != "routed-experts":
            raise TracekitError("--slot-map applies to routed-experts only (the other dumps carry their own map)")
        if not Path(slot_map).is_file():
            raise TracekitError(f"--slot-map {slot_map}: no such file")
        options["slot_map"] = Path(slot_map)
    name, geometry = resolve_model(model, num_experts=num_experts, top_k=top_k, moe_layers=moe_layers,
                                   num_layers=num_layers, hidden_size=hidden_size,
                                   moe_intermediate_size=moe_intermediate_size, expert_dtype=expert_dtype)
    ds = {"name": dataset or fmt, "domain": domain, "sources": [str(Path(s)) for s in sources]}
    call_args = {"format": fmt, "sources": [str(s) for s in sources], "model": model, "num_experts": num_experts,
                 "top_k": top_k, "moe_layers": moe_layers, "num_layers": num_layers, "dataset": dataset,
                 "domain": domain, "slot_map": str(slot_map) if slot_map else None, "hidden_size": hidden_size,
                 "moe_intermediate_size": moe_intermediate_size, "expert_dtype": expert_dtype, **(args or {})}
    with StagedRun(out, kind=kind, source=f"import:{fmt}", model_name=name, geometry=geometry, dataset=ds,
                   args=call_args) as staged:
        fn([Path(s) for s in sources], staged, domain=domain, **options)
    return read_manifest(Path(out)) or {}
